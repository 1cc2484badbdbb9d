#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use token_broker::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    run(Cli::parse()).await
}
