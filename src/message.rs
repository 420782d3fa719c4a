//! The batch message (schema version 1): the JSON a producer (`sdbatch submit` or any other) puts on
//! the jobs queue, and its validation into a [`Batch`] the worker can run.
//!
//! ```json
//! {"schema_version": 1, "batch_id": "shoes-2026-11-26-0001",
//!  "items": [{"id": "sku-123", "prompt": "a red sneaker", "negative_prompt": "blurry", "seed": 42, "num_images": 2}],
//!  "params": {"steps": 25, "guidance_scale": 8.5, "width": 512, "height": 512, "scheduler": "pndm", "preset": "production"},
//!  "output": {"bucket": "images", "prefix": "catalog/shoes"}}
//! ```
//!
//! [`parse`] never panics on untrusted input: every problem becomes an [`Invalid`] with a stable
//! reason code (for headers and metrics), a human message naming the field, and the batch id when
//! the message had a valid one. The format is documented in `docs/messages.md` and
//! `docs/batch-message.schema.json`; tests keep both in step with the structs here.
use crate::bounded::quote;
use crate::keys::id_problem;
use crate::output::{Encoding, ImageFormat};
use crate::pipeline::adapters::{self, LoraWeight};
use crate::pipeline::hires::{Hires, Upscaler};
use crate::pipeline::prompt_weights::{self, PromptSyntax};
use crate::pipeline::schedulers::SchedulerKind;
use crate::pipeline::{GenerateParams, ImageRequest};
use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

/// Default limit of a message body: 1 MiB holds 256 items with 2 KiB prompts each.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Default cap of one message's work: 16384 image-steps-megapixels, i.e. 1250 images of 512² at 50
/// steps (about 7 minutes on an H200, half an hour on a T4-class GPU).
pub const DEFAULT_MAX_MESSAGE_WORK: f64 = 16384.0;

/// The only `schema_version` this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Steps, guidance and scheduler when neither the message nor its preset says.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;
pub const DEFAULT_SCHEDULER: SchedulerKind = SchedulerKind::Pndm;
/// Largest `params.clip_skip` a message may ask for (the model may allow fewer: it cannot skip
/// more layers than its text encoder has).
pub const MAX_CLIP_SKIP: u32 = 12;

/// Longest accepted batch id, item id and prefix segment, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted `output.prefix`, in bytes.
pub const MAX_PREFIX_BYTES: usize = 512;
/// Item id that would collide with the batch's manifest object (`{batch_id}/manifest.json`).
pub const RESERVED_ITEM_ID: &str = "manifest.json";
/// Item ids that would collide with the batch's other objects: the manifest and the progress
/// object (a local-directory sink cannot hold a file and a folder of one name).
pub const RESERVED_ITEM_IDS: [&str; 2] = [RESERVED_ITEM_ID, "progress.json"];
/// img2img strength when the message gives none (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.8;
/// Inpainting strength when the message gives none (diffusers' default: the masked area starts
/// from pure noise).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;
/// Widths and heights are multiples of this (the VAE's downsampling factor of every SD 1.x/2.x
/// model).
pub const SIZE_MULTIPLE: i64 = 8;
/// Hires fix second-pass strength when `params.hires` gives none.
pub const DEFAULT_HIRES_STRENGTH: f64 = 0.5;
/// Largest init image, in encoded bytes (a `data:` URI decoded, an S3 object's size): checked
/// before an S3 download starts. A `data:` URI is bounded by `max_message_bytes` first.
pub const MAX_INIT_IMAGE_BYTES: usize = 4 << 20;
/// Longest S3 key of an `init_image` (S3's own limit).
pub const MAX_INIT_KEY_BYTES: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Wire structs
// ---------------------------------------------------------------------------------------------

/// The message as JSON. Unknown fields are errors everywhere, so a typo (`"step": 30`) is
/// reported instead of silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchMessage {
    pub schema_version: u32,
    pub batch_id: String,
    pub items: Vec<MessageItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<MessageParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<MessageOutput>,
}

/// One prompt of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageItem {
    pub id: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
    /// img2img: the image to start from, `s3://bucket/key` (a bucket the worker allows) or a
    /// `data:image/{png,jpeg,webp};base64,…` URI. Absent: txt2img.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// Inpainting (with `init_image`): white repaints, black keeps; the same forms as
    /// `init_image`, and the same size as it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<String>,
}

/// Sampling parameters shared by every image of a message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Run the safety checker on this batch's images (default: the worker's `--safety-checker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_checker: Option<bool>,
    /// Text-encoder layers to skip from the end, AUTOMATIC1111/ComfyUI numbering (1 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// Guidance rescale φ in 0..=1 (0 = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// `"plain"` (default: as diffusers) or `"a1111"` (AUTOMATIC1111's weights and long prompts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_syntax: Option<String>,
    /// LoRAs by name in the worker's LoRA folder, with weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<MessageLora>>,
    /// img2img and inpainting strength in (0, 1] (default [`DEFAULT_STRENGTH`] for img2img,
    /// [`DEFAULT_INPAINT_STRENGTH`] for inpainting); only with `init_image` items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the masks' Gaussian blur radius in pixels, `0..=`[`MAX_MASK_BLUR`](crate::pipeline::mask::MAX_MASK_BLUR) (default
    /// 0: none), as diffusers' `mask_processor.blur` / A1111's "Mask blur"; only with
    /// `mask_image` items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<f64>,
    /// Inpainting: repaint only each mask's bounding box grown by this many pixels, at the
    /// output size, then paste it back (diffusers' `padding_mask_crop`); only with
    /// `mask_image` items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_mask_crop: Option<u32>,
    /// Hires fix: generate, upscale, img2img at the larger size (txt2img items only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<MessageHires>,
}

/// `params.hires`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageHires {
    /// Output size over `width` × `height`, in (1, 4]; sizes round down to multiples of 8.
    pub scale: f64,
    /// Steps of the second pass's schedule (default: `params.steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Strength of the second pass in (0, 1] (default [`DEFAULT_HIRES_STRENGTH`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// `"lanczos"` (default) or `"latent"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscaler: Option<String>,
}

impl MessageHires {
    pub const FIELDS: &'static [&'static str] = &["scale", "steps", "strength", "upscaler"];
}

/// One LoRA of `params.loras`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageLora {
    /// A file stem in the worker's `--lora-dir` (never a path).
    pub name: String,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// Where the images go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `"png"` (default), `"jpeg"` or `"webp"` (lossless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// JPEG quality 1..=100 (default 90); refused with the lossless formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u32>,
    /// Where the batch's events are also POSTed (see docs/webhooks.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<MessageWebhook>,
}

/// `output.webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageWebhook {
    /// `https://…` on a host the worker allows ([`crate::webhook::WebhookUrl::parse`]).
    pub url: String,
}

impl MessageWebhook {
    pub const FIELDS: &'static [&'static str] = &["url"];
    pub const REQUIRED: &'static [&'static str] = &["url"];
}

impl BatchMessage {
    /// The JSON field names the struct accepts (tests tie them to serde and to the JSON Schema).
    pub const FIELDS: &'static [&'static str] =
        &["schema_version", "batch_id", "items", "params", "output"];
    pub const REQUIRED: &'static [&'static str] = &["schema_version", "batch_id", "items"];

    /// Serialized message body.
    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a BatchMessage always serializes")
    }
}

impl MessageItem {
    pub const FIELDS: &'static [&'static str] = &[
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "num_images",
        "init_image",
        "mask_image",
    ];
    pub const REQUIRED: &'static [&'static str] = &["id", "prompt"];
}

impl MessageParams {
    pub const FIELDS: &'static [&'static str] = &[
        "steps",
        "guidance_scale",
        "width",
        "height",
        "scheduler",
        "preset",
        "safety_checker",
        "clip_skip",
        "guidance_rescale",
        "prompt_syntax",
        "loras",
        "strength",
        "mask_blur",
        "padding_mask_crop",
        "hires",
    ];

    /// No field set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl MessageOutput {
    pub const FIELDS: &'static [&'static str] =
        &["bucket", "prefix", "format", "quality", "webhook"];

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Limits and presets
// ---------------------------------------------------------------------------------------------

/// What a worker accepts. `Deserialize` with defaults for every missing key, so a config file can
/// set only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Size of a message body in bytes, checked before it is parsed.
    pub max_message_bytes: usize,
    /// Items per message.
    pub max_items: usize,
    /// `num_images` of one item.
    pub max_images_per_item: u32,
    /// Images per message, all items together.
    pub max_total_images: usize,
    /// Work of one message in image-steps-megapixels ([`work_units`]); more is `too_much_work`.
    /// One message must finish well within the broker's consumer timeout on the slowest GPU.
    pub max_message_work: f64,
    /// Prompt and negative prompt, in bytes.
    pub max_prompt_bytes: usize,
    /// Width and height, in pixels.
    pub max_side: i64,
    pub min_steps: usize,
    pub max_steps: usize,
    /// Buckets a message may name. Empty: only `default_bucket`. The default bucket is always
    /// allowed (naming it is the same as leaving the bucket out).
    pub allowed_buckets: Vec<String>,
    /// Bucket of messages that name none; without one such messages are invalid.
    pub default_bucket: Option<String>,
    /// Prefix of messages that name none ("": keys start with the batch id).
    pub default_prefix: String,
    /// The LCM-LoRA preset `fast` fuses (a name in the worker's LoRA folder); without one the
    /// preset is refused.
    pub lcm_lora: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_items: 256,
            max_images_per_item: 16,
            max_total_images: 1024,
            max_message_work: DEFAULT_MAX_MESSAGE_WORK,
            max_prompt_bytes: 2048,
            max_side: 1024,
            min_steps: 1,
            max_steps: 150,
            allowed_buckets: Vec::new(),
            default_bucket: None,
            default_prefix: String::new(),
            lcm_lora: None,
        }
    }
}

impl Limits {
    /// Checks the configuration itself (for worker start-up): a usable default prefix, sane ranges.
    pub fn check(&self) -> Result<(), String> {
        check_prefix(&self.default_prefix).map_err(|e| format!("default_prefix: {e}"))?;
        if self.min_steps == 0 || self.min_steps > self.max_steps {
            return Err(format!(
                "steps range {}..={} is empty or starts at 0",
                self.min_steps, self.max_steps
            ));
        }
        if self.max_side < 8 {
            return Err(format!("max_side {} is below 8", self.max_side));
        }
        if !(self.max_message_work.is_finite() && self.max_message_work > 0.0) {
            return Err("max_message_work must be a positive number".into());
        }
        if self.max_message_bytes == 0 {
            return Err("max_message_bytes must be >= 1".into());
        }
        if self.max_items == 0 || self.max_images_per_item == 0 || self.max_total_images == 0 {
            return Err("max_items, max_images_per_item and max_total_images must be >= 1".into());
        }
        if self
            .allowed_buckets
            .iter()
            .chain(&self.default_bucket)
            .any(|b| b.is_empty())
        {
            return Err("bucket names must not be empty".into());
        }
        Ok(())
    }

    pub fn bucket_allowed(&self, bucket: &str) -> bool {
        self.default_bucket.as_deref() == Some(bucket)
            || self.allowed_buckets.iter().any(|b| b == bucket)
    }
}

/// A named set of defaults for steps, guidance and scheduler; explicit `params` win over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub steps: usize,
    pub guidance_scale: f64,
    /// `None`: the default scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// Fuses the worker's LCM-LoRA ([`Limits::lcm_lora`]) at weight 1.
    pub lcm_lora: bool,
}

pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "concept",
        steps: 35,
        guidance_scale: 8.0,
        scheduler: None,
        lcm_lora: false,
    },
    Preset {
        name: "quality",
        steps: 60,
        guidance_scale: 7.5,
        scheduler: None,
        lcm_lora: false,
    },
    Preset {
        name: "production",
        steps: 25,
        guidance_scale: 8.5,
        scheduler: None,
        lcm_lora: false,
    },
    Preset {
        name: "style-test",
        steps: 45,
        guidance_scale: 7.0,
        scheduler: None,
        lcm_lora: false,
    },
    // Latent consistency (Luo et al., 2023): an LCM-LoRA distils the model to sample in 4-8
    // steps with the LCM sampler; guidance 1 (no classifier-free guidance) as LCM-LoRA is
    // trained, which also halves the UNet work per step.
    Preset {
        name: "fast",
        steps: 4,
        guidance_scale: 1.0,
        scheduler: Some(SchedulerKind::Lcm),
        lcm_lora: true,
    },
];

/// The preset called `name` (exact, case-sensitive).
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a message was rejected. [`as_str`](Self::as_str) is stable: it goes into the
/// `x-sdbatch-error` header, `batch.failed` events and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// The body is larger than the worker's `max_message_bytes` (checked before parsing).
    TooLarge,
    /// Not UTF-8, not JSON, or not a JSON object.
    NotJson,
    /// `schema_version` missing or not 1.
    SchemaVersion,
    /// The JSON does not have the message's shape where no field-specific code applies: an
    /// unknown field (typo), a duplicate key, `params`/`output` not objects, a `seed` that is not
    /// an integer in 0..2^64.
    Schema,
    BatchId,
    /// `items` missing, not an array of objects, empty, or longer than `max_items`.
    Items,
    ItemId,
    DuplicateItemId,
    /// `prompt` or `negative_prompt`.
    Prompt,
    NumImages,
    TooManyImages,
    Steps,
    Guidance,
    /// `width` or `height`.
    Size,
    /// images × steps × megapixels above the worker's `max_message_work`.
    TooMuchWork,
    Scheduler,
    Preset,
    /// `clip_skip` outside 1..=[`MAX_CLIP_SKIP`].
    ClipSkip,
    /// `prompt_syntax` other than `plain` or `a1111`.
    PromptSyntax,
    /// `loras`: a bad name or weight, a duplicate, too many; or (set by the worker) a LoRA the
    /// worker's folder does not have.
    Lora,
    Bucket,
    Prefix,
    /// `output.format` other than `png`, `jpeg` or `webp`.
    Format,
    /// `output.quality` outside 1..=100, or given for a lossless format.
    Quality,
    /// The batch asks for the safety checker and the worker has none (set by the worker, not
    /// by `parse`).
    SafetyChecker,
    /// Objects stored under this `batch_id` were made by a message with different work (set by
    /// the worker from the manifest or the images' metadata, not by `parse`).
    BatchIdConflict,
    /// `items[].init_image` is not an `s3://` key in an allowed bucket nor a PNG/JPEG/WebP
    /// `data:` URI in base64.
    InitImage,
    /// The init image's S3 object does not exist (set by the worker).
    InitImageMissing,
    /// The init image is not a PNG, JPEG or WebP the worker can decode: another format, a
    /// truncated or corrupt file (set by the worker, or by `parse` for a `data:` URI's type).
    InitImageUnreadable,
    /// The init image is over [`MAX_INIT_IMAGE_BYTES`] or its declared dimensions are over the
    /// decoder's limits ([`crate::init_image::MAX_SIDE`], [`crate::init_image::MAX_PIXELS`]).
    InitImageTooLarge,
    /// `params.strength` outside (0, 1], running no step with the batch's steps, or given
    /// without any `init_image`.
    Strength,
    /// `items[].mask_image` malformed (as [`Self::InitImage`]), or given without an
    /// `init_image`; or (set by the worker) missing on an item for an inpainting model.
    MaskImage,
    /// The mask's S3 object does not exist (set by the worker).
    MaskImageMissing,
    /// The mask is not a PNG, JPEG or WebP the worker can decode.
    MaskImageUnreadable,
    /// The mask is over the same limits as an init image.
    MaskImageTooLarge,
    /// The mask's size differs from its init image's (set by the worker).
    MaskImageSize,
    /// `params.mask_blur` not a number in `0..=`[`MAX_MASK_BLUR`](crate::pipeline::mask::MAX_MASK_BLUR), or given without any
    /// `mask_image`.
    MaskBlur,
    /// `params.padding_mask_crop` not an integer in `0..=`[`MAX_PADDING_MASK_CROP`](crate::pipeline::mask::MAX_PADDING_MASK_CROP),
    /// or given without any `mask_image`.
    PaddingMaskCrop,
    /// `params.hires` malformed, out of range, larger than the worker's `max_side`, or with
    /// `init_image` items.
    Hires,
    /// `output.webhook` not `{"url": …}` with a URL of an accepted shape; or (set by the worker)
    /// a URL its webhook policy refuses (host not allowed, plain http, a private address).
    Webhook,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 40] = [
        InvalidReason::TooLarge,
        InvalidReason::NotJson,
        InvalidReason::SchemaVersion,
        InvalidReason::Schema,
        InvalidReason::BatchId,
        InvalidReason::Items,
        InvalidReason::ItemId,
        InvalidReason::DuplicateItemId,
        InvalidReason::Prompt,
        InvalidReason::NumImages,
        InvalidReason::TooManyImages,
        InvalidReason::Steps,
        InvalidReason::Guidance,
        InvalidReason::Size,
        InvalidReason::TooMuchWork,
        InvalidReason::Scheduler,
        InvalidReason::Preset,
        InvalidReason::ClipSkip,
        InvalidReason::PromptSyntax,
        InvalidReason::Lora,
        InvalidReason::Bucket,
        InvalidReason::Prefix,
        InvalidReason::Format,
        InvalidReason::Quality,
        InvalidReason::SafetyChecker,
        InvalidReason::BatchIdConflict,
        InvalidReason::InitImage,
        InvalidReason::InitImageMissing,
        InvalidReason::InitImageUnreadable,
        InvalidReason::InitImageTooLarge,
        InvalidReason::Strength,
        InvalidReason::MaskImage,
        InvalidReason::MaskImageMissing,
        InvalidReason::MaskImageUnreadable,
        InvalidReason::MaskImageTooLarge,
        InvalidReason::MaskImageSize,
        InvalidReason::MaskBlur,
        InvalidReason::PaddingMaskCrop,
        InvalidReason::Hires,
        InvalidReason::Webhook,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::TooLarge => "too_large",
            InvalidReason::NotJson => "not_json",
            InvalidReason::SchemaVersion => "schema_version",
            InvalidReason::Schema => "schema",
            InvalidReason::BatchId => "batch_id",
            InvalidReason::Items => "items",
            InvalidReason::ItemId => "item_id",
            InvalidReason::DuplicateItemId => "duplicate_item_id",
            InvalidReason::Prompt => "prompt",
            InvalidReason::NumImages => "num_images",
            InvalidReason::TooManyImages => "too_many_images",
            InvalidReason::Steps => "steps",
            InvalidReason::Guidance => "guidance",
            InvalidReason::Size => "size",
            InvalidReason::TooMuchWork => "too_much_work",
            InvalidReason::Scheduler => "scheduler",
            InvalidReason::Preset => "preset",
            InvalidReason::ClipSkip => "clip_skip",
            InvalidReason::PromptSyntax => "prompt_syntax",
            InvalidReason::Lora => "lora",
            InvalidReason::Bucket => "bucket",
            InvalidReason::Prefix => "prefix",
            InvalidReason::Format => "format",
            InvalidReason::Quality => "quality",
            InvalidReason::SafetyChecker => "safety_checker",
            InvalidReason::BatchIdConflict => "batch_id_conflict",
            InvalidReason::InitImage => "init_image",
            InvalidReason::InitImageMissing => "init_image_missing",
            InvalidReason::InitImageUnreadable => "init_image_unreadable",
            InvalidReason::InitImageTooLarge => "init_image_too_large",
            InvalidReason::Strength => "strength",
            InvalidReason::MaskImage => "mask_image",
            InvalidReason::MaskImageMissing => "mask_image_missing",
            InvalidReason::MaskImageUnreadable => "mask_image_unreadable",
            InvalidReason::MaskImageTooLarge => "mask_image_too_large",
            InvalidReason::MaskImageSize => "mask_image_size",
            InvalidReason::MaskBlur => "mask_blur",
            InvalidReason::PaddingMaskCrop => "padding_mask_crop",
            InvalidReason::Hires => "hires",
            InvalidReason::Webhook => "webhook",
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message. Never worth retrying: the same bytes fail the same way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid batch message ({reason}): {message}")]
pub struct Invalid {
    pub reason: InvalidReason,
    /// For people: names the field (`items[3].id`) and the rule. Quoted user values are cut to
    /// 64 characters and the whole text to [`crate::bounded::MAX_REASON_BYTES`] (serde's own
    /// messages quote values whole), so it stays header-sized.
    pub message: String,
    /// The message's `batch_id` when it had a valid one, even if other fields are invalid.
    pub batch_id: Option<String>,
}

impl Invalid {
    /// The same rejection with its text cut to [`crate::bounded::MAX_REASON_BYTES`].
    fn bounded(self) -> Self {
        Self {
            message: crate::bounded::reason(&self.message),
            ..self
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The validated batch
// ---------------------------------------------------------------------------------------------

/// A validated message with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_id: String,
    pub items: Vec<BatchItem>,
    pub params: GenerateParams,
    /// The preset the message named, if any.
    pub preset: Option<String>,
    /// The message's safety-checker choice (`None`: the worker's default).
    pub safety_checker: Option<bool>,
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; "" for none.
    pub prefix: String,
    /// Format (and JPEG quality) of the images.
    pub encoding: Encoding,
    /// img2img strength of the items with an init image and no mask ([`DEFAULT_STRENGTH`]
    /// when not given).
    pub strength: f64,
    /// Inpainting strength of the items with a mask ([`DEFAULT_INPAINT_STRENGTH`] when not
    /// given; `params.strength` sets both).
    pub inpaint_strength: f64,
    /// Gaussian blur radius of the inpainting items' masks (0: none).
    pub mask_blur: f64,
    /// The inpainting items' `padding_mask_crop` (`None`: the whole image).
    pub padding_mask_crop: Option<u32>,
    /// Hires fix of every (txt2img) image.
    pub hires: Option<Hires>,
    /// Where the batch's events are also sent (shape checked; the worker checks its policy).
    /// Not part of the work: the same work with another webhook is the same batch.
    pub webhook: Option<crate::webhook::WebhookUrl>,
}

/// What an item's images start from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ItemMode {
    Txt2Img,
    /// From the init image, at this strength.
    Img2Img(f64),
    /// From the init image, repainting the mask's white part, at this strength.
    Inpaint(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub id: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Seed of image 0; image `n` uses `seed + n` (wrapping).
    pub seed: u64,
    /// Whether `seed` was derived from the batch and item ids (see [`derive_seed`]).
    pub seed_derived: bool,
    pub num_images: u32,
    /// img2img: the image every image of this item starts from. `None`: txt2img.
    pub init_image: Option<InputImage>,
    /// Inpainting (only with `init_image`): white repaints, black keeps.
    pub mask_image: Option<InputImage>,
}

/// Where an init image comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An object the worker fetches (the bucket is one the worker allows).
    S3 { bucket: String, key: String },
    /// The bytes of a `data:` URI, decoded from base64 (at most [`MAX_INIT_IMAGE_BYTES`]).
    Data { bytes: std::sync::Arc<[u8]> },
}

// Never the bytes themselves: a `Batch` is logged and compared in tests.
impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            ImageSource::Data { bytes } => write!(f, "data:<{} bytes>", bytes.len()),
        }
    }
}

/// An item's init image: its source and, once its bytes are known, their SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputImage {
    pub source: ImageSource,
    /// SHA-256 (hex) of the encoded bytes: set by `parse` for a `data:` URI, by the worker once
    /// it fetched an S3 object. Part of the work hash and of the image records, so a result can
    /// be reproduced from the same bytes.
    pub sha256: Option<String>,
}

impl InputImage {
    /// What the events record: the `s3://` URI, or `data:` (the bytes are identified by
    /// [`Self::sha256`]; a data URI is never echoed).
    pub fn describe(&self) -> String {
        match &self.source {
            ImageSource::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
            ImageSource::Data { .. } => "data:".into(),
        }
    }
}

impl BatchItem {
    /// Seed of image `n` of this item.
    pub fn image_seed(&self, n: u32) -> u64 {
        self.seed.wrapping_add(u64::from(n))
    }
}

impl Batch {
    /// How the images of `item` start.
    pub fn mode(&self, item: &BatchItem) -> ItemMode {
        match (&item.init_image, &item.mask_image) {
            (None, _) => ItemMode::Txt2Img,
            (Some(_), None) => ItemMode::Img2Img(self.strength),
            (Some(_), Some(_)) => ItemMode::Inpaint(self.inpaint_strength),
        }
    }

    /// The size of the stored images: the hires fix's when there is one.
    pub fn output_size(&self) -> (i64, i64) {
        let (w, h) = (self.params.width, self.params.height);
        match &self.hires {
            // Validated by `parse`, so the size is defined; the first pass's otherwise.
            Some(hires) => hires.size(w, h, SIZE_MULTIPLE).unwrap_or((w, h)),
            None => (w, h),
        }
    }

    /// One request per image, in message order: item by item, `n` = 0..num_images within an item.
    pub fn image_requests(&self) -> Vec<(usize, u32, ImageRequest)> {
        let mut out = Vec::with_capacity(self.total_images());
        for (index, item) in self.items.iter().enumerate() {
            for n in 0..item.num_images {
                out.push((
                    index,
                    n,
                    ImageRequest {
                        prompt: item.prompt.clone(),
                        negative_prompt: item.negative_prompt.clone(),
                        seed: item.image_seed(n),
                    },
                ));
            }
        }
        out
    }

    /// SHA-256 (hex) of the batch's work as validated: its id, every item (id, prompt, negative
    /// prompt, resolved seed, image count), the resolved parameters, the safety-checker choice,
    /// bucket and prefix. The same work gives the same hash however the message was written
    /// (presets, key order, defaults, derived seeds); the manifest and every image record it, so
    /// a different message reusing a `batch_id` is recognised as a conflict.
    pub fn work_sha256(&self) -> String {
        let p = &self.params;
        let mut canonical = serde_json::json!({
            "v": 1,
            "batch_id": self.batch_id,
            "items": self.items.iter().map(|i| serde_json::json!({
                "id": i.id,
                "prompt": i.prompt,
                "negative_prompt": i.negative_prompt,
                "seed": i.seed,
                "num_images": i.num_images,
            })).collect::<Vec<_>>(),
            "params": {
                "steps": p.steps,
                "guidance_scale": p.guidance_scale,
                "width": p.width,
                "height": p.height,
                "scheduler": p.scheduler.name(),
            },
            "safety_checker": self.safety_checker,
            "bucket": self.bucket,
            "prefix": self.prefix,
        });
        // Newer parameters only when they change something, so the hash of work that does not
        // use them is the one earlier versions recorded (a batch in flight across an upgrade
        // still resumes).
        if p.clip_skip != 1 {
            canonical["clip_skip"] = serde_json::json!(p.clip_skip);
        }
        if p.guidance_rescale != 0.0 {
            canonical["guidance_rescale"] = serde_json::json!(p.guidance_rescale);
        }
        if p.prompt_syntax != PromptSyntax::Plain {
            canonical["prompt_syntax"] = serde_json::json!(p.prompt_syntax.as_str());
        }
        if !p.loras.is_empty() {
            canonical["loras"] = serde_json::json!(p.loras);
        }
        // img2img: the strength and each init image's source and bytes (by hash). Items without
        // one hash as before.
        if self.items.iter().any(|i| i.init_image.is_some()) {
            canonical["strength"] = serde_json::json!(self.strength);
            for (item, out) in self.items.iter().zip(
                canonical["items"]
                    .as_array_mut()
                    .expect("built as an array above"),
            ) {
                if let Some(init) = &item.init_image {
                    out["init_image"] = serde_json::json!(init.describe());
                    out["init_sha256"] = serde_json::json!(init.sha256);
                }
                if let Some(mask) = &item.mask_image {
                    out["mask_image"] = serde_json::json!(mask.describe());
                    out["mask_sha256"] = serde_json::json!(mask.sha256);
                }
            }
            if self.items.iter().any(|i| i.mask_image.is_some()) {
                canonical["inpaint_strength"] = serde_json::json!(self.inpaint_strength);
                // Only when set: work without it hashes as before.
                if self.mask_blur != 0.0 {
                    canonical["mask_blur"] = serde_json::json!(self.mask_blur);
                }
                if let Some(pad) = self.padding_mask_crop {
                    canonical["padding_mask_crop"] = serde_json::json!(pad);
                }
            }
        }
        if let Some(h) = &self.hires {
            canonical["hires"] = serde_json::json!(h);
        }
        // The format changes the objects (keys, bytes); PNG is what earlier versions wrote.
        if self.encoding != Encoding::PNG {
            canonical["format"] = serde_json::json!(self.encoding.format.name());
            canonical["quality"] = serde_json::json!(self.encoding.quality);
        }
        // The keys are written in one fixed order (sorted, or as listed here if serde_json's
        // `preserve_order` is on): canonical bytes either way.
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    /// Work in image-steps-megapixels: what one message asks of a GPU, for the worker's cap.
    pub fn work_units(&self) -> f64 {
        let p = &self.params;
        self.total_images() as f64 * image_work(p.steps, p.width, p.height, self.hires.as_ref())
    }

    /// `{prefix}/{batch_id}/{item_id}/{n}.{png,jpg,webp}` (no leading `/` without a prefix).
    pub fn image_key(&self, item_id: &str, n: u32) -> String {
        self.key(&format!(
            "{item_id}/{}",
            self.encoding.file_name(&n.to_string())
        ))
    }

    /// `{prefix}/{batch_id}/`: the folder of every object of the batch.
    pub fn folder_key(&self) -> String {
        self.key("")
    }

    /// `{prefix}/{batch_id}/manifest.json`.
    pub fn manifest_key(&self) -> String {
        self.key("manifest.json")
    }

    /// `{prefix}/{batch_id}/progress.json`: the last `batch.progress` of a running batch.
    pub fn progress_key(&self) -> String {
        self.key("progress.json")
    }

    /// `{prefix}/{batch_id}/cancelled.json`: written by `sdbatch cancel` ([`crate::cancel`]).
    pub fn tombstone_key(&self) -> String {
        self.key(crate::cancel::TOMBSTONE_NAME)
    }

    pub fn total_images(&self) -> usize {
        self.items.iter().map(|i| i.num_images as usize).sum()
    }

    fn key(&self, rest: &str) -> String {
        batch_key(&self.prefix, &self.batch_id, rest)
    }
}

/// `{prefix}/{batch_id}/{rest}` (no leading `/` without a prefix): where a batch's objects are.
pub fn batch_key(prefix: &str, batch_id: &str, rest: &str) -> String {
    if prefix.is_empty() {
        format!("{batch_id}/{rest}")
    } else {
        format!("{prefix}/{batch_id}/{rest}")
    }
}

/// Work in image-steps-megapixels (`images × steps × width × height / 10^6`): a 512² image at 50
/// steps is 13.1 units. Time on a given GPU is close to proportional to it.
pub fn work_units(images: usize, steps: usize, width: i64, height: i64) -> f64 {
    images as f64 * steps as f64 * (width as f64 * height as f64) / 1e6
}

/// [`work_units`] of one image, a hires fix's second pass included (the steps its strength
/// runs, at the larger size).
pub fn image_work(steps: usize, width: i64, height: i64, hires: Option<&Hires>) -> f64 {
    let first = work_units(1, steps, width, height);
    let Some(h) = hires else {
        return first;
    };
    match h.size(width, height, SIZE_MULTIPLE) {
        Ok((w, hh)) => first + work_units(1, steps_run(h.steps, h.strength), w, hh),
        Err(_) => first,
    }
}

/// The steps an img2img run of `steps` at `strength` runs (all of them for a strength it
/// refuses).
pub fn steps_run(steps: usize, strength: f64) -> usize {
    steps - crate::pipeline::img2img_begin(steps, strength).unwrap_or(0)
}

/// The seed of an item without one: the first 8 bytes (big-endian) of
/// `sha256("sdbatch-seed-v1\0{batch_id}\0{item_id}")`, masked to 53 bits so that JSON readers
/// using doubles (JavaScript) read it exactly.
pub fn derive_seed(batch_id: &str, item_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"sdbatch-seed-v1\0");
    h.update(batch_id.as_bytes());
    h.update(b"\0");
    h.update(item_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) & ((1u64 << 53) - 1)
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation
// ---------------------------------------------------------------------------------------------

/// Whether `id` is a valid batch id: `[A-Za-z0-9_-]{1,128}`.
pub fn is_valid_batch_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks an `output.prefix`: "" or `/`-separated segments that are each a safe id
/// (`[A-Za-z0-9_.-]{1,128}`, not `.` or `..`), at most 512 bytes, no leading or trailing `/`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > MAX_PREFIX_BYTES {
        return Err(format!(
            "{} bytes long, limit {MAX_PREFIX_BYTES}",
            prefix.len()
        ));
    }
    if prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(format!("{} must not start or end with `/`", quote(prefix)));
    }
    if let Some((bad, problem)) = prefix
        .split('/')
        .find_map(|s| id_problem(s).map(|p| (s, p)))
    {
        return Err(format!(
            "segment {} of {}: {problem} (segments match [A-Za-z0-9_.-]{{1,128}}, not `.`, `..` \
             or `.sdbatch-*`)",
            quote(bad),
            quote(prefix)
        ));
    }
    Ok(())
}

/// Checks a prompt's text; `what` names it in messages.
fn check_prompt(
    text: &str,
    what: &str,
    may_be_empty: bool,
    max_bytes: usize,
) -> Result<(), String> {
    if !may_be_empty && text.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.len() > max_bytes {
        return Err(format!(
            "{what} is {} bytes long, limit {max_bytes}",
            text.len()
        ));
    }
    if text.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

/// Parses and validates a message body. `native_size` is the model's native image size, the
/// default width and height.
///
/// The body's size is checked before anything else reads it, so an oversized message costs no
/// parsing; every rejection's text is bounded ([`crate::bounded::reason`]).
pub fn parse(body: &[u8], limits: &Limits, native_size: i64) -> Result<Batch, Invalid> {
    if body.len() > limits.max_message_bytes {
        return Err(Invalid {
            reason: InvalidReason::TooLarge,
            message: format!(
                "message body is {} bytes, limit {} (max_message_bytes)",
                body.len(),
                limits.max_message_bytes
            ),
            batch_id: None,
        });
    }
    parse_unbounded(body, limits, native_size).map_err(Invalid::bounded)
}

fn parse_unbounded(body: &[u8], limits: &Limits, native_size: i64) -> Result<Batch, Invalid> {
    let not_json = |message: String| Invalid {
        reason: InvalidReason::NotJson,
        message,
        batch_id: None,
    };
    let text =
        std::str::from_utf8(body).map_err(|e| not_json(format!("body is not UTF-8: {e}")))?;
    // The body is parsed once, into a tree that remembers duplicate keys (`Value` alone would
    // keep the last one silently); the structs are then read from that tree, not from the text.
    let duplicate = RefCell::new(None);
    let value = StrictValue {
        duplicate: &duplicate,
    }
    .deserialize(&mut serde_json::Deserializer::from_str(text))
    .map_err(|e| not_json(format!("body is not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(not_json("body is not a JSON object".into()));
    };
    let batch_id = obj
        .get("batch_id")
        .and_then(Value::as_str)
        .filter(|id| is_valid_batch_id(id))
        .map(str::to_string);
    let invalid = |(reason, message): (InvalidReason, String)| Invalid {
        reason,
        message,
        batch_id: batch_id.clone(),
    };

    // The version first: a newer message may have fields this code does not know.
    match obj.get("schema_version") {
        None => {
            return Err(invalid((
                InvalidReason::SchemaVersion,
                "missing schema_version".into(),
            )));
        }
        Some(v) if v.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
        Some(v) => {
            return Err(invalid((
                InvalidReason::SchemaVersion,
                format!(
                    "unsupported schema_version {}: this worker reads {SCHEMA_VERSION}",
                    quote(&v.to_string())
                ),
            )));
        }
    }

    if let Some(path) = duplicate.into_inner() {
        return Err(invalid((
            InvalidReason::Schema,
            format!("duplicate field {path}"),
        )));
    }
    // `check_shape` blames the field of a wrong key or type, and refuses what serde's derive
    // would take but the format does not have (a struct written as an array: `"params": [30]`).
    // The structs then have the last word.
    check_shape(obj).map_err(invalid)?;
    let msg = BatchMessage::deserialize(&value).map_err(|e| {
        invalid((
            InvalidReason::Schema,
            format!("message does not match the schema: {e}"),
        ))
    })?;
    validate_unbounded(&msg, limits, native_size)
}

/// Validates a message already in struct form (what `parse` does after deserializing; producers
/// can use it to check a message before sending it).
pub fn validate(msg: &BatchMessage, limits: &Limits, native_size: i64) -> Result<Batch, Invalid> {
    validate_unbounded(msg, limits, native_size).map_err(Invalid::bounded)
}

fn validate_unbounded(
    msg: &BatchMessage,
    limits: &Limits,
    native_size: i64,
) -> Result<Batch, Invalid> {
    use InvalidReason as R;
    let batch_id = is_valid_batch_id(&msg.batch_id).then(|| msg.batch_id.clone());
    let fail = |reason: InvalidReason, message: String| Invalid {
        reason,
        message,
        batch_id: batch_id.clone(),
    };

    if msg.schema_version != SCHEMA_VERSION {
        return Err(fail(
            R::SchemaVersion,
            format!(
                "unsupported schema_version {}: this worker reads {SCHEMA_VERSION}",
                msg.schema_version
            ),
        ));
    }
    if batch_id.is_none() {
        return Err(fail(
            R::BatchId,
            format!(
                "batch_id {} must match [A-Za-z0-9_-]{{1,128}}",
                quote(&msg.batch_id)
            ),
        ));
    }

    // Items.
    if msg.items.is_empty() {
        return Err(fail(R::Items, "items is empty".into()));
    }
    if msg.items.len() > limits.max_items {
        return Err(fail(
            R::Items,
            format!(
                "{} items, limit {} per message",
                msg.items.len(),
                limits.max_items
            ),
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut items = Vec::with_capacity(msg.items.len());
    let mut total: usize = 0;
    for (i, item) in msg.items.iter().enumerate() {
        let at = format!("items[{i}]");
        if let Some(problem) = id_problem(&item.id) {
            return Err(fail(
                R::ItemId,
                format!(
                    "{at}.id {}: {problem} (ids match [A-Za-z0-9_.-]{{1,128}}, not `.`, `..` or \
                     `.sdbatch-*`)",
                    quote(&item.id)
                ),
            ));
        }
        if RESERVED_ITEM_IDS.contains(&item.id.as_str()) {
            return Err(fail(
                R::ItemId,
                format!(
                    "{at}.id {:?} is reserved for the batch's own objects",
                    item.id
                ),
            ));
        }
        if let Some(first) = seen.insert(&item.id, i) {
            return Err(fail(
                R::DuplicateItemId,
                format!("{at}.id {} already used by items[{first}]", quote(&item.id)),
            ));
        }
        check_prompt(
            &item.prompt,
            &format!("{at}.prompt"),
            false,
            limits.max_prompt_bytes,
        )
        .map_err(|m| fail(R::Prompt, m))?;
        if let Some(neg) = &item.negative_prompt {
            check_prompt(
                neg,
                &format!("{at}.negative_prompt"),
                true,
                limits.max_prompt_bytes,
            )
            .map_err(|m| fail(R::Prompt, m))?;
        }
        let num_images = item.num_images.unwrap_or(1);
        if num_images == 0 || num_images > limits.max_images_per_item {
            return Err(fail(
                R::NumImages,
                format!(
                    "{at}.num_images {num_images} must be in 1..={}",
                    limits.max_images_per_item
                ),
            ));
        }
        total += num_images as usize;
        let (seed, seed_derived) = match item.seed {
            Some(s) => (s, false),
            None => (derive_seed(&msg.batch_id, &item.id), true),
        };
        items.push(BatchItem {
            id: item.id.clone(),
            prompt: item.prompt.clone(),
            negative_prompt: item.negative_prompt.clone(),
            seed,
            seed_derived,
            num_images,
            init_image: match &item.init_image {
                None => None,
                Some(uri) => Some(
                    parse_input_image(uri, limits, InputRole::Init)
                        .map_err(|(reason, m)| fail(reason, format!("{at}.init_image: {m}")))?,
                ),
            },
            mask_image: match (&item.mask_image, &item.init_image) {
                (None, _) => None,
                (Some(_), None) => {
                    return Err(fail(
                        R::MaskImage,
                        format!(
                            "{at}.mask_image needs an init_image: the mask says which part of it \
                             to repaint"
                        ),
                    ));
                }
                (Some(uri), Some(_)) => Some(
                    parse_input_image(uri, limits, InputRole::Mask)
                        .map_err(|(reason, m)| fail(reason, format!("{at}.mask_image: {m}")))?,
                ),
            },
        });
    }
    if total > limits.max_total_images {
        return Err(fail(
            R::TooManyImages,
            format!(
                "{total} images requested, limit {} per message",
                limits.max_total_images
            ),
        ));
    }

    // Parameters: explicit values, else the preset's, else the defaults.
    let p = msg.params.clone().unwrap_or_default();
    let preset = match &p.preset {
        None => None,
        Some(name) => Some(preset(name).ok_or_else(|| {
            fail(
                R::Preset,
                format!(
                    "unknown preset {} (known: {})",
                    quote(name),
                    PRESETS.map(|p| p.name).join(", ")
                ),
            )
        })?),
    };
    let source = |explicit: bool| match (explicit, preset) {
        (true, _) => "params".to_string(),
        (false, Some(p)) => format!("preset {:?}", p.name),
        (false, None) => "the default".to_string(),
    };
    let steps = p
        .steps
        .map(|s| s as usize)
        .or(preset.map(|p| p.steps))
        .unwrap_or(DEFAULT_STEPS);
    if !(limits.min_steps..=limits.max_steps).contains(&steps) {
        return Err(fail(
            R::Steps,
            format!(
                "steps {steps} (from {}) must be in {}..={}",
                source(p.steps.is_some()),
                limits.min_steps,
                limits.max_steps
            ),
        ));
    }
    let guidance_scale = p
        .guidance_scale
        .or(preset.map(|p| p.guidance_scale))
        .unwrap_or(DEFAULT_GUIDANCE_SCALE);
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(fail(
            R::Guidance,
            format!("guidance_scale {guidance_scale} must be a finite number >= 0"),
        ));
    }
    let mut size = [0i64; 2];
    for (slot, (name, v)) in size
        .iter_mut()
        .zip([("width", p.width), ("height", p.height)])
    {
        let px = v.map(i64::from).unwrap_or(native_size);
        if px % 8 != 0 || !(8..=limits.max_side).contains(&px) {
            return Err(fail(
                R::Size,
                format!(
                    "{name} {px}{} must be a multiple of 8 in 8..={}",
                    if v.is_none() { " (model default)" } else { "" },
                    limits.max_side
                ),
            ));
        }
        *slot = px;
    }
    let scheduler = match &p.scheduler {
        None => preset
            .and_then(|p| p.scheduler)
            .unwrap_or(DEFAULT_SCHEDULER),
        Some(name) => name.parse::<SchedulerKind>().map_err(|_| {
            fail(
                R::Scheduler,
                format!(
                    "unknown scheduler {} (known: {})",
                    quote(name),
                    SchedulerKind::ALL.map(|k| k.name()).join(", ")
                ),
            )
        })?,
    };

    let clip_skip = p.clip_skip.unwrap_or(1);
    if !(1..=MAX_CLIP_SKIP).contains(&clip_skip) {
        return Err(fail(
            R::ClipSkip,
            format!("clip_skip {clip_skip} must be in 1..={MAX_CLIP_SKIP} (1 = no skip)"),
        ));
    }
    let clip_skip = clip_skip as usize;
    let guidance_rescale = p.guidance_rescale.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(fail(
            R::Guidance,
            format!("guidance_rescale {guidance_rescale} must be in 0..=1 (0 = off)"),
        ));
    }
    let prompt_syntax = match p.prompt_syntax.as_deref() {
        None => PromptSyntax::Plain,
        Some(name) => name.parse().map_err(|_| {
            fail(
                R::PromptSyntax,
                format!(
                    "prompt_syntax {} must be one of {}",
                    quote(name),
                    PromptSyntax::NAMES.join(", ")
                ),
            )
        })?,
    };
    // A prompt that does not parse would fail the whole batch on the GPU: dead-letter it here.
    if prompt_syntax == PromptSyntax::A1111 {
        for (i, item) in msg.items.iter().enumerate() {
            let prompts = [
                ("prompt", Some(&item.prompt)),
                ("negative_prompt", item.negative_prompt.as_ref()),
            ];
            for (field, text) in prompts {
                if let Some(Err(e)) = text.map(|t| prompt_weights::parse(t)) {
                    return Err(fail(R::Prompt, format!("items[{i}].{field}: {e}")));
                }
            }
        }
    }

    let mut loras: Vec<LoraWeight> = p
        .loras
        .iter()
        .flatten()
        .map(|l| LoraWeight {
            name: l.name.clone(),
            weight: l.weight.unwrap_or(1.0),
        })
        .collect();
    if let Some(preset) = preset.filter(|p| p.lcm_lora) {
        let Some(lcm) = &limits.lcm_lora else {
            return Err(fail(
                R::Preset,
                format!(
                    "preset {:?} needs an LCM-LoRA and this worker has none (--lcm-lora)",
                    preset.name
                ),
            ));
        };
        // A weight the message gives for the same LoRA wins.
        if !loras.iter().any(|l| &l.name == lcm) {
            loras.push(LoraWeight {
                name: lcm.clone(),
                weight: 1.0,
            });
        }
    }
    let loras =
        adapters::canonical(loras).map_err(|e| fail(R::Lora, format!("params.loras: {e}")))?;

    let any_img2img = items
        .iter()
        .any(|i| i.init_image.is_some() && i.mask_image.is_none());
    let any_mask = items.iter().any(|i| i.mask_image.is_some());
    let strength = p.strength.unwrap_or(DEFAULT_STRENGTH);
    let inpaint_strength = p.strength.unwrap_or(DEFAULT_INPAINT_STRENGTH);
    if p.strength.is_some() && !any_img2img && !any_mask {
        return Err(fail(
            R::Strength,
            "params.strength is only for img2img and inpainting: no item has an init_image".into(),
        ));
    }
    // The pipeline's own rule (the step the schedule starts at), checked here so the batch is
    // refused before any work instead of failing on the GPU.
    for (used, value) in [(any_img2img, strength), (any_mask, inpaint_strength)] {
        if used {
            crate::pipeline::img2img_begin(steps, value)
                .map_err(|e| fail(R::Strength, format!("params.strength: {e}")))?;
        }
    }
    let mask_blur = parse_mask_blur(p.mask_blur, any_mask).map_err(|m| fail(R::MaskBlur, m))?;
    let padding_mask_crop = parse_padding_mask_crop(p.padding_mask_crop, any_mask)
        .map_err(|m| fail(R::PaddingMaskCrop, m))?;
    let hires = match &p.hires {
        None => None,
        Some(h) => {
            Some(parse_hires(h, steps, size, limits, &items).map_err(|m| fail(R::Hires, m))?)
        }
    };

    let work = total as f64 * image_work(steps, size[0], size[1], hires.as_ref());
    if work > limits.max_message_work {
        return Err(fail(
            R::TooMuchWork,
            format!(
                "{work:.0} image-steps-megapixels ({total} images x {steps} steps x {}x{}), limit \
                 {:.0} per message: split it into several messages (sdbatch submit does)",
                size[0], size[1], limits.max_message_work
            ),
        ));
    }

    // Output.
    let out = msg.output.clone().unwrap_or_default();
    let bucket = match out.bucket {
        Some(b) if limits.bucket_allowed(&b) => b,
        Some(b) => {
            return Err(fail(
                R::Bucket,
                format!("bucket {} is not allowed on this worker", quote(&b)),
            ));
        }
        None => limits.default_bucket.clone().ok_or_else(|| {
            fail(
                R::Bucket,
                "output.bucket is required: this worker has no default bucket".into(),
            )
        })?,
    };
    let prefix = match out.prefix {
        Some(prefix) => {
            check_prefix(&prefix).map_err(|e| fail(R::Prefix, format!("output.prefix: {e}")))?;
            prefix
        }
        None => limits.default_prefix.clone(),
    };
    let format = match out.format.as_deref() {
        None => ImageFormat::Png,
        Some(name) => name.parse().map_err(|()| {
            fail(
                R::Format,
                format!(
                    "output.format {} must be one of {}",
                    quote(name),
                    ImageFormat::ALL.map(ImageFormat::name).join(", ")
                ),
            )
        })?,
    };
    let encoding =
        Encoding::new(format, out.quality).map_err(|e| fail(R::Quality, format!("output.{e}")))?;
    let webhook = out
        .webhook
        .map(|w| crate::webhook::WebhookUrl::parse(&w.url))
        .transpose()
        .map_err(|e| fail(R::Webhook, format!("output.webhook.url: {e}")))?;

    Ok(Batch {
        batch_id: msg.batch_id.clone(),
        items,
        params: GenerateParams {
            steps,
            guidance_scale,
            width: size[0],
            height: size[1],
            scheduler,
            clip_skip,
            guidance_rescale,
            prompt_syntax,
            loras,
        },
        preset: preset.map(|p| p.name.to_string()),
        safety_checker: msg.params.as_ref().and_then(|p| p.safety_checker),
        bucket,
        prefix,
        encoding,
        strength,
        inpaint_strength,
        mask_blur,
        padding_mask_crop,
        hires,
        webhook,
    })
}

/// Reads `params.padding_mask_crop`: at most
/// [`MAX_PADDING_MASK_CROP`](crate::pipeline::mask::MAX_PADDING_MASK_CROP), only for a message
/// with inpainting items (as [`parse_mask_blur`]).
fn parse_padding_mask_crop(pad: Option<u32>, any_mask: bool) -> Result<Option<u32>, String> {
    let Some(pad) = pad else {
        return Ok(None);
    };
    if !any_mask {
        return Err(
            "params.padding_mask_crop is only for inpainting: no item has a mask_image".into(),
        );
    }
    let max = crate::pipeline::mask::MAX_PADDING_MASK_CROP;
    if pad > max {
        return Err(format!(
            "params.padding_mask_crop {pad} must be in 0..={max}"
        ));
    }
    Ok(Some(pad))
}

/// Reads `params.mask_blur`: a radius in `0..=`[`MAX_MASK_BLUR`](crate::pipeline::mask::MAX_MASK_BLUR) (default 0), only for a
/// message with inpainting items (as `params.strength` is refused without init images: a
/// setting that would do nothing is more likely a mistake than a wish).
fn parse_mask_blur(mask_blur: Option<f64>, any_mask: bool) -> Result<f64, String> {
    let Some(radius) = mask_blur else {
        return Ok(0.0);
    };
    if !any_mask {
        return Err("params.mask_blur is only for inpainting: no item has a mask_image".into());
    }
    crate::pipeline::mask::check_mask_blur(radius).map_err(|e| format!("params.mask_blur: {e}"))?;
    Ok(radius)
}

/// Reads `params.hires`: a scale whose output fits the worker's `max_side`, steps within the
/// worker's limits (default: the batch's), a strength that runs at least one step, a known
/// upscaler; txt2img items only (A1111's hires fix is a txt2img feature too).
fn parse_hires(
    h: &MessageHires,
    steps: usize,
    size: [i64; 2],
    limits: &Limits,
    items: &[BatchItem],
) -> Result<Hires, String> {
    if let Some(at) = items.iter().position(|i| i.init_image.is_some()) {
        return Err(format!(
            "params.hires is for text-to-image: items[{at}] has an init_image (send img2img and \
             inpainting items in another message)"
        ));
    }
    let steps = match h.steps {
        None => steps,
        Some(s) if (limits.min_steps..=limits.max_steps).contains(&(s as usize)) => s as usize,
        Some(s) => {
            return Err(format!(
                "params.hires.steps {s} must be in {}..={}",
                limits.min_steps, limits.max_steps
            ));
        }
    };
    let upscaler = match h.upscaler.as_deref() {
        None => Upscaler::default(),
        Some(name) => name.parse().map_err(|()| {
            format!(
                "params.hires.upscaler {} must be one of {}",
                quote(name),
                Upscaler::ALL.map(Upscaler::name).join(", ")
            )
        })?,
    };
    let hires = Hires {
        scale: h.scale,
        steps,
        strength: h.strength.unwrap_or(DEFAULT_HIRES_STRENGTH),
        upscaler,
    };
    let (w, hh) = hires
        .size(size[0], size[1], SIZE_MULTIPLE)
        .map_err(|e| format!("params.hires.scale: {e}"))?;
    if w > limits.max_side || hh > limits.max_side {
        return Err(format!(
            "params.hires.scale {} makes {w}x{hh}, over this worker's {} a side",
            h.scale, limits.max_side
        ));
    }
    crate::pipeline::img2img_begin(hires.steps, hires.strength)
        .map_err(|e| format!("params.hires.strength: {e}"))?;
    Ok(hires)
}

/// Which input image of an item a value is: the reasons a bad one gets differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRole {
    Init,
    Mask,
}

impl InputRole {
    /// Malformed value (not `s3://` in an allowed bucket nor a base64 `data:` URI).
    pub fn bad(self) -> InvalidReason {
        match self {
            InputRole::Init => InvalidReason::InitImage,
            InputRole::Mask => InvalidReason::MaskImage,
        }
    }

    pub fn missing(self) -> InvalidReason {
        match self {
            InputRole::Init => InvalidReason::InitImageMissing,
            InputRole::Mask => InvalidReason::MaskImageMissing,
        }
    }

    pub fn unreadable(self) -> InvalidReason {
        match self {
            InputRole::Init => InvalidReason::InitImageUnreadable,
            InputRole::Mask => InvalidReason::MaskImageUnreadable,
        }
    }

    pub fn too_large(self) -> InvalidReason {
        match self {
            InputRole::Init => InvalidReason::InitImageTooLarge,
            InputRole::Mask => InvalidReason::MaskImageTooLarge,
        }
    }

    /// The message field, for error texts.
    pub fn field(self) -> &'static str {
        match self {
            InputRole::Init => "init_image",
            InputRole::Mask => "mask_image",
        }
    }
}

/// Reads an `init_image` or `mask_image` value: `s3://bucket/key` in an allowed bucket, or a base64 `data:` URI
/// of a PNG, JPEG or WebP of at most [`MAX_INIT_IMAGE_BYTES`].
fn parse_input_image(
    uri: &str,
    limits: &Limits,
    role: InputRole,
) -> Result<InputImage, (InvalidReason, String)> {
    use base64::Engine as _;
    if let Some(rest) = uri.strip_prefix("s3://") {
        let Some((bucket, key)) = rest.split_once('/') else {
            return Err((
                role.bad(),
                format!("{} has no key: s3://bucket/key", quote(uri)),
            ));
        };
        if !limits.bucket_allowed(bucket) {
            return Err((
                role.bad(),
                format!("bucket {} is not allowed on this worker", quote(bucket)),
            ));
        }
        if key.is_empty()
            || key.len() > MAX_INIT_KEY_BYTES
            || key.chars().any(char::is_control)
            || key.starts_with('/')
        {
            return Err((
                role.bad(),
                format!(
                    "key {} must be 1..={MAX_INIT_KEY_BYTES} bytes without control characters                      or a leading `/`",
                    quote(key)
                ),
            ));
        }
        return Ok(InputImage {
            source: ImageSource::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            },
            sha256: None,
        });
    }
    let Some(rest) = uri.strip_prefix("data:") else {
        return Err((
            role.bad(),
            format!("{} is neither s3://bucket/key nor a data: URI", quote(uri)),
        ));
    };
    let Some((media, payload)) = rest.split_once(";base64,") else {
        return Err((
            role.bad(),
            "a data: URI must be base64 (data:image/png;base64,...)".into(),
        ));
    };
    if !["image/png", "image/jpeg", "image/webp"].contains(&media) {
        return Err((
            role.unreadable(),
            format!(
                "media type {} is not image/png, image/jpeg or image/webp",
                quote(media)
            ),
        ));
    }
    // Checked on the base64 length first, so an oversized payload is never decoded.
    if payload.len() / 4 * 3 > MAX_INIT_IMAGE_BYTES + 3 {
        return Err((
            role.too_large(),
            format!(
                "the data: URI holds about {} bytes, limit {MAX_INIT_IMAGE_BYTES}",
                payload.len() / 4 * 3
            ),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| {
            (
                role.bad(),
                format!("the data: URI is not valid base64: {e}"),
            )
        })?;
    if bytes.len() > MAX_INIT_IMAGE_BYTES {
        return Err((
            role.too_large(),
            format!(
                "the data: URI holds {} bytes, limit {MAX_INIT_IMAGE_BYTES}",
                bytes.len()
            ),
        ));
    }
    Ok(InputImage {
        sha256: Some(hex::encode(Sha256::digest(&bytes))),
        source: ImageSource::Data {
            bytes: bytes.into(),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// One parse: a JSON tree that notices duplicate keys
// ---------------------------------------------------------------------------------------------

/// Reads any JSON value into a `serde_json::Value`, recording the first duplicate object key
/// (quoted and cut) instead of letting the last one win. Nesting depth stays bounded by
/// serde_json's recursion limit, which applies to every `deserialize_any` below.
#[derive(Clone, Copy)]
struct StrictValue<'a> {
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity; `from` maps them to null all the same.
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(self)?;
            if out.contains_key(&key) {
                let mut first = self.duplicate.borrow_mut();
                if first.is_none() {
                    *first = Some(quote(&key));
                }
            } else {
                out.insert(key, v);
            }
        }
        Ok(Value::Object(out))
    }
}

// ---------------------------------------------------------------------------------------------
// Shape checks: which field is wrong
// ---------------------------------------------------------------------------------------------

type Check = fn(&Value) -> Result<(), serde_json::Error>;

fn is<T: DeserializeOwned>(v: &Value) -> Result<(), serde_json::Error> {
    T::deserialize(v).map(drop)
}

/// `is::<Vec<Map<..>>>` without copying the items when they are right; serde's wording when not.
fn objects(v: &Value) -> Result<(), serde_json::Error> {
    match v.as_array() {
        Some(a) if a.iter().all(Value::is_object) => Ok(()),
        _ => is::<Vec<Map<String, Value>>>(v),
    }
}

/// `is::<Option<Map<..>>>` without copying the object when it is right.
fn object_or_null(v: &Value) -> Result<(), serde_json::Error> {
    if v.is_object() || v.is_null() {
        Ok(())
    } else {
        is::<Option<Map<String, Value>>>(v)
    }
}

/// One field of an object: name, required, reason code, type check.
type Spec = (&'static str, bool, InvalidReason, Check);

const TOP: &[Spec] = &[
    (
        "schema_version",
        true,
        InvalidReason::SchemaVersion,
        is::<u32>,
    ),
    ("batch_id", true, InvalidReason::BatchId, is::<String>),
    ("items", true, InvalidReason::Items, objects),
    ("params", false, InvalidReason::Schema, object_or_null),
    ("output", false, InvalidReason::Schema, object_or_null),
];
const ITEM: &[Spec] = &[
    ("id", true, InvalidReason::ItemId, is::<String>),
    ("prompt", true, InvalidReason::Prompt, is::<String>),
    (
        "negative_prompt",
        false,
        InvalidReason::Prompt,
        is::<Option<String>>,
    ),
    ("seed", false, InvalidReason::Schema, is::<Option<u64>>),
    (
        "num_images",
        false,
        InvalidReason::NumImages,
        is::<Option<u32>>,
    ),
    (
        "init_image",
        false,
        InvalidReason::InitImage,
        is::<Option<String>>,
    ),
    (
        "mask_image",
        false,
        InvalidReason::MaskImage,
        is::<Option<String>>,
    ),
];
const PARAMS: &[Spec] = &[
    ("steps", false, InvalidReason::Steps, is::<Option<u32>>),
    (
        "guidance_scale",
        false,
        InvalidReason::Guidance,
        is::<Option<f64>>,
    ),
    ("width", false, InvalidReason::Size, is::<Option<u32>>),
    ("height", false, InvalidReason::Size, is::<Option<u32>>),
    (
        "scheduler",
        false,
        InvalidReason::Scheduler,
        is::<Option<String>>,
    ),
    ("preset", false, InvalidReason::Preset, is::<Option<String>>),
    (
        "safety_checker",
        false,
        InvalidReason::Schema,
        is::<Option<bool>>,
    ),
    (
        "clip_skip",
        false,
        InvalidReason::ClipSkip,
        is::<Option<u32>>,
    ),
    (
        "guidance_rescale",
        false,
        InvalidReason::Guidance,
        is::<Option<f64>>,
    ),
    (
        "prompt_syntax",
        false,
        InvalidReason::PromptSyntax,
        is::<Option<String>>,
    ),
    (
        "loras",
        false,
        InvalidReason::Lora,
        is::<Option<Vec<MessageLora>>>,
    ),
    (
        "strength",
        false,
        InvalidReason::Strength,
        is::<Option<f64>>,
    ),
    (
        "mask_blur",
        false,
        InvalidReason::MaskBlur,
        is::<Option<f64>>,
    ),
    (
        "padding_mask_crop",
        false,
        InvalidReason::PaddingMaskCrop,
        is::<Option<u32>>,
    ),
    (
        "hires",
        false,
        InvalidReason::Hires,
        is::<Option<MessageHires>>,
    ),
];
const OUTPUT: &[Spec] = &[
    ("bucket", false, InvalidReason::Bucket, is::<Option<String>>),
    ("prefix", false, InvalidReason::Prefix, is::<Option<String>>),
    ("format", false, InvalidReason::Format, is::<Option<String>>),
    ("quality", false, InvalidReason::Quality, is::<Option<u32>>),
    (
        "webhook",
        false,
        InvalidReason::Webhook,
        is::<Option<MessageWebhook>>,
    ),
];

fn check_object(
    obj: &Map<String, Value>,
    at: &str,
    specs: &[Spec],
) -> Result<(), (InvalidReason, String)> {
    let path = |name: &str| {
        if at.is_empty() {
            name.to_string()
        } else {
            format!("{at}.{name}")
        }
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !specs.iter().any(|s| s.0 == k.as_str()))
    {
        return Err((
            InvalidReason::Schema,
            format!(
                "unknown field {} (expected one of: {})",
                quote(&path(key)),
                specs.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    for &(name, required, reason, check) in specs {
        match obj.get(name) {
            None if required => return Err((reason, format!("missing field {}", path(name)))),
            None => {}
            Some(v) => check(v).map_err(|e| (reason, format!("{}: {e}", path(name))))?,
        }
    }
    Ok(())
}

/// Checks keys and JSON types of the whole message, naming the field at fault.
fn check_shape(obj: &Map<String, Value>) -> Result<(), (InvalidReason, String)> {
    check_object(obj, "", TOP)?;
    let items = obj["items"].as_array().into_iter().flatten();
    for (i, item) in items.enumerate() {
        if let Some(item) = item.as_object() {
            check_object(item, &format!("items[{i}]"), ITEM)?;
        }
    }
    for (name, specs) in [("params", PARAMS), ("output", OUTPUT)] {
        if let Some(o) = obj.get(name).and_then(Value::as_object) {
            check_object(o, name, specs)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    const NATIVE: i64 = 512;

    fn limits() -> Limits {
        Limits {
            allowed_buckets: vec!["images".into(), "other".into()],
            default_bucket: Some("images".into()),
            lcm_lora: Some("lcm".into()),
            ..Limits::default()
        }
    }

    fn example() -> Value {
        json!({"schema_version": 1, "batch_id": "shoes-2026-11-26-0001",
            "items": [{"id": "sku-123", "prompt": "professional product photography of a red sneaker",
                       "negative_prompt": "blurry", "seed": 42, "num_images": 2}],
            "params": {"steps": 25, "guidance_scale": 8.5, "width": 512, "height": 512,
                       "scheduler": "pndm", "preset": "production",
                       "safety_checker": true, "clip_skip": 1, "guidance_rescale": 0.0,
                       "prompt_syntax": "plain", "loras": [{"name": "style", "weight": 0.7}]},
            "output": {"bucket": "images", "prefix": "catalog/shoes", "format": "jpeg", "quality": 85}})
    }

    fn minimal() -> Value {
        json!({"schema_version": 1, "batch_id": "b1", "items": [{"id": "a", "prompt": "a cat"}]})
    }

    fn parse_value(v: &Value) -> Result<Batch, Invalid> {
        parse(&serde_json::to_vec(v).unwrap(), &limits(), NATIVE)
    }

    /// `v` with the JSON pointer `ptr` set to `new` (`None` removes it).
    fn with(mut v: Value, ptr: &str, new: Option<Value>) -> Value {
        let (parent, key) = ptr.rsplit_once('/').unwrap();
        let target = v.pointer_mut(parent).unwrap();
        match (target, new) {
            (Value::Object(o), Some(n)) => {
                o.insert(key.to_string(), n);
            }
            (Value::Object(o), None) => {
                o.remove(key);
            }
            (Value::Array(a), Some(n)) => a[key.parse::<usize>().unwrap()] = n,
            _ => panic!("bad pointer {ptr}"),
        }
        v
    }

    fn reason_of(v: &Value) -> InvalidReason {
        match parse_value(v) {
            Ok(b) => panic!("accepted: {v} -> {b:?}"),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let b = parse_value(&example()).unwrap();
        assert_eq!(b.batch_id, "shoes-2026-11-26-0001");
        assert_eq!(b.bucket, "images");
        assert_eq!(b.prefix, "catalog/shoes");
        assert_eq!(
            b.encoding,
            Encoding {
                format: ImageFormat::Jpeg,
                quality: Some(85)
            }
        );
        assert_eq!(b.preset.as_deref(), Some("production"));
        assert_eq!(
            b.params,
            GenerateParams {
                steps: 25,
                guidance_scale: 8.5,
                width: 512,
                height: 512,
                scheduler: SchedulerKind::Pndm,
                clip_skip: 1,
                guidance_rescale: 0.0,
                prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax::Plain,
                loras: vec![LoraWeight {
                    name: "style".into(),
                    weight: 0.7
                }],
            }
        );
        let item = &b.items[0];
        assert_eq!(
            (
                item.id.as_str(),
                item.seed,
                item.seed_derived,
                item.num_images
            ),
            ("sku-123", 42, false, 2)
        );
        assert_eq!(item.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(b.total_images(), 2);
    }

    #[test]
    fn minimal_message_gets_defaults() {
        let b = parse_value(&minimal()).unwrap();
        assert_eq!(
            b.params,
            GenerateParams {
                steps: DEFAULT_STEPS,
                guidance_scale: DEFAULT_GUIDANCE_SCALE,
                width: NATIVE,
                height: NATIVE,
                scheduler: SchedulerKind::Pndm,
                clip_skip: 1,
                guidance_rescale: 0.0,
                prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax::Plain,
                loras: Vec::new(),
            }
        );
        assert_eq!(b.preset, None);
        assert_eq!(b.bucket, "images");
        assert_eq!(b.prefix, "");
        assert_eq!(b.items[0].num_images, 1);
        assert!(b.items[0].seed_derived);
        assert_eq!(b.items[0].negative_prompt, None);
        // The native size is the caller's.
        let b = parse(&serde_json::to_vec(&minimal()).unwrap(), &limits(), 768).unwrap();
        assert_eq!((b.params.width, b.params.height), (768, 768));
    }

    #[test]
    fn presets_and_explicit_params_win() {
        for p in PRESETS {
            let v = with(minimal(), "/params", Some(json!({"preset": p.name})));
            let b = parse_value(&v).unwrap();
            assert_eq!(b.params.steps, p.steps, "{}", p.name);
            assert_eq!(b.params.guidance_scale, p.guidance_scale, "{}", p.name);
            assert_eq!(
                b.params.scheduler,
                p.scheduler.unwrap_or(SchedulerKind::Pndm)
            );
            assert_eq!((b.params.width, b.params.height), (NATIVE, NATIVE));
            assert_eq!(b.preset.as_deref(), Some(p.name));
            assert_eq!(b.params.loras.len(), usize::from(p.lcm_lora), "{}", p.name);
        }
        let table: Vec<_> = PRESETS
            .iter()
            .map(|p| (p.name, p.steps, p.guidance_scale))
            .collect();
        assert_eq!(
            table,
            [
                ("concept", 35, 8.0),
                ("quality", 60, 7.5),
                ("production", 25, 8.5),
                ("style-test", 45, 7.0),
                ("fast", 4, 1.0)
            ]
        );
        // Explicit steps win, the preset's guidance stays.
        let v = with(
            minimal(),
            "/params",
            Some(json!({"preset": "quality", "steps": 20})),
        );
        let b = parse_value(&v).unwrap();
        assert_eq!((b.params.steps, b.params.guidance_scale), (20, 7.5));
        // Explicit guidance wins, the preset's steps stay.
        let v = with(
            minimal(),
            "/params",
            Some(
                json!({"preset": "concept", "guidance_scale": 3, "scheduler": "ddim", "width": 640}),
            ),
        );
        let b = parse_value(&v).unwrap();
        assert_eq!((b.params.steps, b.params.guidance_scale), (35, 3.0));
        assert_eq!(b.params.scheduler, SchedulerKind::Ddim);
        assert_eq!((b.params.width, b.params.height), (640, NATIVE));
        // fast: the worker's LCM-LoRA joins the message's LoRAs (its own weight for it wins);
        // a worker without one refuses the preset.
        let v = with(
            minimal(),
            "/params",
            Some(json!({"preset": "fast", "loras": [{"name": "style", "weight": 0.5}]})),
        );
        let b = parse_value(&v).unwrap();
        let names: Vec<(&str, f64)> = b
            .params
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.weight))
            .collect();
        assert_eq!(names, [("lcm", 1.0), ("style", 0.5)]);
        assert_eq!(b.params.scheduler, SchedulerKind::Lcm);
        let v = with(
            minimal(),
            "/params",
            Some(json!({"preset": "fast", "steps": 8, "loras": [{"name": "lcm", "weight": 0.8}]})),
        );
        let b = parse_value(&v).unwrap();
        assert_eq!(b.params.steps, 8);
        assert_eq!(b.params.loras[0].weight, 0.8);
        let v = with(minimal(), "/params", Some(json!({"preset": "fast"})));
        let no_lcm = Limits {
            lcm_lora: None,
            ..limits()
        };
        let e = parse(&serde_json::to_vec(&v).unwrap(), &no_lcm, NATIVE).unwrap_err();
        assert_eq!(e.reason, InvalidReason::Preset);
        assert!(e.message.contains("--lcm-lora"), "{}", e.message);
        // Presets are exact names.
        let v = with(minimal(), "/params", Some(json!({"preset": "Quality"})));
        assert_eq!(reason_of(&v), InvalidReason::Preset);
        let v = with(minimal(), "/params", Some(json!({"preset": "draft"})));
        assert_eq!(reason_of(&v), InvalidReason::Preset);
    }

    #[test]
    fn schedulers_by_name() {
        for k in SchedulerKind::ALL {
            let v = with(minimal(), "/params", Some(json!({"scheduler": k.name()})));
            assert_eq!(parse_value(&v).unwrap().params.scheduler, k);
        }
        let v = with(minimal(), "/params", Some(json!({"scheduler": "euler_a"})));
        assert_eq!(
            parse_value(&v).unwrap().params.scheduler,
            SchedulerKind::EulerAncestral
        );
        let v = with(
            minimal(),
            "/params",
            Some(json!({"scheduler": "DPM++ 2M Karras"})),
        );
        assert_eq!(
            parse_value(&v).unwrap().params.scheduler,
            SchedulerKind::DpmSolverPp2mKarras
        );
        let v = with(
            minimal(),
            "/params",
            Some(json!({"scheduler": "DPM++ SDE"})),
        );
        assert_eq!(reason_of(&v), InvalidReason::Scheduler);
    }

    #[test]
    fn not_json() {
        let l = limits();
        for body in [
            &b"\xff\xfe{}"[..],
            b"",
            b"{\"schema_version\": 1,",
            b"[1, 2]",
            b"\"text\"",
            b"null",
        ] {
            let e = parse(body, &l, NATIVE).unwrap_err();
            assert_eq!(e.reason, InvalidReason::NotJson, "{body:?}");
            assert_eq!(e.batch_id, None);
        }
    }

    #[test]
    fn schema_version() {
        use InvalidReason::SchemaVersion as S;
        assert_eq!(reason_of(&with(minimal(), "/schema_version", None)), S);
        for v in [
            json!(2),
            json!(0),
            json!("1"),
            json!(1.5),
            json!(null),
            json!(-1),
        ] {
            assert_eq!(reason_of(&with(minimal(), "/schema_version", Some(v))), S);
        }
        // Checked before the rest: a v2 message with new fields is a version problem.
        let v = with(
            with(minimal(), "/schema_version", Some(json!(2))),
            "/new_thing",
            Some(json!(true)),
        );
        let e = parse_value(&v).unwrap_err();
        assert_eq!(e.reason, S);
        assert_eq!(e.batch_id.as_deref(), Some("b1"));
    }

    #[test]
    fn batch_id() {
        use InvalidReason::BatchId as B;
        assert_eq!(reason_of(&with(minimal(), "/batch_id", None)), B);
        let long = "x".repeat(129);
        for bad in [
            json!(""),
            json!("a b"),
            json!("a/b"),
            json!("a.b"),
            json!(long),
            json!(7),
            json!(null),
        ] {
            let e = parse_value(&with(minimal(), "/batch_id", Some(bad.clone()))).unwrap_err();
            assert_eq!(e.reason, B, "{bad}");
            assert_eq!(e.batch_id, None);
        }
        let ok = "A-z_09".to_string() + &"x".repeat(122);
        assert_eq!(ok.len(), 128);
        assert!(parse_value(&with(minimal(), "/batch_id", Some(json!(ok)))).is_ok());
    }

    #[test]
    fn invalid_messages_keep_a_valid_batch_id() {
        let v = with(minimal(), "/items/0/prompt", Some(json!("")));
        let e = parse_value(&v).unwrap_err();
        assert_eq!(e.reason, InvalidReason::Prompt);
        assert_eq!(e.batch_id.as_deref(), Some("b1"));
        let v = with(minimal(), "/extra", Some(json!(1)));
        assert_eq!(parse_value(&v).unwrap_err().batch_id.as_deref(), Some("b1"));
        let v = with(minimal(), "/items", Some(json!("nope")));
        assert_eq!(parse_value(&v).unwrap_err().batch_id.as_deref(), Some("b1"));
    }

    #[test]
    fn unknown_fields_and_shape_errors() {
        use InvalidReason::Schema as S;
        for (ptr, v) in [
            ("/extra", json!(1)),
            ("/items/0/sed", json!(1)),
            ("/params", json!({"step": 30})),
            ("/output", json!({"buckt": "images"})),
            ("/params", json!([1])),
            ("/output", json!("images")),
            ("/items/0/seed", json!(-1)),
            ("/items/0/seed", json!(1.5)),
            ("/items/0/seed", json!("42")),
            // serde's derive would read structs from arrays; the format has no such thing.
            ("/params", json!([30, 8.5])),
            ("/output", json!(["images", "x"])),
        ] {
            let e = parse_value(&with(minimal(), ptr, Some(v.clone()))).unwrap_err();
            assert_eq!(e.reason, S, "{ptr} = {v}: {}", e.message);
        }
        let e = parse_value(&with(minimal(), "/params", Some(json!({"step": 30})))).unwrap_err();
        assert!(e.message.contains("params.step"), "{}", e.message);
        assert!(e.message.contains("steps"), "{}", e.message);
        let body = br#"{"schema_version": 1, "batch_id": "b1", "items": [{"id": "a", "prompt": "p", "seed": 18446744073709551616}]}"#;
        assert_eq!(parse(body, &limits(), NATIVE).unwrap_err().reason, S);
        // Duplicate keys are refused by serde, not silently merged.
        let body = br#"{"schema_version": 1, "batch_id": "b1", "batch_id": "b2", "items": [{"id": "a", "prompt": "p"}]}"#;
        let e = parse(body, &limits(), NATIVE).unwrap_err();
        assert_eq!(e.reason, S);
        assert!(e.message.contains("duplicate field"), "{}", e.message);
        assert_eq!(e.batch_id.as_deref(), Some("b1"));
        // Nested ones too, though the tree is read once and `Value` alone would merge them.
        for body in [
            &br#"{"schema_version": 1, "batch_id": "b1", "items": [{"id": "a", "prompt": "p", "prompt": "q"}]}"#[..],
            br#"{"schema_version": 1, "batch_id": "b1", "items": [{"id": "a", "prompt": "p"}], "params": {"steps": 5, "steps": 6}}"#,
            br#"{"schema_version": 1, "batch_id": "b1", "items": [{"id": "a", "prompt": "p"}], "output": {"x": {"k": 1, "k": 2}}}"#,
        ] {
            let e = parse(body, &limits(), NATIVE).unwrap_err();
            assert_eq!(e.reason, S, "{}", e.message);
            assert!(e.message.contains("duplicate field"), "{}", e.message);
        }
        // null is the same as absent for optional fields.
        let v = with(
            with(minimal(), "/params", Some(Value::Null)),
            "/items/0/seed",
            Some(Value::Null),
        );
        assert!(parse_value(&v).is_ok());
        let u64max = json!({"schema_version": 1, "batch_id": "b", "items": [{"id": "a", "prompt": "p", "seed": u64::MAX, "num_images": 2}]});
        let b = parse_value(&u64max).unwrap();
        assert_eq!(b.image_requests()[1].2.seed, 0);
    }

    #[test]
    fn wrong_types_blame_their_field() {
        use InvalidReason as R;
        for (ptr, v, reason) in [
            ("/items/0/id", json!(5), R::ItemId),
            ("/items/0/prompt", json!(["a"]), R::Prompt),
            ("/items/0/negative_prompt", json!(1), R::Prompt),
            ("/items/0/num_images", json!(-1), R::NumImages),
            ("/items/0/num_images", json!(1.5), R::NumImages),
            ("/params/steps", json!(25.5), R::Steps),
            ("/params/steps", json!("25"), R::Steps),
            ("/params/guidance_scale", json!("7.5"), R::Guidance),
            ("/params/width", json!(-512), R::Size),
            ("/params/height", json!("512"), R::Size),
            ("/params/scheduler", json!(1), R::Scheduler),
            ("/params/preset", json!(true), R::Preset),
            ("/output/bucket", json!(1), R::Bucket),
            ("/output/prefix", json!(["a"]), R::Prefix),
            ("/items", json!({"id": "a"}), R::Items),
            ("/items", json!(["a cat"]), R::Items),
            ("/items", json!([["a", "a cat"]]), R::Items),
        ] {
            let e = parse_value(&with(example(), ptr, Some(v.clone()))).unwrap_err();
            assert_eq!(e.reason, reason, "{ptr} = {v}: {}", e.message);
        }
        assert_eq!(reason_of(&with(minimal(), "/items/0/id", None)), R::ItemId);
        assert_eq!(
            reason_of(&with(minimal(), "/items/0/prompt", None)),
            R::Prompt
        );
        assert_eq!(reason_of(&with(minimal(), "/items", None)), R::Items);
    }

    #[test]
    fn items_count() {
        use InvalidReason::Items as I;
        assert_eq!(reason_of(&with(minimal(), "/items", Some(json!([])))), I);
        let many: Vec<Value> = (0..257)
            .map(|i| json!({"id": format!("i{i}"), "prompt": "p"}))
            .collect();
        assert_eq!(reason_of(&with(minimal(), "/items", Some(json!(many)))), I);
        let ok: Vec<Value> = many[..256].to_vec();
        assert!(parse_value(&with(minimal(), "/items", Some(json!(ok)))).is_ok());
    }

    #[test]
    fn item_ids() {
        use InvalidReason::ItemId as I;
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "ü",
            "manifest.json",
            // The local store's bookkeeping names: one rule for validation and storage.
            ".sdbatch-meta",
            ".sdbatch-tmp.1",
            &"x".repeat(129),
        ] {
            let v = with(minimal(), "/items/0/id", Some(json!(bad)));
            assert_eq!(reason_of(&v), I, "{bad:?}");
        }
        for ok in ["...", "a.b", "SKU_1-2", ".hidden", &"x".repeat(128)] {
            let v = with(minimal(), "/items/0/id", Some(json!(ok)));
            assert!(parse_value(&v).is_ok(), "{ok:?}");
        }
        let v = with(
            minimal(),
            "/items",
            Some(
                json!([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p"}, {"id": "a", "prompt": "q"}]),
            ),
        );
        let e = parse_value(&v).unwrap_err();
        assert_eq!(e.reason, InvalidReason::DuplicateItemId);
        assert!(
            e.message.contains("items[2]") && e.message.contains("items[0]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn prompts() {
        use InvalidReason::Prompt as P;
        let long = "a".repeat(2049);
        for bad in [
            "",
            "   \n\t",
            "a\u{0}b",
            "bell\u{7}",
            "esc\u{1b}[0m",
            long.as_str(),
        ] {
            let v = with(minimal(), "/items/0/prompt", Some(json!(bad)));
            assert_eq!(reason_of(&v), P, "{bad:?}");
        }
        let v = with(minimal(), "/items/0/prompt", Some(json!("a".repeat(2048))));
        assert!(parse_value(&v).is_ok());
        let v = with(
            minimal(),
            "/items/0/prompt",
            Some(json!("line one\nline\ttwo, ünïcode 🎨")),
        );
        assert!(parse_value(&v).is_ok());
        // Negative prompts: same rules, but may be empty.
        let v = with(minimal(), "/items/0/negative_prompt", Some(json!("")));
        assert_eq!(
            parse_value(&v).unwrap().items[0].negative_prompt.as_deref(),
            Some("")
        );
        for bad in ["a\u{0}", long.as_str()] {
            let v = with(minimal(), "/items/0/negative_prompt", Some(json!(bad)));
            let e = parse_value(&v).unwrap_err();
            assert_eq!(e.reason, P);
            assert!(e.message.contains("negative_prompt"), "{}", e.message);
        }
    }

    #[test]
    fn num_images_and_total() {
        use InvalidReason as R;
        assert_eq!(
            reason_of(&with(minimal(), "/items/0/num_images", Some(json!(0)))),
            R::NumImages
        );
        assert_eq!(
            reason_of(&with(minimal(), "/items/0/num_images", Some(json!(17)))),
            R::NumImages
        );
        let v = with(minimal(), "/items/0/num_images", Some(json!(16)));
        assert_eq!(parse_value(&v).unwrap().total_images(), 16);
        // 64 × 16 = 1024 is the limit; one more image is too many.
        let mut items: Vec<Value> = (0..64)
            .map(|i| json!({"id": format!("i{i}"), "prompt": "p", "num_images": 16}))
            .collect();
        let v = with(minimal(), "/items", Some(json!(items.clone())));
        assert_eq!(parse_value(&v).unwrap().total_images(), 1024);
        items.push(json!({"id": "last", "prompt": "p"}));
        let v = with(minimal(), "/items", Some(json!(items)));
        assert_eq!(reason_of(&v), R::TooManyImages);
    }

    #[test]
    fn steps_guidance_size() {
        use InvalidReason as R;
        let p = |params: Value| with(minimal(), "/params", Some(params));
        assert_eq!(reason_of(&p(json!({"steps": 0}))), R::Steps);
        assert_eq!(reason_of(&p(json!({"steps": 151}))), R::Steps);
        assert!(parse_value(&p(json!({"steps": 1}))).is_ok());
        assert!(parse_value(&p(json!({"steps": 150}))).is_ok());
        // The limits apply to preset values too.
        let strict = Limits {
            max_steps: 50,
            ..limits()
        };
        let body = serde_json::to_vec(&p(json!({"preset": "quality"}))).unwrap();
        let e = parse(&body, &strict, NATIVE).unwrap_err();
        assert_eq!(e.reason, R::Steps);
        assert!(e.message.contains("preset \"quality\""), "{}", e.message);

        assert_eq!(reason_of(&p(json!({"guidance_scale": -0.5}))), R::Guidance);
        assert!(parse_value(&p(json!({"guidance_scale": 0}))).is_ok());
        assert!(parse_value(&p(json!({"guidance_scale": 30.25}))).is_ok());
        // JSON has no NaN or infinity; structs built in code can.
        let mut msg: BatchMessage = serde_json::from_value(minimal()).unwrap();
        for g in [f64::NAN, f64::INFINITY] {
            msg.params = Some(MessageParams {
                guidance_scale: Some(g),
                ..Default::default()
            });
            assert_eq!(
                validate(&msg, &limits(), NATIVE).unwrap_err().reason,
                R::Guidance
            );
        }

        for (w, h) in [
            (0, 512),
            (4, 512),
            (513, 512),
            (512, 1032),
            (1040, 512),
            (512, 0),
        ] {
            let v = p(json!({"width": w, "height": h}));
            assert_eq!(reason_of(&v), R::Size, "{w}x{h}");
        }
        let b = parse_value(&p(json!({"width": 8, "height": 1024}))).unwrap();
        assert_eq!((b.params.width, b.params.height), (8, 1024));
        // A model default above max_side is refused too.
        let body = serde_json::to_vec(&minimal()).unwrap();
        assert_eq!(parse(&body, &limits(), 2048).unwrap_err().reason, R::Size);
    }

    #[test]
    fn buckets() {
        use InvalidReason::Bucket as B;
        let o = |output: Value| with(minimal(), "/output", Some(output));
        assert_eq!(
            parse_value(&o(json!({"bucket": "other"}))).unwrap().bucket,
            "other"
        );
        assert_eq!(reason_of(&o(json!({"bucket": "secret"}))), B);
        // No allow-list: only the default bucket.
        let only_default = Limits {
            default_bucket: Some("images".into()),
            ..Limits::default()
        };
        let run = |v: &Value, l: &Limits| parse(&serde_json::to_vec(v).unwrap(), l, NATIVE);
        assert_eq!(
            run(&o(json!({"bucket": "images"})), &only_default)
                .unwrap()
                .bucket,
            "images"
        );
        assert_eq!(
            run(&o(json!({"bucket": "other"})), &only_default)
                .unwrap_err()
                .reason,
            B
        );
        assert_eq!(run(&minimal(), &only_default).unwrap().bucket, "images");
        // The default bucket is allowed even when the allow-list does not repeat it.
        let list = Limits {
            allowed_buckets: vec!["a".into()],
            default_bucket: Some("d".into()),
            ..Limits::default()
        };
        assert_eq!(run(&o(json!({"bucket": "d"})), &list).unwrap().bucket, "d");
        assert_eq!(run(&o(json!({"bucket": "a"})), &list).unwrap().bucket, "a");
        // No default bucket: a message without one is invalid.
        let no_default = Limits {
            allowed_buckets: vec!["a".into()],
            ..Limits::default()
        };
        assert_eq!(run(&minimal(), &no_default).unwrap_err().reason, B);
        assert_eq!(
            run(&o(json!({"bucket": "a"})), &no_default).unwrap().bucket,
            "a"
        );
        assert_eq!(run(&minimal(), &Limits::default()).unwrap_err().reason, B);
    }

    #[test]
    fn prefixes() {
        use InvalidReason::Prefix as P;
        let o = |prefix: &str| with(minimal(), "/output", Some(json!({"prefix": prefix})));
        for ok in ["", "a", "catalog/shoes", "a.b/c-d/e_f", "x/.../y"] {
            assert_eq!(parse_value(&o(ok)).unwrap().prefix, ok);
        }
        let long_seg = "x".repeat(129);
        let too_long = vec!["abcdefg"; 65].join("/");
        assert!(too_long.len() > 512);
        for bad in [
            "/a",
            "a/",
            "/",
            "a//b",
            "a/./b",
            "../a",
            "a/..",
            "a b",
            "a\\b",
            "x/.sdbatch-tmp.1",
            ".sdbatch-meta/x",
            long_seg.as_str(),
            too_long.as_str(),
        ] {
            assert_eq!(reason_of(&o(bad)), P, "{bad:?}");
        }
        // Default prefix from the limits, overridden by the message (even by "").
        let l = Limits {
            default_prefix: "renders".into(),
            ..limits()
        };
        let run = |v: &Value| parse(&serde_json::to_vec(v).unwrap(), &l, NATIVE).unwrap();
        assert_eq!(run(&minimal()).prefix, "renders");
        assert_eq!(run(&o("x/y")).prefix, "x/y");
        assert_eq!(run(&o("")).prefix, "");
    }

    #[test]
    fn limits_check() {
        assert!(Limits::default().check().is_ok());
        assert!(limits().check().is_ok());
        for bad in [
            Limits {
                default_prefix: "/x".into(),
                ..Limits::default()
            },
            Limits {
                min_steps: 0,
                ..Limits::default()
            },
            Limits {
                min_steps: 10,
                max_steps: 5,
                ..Limits::default()
            },
            Limits {
                max_side: 4,
                ..Limits::default()
            },
            Limits {
                default_bucket: Some(String::new()),
                ..Limits::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        // A config file sets only what it changes.
        let l: Limits =
            serde_json::from_value(json!({"max_items": 8, "default_bucket": "b"})).unwrap();
        assert_eq!(
            l,
            Limits {
                max_items: 8,
                default_bucket: Some("b".into()),
                ..Limits::default()
            }
        );
        assert!(serde_json::from_value::<Limits>(json!({"max_itemz": 8})).is_err());
    }

    #[test]
    fn seed_derivation_is_stable_and_53_bit() {
        // Pinned: changing the derivation changes every image made without an explicit seed.
        assert_eq!(
            derive_seed("shoes-2026-11-26-0001", "sku-123"),
            8121898672478430
        );
        assert_eq!(derive_seed("b", "a"), 3537034511804319);
        assert_ne!(derive_seed("b", "a"), derive_seed("a", "b"));
        assert_ne!(derive_seed("ab", "c"), derive_seed("a", "bc"));
        for i in 0..2000 {
            let s = derive_seed("batch", &format!("item-{i}"));
            assert!(s < 1 << 53, "{s}");
            assert_eq!(s as f64 as u64, s);
        }
        let b = parse_value(&minimal()).unwrap();
        assert_eq!(b.items[0].seed, derive_seed("b1", "a"));
        assert!(b.items[0].seed_derived);
    }

    #[test]
    fn image_requests_in_order_with_seed_plus_n() {
        let v = json!({"schema_version": 1, "batch_id": "b1", "items": [
            {"id": "a", "prompt": "pa", "seed": 10, "num_images": 3},
            {"id": "b", "prompt": "pb", "negative_prompt": "nb"},
            {"id": "c", "prompt": "pc", "num_images": 2}]});
        let b = parse_value(&v).unwrap();
        assert_eq!(b.total_images(), 6);
        let reqs = b.image_requests();
        let got: Vec<(usize, u32, &str, Option<&str>, u64)> = reqs
            .iter()
            .map(|(i, n, r)| {
                (
                    *i,
                    *n,
                    r.prompt.as_str(),
                    r.negative_prompt.as_deref(),
                    r.seed,
                )
            })
            .collect();
        let (sb, sc) = (derive_seed("b1", "b"), derive_seed("b1", "c"));
        assert_eq!(
            got,
            [
                (0, 0, "pa", None, 10),
                (0, 1, "pa", None, 11),
                (0, 2, "pa", None, 12),
                (1, 0, "pb", Some("nb"), sb),
                (2, 0, "pc", None, sc),
                (2, 1, "pc", None, sc + 1),
            ]
        );
    }

    #[test]
    fn object_keys() {
        let mut b = parse_value(&example()).unwrap();
        assert_eq!(
            b.image_key("sku-123", 1),
            "catalog/shoes/shoes-2026-11-26-0001/sku-123/1.jpg"
        );
        assert_eq!(
            b.manifest_key(),
            "catalog/shoes/shoes-2026-11-26-0001/manifest.json"
        );
        b.prefix = String::new();
        b.encoding = Encoding::PNG;
        assert_eq!(
            b.image_key("sku-123", 0),
            "shoes-2026-11-26-0001/sku-123/0.png"
        );
        b.encoding.format = ImageFormat::Webp;
        assert_eq!(
            b.image_key("sku-123", 0),
            "shoes-2026-11-26-0001/sku-123/0.webp"
        );
        assert_eq!(b.manifest_key(), "shoes-2026-11-26-0001/manifest.json");
    }

    #[test]
    fn reason_codes_are_stable_and_distinct() {
        let codes: Vec<&str> = InvalidReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            codes,
            [
                "too_large",
                "not_json",
                "schema_version",
                "schema",
                "batch_id",
                "items",
                "item_id",
                "duplicate_item_id",
                "prompt",
                "num_images",
                "too_many_images",
                "steps",
                "guidance",
                "size",
                "too_much_work",
                "scheduler",
                "preset",
                "clip_skip",
                "prompt_syntax",
                "lora",
                "bucket",
                "prefix",
                "format",
                "quality",
                "safety_checker",
                "batch_id_conflict",
                "init_image",
                "init_image_missing",
                "init_image_unreadable",
                "init_image_too_large",
                "strength",
                "mask_image",
                "mask_image_missing",
                "mask_image_unreadable",
                "mask_image_too_large",
                "mask_image_size",
                "mask_blur",
                "padding_mask_crop",
                "hires",
                "webhook"
            ]
        );
        assert_eq!(InvalidReason::Size.to_string(), "size");
    }

    #[test]
    fn work_is_capped() {
        let l = Limits {
            max_message_work: 100.0,
            ..limits()
        };
        // 2 images x 25 steps x 512x512 = 13.1 units: fine; 8 images x 50 steps = 104.9: not.
        let small = json!({"schema_version": 1, "batch_id": "b",
            "items": [{"id": "a", "prompt": "p", "num_images": 2}], "params": {"steps": 25}});
        let run = |v: &Value| parse(&serde_json::to_vec(v).unwrap(), &l, NATIVE);
        let b = run(&small).unwrap();
        assert!((b.work_units() - 13.1072).abs() < 1e-9);
        let big = with(small, "/items/0/num_images", Some(json!(8)));
        let big = with(big, "/params/steps", Some(json!(50)));
        let e = run(&big).unwrap_err();
        assert_eq!(e.reason, InvalidReason::TooMuchWork);
        assert!(
            e.message.contains("105 image-steps-megapixels"),
            "{}",
            e.message
        );
        assert!(e.message.contains("limit 100"), "{}", e.message);
        // The default admits the default maximum batch at the default settings.
        let d = Limits::default();
        assert!(work_units(d.max_total_images, 50, 512, 512) <= d.max_message_work);
    }

    #[test]
    fn masks_need_an_init_image_and_have_their_own_reasons_and_strength() {
        use InvalidReason as R;
        let two = json!({"schema_version": 1, "batch_id": "b1", "items": [
            {"id": "i2i", "prompt": "a", "init_image": "s3://images/in/a.png"},
            {"id": "inp", "prompt": "b", "init_image": "s3://images/in/a.png",
             "mask_image": "s3://images/in/a-mask.png"},
            {"id": "t2i", "prompt": "c"}]});
        let b = parse_value(&two).unwrap();
        // Defaults as diffusers: 0.8 for img2img, 1.0 for inpainting.
        assert_eq!(b.mode(&b.items[0]), ItemMode::Img2Img(DEFAULT_STRENGTH));
        assert_eq!(
            b.mode(&b.items[1]),
            ItemMode::Inpaint(DEFAULT_INPAINT_STRENGTH)
        );
        assert_eq!(b.mode(&b.items[2]), ItemMode::Txt2Img);
        assert_eq!(
            b.items[1].mask_image.as_ref().unwrap().describe(),
            "s3://images/in/a-mask.png"
        );
        // A given strength applies to both.
        let b = parse_value(&with(
            two.clone(),
            "/params",
            Some(json!({"strength": 0.5})),
        ))
        .unwrap();
        assert_eq!(b.mode(&b.items[0]), ItemMode::Img2Img(0.5));
        assert_eq!(b.mode(&b.items[1]), ItemMode::Inpaint(0.5));
        // The mask enters the work hash (so does a different mask).
        let other = with(
            two.clone(),
            "/items/1/mask_image",
            Some(json!("s3://images/in/other.png")),
        );
        assert_ne!(
            parse_value(&two).unwrap().work_sha256(),
            parse_value(&other).unwrap().work_sha256()
        );
        // A mask alone, or malformed, or with the init image's refusals under its own reasons.
        let masked = |v: &str| {
            with(
                with(
                    minimal(),
                    "/items/0/init_image",
                    Some(json!("s3://images/a.png")),
                ),
                "/items/0/mask_image",
                Some(json!(v)),
            )
        };
        let alone = with(
            minimal(),
            "/items/0/mask_image",
            Some(json!("s3://images/m.png")),
        );
        assert_eq!(reason_of(&alone), R::MaskImage);
        assert_eq!(reason_of(&masked("s3://elsewhere/m.png")), R::MaskImage);
        assert_eq!(
            reason_of(&masked("data:image/gif;base64,R0lG")),
            R::MaskImageUnreadable
        );
        let big = format!(
            "data:image/png;base64,{}",
            "A".repeat(MAX_INIT_IMAGE_BYTES / 3 * 4 + 8)
        );
        let l = Limits {
            max_message_bytes: 8 << 20,
            ..limits()
        };
        let e = parse(&serde_json::to_vec(&masked(&big)).unwrap(), &l, NATIVE).unwrap_err();
        assert_eq!(e.reason, R::MaskImageTooLarge);
        assert!(
            e.message.starts_with("items[0].mask_image:"),
            "{}",
            e.message
        );
        assert_eq!(
            reason_of(&with(minimal(), "/items/0/mask_image", Some(json!(7)))),
            R::MaskImage
        );
    }

    #[test]
    fn mask_blur_is_checked_defaulted_and_hashed() {
        use crate::pipeline::mask::MAX_MASK_BLUR;
        use InvalidReason as R;
        let inpaint = json!({"schema_version": 1, "batch_id": "b1", "items": [
            {"id": "inp", "prompt": "b", "init_image": "s3://images/in/a.png",
             "mask_image": "s3://images/in/a-mask.png"}]});
        let blur = |v: Value| with(inpaint.clone(), "/params", Some(json!({"mask_blur": v})));
        // Default: none; hashed only when set, so earlier work keeps its hash.
        let plain = parse_value(&inpaint).unwrap();
        assert_eq!(plain.mask_blur, 0.0);
        let zero = parse_value(&blur(json!(0))).unwrap();
        assert_eq!(zero.mask_blur, 0.0);
        assert_eq!(zero.work_sha256(), plain.work_sha256());
        for r in [0.5, 4.0, 7.3, MAX_MASK_BLUR] {
            let b = parse_value(&blur(json!(r))).unwrap();
            assert_eq!(b.mask_blur, r);
            assert_ne!(b.work_sha256(), plain.work_sha256(), "{r}");
        }
        assert_ne!(
            parse_value(&blur(json!(4))).unwrap().work_sha256(),
            parse_value(&blur(json!(5))).unwrap().work_sha256()
        );
        // Out of range, not a number, or without any mask: refused with its own reason.
        for bad in [
            json!(-0.5),
            json!(64.5),
            json!(1e300),
            json!("4"),
            json!(true),
        ] {
            let e = parse(
                &serde_json::to_vec(&blur(bad.clone())).unwrap(),
                &limits(),
                NATIVE,
            )
            .unwrap_err();
            assert_eq!(e.reason, R::MaskBlur, "{bad}");
            assert!(e.message.contains("mask_blur"), "{bad}: {}", e.message);
        }
        let img2img = with(
            with(
                minimal(),
                "/items/0/init_image",
                Some(json!("s3://images/a.png")),
            ),
            "/params",
            Some(json!({"mask_blur": 4})),
        );
        let e = parse(&serde_json::to_vec(&img2img).unwrap(), &limits(), NATIVE).unwrap_err();
        assert_eq!(e.reason, R::MaskBlur);
        assert!(
            e.message.contains("no item has a mask_image"),
            "{}",
            e.message
        );
        assert_eq!(
            reason_of(&with(minimal(), "/params", Some(json!({"mask_blur": 4})))),
            R::MaskBlur
        );
        // JSON has no NaN or infinity; structs built in code can.
        let mut msg: BatchMessage = serde_json::from_value(inpaint.clone()).unwrap();
        for r in [f64::NAN, f64::INFINITY] {
            msg.params = Some(MessageParams {
                mask_blur: Some(r),
                ..Default::default()
            });
            assert_eq!(
                validate(&msg, &limits(), NATIVE).unwrap_err().reason,
                R::MaskBlur
            );
        }
    }

    #[test]
    fn padding_mask_crop_is_checked_and_hashed() {
        use InvalidReason as R;
        let inpaint = json!({"schema_version": 1, "batch_id": "b1", "items": [
            {"id": "inp", "prompt": "b", "init_image": "s3://images/in/a.png",
             "mask_image": "s3://images/in/a-mask.png"}]});
        let crop = |v: Value| {
            with(
                inpaint.clone(),
                "/params",
                Some(json!({"padding_mask_crop": v})),
            )
        };
        let plain = parse_value(&inpaint).unwrap();
        assert_eq!(plain.padding_mask_crop, None);
        for pad in [0, 32, 4096] {
            let b = parse_value(&crop(json!(pad))).unwrap();
            assert_eq!(b.padding_mask_crop, Some(pad));
            assert_ne!(b.work_sha256(), plain.work_sha256(), "{pad}");
        }
        for bad in [json!(4097), json!(-1), json!(2.5), json!("8")] {
            let e = parse(
                &serde_json::to_vec(&crop(bad.clone())).unwrap(),
                &limits(),
                NATIVE,
            )
            .unwrap_err();
            assert_eq!(e.reason, R::PaddingMaskCrop, "{bad}");
            assert!(
                e.message.contains("padding_mask_crop"),
                "{bad}: {}",
                e.message
            );
        }
        let e = parse(
            &serde_json::to_vec(&with(
                minimal(),
                "/params",
                Some(json!({"padding_mask_crop": 8})),
            ))
            .unwrap(),
            &limits(),
            NATIVE,
        )
        .unwrap_err();
        assert_eq!(e.reason, R::PaddingMaskCrop);
        assert!(
            e.message.contains("no item has a mask_image"),
            "{}",
            e.message
        );
    }

    #[test]
    fn hires_is_checked_defaulted_and_counted_as_work() {
        use InvalidReason as R;
        let hires = |h: Value| {
            with(
                minimal(),
                "/params",
                Some(json!({"steps": 30, "width": 512, "height": 512, "hires": h})),
            )
        };
        let b = parse_value(&hires(json!({"scale": 2}))).unwrap();
        assert_eq!(
            b.hires,
            Some(Hires {
                scale: 2.0,
                steps: 30,
                strength: DEFAULT_HIRES_STRENGTH,
                upscaler: Upscaler::Lanczos,
            })
        );
        assert_eq!(b.output_size(), (1024, 1024));
        // Work: 30 steps at 512² plus 15 steps (strength 0.5 of 30) at 1024².
        let want = work_units(1, 30, 512, 512) + work_units(1, 15, 1024, 1024);
        assert!((b.work_units() - want).abs() < 1e-9, "{}", b.work_units());
        let b = parse_value(&hires(
            json!({"scale": 1.5, "steps": 10, "strength": 0.7, "upscaler": "latent"}),
        ))
        .unwrap();
        assert_eq!(b.hires.unwrap().upscaler, Upscaler::Latent);
        assert_eq!(b.output_size(), (768, 768));
        // The hires fix is part of the work.
        assert_ne!(
            parse_value(&hires(json!({"scale": 2})))
                .unwrap()
                .work_sha256(),
            parse_value(&hires(json!({"scale": 1.5})))
                .unwrap()
                .work_sha256()
        );
        for bad in [
            json!({"scale": 1}),
            json!({"scale": 4.5}),
            json!({"scale": 3}),
            json!({"scale": 2, "steps": 0}),
            json!({"scale": 2, "steps": 1000}),
            json!({"scale": 2, "strength": 0}),
            json!({"scale": 2, "strength": 1.5}),
            json!({"scale": 2, "steps": 1, "strength": 0.5}),
            json!({"scale": 2, "upscaler": "esrgan"}),
            json!({"scale": 2, "typo": 1}),
            json!({"steps": 10}),
            json!("2x"),
        ] {
            assert_eq!(reason_of(&hires(bad.clone())), R::Hires, "{bad}");
        }
        // Not with img2img or inpainting items.
        let with_init = with(
            hires(json!({"scale": 2})),
            "/items/0/init_image",
            Some(json!("s3://images/a.png")),
        );
        assert_eq!(reason_of(&with_init), R::Hires);
    }

    #[test]
    fn init_images_and_strength() {
        use InvalidReason as R;
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let init = |v: &str| with(minimal(), "/items/0/init_image", Some(json!(v)));
        // An S3 key in an allowed bucket (the default bucket is allowed).
        let b = parse_value(&init("s3://images/in/a b.png")).unwrap();
        let got = b.items[0].init_image.clone().unwrap();
        assert_eq!(
            got.source,
            ImageSource::S3 {
                bucket: "images".into(),
                key: "in/a b.png".into()
            }
        );
        assert_eq!(
            (got.sha256.as_deref(), b.strength),
            (None, DEFAULT_STRENGTH)
        );
        assert_eq!(got.describe(), "s3://images/in/a b.png");
        // A data URI: decoded and hashed at parse; never echoed by `describe` or `Debug`.
        let b = parse_value(&init(&format!(
            "data:image/png;base64,{}",
            b64(b"\x89PNG fake")
        )))
        .unwrap();
        let got = b.items[0].init_image.clone().unwrap();
        assert_eq!(
            got.sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"\x89PNG fake")).as_str())
        );
        assert_eq!(got.describe(), "data:");
        assert!(!format!("{b:?}").contains(&b64(b"\x89PNG fake")));
        // Refusals, each with its reason and a bounded message.
        let huge = "x".repeat(100_000);
        for (v, reason) in [
            ("s3://elsewhere/in.png".to_string(), R::InitImage),
            ("s3://images".to_string(), R::InitImage),
            ("s3://images/".to_string(), R::InitImage),
            (format!("s3://images/{}", "k".repeat(1025)), R::InitImage),
            ("s3://images/a\u{1}b".to_string(), R::InitImage),
            ("https://example.com/a.png".to_string(), R::InitImage),
            (huge.clone(), R::InitImage),
            ("data:image/png,rawbytes".to_string(), R::InitImage),
            (
                "data:image/png;base64,!!!notbase64".to_string(),
                R::InitImage,
            ),
            (
                format!("data:image/gif;base64,{}", b64(b"GIF89a")),
                R::InitImageUnreadable,
            ),
            (
                format!(
                    "data:image/png;base64,{}",
                    b64(&vec![0; MAX_INIT_IMAGE_BYTES + 1])
                ),
                R::InitImageTooLarge,
            ),
        ] {
            let l = Limits {
                max_message_bytes: 16 << 20,
                ..limits()
            };
            let err = parse(&serde_json::to_vec(&init(&v)).unwrap(), &l, NATIVE).unwrap_err();
            assert_eq!(err.reason, reason, "{}", crate::bounded::cut(&v, 80));
            assert!(
                err.message.len() <= crate::bounded::MAX_REASON_BYTES,
                "{}",
                err.message
            );
            assert!(
                err.message.contains("items[0].init_image"),
                "{}",
                err.message
            );
            assert_eq!(err.batch_id.as_deref(), Some("b1"));
        }
        // Not a string: the field is blamed.
        assert_eq!(
            reason_of(&with(minimal(), "/items/0/init_image", Some(json!(3)))),
            R::InitImage
        );
        // Strength: (0, 1], at least one step, only with init images.
        let i2i = |strength: Value, steps: u32| {
            with(
                with(
                    init("s3://images/in.png"),
                    "/params",
                    Some(json!({"steps": steps})),
                ),
                "/params/strength",
                Some(strength),
            )
        };
        assert_eq!(parse_value(&i2i(json!(0.5), 10)).unwrap().strength, 0.5);
        assert_eq!(parse_value(&i2i(json!(1), 10)).unwrap().strength, 1.0);
        for (s, steps) in [
            (json!(0), 10),
            (json!(-0.1), 10),
            (json!(1.01), 10),
            (json!(0.05), 10),
        ] {
            assert_eq!(
                reason_of(&i2i(s.clone(), steps)),
                R::Strength,
                "{s} {steps}"
            );
        }
        assert_eq!(reason_of(&i2i(json!("high"), 10)), R::Strength);
        let txt2img_with_strength = with(minimal(), "/params", Some(json!({"strength": 0.5})));
        assert_eq!(reason_of(&txt2img_with_strength), R::Strength);
    }

    #[test]
    fn init_images_enter_the_work_hash_only_when_used() {
        let plain = parse_value(&minimal()).unwrap();
        let mut explicit_none = minimal();
        explicit_none["items"][0]["init_image"] = Value::Null;
        assert_eq!(
            parse_value(&explicit_none).unwrap().work_sha256(),
            plain.work_sha256()
        );
        let with_init =
            |v: &str| parse_value(&with(minimal(), "/items/0/init_image", Some(json!(v)))).unwrap();
        let a = with_init("s3://images/a.png");
        assert_ne!(a.work_sha256(), plain.work_sha256());
        assert_ne!(
            a.work_sha256(),
            with_init("s3://images/b.png").work_sha256()
        );
        // The fetched bytes' hash is part of it: other bytes under the same key are other work.
        let mut fetched = a.clone();
        fetched.items[0].init_image.as_mut().unwrap().sha256 = Some("1".repeat(64));
        let mut other = a.clone();
        other.items[0].init_image.as_mut().unwrap().sha256 = Some("2".repeat(64));
        assert_ne!(fetched.work_sha256(), other.work_sha256());
        let mut strength = fetched.clone();
        strength.strength = 0.5;
        assert_ne!(fetched.work_sha256(), strength.work_sha256());
    }

    #[test]
    fn work_hash_is_canonical() {
        let a = parse_value(&example()).unwrap();
        // Same work written differently: keys reordered, preset steps spelled out.
        let text = r#"{"output": {"quality": 85, "prefix": "catalog/shoes", "bucket": "images", "format": "jpeg"},
            "params": {"preset": "production", "steps": 25, "guidance_scale": 8.5,
                       "width": 512, "height": 512, "scheduler": "pndm", "safety_checker": true,
                       "loras": [{"weight": 0.7, "name": "style"}]},
            "items": [{"num_images": 2, "seed": 42, "negative_prompt": "blurry",
                       "prompt": "professional product photography of a red sneaker", "id": "sku-123"}],
            "batch_id": "shoes-2026-11-26-0001", "schema_version": 1}"#;
        let b = parse(text.as_bytes(), &limits(), NATIVE).unwrap();
        assert_eq!(a.work_sha256(), b.work_sha256());
        assert_eq!(a.work_sha256().len(), 64);
        for (ptr, v) in [
            ("/items/0/prompt", json!("another prompt")),
            ("/items/0/seed", json!(43)),
            ("/params/steps", json!(26)),
            ("/output/prefix", json!("other")),
            ("/params/clip_skip", json!(2)),
            ("/params/guidance_rescale", json!(0.7)),
            ("/params/loras", json!([{"name": "style", "weight": 0.8}])),
            ("/params/loras", json!([{"name": "other", "weight": 0.7}])),
            ("/output/quality", json!(86)),
        ] {
            let c = parse_value(&with(example(), ptr, Some(v))).unwrap();
            assert_ne!(a.work_sha256(), c.work_sha256(), "{ptr}");
        }
        // LoRAs in another order are the same work (and the same batch shape).
        let two = |list: Value| parse_value(&with(example(), "/params/loras", Some(list))).unwrap();
        let ab = two(json!([{"name": "a", "weight": 0.5}, {"name": "b"}]));
        let ba = two(json!([{"name": "b", "weight": 1.0}, {"name": "a", "weight": 0.5}]));
        assert_eq!(ab.work_sha256(), ba.work_sha256());
        assert_eq!(ab.params, ba.params);
        // A parameter at its default hashes as if absent: work hashed by an earlier version
        // (recorded in manifests and image metadata) keeps its hash.
        let c = parse_value(&with(example(), "/params/clip_skip", Some(json!(1)))).unwrap();
        assert_eq!(a.work_sha256(), c.work_sha256());
        // The example without its LoRAs and its format is work an earlier version hashed.
        let without = with(example(), "/params/loras", None);
        let without = with(without, "/output/format", None);
        let without = parse_value(&with(without, "/output/quality", None)).unwrap();
        assert_ne!(a.work_sha256(), without.work_sha256());
        assert_eq!(
            without.work_sha256(),
            "362a5789dac6d8e713b4e84901ce4d4d28a2967ed82c85b861bf0027aab73e22",
            "the hash of existing work must not change"
        );
    }

    #[test]
    fn output_format_and_quality() {
        let o = |v: Value| with(minimal(), "/output", Some(v));
        let enc = |v: Value| parse_value(&o(v)).unwrap().encoding;
        let jpeg = |q| Encoding {
            format: ImageFormat::Jpeg,
            quality: Some(q),
        };
        assert_eq!(parse_value(&minimal()).unwrap().encoding, Encoding::PNG);
        assert_eq!(enc(json!({"format": "png"})), Encoding::PNG);
        assert_eq!(enc(json!({"format": "jpeg"})), jpeg(90));
        assert_eq!(enc(json!({"format": "jpeg", "quality": 1})), jpeg(1));
        assert_eq!(enc(json!({"format": "jpeg", "quality": 100})), jpeg(100));
        assert_eq!(
            enc(json!({"format": "webp"})),
            Encoding {
                format: ImageFormat::Webp,
                quality: None
            }
        );
        for (bad, reason, says) in [
            (
                json!({"format": "jpg"}),
                InvalidReason::Format,
                "png, jpeg, webp",
            ),
            (
                json!({"format": "PNG"}),
                InvalidReason::Format,
                "png, jpeg, webp",
            ),
            (json!({"format": 1}), InvalidReason::Format, "format"),
            (
                json!({"format": "jpeg", "quality": 0}),
                InvalidReason::Quality,
                "1..=100",
            ),
            (
                json!({"format": "jpeg", "quality": 101}),
                InvalidReason::Quality,
                "1..=100",
            ),
            (
                json!({"format": "jpeg", "quality": 4294967295u32}),
                InvalidReason::Quality,
                "1..=100",
            ),
            (
                json!({"format": "jpeg", "quality": 90.5}),
                InvalidReason::Quality,
                "quality",
            ),
            (
                json!({"format": "jpeg", "quality": "90"}),
                InvalidReason::Quality,
                "quality",
            ),
            (
                json!({"format": "webp", "quality": 80}),
                InvalidReason::Quality,
                "lossless",
            ),
            (json!({"quality": 80}), InvalidReason::Quality, "lossless"),
        ] {
            let e = parse_value(&o(bad.clone())).unwrap_err();
            assert_eq!(e.reason, reason, "{bad}: {}", e.message);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
        // The work hash: PNG as before; the format and the resolved quality otherwise.
        let hash = |v: Value| parse_value(&o(v)).unwrap().work_sha256();
        let png = parse_value(&minimal()).unwrap().work_sha256();
        assert_eq!(hash(json!({"format": "png"})), png);
        assert_ne!(hash(json!({"format": "jpeg"})), png);
        assert_ne!(hash(json!({"format": "webp"})), png);
        assert_ne!(
            hash(json!({"format": "webp"})),
            hash(json!({"format": "jpeg"}))
        );
        assert_eq!(
            hash(json!({"format": "jpeg"})),
            hash(json!({"format": "jpeg", "quality": 90}))
        );
        assert_ne!(
            hash(json!({"format": "jpeg"})),
            hash(json!({"format": "jpeg", "quality": 91}))
        );
    }

    #[test]
    fn output_webhook() {
        let o = |v: Value| with(minimal(), "/output", Some(json!({"webhook": v})));
        let url = "https://hooks.example.com/sdbatch?token=t0k3n";
        let b = parse_value(&o(json!({"url": url}))).unwrap();
        assert_eq!(b.webhook.as_ref().map(|w| w.url().as_str()), Some(url));
        assert_eq!(parse_value(&minimal()).unwrap().webhook, None);
        assert_eq!(parse_value(&o(Value::Null)).unwrap().webhook, None);
        // The shape only: which hosts are allowed is the worker's business.
        assert!(parse_value(&o(json!({"url": "http://127.0.0.1:8080/"}))).is_ok());
        let long = format!("https://example.com/{}", "a".repeat(3000));
        for (bad, says) in [
            (json!("https://example.com/"), "webhook"),
            (json!({}), "url"),
            (json!({"url": 5}), "webhook"),
            (
                json!({"url": "https://example.com/", "secret": "x"}),
                "secret",
            ),
            (json!({"url": "ftp://example.com/"}), "scheme"),
            (json!({"url": "https://u:p@example.com/"}), "credentials"),
            (json!({"url": "https://example.com/#f"}), "fragment"),
            (json!({"url": "not a url"}), "whitespace"),
            (json!({"url": long}), "limit 2048"),
        ] {
            let e = parse_value(&o(bad.clone())).unwrap_err();
            assert_eq!(e.reason, InvalidReason::Webhook, "{bad}: {}", e.message);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
            assert!(e.message.len() < 300, "{}", e.message);
        }
        // Not part of the work: another webhook does not make it other work.
        let plain = parse_value(&minimal()).unwrap().work_sha256();
        assert_eq!(b.work_sha256(), plain);
    }

    #[test]
    fn clip_skip() {
        let p = |v: Value| with(minimal(), "/params", Some(json!({"clip_skip": v})));
        assert_eq!(parse_value(&minimal()).unwrap().params.clip_skip, 1);
        assert_eq!(parse_value(&p(json!(2))).unwrap().params.clip_skip, 2);
        for bad in [json!(0), json!(13), json!(-1), json!("2"), json!(1.5)] {
            let e = parse_value(&p(bad.clone())).unwrap_err();
            assert_eq!(e.reason, InvalidReason::ClipSkip, "{bad}: {}", e.message);
        }
    }

    #[test]
    fn loras_are_checked_and_refusals_name_them() {
        let p = |v: Value| with(minimal(), "/params", Some(json!({"loras": v})));
        assert!(parse_value(&minimal()).unwrap().params.loras.is_empty());
        let ok = parse_value(&p(json!([{"name": "lcm-lora_sd1.5", "weight": -0.3}]))).unwrap();
        assert_eq!(ok.params.loras[0].weight, -0.3);
        for (bad, says) in [
            (json!([{"name": "../x"}]), "file stem"),
            (json!([{"name": "a/b"}]), "file stem"),
            (json!([{"name": ".hidden"}]), "file stem"),
            (json!([{"name": ""}]), "1..=128"),
            (json!([{"name": "x".repeat(129)}]), "1..=128"),
            (json!([{"name": "a", "weight": 11}]), "weight"),
            (
                json!([{"name": "a"}, {"name": "a", "weight": 0.5}]),
                "twice",
            ),
            (
                json!(
                    (0..9)
                        .map(|i| json!({"name": format!("l{i}")}))
                        .collect::<Vec<_>>()
                ),
                "at most 8",
            ),
            (json!([{"name": "a", "scale": 1}]), "scale"),
            (json!([{"weight": 1}]), "name"),
            (json!({"name": "a"}), "loras"),
            (json!(["a"]), "loras"),
        ] {
            let e = parse_value(&p(bad.clone())).unwrap_err();
            assert_eq!(e.reason, InvalidReason::Lora, "{bad}: {}", e.message);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
            assert!(e.message.len() < 400, "bounded: {}", e.message);
        }
    }

    #[test]
    fn prompt_syntax_and_a1111_prompt_errors() {
        let p = |v: Value| with(minimal(), "/params", Some(json!({"prompt_syntax": v})));
        let plain = parse_value(&minimal()).unwrap();
        assert_eq!(plain.params.prompt_syntax, PromptSyntax::Plain);
        let a = parse_value(&p(json!("a1111"))).unwrap();
        assert_eq!(a.params.prompt_syntax, PromptSyntax::A1111);
        // Only a non-plain syntax changes the work hash (hashes recorded before it stay valid).
        let explicit_plain = parse_value(&p(json!("plain"))).unwrap();
        assert_eq!(explicit_plain.work_sha256(), plain.work_sha256());
        assert_ne!(a.work_sha256(), plain.work_sha256());
        assert_eq!(reason_of(&p(json!("comfy"))), InvalidReason::PromptSyntax);
        assert_eq!(reason_of(&p(json!(1))), InvalidReason::PromptSyntax);
        // Unbalanced brackets are refused only when the prompt is read as A1111 syntax.
        let unbalanced = with(p(json!("a1111")), "/items/0/prompt", Some(json!("a (cat")));
        let e = parse_value(&unbalanced).unwrap_err();
        assert_eq!(e.reason, InvalidReason::Prompt);
        assert!(
            e.message.contains("items[0].prompt") && e.message.contains("character 3"),
            "{}",
            e.message
        );
        let neg = with(
            p(json!("a1111")),
            "/items/0/negative_prompt",
            Some(json!("x]")),
        );
        assert_eq!(reason_of(&neg), InvalidReason::Prompt);
        assert!(parse_value(&with(minimal(), "/items/0/prompt", Some(json!("a (cat")))).is_ok());
    }

    #[test]
    fn guidance_rescale() {
        let p = |v: Value| with(minimal(), "/params", Some(json!({"guidance_rescale": v})));
        assert_eq!(
            parse_value(&minimal()).unwrap().params.guidance_rescale,
            0.0
        );
        assert_eq!(
            parse_value(&p(json!(0.7))).unwrap().params.guidance_rescale,
            0.7
        );
        assert_eq!(
            parse_value(&p(json!(1))).unwrap().params.guidance_rescale,
            1.0
        );
        for bad in [json!(-0.1), json!(1.01), json!("0.7"), json!(true)] {
            let e = parse_value(&p(bad.clone())).unwrap_err();
            assert_eq!(e.reason, InvalidReason::Guidance, "{bad}: {}", e.message);
        }
    }

    #[test]
    fn oversized_bodies_are_rejected_before_parsing() {
        let l = Limits {
            max_message_bytes: 100,
            ..limits()
        };
        // Not even JSON: the size is checked before anything reads the body.
        let e = parse(&[b'{'; 101], &l, NATIVE).unwrap_err();
        assert_eq!(e.reason, InvalidReason::TooLarge);
        assert_eq!(e.batch_id, None);
        assert!(e.message.contains("101 bytes, limit 100"), "{}", e.message);
        let body = serde_json::to_vec(&minimal()).unwrap();
        assert!(body.len() <= 100);
        assert!(parse(&body, &l, NATIVE).is_ok());
        assert_eq!(Limits::default().max_message_bytes, 1 << 20);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // A body within the size limit but nested far beyond serde_json's recursion limit.
        let mut body = br#"{"schema_version": 1, "batch_id": "b1", "items": "#.to_vec();
        body.extend(std::iter::repeat_n(b'[', 100_000));
        let e = parse(&body, &limits(), NATIVE).unwrap_err();
        assert_eq!(e.reason, InvalidReason::NotJson);
        assert!(e.message.contains("recursion limit"), "{}", e.message);
    }

    #[test]
    fn huge_values_are_never_echoed_whole() {
        // serde quotes a wrongly typed value whole; the reason text must stay header-sized.
        let huge = "9".repeat(140_000);
        for (ptr, value) in [
            ("/params/steps", json!(huge)),
            ("/params/width", json!(huge)),
            ("/items/0/seed", json!(huge)),
            ("/items/0/prompt", json!(huge)),
            ("/batch_id", json!(huge)),
            ("/schema_version", json!(huge)),
        ] {
            let e = parse_value(&with(example(), ptr, Some(value))).unwrap_err();
            assert!(
                e.message.len() <= crate::bounded::MAX_REASON_BYTES,
                "{ptr}: {} bytes",
                e.message.len()
            );
        }
    }

    #[test]
    fn error_messages_are_bounded() {
        let huge = "/".repeat(10_000);
        let e = parse_value(&with(minimal(), "/items/0/id", Some(json!(huge)))).unwrap_err();
        assert!(e.message.len() < 300, "{}", e.message.len());
        let key = "k".repeat(10_000);
        let e = parse_value(&with(minimal(), &format!("/{key}"), Some(json!(1)))).unwrap_err();
        assert!(e.message.len() < 400, "{}", e.message.len());
    }

    #[test]
    fn message_round_trips_and_omits_absent_fields() {
        let msg: BatchMessage = serde_json::from_value(example()).unwrap();
        assert_eq!(serde_json::to_value(&msg).unwrap(), example());
        let back: BatchMessage = serde_json::from_slice(&msg.to_json_vec()).unwrap();
        assert_eq!(back, msg);
        let min: BatchMessage = serde_json::from_value(minimal()).unwrap();
        assert_eq!(serde_json::to_value(&min).unwrap(), minimal());
    }

    // --- Field lists: serde structs ⇔ FIELDS consts ⇔ shape tables ⇔ JSON Schema. ---

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn field_lists_match_the_structs() {
        // A fully populated message serializes every field once: its keys are serde's names.
        // The example with the img2img fields, which the other tests leave out.
        let mut full = example();
        full["items"][0]["init_image"] = json!("s3://images/inputs/sku-123.png");
        full["items"][0]["mask_image"] = json!("s3://images/inputs/sku-123-mask.png");
        full["params"]["strength"] = json!(0.6);
        full["params"]["mask_blur"] = json!(4.0);
        full["params"]["padding_mask_crop"] = json!(32);
        full["params"]["hires"] =
            json!({"scale": 2.0, "steps": 20, "strength": 0.5, "upscaler": "latent"});
        full["output"]["webhook"] = json!({"url": "https://hooks.example.com/sdbatch"});
        assert_eq!(keys(&full), set(BatchMessage::FIELDS));
        assert_eq!(keys(&full["params"]["hires"]), set(MessageHires::FIELDS));
        assert_eq!(keys(&full["items"][0]), set(MessageItem::FIELDS));
        assert_eq!(keys(&full["params"]), set(MessageParams::FIELDS));
        assert_eq!(keys(&full["output"]), set(MessageOutput::FIELDS));
        assert_eq!(
            keys(&full["output"]["webhook"]),
            set(MessageWebhook::FIELDS)
        );
        let msg: BatchMessage = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(serde_json::to_value(&msg).unwrap(), full);
        // The required ones are exactly those serde insists on.
        for (fields, required, base) in [
            (BatchMessage::FIELDS, BatchMessage::REQUIRED, full.clone()),
            (
                MessageItem::FIELDS,
                MessageItem::REQUIRED,
                full["items"][0].clone(),
            ),
        ] {
            for f in fields {
                let mut v = base.clone();
                v.as_object_mut().unwrap().remove(*f);
                let ok = if base.get("batch_id").is_some() {
                    serde_json::from_value::<BatchMessage>(v).is_ok()
                } else {
                    serde_json::from_value::<MessageItem>(v).is_ok()
                };
                assert_eq!(ok, !required.contains(f), "{f}");
            }
        }
        // The shape tables name the same fields.
        for (specs, fields) in [
            (TOP, BatchMessage::FIELDS),
            (ITEM, MessageItem::FIELDS),
            (PARAMS, MessageParams::FIELDS),
            (OUTPUT, MessageOutput::FIELDS),
        ] {
            let names: Vec<&str> = specs.iter().map(|s| s.0).collect();
            assert_eq!(names, fields);
        }
        for (specs, required) in [
            (TOP, BatchMessage::REQUIRED),
            (ITEM, MessageItem::REQUIRED),
            (PARAMS, &[][..]),
            (OUTPUT, &[][..]),
        ] {
            for s in specs {
                assert_eq!(s.1, required.contains(&s.0), "{}", s.0);
            }
        }
    }

    #[test]
    fn json_schema_lists_exactly_the_struct_fields() {
        let schema: Value =
            serde_json::from_str(include_str!("../docs/batch-message.schema.json")).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        let defs = &schema["$defs"];
        for (obj, fields, required) in [
            (&schema, BatchMessage::FIELDS, BatchMessage::REQUIRED),
            (&defs["item"], MessageItem::FIELDS, MessageItem::REQUIRED),
            (&defs["params"], MessageParams::FIELDS, &[][..]),
            (&defs["output"], MessageOutput::FIELDS, &[][..]),
            (
                &defs["params"]["properties"]["hires"],
                MessageHires::FIELDS,
                &["scale"][..],
            ),
            (
                &defs["webhook"],
                MessageWebhook::FIELDS,
                MessageWebhook::REQUIRED,
            ),
        ] {
            assert_eq!(keys(&obj["properties"]), set(fields));
            assert_eq!(obj["additionalProperties"], false);
            let req: Vec<&str> = obj
                .get("required")
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(set(&req), set(required));
        }
        // Enumerations match the code.
        let presets: Vec<&str> = defs["params"]["properties"]["preset"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(presets, PRESETS.map(|p| p.name));
        let schedulers: Vec<&str> = defs["params"]["properties"]["scheduler"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(schedulers, SchedulerKind::ALL.map(|k| k.name()));
        assert_eq!(
            schema["properties"]["schema_version"]["const"],
            SCHEMA_VERSION
        );
    }

    /// Every ```json block of docs/messages.md that is a message parses (events are checked in
    /// `events`).
    #[test]
    fn documented_messages_parse() {
        let doc = include_str!("../docs/messages.md");
        let l = Limits {
            allowed_buckets: vec!["images".into(), "concept-art".into()],
            default_bucket: Some("images".into()),
            ..Limits::default()
        };
        let mut n = 0;
        for block in json_blocks(doc) {
            let v: Value = serde_json::from_str(block)
                .unwrap_or_else(|e| panic!("invalid JSON in docs: {e}\n{block}"));
            if v.get("items").is_some() {
                parse(block.as_bytes(), &l, NATIVE).unwrap_or_else(|e| panic!("{e}\n{block}"));
                n += 1;
            }
        }
        assert!(n >= 3, "only {n} messages found in docs/messages.md");
    }

    /// The bodies of the ```json fenced blocks of a Markdown text.
    fn json_blocks(doc: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + 8..];
            let end = body.find("\n```").expect("unclosed ```json block");
            out.push(&body[..end]);
            rest = &body[end + 4..];
        }
        out
    }
}

/// Fuzzing the parser and validator with mutated valid messages: never a panic, every rejection
/// bounded, and every accepted message's keys storable.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"schema_version": 1, "batch_id": "shoes-1",
            "items": [{"id": "sku-123", "prompt": "a red sneaker", "negative_prompt": "blurry",
                       "seed": 42, "num_images": 2},
                      {"id": "sku-124", "prompt": "a boot"}],
            "params": {"steps": 25, "guidance_scale": 8.5, "width": 512, "height": 512,
                       "scheduler": "pndm", "preset": "production", "safety_checker": false},
            "output": {"bucket": "images", "prefix": "catalog/shoes"}})
    }

    fn limits() -> Limits {
        Limits {
            allowed_buckets: vec!["images".into()],
            default_bucket: Some("images".into()),
            ..Limits::default()
        }
    }

    /// Strings a hostile producer would try: huge, control characters, reserved names, paths.
    fn nasty_string() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z./_-]{0,12}",
            Just(".sdbatch-meta".to_string()),
            Just("x/.sdbatch-tmp.1".to_string()),
            Just("../..".to_string()),
            Just("manifest.json".to_string()),
            Just("a\u{1b}[31m\nb".to_string()),
            (1usize..200_000).prop_map(|n| "9".repeat(n)),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            nasty_string().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Every JSON pointer of `v` (objects and arrays), the root included.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    pointers(child, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    pointers(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Replace(usize, Value),
        Remove(usize),
        AddKey(usize, String, Value),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), json_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
            any::<usize>().prop_map(Mutation::Remove),
            (any::<usize>(), nasty_string(), json_value())
                .prop_map(|(i, k, v)| Mutation::AddKey(i, k, v)),
        ]
    }

    fn apply(v: &mut Value, m: &Mutation) {
        let mut ptrs = Vec::new();
        pointers(v, String::new(), &mut ptrs);
        let pick = |i: usize| ptrs[i % ptrs.len()].clone();
        match m {
            Mutation::Replace(i, new) => {
                if let Some(slot) = v.pointer_mut(&pick(*i)) {
                    *slot = new.clone();
                }
            }
            Mutation::Remove(i) => {
                let p = pick(*i);
                if let Some((parent, last)) = p.rsplit_once('/')
                    && let Some(Value::Object(obj)) = v.pointer_mut(parent)
                {
                    obj.remove(last);
                }
            }
            Mutation::AddKey(i, k, new) => {
                if let Some(Value::Object(obj)) = v.pointer_mut(&pick(*i)) {
                    obj.insert(k.clone(), new.clone());
                }
            }
        }
    }

    fn check(body: &[u8]) -> Result<(), TestCaseError> {
        match parse(body, &limits(), 512) {
            Ok(batch) => {
                // Whatever validation accepts, storage can store.
                for item in &batch.items {
                    for n in 0..item.num_images {
                        let key = batch.image_key(&item.id, n);
                        prop_assert!(
                            crate::storage::validate_key("put", &batch.bucket, &key).is_ok(),
                            "accepted but not storable: {key}"
                        );
                    }
                }
                prop_assert!(
                    crate::storage::validate_key("put", &batch.bucket, &batch.manifest_key())
                        .is_ok()
                );
            }
            Err(e) => {
                prop_assert!(e.message.len() <= crate::bounded::MAX_REASON_BYTES);
                prop_assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
                prop_assert!(InvalidReason::ALL.contains(&e.reason));
                if let Some(id) = &e.batch_id {
                    prop_assert!(is_valid_batch_id(id));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn mutated_messages(mutations in prop::collection::vec(mutation(), 1..4)) {
            let mut v = valid();
            for m in &mutations {
                apply(&mut v, m);
            }
            check(&serde_json::to_vec(&v).unwrap())?;
        }

        #[test]
        fn mutated_bytes(edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8)) {
            let mut body = serde_json::to_vec(&valid()).unwrap();
            for (at, byte, op) in edits {
                let i = at % (body.len() + 1);
                match op {
                    0 if i < body.len() => body[i] = byte,
                    1 => body.insert(i, byte),
                    _ if i < body.len() => { body.remove(i); }
                    _ => {}
                }
            }
            check(&body)?;
        }
    }
}
