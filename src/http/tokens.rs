//! Token handlers: `GET`/`DELETE /v1/tokens` and the drop-in
//! `GET /ext/get-user-token`.

use axum::Json;
use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use std::sync::LazyLock;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::audit::AuditedIdentity;
use crate::broker::{BrokerError, Issued};
use crate::callers::{Action, Caller};
use crate::domain::Identity;
use crate::http::AppState;
use crate::http::error::{ApiError, Problem};
use crate::http::openapi::params::{CallerErrors, VendorErrors};
use crate::http::outcome::Outcome;
use crate::http::query;
use crate::telemetry::metrics::ClientResult;

/// Paces the warning for failed vendor lookups: one per ten seconds.
static VENDOR_ERRORS: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
    RateLimiter::direct(
        Quota::with_period(Duration::from_secs(10))
            .unwrap_or_else(|| unreachable!("a non-zero period")),
    )
});

/// `X-Cache`: where the token came from.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Whether the request says `Cache-Control: no-cache` (or `max-age=0`): the
/// caller wants an answer from the vendor, not from the cache.
#[derive(Debug, Clone, Copy)]
pub struct Revalidate(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for Revalidate {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let revalidate = parts
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .any(|directive| {
                directive.eq_ignore_ascii_case("no-cache")
                    || directive.eq_ignore_ascii_case("max-age=0")
            });
        Ok(Revalidate(revalidate))
    }
}

/// A token, with the identity it belongs to (`email` + `type`, or `user_id`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenBody<'a> {
    /// A team member's email (with `type`); absent for a customer, never null.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, required = false)]
    email: Option<&'a str>,
    /// A team member's type; absent for a customer, never null.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, required = false, example = "AGENT")]
    user_type: Option<&'static str>,
    /// A customer's id; absent for a team member, never null.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, required = false)]
    user_id: Option<&'a str>,
    /// The permanent token.
    token: &'a str,
    active: bool,
}

/// The vendor's answer shape, field order included.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VendorBody<'a> {
    success: bool,
    message: &'static str,
    data: VendorData<'a>,
    code: u16,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VendorData<'a> {
    #[serde(rename = "permanentToken")]
    permanent_token: VendorToken<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VendorToken<'a> {
    /// The permanent token.
    key: &'a str,
    /// As the vendor sent it; an inactive token is passed through.
    active: bool,
}

/// `GET /v1/tokens`
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    summary = "Get a team member's or a customer's token",
    description = "Give `email` and `type` (a team member, scope `tokens:read`) or `user_id` \
                   (a customer, scope `customer_tokens:read`). Answered from the cache when fresh.",
    params(crate::http::openapi::params::ReadHeaders),
    responses(
        (status = 200, description = "The active token", body = TokenBody, headers(
            ("Cache-Control" = String, description = "Always `no-store`"),
            ("X-Cache" = String, description = "`hit`, `miss` or `stale`"),
            ("Age" = u64, description = "Seconds since the vendor handed the token out"),
        )),
        (status = 409, description = "The vendor's token is inactive", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
        VendorErrors,
    )
)]
pub async fn get_token(
    State(state): State<AppState>,
    caller: Caller,
    revalidate: Revalidate,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let (identity, issued) = read(&state, &caller, revalidate, raw, query::V1).await?;
    if !issued.active {
        return Err(refused(&state, &identity, ApiError::TokenInactive));
    }
    let (email, user_type, user_id) = match &identity {
        Identity::TeamMember { email, user_type } => {
            (Some(email.as_str()), Some(user_type.as_str()), None)
        }
        Identity::Customer(id) => (None, None, Some(id.as_str())),
    };
    let body = TokenBody {
        email,
        user_type,
        user_id,
        token: issued.token.expose(),
        active: issued.active,
    };
    Ok(handed_out(
        &state,
        &identity,
        Json(body).into_response(),
        &issued,
    ))
}

/// `GET /ext/get-user-token`: the vendor's path, parameters and body.
#[utoipa::path(
    get,
    path = "/ext/get-user-token",
    tag = "tokens",
    summary = "Drop-in for the vendor's endpoint",
    description = "Same path, parameters and 200 body as BotPenguin's, so an app that called the \
                   vendor only changes its base URL and bearer key. An inactive token is passed \
                   through with `active: false`.",
    params(crate::http::openapi::params::ReadHeaders),
    responses(
        (status = 200, description = "The token as the vendor sent it", body = VendorBody, headers(
            ("Cache-Control" = String, description = "Always `no-store`"),
            ("X-Cache" = String, description = "`hit`, `miss` or `stale`"),
            ("Age" = u64, description = "Seconds since the vendor handed the token out"),
        )),
        CallerErrors,
        VendorErrors,
    )
)]
pub async fn get_vendor_token(
    State(state): State<AppState>,
    caller: Caller,
    revalidate: Revalidate,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let (identity, issued) = read(&state, &caller, revalidate, raw, query::VENDOR).await?;
    let body = VendorBody {
        success: true,
        message: "",
        data: VendorData {
            permanent_token: VendorToken {
                key: issued.token.expose(),
                active: issued.active,
            },
        },
        code: 200,
    };
    Ok(handed_out(
        &state,
        &identity,
        Json(body).into_response(),
        &issued,
    ))
}

/// `DELETE /v1/tokens`
#[utoipa::path(
    delete,
    path = "/v1/tokens",
    tag = "tokens",
    summary = "Drop a cached token",
    description = "Scope `tokens:invalidate`. The next read of that identity asks the vendor.",
    responses(
        (status = 204, description = "The cached token, if any, is gone here and (with Redis) recorded for every replica"),
        (status = 503, description = "Dropped here, but the shared cache did not confirm it (`invalidation-not-shared`, `Retry-After: 1`): retry until 204; or the audit event could not be written (`audit-unavailable`)", body = crate::http::error::Problem<'static>, content_type = "application/problem+json", headers(
            ("Retry-After" = u64, description = "Seconds to wait (at most 60)"),
        )),
        CallerErrors,
    )
)]
pub async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, Response> {
    let identity =
        query::identity(raw.as_deref(), query::V1).map_err(IntoResponse::into_response)?;
    let refused = |error| refused(&state, &identity, error);
    caller
        .authorize(Action::Invalidate, &identity)
        .map_err(|refusal| refused(refusal.into()))?;
    state.broker.invalidate(&identity).await.map_err(|not_shared| {
        tracing::warn!(
            "the shared cache did not confirm an invalidation; answered 503 so the caller retries"
        );
        refused(not_shared.into())
    })?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let mut outcome = Outcome::new(ClientResult::Ok);
    outcome.identity = Some(state.auditor.identity(&identity));
    response.extensions_mut().insert(outcome);
    Ok(response)
}

/// An error's answer, naming whose token was asked for in its audit event.
pub(super) fn refused(state: &AppState, identity: &Identity, error: ApiError) -> Response {
    let mut response = error.into_response();
    if let Some(outcome) = response.extensions_mut().get_mut::<Outcome>() {
        outcome.identity = Some(state.auditor.identity(identity));
    }
    response
}

/// The identity a read names in its query (`form`: how the customer id is
/// spelled), and
/// the token `caller` gets for it; a refusal as the answer to send.
async fn read(
    state: &AppState,
    caller: &Caller,
    revalidate: Revalidate,
    raw: Option<String>,
    form: query::CustomerParam,
) -> Result<(Identity, Issued), Response> {
    let identity = query::identity(raw.as_deref(), form).map_err(IntoResponse::into_response)?;
    let issued = lookup(state, caller, &identity, revalidate)
        .await
        .map_err(|error| refused(state, &identity, error))?;
    Ok((identity, issued))
}

async fn lookup(
    state: &AppState,
    caller: &Caller,
    identity: &Identity,
    Revalidate(revalidate): Revalidate,
) -> Result<Issued, ApiError> {
    caller.authorize(Action::Read, identity)?;
    let answer = if revalidate {
        state.broker.revalidate(identity, caller.name()).await
    } else {
        state.broker.lookup(identity, caller.name()).await
    };
    answer.map_err(|error| {
        // The caller gets the short answer; the log gets the vendor's cause.
        let cause = std::error::Error::source(&error)
            .map(ToString::to_string)
            .unwrap_or_default();
        // Per request only at debug: during an outage every miss fails, and
        // the metrics count them; a warning at most every ten seconds.
        if !matches!(error, BrokerError::NotFound) && VENDOR_ERRORS.check().is_ok() {
            tracing::warn!(
                outcome = error.outcome().as_str(),
                error = %error,
                cause,
                "no token from the vendor (warned at most every 10 s; see token_broker_upstream_requests_total)"
            );
        } else {
            tracing::debug!(identity = identity.kind(), outcome = error.outcome().as_str(), error = %error, cause, "no token from the vendor");
        }
        ApiError::from(&error)
    })
}

/// A token's answer: its headers, and what its audit event says (the
/// subject's hash computed once per cache entry).
fn handed_out(
    state: &AppState,
    identity: &Identity,
    mut response: Response,
    issued: &Issued,
) -> Response {
    let subject = issued.audit_subject(|| state.auditor.subject(identity));
    let mut outcome = Outcome::new(ClientResult::Ok);
    outcome.cache = Some(issued.cache);
    outcome.active = Some(issued.active);
    outcome.identity = Some(AuditedIdentity::with_subject(identity, subject));
    response.extensions_mut().insert(outcome);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CACHE, HeaderValue::from_static(issued.cache.as_str()));
    headers.insert(header::AGE, HeaderValue::from(issued.age.as_secs()));
    response
}
