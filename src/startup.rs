//! `Application`: builds the broker from settings, binds both listeners
//! (port 0 works and the real ports are reported), and serves until a
//! shutdown signal, then drains within `server.shutdown_grace`.

pub mod listener;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Readiness};
use crate::audit::{AuditTrail, Auditor, SubjectKey};
use crate::broker::Broker;
use crate::callers::Callers;
use crate::callers::service_accounts::Verifier;
use crate::config::{ConfigError, Settings};
use crate::http::{self, AppState};
use crate::telemetry::TraceMode;
use crate::telemetry::metrics::{Features, Metrics};
use crate::tls::Tls;
use crate::upstream::UpstreamClient;
use crate::upstream::partner_key::{PartnerKey, Reloaders};
use crate::watch::FileWatch;
use listener::{Limits, Serving};

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot watch the partner key, JWKS or certificate files, or SIGHUP: {0}")]
    Watch(#[from] std::io::Error),
}

/// The running service: both listeners bound, not yet serving.
pub struct Application {
    api: TcpListener,
    admin: TcpListener,
    api_router: http::observe::Api,
    admin_router: Router,
    readiness: Readiness,
    grace: Duration,
    limits: Limits,
    metrics: Arc<Metrics>,
    reloaders: Reloaders,
    /// Re-reads `auth.kubernetes.jwks_file` while serving.
    jwks_watch: Option<FileWatch>,
    /// HTTPS on the API listener, and the watch that reloads its files.
    tls: Option<Arc<Tls>>,
    tls_watch: Option<FileWatch>,
    /// Cancelled when serving ends: stops background tasks.
    stop: CancellationToken,
    broker: Arc<Broker>,
}

impl Application {
    /// Wires the service from validated settings, its audit events
    /// committed to `audit_trail` and its requests traced as `trace_mode`
    /// says (`Telemetry` gives both); reads the partner key.
    pub async fn build(
        settings: &Settings,
        audit_trail: AuditTrail,
        trace_mode: TraceMode,
    ) -> Result<Self, StartupError> {
        let tls_files = settings.server.tls();
        let metrics = Arc::new(Metrics::build(Features {
            shared_cache: settings.cache.redis_form().is_some(),
            tls: tls_files.is_some(),
        }));
        let tls = tls_files
            .map(|files| Tls::load(files, metrics.clone()))
            .transpose()?;
        let tls_watch = tls.as_ref().map(|tls| tls.spawn_watch()).transpose()?;
        metrics.register_clients(settings.clients.iter().map(|c| c.name.as_str()));
        if settings.auth.allow_anonymous {
            metrics.register_clients([crate::config::ANONYMOUS]);
        }
        let partner_key = PartnerKey::load(&settings.upstream, metrics.clone())?;
        let auditor = Auditor::new(
            SubjectKey::from_settings(&settings.audit, &partner_key.current())?,
            audit_trail,
            settings.log.format,
        );
        let reloaders = partner_key.spawn_reloaders()?;
        let upstream = UpstreamClient::new(&settings.upstream, partner_key, metrics.clone())?;
        let shared = crate::shared::from_settings(
            &settings.cache,
            settings.upstream.timeout,
            metrics.clone(),
        )?;
        let broker = Arc::new(Broker::with_tier(
            &settings.cache,
            Arc::new(upstream),
            metrics.clone(),
            shared.tier,
        ));
        broker.listen_to_tier();
        let stop = CancellationToken::new();
        let verifier = Verifier::from_settings(&settings.auth.kubernetes, metrics.clone()).await?;
        let jwks_watch = match &verifier {
            Some(verifier) => verifier.spawn_refresh(stop.clone())?,
            None => None,
        };
        let callers = Callers::new(&settings.clients, settings.auth.allow_anonymous, verifier)
            .with_limiter(shared.limiter);
        let readiness = Readiness::default();
        let api_router = http::router(AppState::new(http::AppParts {
            broker: broker.clone(),
            auditor,
            callers,
            metrics: metrics.clone(),
            trace_mode,
        }));
        let broker_handle = broker.clone();
        let admin_router = admin::router(AdminState {
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            broker,
        });
        Ok(Self {
            api: bind(settings.server.listen)?,
            admin: bind(settings.server.admin_listen)?,
            api_router,
            admin_router,
            readiness,
            grace: settings.server.shutdown_grace,
            limits: Limits {
                header_read_timeout: settings.server.header_read_timeout,
                max_connections: settings.server.max_connections,
                max_connections_per_peer: Some(settings.server.max_connections_per_peer),
            },
            metrics,
            reloaders,
            jwks_watch,
            tls,
            tls_watch,
            stop,
            broker: broker_handle,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api.local_addr().unwrap_or_else(|_| unspecified())
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or_else(|_| unspecified())
    }

    /// Serves until `shutdown` resolves, then drains: readiness turns 503,
    /// new connections are refused, in-flight requests get `shutdown_grace`.
    /// Returns when the grace ends, for what drains after (the log output).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> std::time::Instant {
        let (stop_api, api_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let close_api = CancellationToken::new();
        let close_admin = CancellationToken::new();
        let mut api = tokio::spawn(listener::serve(
            self.api,
            self.api_router,
            Serving {
                name: "api",
                limits: self.limits,
                tls: self.tls,
            },
            self.metrics.clone(),
            api_stopped,
            close_api.clone(),
        ));
        let mut admin = tokio::spawn(listener::serve(
            self.admin,
            self.admin_router,
            Serving {
                name: "admin",
                // Probes and scrapes come from few addresses, by design.
                limits: Limits {
                    max_connections_per_peer: None,
                    ..self.limits
                },
                tls: None,
            },
            self.metrics,
            admin_stopped,
            close_admin.clone(),
        ));
        self.readiness.set(true);
        tracing::info!("token-broker is ready");

        shutdown.await;
        let grace_ends = std::time::Instant::now() + self.grace;
        self.readiness.set(false);
        tracing::info!(grace = ?self.grace, "shutdown signal received, draining");
        let _ = stop_api.send(true);
        if tokio::time::timeout(self.grace, &mut api).await.is_ok() {
            tracing::info!("all requests finished");
        } else {
            tracing::warn!("shutdown grace period over, closing remaining connections");
            close_api.cancel();
            let _ = api.await;
        }
        self.broker.shutdown();
        self.stop.cancel();
        let _ = stop_admin.send(true);
        if tokio::time::timeout(Duration::from_secs(1), &mut admin)
            .await
            .is_err()
        {
            close_admin.cancel();
            let _ = admin.await;
        }
        drop(self.reloaders);
        drop(self.jwks_watch);
        drop(self.tls_watch);
        grace_ends
    }
}

/// Pending connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`): a burst of callers connecting at once, after a
/// deploy say, is queued rather than having SYNs dropped and retried a
/// second later. Tokio's default is 1,024.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| StartupError::Bind { addr, source })
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_in_use_is_a_bind_error_not_a_shared_port() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let taken = first.local_addr().unwrap();

        let second = bind(taken);

        assert!(
            matches!(second, Err(StartupError::Bind { addr, .. }) if addr == taken),
            "{second:?}"
        );
    }
}
