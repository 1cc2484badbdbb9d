//! The Prometheus metrics the service promises (docs/OPERATIONS.md, "Metrics"), in one
//! registry owned by the application (no global recorder), encoded on
//! `/metrics`.
//!
//! Labels are closed sets or configured client names: never an email, a
//! token or a key.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::telemetry::process::ProcessCollector;

mod histogram;
mod labels;
mod tls;

pub use histogram::LatencyHistogram;
use histogram::latency_histogram;
pub use tls::TlsMetrics;

pub use labels::{
    BuildLabels, CallerLabels, ClientLabels, ClientResult, HttpLabels, ListenerLabels, LogDrop,
    Lookup, OperationLabels, OutcomeLabels, ReasonLabels, ResultLabels, RouteLabels,
    ServiceAccountResult, SharedCacheOp, SharedCacheResult, UpstreamOutcome, ValueRefusal,
};

/// Log lines dropped, by reason: process-wide, as stdout is, so the log
/// writer counts them before any registry exists.
static LOG_LINES_DROPPED: std::sync::LazyLock<Family<ReasonLabels, Counter>> =
    std::sync::LazyLock::new(|| {
        let family = Family::default();
        for reason in LogDrop::ALL {
            let _ = family.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        family
    });

/// Counts `lines` dropped for `reason`.
pub fn log_lines_dropped(reason: LogDrop, lines: u64) {
    LOG_LINES_DROPPED
        .get_or_create(&ReasonLabels {
            reason: reason.as_str(),
        })
        .inc_by(lines);
}

/// Lines dropped for `reason` since the process started.
pub fn log_lines_dropped_so_far(reason: LogDrop) -> u64 {
    LOG_LINES_DROPPED
        .get_or_create(&ReasonLabels {
            reason: reason.as_str(),
        })
        .get()
}

type HistogramFamily<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

/// Statuses whose `http_requests_total` counters are resolved once per route.
const KNOWN_STATUSES: [u16; 16] = [
    200, 204, 400, 401, 403, 404, 405, 409, 414, 429, 431, 500, 502, 503, 504, 505,
];

/// A route's counters and histogram, resolved once so a request takes no
/// family lock.
struct RouteHandles {
    route: &'static str,
    duration: LatencyHistogram,
    requests: [Counter; KNOWN_STATUSES.len()],
}

/// `client_requests_total` of one configured caller, one counter per result.
struct ClientHandles {
    name: Arc<str>,
    results: [Counter; ClientResult::ALL.len()],
}

/// Which optional series a replica exports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// Redis is configured: the `shared_cache_*` series.
    pub shared_cache: bool,
    /// The API listener serves HTTPS: the `tls_*` series.
    pub tls: bool,
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub cache_lookups: Family<ResultLabels, Counter>,
    pub cache_entries: Gauge,
    pub upstream_requests: Family<OutcomeLabels, Counter>,
    pub upstream_duration: LatencyHistogram,
    pub upstream_circuit_open: Gauge,
    pub upstream_queue_wait: HistogramFamily<CallerLabels>,
    pub upstream_slots_in_use: Family<CallerLabels, Gauge>,
    pub client_requests: Family<ClientLabels, Counter>,
    pub partner_key_reloads: Family<ResultLabels, Counter>,
    pub connections_shed: Family<ListenerLabels, Counter>,
    pub connections_refused_per_peer: Family<ListenerLabels, Counter>,
    pub service_account_tokens: Family<ResultLabels, Counter>,
    pub shared_cache_up: Gauge,
    pub shared_cache_operations: Family<OperationLabels, Counter>,
    pub shared_cache_subscribed: Gauge,
    pub shared_cache_subscription_losses: Counter,
    pub shared_cache_canary_misses: Counter,
    pub shared_cache_rollbacks: Counter,
    pub shared_cache_invalidations_heard: Counter,
    pub shared_cache_values_refused: Family<ReasonLabels, Counter>,
    pub tls: TlsMetrics,
    routes: OnceLock<Vec<RouteHandles>>,
    clients: OnceLock<Vec<ClientHandles>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics of a replica without a shared cache or TLS.
    pub fn new() -> Self {
        Self::build(Features::default())
    }

    /// All metrics; the `shared_cache_*` series only when Redis is configured,
    /// so a replica without it never looks like one whose Redis is down, and
    /// the `tls_*` series only when the API listener serves HTTPS.
    pub fn build(Features { shared_cache, tls }: Features) -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("token_broker");
        registry.register(
            "build",
            "Version and commit of the running binary",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("TOKEN_BROKER_COMMIT"),
            }),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by route and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "API request latency by route",
            http_duration.clone(),
        );
        let cache_lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Token lookups by cache result (hit, miss, stale, negative)",
            cache_lookups.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Tokens held in the in-memory cache",
            cache_entries.clone(),
        );
        let upstream_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests to the BotPenguin API by outcome",
            upstream_requests.clone(),
        );
        let upstream_duration = latency_histogram();
        registry.register(
            "upstream_request_duration_seconds",
            "Latency of requests to the BotPenguin API",
            upstream_duration.clone(),
        );
        let upstream_circuit_open = Gauge::default();
        registry.register(
            "upstream_circuit_open",
            "1 while the circuit to the BotPenguin API is open, else 0",
            upstream_circuit_open.clone(),
        );
        let upstream_queue_wait: HistogramFamily<CallerLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_queue_wait_seconds",
            "Time a caller's vendor fetch waited for one of the upstream.max_in_flight slots (shared in turn among callers)",
            upstream_queue_wait.clone(),
        );
        let upstream_slots_in_use = Family::<CallerLabels, Gauge>::default();
        registry.register(
            "upstream_slots_in_use",
            "Vendor slots (upstream.max_in_flight) held now, by the caller whose fetch holds them",
            upstream_slots_in_use.clone(),
        );
        let client_requests = Family::<ClientLabels, Counter>::default();
        registry.register(
            "client_requests",
            "Authenticated requests by caller and result",
            client_requests.clone(),
        );
        let partner_key_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "partner_key_reloads",
            "Re-reads of the partner key file (changed, unchanged, failed)",
            partner_key_reloads.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines not written, by reason: the log queue was full (queue_full, audit_refused: the request failed with 503) or stdout failed (write_failed)",
            LOG_LINES_DROPPED.clone(),
        );
        let connections_shed = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_shed",
            "Connections refused with 503 because server.max_connections were open",
            connections_shed.clone(),
        );
        let connections_refused_per_peer = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_refused_per_peer",
            "Connections refused with 503 because their peer address held server.max_connections_per_peer",
            connections_refused_per_peer.clone(),
        );
        let _ = connections_refused_per_peer.get_or_create(&ListenerLabels { listener: "api" });
        let service_account_tokens = Family::<ResultLabels, Counter>::default();
        registry.register(
            "service_account_tokens",
            "Service-account bearer tokens: verified (a signature check), cached (seen before), or rejected_<reason>",
            service_account_tokens.clone(),
        );
        for result in ServiceAccountResult::ALL {
            let _ = service_account_tokens.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        let shared_cache_up = Gauge::default();
        let shared_cache_operations = Family::<OperationLabels, Counter>::default();
        let shared_cache_subscribed = Gauge::default();
        let shared_cache_subscription_losses = Counter::default();
        let shared_cache_canary_misses = Counter::default();
        let shared_cache_rollbacks = Counter::default();
        let shared_cache_invalidations_heard = Counter::default();
        let shared_cache_values_refused = Family::<ReasonLabels, Counter>::default();
        if shared_cache {
            registry.register(
                "shared_cache_subscribed",
                "1 while this replica hears the fleet's invalidations (its own canary comes back on its subscription), else 0",
                shared_cache_subscribed.clone(),
            );
            registry.register(
                "shared_cache_subscription_losses",
                "Invalidation subscriptions lost, found deaf, or sent a message that does not open; each drops every local entry",
                shared_cache_subscription_losses.clone(),
            );
            registry.register(
                "shared_cache_canary_misses",
                "Times this replica's canary did not come back on its subscription in time (counted among the losses)",
                shared_cache_canary_misses.clone(),
            );
            registry.register(
                "shared_cache_rollbacks",
                "Times this replica saw Redis hold less than it knew (a restore, a lagging failover, a flush, a hand-made write) and raised the fleet's epoch",
                shared_cache_rollbacks.clone(),
            );
            registry.register(
                "shared_cache_invalidations_heard",
                "Invalidation messages this replica heard from the fleet (its own included)",
                shared_cache_invalidations_heard.clone(),
            );
            registry.register(
                "shared_cache_values_refused",
                "Values read from the shared cache and refused: sealed in a generation older than an invalidation or in an earlier epoch of the fleet, or not decryptable",
                shared_cache_values_refused.clone(),
            );
            for reason in ValueRefusal::ALL {
                let _ = shared_cache_values_refused.get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                });
            }
            registry.register(
                "shared_cache_up",
                "1 while the shared cache (Redis) answers, else 0",
                shared_cache_up.clone(),
            );
            registry.register(
                "shared_cache_operations",
                "Calls to the shared cache (Redis) by operation and result",
                shared_cache_operations.clone(),
            );
            for op in SharedCacheOp::ALL {
                for result in SharedCacheResult::ALL {
                    let _ = shared_cache_operations.get_or_create(&OperationLabels {
                        op: op.as_str(),
                        result: result.as_str(),
                    });
                }
            }
        }
        let tls_metrics = TlsMetrics::default();
        if tls {
            tls_metrics.register(registry);
        }
        for result in ["changed", "unchanged", "failed"] {
            let _ = partner_key_reloads.get_or_create(&ResultLabels { result });
        }
        for listener in ["api", "admin"] {
            let _ = connections_shed.get_or_create(&ListenerLabels { listener });
        }
        // Series dashboards and alerts query are present, at zero, from the
        // first scrape (routes: `register_routes`).
        for outcome in UpstreamOutcome::ALL {
            let _ = upstream_requests.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for result in Lookup::ALL {
            let _ = cache_lookups.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        Self {
            registry: root,
            http_requests,
            http_duration,
            cache_lookups,
            cache_entries,
            upstream_requests,
            upstream_duration,
            upstream_circuit_open,
            upstream_queue_wait,
            upstream_slots_in_use,
            client_requests,
            partner_key_reloads,
            connections_shed,
            connections_refused_per_peer,
            service_account_tokens,
            shared_cache_up,
            shared_cache_operations,
            shared_cache_subscribed,
            shared_cache_subscription_losses,
            shared_cache_canary_misses,
            shared_cache_rollbacks,
            shared_cache_invalidations_heard,
            shared_cache_values_refused,
            tls: tls_metrics,
            routes: OnceLock::new(),
            clients: OnceLock::new(),
        }
    }

    pub fn service_account_token(&self, result: ServiceAccountResult) {
        self.service_account_tokens
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    pub fn shared_cache_value_refused(&self, reason: ValueRefusal) {
        self.shared_cache_values_refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn shared_cache_operation(&self, op: SharedCacheOp, result: SharedCacheResult) {
        self.shared_cache_operations
            .get_or_create(&OperationLabels {
                op: op.as_str(),
                result: result.as_str(),
            })
            .inc();
    }

    /// Starts the series of each route at zero and resolves their handles.
    pub fn register_routes(&self, routes: &[&'static str]) {
        let handles = routes
            .iter()
            .map(|&route| {
                let _ = self
                    .http_requests
                    .get_or_create(&HttpLabels { route, status: 200 });
                RouteHandles {
                    route,
                    duration: self
                        .http_duration
                        .get_or_create(&RouteLabels { route })
                        .clone(),
                    requests: KNOWN_STATUSES.map(|status| {
                        self.http_requests
                            .get_or_create(&HttpLabels { route, status })
                            .clone()
                    }),
                }
            })
            .collect();
        let _ = self.routes.set(handles);
    }

    /// Counts one API request and its latency.
    pub fn http_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        let known = self
            .routes
            .get()
            .and_then(|routes| routes.iter().find(|r| r.route == route));
        let Some(handles) = known else {
            self.http_duration
                .get_or_create(&RouteLabels { route })
                .observe(elapsed);
            self.http_requests
                .get_or_create(&HttpLabels { route, status })
                .inc();
            return;
        };
        handles.duration.observe(elapsed);
        match KNOWN_STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                handles.requests[i].inc();
            }
            None => {
                self.http_requests
                    .get_or_create(&HttpLabels { route, status })
                    .inc();
            }
        }
    }

    /// Starts the per-caller series at zero for each configured caller and
    /// resolves their handles (the series that dashboards and alerts read
    /// exist from the first scrape).
    pub fn register_clients<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let handles = names
            .into_iter()
            .map(|client| {
                let name: Arc<str> = Arc::from(client);
                let caller = CallerLabels {
                    client: name.clone(),
                };
                let _ = self.upstream_slots_in_use.get_or_create(&caller);
                let _ = self.upstream_queue_wait.get_or_create(&caller);
                ClientHandles {
                    results: ClientResult::ALL.map(|result| {
                        self.client_requests
                            .get_or_create(&ClientLabels {
                                client: name.clone(),
                                result: result.as_str(),
                            })
                            .clone()
                    }),
                    name,
                }
            })
            .collect();
        let _ = self.clients.set(handles);
    }

    /// How long `client`'s fetch waited for a vendor slot.
    pub fn upstream_queue_wait(&self, client: &Arc<str>, waited: Duration) {
        self.upstream_queue_wait
            .get_or_create(&CallerLabels {
                client: client.clone(),
            })
            .observe(waited);
    }

    /// Vendor slots `client`'s fetches hold now.
    pub fn upstream_slots_in_use(&self, client: &Arc<str>, held: i64) {
        self.upstream_slots_in_use
            .get_or_create(&CallerLabels {
                client: client.clone(),
            })
            .set(held);
    }

    /// Counts one vendor request, or a fetch refused before reaching the vendor.
    pub fn upstream_outcome(&self, outcome: UpstreamOutcome) {
        self.upstream_requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn cache_lookup(&self, result: Lookup) {
        self.cache_lookups
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    pub fn client_request(&self, client: &Arc<str>, result: ClientResult) {
        let resolved = self.clients.get().and_then(|clients| {
            let handles = clients
                .iter()
                .find(|c| Arc::ptr_eq(&c.name, client) || c.name == *client)?;
            Some(&handles.results[result.index()])
        });
        match resolved {
            Some(counter) => {
                counter.inc();
            }
            None => {
                self.client_requests
                    .get_or_create(&ClientLabels {
                        client: client.clone(),
                        result: result.as_str(),
                    })
                    .inc();
            }
        }
    }

    /// The registry in the Prometheus text format 0.0.4, which every scraper
    /// (and `curl`) reads.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: counter families are
/// named with their `_total` samples, info families become `_info` gauges,
/// and the `# UNIT` and `# EOF` lines, which 0.0.4 lacks, go.
fn openmetrics_to_prometheus(text: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let Some((name, kind)) = rest.split_once(' ') else {
            continue;
        };
        let family = match kind {
            "counter" => (format!("{name}_total"), "counter"),
            "info" => (format!("{name}_info"), "gauge"),
            "unknown" => (name.to_owned(), "untyped"),
            other => (name.to_owned(), other),
        };
        renamed.insert(name.to_owned(), family);
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# TYPE ", "# HELP "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new_name, kind)) if prefix == "# TYPE " => {
                        out.push_str(&format!("# TYPE {new_name} {kind}"));
                    }
                    Some((new_name, _)) => out.push_str(&format!("# HELP {new_name} {tail}")),
                    None => out.push_str(line),
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec() {
        let m = Metrics::new();
        m.http_requests
            .get_or_create(&HttpLabels {
                route: "/v1/tokens",
                status: 200,
            })
            .inc();
        m.upstream_requests
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        m.client_request(&Arc::from("app"), ClientResult::Ok);
        m.http_duration
            .get_or_create(&RouteLabels {
                route: "/v1/tokens",
            })
            .observe(Duration::from_millis(1));
        let text = m.encode();
        for name in [
            "token_broker_http_requests_total{route=\"/v1/tokens\",status=\"200\"} 1",
            "token_broker_http_request_duration_seconds_bucket{",
            "token_broker_cache_lookups_total{result=\"negative\"} 0",
            "token_broker_cache_entries 0",
            "token_broker_upstream_requests_total{outcome=\"ok\"} 1",
            "token_broker_upstream_request_duration_seconds_count 0",
            "token_broker_client_requests_total{client=\"app\",result=\"ok\"} 1",
            "token_broker_build_info{version=\"",
            "token_broker_upstream_circuit_open 0",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn prometheus_text_names_families_as_their_samples() {
        let m = Metrics::new();
        m.register_routes(&["/v1/tokens"]);
        m.cache_lookup(Lookup::Hit);
        let text = m.encode_prometheus();
        for line in [
            "# TYPE token_broker_cache_lookups_total counter",
            "token_broker_cache_lookups_total{result=\"hit\"} 1",
            "# TYPE token_broker_build_info gauge",
            "# TYPE token_broker_http_request_duration_seconds histogram",
            "# TYPE token_broker_cache_entries gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.contains("# HELP token_broker_cache_lookups_total Token lookups"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(!text.contains(" info\n") && !text.contains(" unknown\n"));
    }
}
