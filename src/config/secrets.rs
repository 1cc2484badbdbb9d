//! Secrets in configuration: reading secret files, and keeping secrets (and
//! any configured text) out of what is displayed or logged.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;
use url::Url;

use super::ConfigError;

/// Reads the partner key file.
pub fn read_key_file(path: &Path) -> Result<SecretString, ConfigError> {
    read_secret_file("upstream.partner_key_file", path)
}

/// Reads the secret file that configuration `key` names, trimming the
/// whitespace editors and `echo` leave behind.
pub fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = SecretString::from(text.trim());
    drop(SecretString::from(text));
    if secret.expose_secret().is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

/// A secret shown as `[REDACTED]`.
pub(super) fn redacted<S: Serializer>(
    value: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[REDACTED]"),
        None => s.serialize_none(),
    }
}

/// A URL with its password, if any, replaced by `[REDACTED]`.
pub(super) fn redacted_url<S: Serializer>(value: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(url) if url.password().is_some() => {
            let mut shown = url.clone();
            let _ = shown.set_password(Some("[REDACTED]"));
            s.serialize_str(shown.as_str())
        }
        Some(url) => s.serialize_str(url.as_str()),
        None => s.serialize_none(),
    }
}

/// What went wrong reading a layer, without the text of the offending line
/// (toml's message quotes it, and it may hold an inline secret).
pub(super) fn describe_source_error(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::FileParse { uri, cause } => {
            let text = cause.to_string();
            // toml: "TOML parse error at line L, column C", the quoted source
            // line and a caret, then what is wrong.
            let position = text.lines().next().unwrap_or_default();
            let problem = text
                .lines()
                .skip(1)
                .filter(|line| !line.contains('|') && !line.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ");
            format!(
                "{} is not valid TOML: {position}: {}",
                uri.as_deref().unwrap_or("a configuration layer"),
                without_quoted_text(&problem)
            )
        }
        other => without_quoted_text(&other.to_string()),
    }
}

/// Replaces every double-quoted part of a message (serde quotes the value it
/// refused) so no configured text, secret or not, is printed.
pub(super) fn without_quoted_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let (mut quoted, mut in_backticks) = (false, false);
    for c in message.chars() {
        match c {
            // Backticks name syntax or keys (`"`, `cache.ttl`): kept.
            '`' if !quoted => {
                in_backticks = !in_backticks;
                out.push(c);
            }
            '"' if !in_backticks => {
                if !quoted {
                    out.push_str("(value not shown)");
                }
                quoted = !quoted;
            }
            _ if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}
