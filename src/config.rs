//! Configuration: layered loading (built-in defaults → file → environment),
//! validation that names the offending key, and redaction for display.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::domain::UserType;

/// The documented defaults, compiled in as the first layer.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// The caller name of requests without a key when `auth.allow_anonymous` is
/// on; reserved, so no `[[clients]]` entry may take it.
pub const ANONYMOUS: &str = "anonymous";

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
}

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
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Concurrent requests to the vendor, all keys together.
    pub max_in_flight: usize,
    /// Retries on connect errors, 429, 502, 503, 504.
    pub max_retries: u32,
    /// Consecutive failed fetches that open the circuit.
    pub circuit_failures: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "humantime_serde")]
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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Fraction of `ttl` after which a hit starts one background refresh.
    pub refresh_ahead: f64,
    /// How long past `ttl` an entry may be served when the vendor fails.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// How long a "no such user" answer is remembered; zero turns it off.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// A caller's `Cache-Control: no-cache` asks the vendor only if the key's
    /// last vendor answer is older than this.
    #[serde(with = "humantime_serde")]
    pub revalidate_min_interval: Duration,
    pub max_entries: u64,
    /// The Redis shared by every replica (`redis://` or `rediss://`); none: memory only.
    #[serde(default, serialize_with = "redacted_url")]
    pub redis_url: Option<Url>,
    /// Redis behind Sentinel: the sentinels' `host:port` addresses.
    #[serde(default)]
    pub redis_sentinels: Vec<String>,
    /// The primary's name at the sentinels; required with `redis_sentinels`.
    #[serde(default)]
    pub redis_sentinel_master: Option<String>,
    /// A Redis Cluster: seed nodes' `host:port` addresses.
    #[serde(default)]
    pub redis_cluster_nodes: Vec<String>,
    /// TLS to the Sentinel or Cluster nodes (`redis_url` says it by its scheme).
    #[serde(default)]
    pub redis_tls: bool,
    /// File holding the Redis password, so that it is never in a URL or ConfigMap.
    #[serde(default)]
    pub redis_password_file: Option<PathBuf>,
    /// Bound on every Redis call; past it the replica acts as if Redis were down.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Redis replicas that must hold an invalidation before a `DELETE` is confirmed.
    #[serde(default)]
    pub redis_min_replicas: u32,
    /// 32-byte key (hex or base64) that seals tokens stored in Redis.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
}

/// Which of the three Redis forms the settings name, if any.
pub enum RedisForm<'a> {
    Standalone(&'a Url),
    Sentinel {
        sentinels: &'a [String],
        master: &'a str,
    },
    Cluster(&'a [String]),
}

impl CacheSettings {
    /// The Redis this replica shares its cache through; `None`: memory only.
    /// Valid once the settings are loaded.
    pub fn redis_form(&self) -> Option<RedisForm<'_>> {
        if let Some(url) = &self.redis_url {
            return Some(RedisForm::Standalone(url));
        }
        if !self.redis_sentinels.is_empty() {
            return Some(RedisForm::Sentinel {
                sentinels: &self.redis_sentinels,
                master: self.redis_sentinel_master.as_deref().unwrap_or_default(),
            });
        }
        (!self.redis_cluster_nodes.is_empty())
            .then_some(RedisForm::Cluster(&self.redis_cluster_nodes))
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let forms = [
            self.redis_url.is_some(),
            !self.redis_sentinels.is_empty(),
            !self.redis_cluster_nodes.is_empty(),
        ];
        if forms.iter().filter(|f| **f).count() > 1 {
            return Err(ConfigError::invalid(
                "cache.redis_url",
                "give one of cache.redis_url, cache.redis_sentinels and cache.redis_cluster_nodes",
            ));
        }
        if let Some(url) = &self.redis_url {
            if !matches!(url.scheme(), "redis" | "rediss") {
                return Err(ConfigError::invalid(
                    "cache.redis_url",
                    "must be a redis:// or rediss:// URL",
                ));
            }
            if self.redis_tls {
                return Err(ConfigError::invalid(
                    "cache.redis_tls",
                    "is for sentinels and cluster nodes; with cache.redis_url use the rediss:// scheme",
                ));
            }
        }
        for (key, nodes) in [
            ("cache.redis_sentinels", &self.redis_sentinels),
            ("cache.redis_cluster_nodes", &self.redis_cluster_nodes),
        ] {
            if nodes.iter().any(|node| parse_node(node).is_none()) {
                return Err(ConfigError::invalid(key, "each entry must be host:port"));
            }
        }
        match (&self.redis_sentinel_master, self.redis_sentinels.is_empty()) {
            (None, false) => {
                return Err(ConfigError::invalid(
                    "cache.redis_sentinel_master",
                    "is required with cache.redis_sentinels",
                ));
            }
            (Some(_), true) => {
                return Err(ConfigError::invalid(
                    "cache.redis_sentinel_master",
                    "needs cache.redis_sentinels",
                ));
            }
            (Some(master), false) if master.is_empty() => {
                return Err(ConfigError::invalid(
                    "cache.redis_sentinel_master",
                    "must not be empty",
                ));
            }
            _ => {}
        }
        if self.redis_form().is_none() {
            if self.redis_tls || self.redis_min_replicas > 0 {
                return Err(ConfigError::invalid(
                    if self.redis_tls {
                        "cache.redis_tls"
                    } else {
                        "cache.redis_min_replicas"
                    },
                    "needs a Redis: cache.redis_url, cache.redis_sentinels or cache.redis_cluster_nodes",
                ));
            }
        } else if self.encryption_key_file.is_none() {
            return Err(ConfigError::invalid(
                "cache.encryption_key_file",
                "is required with a Redis: tokens are stored in Redis encrypted",
            ));
        }
        Ok(())
    }
}

/// A `host:port` node address.
pub fn parse_node(node: &str) -> Option<(&str, u16)> {
    let (host, port) = node.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty() && !host.contains('/')).then_some((host, port))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

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
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// Longest `exp - iat` a service-account token may have.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Key for the HMAC that pseudonymises emails and user ids in audit events.
    #[serde(default)]
    pub hash_key_file: Option<PathBuf>,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Scope {
    /// Read team-member tokens (email + type).
    #[serde(rename = "tokens:read")]
    TokensRead,
    /// Read customer API tokens (user id).
    #[serde(rename = "customer_tokens:read")]
    CustomerTokensRead,
    /// Drop cached tokens.
    #[serde(rename = "tokens:invalidate")]
    TokensInvalidate,
}

impl Scope {
    pub const ALL: [Scope; 3] = [
        Scope::TokensRead,
        Scope::CustomerTokensRead,
        Scope::TokensInvalidate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TokensRead => "tokens:read",
            Scope::CustomerTokensRead => "customer_tokens:read",
            Scope::TokensInvalidate => "tokens:invalidate",
        }
    }
}

/// One `[[clients]]` entry: a caller allowed in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    pub name: String,
    /// Hex SHA-256 of the caller's key, never the key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Kubernetes service accounts (`namespace:name` or `namespace:*`) that are this caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    pub scopes: Vec<Scope>,
    /// Team-member types this caller may read; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_types: Option<Vec<UserType>>,
    /// Email domains this caller may read; a domain admits its subdomains. Any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_email_domains: Option<Vec<String>>,
    /// Requests per minute (burst of the same size); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<NonZeroU32>,
}

impl ClientSettings {
    /// A caller with these scopes and no other restriction.
    pub fn new(name: &str, key_sha256: String, scopes: Vec<Scope>) -> Self {
        Self {
            name: name.to_owned(),
            key_sha256: Some(key_sha256),
            service_accounts: Vec::new(),
            scopes,
            allowed_types: None,
            allowed_email_domains: None,
            rate_limit_per_minute: None,
        }
    }

    /// The decoded digest, if the client has a key; valid once `Settings::load` has succeeded.
    pub fn key_digest(&self) -> Option<[u8; 32]> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(self.key_sha256.as_ref()?, &mut digest).ok()?;
        Some(digest)
    }
}

fn redacted<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[REDACTED]"),
        None => s.serialize_none(),
    }
}

/// A URL with its password, if any, replaced by `[REDACTED]`.
fn redacted_url<S: Serializer>(value: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(url) if url.password().is_some() => {
            let mut shown = url.clone();
            let _ = shown.set_password(Some("[REDACTED]"));
            s.serialize_str(shown.as_str())
        }
        Some(url) => s.serialize_str(url.as_str()),
        None => s.serialize_none(),
    }
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
        let settings: Settings = serde_path_to_error::deserialize(config).map_err(|e| {
            let key = e.path().to_string();
            let message = without_quoted_text(&e.into_inner().to_string());
            if key == "." || key.is_empty() {
                ConfigError::Source(message)
            } else {
                ConfigError::invalid(key, message)
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        positive("server.shutdown_grace", self.server.shutdown_grace)?;
        positive(
            "server.header_read_timeout",
            self.server.header_read_timeout,
        )?;
        if self.server.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        positive("upstream.timeout", self.upstream.timeout)?;
        positive("upstream.connect_timeout", self.upstream.connect_timeout)?;
        positive("cache.ttl", self.cache.ttl)?;
        positive("cache.redis_timeout", self.cache.redis_timeout)?;
        self.cache.validate_redis()?;
        if !matches!(self.upstream.base_url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.upstream.base_url.scheme() == "http"
            && !self.upstream.allow_insecure_http
            && !is_loopback(&self.upstream.base_url)
        {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be https:// (http:// only for a loopback host, or with upstream.allow_insecure_http = true)",
            ));
        }
        if self.upstream.base_url.cannot_be_a_base() || self.upstream.base_url.query().is_some() {
            return Err(ConfigError::invalid(
                "upstream.base_url",
                "must be a base URL without query, such as https://api.v7.botpenguin.com",
            ));
        }
        if self.upstream.partner_key.is_some() && self.upstream.partner_key_file.is_some() {
            return Err(ConfigError::invalid(
                "upstream.partner_key",
                "set either upstream.partner_key or upstream.partner_key_file, not both",
            ));
        }
        if let Some(key) = &self.upstream.partner_key
            && key.expose_secret().trim().is_empty()
        {
            return Err(ConfigError::invalid(
                "upstream.partner_key",
                "must not be empty",
            ));
        }
        if !(self.cache.refresh_ahead > 0.0 && self.cache.refresh_ahead <= 1.0) {
            return Err(ConfigError::invalid(
                "cache.refresh_ahead",
                "must be a fraction in (0, 1]; 1 turns refresh-ahead off",
            ));
        }
        if self.upstream.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "upstream.max_in_flight",
                "must be at least 1",
            ));
        }
        if self.upstream.circuit_failures == 0 {
            return Err(ConfigError::invalid(
                "upstream.circuit_failures",
                "must be at least 1",
            ));
        }
        positive("upstream.circuit_cooldown", self.upstream.circuit_cooldown)?;
        if self.cache.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entries",
                "must be at least 1",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("not a valid tracing filter directive: {e}"),
            ));
        }
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
        self.validate_kubernetes()?;
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut accounts = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let key = |field: &str| format!("clients[{i}].{field}");
            if client.name.trim().is_empty() || client.name.len() > 64 {
                return Err(ConfigError::invalid(
                    key("name"),
                    "must be 1 to 64 characters",
                ));
            }
            if client.name == ANONYMOUS {
                return Err(ConfigError::invalid(
                    key("name"),
                    "\"anonymous\" is reserved",
                ));
            }
            if !names.insert(client.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    "is used by another client",
                ));
            }
            match (&client.key_sha256, client.key_digest()) {
                (Some(_), None) => {
                    return Err(ConfigError::invalid(
                        key("key_sha256"),
                        "must be 64 hex characters (the SHA-256 of the caller key; `token-broker hash-key` prints it)",
                    ));
                }
                (Some(_), Some(digest)) if !digests.insert(digest) => {
                    return Err(ConfigError::invalid(
                        key("key_sha256"),
                        "is used by another client",
                    ));
                }
                (None, _) if client.service_accounts.is_empty() => {
                    return Err(ConfigError::invalid(
                        key("key_sha256"),
                        "a client needs a key_sha256, service_accounts, or both",
                    ));
                }
                _ => {}
            }
            for (j, account) in client.service_accounts.iter().enumerate() {
                let at = format!("clients[{i}].service_accounts[{j}]");
                if !valid_service_account(account) {
                    return Err(ConfigError::invalid(
                        at,
                        "must be namespace:name or namespace:* (lower-case DNS labels)",
                    ));
                }
                if !accounts.insert(account.as_str()) {
                    return Err(ConfigError::invalid(at, "is named by another client"));
                }
                if self.auth.kubernetes.issuer.is_none() {
                    return Err(ConfigError::invalid(
                        "auth.kubernetes.issuer",
                        "is required when a client names service_accounts",
                    ));
                }
            }
            if client.allowed_types.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::invalid(
                    key("allowed_types"),
                    "must name at least one of AGENT, CUSTOM_USER, CUSTOMER (omit it to allow all)",
                ));
            }
            if let Some(domains) = &client.allowed_email_domains {
                if domains.is_empty() {
                    return Err(ConfigError::invalid(
                        key("allowed_email_domains"),
                        "must name at least one domain (omit it to allow any)",
                    ));
                }
                if let Some(bad) = domains.iter().position(|d| !valid_domain(d)) {
                    return Err(ConfigError::invalid(
                        format!("clients[{i}].allowed_email_domains[{bad}]"),
                        "must be a hostname such as example.com (letters, digits, inner hyphens; xn-- form for international names)",
                    ));
                }
            }
            if client.scopes.is_empty() {
                return Err(ConfigError::invalid(
                    key("scopes"),
                    "must name at least one of tokens:read, customer_tokens:read, tokens:invalidate",
                ));
            }
        }
        Ok(())
    }

    fn validate_kubernetes(&self) -> Result<(), ConfigError> {
        let k = &self.auth.kubernetes;
        let Some(issuer) = &k.issuer else {
            return Ok(());
        };
        if issuer.trim().is_empty() {
            return Err(ConfigError::invalid(
                "auth.kubernetes.issuer",
                "must not be empty",
            ));
        }
        if k.audiences.is_empty() || k.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "auth.kubernetes.audiences",
                "must name at least one non-empty audience",
            ));
        }
        match (&k.jwks_file, &k.jwks_url) {
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
        positive("auth.kubernetes.max_token_lifetime", k.max_token_lifetime)?;
        positive("auth.kubernetes.jwks_refresh", k.jwks_refresh)
    }

    /// What `serve` needs beyond a valid file: a partner key and someone allowed in.
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
        Ok(())
    }

    /// The effective configuration as TOML, every secret replaced by `[REDACTED]`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// What went wrong reading a layer, without the text of the offending line
/// (toml's message quotes it, and it may hold an inline secret).
fn describe_source_error(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::FileParse { uri, cause } => {
            let text = cause.to_string();
            // toml: "TOML parse error at line L, column C", the quoted source
            // line and a caret, then what is wrong.
            let position = text.lines().next().unwrap_or_default();
            let problem = text
                .lines()
                .skip(1)
                .filter(|line| !line.contains('|') && !line.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ");
            format!(
                "{} is not valid TOML: {position}: {}",
                uri.as_deref().unwrap_or("a configuration layer"),
                without_quoted_text(&problem)
            )
        }
        other => without_quoted_text(&other.to_string()),
    }
}

/// Replaces every double-quoted part of a message (serde quotes the value it
/// refused) so no configured text, secret or not, is printed.
fn without_quoted_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let (mut quoted, mut in_backticks) = (false, false);
    for c in message.chars() {
        match c {
            // Backticks name syntax or keys (`"`, `cache.ttl`): kept.
            '`' if !quoted => {
                in_backticks = !in_backticks;
                out.push(c);
            }
            '"' if !in_backticks => {
                if !quoted {
                    out.push_str("(value not shown)");
                }
                quoted = !quoted;
            }
            _ if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}

/// Reads the partner key file.
pub fn read_key_file(path: &Path) -> Result<SecretString, ConfigError> {
    read_secret_file("upstream.partner_key_file", path)
}

/// Reads the secret file that configuration `key` names, trimming the
/// whitespace editors and `echo` leave behind.
pub fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = SecretString::from(text.trim());
    drop(SecretString::from(text));
    if secret.expose_secret().is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

fn valid_domain(domain: &str) -> bool {
    crate::domain::is_hostname(domain.trim_start_matches('.'))
}

/// `namespace:name` or `namespace:*`, each part a DNS-1123 label.
fn valid_service_account(account: &str) -> bool {
    let label = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    match account.split_once(':') {
        Some((namespace, "*")) => label(namespace),
        Some((namespace, name)) => {
            label(namespace) && (1..=253).contains(&name.len()) && name.split('.').all(label)
        }
        None => false,
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

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = r#"
        [upstream]
        partner_key = "pk-secret"
        [[clients]]
        name = "app"
        key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        scopes = ["tokens:read"]
    "#;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(&Sources {
            layers: vec![toml.to_owned()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        })
    }

    fn error_key(result: Result<Settings, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let s = load("", &[]).unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.server.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(s.server.shutdown_grace, Duration::from_secs(20));
        assert_eq!(
            s.upstream.base_url.as_str(),
            "https://api.v7.botpenguin.com/"
        );
        assert_eq!(s.upstream.timeout, Duration::from_secs(5));
        assert_eq!(s.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(s.cache.ttl, Duration::from_secs(600));
        assert_eq!(s.cache.max_entries, 100_000);
        assert_eq!(s.cache.refresh_ahead, 0.8);
        assert_eq!(s.cache.stale_if_error, Duration::from_secs(3600));
        assert_eq!(s.cache.negative_ttl, Duration::from_secs(30));
        assert_eq!(s.upstream.max_in_flight, 32);
        assert_eq!(s.upstream.max_retries, 2);
        assert_eq!(s.upstream.circuit_failures, 5);
        assert_eq!(s.upstream.circuit_cooldown, Duration::from_secs(10));
        assert_eq!(s.log.format, LogFormat::Json);
        assert!(!s.auth.allow_anonymous);
        assert!(s.clients.is_empty());
    }

    #[test]
    fn environment_overrides_file_with_double_underscores() {
        let s = load(
            CLIENT,
            &[
                ("TOKEN_BROKER__UPSTREAM__BASE_URL", "http://127.0.0.1:1"),
                ("TOKEN_BROKER__CACHE__TTL", "250ms"),
                ("TOKEN_BROKER__CACHE__MAX_ENTRIES", "7"),
            ],
        )
        .unwrap();
        assert_eq!(s.upstream.base_url.as_str(), "http://127.0.0.1:1/");
        assert_eq!(s.cache.ttl, Duration::from_millis(250));
        assert_eq!(s.cache.max_entries, 7);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = load("[cache]\nttl_typo = \"1m\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache") && err.contains("ttl_typo"), "{err}");
        let err = load("", &[("TOKEN_BROKER__SERVER__PORT", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("server") && err.contains("port"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(
            error_key(load("[cache]\nttl = \"soon\"\n", &[])),
            "cache.ttl"
        );
        assert_eq!(error_key(load("[cache]\nttl = \"0s\"\n", &[])), "cache.ttl");
        assert_eq!(
            error_key(load("[server]\nlisten = \"nowhere\"\n", &[])),
            "server.listen"
        );
        assert_eq!(
            error_key(load("[log]\nformat = \"xml\"\n", &[])),
            "log.format"
        );
        assert_eq!(error_key(load("[log]\nlevel = \"=[\"\n", &[])), "log.level");
        assert_eq!(
            error_key(load("[upstream]\nbase_url = \"ftp://x\"\n", &[])),
            "upstream.base_url"
        );
        let bad_hash = CLIENT.replace("9f86d0", "zz86d0");
        assert_eq!(error_key(load(&bad_hash, &[])), "clients[0].key_sha256");
        let bad_domain = format!("{CLIENT}allowed_email_domains = [\"example.com\", \"@x.com\"]\n");
        assert_eq!(
            error_key(load(&bad_domain, &[])),
            "clients[0].allowed_email_domains[1]"
        );
        let bad_type = format!("{CLIENT}allowed_types = [\"ADMIN\"]\n");
        assert!(error_key(load(&bad_type, &[])).starts_with("clients[0].allowed_types"));
        let no_rate = format!("{CLIENT}rate_limit_per_minute = 0\n");
        assert_eq!(
            error_key(load(&no_rate, &[])),
            "clients[0].rate_limit_per_minute"
        );
        let bad_scope = CLIENT.replace("tokens:read", "tokens:write");
        assert!(error_key(load(&bad_scope, &[])).starts_with("clients[0].scopes"));
    }

    #[test]
    fn a_shared_cache_needs_an_encryption_key_and_a_redis_url() {
        assert_eq!(
            error_key(load(
                "[cache]\nredis_url = \"redis://127.0.0.1:6379\"\n",
                &[]
            )),
            "cache.encryption_key_file"
        );
        assert_eq!(
            error_key(load(
                "[cache]\nredis_url = \"http://127.0.0.1:6379\"\nencryption_key_file = \"/k\"\n",
                &[]
            )),
            "cache.redis_url"
        );
        let s = load(
            "[cache]\nredis_url = \"rediss://:hunter2@redis.example:6380\"\nencryption_key_file = \"/k\"\n",
            &[],
        )
        .unwrap();
        let shown = s.redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("rediss://:%5BREDACTED%5D@redis.example:6380"),
            "{shown}"
        );
    }

    #[test]
    fn the_three_redis_forms_exclude_each_other_and_name_what_is_wrong() {
        let key = "encryption_key_file = \"/k\"\n";
        let cases = [
            (
                "redis_url = \"redis://r:6379\"\nredis_cluster_nodes = [\"n:6379\"]\n",
                "cache.redis_url",
            ),
            (
                "redis_sentinels = [\"s:26379\"]\n",
                "cache.redis_sentinel_master",
            ),
            (
                "redis_sentinel_master = \"mymaster\"\n",
                "cache.redis_sentinel_master",
            ),
            (
                "redis_cluster_nodes = [\"no-port\"]\n",
                "cache.redis_cluster_nodes",
            ),
            (
                "redis_sentinels = [\"s:0\"]\nredis_sentinel_master = \"m\"\n",
                "cache.redis_sentinels",
            ),
            (
                "redis_url = \"redis://r:6379\"\nredis_tls = true\n",
                "cache.redis_tls",
            ),
            ("redis_min_replicas = 1\n", "cache.redis_min_replicas"),
        ];
        for (toml, expected) in cases {
            let with_key = format!("[cache]\n{key}{toml}");
            assert_eq!(error_key(load(&with_key, &[])), expected, "{toml}");
        }
        assert_eq!(
            error_key(load("[cache]\nredis_cluster_nodes = [\"n:6379\"]\n", &[])),
            "cache.encryption_key_file"
        );
        let sentinel = load(
            &format!(
                "[cache]\n{key}redis_sentinels = [\"s1:26379\", \"[::1]:26379\"]\nredis_sentinel_master = \"mymaster\"\nredis_tls = true\nredis_min_replicas = 1\n"
            ),
            &[],
        )
        .unwrap();
        assert!(matches!(
            sentinel.cache.redis_form(),
            Some(RedisForm::Sentinel { sentinels, master: "mymaster" }) if sentinels.len() == 2
        ));
        assert!(load("", &[]).unwrap().cache.redis_form().is_none());
    }

    #[test]
    fn list_keys_are_read_from_the_environment_as_comma_separated_values() {
        let s = load(
            CLIENT,
            &[
                (
                    "TOKEN_BROKER__CACHE__REDIS_CLUSTER_NODES",
                    "a:6379, b:6379,c:6379",
                ),
                ("TOKEN_BROKER__CACHE__ENCRYPTION_KEY_FILE", "/k"),
                (
                    "TOKEN_BROKER__AUTH__KUBERNETES__AUDIENCES",
                    "token-broker,other",
                ),
                // Any other value stays a string, however it looks.
                ("TOKEN_BROKER__UPSTREAM__PARTNER_KEY", "0012"),
            ],
        )
        .unwrap();
        assert_eq!(s.cache.redis_cluster_nodes, ["a:6379", "b:6379", "c:6379"]);
        assert_eq!(s.auth.kubernetes.audiences, ["token-broker", "other"]);
        assert_eq!(
            s.upstream.partner_key.as_ref().unwrap().expose_secret(),
            "0012"
        );
    }

    #[test]
    fn plain_http_to_the_vendor_needs_loopback_or_an_explicit_allowance() {
        for loopback in [
            "http://127.0.0.1:8081",
            "http://localhost:8081",
            "http://[::1]:8081",
        ] {
            assert!(load(&format!("[upstream]\nbase_url = \"{loopback}\"\n"), &[]).is_ok());
        }
        let remote = "[upstream]\nbase_url = \"http://simulator:8081\"\n";
        assert_eq!(error_key(load(remote, &[])), "upstream.base_url");
        assert!(load(&format!("{remote}allow_insecure_http = true\n"), &[]).is_ok());
    }

    #[test]
    fn anonymous_access_is_refused_with_clients_or_off_loopback() {
        let anonymous = "[auth]\nallow_anonymous = true\n";
        assert_eq!(
            error_key(load(&format!("{anonymous}{CLIENT}"), &[])),
            "auth.allow_anonymous"
        );
        assert_eq!(error_key(load(anonymous, &[])), "auth.allow_anonymous");
        let loopback = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{anonymous}");
        assert!(load(&loopback, &[]).is_ok());
        assert_eq!(
            error_key(load(
                &loopback,
                &[("TOKEN_BROKER__SERVER__LISTEN", "0.0.0.0:8080")]
            )),
            "auth.allow_anonymous"
        );
    }

    #[test]
    fn configuration_errors_never_print_the_offending_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(
            &path,
            "[upstream]\npartner_key = \"pk-super-secret-value\nbase_url = 3\n",
        )
        .unwrap();
        let err = Settings::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(!err.contains("pk-super-secret"), "{err}");
        assert!(err.contains("line 2"), "{err}");

        let err = load("[cache]\nmax_entries = \"pk-wrong-place-secret\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cache.max_entries"), "{err}");
        assert!(!err.contains("pk-wrong-place-secret"), "{err}");
    }

    #[test]
    fn serving_needs_a_partner_key_and_a_client() {
        let s = load("", &[]).unwrap();
        assert_eq!(
            error_key(s.require_serving().map(|_| s.clone())),
            "upstream.partner_key_file"
        );
        let s = load("[upstream]\npartner_key = \"k\"\n", &[]).unwrap();
        assert_eq!(error_key(s.require_serving().map(|_| s.clone())), "clients");
        let s = load(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\npartner_key = \"k\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .unwrap();
        assert!(s.require_serving().is_ok());
        assert!(load(CLIENT, &[]).unwrap().require_serving().is_ok());
    }

    #[test]
    fn partner_key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "pk-from-file\n").unwrap();
        let toml = format!(
            "[upstream]\npartner_key_file = {:?}\n",
            path.display().to_string()
        );
        let s = load(&toml, &[]).unwrap();
        assert_eq!(
            s.upstream.read_partner_key().unwrap().expose_secret(),
            "pk-from-file"
        );
        std::fs::write(&path, "  \n").unwrap();
        assert!(s.upstream.read_partner_key().is_err());
    }

    #[test]
    fn redacted_output_hides_the_partner_key() {
        let s = load(CLIENT, &[]).unwrap();
        let text = s.redacted_toml();
        assert!(!text.contains("pk-secret"));
        assert!(text.contains("[REDACTED]"));
        assert!(text.contains("ttl = \"10m\""));
        assert!(!format!("{s:?}").contains("pk-secret"));
    }
}
