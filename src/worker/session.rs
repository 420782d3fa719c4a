//! One broker connection: the shell around the [`Ledger`]. It turns deliveries into admissions
//! (after the checks that need the store: manifest, stored images, conflicts), runs the GPU
//! batches, uploads and manifests the ledger asks for on tasks that report back to one loop, and
//! carries out the ledger's verdicts on the broker.
use super::broker::{ack, previous_failures, publish_event, publish_failed, reject, requeue};
use super::gpu::{GpuError, GpuOutput};
use super::holding::Holding;
use super::intake::Waiting;
use super::lanes::LanePolicy;
use super::ledger::{Admission, GpuJob, Ledger, Next, Settled, Tag, Verdict, verdict};
use super::store::{ImageJob, finish_batch, image_checks, ms, store_image};
use super::transport::{Acker, Control, Delivery, EventSink, Link};
use super::{Learned, Worker, WorkerError, reasons, resume};
use crate::batching::{MemorySample, ShapeKey};
use crate::cancel::CancelRequest;
use crate::events::{self, BatchCancelled, BatchCompleted, ImageRecord};
use crate::message::{self, Batch, Invalid};
use crate::output::ImageFormat;
use crate::pipeline::ImageRequest;
use crate::pipeline::hires::{FirstPass, LatentImage};
use crate::queue::{self, Lane, Publisher, QueueError, Topology, header_value};
use crate::storage::StorageError;
use crate::webhook::Target;
use lapin::types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How a connection's session ended.
pub(super) enum SessionEnd {
    Shutdown,
    ConnectionLost(String),
}

impl From<QueueError> for SessionEnd {
    fn from(e: QueueError) -> Self {
        SessionEnd::ConnectionLost(e.to_string())
    }
}

/// What the ledger does not need to know of a message: its broker handle, body, clock and span.
pub(super) struct Handle {
    acker: Acker,
    /// The body as delivered, for dead-lettering it if it fails permanently.
    body: Vec<u8>,
    redelivered: bool,
    started: Instant,
    span: tracing::Span,
    lane: Lane,
}

/// The message a dead letter is a copy of: the lane it came from, its handle and body.
struct Original<'a> {
    lane: Lane,
    acker: &'a Acker,
    body: &'a [u8],
}

/// A message whose work is over, on its way to be acked, requeued or dead-lettered.
struct Settling {
    acker: Acker,
    body: Vec<u8>,
    previous_failures: i64,
    batch_id: String,
    bucket: String,
    /// Keys this delivery stored, deleted if the message is dead-lettered.
    stored: Vec<String>,
    /// How it leaves the worker ([`verdict`]).
    verdict: Verdict,
    /// Its webhook, told of a failure too.
    webhook: Target,
    lane: Lane,
    /// For [`Verdict::Cancelled`]: the event to publish and the batch (its progress object goes).
    cancelled: Option<(BatchCancelled, Arc<Batch>)>,
}

impl Settling {
    /// A delivery settled before any of its work started, with `result`.
    fn unstarted(
        delivery: Delivery,
        previous_failures: i64,
        batch: &Batch,
        result: &Result<(), WorkerError>,
        topology: &Topology,
        webhook: Target,
    ) -> Self {
        let delivery_limit = topology.delivery_limit;
        Self {
            lane: delivery.lane,
            acker: delivery.acker,
            body: delivery.data,
            previous_failures,
            batch_id: batch.batch_id.clone(),
            bucket: batch.bucket.clone(),
            stored: Vec::new(),
            verdict: verdict(result, previous_failures, delivery_limit),
            webhook,
            cancelled: None,
        }
    }

    fn from_ledger(
        s: Settled<Handle>,
        worker: &Worker,
    ) -> (Self, Result<(), WorkerError>, tracing::Span) {
        let m = s.message;
        let cancelled = (s.verdict == Verdict::Cancelled).then(|| {
            let stored: HashSet<String> = m
                .records
                .iter()
                .flatten()
                .filter(|r| r.bytes > 0)
                .map(|r| r.key.clone())
                .collect();
            let event = BatchCancelled::new(
                &m.batch,
                &planned_keys(&m.batch, &m.requests),
                &stored,
                &worker.cfg.worker_id,
            );
            (event, m.batch.clone())
        });
        let settling = Settling {
            acker: m.handle.acker,
            body: m.handle.body,
            previous_failures: m.previous_failures,
            batch_id: m.batch.batch_id.clone(),
            bucket: m.batch.bucket.clone(),
            stored: s.stored,
            verdict: s.verdict,
            webhook: worker.webhook(&m.batch),
            lane: m.handle.lane,
            cancelled,
        };
        (settling, s.result, m.handle.span)
    }
}

/// The keys every image of a message would have, in message order.
fn planned_keys(batch: &Batch, requests: &[(usize, u32, ImageRequest)]) -> Vec<String> {
    requests
        .iter()
        .map(|(item, n, _)| ImageRecord::planned(batch, *item, *n).key)
        .collect()
}

/// What the tasks of a session report back to its loop.
enum Done {
    Gpu {
        job: u64,
        key: ShapeKey,
        tags: Vec<Tag>,
        result: Result<GpuOutput, GpuError>,
    },
    Upload {
        tag: Tag,
        /// The GPU batch that made the image (numbered by the session), for progress reports.
        gpu_batch: u64,
        result: Result<(ImageRecord, f64, f64), WorkerError>,
    },
    Finished {
        seq: u64,
        result: Result<(), WorkerError>,
    },
}

impl Worker {
    /// Connects to the broker, then consumes and works ([`Worker::work`]) until shutdown or a
    /// lost connection.
    pub(super) async fn session(
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
        // Cancel broadcasts (`sdbatch cancel`) while connected; a delivery whose cancel was
        // missed meanwhile finds its tombstone in `accept`.
        let control = queue::within(limit, "control subscribe", async {
            queue::subscribe_control(&channel, &cfg.topology).await
        })
        .await?;
        tracing::info!(
            broker = %queue::redact_url(&cfg.amqp_url),
            queue = %cfg.topology.jobs_queue,
            high_lane = %cfg.topology.jobs_high_queue,
            high_lane_ratio = cfg.high_lane_ratio,
            max_prefetch = cfg.prefetch,
            max_batch = cfg.max_batch,
            "consuming"
        );
        let link = Link::Amqp {
            connection: Box::new(conn),
            channel,
        };
        let sink = EventSink::Amqp(publisher);
        self.metrics.broker_connected.store(true, Ordering::Relaxed);
        self.work(link, sink, Control::Amqp(control), shutdown, learned)
            .await
    }

    /// Takes messages from `link` and works until shutdown (after finishing the messages in
    /// hand), a lost connection, or, for an in-memory queue, every message settled.
    pub(super) async fn work(
        &self,
        link: Link,
        publisher: EventSink,
        mut control: Control,
        shutdown: &mut watch::Receiver<bool>,
        learned: &mut Learned,
    ) -> Result<SessionEnd, WorkerError> {
        let cfg = &self.cfg;
        let limit = cfg.broker_timeout;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut session = Session {
            worker: self,
            link,
            lanes: LanePolicy::new(cfg.high_lane_ratio),
            publisher,
            ledger: Ledger::new(cfg.topology.delivery_limit, cfg.max_pending_images),
            tasks: JoinSet::new(),
            done_tx,
            gpu_batches: 0,
            progress_objects: spawn_progress_writer(self.storage.clone()),
            stops: HashMap::new(),
        };
        // Subscribed by `take_in` only while both lanes are empty.
        let mut waiting = Waiting::default();
        let mut draining = false;
        let mut deadline: Option<tokio::time::Instant> = None;

        loop {
            session.dispatch(learned);
            let mut took = false;
            if !draining {
                match session.take_in(&mut waiting, &mut learned.holding).await {
                    Ok(t) => took = t,
                    Err(WorkerError::Queue(e)) => return Ok(e.into()),
                    Err(e) => return Err(e),
                }
            }
            self.metrics
                .inflight_batches
                .set(session.ledger.len() as i64);
            self.metrics
                .pending_images
                .set(session.ledger.images_in_flight() as i64);
            if (draining || session.link.exhausted()) && session.ledger.is_idle() {
                session.link.close(limit).await;
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
                        tracing::info!(in_hand = session.ledger.len(), grace = ?cfg.grace_period,
                            "shutdown requested: finishing the messages in hand");
                        // Deliveries still on their way stay unacked and go back to the queue
                        // when the connection closes.
                        waiting.abandon(&session.link, limit).await;
                    }
                    Ok(())
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    return Err(WorkerError::GraceExpired(cfg.grace_period));
                }
                next = waiting.next(), if !draining && waiting.is_active() => match next {
                    Some(Ok(delivery)) => session.woken(delivery, &mut waiting, &mut learned.holding).await,
                    Some(Err(e)) => return Ok(SessionEnd::ConnectionLost(e.to_string())),
                    None => return Ok(SessionEnd::ConnectionLost("consumer stream ended".into())),
                },
                Some(done) = done_rx.recv() => session.on_done(done, learned).await,
                // Heard while draining too: a cancelled batch need not hold up the exit.
                control_message = control.next() => match control_message {
                    Some(Ok(body)) => session.on_control(&body).await,
                    Some(Err(e)) => return Ok(SessionEnd::ConnectionLost(e.to_string())),
                    None => return Ok(SessionEnd::ConnectionLost("control consumer ended".into())),
                },
                // A message was just taken in: look for the next one before waiting, while the
                // other branches (a signal, finished work) still get their turn.
                () = std::future::ready(()), if took => Ok(()),
            };
            match step {
                Ok(()) => {}
                Err(WorkerError::Queue(e)) => return Ok(e.into()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The state of one broker connection: the ledger of the messages in hand and the I/O for them.
struct Session<'w> {
    worker: &'w Worker,
    /// Where its messages come from.
    link: Link,
    /// Which lane the next message comes from.
    lanes: LanePolicy,
    publisher: EventSink,
    ledger: Ledger<Handle>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    /// GPU batches returned so far (numbers them for progress reports).
    gpu_batches: u64,
    /// Progress objects to store, in order, off the session's loop.
    progress_objects: mpsc::Sender<ProgressOp>,
    /// The stop switch of each GPU job queued or running, by job id ([`GpuWork::stop`]).
    ///
    /// [`GpuWork::stop`]: super::gpu::GpuWork::stop
    stops: HashMap<u64, Arc<AtomicBool>>,
}

/// A session that ends (its connection lost) stops its GPU jobs: their messages go back to the
/// broker, their upload tasks are dropped with the session, so whatever they would make is lost
/// anyway, and the next session's jobs should not wait behind them.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        for stop in self.stops.values() {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Work for the progress writer.
pub(super) enum ProgressOp {
    /// Store `body` at `bucket`/`key`.
    Put {
        bucket: String,
        key: String,
        body: Vec<u8>,
    },
    /// Answer once every earlier op is done (before a completed batch's object is deleted).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Stores progress objects one at a time, in the order reported, so a slow store delays them and
/// never the session. When they pile up (the store is down), new ones are dropped: the next
/// report of the batch, or its manifest, brings the state up to date.
fn spawn_progress_writer(storage: Arc<crate::storage::Storage>) -> mpsc::Sender<ProgressOp> {
    let (tx, mut rx) = mpsc::channel::<ProgressOp>(64);
    tokio::spawn(async move {
        while let Some(op) = rx.recv().await {
            match op {
                ProgressOp::Put { bucket, key, body } => {
                    if let Err(e) = storage
                        .put(&bucket, &key, body, "application/json", &[])
                        .await
                    {
                        tracing::warn!(%key, error = %e, "could not store a progress object");
                    }
                }
                ProgressOp::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    tx
}

impl Session<'_> {
    /// Handles a new delivery: invalid → dead letter; already done → republish; else admit it.
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
            tag = delivery.tag
        );
        let mut batch = match message::parse(
            &delivery.data,
            &cfg.limits,
            self.worker.gpu.info().native_size,
        ) {
            Ok(b) => b,
            Err(invalid) => {
                if let Some(id) = &invalid.batch_id {
                    span.record("batch_id", id.as_str());
                }
                // Its webhook is not known to be valid: nothing is sent there.
                return self
                    .reject_invalid(delivery, invalid, &Target::none())
                    .instrument(span)
                    .await;
            }
        };
        span.record("batch_id", batch.batch_id.as_str());
        // A webhook this worker may not call dead-letters the message before any work (and is
        // not told). The addresses a host name resolves to are checked before each request.
        if let Some(refusal) = batch
            .webhook
            .as_ref()
            .and_then(|url| cfg.webhook.check_url(url).err())
        {
            let invalid = Invalid {
                reason: message::InvalidReason::Webhook,
                message: format!("output.webhook.url: {refusal}"),
                batch_id: Some(batch.batch_id.clone()),
            };
            return self
                .reject_invalid(delivery, invalid, &Target::none())
                .instrument(span)
                .await;
        }
        let previous_failures = previous_failures(
            delivery.redelivered,
            delivery.delivery_count,
            cfg.topology.delivery_limit,
        );

        // Cancelled before this delivery (queued, redelivered, or its broadcast missed): acked
        // without work. Checked first so nothing of a cancelled batch is fetched or planned.
        match self.cancelled_before(&batch).instrument(span.clone()).await {
            Ok(None) => {}
            Ok(Some(event)) => {
                let result = Err(WorkerError::Cancelled);
                let mut settling = Settling::unstarted(
                    delivery,
                    previous_failures,
                    &batch,
                    &result,
                    &cfg.topology,
                    self.worker.webhook(&batch),
                );
                settling.cancelled = Some((event, Arc::new(batch)));
                return self.settle(settling, result).instrument(span).await;
            }
            Err(e) => {
                return self
                    .fail_unstarted(delivery, previous_failures, &batch, e.into())
                    .instrument(span)
                    .await;
            }
        }

        // img2img and inpainting inputs first: their bytes are part of the work (hash), and a
        // bad one makes the message invalid before anything is looked up or planned.
        if let Err(invalid) =
            super::inputs::check_model(&batch, self.worker.gpu.info().inpainting_model)
        {
            let webhook = self.worker.webhook(&batch);
            return self
                .reject_invalid(delivery, invalid, &webhook)
                .instrument(span)
                .await;
        }
        let inputs = match super::inputs::load(&self.worker.storage, &mut batch)
            .instrument(span.clone())
            .await
        {
            Ok(images) => images,
            Err(super::inputs::InputError::Invalid(invalid)) => {
                return self
                    .reject_invalid(delivery, invalid, &self.worker.webhook(&batch))
                    .instrument(span)
                    .await;
            }
            Err(super::inputs::InputError::Storage(e)) => {
                return self
                    .fail_unstarted(delivery, previous_failures, &batch, e.into())
                    .instrument(span)
                    .await;
            }
        };

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
                return self
                    .republish(delivery, batch, &bytes, &work, previous_failures)
                    .instrument(span)
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                return self
                    .fail_unstarted(delivery, previous_failures, &batch, e.into())
                    .instrument(span)
                    .await;
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
                .reject_invalid(delivery, invalid, &self.worker.webhook(&batch))
                .instrument(span)
                .await;
        }
        // A LoRA this worker does not have fails every image of the batch: dead-letter it now,
        // before any work (the files themselves are read and checked when first fused).
        if let Some(problem) = self.missing_lora(&batch) {
            let invalid = Invalid {
                reason: message::InvalidReason::Lora,
                message: problem,
                batch_id: Some(batch.batch_id.clone()),
            };
            return self
                .reject_invalid(delivery, invalid, &self.worker.webhook(&batch))
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
                    .reject_invalid(delivery, invalid, &self.worker.webhook(&batch))
                    .instrument(span)
                    .await;
            }
            Err(e) => {
                return self
                    .fail_unstarted(delivery, previous_failures, &batch, e.into())
                    .instrument(span)
                    .await;
            }
        };
        // As GPU batches count it (`batch_work_per_image`): a hires fix's two passes.
        let units_per_image = message::image_work(
            batch.params.steps,
            batch.params.width,
            batch.params.height,
            batch.hires.as_ref(),
        );
        let resumed = records.iter().flatten().count();
        holding.observe_message(units_per_image * (requests.len() - resumed) as f64);
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
        let handle = Handle {
            lane: delivery.lane,
            acker: delivery.acker,
            body: delivery.data,
            redelivered: delivery.redelivered,
            started: Instant::now(),
            span,
        };
        let admission = Admission {
            batch: Arc::new(batch),
            work,
            requests,
            records,
            safety,
            previous_failures,
            units_per_image,
            inputs,
        };
        let (_, next) = self.ledger.admit(handle, admission);
        if let Some(next) = next {
            self.carry_out(next).await?;
        }
        Ok(())
    }

    /// A redelivery of a batch whose manifest exists: the same work is announced again without
    /// regenerating; other work under the same id is a conflict.
    async fn republish(
        &self,
        delivery: Delivery,
        batch: Batch,
        manifest: &[u8],
        work: &str,
        previous_failures: i64,
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        let stored = serde_json::from_slice::<BatchCompleted>(manifest).map_err(|e| {
            WorkerError::Other(format!(
                "{}: unreadable manifest: {e}",
                batch.manifest_key()
            ))
        });
        let stored_work = stored.as_ref().ok().and_then(|e| e.work_sha256.as_deref());
        if stored_work.is_some_and(|w| w != work) {
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
                .reject_invalid(delivery, invalid, &self.worker.webhook(&batch))
                .await;
        }
        let republished = async {
            let mut event = stored?;
            event.redelivered = true;
            tracing::info!("manifest exists: republishing batch.completed without regenerating");
            publish_event(
                cfg,
                &self.worker.metrics,
                &self.publisher,
                events::BATCH_COMPLETED,
                &event,
                &self.worker.webhook(&batch),
            )
            .await
        }
        .await;
        if republished.is_ok() {
            self.worker
                .metrics
                .batches
                .with_label_values(&["republished"])
                .inc();
        }
        let settling = Settling::unstarted(
            delivery,
            previous_failures,
            &batch,
            &republished,
            &cfg.topology,
            self.worker.webhook(&batch),
        );
        self.settle(settling, republished).await
    }

    /// `batch.cancelled` for a delivery whose batch has a tombstone and no manifest (a manifest
    /// wins: the work is done and is announced again), with what an earlier delivery stored.
    async fn cancelled_before(
        &self,
        batch: &Batch,
    ) -> Result<Option<BatchCancelled>, StorageError> {
        let storage = &self.worker.storage;
        if !storage
            .exists(&batch.bucket, &batch.tombstone_key())
            .await?
            || storage.exists(&batch.bucket, &batch.manifest_key()).await?
        {
            return Ok(None);
        }
        let listed: HashSet<String> = storage
            .list(&batch.bucket, &batch.folder_key())
            .await?
            .into_iter()
            .collect();
        let planned = planned_keys(batch, &batch.image_requests());
        tracing::info!("the batch was cancelled before this delivery: acking it without work");
        Ok(Some(BatchCancelled::new(
            batch,
            &planned,
            &listed,
            &self.worker.cfg.worker_id,
        )))
    }

    /// A control message: a cancel stops the messages in hand of its batch (see
    /// [`crate::cancel`]). Errors are broker errors.
    async fn on_control(&mut self, body: &[u8]) -> Result<(), WorkerError> {
        let metrics = self.worker.metrics.clone();
        let request = match CancelRequest::from_json(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a control message");
                metrics
                    .cancel_requests
                    .with_label_values(&["invalid"])
                    .inc();
                return Ok(());
            }
        };
        let seqs = self
            .ledger
            .find_batch(&request.batch_id, &request.bucket, &request.prefix);
        if seqs.is_empty() {
            tracing::debug!(batch_id = %request.batch_id, "cancel: no message of the batch in hand");
            metrics
                .cancel_requests
                .with_label_values(&["not_here"])
                .inc();
            return Ok(());
        }
        for seq in seqs {
            let span = self.ledger.get(seq).map(|m| m.handle.span.clone());
            let span = span.unwrap_or_else(tracing::Span::none);
            match self.ledger.cancel(seq) {
                None => {
                    tracing::info!(parent: &span, "cancel: too late (every image stored, or the batch already failed)");
                    metrics
                        .cancel_requests
                        .with_label_values(&["too_late"])
                        .inc();
                }
                Some(settled) => {
                    tracing::info!(parent: &span, "cancel: dropping the batch's planned images");
                    metrics
                        .cancel_requests
                        .with_label_values(&["cancelled"])
                        .inc();
                    if let Some(settled) = settled {
                        self.settle_from_ledger(settled).await?;
                    }
                }
            }
        }
        self.stop_unwanted_gpu_jobs();
        Ok(())
    }

    /// Flips the stop switch of every GPU job none of whose images will be stored.
    fn stop_unwanted_gpu_jobs(&self) {
        for job in self.ledger.unwanted_gpu_jobs() {
            if let Some(stop) = self.stops.get(&job)
                && !stop.swap(true, Ordering::Relaxed)
            {
                tracing::info!(job, "stopping a GPU batch nobody wants any more");
            }
        }
    }

    /// Settles a cancelled message: `batch.cancelled`, its progress object removed, ack. What it
    /// stored stays.
    async fn settle_cancelled(
        &self,
        settling: Settling,
        (event, batch): (BatchCancelled, Arc<Batch>),
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        let m = &self.worker.metrics;
        super::store::remove_progress_object(&self.progress_objects, &self.worker.storage, &batch)
            .await;
        publish_event(
            cfg,
            m,
            &self.publisher,
            events::BATCH_CANCELLED,
            &event,
            &settling.webhook,
        )
        .await?;
        m.batches.with_label_values(&["cancelled"]).inc();
        m.images
            .with_label_values(&["cancelled"])
            .inc_by(event.not_stored_keys.len() as u64);
        tracing::info!(
            stored = event.stored_keys.len(),
            not_stored = event.not_stored_keys.len(),
            "batch cancelled"
        );
        ack(cfg, &settling.acker).await?;
        self.acked(settling.lane);
        Ok(())
    }

    /// Why the batch's LoRAs cannot be served here: no LoRA folder, or a name without a file in
    /// it. Checked per delivery (one `stat` per LoRA), so a file added to the folder is found.
    fn missing_lora(&self, batch: &Batch) -> Option<String> {
        let loras = &batch.params.loras;
        if loras.is_empty() {
            return None;
        }
        let Some(dir) = &self.worker.cfg.lora_dir else {
            return Some(
                "the batch asks for LoRAs, but this worker has no LoRA folder (--lora-dir)".into(),
            );
        };
        loras
            .iter()
            .find_map(|l| crate::pipeline::adapters::lora_path(dir, &l.name).err())
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
                .find(|k| ImageFormat::is_image_key(k) && !wanted.contains(k.as_str())),
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

    /// Carries out what the ledger decided for a message.
    async fn carry_out(&mut self, next: Next<Handle>) -> Result<(), WorkerError> {
        match next {
            Next::Complete(seq) => {
                self.complete(seq);
                Ok(())
            }
            Next::Settle(settled) => self.settle_from_ledger(*settled).await,
        }
    }

    async fn settle_from_ledger(&self, settled: Settled<Handle>) -> Result<(), WorkerError> {
        if settled.result.is_err() && settled.verdict != Verdict::Cancelled {
            self.worker
                .metrics
                .images
                .with_label_values(&["failed"])
                .inc_by(settled.message.records.len() as u64);
        }
        let (settling, result, span) = Settling::from_ledger(settled, self.worker);
        self.settle(settling, result).instrument(span).await
    }

    /// Carries out a message's verdict: ack; on a permanent failure take
    /// back what it stored and dead-letter it at once; on a transient one nack with requeue (on
    /// its last attempt `batch.failed` is published first). Errors are broker errors.
    /// Settles a delivery that failed before any of its images was planned (an input, manifest
    /// or listing lookup): retried or dead-lettered by the usual rules.
    async fn fail_unstarted(
        &self,
        delivery: Delivery,
        previous_failures: i64,
        batch: &Batch,
        error: WorkerError,
    ) -> Result<(), WorkerError> {
        let result = Err(error);
        let failed = Settling::unstarted(
            delivery,
            previous_failures,
            batch,
            &result,
            &self.worker.cfg.topology,
            self.worker.webhook(batch),
        );
        self.settle(failed, result).await
    }

    async fn settle(
        &self,
        failed: Settling,
        result: Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        let cfg = &self.worker.cfg;
        let m = &self.worker.metrics;
        if let Verdict::Cancelled = failed.verdict {
            let mut failed = failed;
            return match failed.cancelled.take() {
                Some(cancelled) => self.settle_cancelled(failed, cancelled).await,
                None => Err(WorkerError::Other(
                    "a cancelled message without its event".into(),
                )),
            };
        }
        let error = match result {
            Ok(()) => {
                ack(cfg, &failed.acker).await?;
                self.acked(failed.lane);
                return Ok(());
            }
            // The broker is gone: nothing can be settled on this channel; it redelivers.
            Err(WorkerError::Queue(e)) => return Err(e.into()),
            Err(e) => e,
        };
        m.batches.with_label_values(&["failed"]).inc();
        match failed.verdict {
            Verdict::DeadLetter { reason } => {
                tracing::error!(error = %error, reason, "batch failed permanently: dead-lettering");
                // Nothing of a dead-lettered batch stays stored (best effort: the store may be
                // the very thing refusing).
                for key in &failed.stored {
                    if let Err(e) = self.worker.storage.delete(&failed.bucket, key).await {
                        tracing::warn!(key, error = %e, "could not delete an image of the failed batch");
                    }
                }
                let original = Original {
                    lane: failed.lane,
                    acker: &failed.acker,
                    body: &failed.body,
                };
                self.dead_letter(
                    original,
                    Some(failed.batch_id),
                    reason,
                    &error.to_string(),
                    &failed.webhook,
                )
                .await
            }
            Verdict::Requeue { last_attempt } => {
                tracing::error!(error = %error, previous_failures = failed.previous_failures,
                    last_attempt, "batch failed; requeueing");
                if last_attempt {
                    publish_failed(
                        cfg,
                        m,
                        &self.publisher,
                        Some(failed.batch_id),
                        reasons::DELIVERY_LIMIT,
                        &error.to_string(),
                        &failed.webhook,
                    )
                    .await?;
                    m.batches.with_label_values(&["dead_lettered"]).inc();
                    m.dead_letters
                        .with_label_values(&[reasons::DELIVERY_LIMIT])
                        .inc();
                }
                Ok(requeue(cfg, &failed.acker).await?)
            }
            Verdict::Ack | Verdict::Abandon | Verdict::Cancelled => unreachable!("handled above"),
        }
    }

    /// Copies a message to the dead-letter exchange with the worker's reason headers (bounded;
    /// none of the producer's headers, which once made this publish exceed the frame size),
    /// publishes `batch.failed` and acks the original. If the broker refuses the copy, the
    /// message is requeued instead, so it is never lost.
    async fn dead_letter(
        &self,
        Original { lane, acker, body }: Original<'_>,
        batch_id: Option<String>,
        reason: &str,
        text: &str,
        webhook: &Target,
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
        // The lane it came from, for `sdbatch dlq requeue` (a copy has no x-first-death-queue).
        headers.insert("x-sdbatch-lane".into(), header_value(lane.as_str()));
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
        publish_failed(cfg, m, &self.publisher, batch_id, reason, &text, webhook).await?;
        acker.ack_copied(cfg.broker_timeout, reason).await?;
        self.acked(lane);
        Ok(())
    }

    fn acked(&self, lane: Lane) {
        let m = &self.worker.metrics;
        m.lane_acked.with_label_values(&[lane.as_str()]).inc();
    }

    /// Dead-letters an invalid message with its reason, publishes `batch.failed`, acks it. A body
    /// over the size limit is not copied: it is rejected and the queue's own dead-lettering
    /// moves it (RabbitMQ's `x-first-death-reason: rejected`), with `batch.failed` saying why.
    async fn reject_invalid(
        &self,
        delivery: Delivery,
        invalid: Invalid,
        webhook: &Target,
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
                webhook,
            )
            .await;
        }
        let original = Original {
            lane: delivery.lane,
            acker: &delivery.acker,
            body: &delivery.data,
        };
        self.dead_letter(
            original,
            invalid.batch_id.clone(),
            invalid.reason.as_str(),
            &invalid.message,
            webhook,
        )
        .await
    }

    /// A consumer tag of this worker no earlier subscription of the session used.
    fn next_consumer_tag(&mut self) -> String {
        let generation = self.ledger.next_consumer();
        format!("sdbatch-{}-{generation}", self.worker.cfg.worker_id)
    }

    /// Takes in at most one message while the work in hand leaves room for one (see
    /// [`super::holding`]): pulled from the lane whose turn it is ([`LanePolicy`]), else from
    /// the other; when both lanes are empty, a consumer on each waits for the next message (see
    /// [`intake`]). Returns whether it took a message.
    async fn take_in(
        &mut self,
        waiting: &mut Waiting,
        holding: &mut Holding,
    ) -> Result<bool, WorkerError> {
        let cfg = self.worker.cfg.clone();
        let limit = cfg.broker_timeout;
        let in_hand = self.ledger.len();
        let remaining = self.ledger.ungenerated_units();
        let wanted = usize::from(holding.prefetch(in_hand, remaining));
        let room = wanted.saturating_sub(in_hand);
        self.worker.metrics.prefetch.set(room as i64);
        if room == 0 {
            if waiting.is_active() {
                tracing::debug!(in_hand, "no room for more work: not consuming");
                for delivery in waiting.cancel(&self.link, limit).await? {
                    self.take(delivery, holding).await?;
                }
            }
            return Ok(false);
        }
        if waiting.is_active() {
            return Ok(false);
        }
        for lane in self.lanes.order() {
            if let Some(delivery) = self.link.pull(lane, &cfg.topology, limit).await? {
                self.take(delivery, holding).await?;
                return Ok(true);
            }
        }
        // RabbitMQ ≥ 3.12 takes the consumer timeout per consumer; older brokers ignore the
        // argument, and pulled messages always run under the broker's own: the worker relies on
        // holding less.
        let mut args = FieldTable::default();
        args.insert(
            "x-consumer-timeout".into(),
            lapin::types::AMQPValue::LongLongInt(
                i64::try_from(cfg.consumer_timeout.as_millis()).unwrap_or(i64::MAX),
            ),
        );
        let tag = self.next_consumer_tag();
        waiting
            .subscribe(&self.link, &cfg.topology, &tag, args, limit)
            .await?;
        tracing::debug!(
            room,
            in_hand,
            remaining_s = holding.seconds_for(remaining),
            "both lanes empty: waiting for a message"
        );
        Ok(false)
    }

    /// A waiting consumer delivered: take the message in and stop waiting, so the next one is
    /// pulled in the lane policy's order again.
    async fn woken(
        &mut self,
        delivery: Delivery,
        waiting: &mut Waiting,
        holding: &mut Holding,
    ) -> Result<(), WorkerError> {
        self.take(delivery, holding).await?;
        let limit = self.worker.cfg.broker_timeout;
        for delivery in waiting.cancel(&self.link, limit).await? {
            self.take(delivery, holding).await?;
        }
        Ok(())
    }

    /// Counts a delivery against its lane, then handles it.
    async fn take(&mut self, delivery: Delivery, holding: &mut Holding) -> Result<(), WorkerError> {
        let lane = delivery.lane;
        self.lanes.taken(lane);
        let m = &self.worker.metrics;
        m.lane_received.with_label_values(&[lane.as_str()]).inc();
        self.accept(delivery, holding).await
    }

    /// Queues the GPU batches the ledger has room for on the model thread.
    fn dispatch(&mut self, learned: &Learned) {
        let total = self.worker.gpu.info().total_memory;
        while let Some(GpuJob {
            id,
            key,
            params,
            tags,
            requests,
            inputs,
            safety,
        }) = self
            .ledger
            .next_gpu_batch(|key| learned.sizer.choose(key, total))
        {
            let metrics = &self.worker.metrics;
            metrics.gpu_batches.inc();
            metrics.gpu_images.inc_by(requests.len() as u64);
            metrics.batch_size.set(requests.len() as i64);
            tracing::debug!(
                batch = requests.len(),
                width = key.width,
                steps = key.steps,
                "GPU batch"
            );
            let gpu = self.worker.gpu.clone();
            let tx = self.done_tx.clone();
            let stop = Arc::new(AtomicBool::new(false));
            self.stops.insert(id, stop.clone());
            self.tasks.spawn(async move {
                let work = super::gpu::GpuWork {
                    mode: key.mode,
                    inputs,
                    stop: Some(stop),
                };
                let result = gpu.generate_with(requests, params, work, safety).await;
                let _ = tx.send(Done::Gpu {
                    job: id,
                    key,
                    tags,
                    result,
                });
            });
        }
    }

    /// Handles a task's report. Errors are broker errors or a fatal model-thread failure.
    async fn on_done(&mut self, done: Done, learned: &mut Learned) -> Result<(), WorkerError> {
        match done {
            Done::Gpu {
                job,
                key,
                tags,
                result,
            } => {
                self.stops.remove(&job);
                match result {
                    Ok(out) => {
                        for settled in self.on_gpu_batch(job, &key, &tags, out, learned) {
                            self.settle_from_ledger(settled).await?;
                        }
                        Ok(())
                    }
                    Err(GpuError::ThreadGone) => Err(GpuError::ThreadGone.into()),
                    Err(GpuError::Stopped(why)) => {
                        tracing::info!(job, images = tags.len(), why, "GPU batch stopped");
                        self.worker.metrics.gpu_batches_stopped.inc();
                        for settled in self.ledger.gpu_stopped(job, &tags) {
                            self.settle_from_ledger(settled).await?;
                        }
                        Ok(())
                    }
                    Err(e) => {
                        for settled in self.ledger.gpu_failed(job, &tags, WorkerError::Gpu(e)) {
                            self.settle_from_ledger(settled).await?;
                        }
                        // The other jobs of a message that failed need not run either.
                        self.stop_unwanted_gpu_jobs();
                        Ok(())
                    }
                }
            }
            Done::Upload {
                tag,
                gpu_batch,
                result,
            } => {
                if let Ok((_, encode_ms, upload_ms)) = &result {
                    let metrics = &self.worker.metrics;
                    metrics.png_encode_seconds.observe(encode_ms / 1e3);
                    metrics.upload_seconds.observe(upload_ms / 1e3);
                }
                match self.ledger.upload_done(tag, result) {
                    Some(next) => self.carry_out(next).await,
                    None => {
                        self.report_progress(tag.0, gpu_batch).await;
                        Ok(())
                    }
                }
            }
            Done::Finished { seq, result } => {
                let Some(settled) = self.ledger.finished(seq, result) else {
                    return Ok(());
                };
                if settled.result.is_ok() {
                    let m = &settled.message;
                    let _enter = m.handle.span.enter();
                    let metrics = &self.worker.metrics;
                    let elapsed = m.handle.started.elapsed();
                    metrics.batches.with_label_values(&["completed"]).inc();
                    metrics
                        .images
                        .with_label_values(&["completed"])
                        .inc_by(m.records.len() as u64);
                    metrics.batch_seconds.observe(elapsed.as_secs_f64());
                    tracing::info!(
                        images = m.records.len(),
                        total_ms = ms(elapsed),
                        generate_ms = m.generate_ms,
                        upload_ms = m.upload_ms,
                        "batch completed"
                    );
                }
                let (settling, result, span) = Settling::from_ledger(settled, self.worker);
                self.settle(settling, result).instrument(span).await
            }
        }
    }

    /// Hands the images of a finished GPU batch to upload tasks and hires fixes' first passes
    /// back to the ledger; feeds the sizer and holding. Returns the messages to settle (a first
    /// pass the model did not return fails its message rather than leave it waiting).
    fn on_gpu_batch(
        &mut self,
        job: u64,
        key: &ShapeKey,
        tags: &[Tag],
        mut out: GpuOutput,
        learned: &mut Learned,
    ) -> Vec<Settled<Handle>> {
        let metrics = &self.worker.metrics;
        self.gpu_batches += 1;
        let gpu_batch = self.gpu_batches;
        learned.holding.record_batch(
            tags.len() as f64 * batch_work_per_image(key),
            out.output.timings.total_ms / 1e3,
        );
        for &oom in &out.oom_sizes {
            learned.sizer.record_oom(key, oom);
            metrics.oom_splits.inc();
        }
        for &(batch, peak_used_bytes) in &out.memory {
            learned.sizer.record(
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
        let back = self.ledger.gpu_succeeded(job, tags, t.total_ms);
        let mut images: Vec<Option<crate::pipeline::RgbImage>> =
            std::mem::take(&mut out.output.images)
                .into_iter()
                .map(Some)
                .collect();
        // Hires fixes' first passes go back to the planner for their second pass: the decoded
        // image (lanczos) or the latents (latent), whichever this batch made.
        let mut latents: Vec<Option<LatentImage>> = std::mem::take(&mut out.output.latents)
            .into_iter()
            .map(Some)
            .collect();
        let first_passes = back
            .first_passes
            .into_iter()
            .map(|(position, tag)| {
                let first = match latents.get_mut(position).and_then(Option::take) {
                    Some(l) => Some(FirstPass::Latents(l)),
                    None => images
                        .get_mut(position)
                        .and_then(Option::take)
                        .map(FirstPass::Image),
                };
                (tag, first.map(Arc::new))
            })
            .collect();
        let settle = self.ledger.queue_second_passes(first_passes);
        for (position, tag) in back.store {
            let Some(image) = images.get_mut(position).and_then(Option::take) else {
                // Counted as an upload under way: report it failed, or its message would wait
                // for it for ever.
                let _ = self.done_tx.send(Done::Upload {
                    tag,
                    gpu_batch,
                    result: Err(WorkerError::Other(format!(
                        "the model returned no image at position {position} of its batch"
                    ))),
                });
                continue;
            };
            let Some(m) = self.ledger.get(tag.0) else {
                continue;
            };
            let (item_index, n, request) = m.requests[tag.1].clone();
            let checks = image_checks(&self.worker.cfg, metrics, m.safety, &out, position);
            let job = ImageJob {
                batch: m.batch.clone(),
                work: m.work.clone(),
                item_index,
                n,
                request,
                image,
                checks,
                model_sha256: self.worker.gpu.info().model_sha256.clone(),
            };
            let fut = store_image(self.worker.cfg.clone(), self.worker.storage.clone(), job)
                .instrument(m.handle.span.clone());
            let tx = self.done_tx.clone();
            self.tasks.spawn(async move {
                let result = fut.await;
                let _ = tx.send(Done::Upload {
                    tag,
                    gpu_batch,
                    result,
                });
            });
        }
        settle
    }

    /// An image of message `seq`, made in GPU batch `gpu_batch`, was stored: reports
    /// `batch.progress` when the throttle allows (event and progress object). A failing message
    /// reports nothing; a report that cannot be published is logged, never fails the batch.
    async fn report_progress(&mut self, seq: u64, gpu_batch: u64) {
        let cfg = &self.worker.cfg;
        let Some(m) = self.ledger.get_mut(seq) else {
            return;
        };
        if m.is_failing() {
            return;
        }
        let done = m.records.iter().flatten().count();
        let total = m.records.len();
        let throttle = m
            .progress
            .get_or_insert_with(|| crate::progress::Throttle::new(cfg.progress_interval));
        if !throttle.should_emit(Instant::now(), gpu_batch, done, total) {
            return;
        }
        let records: Vec<ImageRecord> = m.records.iter().flatten().cloned().collect();
        let rate =
            crate::progress::rate_and_eta(done, m.resumed, total, m.handle.started.elapsed());
        let event = events::BatchProgress::new(&m.batch, &records, rate, &cfg.worker_id);
        let (span, batch) = (m.handle.span.clone(), m.batch.clone());
        let object = ProgressOp::Put {
            bucket: batch.bucket.clone(),
            key: batch.progress_key(),
            body: event.to_json_vec(),
        };
        if self.progress_objects.try_send(object).is_err() {
            tracing::debug!(parent: &span, "progress objects pile up: this one is skipped");
        }
        let published = publish_event(
            cfg,
            &self.worker.metrics,
            &self.publisher,
            events::BATCH_PROGRESS,
            &event,
            &self.worker.webhook(&batch),
        )
        .instrument(span.clone())
        .await;
        if let Err(e) = published {
            tracing::warn!(parent: &span, error = %e, "could not publish batch.progress");
        }
    }

    /// Every image of message `seq` is stored: write the manifest and publish the event.
    fn complete(&mut self, seq: u64) {
        let Some(m) = self.ledger.get(seq) else {
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
                total_ms: ms(m.handle.started.elapsed()),
            },
            m.handle.redelivered,
        );
        let event = BatchCompleted {
            work_sha256: Some(m.work.to_string()),
            resumed_images: (m.resumed > 0).then_some(m.resumed),
            model_sha256: self.worker.gpu.info().model_sha256.clone(),
            ..event
        };
        let fut = finish_batch(
            self.worker.cfg.clone(),
            self.worker.metrics.clone(),
            self.worker.storage.clone(),
            self.publisher.clone(),
            event,
            m.batch.clone(),
            super::store::Announce {
                webhook: self.worker.webhook(&m.batch),
                // Its progress object goes once the manifest is there: when this delivery
                // reported progress, and on a redelivery, whose earlier delivery may have left
                // one (a resumed batch that finishes in one GPU batch reports nothing).
                progress: (m.progress.as_ref().is_some_and(|p| p.reported())
                    || m.handle.redelivered
                    || m.resumed > 0)
                    .then(|| self.progress_objects.clone()),
            },
        )
        .instrument(m.handle.span.clone());
        let tx = self.done_tx.clone();
        self.tasks.spawn(async move {
            let result = fut.await;
            let _ = tx.send(Done::Finished { seq, result });
        });
    }
}

/// The work ([`message::work_units`]) of one image of a GPU batch of `key`: the steps it runs
/// at its size. As [`message::image_work`] counts a message's images: a hires fix's second pass
/// runs the steps its strength leaves; img2img and inpainting count all their steps.
fn batch_work_per_image(key: &ShapeKey) -> f64 {
    let steps = match key.mode {
        crate::batching::Mode::HiresSecond { strength_bits, .. } => {
            message::steps_run(key.steps, f64::from_bits(strength_bits))
        }
        _ => key.steps,
    };
    message::work_units(1, steps, key.width, key.height)
}
