//! The W3C trace context (`traceparent`, `tracestate`) as carried without
//! OpenTelemetry, and its injection into the vendor request either way.

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A W3C trace context (`traceparent`, and `tracestate` passed through), as
/// carried without OpenTelemetry: the caller's trace id, or a new one.
#[derive(Debug, Clone)]
pub struct TraceParent {
    pub trace_id: HexId<32>,
    /// This service's span.
    pub span_id: HexId<16>,
    flags: HexId<2>,
    state: Option<axum::http::HeaderValue>,
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

impl TraceParent {
    /// Adds `traceparent`, for a child of this context with a new span id,
    /// and `tracestate` as the caller sent it. Never `baggage`.
    pub fn inject_child(&self, headers: &mut reqwest::header::HeaderMap) {
        let value = format!(
            "00-{}-{}-{}",
            self.trace_id,
            HexId::<16>::random(),
            self.flags
        );
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
            headers.insert("traceparent", value);
        }
        if let Some(state) = &self.state {
            headers.insert("tracestate", state.clone());
        }
    }
}

/// Copies the OpenTelemetry ids of `span` into its `trace_id` and `span_id`
/// fields, so every log event inside it carries them (when exporting; else
/// the log lines have them from the request's `TraceParent`).
pub fn record_trace_ids(span: &tracing::Span) {
    // Without export no OpenTelemetry layer is installed, and the context is empty.
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

    #[test]
    fn hex_ids_are_fixed_width_lower_case() {
        assert_eq!(HexId::<16>::from_bits(0xab), "00000000000000ab");
        assert_eq!(HexId::<2>::from_bits(u128::MAX), "ff");
        assert_eq!(HexId::<4>::parse("0a1f"), Some(HexId(*b"0a1f")));
        assert_eq!(HexId::<4>::parse("0A1F"), None);
        assert_eq!(HexId::<4>::parse("0a1"), None);
    }
}
