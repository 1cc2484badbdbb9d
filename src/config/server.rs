//! The listeners: where the service answers, and how it treats connections.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, positive};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A connection that has not sent a whole request head within this is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Open connections per listener; beyond it new connections get a 503 and are closed.
    pub max_connections: usize,
}

impl ServerSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("server.shutdown_grace", self.shutdown_grace)?;
        positive("server.header_read_timeout", self.header_read_timeout)?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
