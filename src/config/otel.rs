//! The standard `OTEL_*` variables this service reads itself: whether traces
//! are exported, over which protocol, and whether a service name is given.
//! They come with the rest of the configuration (`Sources::otel`), so a
//! test can set them without touching the process environment. (The
//! OpenTelemetry builders read the ones they own, such as headers and the
//! sampler, from the process environment themselves.)

use std::collections::BTreeMap;

/// The `OTEL_*` variables, each non-empty one by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtelSettings(BTreeMap<String, String>);

impl OtelSettings {
    /// From `OTEL_*` names and values; others and empty values are ignored.
    pub fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a String, &'a String)>) -> Self {
        Self(
            vars.into_iter()
                .filter(|(name, value)| name.starts_with("OTEL_") && !value.trim().is_empty())
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        )
    }

    /// The value of `name`, if set and not blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Whether an OTLP endpoint is given: then traces are exported.
    pub fn endpoint_set(&self) -> bool {
        self.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            || self.get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_blank_otel_variables_count() {
        let vars: Vec<(String, String)> = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
            ("OTEL_SERVICE_NAME", "svc"),
            ("PATH", "/bin"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let otel = OtelSettings::from_vars(vars.iter().map(|(n, v)| (n, v)));
        assert!(!otel.endpoint_set(), "a blank endpoint is none");
        assert_eq!(otel.get("OTEL_SERVICE_NAME"), Some("svc"));
        assert_eq!(otel.get("PATH"), None);
        let traces = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string(),
            "http://c:4318".to_string(),
        )];
        assert!(OtelSettings::from_vars(traces.iter().map(|(n, v)| (n, v))).endpoint_set());
    }
}
