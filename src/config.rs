//! The worker's optional TOML configuration file, and every worker default in one place
//! ([`defaults`]). Precedence: command-line flags and environment variables, then this file, then
//! the defaults. Unknown keys are errors (a typo must not silently fall back to a default).
//!
//! `docs/worker.toml` is the reference: every key, each set to its default (a test checks that
//! the file covers every `sdbatch worker` flag and that loading it changes nothing).
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The worker's defaults: what a flag, its environment variable and the config file leave unset.
/// Limits on messages have theirs in [`crate::message::Limits::default`].
pub mod defaults {
    pub const QUEUE_PREFIX: &str = "sdbatch";
    /// Deliveries before a failing batch is dead-lettered (the quorum queue's `x-delivery-limit`).
    pub const DELIVERY_LIMIT: u32 = 3;
    /// Messages held at once at most (holding may take fewer, see `worker::holding`).
    pub const PREFETCH: u16 = 8;
    /// High-lane messages taken in a row before one of the normal lane (`worker::lanes`).
    pub const HIGH_LANE_RATIO: u32 = crate::worker::lanes::DEFAULT_RATIO;
    /// Images per GPU batch at most on CUDA (free memory decides below it).
    pub const MAX_BATCH_CUDA: usize = 64;
    /// Images per batch on the CPU (the batch size itself).
    pub const MAX_BATCH_CPU: usize = 4;
    pub const MEMORY_MARGIN: f64 = 0.10;
    pub const GRACE_PERIOD_SECS: u64 = 600;
    /// Longest grace period accepted: a day (larger values once overflowed the deadline).
    pub const MAX_GRACE_PERIOD_SECS: u64 = 86_400;
    pub const BROKER_TIMEOUT_SECS: u64 = crate::queue::DEFAULT_OPERATION_TIMEOUT.as_secs();
    /// RabbitMQ's own default `consumer_timeout`.
    pub const CONSUMER_TIMEOUT_SECS: u64 = 1800;
    /// Fraction of the consumer timeout the work in hand may take.
    pub const CONSUMER_TIMEOUT_SAFETY: f64 = 0.8;
    pub const MAX_PENDING_IMAGES: usize = 256;
    pub const METRICS_ADDR: &str = "0.0.0.0:9090";
    pub const DEVICE: &str = "auto";
    pub const DTYPE: &str = "auto";
    pub const STORAGE_URL: &str = "s3://";
    pub const SAFETY_CHECKER: bool = false;
    pub const SAFETY_POLICY: &str = "blank";
    /// Run the calibration batches before turning ready (CUDA only).
    pub const WARM_UP: bool = true;
    /// LoRA files kept in memory once read, in MiB (least recently used dropped first).
    pub const LORA_CACHE_MB: u64 = 1024;
    /// Mark every image as AI-generated in its XMP (EU AI Act Art. 50(2)).
    pub const AI_MARKING: bool = true;
    /// Reconnect backoff bounds, and attempts to publish one event.
    pub const RECONNECT_MIN_MS: u64 = 500;
    pub const RECONNECT_MAX_SECS: u64 = 30;
    pub const PUBLISH_ATTEMPTS: usize = 6;
    /// One webhook attempt at most, and how long a webhook is retried.
    pub const WEBHOOK_TIMEOUT_SECS: u64 = 10;
    pub const WEBHOOK_GIVE_UP_SECS: u64 = 3600;
    /// How long an exiting worker waits for webhook deliveries in progress.
    pub const WEBHOOK_SHUTDOWN_SECS: u64 = 5;
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub amqp_url: Option<String>,
    pub queue_prefix: Option<String>,
    pub delivery_limit: Option<u32>,
    pub prefetch: Option<u16>,
    pub high_lane_ratio: Option<u32>,
    pub worker_id: Option<String>,
    pub model: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub variant: Option<String>,
    pub compiled: Option<String>,
    pub model_config: Option<String>,
    pub vae: Option<String>,
    pub tokenizer: Option<String>,
    pub prediction_type: Option<String>,
    pub embeddings_dir: Option<String>,
    pub max_batch: Option<usize>,
    pub memory_margin: Option<f64>,
    pub grace_period_secs: Option<u64>,
    pub broker_timeout_secs: Option<u64>,
    pub consumer_timeout_secs: Option<u64>,
    pub max_pending_images: Option<usize>,
    pub progress_interval_secs: Option<u64>,
    pub metrics_addr: Option<String>,
    pub safety_checker: Option<bool>,
    pub safety_policy: Option<String>,
    pub clip_model: Option<String>,
    pub min_clip_score: Option<f32>,
    pub warm_up: Option<bool>,
    pub calibration_file: Option<String>,
    pub lora_dir: Option<String>,
    pub lora_cache_mb: Option<u64>,
    pub lcm_lora: Option<String>,
    pub ai_marking: Option<bool>,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub webhook: WebhookSection,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    pub allowed_buckets: Option<Vec<String>>,
    pub prefix: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_message_bytes: Option<usize>,
    pub max_items: Option<usize>,
    pub max_images_per_item: Option<u32>,
    pub max_total_images: Option<usize>,
    pub max_message_work: Option<f64>,
    pub max_prompt_bytes: Option<usize>,
    pub max_side: Option<i64>,
    pub max_steps: Option<usize>,
}

/// `[webhook]`: see `sdbatch worker --help` and docs/webhooks.md.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    pub allow: Option<Vec<String>>,
    /// A file holding the secret (the secret itself never goes in this file).
    pub secret_file: Option<String>,
    pub allow_private: Option<bool>,
    pub allow_http: Option<bool>,
    pub timeout_secs: Option<u64>,
    pub give_up_secs: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: describe_error(&text, &e),
        })
    }
}

/// `line L, column C: <kind>` for a TOML error, without the file's text. toml's own message
/// quotes the offending line, and serde's quote the offending value (`invalid type: string
/// "amqp://user:password@host"`): either can be a secret, and errors end up in logs.
fn describe_error(text: &str, e: &toml::de::Error) -> String {
    let kind = error_kind(text, e.message());
    match e.span() {
        Some(span) => {
            // Bytes, not a str slice: a span off a character boundary must not panic.
            let bytes = text.as_bytes();
            let before = bytes.get(..span.start).unwrap_or(bytes);
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            format!("line {line}, column {column}: {kind}")
        }
        None => kind,
    }
}

/// The kind of a TOML error in words that cannot carry the file's text.
fn error_kind(text: &str, message: &str) -> String {
    // Not even TOML: the parser's messages are fixed descriptions ("invalid basic string,
    // expected `\"`"); cut to their first line all the same.
    if text.parse::<toml::Table>().is_err() {
        let description = message.lines().next().unwrap_or("").trim();
        return format!("invalid TOML: {}", one_line(description));
    }
    // TOML, but not our schema: serde's messages, whose fixed parts we keep. Key names are
    // shown when they look like key names (a typo's name is the point of the message).
    let first_quoted = |s: &str| {
        s.split('`')
            .nth(1)
            .filter(|k| {
                !k.is_empty()
                    && k.len() <= 64
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .map(|k| format!(" `{k}`"))
            .unwrap_or_default()
    };
    // The part after serde's last ", expected " names a type of ours (`u16`, `a sequence`).
    let expected = || {
        message
            .rsplit_once(", expected ")
            .map(|(_, e)| format!(", expected {}", one_line(e)))
            .unwrap_or_default()
    };
    if let Some(rest) = message.strip_prefix("unknown field") {
        format!("unknown key{}", first_quoted(rest))
    } else if let Some(rest) = message.strip_prefix("duplicate field") {
        format!("duplicate key{}", first_quoted(rest))
    } else if message.starts_with("invalid type") {
        format!("wrong type of value{}", expected())
    } else if message.starts_with("invalid value") || message.starts_with("invalid length") {
        format!("invalid value{}", expected())
    } else {
        "invalid value".to_owned()
    }
}

/// Our own wording cut to one short line.
fn one_line(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_file() {
        let cfg: FileConfig = toml::from_str(include_str!("../docs/worker.toml")).unwrap();
        assert_eq!(cfg.prefetch, Some(defaults::PREFETCH));
        assert_eq!(cfg.storage.allowed_buckets.as_deref(), Some(&[][..]));
        assert_eq!(cfg.limits.max_side, Some(1024));
        assert_eq!(cfg.warm_up, Some(defaults::WARM_UP));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "prefech = 4\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("w.toml") && err.contains("prefech"), "{err}");
    }

    fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, text).unwrap();
        FileConfig::load(&path).unwrap_err().to_string()
    }

    /// The file's text, which may hold a password, never reaches the error: only the file,
    /// the position and the kind of error.
    #[test]
    fn errors_name_the_position_not_the_text() {
        let cases = [
            // Syntax errors on the line with the password.
            (
                "prefetch = 1\namqp_url = \"amqp://u:s3cret@h/\" x\n",
                "line 2, column 33: invalid TOML",
            ),
            (
                "prefetch = 1\namqp_url = \"amqp://u:s3cret@h/\n",
                "line 2, column ",
            ),
            (
                "amqp_url \"amqp://u:s3cret@h/\"\n",
                "line 1, column 10: invalid TOML",
            ),
            // Columns count characters, not bytes.
            (
                "worker_id = \"é\" \"s3cret\"\n",
                "line 1, column 17: invalid TOML",
            ),
            // Schema errors: an unknown key next to the password, a password where a number
            // goes, a password as a key.
            (
                "amqp_url = \"amqp://u:s3cret@h/\"\nprefech = 4\n",
                "line 2, column 1: unknown key `prefech`",
            ),
            (
                "delivery_limit = \"amqp://u:s3cret@h/\"\n",
                "line 1, column 18: wrong type of value, expected u32",
            ),
            (
                "\"amqp://u:s3cret@h/\" = 1\n",
                "line 1, column 1: unknown key",
            ),
            (
                "[storage]\nendpoint = [\"http://u:s3cret@h\"]\n",
                "line 2, column 12: wrong type of value",
            ),
        ];
        for (text, expected) in cases {
            let err = load_err(text);
            assert!(!err.contains("s3cret"), "{text:?} leaked: {err}");
            assert!(!err.contains("amqp://"), "{text:?} leaked: {err}");
            assert!(err.contains("worker.toml: invalid config: "), "{err}");
            assert!(err.contains(expected), "{text:?}: {err} lacks {expected:?}");
        }
    }
}
