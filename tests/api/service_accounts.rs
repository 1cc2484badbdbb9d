//! Callers known to the cluster: Kubernetes service-account
//! tokens, signed with RSA and EC keys the tests make, against a JWKS file.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key and its public JWK.
struct SigningKey {
    kid: &'static str,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
}

/// A private key in DER, made by the `openssl` command line.
fn openssl_der(generate: &[&str], convert: &[&str]) -> Vec<u8> {
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

fn keys() -> &'static [SigningKey; 3] {
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

fn rsa() -> &'static SigningKey {
    &keys()[0]
}
fn ec() -> &'static SigningKey {
    &keys()[1]
}
fn rotated() -> &'static SigningKey {
    &keys()[2]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a projected token for `account` (`namespace:name`).
fn claims(account: &str) -> serde_json::Value {
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

fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.algorithm);
    header.kid = Some(key.kid.into());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A broker accepting service-account tokens, the JWKS in a file it watches.
struct Cluster {
    app: TestApp,
    jwks_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
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
    async fn get(&self, bearer: &str, query: &str) -> reqwest::Response {
        self.app.get_token_as(Some(bearer), query).await
    }

    /// `token_broker_service_account_tokens_total` for one `result`.
    async fn counted(&self, result: &str) -> f64 {
        counted(&self.app, result).await
    }
}

async fn counted(app: &TestApp, result: &str) -> f64 {
    app.metric(&format!(
        r#"token_broker_service_account_tokens_total{{result="{result}"}}"#
    ))
    .await
}

fn alice() -> String {
    member_query(ALICE, "AGENT")
}

/// Asks for alice with `token` until the answer is `status` (a JWKS change is
/// picked up a moment after the file or URL changes); fails after `seconds`.
async fn answers_within(app: &TestApp, token: &str, status: u16, seconds: u64, never: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while app.get_token_as(Some(token), &alice()).await.status() != status {
        assert!(tokio::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_valid_service_account_token_is_its_client_in_every_respect() {
    let cluster = cluster().await;
    for key in [rsa(), ec()] {
        let token = sign(key, &claims("inbox:embedder"));
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 200, "{:?}", key.algorithm);
    }
    assert_eq!(
        cluster
            .app
            .metric(r#"token_broker_client_requests_total{client="embedder",result="ok"}"#)
            .await,
        2.0,
        "metrics name the client"
    );
    // The client's policy applies: types, domains and scopes.
    let token = sign(rsa(), &claims("inbox:embedder"));
    problem(
        cluster
            .get(&token, &member_query(ALICE, "CUSTOM_USER"))
            .await,
        403,
    )
    .await;
    problem(
        cluster
            .get(&token, &member_query("eve@other.org", "AGENT"))
            .await,
        403,
    )
    .await;
    problem(
        cluster.get(&token, &format!("user_id={CUSTOMER_ID}")).await,
        403,
    )
    .await;
    // Keys keep working beside it.
    assert_eq!(cluster.app.get_token(&alice()).await.status(), 200);
}

#[tokio::test]
async fn every_forged_or_misfit_token_is_a_401() {
    let cluster = cluster().await;
    let good = claims("inbox:embedder");
    let with = |field: &str, value: serde_json::Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let signed = sign(rsa(), &good);
    let parts: Vec<&str> = signed.split('.').collect();
    let mut tampered_payload = good.clone();
    tampered_payload["sub"] = json!("system:serviceaccount:crm:admin");
    let tampered_signature = {
        let mut signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        signature[10] ^= 0x55;
        b64(&signature)
    };
    let unknown_kid = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("nobody-knows".into());
        jsonwebtoken::encode(&header, &good, &rsa().encoding).unwrap()
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(rsa().kid.into());
        let secret = serde_json::to_vec(&rsa().jwk).unwrap();
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&secret)).unwrap()
    };
    let cases = [
        (
            "wrong aud",
            sign(rsa(), &with("aud", json!(["kubernetes"]))),
        ),
        (
            "wrong iss",
            sign(rsa(), &with("iss", json!("https://other.example"))),
        ),
        ("expired", sign(rsa(), &with("exp", json!(now() - 120)))),
        (
            "not yet valid",
            sign(rsa(), &with("nbf", json!(now() + 120))),
        ),
        ("no exp", {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove("exp");
            sign(rsa(), &claims)
        }),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&serde_json::to_vec(&tampered_payload).unwrap()),
                parts[2]
            ),
        ),
        (
            "tampered signature",
            format!("{}.{}.{tampered_signature}", parts[0], parts[1]),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
                parts[1]
            ),
        ),
        ("HS256 with the public key as secret", hs256_with_public_key),
        ("unknown kid", unknown_kid),
        ("signed by a key not in the JWKS", {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some(rsa().kid.into());
            jsonwebtoken::encode(&header, &good, &rotated().encoding).unwrap()
        }),
        (
            "not a service account",
            sign(rsa(), &with("sub", json!("system:node:worker-1"))),
        ),
    ];
    for (case, token) in cases {
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        problem(response, 401).await;
    }
    assert_eq!(cluster.app.sim.calls(), 0);
}

#[tokio::test]
async fn a_valid_token_no_client_names_is_a_403_and_a_namespace_wildcard_admits_its_own_only() {
    let cluster = cluster().await;
    let unnamed = sign(ec(), &claims("inbox:other-app"));
    problem(cluster.get(&unnamed, &alice()).await, 403).await;

    for name in ["billing", "sync-job"] {
        let token = sign(ec(), &claims(&format!("crm:{name}")));
        assert_eq!(cluster.get(&token, &alice()).await.status(), 200, "{name}");
    }
    let other_namespace = sign(ec(), &claims("crm-staging:billing"));
    problem(cluster.get(&other_namespace, &alice()).await, 403).await;
    assert_eq!(
        cluster
            .app
            .metric(r#"token_broker_client_requests_total{client="crm",result="ok"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_rotated_jwks_file_is_picked_up_without_restart() {
    let cluster = cluster().await;
    assert_eq!(
        cluster
            .get(&sign(rsa(), &claims("inbox:embedder")), &alice())
            .await
            .status(),
        200
    );

    std::fs::write(&cluster.jwks_file, jwks(&[rotated(), ec()])).unwrap();

    // The new key is known (by the watch, or at worst by the unknown-kid reload).
    let new_key = sign(rotated(), &claims("inbox:embedder"));
    answers_within(&cluster.app, &new_key, 200, 5, "the new key never worked").await;
    // A fresh token of the removed key is refused.
    let old_key = sign(rsa(), &claims("inbox:embedder"));
    problem(cluster.get(&old_key, &alice()).await, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_with_one_token_verify_its_signature_once() {
    let cluster = cluster().await;
    let token = sign(rsa(), &claims("inbox:embedder"));
    let query = alice();
    assert_eq!(cluster.get(&token, &query).await.status(), 200);
    for batch in std::iter::once(99).chain(std::iter::repeat_n(100, 99)) {
        let statuses =
            futures::future::join_all((0..batch).map(|_| cluster.get(&token, &query))).await;
        assert!(statuses.iter().all(|r| r.status() == 200));
    }
    let verified = cluster.counted("verified").await;
    let cached = cluster.counted("cached").await;
    assert_eq!(
        (verified, cached),
        (1.0, 9_999.0),
        "one signature check for 10,000 hits"
    );
}

#[tokio::test]
async fn the_audit_event_names_the_client_and_the_service_account() {
    use crate::process::{Running, audit_events, command, config_file, upstream};
    let (_sim, upstream) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[rsa(), ec()])).unwrap();
    let extra = format!(
        "[auth.kubernetes]\nissuer = \"{ISSUER}\"\njwks_file = {:?}\n\n[[clients]]\nname = \"embedder\"\nservice_accounts = [\"inbox:embedder\"]\nscopes = [\"tokens:read\"]\n",
        jwks_file.display().to_string()
    );
    let mut cmd = command();
    cmd.arg("--config").arg(config_file(&dir, upstream, &extra));
    let mut broker = Running::start(cmd).await;
    let token = sign(ec(), &claims("inbox:embedder"));
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/tokens?{}", broker.api, alice()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    broker.stop().await;

    let output = broker.output();
    let audit = audit_events(&output);
    assert_eq!(audit.len(), 1, "{output}");
    assert_eq!(audit[0]["caller"], "embedder");
    assert_eq!(audit[0]["service_account"], "inbox:embedder");
    assert!(!output.contains(&token), "the token is never logged");
}

#[tokio::test]
async fn a_remembered_token_is_refused_once_its_signing_key_leaves_the_jwks() {
    let cluster = cluster().await;
    let token = sign(rsa(), &claims("inbox:embedder"));
    assert_eq!(cluster.get(&token, &alice()).await.status(), 200);
    assert_eq!(
        cluster.get(&token, &alice()).await.status(),
        200,
        "remembered"
    );

    // The signing key is pulled (say, it leaked): the same token, already
    // verified and remembered, is a caller no more.
    std::fs::write(&cluster.jwks_file, jwks(&[rotated(), ec()])).unwrap();
    answers_within(
        &cluster.app,
        &token,
        401,
        5,
        "a token of the removed key kept working",
    )
    .await;
    assert!(cluster.counted("rejected_unknown_key").await >= 1.0);
}

#[tokio::test]
async fn long_lived_tokens_and_tokens_without_iat_are_refused() {
    let cluster = cluster().await;
    let lasting = |seconds: u64| {
        let mut claims = claims("inbox:embedder");
        claims["exp"] = json!(claims["iat"].as_u64().unwrap() + seconds);
        claims
    };
    let mut without_iat = claims("inbox:embedder");
    without_iat.as_object_mut().unwrap().remove("iat");
    for (case, claims) in [
        ("ten years", lasting(10 * 365 * 86_400)),
        ("no iat", without_iat),
        ("a day and a minute", lasting(86_400 + 60)),
    ] {
        let response = cluster.get(&sign(rsa(), &claims), &alice()).await;
        assert_eq!(response.status(), 401, "{case}");
        problem(response, 401).await;
    }
    let a_day = lasting(86_400);
    assert_eq!(
        cluster.get(&sign(rsa(), &a_day), &alice()).await.status(),
        200,
        "exactly max_token_lifetime (24h) is allowed"
    );
    assert_eq!(cluster.counted("rejected_lifetime").await, 3.0);
}

#[tokio::test]
async fn a_subject_whose_names_are_not_kubernetes_names_is_refused() {
    let cluster = cluster().await;
    for subject in [
        "crm:",
        ":billing",
        "crm:Billing",
        "crm:-billing",
        "crm:billing:extra",
        "CRM:billing",
        "crm:billing_job",
        &format!("crm:{}", "a".repeat(254)),
        &format!("{}:billing", "n".repeat(64)),
    ] {
        let token = sign(ec(), &claims(subject));
        let response = cluster.get(&token, &alice()).await;
        assert_eq!(response.status(), 401, "{subject}");
        problem(response, 401).await;
    }
    let dotted = sign(ec(), &claims("crm:billing.v2"));
    assert_eq!(
        cluster.get(&dotted, &alice()).await.status(),
        200,
        "a name may be a DNS subdomain"
    );
    assert_eq!(cluster.counted("rejected_subject").await, 9.0);
}

#[tokio::test]
async fn a_jwks_file_larger_than_one_mebibyte_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    let padded =
        jwks(&[rsa()]).replacen('{', &format!("{{\"pad\":\"{}\",", "x".repeat(1 << 20)), 1);
    std::fs::write(&jwks_file, padded).unwrap();
    let settings = token_broker::config::Settings::load(&token_broker::config::Sources {
        layers: vec![format!(
            "[auth.kubernetes]\nissuer = \"{ISSUER}\"\njwks_file = {:?}\n",
            jwks_file.display().to_string()
        )],
        ..Default::default()
    })
    .unwrap();
    let refused = token_broker::service_accounts::Verifier::from_settings(
        &settings.auth.kubernetes,
        std::sync::Arc::new(token_broker::telemetry::metrics::Metrics::new()),
    )
    .await
    .err()
    .expect("a JWKS over 1 MiB is refused")
    .to_string();
    assert!(refused.contains("larger than 1 MiB"), "{refused}");
}

/// A CA and a server certificate for 127.0.0.1 it signed, made by `openssl`:
/// (CA PEM path, certificate chain, key).
fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let path = |name: &str| dir.join(name).display().to_string();
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {output:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=test cluster CA",
        "-days",
        "1",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.crt"),
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.crt"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.crt"),
    ]);
    (
        dir.join("ca.crt"),
        std::fs::read(dir.join("server.crt")).unwrap(),
        std::fs::read(dir.join("server.key")).unwrap(),
    )
}

/// An HTTPS server on 127.0.0.1 answering every request with `body`, with no
/// length (the body ends when the connection closes), as an API server could;
/// `written` counts the body bytes the client took.
async fn https_jwks_server(
    cert: Vec<u8>,
    key: Vec<u8>,
    body: Arc<Vec<u8>>,
    written: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, body, written) = (acceptor.clone(), body.clone(), written.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
                    .await;
                for chunk in body.chunks(16 * 1024) {
                    if tls.write_all(chunk).await.is_err() {
                        return;
                    }
                    written.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A broker that reads the JWKS from `url`, trusting `ca` for it.
async fn fetching_from(url: &str, ca: &std::path::Path) -> TestApp {
    TestApp::builder()
        .config(&format!(
            r#"
[auth.kubernetes]
issuer = "{ISSUER}"
jwks_url = "{url}"
jwks_ca_file = {ca:?}

[[clients]]
name = "embedder"
service_accounts = ["inbox:embedder"]
scopes = ["tokens:read"]
"#,
            ca = ca.display().to_string()
        ))
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_read_over_the_cluster_ca_and_never_past_one_mebibyte() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    let token = sign(rsa(), &claims("inbox:embedder"));

    // Padded past the old 256 KiB cap, under the 1 MiB one.
    let padded = |bytes: usize| {
        jwks(&[rsa()])
            .replacen('{', &format!("{{\"pad\":\"{}\",", "x".repeat(bytes)), 1)
            .into_bytes()
    };
    let written = Arc::new(AtomicUsize::new(0));
    let good = https_jwks_server(
        cert.clone(),
        key.clone(),
        Arc::new(padded(600 << 10)),
        written.clone(),
    )
    .await;
    let app = fetching_from(
        &format!("https://127.0.0.1:{}/openid/v1/jwks", good.port()),
        &ca,
    )
    .await;
    answers_within(
        &app,
        &token,
        200,
        10,
        "the JWKS was never read over the cluster's CA",
    )
    .await;

    // The same keys behind 64 MiB of padding: the read stops at 1 MiB (the
    // rest is never taken), so no key is known and the token is refused.
    let written = Arc::new(AtomicUsize::new(0));
    let huge = https_jwks_server(cert, key, Arc::new(padded(64 << 20)), written.clone()).await;
    let app = fetching_from(
        &format!("https://127.0.0.1:{}/openid/v1/jwks", huge.port()),
        &ca,
    )
    .await;
    problem(app.get_token_as(Some(&token), &alice()).await, 401).await;
    assert_eq!(counted(&app, "rejected_unknown_key").await, 1.0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let taken = written.load(Ordering::SeqCst);
    assert!(
        taken < 16 << 20,
        "the broker took {taken} bytes of a 64 MiB JWKS body before giving up"
    );
}
