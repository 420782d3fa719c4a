//! `sdbatch worker`: flags/env/TOML → config, model loaded on the model thread, storage connected,
//! signals wired to a graceful shutdown.
use super::BrokerArgs;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use sdbatch::config::FileConfig;
use sdbatch::message::Limits;
use sdbatch::pipeline::clip_score::ClipScorer;
use sdbatch::pipeline::safety::SafetyChecker;
use sdbatch::pipeline::{LoadOptions, StableDiffusion};
use sdbatch::queue::Topology;
use sdbatch::storage::{Storage, StorageConfig};
use sdbatch::worker::gpu::GpuExecutor;
use sdbatch::worker::gpu::Models;
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
    /// Worker id in events, logs and the consumer tag (default: host name and pid).
    #[arg(long, env = "SDBATCH_WORKER_ID", hide_env_values = true)]
    pub worker_id: Option<String>,
    /// Model folder in the diffusers layout.
    #[arg(long, env = "SDBATCH_MODEL", hide_env_values = true)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, env = "SDBATCH_DEVICE", hide_env_values = true)]
    pub device: Option<String>,
    /// auto, fp32, fp16, bf16.
    #[arg(long, env = "SDBATCH_DTYPE", hide_env_values = true)]
    pub dtype: Option<String>,
    /// Weights variant (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
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
    /// Run the safety checker on batches that do not choose (`params.safety_checker`). The checker
    /// is loaded whenever the model folder has `safety_checker/`, so batches can ask for it.
    #[arg(long, env = "SDBATCH_SAFETY_CHECKER", hide_env_values = true)]
    pub safety_checker: bool,
    /// What happens to a flagged image: flag (store, mark), blank (store a black image), drop.
    #[arg(
        long,
        env = "SDBATCH_SAFETY_POLICY",
        hide_env_values = true,
        value_enum,
        default_value = "blank"
    )]
    pub safety_policy: SafetyPolicy,
    /// CLIP model folder (transformers layout) for a CLIP score per image.
    #[arg(long, env = "SDBATCH_CLIP_MODEL", hide_env_values = true)]
    pub clip_model: Option<PathBuf>,
    /// Mark images whose CLIP score is below this (they are kept).
    #[arg(
        long,
        env = "SDBATCH_MIN_CLIP_SCORE",
        hide_env_values = true,
        requires = "clip_model"
    )]
    pub min_clip_score: Option<f32>,
    /// Where /metrics, /healthz and /readyz are served ("off" to disable).
    #[arg(
        long,
        env = "SDBATCH_METRICS_ADDR",
        hide_env_values = true,
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: String,
    /// Key prefix for messages that name none.
    #[arg(long, env = "SDBATCH_PREFIX", hide_env_values = true)]
    pub prefix: Option<String>,
}

/// Longest grace period accepted: a day. Larger values once overflowed the deadline arithmetic.
const MAX_GRACE_PERIOD_SECS: u64 = 86_400;

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
    device: String,
    dtype: String,
    variant: Option<String>,
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
        .unwrap_or_else(|| "sdbatch".into());
    let mut topology = Topology::with_prefix(&prefix);
    topology.delivery_limit = args
        .broker
        .delivery_limit
        .or(file.delivery_limit)
        .unwrap_or(3);
    if topology.delivery_limit == 0 {
        bail!("--delivery-limit must be at least 1");
    }
    let device_is_cpu = args
        .device
        .as_deref()
        .or(file.device.as_deref())
        .unwrap_or("auto")
        == "cpu"
        || (args
            .device
            .as_deref()
            .or(file.device.as_deref())
            .unwrap_or("auto")
            == "auto"
            && !tch::Cuda::is_available());
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
        ..defaults
    };
    limits.check().map_err(|e| anyhow!("invalid limits: {e}"))?;
    if limits.default_bucket.is_none() && limits.allowed_buckets.is_empty() {
        bail!(
            "no bucket configured: pass --bucket (or S3_BUCKET, or storage.bucket in the config file)"
        );
    }

    let mut storage = StorageConfig::new(
        args.storage_url
            .or(s.url.clone())
            .unwrap_or_else(|| "s3://".into()),
    );
    storage.endpoint = args.s3_endpoint.or(s.endpoint.clone());
    storage.region = args.s3_region.or(s.region.clone());

    let grace_period_secs = args
        .grace_period_secs
        .or(file.grace_period_secs)
        .unwrap_or(600);
    if grace_period_secs > MAX_GRACE_PERIOD_SECS {
        bail!(
            "--grace-period-secs {grace_period_secs} is above {MAX_GRACE_PERIOD_SECS} (a day); \
             Kubernetes' terminationGracePeriodSeconds must exceed it anyway"
        );
    }
    let broker_timeout_secs = args
        .broker_timeout_secs
        .or(file.broker_timeout_secs)
        .unwrap_or(30);
    if !(1..=3600).contains(&broker_timeout_secs) {
        bail!("--broker-timeout-secs {broker_timeout_secs} must be in 1..=3600");
    }
    let consumer_timeout_secs = args
        .consumer_timeout_secs
        .or(file.consumer_timeout_secs)
        .unwrap_or(1800);
    if !(1..=7 * 86_400).contains(&consumer_timeout_secs) {
        bail!("--consumer-timeout-secs {consumer_timeout_secs} must be in 1..=604800");
    }
    let worker = WorkerConfig {
        amqp_url,
        topology,
        prefetch: args.prefetch.or(file.prefetch).unwrap_or(8).max(1),
        worker_id: args
            .worker_id
            .or(file.worker_id)
            .unwrap_or_else(default_worker_id),
        model_name: model.display().to_string(),
        limits,
        max_batch: args
            .max_batch
            .or(file.max_batch)
            .unwrap_or(if device_is_cpu { 4 } else { 64 })
            .max(1),
        memory_margin: args.memory_margin.or(file.memory_margin).unwrap_or(0.10),
        grace_period: Duration::from_secs(grace_period_secs),
        broker_timeout: Duration::from_secs(broker_timeout_secs),
        consumer_timeout: Duration::from_secs(consumer_timeout_secs),
        max_pending_images: args
            .max_pending_images
            .or(file.max_pending_images)
            .unwrap_or(256)
            .max(1),
        reconnect_min: Duration::from_millis(500),
        reconnect_max: Duration::from_secs(30),
        publish_attempts: 6,
        safety_default: args.safety_checker,
        safety_policy: args.safety_policy,
        min_clip_score: args.min_clip_score,
    };
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--metrics-addr {a}: expected HOST:PORT or off"))?,
        ),
    };
    Ok(Resolved {
        clip_model: args.clip_model,
        metrics_addr,
        worker,
        storage,
        model,
        device: args.device.or(file.device).unwrap_or_else(|| "auto".into()),
        dtype: args.dtype.or(file.dtype).unwrap_or_else(|| "auto".into()),
        variant: args.variant.or(file.variant),
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
    let r = resolve(args)?;
    let device = sdbatch::device::parse_device(&r.device)?;
    let dtype = sdbatch::device::parse_dtype(&r.dtype, device)?;
    tracing::info!(
        worker_id = %r.worker.worker_id,
        device = %sdbatch::device::device_name(device),
        dtype = sdbatch::device::dtype_name(dtype),
        broker = %sdbatch::queue::redact_url(&r.worker.amqp_url),
        "starting worker"
    );

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

    let model_dir = r.model.clone();
    let options = LoadOptions {
        variant: r.variant.clone(),
        ..LoadOptions::new(device, dtype)
    };
    let started = std::time::Instant::now();
    let clip_dir = r.clip_model.clone();
    let require_safety = r.worker.safety_default;
    let gpu = GpuExecutor::start(move || {
        let safety = SafetyChecker::load(&model_dir, &options)?;
        if require_safety && safety.is_none() {
            return Err(sdbatch::Error::MissingFile {
                path: model_dir.join("safety_checker"),
            });
        }
        // A CLIP folder has no weight variants: load it without the pipeline's `--variant`.
        let clip_options = LoadOptions::new(options.device, options.dtype);
        let clip = clip_dir
            .map(|d| ClipScorer::load(&d, &clip_options))
            .transpose()?;
        Ok(Models {
            sd: StableDiffusion::load(&model_dir, options)?,
            safety,
            clip,
        })
    })
    .await
    .with_context(|| format!("loading model {}", r.model.display()))?;
    tracing::info!(model = %r.model.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");

    metrics
        .model_load_seconds
        .set(started.elapsed().as_secs_f64());
    metrics
        .model_loaded
        .store(true, std::sync::atomic::Ordering::Relaxed);

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
    worker.run(rx).await?;
    tracing::info!("worker stopped");
    Ok(())
}
