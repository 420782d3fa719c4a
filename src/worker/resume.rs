//! Resuming a redelivered batch: which of its images an earlier delivery of the same work already
//! stored, and whether the objects under its `batch_id` belong to other work (a conflict).
//!
//! Pure decisions over what the store reported; the worker does the listing and HEAD requests.
//! An image counts as done only when its object's metadata records the same work hash, the same
//! seed and the same model, and carries the image's size and SHA-256 for the event. Objects written
//! by older workers (no work hash) are regenerated, never taken as a conflict.
use crate::events::ImageRecord;
use std::collections::HashMap;

/// Object metadata keys the worker writes on every image (besides the descriptive ones).
pub const META_WORK: &str = "sdbatch-work-sha256";
pub const META_SEED: &str = "sdbatch-seed";
pub const META_MODEL: &str = "sdbatch-model";
pub const META_SHA256: &str = "sdbatch-sha256";
pub const META_BYTES: &str = "sdbatch-bytes";
pub const META_NSFW: &str = "sdbatch-nsfw";
pub const META_SAFETY_ACTION: &str = "sdbatch-safety-action";
pub const META_CLIP_SCORE: &str = "sdbatch-clip-score";

/// What the stored objects say about a batch.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Per expected image, its record when an earlier delivery stored it (`None`: generate it).
    Resume(Vec<Option<ImageRecord>>),
    /// An object under the batch's folder was made from other work: the key that shows it.
    Conflict(String),
}

/// Decides from `found` (metadata of stored objects by key, for the batch's folder) which of the
/// `expected` images (records as they would be made, `bytes`/`sha256` not yet known) are done.
pub fn decide(
    work: &str,
    model: &str,
    expected: &[ImageRecord],
    found: &HashMap<String, HashMap<String, String>>,
) -> Verdict {
    let mut keys: Vec<&String> = found.keys().collect();
    keys.sort();
    for key in keys {
        if found[key].get(META_WORK).is_some_and(|w| w != work) {
            return Verdict::Conflict(key.clone());
        }
    }
    Verdict::Resume(
        expected
            .iter()
            .map(|want| {
                found
                    .get(&want.key)
                    .and_then(|m| done(work, model, want, m))
            })
            .collect(),
    )
}

/// The record of a stored image if it is exactly the image `want` describes.
fn done(
    work: &str,
    model: &str,
    want: &ImageRecord,
    meta: &HashMap<String, String>,
) -> Option<ImageRecord> {
    let same = |key: &str, value: &str| meta.get(key).is_some_and(|v| v == value);
    if !(same(META_WORK, work)
        && same(META_MODEL, model)
        && same(META_SEED, &want.seed.to_string()))
    {
        return None;
    }
    let sha256 = meta.get(META_SHA256)?;
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: u64 = meta.get(META_BYTES)?.parse().ok()?;
    Some(ImageRecord {
        bytes,
        sha256: sha256.clone(),
        nsfw: meta.get(META_NSFW).and_then(|v| v.parse().ok()),
        safety_action: meta.get(META_SAFETY_ACTION).cloned(),
        clip_score: meta.get(META_CLIP_SCORE).and_then(|v| v.parse().ok()),
        ..want.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORK: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn want(key: &str, seed: u64) -> ImageRecord {
        ImageRecord {
            item_id: "a".into(),
            n: 0,
            bucket: "images".into(),
            key: key.into(),
            seed,
            seed_derived: false,
            bytes: 0,
            sha256: String::new(),
            width: 64,
            height: 64,
            nsfw: None,
            safety_action: None,
            clip_score: None,
            low_clip_score: None,
            init_image: None,
            init_image_sha256: None,
            mask_image: None,
            mask_image_sha256: None,
        }
    }

    fn meta(work: &str, seed: u64, model: &str) -> HashMap<String, String> {
        [
            (META_WORK, work.to_string()),
            (META_SEED, seed.to_string()),
            (META_MODEL, model.to_string()),
            (META_SHA256, SHA.to_string()),
            (META_BYTES, "1234".to_string()),
            (META_NSFW, "false".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn nothing_stored_means_everything_to_generate() {
        let expected = [want("b/a/0.png", 1), want("b/a/1.png", 2)];
        assert_eq!(
            decide(WORK, "m", &expected, &HashMap::new()),
            Verdict::Resume(vec![None, None])
        );
    }

    #[test]
    fn matching_images_are_taken_over_with_their_record() {
        let expected = [want("b/a/0.png", 1), want("b/a/1.png", 2)];
        let found = HashMap::from([("b/a/1.png".to_string(), meta(WORK, 2, "m"))]);
        let Verdict::Resume(records) = decide(WORK, "m", &expected, &found) else {
            panic!("no conflict expected")
        };
        assert_eq!(records[0], None);
        let r = records[1].as_ref().unwrap();
        assert_eq!(
            (r.bytes, r.sha256.as_str(), r.nsfw),
            (1234, SHA, Some(false))
        );
        assert_eq!(r.key, "b/a/1.png");
    }

    #[test]
    fn other_seed_model_or_missing_fields_are_regenerated() {
        let expected = [want("b/a/0.png", 1)];
        let mut no_sha = meta(WORK, 1, "m");
        no_sha.remove(META_SHA256);
        let mut bad_bytes = meta(WORK, 1, "m");
        bad_bytes.insert(META_BYTES.into(), "many".into());
        let mut old_worker = meta(WORK, 1, "m");
        old_worker.remove(META_WORK);
        for m in [
            meta(WORK, 7, "m"),
            meta(WORK, 1, "another-model"),
            no_sha,
            bad_bytes,
            old_worker,
        ] {
            let found = HashMap::from([("b/a/0.png".to_string(), m)]);
            assert_eq!(
                decide(WORK, "m", &expected, &found),
                Verdict::Resume(vec![None])
            );
        }
    }

    #[test]
    fn other_work_under_the_batch_id_is_a_conflict() {
        let other = "b".repeat(64);
        let expected = [want("b/a/0.png", 1)];
        // Even on a key this message does not expect.
        let found = HashMap::from([
            ("b/a/0.png".to_string(), meta(WORK, 1, "m")),
            ("b/z/0.png".to_string(), meta(&other, 1, "m")),
        ]);
        assert_eq!(
            decide(WORK, "m", &expected, &found),
            Verdict::Conflict("b/z/0.png".into())
        );
    }
}
