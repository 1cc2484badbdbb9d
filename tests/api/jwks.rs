//! Where the cluster's keys come from: a JWKS file that rotates, and a JWKS
//! URL read over the cluster CA, each bounded to 1 MiB.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::helpers::service_accounts::*;
use crate::helpers::*;

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
    let refused = token_broker::callers::service_accounts::Verifier::from_settings(
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
