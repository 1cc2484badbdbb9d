//! How callers prove who they are beyond a key: Kubernetes service-account
//! tokens, and anonymous access for local development.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, positive};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub allow_anonymous: bool,
    pub kubernetes: KubernetesSettings,
}

/// Kubernetes service-account tokens as caller credentials.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    /// The cluster's service-account issuer (`iss`); unset: not accepted.
    #[serde(default)]
    pub issuer: Option<String>,
    /// A token must name one of these in `aud`.
    pub audiences: Vec<String>,
    /// The cluster's JWKS as a file, re-read when it changes.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The cluster's JWKS over HTTPS.
    #[serde(default)]
    pub jwks_url: Option<Url>,
    /// CA bundle (PEM) to trust for `jwks_url`, e.g. the service account's `ca.crt`.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Bearer token file for `jwks_url` (the API server may require one).
    #[serde(default)]
    pub jwks_token_file: Option<PathBuf>,
    /// How often `jwks_url` is fetched again.
    #[serde(with = "super::words::duration")]
    pub jwks_refresh: Duration,
    /// Longest `exp - iat` a service-account token may have.
    #[serde(with = "super::words::duration")]
    pub max_token_lifetime: Duration,
}

impl KubernetesSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let Some(issuer) = &self.issuer else {
            return Ok(());
        };
        if issuer.trim().is_empty() {
            return Err(ConfigError::invalid(
                "auth.kubernetes.issuer",
                "must not be empty",
            ));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "auth.kubernetes.audiences",
                "must name at least one non-empty audience",
            ));
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ConfigError::invalid(
                    "auth.kubernetes.jwks_file",
                    "set exactly one of auth.kubernetes.jwks_file and jwks_url",
                ));
            }
            (None, Some(url)) if url.scheme() != "https" => {
                return Err(ConfigError::invalid(
                    "auth.kubernetes.jwks_url",
                    "must be an https:// URL",
                ));
            }
            _ => {}
        }
        positive(
            "auth.kubernetes.max_token_lifetime",
            self.max_token_lifetime,
        )?;
        positive("auth.kubernetes.jwks_refresh", self.jwks_refresh)
    }
}
