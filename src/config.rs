//! Configuration: layered loading (built-in defaults → file → environment),
//! validation that names the offending key, and redaction for display. Each
//! section's settings live in a module of their own and check themselves;
//! this module loads them and checks the rules that span sections.

mod auth;
mod cache;
mod clients;
mod log;
mod otel;
mod secrets;
mod server;
mod upstream;
mod words;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

pub use auth::{AuthSettings, KubernetesSettings};
pub use cache::{CacheSettings, RedisForm, SharedRedis, parse_node};
pub use clients::{
    ANONYMOUS, CALLER_KEY_PREFIX, ClientSettings, KeyDigest, Scope, ServiceAccount, SpiffeId,
};
pub use log::{AuditSettings, LogFormat, LogLevel, LogSettings};
pub use otel::OtelSettings;
pub use secrets::{read_key_file, read_secret_file};
pub use server::{ClientAuth, ServerSettings, TlsFiles};
pub use upstream::{UpstreamSettings, is_loopback};

use secrets::{describe_source_error, without_quoted_text};

/// The documented defaults, compiled in as the first layer.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TOKEN_BROKER";
/// Keys whose environment variable holds a comma-separated list.
const LIST_KEYS: [&str; 3] = [
    "cache.redis_sentinels",
    "cache.redis_cluster_nodes",
    "auth.kubernetes.audiences",
];

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Source(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where configuration comes from. Tests fill this from values; `main` from
/// the command line and the process environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// TOML texts layered on the built-in defaults, before the file: a
    /// command's own defaults (`demo` listens on loopback).
    pub defaults: Vec<String>,
    /// The file given by `--config` or `TOKEN_BROKER_CONFIG`.
    pub file: Option<PathBuf>,
    /// TOML texts layered after the file, in order (tests build config this way).
    pub layers: Vec<String>,
    /// Environment variables; only `TOKEN_BROKER__…` ones are read.
    pub env: HashMap<String, String>,
    /// The standard `OTEL_*` variables (trace export).
    pub otel: HashMap<String, String>,
}

impl Sources {
    /// The real process environment and an optional file.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Self {
            defaults: Vec::new(),
            file,
            layers: Vec::new(),
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
                .collect(),
            otel: std::env::vars()
                .filter(|(k, _)| k.starts_with("OTEL_"))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub cache: CacheSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub clients: Vec<ClientSettings>,
    /// Trace export, from `Sources::otel` (not a configuration key).
    #[serde(skip)]
    pub otel: OtelSettings,
}

impl Settings {
    /// Loads and validates the layered configuration.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        for text in &sources.defaults {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        if let Some(path) = &sources.file {
            if !path.is_file() {
                return Err(ConfigError::Source(format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )));
            }
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        for text in &sources.layers {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let mut env = sources.env.clone();
        // Lists come from the environment as comma-separated values; every
        // other value stays the string it was (a key like "0012" is no number).
        for key in LIST_KEYS {
            let name = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
            if let Some(value) = env.remove(&name) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect();
                builder = builder
                    .set_override(key, items)
                    .map_err(|e| ConfigError::Source(describe_source_error(&e)))?;
            }
        }
        let env = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(Some(env));
        let config = builder
            .add_source(env)
            .build()
            .map_err(|e| ConfigError::Source(describe_source_error(&e)))?;
        let mut settings: Settings = serde_path_to_error::deserialize(config).map_err(|e| {
            let key = words::key_path(e.path());
            let message = without_quoted_text(&words::in_plain_words(&e.into_inner().to_string()));
            if key == "." || key.is_empty() {
                ConfigError::Source(message)
            } else {
                ConfigError::invalid(key, message)
            }
        })?;
        settings.validate()?;
        settings.otel = OtelSettings::from_vars(&sources.otel);
        Ok(settings)
    }

    /// The rules within each section, then the ones that span sections.
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.cache.validate()?;
        self.log.validate()?;
        self.auth.kubernetes.validate()?;
        clients::validate(&self.clients)?;
        if self.auth.allow_anonymous {
            if !self.clients.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.allow_anonymous",
                    "cannot be combined with [[clients]]: anonymous requests would bypass every caller's policy",
                ));
            }
            if !self.server.listen.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    "auth.allow_anonymous",
                    "is for local development only: server.listen must be a loopback address such as 127.0.0.1:8080",
                ));
            }
        }
        if self.server.tls_client_ca_file.is_none()
            && let Some(i) = self.clients.iter().position(|c| !c.spiffe_ids.is_empty())
        {
            return Err(ConfigError::invalid(
                format!("clients[{i}].spiffe_ids"),
                "needs server.tls_client_ca_file, the CA whose client certificates carry these IDs",
            ));
        }
        if self.auth.kubernetes.issuer.is_none()
            && self.clients.iter().any(|c| !c.service_accounts.is_empty())
        {
            return Err(ConfigError::invalid(
                "auth.kubernetes.issuer",
                "is required when a client names service_accounts",
            ));
        }
        Ok(())
    }

    /// What `serve` needs beyond a valid file: a partner key, someone
    /// allowed in, and HTTPS off loopback unless plain HTTP is chosen.
    pub fn require_serving(&self) -> Result<(), ConfigError> {
        if self.upstream.partner_key.is_none() && self.upstream.partner_key_file.is_none() {
            return Err(ConfigError::invalid(
                "upstream.partner_key_file",
                "a partner key is required: set upstream.partner_key_file (or upstream.partner_key)",
            ));
        }
        if self.clients.is_empty() && !self.auth.allow_anonymous {
            return Err(ConfigError::invalid(
                "clients",
                "at least one [[clients]] entry is required unless auth.allow_anonymous = true",
            ));
        }
        self.server.require_transport()
    }

    /// The effective configuration as TOML, every secret replaced by `[REDACTED]`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Durations that must not be zero.
fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
