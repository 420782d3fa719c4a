//! `sdbatch worker`: consumes batch messages, generates their images on the model thread, uploads
//! images (PNG, JPEG or WebP) and a manifest, publishes `batch.completed` with publisher confirms
//! and only then acks.
//!
//! The images of every message in hand (up to the prefetch count) go through one
//! [`Planner`](crate::batching::Planner): GPU batches are as large as the [`BatchSizer`] allows and
//! cross message boundaries, so small messages do not waste the GPU and large ones are split. Two
//! GPU batches are queued at a time and image encoding and uploads run on other tasks, so the model
//! thread never waits for S3. A message is acked when all its images are stored and its event is
//! confirmed.
//!
//! Failure handling:
//! - invalid message → copied to the dead-letter exchange with `x-sdbatch-error` /
//!   `x-sdbatch-reason` headers (bounded; none of the producer's headers), `batch.failed`
//!   published, original acked; a body over `max_message_bytes` is rejected unparsed and the
//!   broker dead-letters it (no copy of a huge body is published);
//! - permanent failure (storage refusal, a request the model cannot run) → what the batch stored
//!   is deleted, then dead-lettered at once like an invalid message;
//! - transient failure (storage, model) → retried in-process with backoff; still failing → nack
//!   with requeue, and the quorum queue's delivery limit dead-letters a batch that keeps failing;
//! - CUDA out of memory → the batch is halved and retried, the shape's batch ceiling lowered;
//! - redelivery of a batch whose manifest exists → no regeneration: the event is published again;
//! - every broker operation has a time limit; a failed or timed-out one ends the session as a lost
//!   connection → reconnect with backoff (`/readyz` 503 meanwhile); unacked messages are
//!   redelivered by the broker;
//! - SIGTERM/SIGINT → stop consuming, finish the messages in hand within the grace period, exit.
//!
//! Module map: this file holds the configuration, the errors and the reconnect loop;
//! [`ledger`] is the pure bookkeeping of the messages in hand (what to generate, store, ack,
//! dead-letter or requeue next), `session` the shell that feeds it from lapin and the store and
//! carries out its answers, `broker` the per-message broker operations (ack/nack/reject/publish,
//! all under the broker timeout), `store` the image encoding and upload and manifest, [`holding`] how much work
//! to hold under the consumer timeout, [`lanes`] which priority lane the next message comes from
//! (and `intake` the pulls and waiting consumers that carry it out), [`resume`] what an earlier delivery already stored, and
//! [`gpu`] the model thread. `transport` is what the session speaks to: RabbitMQ, or the
//! [`memory`] queue of a broker-less run ([`Worker::run_local`]).
mod broker;
pub mod calibration;
pub mod gpu;
pub mod holding;
mod inputs;
mod intake;
pub mod lanes;
pub mod ledger;
pub mod memory;
pub mod resume;
mod session;
mod store;
mod transport;

use crate::batching::{BatchSizer, MemoryKey, MemorySample, ShapeKey};
use crate::message::Limits;
use crate::metrics::Metrics;
use crate::pipeline::{GenerateParams, ImageRequest};
use crate::queue::{QueueError, Topology};
use crate::storage::{Storage, StorageError};
use gpu::{GpuError, GpuExecutor};
use holding::Holding;
use session::SessionEnd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Everything the worker needs besides the model and the store.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Unacked messages the broker may hand this worker at once (basic.qos); the planner batches
    /// across all of them. Messages are pulled one at a time up to this bound (see `intake`).
    pub prefetch: u16,
    /// High-lane messages taken in a row, while both lanes have work, before one of the normal
    /// lane ([`lanes`]).
    pub high_lane_ratio: u32,
    pub worker_id: String,
    /// Model name recorded in events and metadata.
    pub model_name: String,
    pub limits: Limits,
    /// Images per GPU batch at most (on the CPU: the batch size).
    pub max_batch: usize,
    /// Fraction of device memory the batch sizer keeps free.
    pub memory_margin: f64,
    /// How long the messages in hand may take to finish after SIGTERM.
    pub grace_period: Duration,
    /// The broker's consumer timeout (RabbitMQ's `consumer_timeout`, 30 min by default): a
    /// delivery unacked for longer closes the channel. The worker holds no more work than it can
    /// finish within [`CONSUMER_TIMEOUT_SAFETY`] of it, and asks brokers that support it
    /// (RabbitMQ ≥ 3.12) for exactly this timeout on its consumer.
    pub consumer_timeout: Duration,
    /// Images generated but not yet encoded and stored, at most: a slow store then slows the
    /// GPU instead of filling host memory.
    pub max_pending_images: usize,
    /// Minimum time between two `batch.progress` events of one batch.
    pub progress_interval: Duration,
    /// Time limit of one broker operation (publish with confirm, ack, nack, declare). One that
    /// runs out ends the session as a lost connection instead of hanging the worker.
    pub broker_timeout: Duration,
    /// Bounds of the reconnect backoff.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Attempts for publishing an event (each with a fresh confirm).
    pub publish_attempts: usize,
    /// Run the safety checker on batches that do not say (`params.safety_checker`).
    pub safety_default: bool,
    /// What happens to an image the safety checker flags.
    pub safety_policy: SafetyPolicy,
    /// CLIP scores below this mark an image (`low_clip_score`); it is kept.
    pub min_clip_score: Option<f32>,
    /// Run the calibration batches at start-up, before turning ready (CUDA only).
    pub warm_up: bool,
    /// Where measured calibrations are kept across restarts ([`calibration`]).
    pub calibration_file: Option<std::path::PathBuf>,
    /// The LoRA folder (`--lora-dir`): messages' `params.loras` name files in it.
    pub lora_dir: Option<std::path::PathBuf>,
    /// LoRA files kept in memory once read, in bytes.
    pub lora_cache_bytes: u64,
    /// Mark every image as AI-generated in its XMP (IPTC `DigitalSourceType`
    /// `trainedAlgorithmicMedia`, EU AI Act Art. 50(2)).
    pub ai_marking: bool,
    /// Which webhooks the worker sends, signed how, retried how long ([`crate::webhook`]).
    pub webhook: crate::webhook::WebhookConfig,
}

/// What happens to an image the safety checker flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SafetyPolicy {
    /// Store it as generated; mark it in its metadata and the event.
    Flag,
    /// Store a black image instead (as diffusers does).
    Blank,
    /// Store nothing; the event lists the image as dropped.
    Drop,
}

impl SafetyPolicy {
    pub fn name(self) -> &'static str {
        match self {
            SafetyPolicy::Flag => "flag",
            SafetyPolicy::Blank => "blank",
            SafetyPolicy::Drop => "drop",
        }
    }
}

/// The per-image results of the optional checks, carried into the record and the metadata.
#[derive(Debug, Clone, Default)]
pub struct ImageChecks {
    pub nsfw: Option<bool>,
    pub safety_action: Option<SafetyPolicy>,
    pub clip_score: Option<f32>,
    pub low_clip_score: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Pipeline(#[from] crate::Error),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A model-thread failure of a GPU batch that also held other messages' images: it is not
    /// known to be this message's fault, so it is retried like a transient one.
    #[error("{0} (in a GPU batch shared with other messages)")]
    SharedGpu(String),
    #[error("the messages in hand did not finish within the {0:?} grace period")]
    GraceExpired(Duration),
    /// `sdbatch cancel` stopped the batch: settled by an ack and `batch.cancelled`, not as a
    /// failure.
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

/// Fraction of the consumer timeout the work in hand may take (see [`holding`]).
pub const CONSUMER_TIMEOUT_SAFETY: f64 = crate::config::defaults::CONSUMER_TIMEOUT_SAFETY;

/// What the worker learns about its device while it runs, kept across broker connections: the
/// memory model of the batch sizer and the measured speed that bounds the work it holds.
struct Learned {
    sizer: BatchSizer,
    holding: Holding,
}

/// Reason codes of the worker's own failures (`x-sdbatch-error`, `batch.failed`, metrics); the
/// validation codes are [`crate::message::InvalidReason`]'s. docs/messages.md has the table.
pub mod reasons {
    /// Failed on every allowed delivery (transient failures that did not go away).
    pub const DELIVERY_LIMIT: &str = "delivery_limit";
    /// The store refused the batch's objects (HTTP 4xx other than throttling, invalid key).
    pub const STORAGE_REFUSED: &str = "storage_refused";
    /// The model cannot run the request (out of device memory at batch size 1, pipeline error).
    pub const GENERATION_FAILED: &str = "generation_failed";
}

impl WorkerError {
    /// The reason code when retrying cannot help, so the message is dead-lettered at once;
    /// `None` for transient failures (retried, then requeued under the delivery limit).
    pub fn permanent_reason(&self) -> Option<&'static str> {
        match self {
            WorkerError::Storage(e) if !e.is_transient() => Some(reasons::STORAGE_REFUSED),
            WorkerError::Gpu(e) if e.is_permanent() => Some(reasons::GENERATION_FAILED),
            _ => None,
        }
    }
}

pub struct Worker {
    cfg: Arc<WorkerConfig>,
    gpu: Arc<GpuExecutor>,
    storage: Arc<Storage>,
    metrics: Arc<Metrics>,
    /// Kept across broker connections: deliveries outlive the session that started them.
    webhooks: crate::webhook::WebhookSender,
}

/// Carries the store's retry count into the retries metric (the count only grows).
fn sync_storage_retries(storage: &Storage, seen: &AtomicU64, metrics: &Metrics) {
    let now = storage.retries();
    let before = seen.swap(now, Ordering::Relaxed);
    if now > before {
        metrics
            .retries
            .with_label_values(&["storage"])
            .inc_by(now - before);
    }
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        gpu: Arc<GpuExecutor>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Carried over when /metrics is rendered (its only reader), so a scrape also sees the
        // retries of an operation still retrying while the loop waits on it.
        let seen = AtomicU64::new(0);
        let s = storage.clone();
        metrics.on_render(move |m| sync_storage_retries(&s, &seen, m));
        let webhooks = crate::webhook::WebhookSender::new(&cfg.webhook, metrics.clone());
        Self {
            cfg: Arc::new(cfg),
            gpu,
            storage,
            metrics,
            webhooks,
        }
    }

    /// Waits at most `limit` for the webhook deliveries in progress (at shutdown: a delivery
    /// of the last batch's event gets a moment, a receiver that is down does not hold the exit).
    pub async fn finish_webhooks(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.webhooks.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.metrics.webhook_pending.get(),
                "exiting with webhook deliveries pending: they are lost"
            );
        }
    }

    /// Where `batch`'s events go besides the events exchange (its `output.webhook`).
    fn webhook(&self, batch: &crate::message::Batch) -> crate::webhook::Target {
        crate::webhook::Target::for_batch(&self.webhooks, batch)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Start-up calibration of the batch sizer for the default shape (see [`calibration`]):
    /// stored samples, or warm-up batches of one step at the native size. A failed warm-up batch
    /// only costs the head start; a model thread that is gone is fatal.
    async fn warm_up(&self, sizer: &mut BatchSizer) -> Result<(), WorkerError> {
        let info = self.gpu.info();
        let params = GenerateParams {
            steps: 1,
            guidance_scale: crate::message::DEFAULT_GUIDANCE_SCALE,
            width: info.native_size,
            height: info.native_size,
            scheduler: crate::message::DEFAULT_SCHEDULER,
            clip_skip: 1,
            guidance_rescale: 0.0,
            prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax::Plain,
            loras: Vec::new(),
        };
        let key = MemoryKey::of(&ShapeKey::of(&params));
        let identity = info.total_memory.map(|total_bytes| calibration::Identity {
            gpu: info
                .gpu_name
                .clone()
                .unwrap_or_else(|| "unknown CUDA device".into()),
            total_bytes,
            model: self.cfg.model_name.clone(),
            dtype: info.dtype.to_string(),
            key,
        });
        // Only CUDA reads or writes the file: on the CPU there is nothing to calibrate.
        let path = self.cfg.calibration_file.as_deref();
        let stored = path.filter(|_| identity.is_some()).map(|p| {
            let (file, problem) = calibration::CalibrationFile::load(p);
            if let Some(why) = problem {
                tracing::warn!(file = %p.display(), why, "ignoring the calibration file");
            }
            file
        });
        match calibration::plan(identity.as_ref(), self.cfg.warm_up, stored.as_ref()) {
            calibration::Plan::Nothing => {}
            calibration::Plan::Stored(samples) => {
                tracing::info!(?samples, "calibration taken from the calibration file");
                for sample in samples {
                    sizer.record_memory(key, sample);
                }
            }
            calibration::Plan::Run(sizes) => {
                let started = Instant::now();
                for n in sizes {
                    let requests = (0..n as u64)
                        .map(|seed| ImageRequest {
                            prompt: String::new(),
                            negative_prompt: None,
                            seed,
                        })
                        .collect();
                    self.metrics.warm_up_batches.inc();
                    match self.gpu.generate(requests, params.clone(), false).await {
                        Ok(out) => {
                            for (batch, peak_used_bytes) in out.memory {
                                sizer.record_memory(
                                    key,
                                    MemorySample {
                                        batch,
                                        peak_used_bytes,
                                    },
                                );
                            }
                        }
                        Err(GpuError::ThreadGone) => return Err(GpuError::ThreadGone.into()),
                        Err(e) => {
                            tracing::warn!(batch = n, error = %e, "warm-up batch failed");
                            return Ok(());
                        }
                    }
                }
                let samples = sizer.samples(&key).to_vec();
                tracing::info!(
                    ?samples,
                    seconds = started.elapsed().as_secs_f64(),
                    "warmed up"
                );
                if let (Some(path), Some(mut file), Some(identity)) = (path, stored, identity) {
                    file.upsert(identity, samples);
                    if let Err(e) = file.save(path) {
                        tracing::warn!(file = %path.display(), error = %e,
                            "could not save the calibration file");
                    }
                }
            }
        }
        Ok(())
    }

    /// Warms up (calibrates) and turns ready: what every run does before its first message.
    async fn start(&self) -> Result<Learned, WorkerError> {
        let mut learned = Learned {
            sizer: BatchSizer::new(self.cfg.max_batch, self.cfg.memory_margin),
            holding: Holding::new(
                self.cfg.consumer_timeout,
                CONSUMER_TIMEOUT_SAFETY,
                self.cfg.prefetch,
            ),
        };
        self.warm_up(&mut learned.sizer).await?;
        // Ready means loaded and calibrated: the first batches are sized from measured memory.
        self.metrics.mark_ready();
        Ok(learned)
    }

    /// Works through the messages of an in-memory queue without a broker (`sdbatch worker
    /// --messages`): the same session as on RabbitMQ, until every message is settled or
    /// `shutdown` turns true (then the messages in hand are finished and the rest stay
    /// unsettled in the queue's report).
    pub async fn run_local(
        &self,
        queue: memory::MemoryBroker,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        let mut learned = self.start().await?;
        if *shutdown.borrow() {
            return Ok(());
        }
        tracing::info!(
            max_prefetch = self.cfg.prefetch,
            max_batch = self.cfg.max_batch,
            "working through the messages in memory (no broker)"
        );
        let link = transport::Link::Memory(queue.clone());
        let sink = transport::EventSink::Memory(queue);
        let end = self
            .work(
                link,
                sink,
                transport::Control::None,
                &mut shutdown,
                &mut learned,
            )
            .await;
        self.metrics.inflight_batches.set(0);
        match end? {
            SessionEnd::Shutdown => Ok(()),
            // The in-memory queue has no connection to lose: only a double settlement (a bug)
            // can get here.
            SessionEnd::ConnectionLost(why) => Err(WorkerError::Other(format!(
                "the in-memory queue failed: {why}"
            ))),
        }
    }

    /// Runs until `shutdown` turns true (then finishes the messages in hand) or a fatal error.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut delay = self.cfg.reconnect_min;
        let mut learned = self.start().await?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let started = Instant::now();
            let outcome = self.session(&mut shutdown, &mut learned).await;
            self.metrics
                .broker_connected
                .store(false, Ordering::Relaxed);
            self.metrics.inflight_batches.set(0);
            match outcome {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(
                    e @ (WorkerError::GraceExpired(_) | WorkerError::Gpu(GpuError::ThreadGone)),
                ) => {
                    return Err(e);
                }
                Ok(SessionEnd::ConnectionLost(why)) => {
                    tracing::warn!(reason = %why, "broker connection lost; reconnecting")
                }
                Err(e) => tracing::warn!(error = %e, "broker session failed; reconnecting"),
            }
            // A session that ran for a while was healthy: start the backoff over.
            if started.elapsed() > self.cfg.reconnect_max * 2 {
                delay = self.cfg.reconnect_min;
            }
            let jitter = Duration::from_millis(u64::from(std::process::id() % 7) * 37);
            tokio::select! {
                _ = tokio::time::sleep(delay + jitter) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            delay = (delay * 2).min(self.cfg.reconnect_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message;
    use crate::storage::StorageError;

    #[test]
    fn every_reason_code_is_documented() {
        let doc = include_str!("../../docs/messages.md");
        let worker_codes = [
            reasons::DELIVERY_LIMIT,
            reasons::STORAGE_REFUSED,
            reasons::GENERATION_FAILED,
        ];
        let validation = message::InvalidReason::ALL.map(|r| r.as_str());
        for code in validation.iter().chain(&worker_codes) {
            assert!(
                doc.contains(&format!("| `{code}` |")),
                "docs/messages.md has no row for {code}"
            );
        }
    }

    #[test]
    fn permanent_and_transient_failures() {
        let refused = WorkerError::Storage(StorageError::permanent("put", "b/k", "HTTP 403"));
        assert_eq!(refused.permanent_reason(), Some(reasons::STORAGE_REFUSED));
        let down = WorkerError::Storage(StorageError::transient("put", "b/k", "connect refused"));
        assert_eq!(down.permanent_reason(), None);
        let oom = WorkerError::Gpu(GpuError::OutOfMemory("CUDA out of memory".into()));
        assert_eq!(oom.permanent_reason(), Some(reasons::GENERATION_FAILED));
        let bad = WorkerError::Gpu(GpuError::Pipeline(crate::Error::Tokenizer("x".into())));
        assert_eq!(bad.permanent_reason(), Some(reasons::GENERATION_FAILED));
        for transient in [
            WorkerError::Gpu(GpuError::Panicked("boom".into())),
            WorkerError::SharedGpu("out of device memory".into()),
            WorkerError::Other("PNG encoder task failed".into()),
            WorkerError::Queue(QueueError::Timeout {
                op: "basic.ack",
                limit: Duration::from_secs(1),
            }),
        ] {
            assert_eq!(transient.permanent_reason(), None, "{transient}");
        }
    }
}
