//! Resident memory of the token cache: RSS with 0, 100k and 1M cached tokens
//! of realistic size (an email of ~20 bytes, a 48-character token), filled
//! through `Broker::lookup` from a source that answers at once; and, with
//! `moka` as argument, the floor moka itself sets.

use std::sync::Arc;

use token_broker::broker::{Broker, FetchFuture, TokenSource};
use token_broker::config::{Settings, Sources};
use token_broker::domain::{Email, Identity, Token, UserType};
use token_broker::telemetry::metrics::Metrics;
use token_broker::upstream::Fetched;

/// The service's allocator (see `src/main.rs`), so the numbers are its own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Answers at once with a token of a real token's size.
struct Immediate;

impl TokenSource for Immediate {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        _: &'a token_broker::upstream::Askers,
    ) -> FetchFuture<'a> {
        let seed = match identity {
            Identity::TeamMember { email, .. } => email.as_str().len(),
            Identity::Customer(id) => id.as_str().len(),
        };
        Box::pin(async move {
            Ok(Fetched {
                token: Token::new(format!("{:048x}", seed)),
                active: true,
            })
        })
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn identity(i: usize) -> Identity {
    Identity::TeamMember {
        email: Email::parse(&format!("user{i}@example.com")).unwrap(),
        user_type: UserType::Agent,
    }
}

/// With `moka` as its argument: moka's own floor instead, a cache of 1M
/// `u64` keys without values, bounded and with a time-to-live as the broker's
/// is, so the broker's bytes per entry can be told from moka's bookkeeping.
/// A process of its own, so neither measurement reuses the other's memory.
async fn moka_floor() {
    let cache: moka::future::Cache<u64, ()> = moka::future::Cache::builder()
        .max_capacity(2_000_000)
        .time_to_live(std::time::Duration::from_secs(3600))
        .build();
    let base = rss_bytes();
    let entries = 1_000_000;
    for key in 0..entries {
        cache.insert(key, ()).await;
    }
    cache.run_pending_tasks().await;
    println!(
        "moka alone, {entries} u64 keys without values: {:.0} bytes per entry",
        (rss_bytes() - base) as f64 / entries as f64
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("moka") {
        return moka_floor().await;
    }
    let mut settings = Settings::load(&Sources::default()).unwrap().cache;
    settings.max_entries = 2_000_000;
    let broker = Broker::new(&settings, Arc::new(Immediate), Arc::new(Metrics::new()));
    let caller: Arc<str> = Arc::from("bench-memory");
    broker.run_pending_tasks().await;
    let base = rss_bytes();
    println!("entries        0: RSS {:7.1} MiB", base as f64 / 1048576.0);
    let mut filled = 0;
    for target in [100_000, 1_000_000] {
        while filled < target {
            broker.lookup(&identity(filled), &caller).await.unwrap();
            filled += 1;
        }
        broker.run_pending_tasks().await;
        let rss = rss_bytes();
        let per_entry = (rss - base) as f64 / target as f64;
        // The bytes the entry must hold anyway: the email and the token.
        let payload = (format!("user{}@example.com", target / 2).len() + 48) as f64;
        println!(
            "entries {target:>8}: RSS {:7.1} MiB, {per_entry:.0} bytes per entry, {:.0} beyond the email and token ({} entries counted)",
            rss as f64 / 1048576.0,
            per_entry - payload,
            broker.entry_count()
        );
    }
}
