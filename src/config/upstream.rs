//! The vendor: its address, the partner key, and how hard it is pressed.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::secrets::{read_key_file, redacted};
use super::{ConfigError, positive};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub base_url: Url,
    /// Allows an `http://` base URL off loopback (an in-cluster simulator).
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default, serialize_with = "redacted")]
    pub partner_key: Option<SecretString>,
    #[serde(default)]
    pub partner_key_file: Option<PathBuf>,
    #[serde(with = "super::words::duration")]
    pub timeout: Duration,
    #[serde(with = "super::words::duration")]
    pub connect_timeout: Duration,
    /// Concurrent requests to the vendor, all keys together.
    pub max_in_flight: usize,
    /// Retries on connect errors, 429, 502, 503, 504.
    pub max_retries: u32,
    /// Consecutive failed fetches that open the circuit.
    pub circuit_failures: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "super::words::duration")]
    pub circuit_cooldown: Duration,
}

impl UpstreamSettings {
    /// Reads the partner key from `partner_key` or `partner_key_file`.
    pub fn read_partner_key(&self) -> Result<SecretString, ConfigError> {
        match (&self.partner_key, &self.partner_key_file) {
            (Some(key), _) => Ok(SecretString::from(key.expose_secret().trim())),
            (None, Some(path)) => read_key_file(path),
            (None, None) => Err(ConfigError::invalid(
                "upstream.partner_key_file",
                "a partner key is required",
            )),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("upstream.timeout", self.timeout)?;
        positive("upstream.connect_timeout", self.connect_timeout)?;
        positive("upstream.circuit_cooldown", self.circuit_cooldown)?;
        let url = &self.base_url;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if url.scheme() == "http" && !self.allow_insecure_http && !is_loopback(url) {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be https:// (http:// only for a loopback host, or with upstream.allow_insecure_http = true)",
            ));
        }
        if url.cannot_be_a_base() || url.query().is_some() {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be a base URL without query, such as https://api.v7.botpenguin.com",
            ));
        }
        if self.partner_key.is_some() && self.partner_key_file.is_some() {
            return Err(ConfigError::invalid(
                "upstream.partner_key",
                "set either upstream.partner_key or upstream.partner_key_file, not both",
            ));
        }
        if let Some(key) = &self.partner_key
            && key.expose_secret().trim().is_empty()
        {
            return Err(ConfigError::invalid(
                "upstream.partner_key",
                "must not be empty",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "upstream.max_in_flight",
                "must be at least 1",
            ));
        }
        if self.circuit_failures == 0 {
            return Err(ConfigError::invalid(
                "upstream.circuit_failures",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `localhost` or a loopback address.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
