//! Events the worker publishes on the `sdbatch.events` topic exchange, and the batch manifest.
//!
//! - `batch.completed` ([`BatchCompleted`]): every image of a batch is uploaded. The same JSON is
//!   stored at the batch's manifest key ([`crate::message::Batch::manifest_key`]), so a redelivered
//!   batch whose manifest exists is not regenerated: the worker republishes the manifest with
//!   `redelivered: true` ([`mark_redelivered`]).
//! - `batch.failed` ([`BatchFailed`]): the worker gave up on a message.
//!
//! Delivery is at least once: consumers deduplicate by `batch_id`. Both events deserialize without
//! `deny_unknown_fields`, so readers keep working when later versions add fields.
use crate::message::{Batch, Invalid};
use crate::pipeline::prompt_weights::PromptSyntax;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};

/// Routing keys (and `event` values).
pub const BATCH_COMPLETED: &str = "batch.completed";
pub const BATCH_FAILED: &str = "batch.failed";
pub const BATCH_PROGRESS: &str = "batch.progress";
pub const BATCH_CANCELLED: &str = "batch.cancelled";
/// `schema_version` of both events.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// One uploaded image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub item_id: String,
    /// Index of the image within its item (0-based).
    pub n: u32,
    pub bucket: String,
    pub key: String,
    /// The seed this image was made with (the item's seed + `n`).
    pub seed: u64,
    /// Whether the item's seed was derived from the batch and item ids.
    pub seed_derived: bool,
    /// Size of the image object (PNG, JPEG or WebP: the key says which).
    pub bytes: u64,
    /// SHA-256 of the image object, lowercase hex.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// The safety checker's verdict; absent when the checker did not run for this batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsfw: Option<bool>,
    /// What the worker did with a flagged image (its `--safety-policy`): `flag` (stored as
    /// generated), `blank` (a black image was stored instead) or `drop` (nothing stored: `bytes`
    /// is 0 and `sha256` empty). Absent for images that were not flagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_action: Option<String>,
    /// CLIP score (100 × cosine of the prompt's and the image's CLIP embeddings, at least 0);
    /// absent when the worker has no CLIP model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f32>,
    /// Whether the CLIP score is below the worker's `--min-clip-score` (marked, not dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_clip_score: Option<bool>,
    /// img2img: where the item's init image came from, `s3://bucket/key` or `data:` (a data URI
    /// is never echoed: its bytes are identified by `init_image_sha256`). Absent for txt2img.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// img2img: SHA-256 of the init image's encoded bytes, as fetched or decoded from base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image_sha256: Option<String>,
    /// Inpainting: where the item's mask came from (as `init_image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<String>,
    /// Inpainting: SHA-256 of the mask's encoded bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image_sha256: Option<String>,
}

impl ImageRecord {
    /// The record of image `n` of `batch.items[item_index]`, whose PNG bytes are `png`.
    ///
    /// Panics if `item_index` is out of range.
    pub fn new(
        batch: &Batch,
        item_index: usize,
        n: u32,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> Self {
        Self {
            bytes: png.len() as u64,
            sha256: hex::encode(Sha256::digest(png)),
            width,
            height,
            ..Self::planned(batch, item_index, n)
        }
    }

    /// The record image `n` of `batch.items[item_index]` will have, before its PNG exists
    /// (`bytes` 0, `sha256` empty, the batch's size, no check results).
    ///
    /// Panics if `item_index` is out of range.
    pub fn planned(batch: &Batch, item_index: usize, n: u32) -> Self {
        let item = &batch.items[item_index];
        let (width, height) = batch.output_size();
        Self {
            item_id: item.id.clone(),
            n,
            bucket: batch.bucket.clone(),
            key: batch.image_key(&item.id, n),
            seed: item.image_seed(n),
            seed_derived: item.seed_derived,
            bytes: 0,
            sha256: String::new(),
            width: width as u32,
            height: height as u32,
            nsfw: None,
            safety_action: None,
            clip_score: None,
            low_clip_score: None,
            init_image: item.init_image.as_ref().map(|i| i.describe()),
            init_image_sha256: item.init_image.as_ref().and_then(|i| i.sha256.clone()),
            mask_image: item.mask_image.as_ref().map(|i| i.describe()),
            mask_image_sha256: item.mask_image.as_ref().and_then(|i| i.sha256.clone()),
        }
    }
}

/// The parameters a batch ran with (after presets and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventParams {
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: i64,
    pub height: i64,
    /// Canonical scheduler name (`pndm`, `ddim`, `euler`, `euler_ancestral`, `dpmpp_2m_karras`, …:
    /// `SchedulerKind::name`).
    pub scheduler: String,
    /// The preset the message named; `null` if none.
    pub preset: Option<String>,
    /// Clip skip when other than 1 (absent: every text-encoder layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<usize>,
    /// Guidance rescale when used (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// The prompt syntax when not `plain` (`a1111`: weighted, chunked prompts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_syntax: Option<String>,
    /// The LoRAs fused for the batch (canonical order, with the preset's), when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<crate::pipeline::adapters::LoraWeight>>,
    /// The img2img strength, when any item had an init image and no mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// The inpainting strength, when any item had a mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inpaint_strength: Option<f64>,
    /// The masks' blur radius, when any item had a mask and it was not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<f64>,
    /// The inpainting crop padding (`padding_mask_crop`), when any item had a mask and it was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_mask_crop: Option<u32>,
    /// The hires fix (`width` and `height` are its first pass; the images' own sizes are the
    /// second's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<crate::pipeline::hires::Hires>,
}

impl EventParams {
    pub fn from_batch(batch: &Batch) -> Self {
        let p = &batch.params;
        let any_mask = batch.items.iter().any(|i| i.mask_image.is_some());
        Self {
            steps: p.steps,
            guidance_scale: p.guidance_scale,
            width: p.width,
            height: p.height,
            scheduler: p.scheduler.name().to_string(),
            preset: batch.preset.clone(),
            clip_skip: (p.clip_skip != 1).then_some(p.clip_skip),
            guidance_rescale: (p.guidance_rescale != 0.0).then_some(p.guidance_rescale),
            prompt_syntax: (p.prompt_syntax != PromptSyntax::Plain)
                .then(|| p.prompt_syntax.as_str().to_string()),
            loras: (!p.loras.is_empty()).then(|| p.loras.clone()),
            strength: batch
                .items
                .iter()
                .any(|i| i.init_image.is_some() && i.mask_image.is_none())
                .then_some(batch.strength),
            inpaint_strength: any_mask.then_some(batch.inpaint_strength),
            mask_blur: any_mask.then_some(batch.mask_blur).filter(|r| *r != 0.0),
            padding_mask_crop: batch.padding_mask_crop.filter(|_| any_mask),
            hires: batch.hires,
        }
    }
}

/// Wall-clock times of a batch, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From publication to the start of work, when the message carried a timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_wait_ms: Option<f64>,
    pub generate_ms: f64,
    pub encode_ms: f64,
    pub upload_ms: f64,
    pub total_ms: f64,
}

/// `batch.completed`, and the manifest stored at the batch's manifest key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchCompleted {
    pub schema_version: u32,
    /// Always [`BATCH_COMPLETED`].
    pub event: String,
    pub batch_id: String,
    /// Always `"completed"`.
    pub status: String,
    /// Every image, in message order (item by item, `n` ascending).
    pub images: Vec<ImageRecord>,
    pub params: EventParams,
    pub model: String,
    pub worker_id: String,
    pub timings: Timings,
    /// RFC 3339 UTC, e.g. `2026-11-26T10:15:30.123Z`.
    pub completed_at: String,
    /// `true` when the message had been delivered before (RabbitMQ's `redelivered` flag): the
    /// event may repeat an earlier one. Always `true` when the worker republishes a stored
    /// manifest instead of regenerating; the stored manifest keeps the value of the delivery that
    /// made it.
    pub redelivered: bool,
    /// [`Batch::work_sha256`]: what the images were made from. A message reusing the `batch_id`
    /// with other work is a conflict. Absent in manifests written by older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_sha256: Option<String>,
    /// Images an earlier delivery of the same work had stored, taken over instead of generated
    /// again. Absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_images: Option<usize>,
    /// [`crate::pipeline::StableDiffusion::content_sha256`] of the model the worker served.
    /// Absent in manifests written by older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
}

impl BatchCompleted {
    /// The completion of `batch`, stamped now.
    pub fn new(
        batch: &Batch,
        images: Vec<ImageRecord>,
        model: impl Into<String>,
        worker_id: impl Into<String>,
        timings: Timings,
        redelivered: bool,
    ) -> Self {
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            event: BATCH_COMPLETED.to_string(),
            batch_id: batch.batch_id.clone(),
            status: "completed".to_string(),
            images,
            params: EventParams::from_batch(batch),
            model: model.into(),
            worker_id: worker_id.into(),
            timings,
            completed_at: now_rfc3339(),
            redelivered,
            // Set by the worker, which hashes the batch's work once per delivery.
            work_sha256: None,
            resumed_images: None,
            model_sha256: None,
        }
    }

    /// The JSON body (the event and the manifest object alike).
    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a BatchCompleted always serializes")
    }
}

/// `batch.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFailed {
    pub schema_version: u32,
    /// Always [`BATCH_FAILED`].
    pub event: String,
    /// The message's batch id; `null` when it had no valid one.
    pub batch_id: Option<String>,
    /// Stable snake_case code: an [`crate::message::InvalidReason`] code for invalid messages, or
    /// one of the worker's own codes.
    pub reason: String,
    /// For people.
    pub error: String,
    pub worker_id: String,
    /// RFC 3339 UTC.
    pub failed_at: String,
}

impl BatchFailed {
    /// A failure stamped now.
    pub fn new(
        batch_id: Option<String>,
        reason: impl Into<String>,
        error: impl Into<String>,
        worker_id: impl Into<String>,
    ) -> Self {
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            event: BATCH_FAILED.to_string(),
            batch_id,
            reason: reason.into(),
            // Error texts often quote what a producer sent: bounded here, for every publisher.
            error: crate::bounded::reason(&error.into()),
            worker_id: worker_id.into(),
            failed_at: now_rfc3339(),
        }
    }

    /// The event for a message [`crate::message::parse`] rejected, stamped now.
    pub fn from_invalid(invalid: &Invalid, worker_id: impl Into<String>) -> Self {
        Self::new(
            invalid.batch_id.clone(),
            invalid.reason.as_str(),
            invalid.message.clone(),
            worker_id,
        )
    }

    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BatchFailed always serializes")
    }
}

/// `batch.progress`, and the progress object stored next to the manifest while a batch runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchProgress {
    pub schema_version: u32,
    /// Always [`BATCH_PROGRESS`].
    pub event: String,
    pub batch_id: String,
    /// Always `"running"`.
    pub status: String,
    /// Images stored (including those an earlier delivery stored), of `images_total`.
    pub images_done: usize,
    pub images_total: usize,
    pub bucket: String,
    /// The keys of the images stored so far, in message order.
    pub keys: Vec<String>,
    /// Images per second this delivery made so far; absent before its first image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_second: Option<f64>,
    /// Seconds left at that rate; absent with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    pub worker_id: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
}

impl BatchProgress {
    /// The progress of `batch` with `records` stored so far (message order), stamped now.
    pub fn new(
        batch: &Batch,
        records: &[ImageRecord],
        rate_and_eta: Option<(f64, f64)>,
        worker_id: impl Into<String>,
    ) -> Self {
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            event: BATCH_PROGRESS.to_string(),
            batch_id: batch.batch_id.clone(),
            status: "running".to_string(),
            images_done: records.len(),
            images_total: batch.total_images(),
            bucket: batch.bucket.clone(),
            keys: records.iter().map(|r| r.key.clone()).collect(),
            // Rounded: these are estimates, and the JSON stays short.
            images_per_second: rate_and_eta.map(|(r, _)| (r * 1000.0).round() / 1000.0),
            eta_seconds: rate_and_eta.map(|(_, e)| e.ceil()),
            worker_id: worker_id.into(),
            updated_at: now_rfc3339(),
        }
    }

    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BatchProgress always serializes")
    }
}

/// `batch.cancelled`: a worker stopped a batch after `sdbatch cancel` (or acked a delivery that
/// arrived after it). Images stored before the cancel stay; the rest are never made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchCancelled {
    pub schema_version: u32,
    /// Always [`BATCH_CANCELLED`].
    pub event: String,
    pub batch_id: String,
    /// Always `"cancelled"`.
    pub status: String,
    pub bucket: String,
    pub images_total: usize,
    /// Keys of the batch's images that are stored (by this delivery or an earlier one), in
    /// message order.
    pub stored_keys: Vec<String>,
    /// Keys of the images that were not made and never will be, in message order.
    pub not_stored_keys: Vec<String>,
    pub worker_id: String,
    /// RFC 3339 UTC.
    pub cancelled_at: String,
}

impl BatchCancelled {
    /// The cancellation of `batch`, whose images are `planned` (every key, message order) of
    /// which `stored` exist, stamped now.
    pub fn new(
        batch: &Batch,
        planned: &[String],
        stored: &std::collections::HashSet<String>,
        worker_id: impl Into<String>,
    ) -> Self {
        let (stored_keys, not_stored_keys) = planned
            .iter()
            .cloned()
            .partition(|key| stored.contains(key));
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            event: BATCH_CANCELLED.to_string(),
            batch_id: batch.batch_id.clone(),
            status: "cancelled".to_string(),
            bucket: batch.bucket.clone(),
            images_total: planned.len(),
            stored_keys,
            not_stored_keys,
            worker_id: worker_id.into(),
            cancelled_at: now_rfc3339(),
        }
    }

    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BatchCancelled always serializes")
    }
}

/// Any event, told apart by its `event` field (for consumers of the events exchange).
// One value per event read off the wire, never stored in bulk: boxing the larger variant would
// only cost every consumer a deref.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Completed(BatchCompleted),
    Failed(BatchFailed),
    Progress(BatchProgress),
    Cancelled(BatchCancelled),
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event is not valid JSON of its kind: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    #[error("manifest is for batch {found:?}, not {expected:?}")]
    WrongBatch { expected: String, found: String },
}

impl Event {
    pub fn from_json(body: &[u8]) -> Result<Self, EventError> {
        #[derive(Deserialize)]
        struct Head {
            event: String,
        }
        let head: Head = serde_json::from_slice(body)?;
        match head.event.as_str() {
            BATCH_COMPLETED => Ok(Event::Completed(serde_json::from_slice(body)?)),
            BATCH_FAILED => Ok(Event::Failed(serde_json::from_slice(body)?)),
            BATCH_PROGRESS => Ok(Event::Progress(serde_json::from_slice(body)?)),
            BATCH_CANCELLED => Ok(Event::Cancelled(serde_json::from_slice(body)?)),
            _ => Err(EventError::UnknownEvent(head.event)),
        }
    }

    /// The batch the event is about (`None` for a failure without a valid batch id).
    pub fn batch_id(&self) -> Option<&str> {
        match self {
            Event::Completed(c) => Some(&c.batch_id),
            Event::Failed(f) => f.batch_id.as_deref(),
            Event::Progress(p) => Some(&p.batch_id),
            Event::Cancelled(c) => Some(&c.batch_id),
        }
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Event::Completed(_) => BATCH_COMPLETED,
            Event::Failed(_) => BATCH_FAILED,
            Event::Progress(_) => BATCH_PROGRESS,
            Event::Cancelled(_) => BATCH_CANCELLED,
        }
    }
}

/// A stored manifest made into the event for a redelivered message: the same JSON with
/// `redelivered: true`. Works on the JSON itself, so fields a newer worker wrote are kept.
/// Fails if `manifest` is not a `batch.completed` object for `batch_id`.
pub fn mark_redelivered(manifest: &[u8], batch_id: &str) -> Result<Vec<u8>, EventError> {
    // Checks the shape first.
    let parsed: BatchCompleted = serde_json::from_slice(manifest)?;
    if parsed.event != BATCH_COMPLETED {
        return Err(EventError::UnknownEvent(parsed.event));
    }
    if parsed.batch_id != batch_id {
        return Err(EventError::WrongBatch {
            expected: batch_id.to_string(),
            found: parsed.batch_id,
        });
    }
    let mut value: serde_json::Value = serde_json::from_slice(manifest)?;
    value["redelivered"] = serde_json::Value::Bool(true);
    Ok(serde_json::to_vec_pretty(&value)?)
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-11-26T10:15:30.123Z`. Times before 1970 are
/// written as the epoch.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The current time as [`rfc3339_utc`].
pub fn now_rfc3339() -> String {
    rfc3339_utc(SystemTime::now())
}

/// Proleptic Gregorian (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Limits, parse};
    use serde_json::{Value, json};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn batch() -> Batch {
        let body = json!({"schema_version": 1, "batch_id": "shoes-0001",
            "items": [{"id": "sku-1", "prompt": "a shoe", "seed": 42, "num_images": 2},
                      {"id": "sku-2", "prompt": "a boot"}],
            "params": {"preset": "production", "width": 640},
            "output": {"bucket": "images", "prefix": "catalog/shoes"}});
        let limits = Limits {
            default_bucket: Some("images".into()),
            ..Limits::default()
        };
        parse(&serde_json::to_vec(&body).unwrap(), &limits, 512).unwrap()
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    fn completed() -> BatchCompleted {
        let b = batch();
        let images = b
            .image_requests()
            .iter()
            .map(|(i, n, _)| ImageRecord::new(&b, *i, *n, b"png bytes", 640, 512))
            .collect::<Vec<_>>();
        // The first image carries every optional field, so schema tests see them all.
        let mut images = images;
        images[0].nsfw = Some(true);
        images[0].safety_action = Some("blank".into());
        images[0].clip_score = Some(31.5);
        images[0].low_clip_score = Some(false);
        images[0].init_image = Some("s3://images/inputs/shoe.png".into());
        images[0].init_image_sha256 = Some("ab".repeat(32));
        images[0].mask_image = Some("s3://images/inputs/shoe-mask.png".into());
        images[0].mask_image_sha256 = Some("cd".repeat(32));
        let mut c = BatchCompleted::new(
            &b,
            images,
            "CompVis/stable-diffusion-v1-4",
            "worker-a",
            Timings {
                queue_wait_ms: Some(12.5),
                generate_ms: 1000.25,
                encode_ms: 20.0,
                upload_ms: 30.5,
                total_ms: 1063.0,
            },
            false,
        );
        assert!(is_rfc3339_utc(&c.completed_at), "{}", c.completed_at);
        c.completed_at = rfc3339_utc(at(1_764_152_130, 123));
        c
    }

    fn failed(batch_id: Option<&str>, reason: &str) -> BatchFailed {
        let mut f = BatchFailed::new(batch_id.map(str::to_string), reason, "it broke", "worker-a");
        assert!(is_rfc3339_utc(&f.failed_at), "{}", f.failed_at);
        f.failed_at = rfc3339_utc(at(0, 0));
        f
    }

    fn is_rfc3339_utc(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 24
            && s.ends_with('Z')
            && [
                (4, b'-'),
                (7, b'-'),
                (10, b'T'),
                (13, b':'),
                (16, b':'),
                (19, b'.'),
            ]
            .iter()
            .all(|&(i, c)| b[i] == c)
            && s.bytes()
                .enumerate()
                .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
    }

    #[test]
    fn completed_event_contents() {
        let c = completed();
        assert_eq!(c.event, BATCH_COMPLETED);
        assert_eq!(c.status, "completed");
        assert_eq!(c.schema_version, 1);
        assert_eq!(c.completed_at, "2025-11-26T10:15:30.123Z");
        assert!(!c.redelivered);
        assert_eq!(
            c.params,
            EventParams {
                steps: 25,
                guidance_scale: 8.5,
                width: 640,
                height: 512,
                scheduler: "pndm".into(),
                preset: Some("production".into()),
                clip_skip: None,
                guidance_rescale: None,
                prompt_syntax: None,
                loras: None,
                strength: None,
                inpaint_strength: None,
                mask_blur: None,
                padding_mask_crop: None,
                hires: None,
            }
        );
        let keys: Vec<(&str, u32, &str, u64)> = c
            .images
            .iter()
            .map(|r| (r.item_id.as_str(), r.n, r.key.as_str(), r.seed))
            .collect();
        let derived = crate::message::derive_seed("shoes-0001", "sku-2");
        assert_eq!(
            keys,
            [
                ("sku-1", 0, "catalog/shoes/shoes-0001/sku-1/0.png", 42),
                ("sku-1", 1, "catalog/shoes/shoes-0001/sku-1/1.png", 43),
                ("sku-2", 0, "catalog/shoes/shoes-0001/sku-2/0.png", derived),
            ]
        );
        let r = &c.images[2];
        assert!(r.seed_derived && !c.images[0].seed_derived);
        assert_eq!(r.bucket, "images");
        assert_eq!(r.bytes, 9);
        // sha256sum of the bytes "png bytes".
        assert_eq!(
            r.sha256,
            "d013614dc14a37ee20fe92005737ab7d3427e7e93580ad56ef8a42205e7f7a4e"
        );
    }

    #[test]
    fn events_round_trip() {
        let c = completed();
        let back: BatchCompleted = serde_json::from_slice(&c.to_json_vec()).unwrap();
        assert_eq!(back, c);
        let mut no_wait = c.clone();
        no_wait.timings.queue_wait_ms = None;
        let v = serde_json::to_value(&no_wait).unwrap();
        assert!(v["timings"].get("queue_wait_ms").is_none());
        assert_eq!(
            serde_json::from_value::<BatchCompleted>(v).unwrap(),
            no_wait
        );

        let f = failed(Some("b1"), "delivery_limit");
        assert_eq!(f.failed_at, "1970-01-01T00:00:00.000Z");
        assert_eq!((f.event.as_str(), f.schema_version), (BATCH_FAILED, 1));
        let back: BatchFailed = serde_json::from_slice(&f.to_json_vec()).unwrap();
        assert_eq!(back, f);
        let none = failed(None, "not_json");
        let v = serde_json::to_value(&none).unwrap();
        assert_eq!(v["batch_id"], Value::Null);
        assert_eq!(serde_json::from_value::<BatchFailed>(v).unwrap(), none);
    }

    #[test]
    fn event_dispatch_by_kind() {
        let c = completed();
        let e = Event::from_json(&c.to_json_vec()).unwrap();
        assert_eq!(e.routing_key(), BATCH_COMPLETED);
        assert_eq!(e.batch_id(), Some("shoes-0001"));
        assert_eq!(e, Event::Completed(c));
        let f = failed(None, "schema");
        let e = Event::from_json(&f.to_json_vec()).unwrap();
        assert_eq!(e.routing_key(), BATCH_FAILED);
        assert_eq!(e.batch_id(), None);
        assert!(matches!(
            Event::from_json(br#"{"event": "batch.started"}"#),
            Err(EventError::UnknownEvent(_))
        ));
        assert!(Event::from_json(b"{}").is_err());
        // Unknown fields are tolerated (newer producers).
        let mut v = serde_json::to_value(&f).unwrap();
        v["new_field"] = json!(1);
        assert!(Event::from_json(&serde_json::to_vec(&v).unwrap()).is_ok());
    }

    #[test]
    fn failed_from_invalid() {
        let limits = Limits::default();
        let body = br#"{"schema_version": 1, "batch_id": "b7", "items": []}"#;
        let inv = parse(body, &limits, 512).unwrap_err();
        let f = BatchFailed::from_invalid(&inv, "w1");
        assert_eq!(f.batch_id.as_deref(), Some("b7"));
        assert_eq!(f.reason, "items");
        assert_eq!(f.error, inv.message);
        assert_eq!(f.event, BATCH_FAILED);
        assert_eq!(f.worker_id, "w1");
        assert!(is_rfc3339_utc(&f.failed_at));
        let inv = parse(b"[]", &limits, 512).unwrap_err();
        let f = BatchFailed::from_invalid(&inv, "w1");
        assert_eq!((f.batch_id, f.reason.as_str()), (None, "not_json"));
    }

    #[test]
    fn redelivery_republishes_the_manifest() {
        let c = completed();
        let mut stored = serde_json::to_value(&c).unwrap();
        stored["from_a_newer_worker"] = json!("kept");
        let stored = serde_json::to_vec(&stored).unwrap();
        let out = mark_redelivered(&stored, "shoes-0001").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["redelivered"], true);
        assert_eq!(v["from_a_newer_worker"], "kept");
        let back: BatchCompleted = serde_json::from_value(v).unwrap();
        assert_eq!(
            back,
            BatchCompleted {
                redelivered: true,
                ..c
            }
        );
        assert!(matches!(
            mark_redelivered(&stored, "other-batch"),
            Err(EventError::WrongBatch { .. })
        ));
        assert!(mark_redelivered(b"not json", "shoes-0001").is_err());
        let f = failed(Some("shoes-0001"), "x");
        assert!(mark_redelivered(&f.to_json_vec(), "shoes-0001").is_err());
    }

    #[test]
    fn rfc3339_formatting() {
        // Reference values from Python's datetime.
        for (secs, want) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, "2000-02-29T00:00:00.000Z"),
            (951_868_799, "2000-02-29T23:59:59.000Z"),
            (1_709_251_199, "2024-02-29T23:59:59.000Z"),
            (4_102_444_800, "2100-01-01T00:00:00.000Z"),
            (4_107_542_400, "2100-03-01T00:00:00.000Z"),
            (1_798_761_599, "2026-12-31T23:59:59.000Z"),
            (253_402_300_799, "9999-12-31T23:59:59.000Z"),
        ] {
            assert_eq!(rfc3339_utc(at(secs, 0)), want, "{secs}");
        }
        assert_eq!(rfc3339_utc(at(1, 999)), "1970-01-01T00:00:01.999Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(10)),
            "1970-01-01T00:00:00.000Z"
        );
        assert!(is_rfc3339_utc(&now_rfc3339()));
        assert!(now_rfc3339().as_str() > "2025-01-01");
    }

    // --- Docs: the JSON Schema and the examples in docs/messages.md. ---

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn json_schema_lists_exactly_the_event_fields() {
        let schema: Value =
            serde_json::from_str(include_str!("../docs/batch-event.schema.json")).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        let defs = &schema["$defs"];
        let full = completed();
        let c = serde_json::to_value(BatchCompleted {
            work_sha256: Some("0".repeat(64)),
            resumed_images: Some(1),
            model_sha256: Some("1".repeat(64)),
            params: EventParams {
                clip_skip: Some(2),
                guidance_rescale: Some(0.7),
                prompt_syntax: Some("a1111".into()),
                loras: Some(vec![crate::pipeline::adapters::LoraWeight {
                    name: "style".into(),
                    weight: 0.7,
                }]),
                strength: Some(0.6),
                inpaint_strength: Some(1.0),
                mask_blur: Some(4.0),
                padding_mask_crop: Some(32),
                hires: Some(crate::pipeline::hires::Hires {
                    scale: 2.0,
                    steps: 20,
                    strength: 0.5,
                    upscaler: crate::pipeline::hires::Upscaler::Latent,
                }),
                ..full.params.clone()
            },
            ..full
        })
        .unwrap();
        let f = serde_json::to_value(failed(None, "r")).unwrap();
        let batch = parse(
            &serde_json::to_vec(&json!({"schema_version": 1, "batch_id": "b",
            "items": [{"id": "a", "prompt": "p", "num_images": 2}]}))
            .unwrap(),
            &Limits {
                default_bucket: Some("images".into()),
                ..Limits::default()
            },
            64,
        )
        .unwrap();
        let planned = ["b/a/0.png".to_string(), "b/a/1.png".to_string()];
        let stored = std::collections::HashSet::from([planned[0].clone()]);
        let x = serde_json::to_value(BatchCancelled::new(&batch, &planned, &stored, "w")).unwrap();
        assert_eq!(x["stored_keys"], json!(["b/a/0.png"]));
        assert_eq!(x["not_stored_keys"], json!(["b/a/1.png"]));
        for (def, value) in [
            ("batch_completed", &c),
            ("image", &c["images"][0]),
            ("params", &c["params"]),
            ("timings", &c["timings"]),
            ("batch_failed", &f),
            ("batch_cancelled", &x),
        ] {
            let d = &defs[def];
            assert_eq!(keys(&d["properties"]), keys(value), "{def}");
            // Every serialized field is required, except those skipped when absent.
            let required: BTreeSet<String> = d["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            let mut want = keys(value);
            if def == "timings" {
                want.remove("queue_wait_ms");
            }
            if def == "batch_completed" {
                want.remove("work_sha256");
                want.remove("resumed_images");
                want.remove("model_sha256");
            }
            if def == "params" {
                want.remove("clip_skip");
                want.remove("guidance_rescale");
                want.remove("prompt_syntax");
                want.remove("loras");
                want.remove("strength");
                want.remove("inpaint_strength");
                want.remove("mask_blur");
                want.remove("padding_mask_crop");
                want.remove("hires");
            }
            if def == "image" {
                for optional in [
                    "nsfw",
                    "safety_action",
                    "clip_score",
                    "low_clip_score",
                    "init_image",
                    "init_image_sha256",
                    "mask_image",
                    "mask_image_sha256",
                ] {
                    want.remove(optional);
                }
            }
            assert_eq!(required, want, "{def}");
        }
        assert_eq!(
            defs["batch_completed"]["properties"]["event"]["const"],
            BATCH_COMPLETED
        );
        assert_eq!(
            defs["batch_failed"]["properties"]["event"]["const"],
            BATCH_FAILED
        );
    }

    #[test]
    fn documented_events_parse() {
        let doc = include_str!("../docs/messages.md");
        let mut kinds = BTreeSet::new();
        let mut rest = doc;
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + 8..];
            let end = body.find("\n```").expect("unclosed ```json block");
            let block = &body[..end];
            rest = &body[end + 4..];
            let v: Value = serde_json::from_str(block).unwrap();
            if v.get("event").is_some() {
                let e =
                    Event::from_json(block.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{block}"));
                // Documented events carry no fields the structs lack.
                let again = match &e {
                    Event::Completed(c) => serde_json::to_value(c).unwrap(),
                    Event::Failed(f) => serde_json::to_value(f).unwrap(),
                    Event::Progress(p) => serde_json::to_value(p).unwrap(),
                    Event::Cancelled(c) => serde_json::to_value(c).unwrap(),
                };
                assert_eq!(again, v, "documented event differs from its struct form");
                kinds.insert(e.routing_key());
            }
        }
        assert_eq!(
            kinds,
            BTreeSet::from([
                BATCH_COMPLETED,
                BATCH_FAILED,
                BATCH_PROGRESS,
                BATCH_CANCELLED
            ])
        );
    }
}
