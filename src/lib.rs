//! token-broker: holds the BotPenguin partner key and hands internal callers
//! cached user tokens over HTTP. See `docs/ARCHITECTURE.md` for the map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod breaker;
pub mod broker;
pub mod callers;
pub mod cli;
pub mod config;
pub mod domain;
pub mod http;
pub mod remembered;
pub mod shared;
pub mod simulator;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod watch;
