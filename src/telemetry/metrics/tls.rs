//! The API listener's TLS metrics, registered only when it serves HTTPS, so
//! a plaintext replica never looks like one whose certificate expired.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::ResultLabels;

/// Certificate expiry, reloads and handshakes.
#[derive(Default)]
pub struct TlsMetrics {
    /// The serving certificate's `notAfter`, Unix seconds.
    pub certificate_expiry: Gauge,
    reloads: Family<ResultLabels, Counter>,
    handshakes: Family<ResultLabels, Counter>,
}

impl TlsMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the API listener's serving certificate, Unix seconds",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "tls_reloads",
            "Re-reads of the certificate, key and client CA files (ok, or error: the old pair stays in use)",
            self.reloads.clone(),
        );
        for result in ["ok", "error"] {
            let _ = self.reloads.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the API listener by result (error: failed, refused or timed out)",
            self.handshakes.clone(),
        );
        for result in ["ok", "error"] {
            let _ = self.handshakes.get_or_create(&ResultLabels { result });
        }
    }

    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels { result: result(ok) })
            .inc();
    }

    pub fn handshake(&self, ok: bool) {
        self.handshakes
            .get_or_create(&ResultLabels { result: result(ok) })
            .inc();
    }
}

fn result(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}
