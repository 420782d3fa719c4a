//! The worker's optional TOML configuration file. Precedence: command-line flags and environment
//! variables, then this file, then built-in defaults. Unknown keys are errors (a typo must not
//! silently fall back to a default).
//!
//! ```toml
//! amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//! queue_prefix = "sdbatch"
//! delivery_limit = 3
//! prefetch = 1
//! worker_id = "gpu-0"
//! model = "/models/stable-diffusion-v1-4"
//! device = "auto"
//! dtype = "auto"
//! max_batch = 64
//! memory_margin = 0.10
//! grace_period_secs = 600
//! broker_timeout_secs = 30
//!
//! [storage]
//! url = "s3://"
//! endpoint = "http://127.0.0.1:9000"
//! region = "us-east-1"
//! bucket = "images"
//! allowed_buckets = ["images", "concept-art"]
//! prefix = "sdbatch"
//!
//! [limits]
//! max_message_bytes = 1048576
//! max_items = 256
//! max_images_per_item = 16
//! max_total_images = 1024
//! max_message_work = 16384.0
//! max_side = 1024
//! ```
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub amqp_url: Option<String>,
    pub queue_prefix: Option<String>,
    pub delivery_limit: Option<u32>,
    pub prefetch: Option<u16>,
    pub worker_id: Option<String>,
    pub model: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub variant: Option<String>,
    pub max_batch: Option<usize>,
    pub memory_margin: Option<f64>,
    pub grace_period_secs: Option<u64>,
    pub broker_timeout_secs: Option<u64>,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub limits: LimitsSection,
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

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let cfg: FileConfig = toml::from_str(&example).unwrap();
        assert_eq!(cfg.prefetch, Some(1));
        assert_eq!(
            cfg.storage.allowed_buckets.as_deref(),
            Some(&["images".to_string(), "concept-art".to_string()][..])
        );
        assert_eq!(cfg.limits.max_side, Some(1024));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "prefech = 4\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("w.toml") && err.contains("prefech"), "{err}");
    }
}
