//! The ceiling of the stack: axum and a moka lookup, nothing else (no auth,
//! metrics or logs). `bench/run` measures it like every other target.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use moka::sync::Cache;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("usage: bench-ceiling ADDR KEYS");
    let keys: usize = args.next().expect("KEYS").parse().unwrap();
    let cache: Arc<Cache<String, Arc<str>>> = Arc::new(Cache::new(keys as u64 * 2));
    for i in 0..keys {
        let body = format!(
            r#"{{"success":true,"message":"","data":{{"permanentToken":{{"key":"{:048x}","active":true}}}},"code":200}}"#,
            i
        );
        cache.insert(
            format!("email=user{i}%40example.com&type=AGENT"),
            Arc::from(body),
        );
    }
    let app = axum::Router::new()
        .route(
            "/ext/get-user-token",
            get(
                |State(cache): State<Arc<Cache<String, Arc<str>>>>, RawQuery(q): RawQuery| async move {
                    match cache.get(q.as_deref().unwrap_or_default()) {
                        Some(body) => (
                            [(header::CONTENT_TYPE, "application/json")],
                            body.to_string(),
                        )
                            .into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .with_state(cache);
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
