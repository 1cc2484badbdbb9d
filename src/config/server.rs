//! The listeners: where the service answers, how it treats connections, and
//! how the API listener is encrypted (section 12 of the contract).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, positive};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "super::words::duration")]
    pub shutdown_grace: Duration,
    /// A connection that has not sent a whole request head (or finished its
    /// TLS handshake) within this is closed.
    #[serde(with = "super::words::duration")]
    pub header_read_timeout: Duration,
    /// Open connections per listener; beyond it new connections get a 503 and are closed.
    pub max_connections: usize,
    /// Open connections from one peer address on the API listener; beyond it
    /// that peer's new connections get a 503 and are closed.
    pub max_connections_per_peer: usize,
    /// PEM certificate chain: with `tls_key_file`, the API listener speaks HTTPS only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle: callers may prove who they are with a certificate it issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is optional or required (with `tls_client_ca_file`).
    #[serde(default)]
    pub tls_client_auth: ClientAuth,
    /// Serve plain HTTP off loopback: an explicit choice, for a mesh or a
    /// network that already encrypts.
    #[serde(default)]
    pub plaintext: bool,
}

/// `server.tls_client_auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A certificate is asked for; callers without one use a key or a service account.
    #[default]
    Optional,
    /// No handshake completes without a valid client certificate.
    Required,
}

impl<'de> Deserialize<'de> for ClientAuth {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const CHOICES: &[(&str, ClientAuth)] = &[
            ("optional", ClientAuth::Optional),
            ("required", ClientAuth::Required),
        ];
        super::words::one_of(deserializer, CHOICES)
    }
}

/// The files of an HTTPS listener, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
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
        if self.max_connections_per_peer == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections_per_peer",
                "must be at least 1 (set it to server.max_connections for no bound per peer)",
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "server.tls_key_file",
                    "is required with server.tls_cert_file (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "server.tls_cert_file",
                    "is required with server.tls_key_file (the certificate chain of that key)",
                ));
            }
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(ConfigError::invalid(
                "server.tls_client_ca_file",
                "needs server.tls_cert_file and server.tls_key_file: client certificates are asked for in a TLS handshake",
            ));
        }
        if self.tls_client_auth == ClientAuth::Required && self.tls_client_ca_file.is_none() {
            return Err(ConfigError::invalid(
                "server.tls_client_auth",
                "\"required\" needs server.tls_client_ca_file, the CA that issues the callers' certificates",
            ));
        }
        if self.plaintext && self.tls_cert_file.is_some() {
            return Err(ConfigError::invalid(
                "server.plaintext",
                "cannot be combined with server.tls_cert_file: choose HTTPS or plain HTTP",
            ));
        }
        Ok(())
    }

    /// The HTTPS files, when the API listener is to be encrypted.
    pub fn tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            client_ca: self.tls_client_ca_file.clone(),
            client_auth: self.tls_client_auth,
        })
    }

    /// Secure by default: off loopback the API listener is HTTPS unless
    /// plain HTTP was chosen out loud.
    pub(super) fn require_transport(&self) -> Result<(), ConfigError> {
        if self.tls_cert_file.is_none() && !self.plaintext && !self.listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "server.tls_cert_file",
                format!(
                    "server.listen {} is not a loopback address, so callers' keys and tokens would cross the network in clear: \
                     set server.tls_cert_file and server.tls_key_file to serve HTTPS, \
                     or server.plaintext = true where a mesh or the network already encrypts",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}
