//! Text that crosses a boundary (AMQP headers, events, logs, terminals) is bounded and inert.
//!
//! Error messages often quote what a producer sent (serde quotes the offending value whole). A
//! 140 kB value copied into a dead letter's header once made the publish exceed RabbitMQ's frame
//! size and took the worker's connection down, so every reason text the worker sends anywhere goes
//! through [`reason`]: at most [`MAX_REASON_BYTES`] of valid UTF-8 with control characters escaped.

/// Upper bound of a reason text in bytes (the `…` marking a cut included).
pub const MAX_REASON_BYTES: usize = 512;

/// `text` with control characters escaped (`\n`, `\u{1b}`), cut to at most `max_bytes` bytes on a
/// character boundary; a cut is marked with `…`. Never longer than `max_bytes` (for `max_bytes`
/// ≥ 3, the size of the mark).
pub fn cut(text: &str, max_bytes: usize) -> String {
    const MARK: &str = "…";
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    if escaped.len() <= max_bytes {
        return escaped;
    }
    // A cut may end inside an escape (`\u{1`): still inert text.
    let mut end = max_bytes.saturating_sub(MARK.len());
    while !escaped.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &escaped[..end])
}

/// `s` in quotes (Rust's escaping) for error messages, cut to 64 characters: a value a producer
/// sent is never echoed back whole.
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}…")
    }
}

/// A reason text for headers and events: [`cut`] to [`MAX_REASON_BYTES`].
pub fn reason(text: &str) -> String {
    cut(text, MAX_REASON_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_text_is_kept() {
        assert_eq!(reason("items[0].id is empty"), "items[0].id is empty");
        assert_eq!(cut("abc", 3), "abc");
    }

    #[test]
    fn long_text_is_cut_and_marked() {
        let long = "x".repeat(140_000);
        let r = reason(&long);
        assert_eq!(r.len(), MAX_REASON_BYTES);
        assert!(r.ends_with('…'));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(cut("a\x1b[31mb\nc", 64), "a\\u{1b}[31mb\\nc");
    }

    #[test]
    fn cuts_on_character_boundaries() {
        let r = cut(&"é".repeat(100), 10);
        assert_eq!(r, "ééé…");
    }

    proptest! {
        #[test]
        fn never_longer_than_the_bound_and_never_raw_controls(s in any::<String>(), max in 3usize..600) {
            let r = cut(&s, max);
            prop_assert!(r.len() <= max, "{} > {max}", r.len());
            prop_assert!(!r.chars().any(char::is_control));
            if !s.chars().any(char::is_control) && s.len() <= max {
                prop_assert_eq!(r, s);
            }
        }
    }
}
