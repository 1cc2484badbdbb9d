//! JSON string escaping for log lines: the check that most values pass
//! untouched (eight bytes at a time), and the escaping of those that do not.

use std::fmt::Write as _;

/// `value` as a JSON string.
pub(super) fn push_json_str(out: &mut String, value: &str) {
    out.push('"');
    escape_into(out, value);
    out.push('"');
}

/// Appends `value` escaped for a JSON string. Inlined: most values need no
/// escaping, and then it is one scan and one copy.
#[inline(always)]
pub(super) fn escape_into(out: &mut String, value: &str) {
    if needs_escape(value.as_bytes()) {
        escape_each(out, value);
    } else {
        out.push_str(value);
    }
}

fn escape_each(out: &mut String, value: &str) {
    let mut start = 0;
    for (i, byte) in value.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&value[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&value[start..]);
}

/// Whether a JSON string needs any byte of `value` escaped: a control
/// character, `"` or `\`. Looks at eight bytes at a time, since every field
/// of every log line passes through here.
#[inline]
fn needs_escape(value: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Exact per word: whether some byte of `x` is below `n` (n <= 0x80).
    let has_below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0;
    let has = |x: u64, b: u8| has_below(x ^ (ONES * u64::from(b)), 1);
    let mut words = value.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        let x = u64::from_ne_bytes(bytes);
        if has_below(x, 0x20) || has(x, b'"') || has(x, b'\\') {
            return true;
        }
    }
    words.remainder().iter().any(|&b| ESCAPED[usize::from(b)])
}

/// The bytes a JSON string escapes: control characters, `"` and `\`.
static ESCAPED: [bool; 256] = {
    let mut escaped = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        escaped[byte] = true;
        byte += 1;
    }
    escaped[b'"' as usize] = true;
    escaped[b'\\' as usize] = true;
    escaped
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_escape_finds_every_byte_that_needs_it_at_every_position() {
        let naive = |v: &[u8]| v.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for byte in 0..=255u8 {
            for len in 1..20 {
                for at in 0..len {
                    let mut value = vec![b'a'; len];
                    value[at] = byte;
                    assert_eq!(
                        needs_escape(&value),
                        naive(&value),
                        "{byte:#x} at {at} of {len}"
                    );
                }
            }
        }
        // Neighbouring bytes that could borrow into each other.
        for pair in [
            [0x20u8, 0x1f],
            [0x21, 0x00],
            [0x80, 0x22],
            [0xff, 0x5c],
            [0x5d, 0x21],
        ] {
            let value: Vec<u8> = pair.iter().copied().cycle().take(16).collect();
            assert_eq!(needs_escape(&value), naive(&value), "{pair:?}");
        }
        assert!(!needs_escape(b""));
    }
}
