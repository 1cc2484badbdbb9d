//! The `Caller` extractor of the token handlers: what the request presents
//! (its `Authorization` header, and the connection's verified client
//! certificate) goes to `callers::Callers`, which finds the caller and takes
//! one unit of its rate limit. 401 before 429 before anything else (the
//! query is parsed after).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::callers::{Caller, Presented};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::tls::PeerCertificate;

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let refused = |refusal| ApiError::from(refusal).into_response();
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let certificate = parts.extensions.get::<std::sync::Arc<PeerCertificate>>();
        let presented = Presented::new(header, certificate.map(|c| &**c)).map_err(refused)?;
        let caller = state
            .callers
            .authenticate(&presented)
            .await
            .map_err(refused)?;
        crate::telemetry::RequestContext::record_client(caller.name(), caller.proof());
        state.callers.admit(&caller).await.map_err(refused)?;
        Ok(caller)
    }
}
