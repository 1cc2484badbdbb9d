//! Load helpers for `bench/run`: warm every key, fire a cold herd, make a
//! service-account token, open new TLS connections (full handshakes or
//! resumed). Loopback only; every run is bounded in time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use futures::StreamExt;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// GET every key once (user0 … user{keys-1}), `concurrency` at a time.
    Warm {
        #[arg(long)]
        url: String,
        #[arg(long)]
        bearer: String,
        #[arg(long)]
        keys: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The CA that issued an https:// target's certificate.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// New TLS connections for `seconds`, `concurrency` at a time, each one
    /// handshake and one GET of a warm key, then closed. Prints
    /// "RESULT connections/s p50 p99 p99.9 errors" (ms).
    Handshakes {
        /// https://HOST:PORT
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "")]
        bearer: String,
        /// The CA that issued the server's certificate.
        #[arg(long)]
        ca: std::path::PathBuf,
        /// Resume sessions (TLS 1.3 tickets, or session ids) instead of full handshakes.
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        keys: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// `concurrency` requests at once for one key nobody asked for yet.
    Herd {
        #[arg(long)]
        url: String,
        #[arg(long)]
        bearer: String,
        #[arg(long)]
        email: String,
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        /// The broker's /metrics, to count vendor calls.
        #[arg(long)]
        metrics: String,
    },
    /// An RSA key, its JWKS and a service-account token signed with it.
    ServiceAccount {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        account: String,
    },
}

fn drop_in(url: &str, i: impl std::fmt::Display) -> String {
    format!("{url}/ext/get-user-token?email=user{i}%40example.com&type=AGENT")
}

async fn vendor_calls(http: &reqwest::Client, metrics: &str) -> f64 {
    let text = http
        .get(metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("token_broker_upstream_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `request` and reads one whole response (by its `Content-Length`);
/// its status.
async fn exchange(
    connection: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    request: &[u8],
) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    connection.write_all(request).await?;
    let mut received = Vec::with_capacity(1024);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    loop {
        if connection.read_buf(&mut received).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&received[..end]).map_err(|_| invalid())?;
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(invalid)?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(invalid)?;
        while received.len() < end + 4 + length {
            if connection.read_buf(&mut received).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        return Ok(status);
    }
}

/// A TLS client trusting only `ca`; sessions resumed or never.
fn tls_connector(ca: &std::path::Path, resume: bool) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("--ca is PEM") {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// New connections to `address` until `until`: handshake, one request, close.
async fn handshakes(
    connector: tokio_rustls::TlsConnector,
    address: String,
    request: Arc<Vec<u8>>,
    keys: usize,
    until: Instant,
) -> (Vec<Duration>, usize) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let mut i = rand_index(keys);
    while Instant::now() < until {
        i = (i + 7919) % keys;
        let started = Instant::now();
        let request = String::from_utf8_lossy(&request).replace("{i}", &i.to_string());
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let mut tls = connector.connect(name.clone(), tcp).await?;
            exchange(&mut tls, request.as_bytes()).await
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(200)) => latencies.push(started.elapsed()),
            _ => errors += 1,
        }
    }
    (latencies, errors)
}

/// A start that differs per task, so tasks do not ask for the same keys.
fn rand_index(keys: usize) -> usize {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos as usize % keys.max(1)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let command = Cli::parse().command;
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Command::Warm { ca: Some(ca), .. } = &command {
        let pem = std::fs::read(ca).expect("--ca is readable");
        http = http.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap());
    }
    let http = http.build().unwrap();
    match command {
        Command::Handshakes {
            url,
            bearer,
            ca,
            resume,
            keys,
            concurrency,
            seconds,
        } => {
            let address = url
                .strip_prefix("https://")
                .expect("--url is https://HOST:PORT")
                .trim_end_matches('/')
                .to_owned();
            let auth = if bearer.is_empty() {
                String::new()
            } else {
                format!("Authorization: Bearer {bearer}\r\n")
            };
            let request = Arc::new(
                format!(
                    "GET /ext/get-user-token?email=user{{i}}%40example.com&type=AGENT HTTP/1.1\r\n\
                     Host: localhost\r\n{auth}Connection: close\r\n\r\n"
                )
                .into_bytes(),
            );
            let connector = tls_connector(&ca, resume);
            let started = Instant::now();
            let until = started + Duration::from_secs(seconds);
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    tokio::spawn(handshakes(
                        connector.clone(),
                        address.clone(),
                        request.clone(),
                        keys,
                        until,
                    ))
                })
                .collect();
            let (mut latencies, mut errors) = (Vec::new(), 0);
            for task in tasks {
                let (done, failed) = task.await.unwrap();
                latencies.extend(done);
                errors += failed;
            }
            let elapsed = started.elapsed().as_secs_f64();
            latencies.sort();
            let ms = |p| {
                if latencies.is_empty() {
                    f64::NAN
                } else {
                    percentile(&latencies, p).as_secs_f64() * 1e3
                }
            };
            println!(
                "RESULT {:.0} {:.3} {:.3} {:.3} {errors}",
                latencies.len() as f64 / elapsed,
                ms(0.5),
                ms(0.99),
                ms(0.999)
            );
        }
        Command::Warm {
            url,
            bearer,
            keys,
            concurrency,
            ca: _,
        } => {
            let started = Instant::now();
            let failed = futures::stream::iter(0..keys)
                .map(|i| {
                    let request = http.get(drop_in(&url, i)).bearer_auth(&bearer).send();
                    async move {
                        request
                            .await
                            .map(|r| r.status().is_success())
                            .unwrap_or(false)
                    }
                })
                .buffer_unordered(concurrency)
                .filter(|ok| std::future::ready(!ok))
                .count()
                .await;
            println!(
                "warmed {keys} keys in {:.1} s, {failed} failed",
                started.elapsed().as_secs_f64()
            );
        }
        Command::Herd {
            url,
            bearer,
            email,
            concurrency,
            metrics,
        } => {
            let before = vendor_calls(&http, &metrics).await;
            let address = url
                .strip_prefix("http://")
                .expect("--url is http://HOST:PORT")
                .trim_end_matches('/')
                .to_owned();
            let request: Arc<[u8]> = format!(
                "GET /ext/get-user-token?email={email}&type=AGENT HTTP/1.1\r\n\
                 Host: {address}\r\nAuthorization: Bearer {bearer}\r\n\r\n"
            )
            .into_bytes()
            .into();
            // One connection per waiter, opened before the herd is let go, and
            // a bare HTTP/1.1 exchange on it: what is timed is the broker's
            // answer, not 1,000 handshakes or an HTTP client's own work.
            let barrier = Arc::new(tokio::sync::Barrier::new(concurrency));
            let waiters: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (barrier, request, address) =
                        (barrier.clone(), request.clone(), address.clone());
                    tokio::spawn(async move {
                        let connection = tokio::net::TcpStream::connect(&address).await;
                        barrier.wait().await;
                        let started = Instant::now();
                        let ok = match connection {
                            Ok(mut connection) => tokio::time::timeout(
                                Duration::from_secs(30),
                                exchange(&mut connection, &request),
                            )
                            .await
                            .is_ok_and(|status| status.is_ok_and(|s| s == 200)),
                            Err(_) => false,
                        };
                        (started.elapsed(), ok)
                    })
                })
                .collect();
            let mut latencies = Vec::with_capacity(concurrency);
            let mut failed = 0;
            for waiter in waiters {
                let (latency, ok) = waiter.await.unwrap();
                latencies.push(latency);
                failed += usize::from(!ok);
            }
            latencies.sort();
            let calls = vendor_calls(&http, &metrics).await - before;
            // The first answer follows the vendor's at once: the rest is how
            // long the other waiters took after it.
            let first = latencies[0];
            let last = *latencies.last().unwrap();
            println!(
                "herd of {concurrency}: vendor calls {calls}, failed {failed}, waiter latency first {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the last {:.1} ms after the first",
                first.as_secs_f64() * 1e3,
                percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                last.as_secs_f64() * 1e3,
                (last - first).as_secs_f64() * 1e3,
            );
        }
        Command::ServiceAccount {
            dir,
            issuer,
            account,
        } => {
            let pem = dir.join("sa-key.pem");
            let der = dir.join("sa-key.der");
            for args in [
                vec!["genrsa", "-out", pem.to_str().unwrap(), "2048"],
                vec![
                    "rsa",
                    "-traditional",
                    "-in",
                    pem.to_str().unwrap(),
                    "-outform",
                    "DER",
                    "-out",
                    der.to_str().unwrap(),
                ],
            ] {
                let status = std::process::Command::new("openssl")
                    .args(&args)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success(), "openssl {args:?}");
            }
            let key = jsonwebtoken::EncodingKey::from_rsa_der(&std::fs::read(&der).unwrap());
            let mut jwk =
                jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256)
                    .unwrap();
            jwk.common.key_id = Some("bench".into());
            let set = jsonwebtoken::jwk::JwkSet { keys: vec![jwk] };
            std::fs::write(dir.join("jwks.json"), serde_json::to_string(&set).unwrap()).unwrap();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let claims = serde_json::json!({
                "iss": issuer, "aud": ["token-broker"], "sub": format!("system:serviceaccount:{account}"),
                "iat": now, "nbf": now, "exp": now + 3600,
            });
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
            header.kid = Some("bench".into());
            let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            std::fs::write(dir.join("sa-token"), token).unwrap();
        }
    }
}
