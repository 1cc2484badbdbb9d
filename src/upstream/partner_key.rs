//! The partner key, swappable at run time. With `upstream.partner_key_file`
//! the file is re-read when its directory changes (which also catches the
//! atomic `..data` symlink swap Kubernetes uses for mounted Secrets) and on
//! SIGHUP. A request takes the key once, so in-flight requests finish with
//! the key they started with. A file that turns empty or unreadable keeps the
//! current key and logs an error.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, UpstreamSettings, read_key_file};
use crate::telemetry::metrics::{Metrics, ResultLabels};
use crate::watch::{self, FileWatch};

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Changed,
    Unchanged,
    Failed,
}

impl Reload {
    fn as_str(self) -> &'static str {
        match self {
            Reload::Changed => "changed",
            Reload::Unchanged => "unchanged",
            Reload::Failed => "failed",
        }
    }
}

/// The current partner key and where it comes from.
pub struct PartnerKey {
    current: ArcSwap<SecretString>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl PartnerKey {
    /// Reads the key from `upstream.partner_key` or `upstream.partner_key_file`.
    pub fn load(
        settings: &UpstreamSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ConfigError> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(settings.read_partner_key()?),
            file: settings
                .partner_key
                .is_none()
                .then(|| settings.partner_key_file.clone())
                .flatten(),
            metrics,
        }))
    }

    /// The key to use for one request.
    pub fn current(&self) -> Arc<SecretString> {
        self.current.load_full()
    }

    /// Re-reads the key file; keeps the current key if it cannot.
    pub fn reload(&self) -> Reload {
        let Some(path) = &self.file else {
            return Reload::Unchanged;
        };
        let outcome = match read_key_file(path) {
            Ok(key) if key.expose_secret() == self.current.load().expose_secret() => {
                Reload::Unchanged
            }
            Ok(key) => {
                self.current.store(Arc::new(key));
                tracing::info!(file = %path.display(), "partner key reloaded");
                Reload::Changed
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload the partner key; keeping the current one");
                Reload::Failed
            }
        };
        self.metrics
            .partner_key_reloads
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
        outcome
    }

    /// Starts re-reading the key file when its directory changes and on
    /// SIGHUP. SIGHUP is handled even with an inline key (it then only logs),
    /// so the habit of sending it never stops the process. Stops when the
    /// returned value is dropped.
    pub fn spawn_reloaders(self: &Arc<Self>) -> std::io::Result<Reloaders> {
        let mut tasks = Vec::new();
        let watcher = match &self.file {
            Some(path) => {
                let key = self.clone();
                Some(watch::on_change(path, move || {
                    key.reload();
                })?)
            }
            None => None,
        };
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangups = signal(SignalKind::hangup())?;
            let key = self.clone();
            tasks.push(tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    if key.file.is_some() {
                        tracing::info!("SIGHUP received, re-reading the partner key");
                        key.reload();
                    } else {
                        tracing::info!(
                            "SIGHUP received; the partner key is inline, nothing to re-read"
                        );
                    }
                }
            }));
        }
        Ok(Reloaders {
            _watcher: watcher,
            tasks,
        })
    }
}

/// The background reloaders; dropping this stops them.
pub struct Reloaders {
    _watcher: Option<FileWatch>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Reloaders {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(file: &Path) -> UpstreamSettings {
        let mut settings = crate::config::Settings::load(&Default::default())
            .unwrap()
            .upstream;
        settings.partner_key_file = Some(file.to_owned());
        settings
    }

    #[test]
    fn a_changed_file_replaces_the_key_and_a_broken_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partner-key");
        std::fs::write(&path, "first\n").unwrap();
        let metrics = Arc::new(Metrics::new());
        let key = PartnerKey::load(&settings(&path), metrics.clone()).unwrap();
        let in_flight = key.current();

        assert_eq!(key.reload(), Reload::Unchanged);
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(key.reload(), Reload::Changed);
        assert_eq!(key.current().expose_secret(), "second");
        assert_eq!(
            in_flight.expose_secret(),
            "first",
            "a request keeps the key it took"
        );

        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(key.reload(), Reload::Failed);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(key.reload(), Reload::Failed);
        assert_eq!(key.current().expose_secret(), "second");
        let text = metrics.encode();
        assert!(
            text.contains(r#"token_broker_partner_key_reloads_total{result="failed"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"token_broker_partner_key_reloads_total{result="changed"} 1"#));
    }
}
