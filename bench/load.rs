//! Load helpers for `bench/run`: warm every key, fire a cold herd, make a
//! service-account token. Loopback only; every run is bounded in time.

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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    match Cli::parse().command {
        Command::Warm {
            url,
            bearer,
            keys,
            concurrency,
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
            // One connection per waiter, opened before the herd is let go.
            let barrier = Arc::new(tokio::sync::Barrier::new(concurrency));
            let target = format!("{url}/ext/get-user-token?email={email}&type=AGENT");
            let waiters: Vec<_> = (0..concurrency)
                .map(|_| {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap();
                    let barrier = barrier.clone();
                    let target = target.clone();
                    let bearer = bearer.clone();
                    let opening = format!("{url}/openapi.json");
                    tokio::spawn(async move {
                        // The connection is opened (and kept alive) first, so
                        // what is timed is the herd, not 1,000 handshakes.
                        let _ = client.get(&opening).send().await.map(|r| r.bytes());
                        barrier.wait().await;
                        let started = Instant::now();
                        let ok = client
                            .get(&target)
                            .bearer_auth(&bearer)
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
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
            println!(
                "herd of {concurrency}: vendor calls {calls}, failed {failed}, waiter latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                latencies.last().unwrap().as_secs_f64() * 1e3,
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
