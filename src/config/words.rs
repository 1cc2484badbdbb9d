//! Configuration errors in the words of the file, not of the code: a key
//! path as it is written (`clients[0].scopes[0]`), durations shown with the
//! format they take, enums with the values they allow, and no serde or Rust
//! type names. Durations are never secret, so the refused value is shown;
//! any other refused value is not (it may be a secret in the wrong place).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// `a.b[0].c`, as the key is written in TOML.
pub(super) fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// What a duration looks like, said in every duration error.
const DURATION_FORMAT: &str =
    "must be a duration: a number and a unit (ms, s, m, h, d), such as `250ms`, `10m` or `1h30m`";

/// `#[serde(with = "words::duration")]`: a human duration (`"10m"`), with an
/// error that shows the value and the format.
pub(super) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime::format_duration(*value).to_string().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(DURATION_FORMAT)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text.trim()).map_err(|_| {
                E::custom(format!(
                    "{DURATION_FORMAT}; got `{}`",
                    text.replace('`', "'")
                ))
            })
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{DURATION_FORMAT}; got the number `{number}`, which has no unit (`{number}s` is {number} seconds)"
            )))
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(number).unwrap_or(i64::MAX))
        }

        fn visit_f64<E: de::Error>(self, number: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{DURATION_FORMAT}; got the number `{number}`, which has no unit"
            )))
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<Duration, E> {
            Err(E::custom(format!("{DURATION_FORMAT}; got `{value}`")))
        }
    }
}

/// One of `choices` by its exact spelling; anything else is refused with
/// the list (and without the value, which is not shown). Every enum of the
/// configuration deserializes through this, so no derived enum's message
/// ("variant", "enum …") reaches a user.
pub(crate) fn one_of<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    choices: &'static [(&'static str, T)],
) -> Result<T, D::Error> {
    struct Choices<T: 'static>(&'static [(&'static str, T)]);

    impl<T: Copy> Visitor<'_> for Choices<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&allowed(self.0))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            self.0
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| E::custom(allowed(self.0)))
        }
    }

    d.deserialize_str(Choices(choices))
}

fn allowed<T>(choices: &[(&str, T)]) -> String {
    let names: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    format!("must be one of {}", names.join(", "))
}

/// Serde's own phrasing, for the errors no field of ours words itself
/// (a number where a list belongs, a missing or unknown key), in the file's
/// words. Applied before quoted text is removed.
pub(super) fn in_plain_words(message: &str) -> String {
    // The config crate names the key again at the end; the path says it first.
    let message = match message.rfind(" for key `") {
        Some(at) if message.ends_with('`') => &message[..at],
        _ => message,
    };
    if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        let found = if found.contains("`-") {
            "a negative number".to_owned()
        } else {
            kind(found)
        };
        return format!("must be {}; got {found}", kind(expected));
    }
    if let Some((_, expected)) = message
        .strip_prefix("invalid value: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        return format!("must be {}", kind(expected));
    }
    if let Some(quoted) = message.strip_prefix("missing configuration field \"") {
        let path = quoted.trim_end_matches('"');
        let field = path.rsplit(['.', ']']).next().unwrap_or(path);
        return format!("needs the key `{field}`");
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return format!("needs the key `{field}`");
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // The key path already ends with the unknown field.
        let expected = rest.split_once('`').map_or("", |(_, expected)| expected);
        let known = expected
            .strip_prefix(", expected one of ")
            .or_else(|| expected.strip_prefix(", expected "))
            .map(|list| format!("; the keys here are {list}"))
            .unwrap_or_default();
        return format!(
            "is not a known key (unknown keys are refused, so a typo is caught){known}"
        );
    }
    message.to_owned()
}

/// A serde "expected" or "found" phrase as a user would say it.
fn kind(phrase: &str) -> String {
    let phrase = phrase.trim();
    let bare = phrase
        .strip_prefix("an ")
        .or_else(|| phrase.strip_prefix("a "))
        .unwrap_or(phrase);
    let words = match bare {
        p if p.starts_with("sequence") || p.starts_with("array") => "a list",
        p if p.starts_with("map") || p.starts_with("struct ") || p.starts_with("table") => {
            "a table of keys"
        }
        p if p.contains("boolean") || p == "bool" => "`true` or `false`",
        p if p.contains("unsigned")
            || ["u8", "u16", "u32", "u64", "usize", "nonzero"]
                .iter()
                .any(|t| p.starts_with(t)) =>
        {
            "a whole number (0 or more)"
        }
        p if p.contains("integer")
            || ["i8", "i16", "i32", "i64"].iter().any(|t| p.starts_with(t)) =>
        {
            "a whole number"
        }
        p if p.starts_with("f32") || p.starts_with("f64") || p.starts_with("floating point") => {
            "a number"
        }
        p if p.starts_with("string") => "a string",
        p if p.starts_with("unit") || p.starts_with("option") => "a value",
        p if p.starts_with("char") => "one character",
        _ => return phrase.replace("enum ", "").to_owned(),
    };
    words.to_owned()
}
