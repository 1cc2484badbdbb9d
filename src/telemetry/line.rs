//! A log line written by hand rather than by a `tracing` layer, in the
//! configured format: the audit trail's, whose request waits for the write
//! of its line and so must hold the line itself (a layer's write cannot
//! answer the one who logged).
//!
//! JSON lines have the shape of every other line (`timestamp`, `level`,
//! `message`, the fields, `target`); pretty lines are one line each:
//! `2026-12-04T12:00:00.000000Z  INFO audit: token issued, outcome: issued, …`.
//! An absent field is left out, as `tracing` leaves out an empty `Option`.

use std::time::SystemTime;

use super::escape::{escape_into, push_json_str};
use super::json::{name_target, open_line, push_timestamp};
use crate::config::LogFormat;

/// One line being written into `out` (cleared first).
pub struct Line<'a> {
    out: &'a mut String,
    format: LogFormat,
    target: &'static str,
}

impl<'a> Line<'a> {
    /// Starts an `INFO` line of `target` saying `message`.
    pub fn info(
        out: &'a mut String,
        format: LogFormat,
        target: &'static str,
        message: &str,
    ) -> Self {
        out.clear();
        match format {
            LogFormat::Json => {
                open_line(out, &tracing::Level::INFO);
                out.push_str(",\"message\":");
                push_json_str(out, message);
            }
            LogFormat::Pretty => {
                push_timestamp(out, SystemTime::now());
                out.push_str("  INFO ");
                out.push_str(target);
                out.push_str(": ");
                escape_into(out, message);
            }
        }
        Self {
            out,
            format,
            target,
        }
    }

    fn key(&mut self, key: &str) {
        match self.format {
            LogFormat::Json => {
                self.out.push_str(",\"");
                self.out.push_str(key);
                self.out.push_str("\":");
            }
            LogFormat::Pretty => {
                self.out.push_str(", ");
                self.out.push_str(key);
                self.out.push_str(": ");
            }
        }
    }

    /// A text field; `key` is a plain name, written as it is.
    pub fn text(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            match self.format {
                LogFormat::Json => push_json_str(self.out, value),
                LogFormat::Pretty => escape_into(self.out, value),
            }
        }
        self
    }

    pub fn number(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            self.out.push_str(itoa::Buffer::new().format(value));
        }
        self
    }

    pub fn flag(&mut self, key: &str, value: Option<bool>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            self.out.push_str(if value { "true" } else { "false" });
        }
        self
    }

    /// Ends the line, newline included.
    pub fn end(self) {
        if self.format == LogFormat::Json {
            name_target(self.out, self.target);
            self.out.push('}');
        }
        self.out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: LogFormat) -> String {
        let mut out = String::from("left over");
        let mut line = Line::info(&mut out, format, "audit", "token issued");
        line.text("outcome", Some("issued"))
            .number("status", Some(200))
            .text("caller", None)
            .flag("active", Some(true))
            .text("note", Some("a \"quoted\"\nvalue"));
        line.end();
        out
    }

    #[test]
    fn a_json_line_is_one_object_with_the_shape_of_the_others() {
        let text = line(LogFormat::Json);
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["message"], "token issued");
        assert_eq!(event["outcome"], "issued");
        assert_eq!(event["status"], 200);
        assert_eq!(event["active"], true);
        assert_eq!(event["note"], "a \"quoted\"\nvalue");
        assert_eq!(event["target"], "audit");
        assert!(event.get("caller").is_none(), "an absent field is left out");
        assert!(event["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_pretty_line_is_one_line_whatever_its_values_hold() {
        let text = line(LogFormat::Pretty);
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.contains(
                "  INFO audit: token issued, outcome: issued, status: 200, active: true, note: a \\\"quoted\\\"\\nvalue\n"
            ),
            "{text}"
        );
    }
}
