//! `Application`: builds the broker from settings, binds both listeners
//! (port 0 works and the real ports are reported), and serves until a
//! shutdown signal, then drains within `server.shutdown_grace`.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState, Readiness};
use crate::broker::Broker;
use crate::config::Settings;
use crate::http::{self, AppState, auth::Callers};
use crate::telemetry::metrics::Metrics;
use crate::upstream::UpstreamClient;

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// The running service: both listeners bound, not yet serving.
pub struct Application {
    api: TcpListener,
    admin: TcpListener,
    api_router: Router,
    admin_router: Router,
    readiness: Readiness,
    grace: Duration,
}

impl Application {
    /// Wires the service from validated settings and the partner key.
    pub async fn build(
        settings: &Settings,
        partner_key: SecretString,
    ) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let upstream = UpstreamClient::new(&settings.upstream, partner_key, metrics.clone())?;
        let broker = Arc::new(Broker::new(
            &settings.cache,
            Arc::new(upstream),
            metrics.clone(),
        ));
        let callers = Arc::new(Callers::new(
            &settings.clients,
            settings.auth.allow_anonymous,
        ));
        let readiness = Readiness::default();
        let api_router = http::router(AppState {
            broker: broker.clone(),
            callers,
            metrics: metrics.clone(),
        });
        let admin_router = admin::router(AdminState {
            readiness: readiness.clone(),
            metrics,
            broker,
        });
        Ok(Self {
            api: bind(settings.server.listen).await?,
            admin: bind(settings.server.admin_listen).await?,
            api_router,
            admin_router,
            readiness,
            grace: settings.server.shutdown_grace,
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
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let (stop_api, api_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let mut api = tokio::spawn(
            axum::serve(self.api, self.api_router)
                .with_graceful_shutdown(stopped(api_stopped))
                .into_future(),
        );
        let admin = tokio::spawn(
            axum::serve(self.admin, self.admin_router)
                .with_graceful_shutdown(stopped(admin_stopped))
                .into_future(),
        );
        self.readiness.set(true);
        tracing::info!("token-broker is ready");

        tokio::select! {
            () = shutdown => {}
            result = &mut api => {
                let _ = stop_admin.send(true);
                return result.map_err(|e| StartupError::Serve(std::io::Error::other(e)))?
                    .map_err(StartupError::Serve);
            }
        }
        self.readiness.set(false);
        tracing::info!(grace = ?self.grace, "shutdown signal received, draining");
        let _ = stop_api.send(true);
        match tokio::time::timeout(self.grace, &mut api).await {
            Ok(_) => tracing::info!("all requests finished"),
            Err(_) => {
                tracing::warn!("shutdown grace period over, closing remaining connections");
                api.abort();
            }
        }
        let _ = stop_admin.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
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
