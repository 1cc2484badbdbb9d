//! The `Caller` extractor of the token handlers: what the request presents
//! (its `Authorization` header, and the connection's verified client
//! certificate) goes to `callers::Callers`, which finds the caller and takes
//! one unit of its rate limit. 401 before 429 before anything else (the
//! query is parsed after; a 429, or a 403 for a verified service account or
//! certificate no client names, reads it only to say in its audit event
//! whose token was asked for).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::callers::{Caller, Presented};
use crate::http::error::ApiError;
use crate::http::routes::VENDOR_ROUTE;
use crate::http::{AppState, query, tokens};
use crate::tls::PeerCertificate;

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let refused = |refusal| ApiError::from(refusal).into_response();
        let header = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let certificate = parts.extensions.get::<std::sync::Arc<PeerCertificate>>();
        let presented = Presented::new(header, certificate.map(|c| &**c)).map_err(refused)?;
        let caller = match state.callers.authenticate(&presented).await {
            Ok(caller) => caller,
            Err(refusal) => {
                // The cluster or a CA vouches for who asked, though no client
                // is them: their 403 is audited as denied.
                let Some(proof) = refusal.vouched_for() else {
                    return Err(refused(refusal));
                };
                crate::telemetry::RequestContext::record_proof(proof);
                return Err(naming_whose_token(state, parts, refusal.into()));
            }
        };
        crate::telemetry::RequestContext::record_client(caller.name(), caller.proof());
        if let Err(refusal) = state.callers.admit(&caller).await {
            return Err(naming_whose_token(state, parts, refusal.into()));
        }
        Ok(caller)
    }
}

/// A refusal made before the query is read, whose audit event still names
/// whose token was asked for when the query names someone. The refusal is
/// the answer whatever the query holds: the order callers see is unchanged.
fn naming_whose_token(state: &AppState, parts: &Parts, refusal: ApiError) -> Response {
    let customer = match parts.uri.path() {
        VENDOR_ROUTE => query::VENDOR,
        _ => query::V1,
    };
    match query::identity(parts.uri.query(), customer) {
        Ok(identity) => tokens::refused(state, &identity, refusal),
        Err(_) => refusal.into_response(),
    }
}
