//! What the service writes about itself: the log format and level, and the
//! key that pseudonymises identities in the audit trail.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const CHOICES: &[(&str, LogFormat)] =
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)];
        super::words::one_of(deserializer, CHOICES)
    }
}

/// A `tracing` filter directive such as `info` or `token_broker=debug,warn`,
/// checked when the configuration is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(String);

impl LogLevel {
    pub fn parse(directive: &str) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::try_new(directive)
            .map(|_| Self(directive.to_owned()))
            .map_err(|e| format!("not a valid tracing filter directive: {e}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: LogLevel,
    /// Bytes of log lines that may wait for a slow stdout; past three
    /// quarters of it other lines are dropped, past all of it audit events
    /// are refused (their requests fail with 503).
    pub queue_bytes: usize,
}

impl LogSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_bytes < MIN_QUEUE_BYTES {
            return Err(ConfigError::invalid(
                "log.queue_bytes",
                format!("must be at least {MIN_QUEUE_BYTES} (64 KiB)"),
            ));
        }
        Ok(())
    }
}

/// Room for a few hundred lines at the least.
const MIN_QUEUE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Key for the HMAC that pseudonymises emails and user ids in audit events.
    #[serde(default)]
    pub hash_key_file: Option<PathBuf>,
}
