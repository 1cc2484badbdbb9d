//! Kubernetes service-account tokens as caller credentials.
//!
//! A projected service-account token is a JWT the cluster signed. It is
//! verified offline against the cluster's JWKS (from `auth.kubernetes.jwks_file`,
//! re-read when it changes, or `jwks_url`, fetched every `jwks_refresh`):
//! RS256 or ES256 only, the key chosen by `kid`, `iss` and `aud` as
//! configured, `exp` and `nbf` with 60 s leeway, an `iat` no further than
//! `max_token_lifetime` before `exp`, and a `sub` whose namespace and name
//! are valid Kubernetes names. An unknown `kid` re-reads the JWKS at most once
//! per 30 s. A verified token is remembered until its `exp`, keyed by its
//! SHA-256, so a hit costs one hash and no signature check; it is forgotten
//! as soon as the key that signed it leaves the JWKS. A JWKS is read up to
//! 1 MiB, from a file or over HTTPS trusting only `jwks_ca_file` when given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::policy::{Policy, Rule};
use super::{Caller, Identified, Method, Presented, Refusal as CallerRefusal};
use crate::config::{ConfigError, KubernetesSettings, ServiceAccount};
use crate::domain::{Proof, is_dns_label, is_dns_subdomain};
use crate::telemetry::metrics::{Metrics, ServiceAccountResult};
use crate::watch::{self, FileWatch};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The least time between two JWKS reloads caused by unknown `kid`s.
const UNKNOWN_KID_RELOAD: Duration = Duration::from_secs(30);
/// Verified tokens remembered at once.
const VERIFIED_CAPACITY: u64 = 10_000;
/// Largest JWKS read, from either source.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// What a service account's `sub` starts with.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// Why a bearer token was not accepted; the caller sees only a 401.
#[derive(Debug, Clone, thiserror::Error)]
#[error("service-account token refused: {detail}")]
pub struct Rejected {
    /// The `result` it is counted under in `token_broker_service_account_tokens_total`.
    pub reason: Refusal,
    pub detail: String,
}

/// Why a token was refused, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a JWT at all: some other credential (a wrong key, say). Not
    /// counted as a service-account token.
    NotAJwt,
    /// An algorithm other than RS256 and ES256.
    Malformed,
    /// No key of the JWKS has its `kid` (or the key's algorithm differs).
    UnknownKey,
    /// Signature, issuer, audience, `exp` or `nbf` wrong.
    Invalid,
    /// No `iat`, or `exp - iat` longer than `max_token_lifetime`.
    TooLongLived,
    /// `sub` is not a service account with valid Kubernetes names.
    Subject,
}

impl From<Refusal> for ServiceAccountResult {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotAJwt | Refusal::Malformed => Self::RejectedMalformed,
            Refusal::UnknownKey => Self::RejectedUnknownKey,
            Refusal::Invalid => Self::RejectedInvalid,
            Refusal::TooLongLived => Self::RejectedLifetime,
            Refusal::Subject => Self::RejectedSubject,
        }
    }
}

/// A token that passed verification: whose it is and until when.
#[derive(Debug)]
pub struct Verified {
    /// `namespace:name`.
    pub service_account: Arc<str>,
    expires: SystemTime,
    /// The key that signed it: when it leaves the JWKS, so does the token.
    kid: String,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: Option<u64>,
}

/// A signing key of the cluster.
struct Key {
    decoding: DecodingKey,
    algorithm: Algorithm,
}

enum Source {
    File(PathBuf),
    Url {
        http: reqwest::Client,
        url: Url,
        token_file: Option<PathBuf>,
    },
}

/// Verifies service-account tokens; shared by every request.
pub struct Verifier {
    issuer: String,
    audiences: Vec<String>,
    max_lifetime: Duration,
    keys: ArcSwap<HashMap<String, Key>>,
    source: Source,
    refresh: Duration,
    last_unknown_kid_reload: Mutex<Option<Instant>>,
    verified: moka::sync::Cache<[u8; 32], Arc<Verified>>,
    /// Paces the warning about tokens the cluster signed for another issuer.
    wrong_issuer_warning: governor::DefaultDirectRateLimiter,
    metrics: Arc<Metrics>,
}

/// At most one warning a minute about tokens with another issuer.
const WRONG_ISSUER_WARNING: Duration = Duration::from_secs(60);

impl Verifier {
    /// The verifier `settings` ask for, if any: a JWKS file must be readable
    /// and hold a key now; a JWKS URL is fetched by `spawn_refresh`, so a slow
    /// API server never holds up the start.
    pub async fn from_settings(
        settings: &KubernetesSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>, ConfigError> {
        let Some(issuer) = &settings.issuer else {
            return Ok(None);
        };
        let source = match (&settings.jwks_file, &settings.jwks_url) {
            (Some(path), None) => Source::File(path.clone()),
            (None, Some(url)) => Source::Url {
                http: jwks_client(settings)?,
                url: url.clone(),
                token_file: settings.jwks_token_file.clone(),
            },
            _ => {
                return Err(ConfigError::Invalid {
                    key: "auth.kubernetes.jwks_file".into(),
                    message: "set exactly one of auth.kubernetes.jwks_file and jwks_url".into(),
                });
            }
        };
        let verifier = Arc::new(Self {
            issuer: issuer.clone(),
            audiences: settings.audiences.clone(),
            max_lifetime: settings.max_token_lifetime,
            keys: ArcSwap::from_pointee(HashMap::new()),
            source,
            refresh: settings.jwks_refresh,
            last_unknown_kid_reload: Mutex::new(None),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            wrong_issuer_warning: governor::RateLimiter::direct(
                governor::Quota::with_period(WRONG_ISSUER_WARNING)
                    .expect("a non-zero period")
                    .allow_burst(std::num::NonZeroU32::MIN),
            ),
            metrics,
        });
        tracing::info!(
            issuer = %verifier.issuer,
            "service-account tokens are accepted from this issuer (auth.kubernetes.issuer)"
        );
        if let Source::File(_) = verifier.source {
            verifier
                .reload()
                .await
                .map_err(|message| ConfigError::Invalid {
                    key: "auth.kubernetes.jwks_file".into(),
                    message,
                })?;
        }
        Ok(Some(verifier))
    }

    /// Keeps the keys current: the file re-read when it changes, or the URL
    /// fetched every `jwks_refresh`, until `stop`.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> std::io::Result<Option<FileWatch>> {
        let verifier = self.clone();
        match &self.source {
            Source::File(path) => {
                let watch = watch::on_change(path, move || {
                    let verifier = verifier.clone();
                    tokio::spawn(async move { verifier.reload_and_log().await });
                })?;
                Ok(Some(watch))
            }
            Source::Url { .. } => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = verifier.reload_and_log() => {}
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(verifier.refresh) => {}
                        }
                    }
                });
                Ok(None)
            }
        }
    }

    /// Checks `token`; a token seen before is answered from memory until its `exp`.
    pub async fn verify(&self, token: &str) -> Result<Arc<Verified>, Rejected> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match self.remembered(&digest) {
            Some(verified) => Ok(verified),
            None => self.verify_new(token, digest).await,
        }
    }

    /// The token whose SHA-256 is `digest`, if verified before, still signed
    /// by a key of the JWKS and not expired: no signature check.
    pub fn remembered(&self, digest: &[u8; 32]) -> Option<Arc<Verified>> {
        let verified = self.verified.get(digest)?;
        if verified.expires + LEEWAY > SystemTime::now()
            && self.keys.load().contains_key(&verified.kid)
        {
            self.metrics
                .service_account_token(ServiceAccountResult::Cached);
            return Some(verified);
        }
        self.verified.invalidate(digest);
        None
    }

    /// Verifies a token not remembered; `digest` is its SHA-256.
    pub async fn verify_new(
        &self,
        token: &str,
        digest: [u8; 32],
    ) -> Result<Arc<Verified>, Rejected> {
        let result = self.verify_signed(token).await;
        match &result {
            Err(rejected) if rejected.reason == Refusal::NotAJwt => {}
            Err(rejected) => self.metrics.service_account_token(rejected.reason.into()),
            Ok(_) => self
                .metrics
                .service_account_token(ServiceAccountResult::Verified),
        }
        let verified = Arc::new(result?);
        self.verified.insert(digest, verified.clone());
        Ok(verified)
    }

    async fn verify_signed(&self, token: &str) -> Result<Verified, Rejected> {
        let reject = |reason: Refusal, detail: &str| Rejected {
            reason,
            detail: detail.to_owned(),
        };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| reject(Refusal::NotAJwt, "not a JWT"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(reject(
                Refusal::Malformed,
                "only RS256 and ES256 are accepted",
            ));
        }
        let kid = header.kid.unwrap_or_default();
        if !self.keys.load().contains_key(&kid) && self.may_reload_for_unknown_kid() {
            self.reload_and_log().await;
        }
        let keys = self.keys.load();
        let key = keys
            .get(&kid)
            .ok_or_else(|| reject(Refusal::UnknownKey, "unknown kid"))?;
        if key.algorithm != header.alg {
            return Err(reject(Refusal::UnknownKey, "alg does not match the key"));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|e| {
                if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidIssuer) {
                    self.warn_wrong_issuer(token);
                }
                reject(Refusal::Invalid, &format!("{:?}", e.kind()))
            })?
            .claims;
        // A stolen token that lives for years is not a caller.
        let lifetime = claims.iat.and_then(|iat| claims.exp.checked_sub(iat));
        if lifetime.is_none_or(|seconds| Duration::from_secs(seconds) > self.max_lifetime) {
            return Err(reject(
                Refusal::TooLongLived,
                "no iat, or exp - iat longer than auth.kubernetes.max_token_lifetime",
            ));
        }
        // Nor is one issued in the future (beyond clock skew): with `exp` a
        // short while after such an `iat`, it would be valid for years. Time
        // claims are checked, never added up unchecked.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(LEEWAY.as_secs()))
        {
            return Err(reject(Refusal::Invalid, "iat is in the future"));
        }
        let expires = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| reject(Refusal::Invalid, "exp is out of range"))?;
        let service_account = claims
            .sub
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|account| account.split_once(':'))
            .filter(|(namespace, name)| is_dns_label(namespace) && is_dns_subdomain(name))
            .map(|(namespace, name)| format!("{namespace}:{name}"))
            .ok_or_else(|| reject(Refusal::Subject, "sub is not a service account"))?;
        Ok(Verified {
            service_account: Arc::from(service_account),
            expires,
            kid,
        })
    }

    /// A token the cluster signed names another issuer: the configured one is
    /// most likely wrong (EKS, GKE and AKS issuers differ from the default),
    /// and every such caller gets a 401. Says so, naming both, once a minute.
    fn warn_wrong_issuer(&self, token: &str) {
        if self.wrong_issuer_warning.check().is_err() {
            return;
        }
        let presented = token
            .split('.')
            .nth(1)
            .and_then(|payload| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .ok()
            })
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
            .and_then(|claims| {
                let issuer = claims.get("iss")?.as_str()?;
                Some(issuer.chars().take(256).collect::<String>())
            })
            .unwrap_or_default();
        tracing::warn!(
            expected = %self.issuer,
            presented = %presented,
            "a service-account token signed by the cluster names another issuer, so it is refused (401); \
             if every service-account caller is refused, set auth.kubernetes.issuer to the cluster's: \
             kubectl get --raw /.well-known/openid-configuration"
        );
    }

    /// True for the first unknown `kid` in each `UNKNOWN_KID_RELOAD`.
    fn may_reload_for_unknown_kid(&self) -> bool {
        let mut last = self
            .last_unknown_kid_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_RELOAD);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    async fn reload_and_log(&self) {
        match self.reload().await {
            Ok(count) => tracing::info!(keys = count, "cluster JWKS loaded"),
            Err(message) => {
                tracing::warn!(%message, "cannot reload the cluster's JWKS; keeping the keys it had")
            }
        }
    }

    /// Reads the JWKS and swaps the keys in; returns how many it holds.
    async fn reload(&self) -> Result<usize, String> {
        let text = match &self.source {
            Source::File(path) => read_jwks_file(path)?,
            Source::Url {
                http,
                url,
                token_file,
            } => fetch_jwks(http, url, token_file.as_deref()).await?,
        };
        let keys = parse_jwks(&text)?;
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        // Tokens signed by a key that left are refused from now on (`verify`
        // checks the kid on every hit); their memory goes here.
        let keys = self.keys.load();
        let gone: Vec<Arc<[u8; 32]>> = self
            .verified
            .iter()
            .filter(|(_, verified)| !keys.contains_key(&verified.kid))
            .map(|(digest, _)| digest)
            .collect();
        for digest in gone {
            self.verified.invalidate(&*digest);
        }
        Ok(count)
    }
}

/// Callers by Kubernetes service-account token: a bearer credential that is
/// no client's key is verified by the `Verifier` (a remembered token costs
/// no signature check: its SHA-256 is the one the key check made) and its
/// `namespace:name` looked up among the clients' `service_accounts`.
pub(super) struct ServiceAccounts {
    verifier: Arc<Verifier>,
    /// `namespace:name` → client.
    by_account: HashMap<String, Arc<Policy>>,
    /// `namespace` → the client naming `namespace:*`.
    by_namespace: HashMap<String, Arc<Policy>>,
}

impl ServiceAccounts {
    pub(super) fn new<'a>(
        verifier: Arc<Verifier>,
        named: impl IntoIterator<Item = (&'a ServiceAccount, Arc<Policy>)>,
    ) -> Self {
        let mut accounts = Self {
            verifier,
            by_account: HashMap::new(),
            by_namespace: HashMap::new(),
        };
        for (account, policy) in named {
            match account {
                ServiceAccount::AnyIn { namespace } => {
                    accounts.by_namespace.insert(namespace.clone(), policy);
                }
                named => {
                    accounts.by_account.insert(named.to_string(), policy);
                }
            }
        }
        accounts
    }

    /// The client naming `account` (`namespace:name`), exactly or by `namespace:*`.
    fn caller(&self, account: &Arc<str>) -> Result<Option<Caller>, CallerRefusal> {
        let namespace = account.split_once(':').map_or("", |(ns, _)| ns);
        let policy = self
            .by_account
            .get(&**account)
            .or_else(|| self.by_namespace.get(namespace))
            .ok_or_else(|| CallerRefusal::NotAClient {
                rule: Rule::ServiceAccount,
                detail: "this service account is not a caller of this service".into(),
                proof: Proof::ServiceAccount(account.clone()),
            })?;
        Ok(Some(Caller {
            policy: policy.clone(),
            proof: Proof::ServiceAccount(account.clone()),
        }))
    }
}

impl Method for ServiceAccounts {
    fn identify<'a>(&'a self, presented: &'a Presented<'a>) -> Identified<'a> {
        let Some(bearer) = &presented.bearer else {
            return Identified::Now(Ok(None));
        };
        if let Some(verified) = self.verifier.remembered(bearer.digest.as_bytes()) {
            return Identified::Now(self.caller(&verified.service_account));
        }
        Identified::Later(Box::pin(async move {
            let Ok(token) = std::str::from_utf8(bearer.credential) else {
                return Ok(None);
            };
            match self
                .verifier
                .verify_new(token, *bearer.digest.as_bytes())
                .await
            {
                Ok(verified) => self.caller(&verified.service_account),
                Err(rejected) if rejected.reason == Refusal::NotAJwt => Ok(None),
                Err(rejected) => {
                    tracing::debug!(%rejected, "service-account token refused");
                    Err(CallerRefusal::Unauthorized)
                }
            }
        }))
    }
}

fn read_jwks_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {}: {}", path.display(), e.kind());
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    Ok(text)
}

async fn fetch_jwks(
    http: &reqwest::Client,
    url: &Url,
    token_file: Option<&Path>,
) -> Result<String, String> {
    let mut request = http.get(url.clone());
    if let Some(path) = token_file {
        // Re-read each time: kubelet rotates projected tokens.
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
        request = request.bearer_auth(token.trim());
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("JWKS request failed: {}", e.without_url()))?;
    if !response.status().is_success() {
        return Err(format!("JWKS request answered {}", response.status()));
    }
    let too_large = || "JWKS larger than 1 MiB".to_owned();
    if response
        .content_length()
        .is_some_and(|length| length > MAX_JWKS_BYTES as u64)
    {
        return Err(too_large());
    }
    // Read chunk by chunk: a body that never ends is cut at the cap, not buffered.
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("JWKS body: {}", e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "JWKS is not UTF-8".into())
}

/// The RS256 and ES256 (P-256) signing keys of a JWKS, by `kid`.
fn parse_jwks(text: &str) -> Result<HashMap<String, Key>, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS ({:?} error)", e.classify()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        let declared = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        if declared.is_some_and(|declared| declared != algorithm) {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        keys.insert(
            kid,
            Key {
                decoding,
                algorithm,
            },
        );
    }
    if keys.is_empty() {
        return Err("the JWKS holds no RS256 or ES256 signing key".into());
    }
    Ok(keys)
}

/// The client for `jwks_url`: HTTPS, trusting only `jwks_ca_file` when given
/// (the cluster's CA, not every public one).
fn jwks_client(settings: &KubernetesSettings) -> Result<reqwest::Client, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: key.into(),
        message,
    };
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &settings.jwks_ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            invalid(
                "auth.kubernetes.jwks_ca_file",
                format!("cannot read {}: {}", path.display(), e.kind()),
            )
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
            invalid(
                "auth.kubernetes.jwks_ca_file",
                format!("{} holds no PEM certificate", path.display()),
            )
        })?;
        builder = builder.tls_certs_only(certificates);
    }
    builder.build().map_err(|e| {
        invalid(
            "auth.kubernetes.jwks_url",
            format!("cannot build a client: {e}"),
        )
    })
}
