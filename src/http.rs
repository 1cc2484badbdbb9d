//! The API listener: router, the per-request service, caller auth, query parsing
//! and the problem+json error type.

pub mod auth;
pub mod error;
pub mod observe;
pub mod openapi;
pub mod outcome;
pub mod query;
pub mod routes;
pub mod tokens;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::audit::Auditor;
use crate::broker::Broker;
use crate::callers::Callers;
use crate::http::error::ApiError;
use crate::telemetry::TraceMode;
use crate::telemetry::metrics::Metrics;

pub use routes::{OPENAPI_ROUTE, TOKENS_ROUTE, VENDOR_ROUTE};

/// What every handler shares; one `Arc`, so a request clones one pointer.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

/// The parts of `AppState` (named apart from the shared cache).
pub struct AppParts {
    pub broker: Arc<Broker>,
    pub auditor: Auditor,
    pub callers: Callers,
    pub metrics: Arc<Metrics>,
    /// How requests are traced (`telemetry::init` decided).
    pub trace_mode: TraceMode,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The API service, without a listener, so tests can call it in-process.
pub fn router(state: AppState) -> observe::Api {
    state.metrics.register_routes(&[TOKENS_ROUTE, VENDOR_ROUTE]);
    let routes = Router::new()
        .route(
            TOKENS_ROUTE,
            get(tokens::get_token).delete(tokens::delete_token),
        )
        .route(VENDOR_ROUTE, get(tokens::get_vendor_token))
        .route(OPENAPI_ROUTE, get(openapi::serve))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    observe::Api::new(state, routes)
}
