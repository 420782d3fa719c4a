//! `sdbatch worker`: consumes batch messages, generates their images on the model thread, uploads
//! PNGs and a manifest, publishes `batch.completed` with publisher confirms and only then acks.
//!
//! The images of every message in hand (up to the prefetch count) go through one
//! [`Planner`](crate::batching::Planner): GPU batches are as large as the [`BatchSizer`] allows and
//! cross message boundaries, so small messages do not waste the GPU and large ones are split. Two
//! GPU batches are queued at a time and PNG encoding and uploads run on other tasks, so the model
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
pub mod gpu;
pub mod holding;
pub mod resume;

use crate::batching::{BatchSizer, MemorySample, PlannedBatch, Planner, ShapeKey};
use crate::events::{self, BatchCompleted, BatchFailed, ImageRecord};
use crate::message::{self, Batch, Invalid, Limits};
use crate::metrics::Metrics;
use crate::output::encode_png;
use crate::pipeline::ImageRequest;
use crate::queue::{self, Publisher, QueueError, QueueResult, Topology, header_int, header_value};
use crate::storage::{Storage, StorageError};
use backon::{ExponentialBuilder, Retryable};
use futures_lite::StreamExt;
use gpu::{GpuError, GpuExecutor, GpuOutput};
use holding::Holding;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Everything the worker needs besides the model and the store.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Unacked messages the broker may hand this worker at once (basic.qos); the planner batches
    /// across all of them.
    pub prefetch: u16,
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
    #[error("{0}")]
    Other(String),
}

/// Fraction of the consumer timeout the work in hand may take (see [`holding`]).
pub const CONSUMER_TIMEOUT_SAFETY: f64 = 0.8;

/// What the worker learns about its device while it runs, kept across broker connections: the
/// memory model of the batch sizer and the measured speed that bounds the work it holds.
struct Learned {
    sizer: BatchSizer,
    holding: Holding,
}

/// Reason codes of the worker's own failures (`x-sdbatch-error`, `batch.failed`, metrics); the
/// validation codes are [`message::InvalidReason`]'s. docs/messages.md has the table.
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

/// How a connection's session ended.
enum SessionEnd {
    Shutdown,
    ConnectionLost(String),
}

impl From<QueueError> for SessionEnd {
    fn from(e: QueueError) -> Self {
        SessionEnd::ConnectionLost(e.to_string())
    }
}

/// Where one image's result goes: (message sequence number, image index in the message).
type Tag = (u64, usize);

/// A valid message in hand.
struct InFlight {
    acker: Acker,
    /// The body as delivered, for dead-lettering it if it fails permanently.
    body: Vec<u8>,
    redelivered: bool,
    /// Run the safety checker on this message's images.
    safety: bool,
    previous_failures: i64,
    batch: Arc<Batch>,
    work: Arc<str>,
    requests: Vec<(usize, u32, ImageRequest)>,
    records: Vec<Option<ImageRecord>>,
    /// Images an earlier delivery had stored (taken over, not generated).
    resumed: usize,
    remaining: usize,
    /// Upload tasks started and not yet reported back.
    uploads_pending: usize,
    /// The consumer (generation) that delivered it.
    consumer_gen: u64,
    /// Images not yet back from the GPU (planned or generating): the work still to do.
    ungenerated: usize,
    /// Work of one image of this message ([`message::work_units`]).
    units_per_image: f64,
    /// Set once the message failed: no new uploads start, and it is settled (requeued or
    /// dead-lettered) when the pending ones have reported, so nothing lands after the verdict.
    failure: Option<WorkerError>,
    started: Instant,
    generate_ms: f64,
    encode_ms: f64,
    upload_ms: f64,
    span: tracing::Span,
}

/// A message whose work is over, on its way to be acked, requeued or dead-lettered.
struct Settling {
    acker: Acker,
    body: Vec<u8>,
    previous_failures: i64,
    batch: Arc<Batch>,
    /// Keys this delivery stored, deleted if the message is dead-lettered.
    stored: Vec<String>,
}

impl Settling {
    /// A delivery settled before any of its work started.
    fn unstarted(delivery: Delivery, previous_failures: i64, batch: Batch) -> Self {
        Self {
            acker: delivery.acker,
            body: delivery.data,
            previous_failures,
            batch: Arc::new(batch),
            stored: Vec::new(),
        }
    }
}

/// What the tasks of a session report back to its loop.
enum Done {
    Gpu {
        key: ShapeKey,
        tags: Vec<Tag>,
        size: usize,
        result: Result<GpuOutput, GpuError>,
    },
    Upload {
        tag: Tag,
        result: Result<(ImageRecord, f64, f64), WorkerError>,
    },
    Finished {
        seq: u64,
        result: Result<(), WorkerError>,
    },
}

pub struct Worker {
    cfg: Arc<WorkerConfig>,
    gpu: Arc<GpuExecutor>,
    storage: Arc<Storage>,
    metrics: Arc<Metrics>,
    /// Storage retries already added to the retries metric.
    storage_retries_seen: AtomicU64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Publishes an event with confirms. A publish the broker refused (nack, unroutable) is retried
/// with backoff; a broken or silent connection is not (the same channel cannot recover): that
/// error goes up and ends the session.
async fn publish_event<T: serde::Serialize>(
    cfg: &WorkerConfig,
    metrics: &Metrics,
    publisher: &Publisher,
    key: &str,
    event: &T,
) -> Result<(), WorkerError> {
    let body = serde_json::to_vec(event).map_err(|e| WorkerError::Other(e.to_string()))?;
    let exchange = cfg.topology.events_exchange.clone();
    (|| async {
        publisher
            .publish_json(&exchange, key, &body, None, false)
            .await
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(cfg.publish_attempts.saturating_sub(1))
            .with_jitter(),
    )
    .when(|e| matches!(e, QueueError::NotConfirmed { .. }))
    .notify(|e, d| {
        metrics.retries.with_label_values(&["publish"]).inc();
        tracing::warn!(error = %e, retry_in = ?d, "publishing {key} failed; retrying")
    })
    .await?;
    Ok(())
}

/// Publishes `batch.failed` ([`BatchFailed::new`] bounds the error text).
async fn publish_failed(
    cfg: &WorkerConfig,
    metrics: &Metrics,
    publisher: &Publisher,
    batch_id: Option<String>,
    reason: &str,
    error: &str,
) -> Result<(), WorkerError> {
    let event = BatchFailed::new(batch_id, reason, error, &cfg.worker_id);
    publish_event(cfg, metrics, publisher, events::BATCH_FAILED, &event).await
}

/// The broker's view of one message: ack, nack or reject, each within the broker timeout.
async fn ack(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    queue::within(
        cfg.broker_timeout,
        "basic.ack",
        acker.ack(BasicAckOptions::default()),
    )
    .await
    .and_then(|sent| delivered(sent, "basic.ack"))
}

/// lapin answers `Ok(false)` for an ack/nack/reject it could not send (its channel is closed,
/// e.g. by the broker's consumer timeout): that is a lost connection, not a success.
fn delivered(sent: bool, op: &'static str) -> QueueResult<()> {
    if sent {
        Ok(())
    } else {
        Err(QueueError::ChannelClosed { op })
    }
}

async fn requeue(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    let options = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    queue::within(cfg.broker_timeout, "basic.nack", acker.nack(options))
        .await
        .and_then(|sent| delivered(sent, "basic.nack"))
}

/// Rejects without requeueing: the queue's dead-letter exchange takes the message as it is.
async fn reject(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    let options = BasicRejectOptions { requeue: false };
    queue::within(cfg.broker_timeout, "basic.reject", acker.reject(options))
        .await
        .and_then(|sent| delivered(sent, "basic.reject"))
}

/// The failures a message has had before this delivery. `x-delivery-count` is the quorum queue's
/// count on a redelivery; on a first delivery it can only be the producer's, so it is ignored
/// (a producer-set i64::MAX once overflowed the arithmetic). Clamped to the delivery limit.
fn previous_failures(redelivered: bool, header: Option<i64>, delivery_limit: u32) -> i64 {
    if !redelivered {
        return 0;
    }
    header.unwrap_or(0).clamp(0, i64::from(delivery_limit))
}

/// Whether this delivery is the last one the queue allows.
fn is_last_attempt(previous_failures: i64, delivery_limit: u32) -> bool {
    previous_failures.saturating_add(1) > i64::from(delivery_limit)
}

/// Encodes one image and uploads it with its metadata. Returns the record, encode and upload ms.
/// One generated image on its way to storage.
struct ImageJob {
    batch: Arc<Batch>,
    /// The batch's [`Batch::work_sha256`], recorded on the object for resuming.
    work: Arc<str>,
    item_index: usize,
    n: u32,
    request: ImageRequest,
    image: crate::pipeline::RgbImage,
    checks: ImageChecks,
}

async fn store_image(
    cfg: Arc<WorkerConfig>,
    storage: Arc<Storage>,
    job: ImageJob,
) -> Result<(ImageRecord, f64, f64), WorkerError> {
    let ImageJob {
        batch,
        work,
        item_index,
        n,
        request,
        image,
        checks,
    } = job;
    let item = &batch.items[item_index];
    let mut record = ImageRecord {
        nsfw: checks.nsfw,
        safety_action: checks.safety_action.map(|p| p.name().to_string()),
        clip_score: checks.clip_score,
        low_clip_score: checks.low_clip_score,
        ..ImageRecord::planned(&batch, item_index, n)
    };
    if checks.safety_action == Some(SafetyPolicy::Drop) {
        // Nothing is stored; the event lists the image as dropped.
        return Ok((record, 0.0, 0.0));
    }
    let image = if checks.safety_action == Some(SafetyPolicy::Blank) {
        crate::pipeline::safety::blank(&image)
    } else {
        image
    };
    let t0 = Instant::now();
    // PNG encoding is CPU work: off the async runtime.
    let png = tokio::task::spawn_blocking(move || encode_png(&image))
        .await
        .map_err(|e| WorkerError::Other(format!("PNG encoder task failed: {e}")))??;
    let encode_ms = ms(t0.elapsed());
    record.bytes = png.len() as u64;
    record.sha256 = sha256_hex(&png);
    let mut metadata = vec![
        ("sdbatch-batch-id".to_string(), batch.batch_id.clone()),
        ("sdbatch-item-id".to_string(), item.id.clone()),
        (resume::META_SEED.to_string(), request.seed.to_string()),
        (resume::META_WORK.to_string(), work.to_string()),
        (resume::META_SHA256.to_string(), record.sha256.clone()),
        (resume::META_BYTES.to_string(), record.bytes.to_string()),
        ("sdbatch-steps".to_string(), batch.params.steps.to_string()),
        (
            "sdbatch-guidance".to_string(),
            batch.params.guidance_scale.to_string(),
        ),
        (
            "sdbatch-scheduler".to_string(),
            batch.params.scheduler.name().to_string(),
        ),
        (resume::META_MODEL.to_string(), cfg.model_name.clone()),
        (
            "sdbatch-prompt-sha256".to_string(),
            sha256_hex(request.prompt.as_bytes()),
        ),
    ];
    if let Some(nsfw) = checks.nsfw {
        metadata.push((resume::META_NSFW.to_string(), nsfw.to_string()));
    }
    if let Some(action) = &record.safety_action {
        metadata.push((resume::META_SAFETY_ACTION.to_string(), action.clone()));
    }
    if let Some(score) = checks.clip_score {
        metadata.push((resume::META_CLIP_SCORE.to_string(), score.to_string()));
    }
    let t1 = Instant::now();
    storage
        .put(&batch.bucket, &record.key, png, "image/png", &metadata)
        .await?;
    Ok((record, encode_ms, ms(t1.elapsed())))
}

/// Writes the manifest (last: its presence means every image is stored) and publishes the event.
async fn finish_batch(
    cfg: Arc<WorkerConfig>,
    metrics: Arc<Metrics>,
    storage: Arc<Storage>,
    publisher: Publisher,
    event: BatchCompleted,
    batch: Arc<Batch>,
) -> Result<(), WorkerError> {
    let manifest =
        serde_json::to_vec_pretty(&event).map_err(|e| WorkerError::Other(e.to_string()))?;
    storage
        .put(
            &batch.bucket,
            &batch.manifest_key(),
            manifest,
            "application/json",
            &[],
        )
        .await?;
    publish_event(&cfg, &metrics, &publisher, events::BATCH_COMPLETED, &event).await
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        gpu: Arc<GpuExecutor>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cfg: Arc::new(cfg),
            gpu,
            storage,
            metrics,
            storage_retries_seen: AtomicU64::new(0),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Carries the store's retry count into the retries metric.
    fn sync_storage_retries(&self) {
        let now = self.storage.retries();
        let seen = self.storage_retries_seen.swap(now, Ordering::Relaxed);
        if now > seen {
            self.metrics
                .retries
                .with_label_values(&["storage"])
                .inc_by(now - seen);
        }
    }

    /// Runs until `shutdown` turns true (then finishes the messages in hand) or a fatal error.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut delay = self.cfg.reconnect_min;
        let mut learned = Learned {
            sizer: BatchSizer::new(self.cfg.max_batch, self.cfg.memory_margin),
            holding: Holding::new(
                self.cfg.consumer_timeout,
                CONSUMER_TIMEOUT_SAFETY,
                self.cfg.prefetch,
            ),
        };
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

    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        learned: &mut Learned,
    ) -> Result<SessionEnd, WorkerError> {
        let cfg = &self.cfg;
        let limit = cfg.broker_timeout;
        let conn =
            queue::connect(&cfg.amqp_url, &format!("sdbatch-worker {}", cfg.worker_id)).await?;
        let channel = queue::within(limit, "channel.open", conn.create_channel()).await?;
        queue::within(limit, "declare", async {
            queue::declare(&channel, &cfg.topology).await
        })
        .await?;
        let publisher = Publisher::with_timeout(&conn, limit).await?;
        tracing::info!(
            broker = %queue::redact_url(&cfg.amqp_url),
            queue = %cfg.topology.jobs_queue,
            max_prefetch = cfg.prefetch,
            max_batch = cfg.max_batch,
            "consuming"
        );
        self.metrics.broker_connected.store(true, Ordering::Relaxed);

        let mut session = Session {
            worker: self,
            channel: channel.clone(),
            consumer_prefetch: 0,
            consumer_gen: 0,
            gpu_images: 0,
            pending_images: 0,
            publisher,
            planner: Planner::default(),
            inflight: HashMap::new(),
            next_seq: 0,
            gpu_jobs: 0,
            tasks: JoinSet::new(),
            done_tx: None,
        };
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        session.done_tx = Some(done_tx);
        // Subscribed (and re-subscribed with another prefetch) by `adjust_consumer`.
        let mut consumer: Option<lapin::Consumer> = None;
        let mut draining = false;
        let mut deadline: Option<tokio::time::Instant> = None;

        loop {
            session.dispatch(&learned.sizer);
            if !draining {
                match session
                    .adjust_consumer(&mut consumer, &mut learned.holding)
                    .await
                {
                    Ok(()) => {}
                    Err(WorkerError::Queue(e)) => return Ok(e.into()),
                    Err(e) => return Err(e),
                }
            }
            self.sync_storage_retries();
            self.metrics
                .inflight_batches
                .set(session.inflight.len() as i64);
            if draining && session.is_idle() {
                let _ = tokio::time::timeout(limit, conn.close(200, "worker shutting down".into()))
                    .await;
                return Ok(SessionEnd::Shutdown);
            }
            // Every branch below is bounded in time (broker operations by `broker_timeout`), so
            // a signal is always seen; a broker error ends the session as a lost connection.
            let step: Result<(), WorkerError> = tokio::select! {
                changed = shutdown.changed(), if !draining => {
                    if changed.is_err() || *shutdown.borrow() {
                        draining = true;
                        // A grace period too large to add to "now" means "no deadline".
                        deadline = tokio::time::Instant::now().checked_add(cfg.grace_period);
                        tracing::info!(in_hand = session.inflight.len(), grace = ?cfg.grace_period,
                            "shutdown requested: finishing the messages in hand");
                        // Deliveries still on their way stay unacked and go back to the queue
                        // when the connection closes.
                        if consumer.take().is_some() {
                            let cancel = channel.basic_cancel(session.consumer_tag().as_str().into(), BasicCancelOptions::default());
                            let _ = tokio::time::timeout(limit, cancel).await;
                        }
                    }
                    Ok(())
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    return Err(WorkerError::GraceExpired(cfg.grace_period));
                }
                next = async { consumer.as_mut().expect("guarded by is_some").next().await }, if !draining && consumer.is_some() => match next {
                    Some(Ok(delivery)) => session.accept(delivery, &mut learned.holding).await,
                    Some(Err(e)) => return Ok(SessionEnd::ConnectionLost(e.to_string())),
                    None => return Ok(SessionEnd::ConnectionLost("consumer stream ended".into())),
                },
                Some(done) = done_rx.recv() => session.on_done(done, learned).await,
            };
            match step {
                Ok(()) => {}
                Err(WorkerError::Queue(e)) => return Ok(e.into()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The state of one broker connection: the messages in hand and the work in progress for them.
struct Session<'w> {
    worker: &'w Worker,
    /// The consuming channel.
    channel: lapin::Channel,
    /// The current consumer's prefetch (RabbitMQ applies a prefetch per consumer, fixed when it
    /// subscribes: changing it means subscribing anew).
    consumer_prefetch: u16,
    /// Numbers the consumers of this session; a message remembers which one delivered it.
    consumer_gen: u64,
    /// Images in GPU batches queued or running.
    gpu_images: usize,
    /// Images generated and not yet stored (all messages).
    pending_images: usize,
    publisher: Publisher,
    planner: Planner<Tag>,
    inflight: HashMap<u64, InFlight>,
    next_seq: u64,
    gpu_jobs: usize,
    tasks: JoinSet<()>,
    done_tx: Option<mpsc::UnboundedSender<Done>>,
}

/// GPU batches queued on the model thread at once: one running, one ready, so it never waits.
const GPU_QUEUE_DEPTH: usize = 2;

impl Session<'_> {
    fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.gpu_jobs == 0
    }

    fn sender(&self) -> mpsc::UnboundedSender<Done> {
        self.done_tx.clone().expect("session channel set")
    }

    /// Handles a new delivery: invalid → dead letter; already done → republish; else plan it.
    /// Errors are broker errors (the session ends); a message's own failures are settled here.
    async fn accept(
        &mut self,
        delivery: Delivery,
        holding: &mut Holding,
    ) -> Result<(), WorkerError> {
        let cfg = self.worker.cfg.clone();
        let span = tracing::info_span!(
            "batch",
            batch_id = tracing::field::Empty,
            tag = delivery.delivery_tag
        );
        let batch = match message::parse(
            &delivery.data,
            &cfg.limits,
            self.worker.gpu.info().native_size,
        ) {
            Ok(b) => b,
            Err(invalid) => {
                if let Some(id) = &invalid.batch_id {
                    span.record("batch_id", id.as_str());
                }
                return self
                    .reject_invalid(delivery, invalid)
                    .instrument(span)
                    .await;
            }
        };
        span.record("batch_id", batch.batch_id.as_str());
        let previous_failures = previous_failures(
            delivery.redelivered,
            header_int(&delivery.properties, "x-delivery-count"),
            cfg.topology.delivery_limit,
        );

        // Hashed once per delivery: the manifest, the stored images and the event compare or
        // record it.
        let work: Arc<str> = batch.work_sha256().into();
        // Already done (a previous delivery crashed or lost its connection after uploading):
        // announce it again instead of regenerating.
        let manifest = self
            .worker
            .storage
            .get(&batch.bucket, &batch.manifest_key())
            .instrument(span.clone())
            .await;
        match manifest {
            Ok(Some(bytes)) => {
                let stored = serde_json::from_slice::<BatchCompleted>(&bytes).map_err(|e| {
                    WorkerError::Other(format!(
                        "{}: unreadable manifest: {e}",
                        batch.manifest_key()
                    ))
                });
                let stored_work = stored.as_ref().ok().and_then(|e| e.work_sha256.as_deref());
                if stored_work.is_some_and(|w| w != &*work) {
                    let invalid = Invalid {
                        reason: message::InvalidReason::BatchIdConflict,
                        message: format!(
                            "batch {} already completed with other work (its manifest {} records \
                             another work hash): give new work a new batch_id",
                            batch.batch_id,
                            batch.manifest_key()
                        ),
                        batch_id: Some(batch.batch_id.clone()),
                    };
                    return self
                        .reject_invalid(delivery, invalid)
                        .instrument(span)
                        .await;
                }
                let republished = async {
                    let mut event = stored?;
                    event.redelivered = true;
                    tracing::info!(
                        "manifest exists: republishing batch.completed without regenerating"
                    );
                    publish_event(
                        &cfg,
                        &self.worker.metrics,
                        &self.publisher,
                        events::BATCH_COMPLETED,
                        &event,
                    )
                    .await
                }
                .instrument(span.clone())
                .await;
                if republished.is_ok() {
                    self.worker
                        .metrics
                        .batches
                        .with_label_values(&["republished"])
                        .inc();
                }
                let failed = Settling::unstarted(delivery, previous_failures, batch);
                return self.settle(failed, republished).instrument(span).await;
            }
            Ok(None) => {}
            Err(e) => {
                let failed = Settling::unstarted(delivery, previous_failures, batch);
                return self.settle(failed, Err(e.into())).instrument(span).await;
            }
        }

        let safety = batch.safety_checker.unwrap_or(cfg.safety_default);
        if safety && !self.worker.gpu.info().has_safety_checker {
            let invalid = Invalid {
                reason: message::InvalidReason::SafetyChecker,
                message: "the batch asks for the safety checker, but this worker's model has no \
                          safety_checker/ folder"
                    .into(),
                batch_id: Some(batch.batch_id.clone()),
            };
            return self
                .reject_invalid(delivery, invalid)
                .instrument(span)
                .await;
        }
        // What an earlier delivery of the same work already stored is taken over; objects of
        // other work under this batch id are a conflict.
        let requests = batch.image_requests();
        let records = match self
            .stored_images(&batch, &work, &requests)
            .instrument(span.clone())
            .await
        {
            Ok(resume::Verdict::Resume(records)) => records,
            Ok(resume::Verdict::Conflict(key)) => {
                let invalid = Invalid {
                    reason: message::InvalidReason::BatchIdConflict,
                    message: format!(
                        "{key} under batch {} was made from other work: give new work a new \
                         batch_id",
                        batch.batch_id
                    ),
                    batch_id: Some(batch.batch_id.clone()),
                };
                return self
                    .reject_invalid(delivery, invalid)
                    .instrument(span)
                    .await;
            }
            Err(e) => {
                let failed = Settling::unstarted(delivery, previous_failures, batch);
                return self.settle(failed, Err(e.into())).instrument(span).await;
            }
        };
        let resumed = records.iter().flatten().count();
        let remaining = requests.len() - resumed;
        let units_per_image = message::work_units(
            1,
            batch.params.steps,
            batch.params.width,
            batch.params.height,
        );
        holding.observe_message(units_per_image * remaining as f64);
        let seq = self.next_seq;
        self.next_seq += 1;
        {
            let _enter = span.enter();
            tracing::info!(
                images = requests.len(),
                resumed,
                redelivered = delivery.redelivered,
                "planned"
            );
        }
        self.worker
            .metrics
            .images
            .with_label_values(&["resumed"])
            .inc_by(resumed as u64);
        self.planner.push(
            &batch.params,
            requests
                .iter()
                .enumerate()
                .filter(|(i, _)| records[*i].is_none())
                .map(|(i, (_, _, r))| ((seq, i), r.clone())),
        );
        self.inflight.insert(
            seq,
            InFlight {
                acker: delivery.acker,
                body: delivery.data,
                redelivered: delivery.redelivered,
                safety,
                previous_failures,
                records,
                resumed,
                remaining,
                uploads_pending: 0,
                consumer_gen: self.consumer_gen,
                ungenerated: remaining,
                units_per_image,
                failure: None,
                requests,
                work,
                batch: Arc::new(batch),
                started: Instant::now(),
                generate_ms: 0.0,
                encode_ms: 0.0,
                upload_ms: 0.0,
                span,
            },
        );
        if remaining == 0 {
            // Every image was stored by an earlier delivery; only the manifest is missing.
            self.complete(seq);
        }
        Ok(())
    }

    /// Which of `requests` an earlier delivery stored under the batch's folder (one listing, a
    /// HEAD per stored image), or the key that shows other work under this batch id.
    async fn stored_images(
        &self,
        batch: &Batch,
        work: &str,
        requests: &[(usize, u32, ImageRequest)],
    ) -> Result<resume::Verdict, StorageError> {
        let storage = &self.worker.storage;
        let cfg = &self.worker.cfg;
        let expected: Vec<ImageRecord> = requests
            .iter()
            .map(|(item_index, n, _)| ImageRecord::planned(batch, *item_index, *n))
            .collect();
        let listed = storage.list(&batch.bucket, &batch.folder_key()).await?;
        let wanted: std::collections::HashSet<&str> =
            expected.iter().map(|r| r.key.as_str()).collect();
        // Every expected image that exists, and one other image, enough to see other work.
        let mut to_head: Vec<&String> = listed
            .iter()
            .filter(|k| wanted.contains(k.as_str()))
            .collect();
        to_head.extend(
            listed
                .iter()
                .find(|k| k.ends_with(".png") && !wanted.contains(k.as_str())),
        );
        let mut found = HashMap::new();
        for key in to_head {
            if let Some(meta) = storage.head_metadata(&batch.bucket, key).await? {
                found.insert(key.clone(), meta);
            }
        }
        let mut verdict = resume::decide(work, &cfg.model_name, &expected, &found);
        if let resume::Verdict::Resume(records) = &mut verdict {
            for r in records.iter_mut().flatten() {
                r.low_clip_score = r
                    .clip_score
                    .zip(cfg.min_clip_score)
                    .map(|(score, min)| score < min);
            }
        }
        Ok(verdict)
    }

    /// Settles a message whose work is over: ack on success; on a permanent failure take back
    /// what it stored and dead-letter it at once; on a transient one nack with requeue (the
    /// delivery limit dead-letters a batch that keeps failing; on its last attempt
    /// `batch.failed` is published first). Errors are broker errors.
    async fn settle(
        &self,
        failed: Settling,
        result: Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        let m = &self.worker.metrics;
        let error = match result {
            Ok(()) => return Ok(ack(cfg, &failed.acker).await?),
            // The broker is gone: nothing can be settled on this channel; it redelivers.
            Err(WorkerError::Queue(e)) => return Err(e.into()),
            Err(e) => e,
        };
        m.batches.with_label_values(&["failed"]).inc();
        let batch_id = failed.batch.batch_id.clone();
        if let Some(reason) = error.permanent_reason() {
            tracing::error!(error = %error, reason, "batch failed permanently: dead-lettering");
            // Nothing of a dead-lettered batch stays stored (best effort: the store may be the
            // very thing refusing).
            for key in &failed.stored {
                if let Err(e) = self.worker.storage.delete(&failed.batch.bucket, key).await {
                    tracing::warn!(key, error = %e, "could not delete an image of the failed batch");
                }
            }
            return self
                .dead_letter(
                    &failed.acker,
                    &failed.body,
                    Some(batch_id),
                    reason,
                    &error.to_string(),
                )
                .await;
        }
        let last = is_last_attempt(failed.previous_failures, cfg.topology.delivery_limit);
        tracing::error!(error = %error, previous_failures = failed.previous_failures,
            last_attempt = last, "batch failed; requeueing");
        if last {
            publish_failed(
                cfg,
                m,
                &self.publisher,
                Some(batch_id),
                reasons::DELIVERY_LIMIT,
                &error.to_string(),
            )
            .await?;
            m.batches.with_label_values(&["dead_lettered"]).inc();
            m.dead_letters
                .with_label_values(&[reasons::DELIVERY_LIMIT])
                .inc();
        }
        Ok(requeue(cfg, &failed.acker).await?)
    }

    /// Copies a message to the dead-letter exchange with the worker's reason headers (bounded;
    /// none of the producer's headers, which once made this publish exceed the frame size),
    /// publishes `batch.failed` and acks the original. If the broker refuses the copy, the
    /// message is requeued instead, so it is never lost.
    async fn dead_letter(
        &self,
        acker: &Acker,
        body: &[u8],
        batch_id: Option<String>,
        reason: &str,
        text: &str,
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        let text = crate::bounded::reason(text);
        let mut headers = FieldTable::default();
        headers.insert("x-sdbatch-error".into(), header_value(reason));
        headers.insert("x-sdbatch-reason".into(), header_value(&text));
        headers.insert(
            "x-sdbatch-worker".into(),
            header_value(&crate::bounded::cut(&cfg.worker_id, 128)),
        );
        let t = &cfg.topology;
        let published = self
            .publisher
            .publish_json(&t.dead_exchange, &t.dead_queue, body, Some(headers), true)
            .await;
        match published {
            Ok(()) => {}
            Err(e @ QueueError::NotConfirmed { .. }) => {
                tracing::error!(error = %e, "the broker refused the dead letter; requeueing");
                return Ok(requeue(cfg, acker).await?);
            }
            Err(e) => return Err(e.into()),
        }
        let m = &self.worker.metrics;
        m.batches.with_label_values(&["dead_lettered"]).inc();
        m.dead_letters.with_label_values(&[reason]).inc();
        publish_failed(cfg, m, &self.publisher, batch_id, reason, &text).await?;
        Ok(ack(cfg, acker).await?)
    }

    /// Dead-letters an invalid message with its reason, publishes `batch.failed`, acks it. A body
    /// over the size limit is not copied: it is rejected and the queue's own dead-lettering
    /// moves it (RabbitMQ's `x-first-death-reason: rejected`), with `batch.failed` saying why.
    async fn reject_invalid(
        &self,
        delivery: Delivery,
        invalid: Invalid,
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        tracing::warn!(reason = invalid.reason.as_str(), error = %invalid.message, "invalid message: dead-lettering");
        if invalid.reason == message::InvalidReason::TooLarge {
            let m = &self.worker.metrics;
            reject(cfg, &delivery.acker).await?;
            m.batches.with_label_values(&["dead_lettered"]).inc();
            m.dead_letters
                .with_label_values(&[invalid.reason.as_str()])
                .inc();
            return publish_failed(
                cfg,
                m,
                &self.publisher,
                None,
                invalid.reason.as_str(),
                &invalid.message,
            )
            .await;
        }
        self.dead_letter(
            &delivery.acker,
            &delivery.data,
            invalid.batch_id.clone(),
            invalid.reason.as_str(),
            &invalid.message,
        )
        .await
    }

    fn consumer_tag(&self) -> String {
        format!(
            "sdbatch-{}-{}",
            self.worker.cfg.worker_id, self.consumer_gen
        )
    }

    /// Lets the broker deliver as many messages as the work in hand leaves room for (see
    /// [`holding`]). RabbitMQ fixes a consumer's prefetch when it subscribes, so a different
    /// number means cancelling the consumer (the deliveries already on their way are taken in)
    /// and subscribing again with the room that is left; no room, no consumer.
    async fn adjust_consumer(
        &mut self,
        consumer: &mut Option<lapin::Consumer>,
        holding: &mut Holding,
    ) -> Result<(), WorkerError> {
        let remaining: f64 = self
            .inflight
            .values()
            .map(|m| m.ungenerated as f64 * m.units_per_image)
            .sum();
        let in_hand = self.inflight.len();
        let wanted = usize::from(holding.prefetch(in_hand, remaining));
        let current = self
            .inflight
            .values()
            .filter(|m| m.consumer_gen == self.consumer_gen)
            .count();
        let unchanged = match consumer {
            Some(_) => usize::from(self.consumer_prefetch) + (in_hand - current) == wanted,
            None => wanted <= in_hand,
        };
        if unchanged {
            return Ok(());
        }
        let limit = self.worker.cfg.broker_timeout;
        if let Some(mut old) = consumer.take() {
            queue::within(
                limit,
                "basic.cancel",
                self.channel.basic_cancel(
                    self.consumer_tag().as_str().into(),
                    BasicCancelOptions::default(),
                ),
            )
            .await?;
            // lapin ends the stream after the deliveries that arrived before the cancel-ok.
            loop {
                match tokio::time::timeout(limit, old.next()).await {
                    Ok(Some(Ok(delivery))) => self.accept(delivery, holding).await?,
                    Ok(Some(Err(e))) => return Err(QueueError::from(e).into()),
                    Ok(None) => break,
                    Err(_) => {
                        return Err(QueueError::Timeout {
                            op: "basic.cancel (draining)",
                            limit,
                        }
                        .into());
                    }
                }
            }
        }
        let room = wanted.saturating_sub(self.inflight.len());
        self.worker.metrics.prefetch.set(room as i64);
        if room == 0 {
            tracing::debug!(
                in_hand = self.inflight.len(),
                "no room for more work: not consuming"
            );
            return Ok(());
        }
        let room = u16::try_from(room).unwrap_or(u16::MAX);
        queue::within(
            limit,
            "basic.qos",
            self.channel.basic_qos(room, BasicQosOptions::default()),
        )
        .await?;
        self.consumer_gen += 1;
        let cfg = &self.worker.cfg;
        // RabbitMQ ≥ 3.12 takes the consumer timeout per consumer; older brokers ignore the
        // argument and the worker relies on holding less.
        let mut args = FieldTable::default();
        args.insert(
            "x-consumer-timeout".into(),
            lapin::types::AMQPValue::LongLongInt(
                i64::try_from(cfg.consumer_timeout.as_millis()).unwrap_or(i64::MAX),
            ),
        );
        let tag = self.consumer_tag();
        *consumer = Some(
            queue::within(
                limit,
                "basic.consume",
                self.channel.basic_consume(
                    cfg.topology.jobs_queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    args,
                ),
            )
            .await?,
        );
        self.consumer_prefetch = room;
        tracing::debug!(
            prefetch = room,
            in_hand = self.inflight.len(),
            remaining_s = holding.seconds_for(remaining),
            "consuming with a new prefetch"
        );
        Ok(())
    }

    /// Queues GPU batches while the model thread has room.
    fn dispatch(&mut self, sizer: &BatchSizer) {
        while self.gpu_jobs < GPU_QUEUE_DEPTH {
            let Some(key) = self.planner.next_key().cloned() else {
                return;
            };
            let total = self.worker.gpu.info().total_memory;
            let size = sizer.choose(&key, total);
            // Host memory: images generated but not yet stored are bounded. A slow store holds
            // the GPU back rather than filling RAM (one batch may always run when none wait).
            let waiting = self.pending_images + self.gpu_images;
            if waiting > 0 && waiting + size > self.worker.cfg.max_pending_images {
                return;
            }
            let Some(PlannedBatch {
                key,
                params,
                images,
            }) = self.planner.next_batch(size)
            else {
                return;
            };
            let tags: Vec<Tag> = images.iter().map(|i| i.tag).collect();
            let requests: Vec<ImageRequest> = images.into_iter().map(|i| i.request).collect();
            let metrics = &self.worker.metrics;
            metrics.gpu_batches.inc();
            metrics.gpu_images.inc_by(requests.len() as u64);
            metrics.batch_size.set(requests.len() as i64);
            let messages: Vec<u64> = {
                let mut m: Vec<u64> = tags.iter().map(|t| t.0).collect();
                m.dedup();
                m
            };
            tracing::debug!(
                batch = requests.len(),
                messages = messages.len(),
                width = key.width,
                steps = key.steps,
                "GPU batch"
            );
            // One checker pass for the whole batch when any of its messages asked for it; each
            // message uses the verdicts only if it did.
            let safety = messages
                .iter()
                .any(|seq| self.inflight.get(seq).is_some_and(|m| m.safety));
            let gpu = self.worker.gpu.clone();
            let tx = self.sender();
            self.gpu_jobs += 1;
            self.gpu_images += requests.len();
            let size = requests.len();
            self.tasks.spawn(async move {
                let result = gpu.generate(requests, params, safety).await;
                let _ = tx.send(Done::Gpu {
                    key,
                    tags,
                    size,
                    result,
                });
            });
        }
    }

    /// Handles a task's report. Errors are broker errors or a fatal model-thread failure.
    async fn on_done(&mut self, done: Done, learned: &mut Learned) -> Result<(), WorkerError> {
        match done {
            Done::Gpu {
                key,
                tags,
                size,
                result,
            } => {
                self.gpu_jobs -= 1;
                self.gpu_images -= size;
                for seq in tags.iter().map(|t| t.0) {
                    if let Some(m) = self.inflight.get_mut(&seq) {
                        m.ungenerated = m.ungenerated.saturating_sub(1);
                    }
                }
                match result {
                    Ok(out) => self.on_gpu_batch(&key, tags, size, out, learned),
                    Err(GpuError::ThreadGone) => return Err(GpuError::ThreadGone.into()),
                    Err(e) => {
                        let mut seqs: Vec<u64> = tags.iter().map(|t| t.0).collect();
                        seqs.dedup();
                        // Only a GPU batch of one message's images proves the failure is that
                        // message's; otherwise every message in it gets a transient failure.
                        if let [seq] = seqs[..] {
                            self.fail(seq, WorkerError::Gpu(e)).await?;
                        } else {
                            let text = e.to_string();
                            for seq in seqs {
                                self.fail(seq, WorkerError::SharedGpu(text.clone())).await?;
                            }
                        }
                    }
                }
            }
            Done::Upload {
                tag: (seq, index),
                result,
            } => {
                self.pending_images -= 1;
                let Some(m) = self.inflight.get_mut(&seq) else {
                    return Ok(());
                };
                m.uploads_pending -= 1;
                match result {
                    Ok((record, encode_ms, upload_ms)) => {
                        let metrics = &self.worker.metrics;
                        metrics.png_encode_seconds.observe(encode_ms / 1e3);
                        metrics.upload_seconds.observe(upload_ms / 1e3);
                        m.records[index] = Some(record);
                        m.remaining -= 1;
                        m.encode_ms += encode_ms;
                        m.upload_ms += upload_ms;
                        if m.failure.is_none() && m.remaining == 0 {
                            self.complete(seq);
                        }
                    }
                    Err(e) => return self.fail(seq, e).await,
                }
                return self.settle_if_failed(seq).await;
            }
            Done::Finished { seq, result } => {
                let Some(m) = self.inflight.remove(&seq) else {
                    return Ok(());
                };
                let span = m.span.clone();
                if result.is_ok() {
                    let _enter = span.enter();
                    let metrics = &self.worker.metrics;
                    metrics.batches.with_label_values(&["completed"]).inc();
                    metrics
                        .images
                        .with_label_values(&["completed"])
                        .inc_by(m.records.len() as u64);
                    metrics
                        .batch_seconds
                        .observe(m.started.elapsed().as_secs_f64());
                    tracing::info!(
                        images = m.records.len(),
                        total_ms = ms(m.started.elapsed()),
                        generate_ms = m.generate_ms,
                        upload_ms = m.upload_ms,
                        "batch completed"
                    );
                }
                let mut settling = m.into_settling();
                // A manifest that was written belongs to the batch too.
                settling.stored.push(settling.batch.manifest_key());
                return self.settle(settling, result).instrument(span).await;
            }
        }
        Ok(())
    }

    /// Hands the images of a finished GPU batch to upload tasks; feeds the sizer.
    fn on_gpu_batch(
        &mut self,
        key: &ShapeKey,
        tags: Vec<Tag>,
        size: usize,
        mut out: GpuOutput,
        learned: &mut Learned,
    ) {
        let metrics = &self.worker.metrics;
        learned.holding.record_batch(
            message::work_units(size, key.steps, key.width, key.height),
            out.output.timings.total_ms / 1e3,
        );
        let sizer = &mut learned.sizer;
        for &oom in &out.oom_sizes {
            sizer.record_oom(key, oom);
            metrics.oom_splits.inc();
        }
        for &(batch, peak_used_bytes) in &out.memory {
            sizer.record(
                key,
                MemorySample {
                    batch,
                    peak_used_bytes,
                },
            );
        }
        let t = &out.output.timings;
        metrics.gpu_busy_seconds.inc_by(t.total_ms / 1e3);
        metrics
            .gpu_idle_seconds
            .inc_by(out.idle_before.as_secs_f64());
        metrics.unet_step_seconds.observe(t.ms_per_step() / 1e3);
        metrics.text_encode_seconds.observe(t.text_encode_ms / 1e3);
        metrics.vae_decode_seconds.observe(t.vae_decode_ms / 1e3);
        let per_image_ms = out.output.timings.total_ms / size.max(1) as f64;
        let images = std::mem::take(&mut out.output.images);
        for (position, (tag, image)) in tags.into_iter().zip(images).enumerate() {
            let (seq, index) = tag;
            let Some(m) = self.inflight.get_mut(&seq) else {
                continue;
            };
            if m.failure.is_some() {
                continue; // its message failed: nothing more of it is stored
            }
            m.generate_ms += per_image_ms;
            m.uploads_pending += 1;
            self.pending_images += 1;
            let (item_index, n, request) = m.requests[index].clone();
            let checks = image_checks(&self.worker.cfg, metrics, m.safety, &out, position);
            let job = ImageJob {
                batch: m.batch.clone(),
                work: m.work.clone(),
                item_index,
                n,
                request,
                image,
                checks,
            };
            let fut = store_image(self.worker.cfg.clone(), self.worker.storage.clone(), job)
                .instrument(m.span.clone());
            let tx = self.sender();
            self.tasks.spawn(async move {
                let result = fut.await;
                let _ = tx.send(Done::Upload { tag, result });
            });
        }
    }

    /// Every image of message `seq` is stored: write the manifest and publish the event.
    fn complete(&mut self, seq: u64) {
        let Some(m) = self.inflight.get(&seq) else {
            return;
        };
        let records: Vec<ImageRecord> = m.records.iter().flatten().cloned().collect();
        let event = BatchCompleted::new(
            &m.batch,
            records,
            &self.worker.cfg.model_name,
            &self.worker.cfg.worker_id,
            events::Timings {
                queue_wait_ms: None,
                generate_ms: m.generate_ms,
                encode_ms: m.encode_ms,
                upload_ms: m.upload_ms,
                total_ms: ms(m.started.elapsed()),
            },
            m.redelivered,
        );
        let event = BatchCompleted {
            work_sha256: Some(m.work.to_string()),
            resumed_images: (m.resumed > 0).then_some(m.resumed),
            ..event
        };
        let fut = finish_batch(
            self.worker.cfg.clone(),
            self.worker.metrics.clone(),
            self.worker.storage.clone(),
            self.publisher.clone(),
            event,
            m.batch.clone(),
        )
        .instrument(m.span.clone());
        let tx = self.sender();
        self.tasks.spawn(async move {
            let result = fut.await;
            let _ = tx.send(Done::Finished { seq, result });
        });
    }

    /// Message `seq` failed: drop its waiting images; it is settled once its pending uploads
    /// have reported. The first failure is the one reported.
    async fn fail(&mut self, seq: u64, error: WorkerError) -> Result<(), WorkerError> {
        let Some(m) = self.inflight.get_mut(&seq) else {
            return Ok(());
        };
        if m.failure.is_none() {
            let dropped = self.planner.remove_where(|t| t.0 == seq);
            let _enter = m.span.enter();
            tracing::debug!(dropped, error = %error, "dropping the failed message's waiting images");
            m.failure = Some(error);
        }
        self.settle_if_failed(seq).await
    }

    /// Settles a failed message once none of its uploads is pending any more.
    async fn settle_if_failed(&mut self, seq: u64) -> Result<(), WorkerError> {
        let ready = self
            .inflight
            .get(&seq)
            .is_some_and(|m| m.failure.is_some() && m.uploads_pending == 0);
        if !ready {
            return Ok(());
        }
        let Some(mut m) = self.inflight.remove(&seq) else {
            return Ok(());
        };
        let error = m
            .failure
            .take()
            .unwrap_or_else(|| WorkerError::Other("failed".into()));
        self.worker
            .metrics
            .images
            .with_label_values(&["failed"])
            .inc_by(m.records.len() as u64);
        let span = m.span.clone();
        self.settle(m.into_settling(), Err(error))
            .instrument(span)
            .await
    }
}

impl InFlight {
    /// The message's broker handle and what it stored, for settling it.
    fn into_settling(self) -> Settling {
        let stored = self
            .records
            .iter()
            .flatten()
            .filter(|r| r.bytes > 0)
            .map(|r| r.key.clone())
            .collect();
        Settling {
            acker: self.acker,
            body: self.body,
            previous_failures: self.previous_failures,
            batch: self.batch,
            stored,
        }
    }
}

/// The checks' results for image `position` of a GPU batch, and the policy applied to it.
fn image_checks(
    cfg: &WorkerConfig,
    metrics: &Metrics,
    safety_requested: bool,
    out: &GpuOutput,
    position: usize,
) -> ImageChecks {
    let nsfw = if safety_requested {
        out.safety
            .as_ref()
            .and_then(|v| v.get(position))
            .map(|r| r.nsfw)
    } else {
        None
    };
    let safety_action = (nsfw == Some(true)).then_some(cfg.safety_policy);
    if let Some(action) = safety_action {
        metrics
            .safety_flagged
            .with_label_values(&[action.name()])
            .inc();
    }
    let clip_score = out
        .clip_scores
        .as_ref()
        .and_then(|v| v.get(position))
        .copied();
    if let Some(score) = clip_score {
        metrics.clip_score.observe(f64::from(score));
    }
    let low_clip_score = match (clip_score, cfg.min_clip_score) {
        (Some(score), Some(min)) => Some(score < min),
        _ => None,
    };
    ImageChecks {
        nsfw,
        safety_action,
        clip_score,
        low_clip_score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;

    #[test]
    fn producer_set_delivery_counts_are_ignored_and_clamped() {
        // First delivery: whatever the producer put in the header does not count.
        assert_eq!(previous_failures(false, Some(i64::MAX), 3), 0);
        assert_eq!(previous_failures(false, Some(2), 3), 0);
        // Redeliveries: the queue's count, clamped to 0..=limit.
        assert_eq!(previous_failures(true, Some(2), 3), 2);
        assert_eq!(previous_failures(true, None, 3), 0);
        assert_eq!(previous_failures(true, Some(i64::MAX), 3), 3);
        assert_eq!(previous_failures(true, Some(-5), 3), 0);
    }

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
    fn last_attempt_without_overflow() {
        assert!(!is_last_attempt(0, 3));
        assert!(!is_last_attempt(2, 3));
        assert!(is_last_attempt(3, 3));
        assert!(is_last_attempt(i64::MAX, 3));
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
