//! One definition of what may name an object, shared by message validation and both storage
//! backends, so that whatever a message validation accepts, storage can store.
//!
//! - An object key is `/`-separated segments; every segment must pass [`segment_problem`]
//!   (storage checks each key it is given with it).
//! - Ids a producer chooses (item ids, prefix segments, file stems in `generate`) are stricter:
//!   [`id_problem`] (`[A-Za-z0-9_.-]{1,128}`) and also every rule of [`segment_problem`], e.g. the
//!   reserved `.sdbatch-` names of the local backend's bookkeeping.

/// Longest id (item id, batch id, prefix segment), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Segments beginning with this are reserved for the local backend's bookkeeping (metadata
/// folder, temporary files) and refused in keys for both backends.
pub const RESERVED_SEGMENT_PREFIX: &str = ".sdbatch-";

/// Why one segment of an object key cannot be stored, if it cannot.
pub fn segment_problem(segment: &str) -> Option<&'static str> {
    match segment {
        "" => Some("empty path segment (leading, trailing or doubled '/')"),
        "." | ".." => Some("'.' or '..' path segment"),
        s if s.starts_with(RESERVED_SEGMENT_PREFIX) => {
            Some("path segment starting with '.sdbatch-' (reserved)")
        }
        _ => None,
    }
}

/// Why `id` is not a valid producer-chosen id, if it is not.
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Some("must be 1 to 128 characters long");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Some("must match [A-Za-z0-9_.-]");
    }
    segment_problem(id)
}

/// Whether `id` is a valid producer-chosen id (see [`id_problem`]).
pub fn is_safe_id(id: &str) -> bool {
    id_problem(id).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids() {
        for ok in [
            "sku-1",
            "a.b",
            "A_z-09",
            "..a",
            "x.sdbatch-y",
            &"a".repeat(128),
        ] {
            assert!(is_safe_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".sdbatch-meta",
            ".sdbatch-tmp.1",
            "a/b",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(!is_safe_id(bad), "{bad}");
        }
    }

    proptest! {
        /// Every id accepted here is a storable key segment.
        #[test]
        fn safe_ids_are_storable_segments(id in "[A-Za-z0-9_.-]{1,130}") {
            if is_safe_id(&id) {
                prop_assert!(segment_problem(&id).is_none());
            }
        }
    }
}
