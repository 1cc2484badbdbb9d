//! The command line: parses arguments and runs one command,
//! returning the process exit code (0 clean, 2 configuration error, 1 other).

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::audit::SubjectKey;
use crate::callers::service_accounts::Verifier;
use crate::config::{
    CALLER_KEY_PREFIX, ClientSettings, ConfigError, KeyDigest, Scope, Settings, Sources,
};
use crate::simulator::{Simulator, random_hex};
use crate::startup::{Application, StartupError, shutdown_signal};
use crate::telemetry;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Parser)]
#[command(
    name = "token-broker",
    version,
    about = "Hands internal callers BotPenguin user tokens without exposing the partner key"
)]
pub struct Cli {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(long, global = true, env = "TOKEN_BROKER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Run the service against a built-in simulated BotPenguin; prints a demo caller key.
    Demo,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Read a caller key on stdin and print its `key_sha256` line.
    HashKey {
        /// Make a new random caller key; print it and its `key_sha256` line.
        #[arg(long)]
        generate: bool,
    },
    /// Run only the simulated BotPenguin upstream.
    SimulateUpstream {
        /// Address to listen on, e.g. 127.0.0.1:8081.
        #[arg(long)]
        listen: SocketAddr,
        /// Partner key the simulator accepts.
        #[arg(long, default_value = "demo-partner-key")]
        partner_key: String,
        /// Added before every answer, e.g. 20ms (a realistic vendor).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        latency: std::time::Duration,
        /// Also simulate agents user0@example.com … user{N-1}@example.com (for load tests).
        #[arg(long, default_value_t = 0)]
        users: usize,
        /// Every identity it does not know has an active token too (for fuzzers).
        #[arg(long)]
        any_user: bool,
    },
}

/// How a command failed: decides the exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Other(_) => ExitCode::from(1),
        }
    }
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Demo => demo(cli.config).await,
        Command::CheckConfig => check_config(cli.config).await,
        Command::HashKey { generate } => hash_key(generate),
        Command::SimulateUpstream {
            listen,
            partner_key,
            latency,
            users,
            any_user,
        } => simulate_upstream(listen, &partner_key, latency, users, any_user).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("token-broker: {failure}");
            failure.exit_code()
        }
    }
}

fn load(file: Option<PathBuf>) -> Result<Settings, Failure> {
    Ok(Settings::load(&Sources::from_process(file))?)
}

async fn serve(file: Option<PathBuf>) -> Result<(), Failure> {
    let settings = load(file)?;
    settings.require_serving()?;
    run_service(&settings, |_| {}).await
}

async fn run_service(
    settings: &Settings,
    on_ready: impl FnOnce(&Application),
) -> Result<(), Failure> {
    let telemetry = telemetry::init(&settings.log, &settings.otel);
    disable_core_dumps();
    if settings.auth.allow_anonymous {
        tracing::warn!(
            "auth.allow_anonymous is on: requests without a key get every scope; for local development only"
        );
    }
    if settings.upstream.base_url.scheme() == "http"
        && !crate::config::is_loopback(&settings.upstream.base_url)
    {
        tracing::warn!(
            "upstream.allow_insecure_http is on: the partner key is sent without TLS; never use it with the real vendor"
        );
    }
    if settings.server.plaintext && !settings.server.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %settings.server.listen,
            "server.plaintext is on: callers' keys and tokens cross the network without TLS; only behind a mesh or on a network that encrypts"
        );
    }
    let app = Application::build(settings, telemetry.audit_trail(), telemetry.mode())
        .await
        .map_err(|e| match e {
            StartupError::Config(e) => Failure::Config(e),
            other => Failure::Other(other.to_string()),
        })?;
    let scheme = if settings.server.tls().is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(api = %app.api_addr(), admin = %app.admin_addr(), scheme, "listening");
    on_ready(&app);
    // What is left of the grace after the connections closed is the log
    // output's to drain.
    let grace_ends = app.run_until(shutdown_signal()).await;
    telemetry.shutdown(grace_ends).await;
    Ok(())
}

/// A core dump, or another process of the same user reading this one's
/// memory (ptrace, /proc/PID/mem), would expose the partner key and tokens:
/// no core file, and the process is not dumpable.
pub fn disable_core_dumps() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{
            DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit,
        };
        let none = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        if let Err(error) = setrlimit(Resource::Core, none) {
            tracing::warn!(%error, "cannot disable core dumps");
        }
        if let Err(error) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
            tracing::warn!(%error, "cannot make the process non-dumpable");
        }
    }
}

/// `demo`'s own listen defaults: its caller key has every scope, so it is
/// reachable from this machine only unless the listen settings say otherwise.
const DEMO_DEFAULTS: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n";

/// `demo`'s log format on a terminal: a person reads it, so pretty lines
/// rather than dense JSON (a pipe or a log collector keeps JSON).
const DEMO_ON_A_TERMINAL: &str = "[log]\nformat = \"pretty\"\n";

/// Where `demo` reads its settings: as `serve` does, on its own defaults
/// (loopback; pretty logs when stdout is a terminal), which `log.format` or
/// the listen settings given in a file or the environment still override.
fn demo_sources(mut sources: Sources, terminal: bool) -> Sources {
    sources.defaults.push(DEMO_DEFAULTS.to_owned());
    if terminal {
        sources.defaults.push(DEMO_ON_A_TERMINAL.to_owned());
    }
    sources
}

async fn demo(file: Option<PathBuf>) -> Result<(), Failure> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut settings = Settings::load(&demo_sources(Sources::from_process(file), terminal))?;
    let partner_key = random_hex(24);
    let caller_key = random_hex(24);
    let simulator = Simulator::demo(&partner_key);
    let upstream = simulator
        .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| other(format!("cannot start the simulated upstream: {e}")))?;
    settings.upstream.base_url = url::Url::parse(&format!("http://{upstream}"))
        .map_err(|e| other(format!("simulated upstream address: {e}")))?;
    settings.upstream.partner_key = Some(SecretString::from(partner_key));
    settings.upstream.partner_key_file = None;
    settings.clients.push(ClientSettings::new(
        "demo",
        KeyDigest::of_key(&caller_key),
        Scope::ALL.to_vec(),
    ));
    let (scheme, ca) = match &settings.server.tls_cert_file {
        Some(_) => ("https", " --cacert <the CA of server.tls_cert_file>"),
        None => ("http", ""),
    };
    run_service(&settings, |app| {
        let api = reachable(app.api_addr());
        let reach = if app.api_addr().ip().is_loopback() && app.admin_addr().ip().is_loopback() {
            "Listening on loopback only (set server.listen and server.admin_listen to change that)."
        } else {
            "Listening beyond loopback, as the listen settings ask: the demo key opens every scope to whoever reaches it."
        };
        println!(
            "\ntoken-broker demo: a simulated BotPenguin runs at http://{upstream}; nothing real is contacted.\n{reach}\n\
             Simulated users:\n{users}\n\n\
             demo caller key: {caller_key}\n\n\
             Try:\n  curl -s{ca} -H 'Authorization: Bearer {caller_key}' '{scheme}://{api}/v1/tokens?email=alice%40example.com&type=AGENT'\n\n\
             Metrics: http://{admin}/metrics   Stop: Ctrl-C\n",
            users = simulator.describe(),
            admin = reachable(app.admin_addr()),
        );
    })
    .await
}

/// An address a local `curl` can reach: `0.0.0.0` becomes `127.0.0.1`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

async fn check_config(file: Option<PathBuf>) -> Result<(), Failure> {
    let settings = load(file)?;
    settings.require_serving()?;
    let partner_key = settings.upstream.read_partner_key()?;
    SubjectKey::from_settings(&settings.audit, &partner_key)?;
    // Reads the files they name (keys, password, JWKS, CA); connects to nothing.
    let metrics = std::sync::Arc::new(Metrics::new());
    crate::shared::from_settings(&settings.cache, settings.upstream.timeout, metrics.clone())?;
    Verifier::from_settings(&settings.auth.kubernetes, metrics).await?;
    print!("{}", settings.redacted_toml());
    eprintln!("token-broker: configuration is valid");
    Ok(())
}

/// Shortest caller key `hash-key` accepts: a key is a secret, not a password.
const MIN_CALLER_KEY_CHARS: usize = 32;

/// Base62 characters after the prefix: 43 of them carry 256 random bits.
const GENERATED_KEY_CHARS: usize = 43;

/// `tbk_` and 43 random base62 characters: a key never mistaken for a
/// digest, and one a secret scanner can match (`tbk_[0-9A-Za-z]{43}`).
fn new_caller_key() -> String {
    use rand::Rng;
    let random: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(GENERATED_KEY_CHARS)
        .map(char::from)
        .collect();
    format!("{CALLER_KEY_PREFIX}{random}")
}

fn hash_key(generate: bool) -> Result<(), Failure> {
    if generate {
        let key = SecretString::from(new_caller_key());
        let key = secrecy::ExposeSecret::expose_secret(&key);
        println!("caller key (give it to the caller, store it as a secret): {key}");
        println!("key_sha256 = \"{}\"", KeyDigest::of_key(key));
        return Ok(());
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| other(format!("cannot read the key from stdin: {e}")))?;
    let key = SecretString::from(input.trim());
    drop(SecretString::from(input));
    let key = secrecy::ExposeSecret::expose_secret(&key);
    if key.is_empty() {
        return Err(other(
            "no key on stdin; try: printf %s \"$KEY\" | token-broker hash-key",
        ));
    }
    if key.chars().count() < MIN_CALLER_KEY_CHARS {
        return Err(other(format!(
            "a caller key must be at least {MIN_CALLER_KEY_CHARS} characters; `token-broker hash-key --generate` makes one"
        )));
    }
    println!("key_sha256 = \"{}\"", KeyDigest::of_key(key));
    Ok(())
}

async fn simulate_upstream(
    listen: SocketAddr,
    partner_key: &str,
    latency: std::time::Duration,
    users: usize,
    any_user: bool,
) -> Result<(), Failure> {
    let settings = load(None)?;
    let telemetry = telemetry::init(&settings.log, &settings.otel);
    let simulator = Simulator::demo(partner_key);
    simulator.set_latency(latency);
    simulator.set_any_user(any_user);
    let addr = simulator.spawn(listen).await.map_err(other)?;
    println!(
        "simulated BotPenguin at http://{addr}/ext/get-user-token (partner key: {partner_key})\n{}",
        simulator.describe()
    );
    simulator.add_numbered_agents(users);
    if users > 0 {
        println!(
            "  and {users} agents user0@example.com … user{}@example.com",
            users - 1
        );
    }
    if any_user {
        println!("  and every other identity, each with an active token of its own");
    }
    shutdown_signal().await;
    telemetry
        .shutdown(std::time::Instant::now() + std::time::Duration::from_secs(2))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_is_made_non_dumpable_without_core_files() {
        disable_core_dumps();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        let core = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
    }

    #[test]
    fn demo_logs_pretty_on_a_terminal_unless_log_format_is_given() {
        use crate::config::LogFormat;
        let on_a_terminal = Settings::load(&demo_sources(Sources::default(), true)).unwrap();
        assert_eq!(on_a_terminal.log.format, LogFormat::Pretty);
        let into_a_pipe = Settings::load(&demo_sources(Sources::default(), false)).unwrap();
        assert_eq!(into_a_pipe.log.format, LogFormat::Json);
        let given = Settings::load(&demo_sources(
            Sources {
                env: [("TOKEN_BROKER__LOG__FORMAT".into(), "json".into())].into(),
                ..Sources::default()
            },
            true,
        ))
        .unwrap();
        assert_eq!(given.log.format, LogFormat::Json, "a given log.format wins");
    }

    #[test]
    fn generated_caller_keys_carry_the_prefix_and_256_random_bits() {
        let key = new_caller_key();
        let random = key.strip_prefix(CALLER_KEY_PREFIX).expect("prefixed");
        assert_eq!(random.len(), 43);
        assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
        assert_ne!(new_caller_key(), key);
    }

    #[test]
    fn demo_listens_on_loopback_unless_the_listen_settings_say_otherwise() {
        let defaults = Settings::load(&demo_sources(Sources::default(), false)).unwrap();
        assert_eq!(defaults.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(defaults.server.admin_listen.to_string(), "127.0.0.1:9090");

        let given = Settings::load(&demo_sources(
            Sources {
                layers: vec!["[server]\nadmin_listen = \"0.0.0.0:9191\"\n".into()],
                env: [("TOKEN_BROKER__SERVER__LISTEN".into(), "0.0.0.0:8181".into())].into(),
                ..Sources::default()
            },
            false,
        ))
        .unwrap();
        assert_eq!(given.server.listen.to_string(), "0.0.0.0:8181");
        assert_eq!(given.server.admin_listen.to_string(), "0.0.0.0:9191");

        let serve = Settings::load(&Sources::default()).unwrap();
        assert_eq!(serve.log.format, crate::config::LogFormat::Json);
        assert_eq!(
            serve.server.listen.to_string(),
            "0.0.0.0:8080",
            "serve keeps its own defaults"
        );
    }
}
