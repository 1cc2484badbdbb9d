//! The cache: how long answers live in memory, and the Redis that replicas
//! share them through (standalone, behind Sentinel, or a Cluster).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::secrets::redacted_url;
use super::{ConfigError, positive};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    #[serde(with = "super::words::duration")]
    pub ttl: Duration,
    /// Fraction of `ttl` after which a hit starts one background refresh.
    pub refresh_ahead: f64,
    /// How long past `ttl` an entry may be served when the vendor fails.
    #[serde(with = "super::words::duration")]
    pub stale_if_error: Duration,
    /// How long a "no such user" answer is remembered; zero turns it off.
    #[serde(with = "super::words::duration")]
    pub negative_ttl: Duration,
    /// A caller's `Cache-Control: no-cache` asks the vendor only if the key's
    /// last vendor answer is older than this.
    #[serde(with = "super::words::duration")]
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
    #[serde(with = "super::words::duration")]
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

/// The Redis a replica shares its cache through, with the key that seals
/// what it stores there.
pub struct SharedRedis<'a> {
    pub form: RedisForm<'a>,
    pub encryption_key_file: &'a Path,
}

impl CacheSettings {
    /// The Redis and its sealing key; `None`: memory only. Loading refuses a
    /// Redis without a key, so a loaded configuration never drops one here.
    pub fn shared_redis(&self) -> Option<SharedRedis<'_>> {
        Some(SharedRedis {
            form: self.redis_form()?,
            encryption_key_file: self.encryption_key_file.as_deref()?,
        })
    }

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

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("cache.ttl", self.ttl)?;
        positive("cache.redis_timeout", self.redis_timeout)?;
        if !(self.refresh_ahead > 0.0 && self.refresh_ahead <= 1.0) {
            return Err(ConfigError::invalid(
                "cache.refresh_ahead",
                "must be a fraction in (0, 1]; 1 turns refresh-ahead off",
            ));
        }
        if self.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entries",
                "must be at least 1",
            ));
        }
        self.validate_redis()
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
