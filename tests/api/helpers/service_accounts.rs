//! Kubernetes service-account callers as the tests make them: RSA and EC
//! signing keys (from the `openssl` command line), signed tokens, a JWKS, and
//! a broker that names three clients by key, account and namespace.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::*;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key and its public JWK.
pub struct SigningKey {
    pub kid: &'static str,
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
}

/// A private key in DER, made by the `openssl` command line.
pub fn openssl_der(generate: &[&str], convert: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    let der = dir.path().join("key.der");
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    // `-out` right after the command: genrsa wants the key size last.
    let mut args = vec![generate[0], "-out", pem.to_str().unwrap()];
    args.extend(&generate[1..]);
    run(&args);
    let mut args = convert.to_vec();
    args.extend([
        "-in",
        pem.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    run(&args);
    std::fs::read(der).unwrap()
}

pub fn keys() -> &'static [SigningKey; 3] {
    static KEYS: OnceLock<[SigningKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let rsa = |kid: &'static str| {
            let der = openssl_der(
                &["genrsa", "-traditional", "2048"],
                &["rsa", "-traditional"],
            );
            let encoding = EncodingKey::from_rsa_der(&der);
            let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            SigningKey {
                kid,
                algorithm: Algorithm::RS256,
                encoding,
                jwk,
            }
        };
        let der = openssl_der(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            &["pkcs8", "-topk8", "-nocrypt"],
        );
        let encoding = EncodingKey::from_ec_der(&der);
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("ec-1".into());
        [
            rsa("rsa-1"),
            SigningKey {
                kid: "ec-1",
                algorithm: Algorithm::ES256,
                encoding,
                jwk,
            },
            rsa("rsa-2"),
        ]
    })
}

pub fn rsa() -> &'static SigningKey {
    &keys()[0]
}

pub fn ec() -> &'static SigningKey {
    &keys()[1]
}

pub fn rotated() -> &'static SigningKey {
    &keys()[2]
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a projected token for `account` (`namespace:name`).
pub fn claims(account: &str) -> serde_json::Value {
    json!({
        "iss": ISSUER,
        "aud": ["token-broker"],
        "sub": format!("system:serviceaccount:{account}"),
        "iat": now(),
        "nbf": now(),
        "exp": now() + 600,
        "jti": token_broker::simulator::random_hex(8),
    })
}

pub fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.algorithm);
    header.kid = Some(key.kid.into());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

pub fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A broker accepting service-account tokens, the JWKS in a file it watches.
pub struct Cluster {
    pub app: TestApp,
    pub jwks_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[rsa(), ec()])).unwrap();
    let app = TestApp::builder()
        .config(&format!(
            r#"
[auth.kubernetes]
issuer = "{ISSUER}"
jwks_file = {jwks:?}

[[clients]]
name = "reader"
key_sha256 = "{reader}"
scopes = ["tokens:read", "customer_tokens:read"]

[[clients]]
name = "embedder"
service_accounts = ["inbox:embedder"]
scopes = ["tokens:read"]
allowed_types = ["AGENT"]
allowed_email_domains = ["example.com"]

[[clients]]
name = "crm"
service_accounts = ["crm:*"]
scopes = ["tokens:read", "customer_tokens:read"]
"#,
            jwks = jwks_file.display().to_string(),
            reader = token_broker::config::KeyDigest::of_key(READER_KEY),
        ))
        .spawn()
        .await;
    Cluster {
        app,
        jwks_file,
        _dir: dir,
    }
}

impl Cluster {
    pub async fn get(&self, bearer: &str, query: &str) -> reqwest::Response {
        self.app.get_token_as(Some(bearer), query).await
    }

    /// `token_broker_service_account_tokens_total` for one `result`.
    pub async fn counted(&self, result: &str) -> f64 {
        counted(&self.app, result).await
    }
}

pub async fn counted(app: &TestApp, result: &str) -> f64 {
    app.metric(&format!(
        r#"token_broker_service_account_tokens_total{{result="{result}"}}"#
    ))
    .await
}

pub fn alice() -> String {
    member_query(ALICE, "AGENT")
}

/// Asks for alice with `token` until the answer is `status` (a JWKS change is
/// picked up a moment after the file or URL changes); fails after `seconds`.
pub async fn answers_within(app: &TestApp, token: &str, status: u16, seconds: u64, never: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while app.get_token_as(Some(token), &alice()).await.status() != status {
        assert!(tokio::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
