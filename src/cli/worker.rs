//! `sdbatch worker`: flags/env/TOML → config, model loaded on the model thread, storage connected,
//! signals wired to a graceful shutdown.
use super::BrokerArgs;
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use sdbatch::config::{FileConfig, WebhookSection, defaults};
use sdbatch::message::Limits;
use sdbatch::pipeline::clip_score::ClipScorer;
use sdbatch::pipeline::safety::SafetyChecker;
use sdbatch::pipeline::single_file::SingleFileOptions;
use sdbatch::pipeline::{LoadOptions, StableDiffusion};
use sdbatch::queue::{Lane, Topology};
use sdbatch::storage::{Storage, StorageConfig};
use sdbatch::webhook::{AllowEntry, Policy, Secret, Settings, WebhookConfig};
use sdbatch::worker::gpu::GpuExecutor;
use sdbatch::worker::gpu::Models;
use sdbatch::worker::memory::{MemoryBroker, Report};
use sdbatch::worker::{SafetyPolicy, Worker, WorkerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Optional TOML config file (flags and environment variables take precedence).
    #[arg(long, env = "SDBATCH_CONFIG", hide_env_values = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Unacked batch messages held at once (basic.qos prefetch, default 8); GPU batches are
    /// planned across all of them.
    #[arg(long, env = "SDBATCH_PREFETCH", hide_env_values = true)]
    pub prefetch: Option<u16>,
    /// While both lanes have waiting messages: high-lane messages taken in a row before one of
    /// the normal lane (default 4; at least 1 normal per N high, so neither lane starves).
    #[arg(long, env = "SDBATCH_HIGH_LANE_RATIO", hide_env_values = true,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub high_lane_ratio: Option<u32>,
    /// Worker id in events, logs and the consumer tag (default: host name and pid).
    #[arg(long, env = "SDBATCH_WORKER_ID", hide_env_values = true)]
    pub worker_id: Option<String>,
    /// Model folder in the diffusers layout, or a single-file .safetensors checkpoint
    /// (original CompVis/LDM layout, SD 1.x or 2.x).
    #[arg(long, env = "SDBATCH_MODEL", hide_env_values = true)]
    pub model: Option<PathBuf>,
    /// Single-file checkpoints: a diffusers folder whose configs, scheduler and tokenizer/ (if
    /// present) are used.
    #[arg(long, env = "SDBATCH_MODEL_CONFIG", hide_env_values = true)]
    pub model_config: Option<PathBuf>,
    /// Single-file checkpoints: a VAE folder or .safetensors file replacing the checkpoint's.
    #[arg(long, env = "SDBATCH_VAE", hide_env_values = true)]
    pub vae: Option<PathBuf>,
    /// Single-file checkpoints: a tokenizer folder (default: --model-config's tokenizer/, else the
    /// built-in CLIP tokenizer).
    #[arg(long, env = "SDBATCH_TOKENIZER", hide_env_values = true)]
    pub tokenizer: Option<PathBuf>,
    /// Single-file checkpoints: epsilon or v_prediction.
    #[arg(long, env = "SDBATCH_PREDICTION_TYPE", hide_env_values = true)]
    pub prediction_type: Option<String>,
    /// Folder of textual-inversion embeddings (.safetensors) added to the model at start: A1111
    /// files are triggered by their file name, diffusers files by their token. An unusable file
    /// stops the start.
    #[arg(long, env = "SDBATCH_EMBEDDINGS_DIR", hide_env_values = true)]
    pub embeddings_dir: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, env = "SDBATCH_DEVICE", hide_env_values = true)]
    pub device: Option<String>,
    /// auto, fp32, fp16, bf16.
    #[arg(long, env = "SDBATCH_DTYPE", hide_env_values = true)]
    pub dtype: Option<String>,
    /// Weights variant (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// Folder made by `sdbatch compile` for this model, dtype and GPU type: the UNet and VAE
    /// decoder run compiled (AOTInductor) where it covers the batch's shapes, eagerly elsewhere.
    /// A folder made for anything else stops the start.
    #[arg(
        long,
        env = "SDBATCH_COMPILED",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub compiled: Option<PathBuf>,
    /// Images per GPU batch at most (default 64 on CUDA, where free memory decides below it; 4 on
    /// the CPU, where it is the batch size).
    #[arg(long, env = "SDBATCH_MAX_BATCH", hide_env_values = true)]
    pub max_batch: Option<usize>,
    /// Fraction of device memory kept free when sizing batches (default 0.10).
    #[arg(long, env = "SDBATCH_MEMORY_MARGIN", hide_env_values = true)]
    pub memory_margin: Option<f64>,
    /// Seconds the messages in hand may take to finish after SIGTERM (default 600, at most
    /// 86400).
    #[arg(long, env = "SDBATCH_GRACE_PERIOD_SECS", hide_env_values = true)]
    pub grace_period_secs: Option<u64>,
    /// Seconds one broker operation (publish with confirm, ack, nack, declare) may take before
    /// the connection is treated as lost and re-established (default 30, 1..=3600).
    #[arg(long, env = "SDBATCH_BROKER_TIMEOUT_SECS", hide_env_values = true)]
    pub broker_timeout_secs: Option<u64>,
    /// The broker's consumer timeout in seconds (RabbitMQ's `consumer_timeout`, default 1800):
    /// the worker holds no more work than it can finish within 80 % of it.
    #[arg(long, env = "SDBATCH_CONSUMER_TIMEOUT_SECS", hide_env_values = true)]
    pub consumer_timeout_secs: Option<u64>,
    /// Images generated but not yet stored, at most (default 256): a slow store slows the GPU
    /// instead of filling host memory.
    #[arg(long, env = "SDBATCH_MAX_PENDING_IMAGES", hide_env_values = true)]
    pub max_pending_images: Option<usize>,
    /// Seconds between two `batch.progress` events of one batch, at least (default 5; also at
    /// most one per GPU batch; 0: one per GPU batch).
    #[arg(long, env = "SDBATCH_PROGRESS_INTERVAL_SECS", hide_env_values = true)]
    pub progress_interval_secs: Option<u64>,
    /// Largest message body accepted, in bytes, checked before parsing (default 1048576 = 1 MiB);
    /// larger ones are dead-lettered unparsed with reason `too_large`.
    #[arg(long, env = "SDBATCH_MAX_MESSAGE_BYTES", hide_env_values = true)]
    pub max_message_bytes: Option<usize>,
    /// Largest work of one message in image-steps-megapixels (images x steps x width x height /
    /// 10^6; default 16384, e.g. 1250 images of 512x512 at 50 steps); more is dead-lettered as
    /// `too_much_work`.
    #[arg(long, env = "SDBATCH_MAX_MESSAGE_WORK", hide_env_values = true)]
    pub max_message_work: Option<f64>,
    /// `s3://` or `file:///absolute/folder` (local-directory sink for machines without S3).
    #[arg(long, env = "SDBATCH_STORAGE_URL", hide_env_values = true)]
    pub storage_url: Option<String>,
    /// S3 endpoint for MinIO, Garage, s3s-fs (path-style addressing is then used).
    #[arg(long, env = "S3_ENDPOINT", hide_env_values = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long, env = "AWS_REGION", hide_env_values = true)]
    pub s3_region: Option<String>,
    /// Bucket for messages that name none.
    #[arg(long, env = "S3_BUCKET", hide_env_values = true)]
    pub bucket: Option<String>,
    /// Comma-separated buckets messages may name (default: the default bucket only).
    #[arg(
        long,
        env = "SDBATCH_ALLOWED_BUCKETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub allowed_buckets: Option<Vec<String>>,
    /// Run the safety checker on batches that do not choose (`params.safety_checker`; default
    /// false; `--safety-checker` alone means true). The checker is loaded whenever the model
    /// folder has `safety_checker/`, so batches can ask for it.
    #[arg(
        long,
        env = "SDBATCH_SAFETY_CHECKER",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub safety_checker: Option<bool>,
    /// What happens to a flagged image: flag (store, mark), blank (store a black image; the
    /// default), drop.
    #[arg(
        long,
        env = "SDBATCH_SAFETY_POLICY",
        hide_env_values = true,
        value_enum
    )]
    pub safety_policy: Option<SafetyPolicy>,
    /// CLIP model folder (transformers layout) for a CLIP score per image.
    #[arg(long, env = "SDBATCH_CLIP_MODEL", hide_env_values = true)]
    pub clip_model: Option<PathBuf>,
    /// Mark images whose CLIP score is below this (they are kept).
    #[arg(long, env = "SDBATCH_MIN_CLIP_SCORE", hide_env_values = true)]
    pub min_clip_score: Option<f32>,
    /// Where /metrics, /healthz and /readyz are served (default 0.0.0.0:9090; "off" to
    /// disable).
    #[arg(long, env = "SDBATCH_METRICS_ADDR", hide_env_values = true)]
    pub metrics_addr: Option<String>,
    /// Run calibration batches (sizes 1 and 2, one step, native size) before /readyz turns 200, so
    /// the first real batches are sized from measured memory (default true; CUDA only, nothing
    /// to do on the CPU).
    #[arg(
        long,
        env = "SDBATCH_WARM_UP",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub warm_up: Option<bool>,
    /// JSON file keeping measured calibrations per GPU, model, precision and image size: a
    /// restarted worker with a matching entry skips its warm-up (CUDA only).
    #[arg(long, env = "SDBATCH_CALIBRATION_FILE", hide_env_values = true)]
    pub calibration_file: Option<PathBuf>,
    /// Folder of LoRA files that messages name in `params.loras` (NAME.safetensors, kohya/A1111
    /// or diffusers/PEFT layout).
    #[arg(long, env = "SDBATCH_LORA_DIR", hide_env_values = true)]
    pub lora_dir: Option<PathBuf>,
    /// LoRA files kept in memory once read, in MiB (default 1024).
    #[arg(long, env = "SDBATCH_LORA_CACHE_MB", hide_env_values = true)]
    pub lora_cache_mb: Option<u64>,
    /// The LCM-LoRA (a name in --lora-dir) that preset "fast" uses: 4 steps, LCM sampler,
    /// guidance 1.
    #[arg(long, env = "SDBATCH_LCM_LORA", hide_env_values = true)]
    pub lcm_lora: Option<String>,
    /// Key prefix for messages that name none.
    #[arg(long, env = "SDBATCH_PREFIX", hide_env_values = true)]
    pub prefix: Option<String>,
    /// Mark every image as AI-generated: XMP `Iptc4xmpExt:DigitalSourceType` =
    /// `trainedAlgorithmicMedia` (EU AI Act Art. 50(2); default true, `--ai-marking false` to
    /// turn it off where the deployer marks images another way).
    #[arg(
        long,
        env = "SDBATCH_AI_MARKING",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub ai_marking: Option<bool>,
    /// Hosts webhooks (`output.webhook`) may go to, comma-separated: `hooks.example.com`,
    /// `*.example.com` (its subdomains), an IP address; each optionally with `:PORT`. Default:
    /// none, and messages with a webhook are dead-lettered (reason `webhook`).
    #[arg(
        long,
        env = "SDBATCH_WEBHOOK_ALLOW",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub webhook_allow: Option<Vec<String>>,
    /// File holding the secret webhooks are signed with (at least 16 bytes, surrounding
    /// whitespace ignored). Or the secret itself in SDBATCH_WEBHOOK_SECRET (not both). Required
    /// with --webhook-allow.
    #[arg(long, env = "SDBATCH_WEBHOOK_SECRET_FILE", hide_env_values = true)]
    pub webhook_secret_file: Option<PathBuf>,
    /// Let webhooks reach loopback, private (RFC 1918), CGNAT, link-local and unique-local
    /// addresses (default false: a public receiver only). For receivers on the worker's own
    /// network, and tests.
    #[arg(
        long,
        env = "SDBATCH_WEBHOOK_ALLOW_PRIVATE",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub webhook_allow_private: Option<bool>,
    /// Accept plain http:// webhook URLs (default false: https only). For development.
    #[arg(
        long,
        env = "SDBATCH_WEBHOOK_ALLOW_HTTP",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub webhook_allow_http: Option<bool>,
    /// Seconds one webhook attempt may take (default 10, 1..=300).
    #[arg(long, env = "SDBATCH_WEBHOOK_TIMEOUT_SECS", hide_env_values = true)]
    pub webhook_timeout_secs: Option<u64>,
    /// Seconds a webhook is retried before it is given up (default 3600, 1..=86400).
    #[arg(long, env = "SDBATCH_WEBHOOK_GIVE_UP_SECS", hide_env_values = true)]
    pub webhook_give_up_secs: Option<u64>,
    /// Work through the batch messages in PATH instead of the broker's queues, then exit: a
    /// JSON Lines file (one message per line) or a folder of .json files (one message each).
    /// The same checks, GPU batching, storage, events and dead-lettering as on RabbitMQ, on an
    /// in-memory queue (all in the normal lane): for machines without a broker and for trying
    /// messages locally. Fails (exit status 1) when any message was dead-lettered.
    #[arg(long, value_name = "PATH")]
    pub messages: Option<PathBuf>,
    /// With --messages: write what became of each message, the events published and the
    /// dead-letter copies to this JSON file.
    #[arg(long, value_name = "FILE", requires = "messages")]
    pub report: Option<PathBuf>,
}

/// The environment variable holding the webhook secret itself (a flag would show it in `ps`).
const WEBHOOK_SECRET_ENV: &str = "SDBATCH_WEBHOOK_SECRET";

/// `--high-lane-ratio`, else the config file's, else the default; the file's is checked as the
/// flag's is (the flag's parser already refused what is out of range).
fn high_lane_ratio(flag: Option<u32>, file: Option<u32>) -> Result<u32> {
    let ratio = flag.or(file).unwrap_or(defaults::HIGH_LANE_RATIO);
    if !(1..=1000).contains(&ratio) {
        bail!("high_lane_ratio {ratio} must be in 1..=1000");
    }
    Ok(ratio)
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// The resolved settings: flags/env, then the file, then defaults.
struct Resolved {
    clip_model: Option<PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
    worker: WorkerConfig,
    storage: StorageConfig,
    model: PathBuf,
    single: SingleFileOptions,
    embeddings_dir: Option<PathBuf>,
    device: String,
    dtype: String,
    variant: Option<String>,
    compiled: Option<PathBuf>,
    /// `--messages` and `--report`: a broker-less run.
    messages: Option<PathBuf>,
    report: Option<PathBuf>,
}

fn resolve(args: WorkerArgs) -> Result<Resolved> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let amqp_url = args
        .broker
        .amqp_url_flag
        .clone()
        .or(file.amqp_url.clone())
        .unwrap_or_else(super::default_amqp_url);
    let prefix = args
        .broker
        .queue_prefix
        .clone()
        .or(file.queue_prefix.clone())
        .unwrap_or_else(|| defaults::QUEUE_PREFIX.into());
    let mut topology = Topology::with_prefix(&prefix);
    topology.delivery_limit = args
        .broker
        .delivery_limit
        .or(file.delivery_limit)
        .unwrap_or(defaults::DELIVERY_LIMIT);
    if topology.delivery_limit == 0 {
        bail!("--delivery-limit must be at least 1");
    }
    let device = args
        .device
        .clone()
        .or(file.device.clone())
        .unwrap_or_else(|| defaults::DEVICE.into());
    let device_is_cpu = device == "cpu" || (device == "auto" && !tch::Cuda::is_available());
    let model = args
        .model
        .or(file.model.map(PathBuf::from))
        .ok_or_else(|| {
            anyhow!("no model: pass --model DIR (or SDBATCH_MODEL, or `model` in the config file)")
        })?;

    let s = &file.storage;
    let default_bucket = args.bucket.or(s.bucket.clone());
    let allowed = args
        .allowed_buckets
        .or(s.allowed_buckets.clone())
        .unwrap_or_default();
    let l = &file.limits;
    let defaults = Limits::default();
    let limits = Limits {
        max_message_bytes: args
            .max_message_bytes
            .or(l.max_message_bytes)
            .unwrap_or(defaults.max_message_bytes),
        max_items: l.max_items.unwrap_or(defaults.max_items),
        max_images_per_item: l
            .max_images_per_item
            .unwrap_or(defaults.max_images_per_item),
        max_total_images: l.max_total_images.unwrap_or(defaults.max_total_images),
        max_message_work: args
            .max_message_work
            .or(l.max_message_work)
            .unwrap_or(defaults.max_message_work),
        max_prompt_bytes: l.max_prompt_bytes.unwrap_or(defaults.max_prompt_bytes),
        max_side: l.max_side.unwrap_or(defaults.max_side),
        max_steps: l.max_steps.unwrap_or(defaults.max_steps),
        allowed_buckets: allowed,
        default_bucket,
        default_prefix: args.prefix.or(s.prefix.clone()).unwrap_or_default(),
        lcm_lora: args.lcm_lora.or(file.lcm_lora),
        ..defaults
    };
    let lora_dir = args.lora_dir.or(file.lora_dir.map(PathBuf::from));
    match (&lora_dir, &limits.lcm_lora) {
        (None, Some(_)) => bail!("--lcm-lora names a LoRA in --lora-dir: pass --lora-dir too"),
        (Some(dir), lcm) => {
            if !dir.is_dir() {
                bail!("--lora-dir {}: not a folder", dir.display());
            }
            if let Some(name) = lcm {
                sdbatch::pipeline::adapters::lora_path(dir, name)
                    .map_err(|e| anyhow!("--lcm-lora: {e}"))?;
            }
        }
        (None, None) => {}
    }
    limits.check().map_err(|e| anyhow!("invalid limits: {e}"))?;
    if limits.default_bucket.is_none() && limits.allowed_buckets.is_empty() {
        bail!(
            "no bucket configured: pass --bucket (or S3_BUCKET, or storage.bucket in the config file)"
        );
    }

    let mut storage = StorageConfig::new(
        args.storage_url
            .or(s.url.clone())
            .unwrap_or_else(|| defaults::STORAGE_URL.into()),
    );
    storage.endpoint = args.s3_endpoint.or(s.endpoint.clone());
    storage.region = args.s3_region.or(s.region.clone());

    let grace_period_secs = args
        .grace_period_secs
        .or(file.grace_period_secs)
        .unwrap_or(defaults::GRACE_PERIOD_SECS);
    if grace_period_secs > defaults::MAX_GRACE_PERIOD_SECS {
        bail!(
            "--grace-period-secs {grace_period_secs} is above {} (a day); \
             Kubernetes' terminationGracePeriodSeconds must exceed it anyway",
            defaults::MAX_GRACE_PERIOD_SECS
        );
    }
    let broker_timeout_secs = args
        .broker_timeout_secs
        .or(file.broker_timeout_secs)
        .unwrap_or(defaults::BROKER_TIMEOUT_SECS);
    if !(1..=3600).contains(&broker_timeout_secs) {
        bail!("--broker-timeout-secs {broker_timeout_secs} must be in 1..=3600");
    }
    let consumer_timeout_secs = args
        .consumer_timeout_secs
        .or(file.consumer_timeout_secs)
        .unwrap_or(defaults::CONSUMER_TIMEOUT_SECS);
    if !(1..=7 * 86_400).contains(&consumer_timeout_secs) {
        bail!("--consumer-timeout-secs {consumer_timeout_secs} must be in 1..=604800");
    }
    let safety_policy = match (args.safety_policy, &file.safety_policy) {
        (Some(p), _) => p,
        (None, Some(name)) => SafetyPolicy::from_str(name, true).map_err(|_| {
            anyhow!("safety_policy in the config file: expected flag, blank or drop")
        })?,
        (None, None) => SafetyPolicy::from_str(defaults::SAFETY_POLICY, true)
            .map_err(|e| anyhow!("default safety policy: {e}"))?,
    };
    let webhook = webhook_config(
        WebhookArgs {
            allow: args.webhook_allow,
            secret_file: args.webhook_secret_file,
            allow_private: args.webhook_allow_private,
            allow_http: args.webhook_allow_http,
            timeout_secs: args.webhook_timeout_secs,
            give_up_secs: args.webhook_give_up_secs,
        },
        &file.webhook,
        std::env::var(WEBHOOK_SECRET_ENV).ok(),
    )?;
    let worker = WorkerConfig {
        amqp_url,
        topology,
        prefetch: args
            .prefetch
            .or(file.prefetch)
            .unwrap_or(defaults::PREFETCH)
            .max(1),
        high_lane_ratio: high_lane_ratio(args.high_lane_ratio, file.high_lane_ratio)?,
        worker_id: args
            .worker_id
            .or(file.worker_id)
            .unwrap_or_else(default_worker_id),
        model_name: model.display().to_string(),
        limits,
        max_batch: args
            .max_batch
            .or(file.max_batch)
            .unwrap_or(if device_is_cpu {
                defaults::MAX_BATCH_CPU
            } else {
                defaults::MAX_BATCH_CUDA
            })
            .max(1),
        memory_margin: args
            .memory_margin
            .or(file.memory_margin)
            .unwrap_or(defaults::MEMORY_MARGIN),
        grace_period: Duration::from_secs(grace_period_secs),
        broker_timeout: Duration::from_secs(broker_timeout_secs),
        consumer_timeout: Duration::from_secs(consumer_timeout_secs),
        max_pending_images: args
            .max_pending_images
            .or(file.max_pending_images)
            .unwrap_or(defaults::MAX_PENDING_IMAGES)
            .max(1),
        progress_interval: args
            .progress_interval_secs
            .or(file.progress_interval_secs)
            .map_or(sdbatch::progress::DEFAULT_INTERVAL, |s| {
                Duration::from_secs(s.min(defaults::MAX_GRACE_PERIOD_SECS))
            }),
        reconnect_min: Duration::from_millis(defaults::RECONNECT_MIN_MS),
        reconnect_max: Duration::from_secs(defaults::RECONNECT_MAX_SECS),
        publish_attempts: defaults::PUBLISH_ATTEMPTS,
        safety_default: args
            .safety_checker
            .or(file.safety_checker)
            .unwrap_or(defaults::SAFETY_CHECKER),
        safety_policy,
        min_clip_score: args.min_clip_score.or(file.min_clip_score),
        warm_up: args.warm_up.or(file.warm_up).unwrap_or(defaults::WARM_UP),
        calibration_file: args
            .calibration_file
            .or(file.calibration_file.map(PathBuf::from)),
        lora_dir,
        lora_cache_bytes: args
            .lora_cache_mb
            .or(file.lora_cache_mb)
            .unwrap_or(defaults::LORA_CACHE_MB)
            .saturating_mul(1 << 20),
        ai_marking: args
            .ai_marking
            .or(file.ai_marking)
            .unwrap_or(defaults::AI_MARKING),
        webhook,
    };
    let clip_model = args.clip_model.or(file.clip_model.map(PathBuf::from));
    if worker.min_clip_score.is_some() && clip_model.is_none() {
        bail!(
            "min_clip_score needs a CLIP model: pass --clip-model (or clip_model in the config file)"
        );
    }
    let metrics_addr = args
        .metrics_addr
        .or(file.metrics_addr)
        .unwrap_or_else(|| defaults::METRICS_ADDR.into());
    let metrics_addr = match metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--metrics-addr {a}: expected HOST:PORT or off"))?,
        ),
    };
    let single = super::single_file_options(
        args.model_config.or(file.model_config.map(PathBuf::from)),
        args.vae.or(file.vae.map(PathBuf::from)),
        args.tokenizer.or(file.tokenizer.map(PathBuf::from)),
        args.prediction_type.or(file.prediction_type).as_deref(),
    )?;
    Ok(Resolved {
        clip_model,
        metrics_addr,
        worker,
        storage,
        model,
        single,
        embeddings_dir: args
            .embeddings_dir
            .or(file.embeddings_dir.map(PathBuf::from)),
        device,
        dtype: args
            .dtype
            .or(file.dtype)
            .unwrap_or_else(|| defaults::DTYPE.into()),
        variant: args.variant.or(file.variant),
        compiled: args.compiled.or(file.compiled.map(PathBuf::from)),
        messages: args.messages,
        report: args.report,
    })
}

/// The webhook flags, taken out of [`WorkerArgs`] before it is consumed.
struct WebhookArgs {
    allow: Option<Vec<String>>,
    secret_file: Option<PathBuf>,
    allow_private: Option<bool>,
    allow_http: Option<bool>,
    timeout_secs: Option<u64>,
    give_up_secs: Option<u64>,
}

/// The webhook settings: flags, then the `[webhook]` section, then defaults; the secret from
/// its file or `secret_env` (never both, never logged).
fn webhook_config(
    args: WebhookArgs,
    file: &WebhookSection,
    secret_env: Option<String>,
) -> Result<WebhookConfig> {
    let allow = args
        .allow
        .or(file.allow.clone())
        .unwrap_or_default()
        .iter()
        .map(|entry| entry.parse::<AllowEntry>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("--webhook-allow: {e}"))?;
    let secret_file = args
        .secret_file
        .or(file.secret_file.clone().map(PathBuf::from));
    let secret = match (secret_file, secret_env.filter(|s| !s.is_empty())) {
        (Some(_), Some(_)) => {
            bail!("both --webhook-secret-file and {WEBHOOK_SECRET_ENV} are set: give one")
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("--webhook-secret-file {}", path.display()))?;
            Some(
                Secret::from_text(&text)
                    .map_err(|e| anyhow!("--webhook-secret-file {}: {e}", path.display()))?,
            )
        }
        (None, Some(text)) => {
            Some(Secret::from_text(&text).map_err(|e| anyhow!("{WEBHOOK_SECRET_ENV}: {e}"))?)
        }
        (None, None) => None,
    };
    if !allow.is_empty() && secret.is_none() {
        bail!(
            "--webhook-allow needs a signing secret: --webhook-secret-file FILE or \
             {WEBHOOK_SECRET_ENV}"
        );
    }
    let timeout_secs = args
        .timeout_secs
        .or(file.timeout_secs)
        .unwrap_or(defaults::WEBHOOK_TIMEOUT_SECS);
    if !(1..=300).contains(&timeout_secs) {
        bail!("--webhook-timeout-secs {timeout_secs} must be in 1..=300");
    }
    // Deliveries wait in memory: a day is the most worth holding.
    let give_up_secs = args
        .give_up_secs
        .or(file.give_up_secs)
        .unwrap_or(defaults::WEBHOOK_GIVE_UP_SECS);
    if !(1..=86_400).contains(&give_up_secs) {
        bail!("--webhook-give-up-secs {give_up_secs} must be in 1..=86400");
    }
    let base = WebhookConfig::default();
    Ok(WebhookConfig {
        policy: Policy {
            allow,
            allow_http: args.allow_http.or(file.allow_http).unwrap_or(false),
            allow_private: args.allow_private.or(file.allow_private).unwrap_or(false),
        },
        secret,
        settings: Settings {
            timeout: Duration::from_secs(timeout_secs),
            give_up: Duration::from_secs(give_up_secs),
            ..base.settings
        },
        ..base
    })
}

/// SIGTERM or SIGINT sets the shutdown flag; a second signal exits at once.
fn spawn_signal_handler(tx: tokio::sync::watch::Sender<bool>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen > 1 {
                tracing::warn!("second signal: exiting now; the batch in hand will be redelivered");
                std::process::exit(130);
            }
            tracing::info!("signal received: stopping after the batch in hand");
            let _ = tx.send(true);
        }
    });
    Ok(())
}

pub async fn run(args: WorkerArgs) -> Result<()> {
    let mut r = resolve(args)?;
    // Read before the model loads, so a wrong path fails at once.
    let local = match r.messages.take() {
        Some(path) => {
            let bodies = sdbatch::worker::memory::read_messages(&path)
                .with_context(|| format!("--messages {}", path.display()))?;
            tracing::info!(messages = bodies.len(), file = %path.display(), "no broker: messages read");
            let messages = bodies.into_iter().map(|b| (Lane::Normal, b)).collect();
            Some(MemoryBroker::new(messages, &r.worker.topology))
        }
        None => None,
    };
    let device = sdbatch::device::parse_device(&r.device)?;
    let dtype = sdbatch::device::parse_dtype(&r.dtype, device)?;
    tracing::info!(
        worker_id = %r.worker.worker_id,
        device = %sdbatch::device::device_name(device),
        dtype = sdbatch::device::dtype_name(dtype),
        broker = %match local {
            Some(_) => "none (--messages)".to_string(),
            None => sdbatch::queue::redact_url(&r.worker.amqp_url),
        },
        "starting worker"
    );

    let webhook = &r.worker.webhook;
    if webhook.is_enabled() {
        // The allow list and switches, never the secret.
        tracing::info!(
            allow = ?webhook.policy.allow,
            allow_private = webhook.policy.allow_private,
            allow_http = webhook.policy.allow_http,
            give_up = ?webhook.settings.give_up,
            "webhooks on"
        );
    }

    let (tx, rx) = tokio::sync::watch::channel(false);
    spawn_signal_handler(tx)?;

    let metrics = sdbatch::metrics::Metrics::new();
    if let Some(addr) = r.metrics_addr {
        // Bound here, once, so a port conflict fails the start-up instead of going unnoticed
        // (binding, dropping and binding again left the port to anyone in between).
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        tracing::info!(%addr, "metrics and health endpoints listening");
        let m = metrics.clone();
        tokio::spawn(async move {
            let limits = sdbatch::metrics::ServerLimits::default();
            if let Err(e) = sdbatch::metrics::serve_on(listener, m, limits).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let storage = Arc::new(Storage::connect(&r.storage).await?);
    if r.storage.url.starts_with("file://") {
        // The local-directory sink has no separate bucket administration: its "buckets" are
        // folders the worker may create itself.
        let limits = &r.worker.limits;
        for bucket in limits.default_bucket.iter().chain(&limits.allowed_buckets) {
            storage.create_bucket(bucket).await?;
        }
    }
    // A store that refuses the default bucket (bad credentials, no such bucket) would make every
    // batch fail permanently and be dead-lettered: refuse to start instead, so a misconfigured
    // pod crash-loops visibly rather than emptying the queue. A store that is merely down may
    // come back: warn and go on.
    if let Some(bucket) = &r.worker.limits.default_bucket {
        match storage.check(bucket).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                tracing::warn!(bucket, error = %e, "default bucket not reachable yet")
            }
            Err(e) => bail!("default bucket {bucket}: {e}"),
        }
    }

    let model_path = r.model.clone();
    let single = r.single.clone();
    let extras_dir = super::extras_dir(&r.model, r.single.model_config.as_deref());
    let options = LoadOptions {
        variant: r.variant.clone(),
        ..LoadOptions::new(device, dtype)
    };
    let started = std::time::Instant::now();
    let clip_dir = r.clip_model.clone();
    let require_safety = r.worker.safety_default;
    let loras = r
        .worker
        .lora_dir
        .clone()
        .map(|dir| (dir, r.worker.lora_cache_bytes));
    let embeddings_dir = r.embeddings_dir.clone();
    let compiled = r.compiled.clone();
    let gpu = GpuExecutor::start(move || {
        let safety = SafetyChecker::load(&extras_dir, &options)?;
        if require_safety && safety.is_none() {
            return Err(sdbatch::Error::MissingFile {
                path: extras_dir.join("safety_checker"),
            });
        }
        // A CLIP folder has no weight variants: load it without the pipeline's `--variant`.
        let clip_options = LoadOptions::new(options.device, options.dtype);
        let clip = clip_dir
            .map(|d| ClipScorer::load(&d, &clip_options))
            .transpose()?;
        let mut sd = StableDiffusion::load_any(&model_path, options, single)?;
        // Before the first batch, and part of the model hash every event carries.
        if let Some(dir) = &embeddings_dir {
            sd.load_embeddings(dir)?;
        }
        if let Some((dir, cache_bytes)) = loras {
            sd.set_lora_dir(&dir, cache_bytes)?;
        }
        if let Some(dir) = &compiled {
            sd.load_compiled(dir)?;
        }
        Ok(Models { sd, safety, clip })
    })
    .await
    .with_context(|| format!("loading model {}", r.model.display()))?;
    tracing::info!(model = %r.model.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");

    // Readiness ("model: ok") is set by the worker once it has also warmed up.
    metrics
        .model_load_seconds
        .set(started.elapsed().as_secs_f64());

    // Readiness: is the store reachable? Checked in the background every 10 s.
    if let Some(bucket) = r.worker.limits.default_bucket.clone() {
        let (m, s) = (metrics.clone(), storage.clone());
        tokio::spawn(async move {
            loop {
                let ok = s.check(&bucket).await.is_ok();
                m.storage_reachable
                    .store(ok, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }

    let worker = Worker::new(r.worker, Arc::new(gpu), storage, metrics);
    let Some(queue) = local else {
        worker.run(rx).await?;
        worker
            .finish_webhooks(Duration::from_secs(defaults::WEBHOOK_SHUTDOWN_SECS))
            .await;
        tracing::info!("worker stopped");
        return Ok(());
    };
    let outcome = worker.run_local(queue.clone(), rx).await;
    worker
        .finish_webhooks(Duration::from_secs(defaults::WEBHOOK_SHUTDOWN_SECS))
        .await;
    let report = queue.report();
    // Written whatever happened, but a failed write does not hide the run's own error.
    if let Some(path) = &r.report {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|json| Ok(std::fs::write(path, json)?));
        if let Err(e) = written {
            tracing::error!(file = %path.display(), error = %e, "could not write the report");
        }
    }
    outcome?;
    print_local_summary(&report, &worker.metrics());
    let (dead, unsettled) = (report.dead_lettered(), report.unsettled());
    let total = report.messages.len();
    let see = if r.report.is_some() {
        " (see --report)"
    } else {
        ""
    };
    if unsettled > 0 {
        bail!("{unsettled} of {total} message(s) not settled (stopped early){see}");
    }
    if dead > 0 {
        bail!("{dead} of {total} message(s) dead-lettered{see}");
    }
    Ok(())
}

/// The table a broker-less run ends with.
fn print_local_summary(report: &Report, metrics: &sdbatch::metrics::Metrics) {
    let completed = report
        .events_named(sdbatch::events::BATCH_COMPLETED)
        .count();
    let republished = metrics.batches.with_label_values(&["republished"]).get();
    let gpu_images = metrics.gpu_images.get();
    println!("messages          {}", report.messages.len());
    println!("completed         {completed} ({republished} announced again from their manifest)");
    println!("dead-lettered     {}", report.dead_lettered());
    println!("not settled       {}", report.unsettled());
    println!("GPU batches       {}", metrics.gpu_batches.get());
    println!("GPU images        {gpu_images}");
    println!("seconds           {:.2}", report.seconds);
    if report.seconds > 0.0 {
        println!(
            "GPU images/s      {:.3}",
            gpu_images as f64 / report.seconds
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::collections::BTreeSet;
    use std::path::Path;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/worker.toml");

    /// The config-file key of a flag: its id, unless it lives in a section or is named otherwise.
    fn toml_key(id: &str) -> String {
        match id {
            "amqp_url_flag" => "amqp_url".into(),
            "storage_url" => "storage.url".into(),
            "s3_endpoint" => "storage.endpoint".into(),
            "s3_region" => "storage.region".into(),
            "bucket" | "allowed_buckets" | "prefix" => format!("storage.{id}"),
            "max_message_bytes" | "max_message_work" => format!("limits.{id}"),
            other => match other.strip_prefix("webhook_") {
                Some(key) => format!("webhook.{key}"),
                None => other.into(),
            },
        }
    }

    /// The reference file with its commented-out keys (`# key = value`) switched on.
    fn every_key_on() -> String {
        std::fs::read_to_string(REFERENCE)
            .unwrap()
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if is_assignment(rest) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn is_assignment(line: &str) -> bool {
        line.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
    }

    /// `section.key` of every key the reference file sets or shows commented out.
    fn documented_keys() -> BTreeSet<String> {
        let mut section = String::new();
        let mut keys = BTreeSet::new();
        for line in every_key_on().lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{name}.");
            } else if is_assignment(line) {
                let key = line.split_once(" = ").map(|(k, _)| k).unwrap_or_default();
                keys.insert(format!("{section}{key}"));
            }
        }
        keys
    }

    fn resolve_args(args: &[&str]) -> Result<Resolved> {
        let argv = ["worker"].iter().chain(args).copied();
        resolve(Cli::try_parse_from(argv)?.args)
    }

    #[test]
    fn every_flag_has_a_documented_config_key() {
        // Every key the reference shows is one the file takes (unknown keys are errors)...
        let all: FileConfig = toml::from_str(&every_key_on()).unwrap();
        assert!(all.model.is_some() && all.calibration_file.is_some());
        // ... and every flag has one.
        let keys = documented_keys();
        let cmd = Cli::command();
        let flags: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            // Not settings but a run mode: `--messages` (and its `--report`) replace the broker.
            .filter(|id| !["config", "help", "messages", "report"].contains(&id.as_str()))
            .collect();
        assert!(flags.len() > 25, "{flags:?}");
        for id in flags {
            let key = toml_key(&id);
            assert!(
                keys.contains(&key),
                "--{id} has no key {key} in docs/worker.toml"
            );
        }
    }

    /// The reference sets every key to its default: loading it as it is changes nothing.
    #[test]
    fn the_reference_file_holds_the_defaults() {
        let base = [
            "--model",
            "/m",
            "--bucket",
            "images",
            "--worker-id",
            "w",
            "--max-batch",
            "4",
        ];
        let plain = resolve_args(&base).unwrap();
        let mut with_file = base.to_vec();
        with_file.extend(["--config", REFERENCE]);
        let filed = resolve_args(&with_file).unwrap();
        assert_eq!(format!("{:?}", plain.worker), format!("{:?}", filed.worker));
        assert_eq!(
            format!("{:?}", plain.storage),
            format!("{:?}", filed.storage)
        );
        assert_eq!(
            (plain.metrics_addr, plain.device, plain.dtype, plain.variant),
            (filed.metrics_addr, filed.device, filed.dtype, filed.variant)
        );
        assert_eq!(plain.clip_model, filed.clip_model);
        assert_eq!(plain.embeddings_dir, filed.embeddings_dir);
        // And the defaults are the documented ones.
        let w = &plain.worker;
        assert_eq!(w.prefetch, defaults::PREFETCH);
        assert_eq!(w.high_lane_ratio, defaults::HIGH_LANE_RATIO);
        assert_eq!(w.safety_policy, SafetyPolicy::Blank);
        assert!(w.warm_up && !w.safety_default);
        assert!(w.ai_marking);
        assert_eq!(
            plain.metrics_addr,
            Some(defaults::METRICS_ADDR.parse().unwrap())
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "model = \"/m\"\nwarm_up = false\nsafety_checker = true\nsafety_policy = \"drop\"\n\
             metrics_addr = \"off\"\ncalibration_file = \"/c.json\"\nclip_model = \"/clip\"\n\
             min_clip_score = 0.25\nembeddings_dir = \"/emb\"\nai_marking = false\n\
             [storage]\nbucket = \"images\"\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let r = resolve_args(&["--config", config]).unwrap();
        let w = &r.worker;
        assert!(!w.warm_up && w.safety_default);
        assert_eq!(w.safety_policy, SafetyPolicy::Drop);
        assert_eq!(r.metrics_addr, None);
        assert_eq!(w.calibration_file.as_deref(), Some(Path::new("/c.json")));
        assert_eq!(r.clip_model.as_deref(), Some(Path::new("/clip")));
        assert_eq!(w.min_clip_score, Some(0.25));
        assert_eq!(r.embeddings_dir.as_deref(), Some(Path::new("/emb")));
        assert!(!w.ai_marking);
        let r = resolve_args(&["--config", config, "--ai-marking"]).unwrap();
        assert!(r.worker.ai_marking, "the flag wins over the file");
        let r = resolve_args(&[
            "--config",
            config,
            "--warm-up",
            "--safety-checker",
            "false",
            "--safety-policy",
            "flag",
            "--metrics-addr",
            "127.0.0.1:9191",
            "--embeddings-dir",
            "/flag-emb",
        ])
        .unwrap();
        assert_eq!(r.embeddings_dir.as_deref(), Some(Path::new("/flag-emb")));
        assert!(r.worker.warm_up && !r.worker.safety_default);
        assert_eq!(r.worker.safety_policy, SafetyPolicy::Flag);
        assert_eq!(r.metrics_addr, Some("127.0.0.1:9191".parse().unwrap()));

        std::fs::write(&path, "model = \"/m\"\nsafety_policy = \"nuke\"\n").unwrap();
        let e = resolve_args(&["--config", config, "--bucket", "b"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("safety_policy"), "{e}");
        let e = resolve_args(&["--model", "/m", "--bucket", "b", "--min-clip-score", "0.2"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("CLIP model"), "{e}");
    }

    #[test]
    fn webhook_settings() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret\n").unwrap();
        let secret = secret.to_str().unwrap();
        let base = ["--model", "/m", "--bucket", "images"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend(extra);
            resolve_args(&a).map(|r| r.worker.webhook)
        };
        // Off by default.
        let off = with(&[]).unwrap();
        assert!(!off.is_enabled());
        assert_eq!(off, WebhookConfig::default());
        // On: flags parsed, the secret read and never shown.
        let on = with(&[
            "--webhook-allow",
            "hooks.example.com,*.example.net:8443",
            "--webhook-secret-file",
            secret,
            "--webhook-allow-private",
            "--webhook-timeout-secs",
            "5",
            "--webhook-give-up-secs",
            "60",
        ])
        .unwrap();
        assert!(on.is_enabled());
        assert_eq!(on.policy.allow.len(), 2);
        assert!(on.policy.allow_private && !on.policy.allow_http);
        assert_eq!(on.settings.timeout, Duration::from_secs(5));
        assert_eq!(on.settings.give_up, Duration::from_secs(60));
        assert_eq!(
            on.secret,
            Some(Secret::from_text("s3cret-s3cret-s3cret").unwrap())
        );
        assert!(!format!("{on:?}").contains("s3cret"));
        // The file's section, and flags over it.
        let toml = dir.path().join("w.toml");
        std::fs::write(
            &toml,
            format!(
                "[webhook]\nallow = [\"127.0.0.1\"]\nsecret_file = {secret:?}\nallow_http = true\n\
                 timeout_secs = 3\n"
            ),
        )
        .unwrap();
        let filed = with(&["--config", toml.to_str().unwrap()]).unwrap();
        assert!(filed.is_enabled() && filed.policy.allow_http);
        assert_eq!(filed.settings.timeout, Duration::from_secs(3));
        let flagged = with(&[
            "--config",
            toml.to_str().unwrap(),
            "--webhook-allow-http",
            "false",
            "--webhook-timeout-secs",
            "7",
        ])
        .unwrap();
        assert!(!flagged.policy.allow_http);
        assert_eq!(flagged.settings.timeout, Duration::from_secs(7));

        // The secret from the variable, not both, never echoed when too short.
        let args = || WebhookArgs {
            allow: Some(vec!["hooks.example.com".into()]),
            secret_file: None,
            allow_private: None,
            allow_http: None,
            timeout_secs: None,
            give_up_secs: None,
        };
        let section = WebhookSection::default();
        let env = Some("env-secret-0123456789".to_string());
        assert!(
            webhook_config(args(), &section, env.clone())
                .unwrap()
                .is_enabled()
        );
        let both = WebhookArgs {
            secret_file: Some(PathBuf::from(secret)),
            ..args()
        };
        let e = webhook_config(both, &section, env).unwrap_err().to_string();
        assert!(e.contains("give one"), "{e}");
        let e = webhook_config(args(), &section, Some("tiny".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 16") && !e.contains("tiny"), "{e}");

        for (extra, says) in [
            (&["--webhook-allow", "hooks.example.com"][..], "secret"),
            (
                &[
                    "--webhook-allow",
                    "https://x/",
                    "--webhook-secret-file",
                    secret,
                ][..],
                "--webhook-allow",
            ),
            (&["--webhook-timeout-secs", "0"][..], "1..=300"),
            (&["--webhook-give-up-secs", "86401"][..], "1..=86400"),
            (
                &[
                    "--webhook-allow",
                    "a.example",
                    "--webhook-secret-file",
                    "/nonexistent/s",
                ][..],
                "/nonexistent/s",
            ),
        ] {
            let e = with(extra).err().unwrap().to_string();
            assert!(e.contains(says), "{extra:?}: {e}");
        }
    }
}
