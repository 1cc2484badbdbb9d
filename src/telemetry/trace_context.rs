//! The W3C trace context (`traceparent`, `tracestate`) as carried without
//! OpenTelemetry, and its injection into the vendor request either way.

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::exporting;
use super::request::REQUEST;

/// A W3C trace context (`traceparent`, and `tracestate` passed through), as
/// carried without OpenTelemetry: the caller's trace id, or a new one.
#[derive(Debug, Clone)]
pub struct TraceParent {
    pub trace_id: HexId<32>,
    /// This service's span.
    pub span_id: HexId<16>,
    pub(super) flags: HexId<2>,
    pub(super) state: Option<axum::http::HeaderValue>,
}

/// An id as `N` lower-case hex digits, kept inline: a request makes a few.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    /// `text` if it is exactly `N` lower-case hex digits.
    fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; N] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(Self(bytes))
    }

    /// The low `4 * N` bits of `value`.
    pub(super) fn from_bits(mut value: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b'0'; N];
        for digit in text.iter_mut().rev() {
            *digit = DIGITS[(value & 0xf) as usize];
            value >>= 4;
        }
        Self(text)
    }

    /// A random id that is not all zeros (W3C: an invalid id).
    pub(super) fn random() -> Self {
        Self::from_bits(rand::random::<u128>() | 1)
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == b'0')
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl<const N: usize> std::fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for HexId<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl TraceParent {
    /// Continues the caller's `traceparent` (version 00), else starts a trace.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Self {
        let caller = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let mut parts = v.split('-');
                let (Some("00"), Some(trace), Some(parent), Some(flags), None) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    return None;
                };
                let trace = HexId::<32>::parse(trace)?;
                let parent = HexId::<16>::parse(parent)?;
                (!trace.is_zero() && !parent.is_zero())
                    .then_some((trace, HexId::<2>::parse(flags)?))
            });
        let (trace_id, flags, state) = match caller {
            Some((trace, flags)) => (trace, flags, headers.get("tracestate").cloned()),
            None => (HexId::random(), HexId(*b"00"), None),
        };
        Self {
            trace_id,
            span_id: HexId::random(),
            flags,
            state,
        }
    }
}

/// Adds `traceparent` (and `tracestate`) for an outgoing request: from the
/// current span when exporting, else from the request's `TraceParent` with a
/// new span id for the call. Never `baggage`.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    if exporting() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(
                &tracing::Span::current().context(),
                &mut opentelemetry_http::HeaderInjector(headers),
            );
        });
        return;
    }
    let _ = REQUEST.try_with(|request| {
        let Some(parent) = &request.trace else {
            return;
        };
        let value = format!(
            "00-{}-{}-{}",
            parent.trace_id,
            HexId::<16>::random(),
            parent.flags
        );
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
            headers.insert("traceparent", value);
        }
        if let Some(state) = &parent.state {
            headers.insert("tracestate", state.clone());
        }
    });
}

/// Copies the OpenTelemetry ids of `span` into its `trace_id` and `span_id`
/// fields, so every log event inside it carries them (when exporting; else
/// the log lines have them from the request's `TraceParent`).
pub fn record_trace_ids(span: &tracing::Span) {
    if !exporting() {
        return;
    }
    let context = span.context();
    let span_ref = context.span();
    let ids = span_ref.span_context();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::RequestContext;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    axum::http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn hex_ids_are_fixed_width_lower_case() {
        assert_eq!(HexId::<16>::from_bits(0xab), "00000000000000ab");
        assert_eq!(HexId::<2>::from_bits(u128::MAX), "ff");
        assert_eq!(HexId::<4>::parse("0a1f"), Some(HexId(*b"0a1f")));
        assert_eq!(HexId::<4>::parse("0A1F"), None);
        assert_eq!(HexId::<4>::parse("0a1"), None);
    }

    #[tokio::test]
    async fn a_callers_trace_is_continued_and_anything_else_starts_a_new_one() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let given = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
            ("baggage", "secret=1"),
        ]);
        let parent = TraceParent::from_headers(&given);
        assert_eq!(parent.trace_id, trace);
        assert_ne!(parent.span_id, "00f067aa0ba902b7");
        let mut out = reqwest::header::HeaderMap::new();
        let request = RequestContext::new(
            "GET /v1/tokens",
            "/v1/tokens",
            HeaderValue::from_static("r-1"),
            Some(parent),
        );
        request.scope(async { inject_current(&mut out) }).await;
        let sent = out["traceparent"].to_str().unwrap();
        assert!(
            sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-01"),
            "{sent}"
        );
        assert_eq!(out["tracestate"], "vendor=x");
        assert!(!out.contains_key("baggage"));

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "garbage",
        ] {
            let mut map = HeaderMap::new();
            map.insert("traceparent", HeaderValue::from_static(bad));
            let fresh = TraceParent::from_headers(&map);
            assert_ne!(fresh.trace_id, trace, "{bad}");
            let id = fresh.trace_id.as_str();
            assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!fresh.trace_id.is_zero());
        }
        let mut none = reqwest::header::HeaderMap::new();
        inject_current(&mut none);
        assert!(none.is_empty(), "outside a request nothing is invented");
    }
}
