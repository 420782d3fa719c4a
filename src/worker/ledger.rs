//! The worker's bookkeeping of the messages in hand, with no I/O: which images wait for the GPU,
//! which are on their way to storage, when a message is complete, and how a message that is over
//! is settled (ack, dead-letter, requeue). The session shell (`session.rs`) feeds it what happened
//! (a delivery admitted, a GPU batch back, an upload back, a manifest written) and carries out what
//! it answers, so every decision here is unit-tested without a broker, a store or a model.
//!
//! A message goes through: admitted (its images not stored by an earlier delivery are queued in
//! the [`Planner`]) → its images generated in GPU batches shared with other messages → each image
//! stored → [`Next::Complete`] (the shell writes the manifest and publishes the event) →
//! [`Ledger::finished`] → settled. A failure on the way marks the message failed: its waiting
//! images are dropped, generated ones are no longer stored, and it is settled once the uploads
//! already started have reported, so nothing of it lands after the verdict. A cancel
//! ([`Ledger::cancel`]) winds a message down the same way and settles it as
//! [`Verdict::Cancelled`]; GPU batches none of whose images are wanted any more are named by
//! [`Ledger::unwanted_gpu_jobs`] so the shell can stop them between UNet steps.
use super::WorkerError;
use crate::batching::{ImageInputs, Mode, PlannedBatch, Planner, ShapeKey, hires_second_params};
use crate::events::ImageRecord;
use crate::message::{Batch, ItemMode};
use crate::pipeline::hires::FirstPass;
use crate::pipeline::{GenerateParams, ImageRequest};
use std::collections::HashMap;
use std::sync::Arc;

/// Where one image's result goes: (message sequence number, image index in the message).
pub type Tag = (u64, usize);

/// GPU batches queued on the model thread at once: one running, one ready, so it never waits.
pub const GPU_QUEUE_DEPTH: usize = 2;

/// A valid delivery the shell has checked (not done before, no conflict) and wants worked on.
pub struct Admission {
    pub batch: Arc<Batch>,
    /// The batch's [`Batch::work_sha256`].
    pub work: Arc<str>,
    /// Every image of the batch, in order: (item index, image number, request).
    pub requests: Vec<(usize, u32, ImageRequest)>,
    /// Per request, the record of the image an earlier delivery already stored.
    pub records: Vec<Option<ImageRecord>>,
    /// Run the safety checker on this message's images.
    pub safety: bool,
    /// Failed deliveries before this one (see `previous_failures`).
    pub previous_failures: i64,
    /// Work of one image, both passes of a hires fix ([`crate::message::image_work`]).
    pub units_per_image: f64,
    /// Per item of the batch, its decoded init image and mask (img2img, inpainting). Empty
    /// when no item has one.
    pub inputs: Vec<ImageInputs>,
}

/// A message in hand. `handle` is the shell's (broker handle, body, tracing span, clock).
pub struct Message<H> {
    pub handle: H,
    pub batch: Arc<Batch>,
    pub work: Arc<str>,
    pub requests: Vec<(usize, u32, ImageRequest)>,
    pub records: Vec<Option<ImageRecord>>,
    pub safety: bool,
    pub previous_failures: i64,
    /// Images an earlier delivery had stored (taken over, not generated).
    pub resumed: usize,
    /// When it reports `batch.progress` (set by the session on its first stored image).
    pub progress: Option<crate::progress::Throttle>,
    pub generate_ms: f64,
    pub encode_ms: f64,
    pub upload_ms: f64,
    /// Images not yet stored.
    remaining: usize,
    /// Upload tasks started and not yet reported back.
    uploads_pending: usize,
    /// The consumer (generation) that delivered it.
    consumer_gen: u64,
    /// Images not yet back from the GPU (planned or generating): the work still to do.
    ungenerated: usize,
    units_per_image: f64,
    /// Set once the message failed; the first failure is the one reported.
    failure: Option<WorkerError>,
}

impl<H> Message<H> {
    /// Whether its images in a GPU batch are hires first passes (not what it stores): they are
    /// unless the batch runs second passes.
    fn first_pass_in(&self, second_pass_job: bool) -> bool {
        self.batch.hires.is_some() && !second_pass_job
    }

    /// An upload or the GPU failed for it: it will be settled as failed, not completed.
    pub fn is_failing(&self) -> bool {
        self.failure.is_some()
    }
}

impl<H> Message<H> {
    /// Keys this delivery stored (dropped images have no object).
    fn stored_keys(&self) -> Vec<String> {
        self.records
            .iter()
            .flatten()
            .filter(|r| r.bytes > 0)
            .map(|r| r.key.clone())
            .collect()
    }
}

/// How a message whose work is over leaves the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ack,
    /// Retrying cannot help: delete what it stored, dead-letter it at once with this reason.
    DeadLetter {
        reason: &'static str,
    },
    /// Transient: nack with requeue. On the last allowed delivery `batch.failed` is published
    /// first (the queue's delivery limit dead-letters it).
    Requeue {
        last_attempt: bool,
    },
    /// The broker connection is gone: nothing can be settled; the broker redelivers.
    Abandon,
    /// Cancelled (`sdbatch cancel`): publish `batch.cancelled`, ack. What it stored stays.
    Cancelled,
}

/// The verdict for a message that ended with `result` after `previous_failures` failed
/// deliveries, under the queue's `delivery_limit`.
pub fn verdict(
    result: &Result<(), WorkerError>,
    previous_failures: i64,
    delivery_limit: u32,
) -> Verdict {
    match result {
        Ok(()) => Verdict::Ack,
        Err(WorkerError::Queue(_)) => Verdict::Abandon,
        Err(WorkerError::Cancelled) => Verdict::Cancelled,
        Err(e) => match e.permanent_reason() {
            Some(reason) => Verdict::DeadLetter { reason },
            None => Verdict::Requeue {
                last_attempt: is_last_attempt(previous_failures, delivery_limit),
            },
        },
    }
}

/// Whether this delivery is the last one the queue allows.
pub fn is_last_attempt(previous_failures: i64, delivery_limit: u32) -> bool {
    previous_failures.saturating_add(1) > i64::from(delivery_limit)
}

/// A message taken out of the ledger to be settled.
pub struct Settled<H> {
    pub message: Message<H>,
    pub result: Result<(), WorkerError>,
    pub verdict: Verdict,
    /// Keys this delivery stored (the manifest included once written): deleted on a dead letter.
    pub stored: Vec<String>,
}

/// What the shell does next for a message.
pub enum Next<H> {
    /// Every image is stored: write the manifest and publish `batch.completed`, then report
    /// back with [`Ledger::finished`].
    Complete(u64),
    Settle(Box<Settled<H>>),
}

/// The planner's mode of the images of `batch.items[item]`.
fn mode_of(batch: &Batch, item: usize) -> Mode {
    match batch.mode(&batch.items[item]) {
        // A hires fix's first pass; its second is queued when the first comes back.
        ItemMode::Txt2Img => batch
            .hires
            .as_ref()
            .map_or(Mode::Txt2Img, Mode::hires_first),
        ItemMode::Img2Img(strength) => Mode::img2img(strength),
        ItemMode::Inpaint(strength) => {
            Mode::inpaint(strength, batch.mask_blur, batch.padding_mask_crop)
        }
    }
}

/// A GPU batch for the model thread.
pub struct GpuJob {
    /// Names it to [`Ledger::gpu_succeeded`], [`Ledger::gpu_failed`] and
    /// [`Ledger::unwanted_gpu_jobs`].
    pub id: u64,
    pub key: ShapeKey,
    pub params: GenerateParams,
    pub tags: Vec<Tag>,
    pub requests: Vec<ImageRequest>,
    /// One per request, in order: what it starts from (empty for txt2img and a hires fix's
    /// first pass).
    pub inputs: Vec<ImageInputs>,
    /// Any of its messages asked for the safety checker (one pass for the whole batch; each
    /// message uses the verdicts only if it asked).
    pub safety: bool,
}

/// A GPU batch queued or running.
struct JobState {
    tags: Vec<Tag>,
    /// It runs hires fixes' second passes; otherwise the images of hires messages in it are
    /// first passes, which come back to the planner rather than to storage.
    second_pass: bool,
}

/// What became of the images of a GPU batch that succeeded, by position in the batch.
#[derive(Debug, Default, PartialEq)]
pub struct GpuReturn {
    /// Final images: store them.
    pub store: Vec<(usize, Tag)>,
    /// Hires fixes' first passes: hand them back with [`Ledger::queue_second_passes`].
    pub first_passes: Vec<(usize, Tag)>,
}

/// The messages in hand of one broker session and the work in progress for them.
pub struct Ledger<H> {
    messages: HashMap<u64, Message<H>>,
    planner: Planner<Tag>,
    next_seq: u64,
    /// GPU batches queued or running, by id, with their images.
    gpu_jobs: HashMap<u64, JobState>,
    next_job: u64,
    gpu_images: usize,
    /// Images generated and not yet stored (all messages).
    pending_images: usize,
    /// Numbers the consumers of the session; a message remembers which one delivered it.
    consumer_gen: u64,
    delivery_limit: u32,
    max_pending_images: usize,
}

impl<H> Ledger<H> {
    pub fn new(delivery_limit: u32, max_pending_images: usize) -> Self {
        Self {
            messages: HashMap::new(),
            planner: Planner::default(),
            next_seq: 0,
            gpu_jobs: HashMap::new(),
            next_job: 0,
            gpu_images: 0,
            pending_images: 0,
            consumer_gen: 0,
            delivery_limit,
            max_pending_images,
        }
    }

    pub fn get(&self, seq: u64) -> Option<&Message<H>> {
        self.messages.get(&seq)
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Message<H>> {
        self.messages.get_mut(&seq)
    }

    /// Messages in hand.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// No message in hand and nothing on the model thread.
    pub fn is_idle(&self) -> bool {
        self.messages.is_empty() && self.gpu_jobs.is_empty()
    }

    /// Images on the GPU, generated and not yet stored, or halfway (a hires fix's first pass
    /// waiting for its second): what `max_pending_images` bounds.
    pub fn images_in_flight(&self) -> usize {
        self.gpu_images + self.pending_images + self.planner.second_passes_waiting()
    }

    /// Work not yet generated, over all messages in hand (what holding bounds).
    pub fn ungenerated_units(&self) -> f64 {
        self.messages
            .values()
            .map(|m| m.ungenerated as f64 * m.units_per_image)
            .sum()
    }

    /// The current consumer's number.
    pub fn consumer_gen(&self) -> u64 {
        self.consumer_gen
    }

    /// A new consumer subscribes: later deliveries are counted as its own.
    pub fn next_consumer(&mut self) -> u64 {
        self.consumer_gen += 1;
        self.consumer_gen
    }

    /// Messages in hand delivered by the current consumer (its prefetch counts only those).
    pub fn from_current_consumer(&self) -> usize {
        self.messages
            .values()
            .filter(|m| m.consumer_gen == self.consumer_gen)
            .count()
    }

    /// Takes a message in hand and queues its images that are not stored yet. Returns its
    /// sequence number and, when an earlier delivery stored everything, [`Next::Complete`].
    pub fn admit(&mut self, handle: H, a: Admission) -> (u64, Option<Next<H>>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let resumed = a.records.iter().flatten().count();
        let remaining = a.requests.len() - resumed;
        let batch = &a.batch;
        self.planner.push_with(
            &batch.params,
            a.requests
                .iter()
                .enumerate()
                .filter(|(i, _)| a.records[*i].is_none())
                .map(|(i, (item, _, r))| {
                    let inputs = a.inputs.get(*item).cloned().unwrap_or_default();
                    ((seq, i), r.clone(), mode_of(batch, *item), inputs)
                }),
        );
        self.messages.insert(
            seq,
            Message {
                handle,
                batch: a.batch,
                work: a.work,
                requests: a.requests,
                records: a.records,
                safety: a.safety,
                previous_failures: a.previous_failures,
                resumed,
                progress: None,
                generate_ms: 0.0,
                encode_ms: 0.0,
                upload_ms: 0.0,
                remaining,
                uploads_pending: 0,
                consumer_gen: self.consumer_gen,
                ungenerated: remaining,
                units_per_image: a.units_per_image,
                failure: None,
            },
        );
        // Every image was stored by an earlier delivery; only the manifest is missing.
        let next = (remaining == 0).then_some(Next::Complete(seq));
        (seq, next)
    }

    /// The next GPU batch, if the model thread has room and host memory allows: `size_for` says
    /// how many images of a shape fit the device. Images generated but not yet stored are
    /// bounded by `max_pending_images`, so a slow store holds the GPU back rather than filling
    /// RAM (one batch may always run when none wait).
    pub fn next_gpu_batch(&mut self, size_for: impl Fn(&ShapeKey) -> usize) -> Option<GpuJob> {
        if self.gpu_jobs.len() >= GPU_QUEUE_DEPTH {
            return None;
        }
        let next = self.planner.next_key()?;
        let size = size_for(next);
        // A second pass only moves images already in flight on: never held back (holding it
        // back could leave the first passes waiting for it to fill the bound for good).
        let waiting = self.images_in_flight();
        if !next.mode.is_second_pass() && waiting > 0 && waiting + size > self.max_pending_images {
            return None;
        }
        let PlannedBatch {
            key,
            params,
            images,
        } = self.planner.next_batch(size)?;
        let tags: Vec<Tag> = images.iter().map(|i| i.tag).collect();
        let inputs: Vec<ImageInputs> = images.iter().map(|i| i.inputs.clone()).collect();
        let requests: Vec<ImageRequest> = images.into_iter().map(|i| i.request).collect();
        // Only final images are checked: a hires fix's first pass is not what gets stored.
        let second_pass = key.mode.is_second_pass();
        let safety = tags.iter().any(|(seq, _)| {
            self.messages
                .get(seq)
                .is_some_and(|m| m.safety && !m.first_pass_in(second_pass))
        });
        let id = self.next_job;
        self.next_job += 1;
        self.gpu_jobs.insert(
            id,
            JobState {
                tags: tags.clone(),
                second_pass,
            },
        );
        self.gpu_images += requests.len();
        Some(GpuJob {
            id,
            key,
            params,
            tags,
            requests,
            inputs,
            safety,
        })
    }

    /// A GPU batch is back (either way): its images are no longer on the GPU, and those that
    /// were final (not a hires fix's first pass) no longer work to do. Returns, per image,
    /// whether it was a first pass.
    fn gpu_returned(&mut self, job: u64, tags: &[Tag]) -> Vec<bool> {
        let second_pass = self.gpu_jobs.remove(&job).is_some_and(|j| j.second_pass);
        self.gpu_images -= tags.len();
        tags.iter()
            .map(|(seq, _)| {
                let Some(m) = self.messages.get_mut(seq) else {
                    return false;
                };
                let first_pass = m.first_pass_in(second_pass);
                if !first_pass {
                    m.ungenerated = m.ungenerated.saturating_sub(1);
                }
                first_pass
            })
            .collect()
    }

    /// A GPU batch generated its images (in `tags` order) in `total_ms`. Returns which to store
    /// and which are first passes to queue again, as (position in the batch, tag); those of
    /// failed messages are left out.
    pub fn gpu_succeeded(&mut self, job: u64, tags: &[Tag], total_ms: f64) -> GpuReturn {
        let first_passes = self.gpu_returned(job, tags);
        let per_image_ms = total_ms / tags.len().max(1) as f64;
        let mut out = GpuReturn::default();
        for ((position, &tag), first_pass) in tags.iter().enumerate().zip(first_passes) {
            let Some(m) = self.messages.get_mut(&tag.0) else {
                continue;
            };
            if m.failure.is_some() {
                continue; // its message failed: nothing more of it is stored
            }
            m.generate_ms += per_image_ms;
            if first_pass {
                out.first_passes.push((position, tag));
            } else {
                m.uploads_pending += 1;
                self.pending_images += 1;
                out.store.push((position, tag));
            }
        }
        out
    }

    /// Queues the second passes of hires fixes whose first passes came back (see
    /// [`GpuReturn::first_passes`]), ahead of new work. Those of messages that failed meanwhile
    /// are dropped. A first pass that is missing (`None`: the model returned fewer results than
    /// requests) fails its message, which is returned when it can be settled, rather than leave
    /// it waiting for an image that will never come.
    pub fn queue_second_passes(
        &mut self,
        first_passes: Vec<(Tag, Option<Arc<FirstPass>>)>,
    ) -> Vec<Settled<H>> {
        let mut settle = Vec::new();
        for (tag, first) in first_passes {
            let Some(m) = self.messages.get(&tag.0) else {
                continue;
            };
            let (Some(hires), None) = (m.batch.hires.as_ref(), m.failure.as_ref()) else {
                continue;
            };
            let second = hires_second_params(&m.batch.params, hires);
            let (Some(first), Some(second)) = (first, second) else {
                let error = WorkerError::Other(format!(
                    "no first pass came back for image {} of the hires fix",
                    tag.1
                ));
                settle.extend(self.fail(tag.0, error));
                continue;
            };
            let request = m.requests[tag.1].2.clone();
            self.planner
                .push_second_pass(&second, hires, [(tag, request, first)]);
        }
        settle
    }

    /// A GPU batch failed. Only a batch of one message's images proves the failure is that
    /// message's; otherwise every message in it gets a transient failure
    /// ([`WorkerError::SharedGpu`]).
    pub fn gpu_failed(&mut self, job: u64, tags: &[Tag], error: WorkerError) -> Vec<Settled<H>> {
        self.gpu_returned(job, tags);
        let mut seqs: Vec<u64> = tags.iter().map(|t| t.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        if let [seq] = seqs[..] {
            return self.fail(seq, error).into_iter().collect();
        }
        let text = error.to_string();
        seqs.into_iter()
            .filter_map(|seq| self.fail(seq, WorkerError::SharedGpu(text.clone())))
            .collect()
    }

    /// A GPU batch the shell stopped (see [`Self::unwanted_gpu_jobs`]) is back without images:
    /// its messages are all failing or cancelled, and those that waited only for it settle now.
    pub fn gpu_stopped(&mut self, job: u64, tags: &[Tag]) -> Vec<Settled<H>> {
        self.gpu_returned(job, tags);
        let mut seqs: Vec<u64> = tags.iter().map(|t| t.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.into_iter()
            .filter_map(|seq| self.settle_if_failed(seq))
            .collect()
    }

    /// Cancels message `seq` (`sdbatch cancel`): like a failure, its planned images are dropped
    /// and those the GPU returns are not stored, and it is settled as [`Verdict::Cancelled`] once
    /// the uploads already started have reported. Returns `None` and changes nothing when it is
    /// too late (every image is stored: it completes) or it already fails (that verdict stands);
    /// else `Some` with the settlement when nothing is pending.
    pub fn cancel(&mut self, seq: u64) -> Option<Option<Settled<H>>> {
        let m = self.messages.get(&seq)?;
        if m.remaining == 0 || m.failure.is_some() {
            return None;
        }
        Some(self.fail(seq, WorkerError::Cancelled))
    }

    /// The messages in hand for batch `batch_id` stored in `bucket` under `prefix`.
    pub fn find_batch(&self, batch_id: &str, bucket: &str, prefix: &str) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| {
                m.batch.batch_id == batch_id && m.batch.bucket == bucket && m.batch.prefix == prefix
            })
            .map(|(seq, _)| *seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// GPU batches queued or running of which no image will be stored (every message in them
    /// failed or was cancelled): stopping them loses nothing. A batch shared with a message that
    /// still wants its images is not among them; it finishes.
    pub fn unwanted_gpu_jobs(&self) -> Vec<u64> {
        let mut jobs: Vec<u64> = self
            .gpu_jobs
            .iter()
            .filter(|(_, job)| {
                job.tags
                    .iter()
                    .all(|(seq, _)| self.messages.get(seq).is_none_or(|m| m.failure.is_some()))
            })
            .map(|(id, _)| *id)
            .collect();
        jobs.sort_unstable();
        jobs
    }

    /// An upload reported back: the record with encode and upload ms, or its error.
    pub fn upload_done(
        &mut self,
        (seq, index): Tag,
        result: Result<(ImageRecord, f64, f64), WorkerError>,
    ) -> Option<Next<H>> {
        self.pending_images -= 1;
        let m = self.messages.get_mut(&seq)?;
        m.uploads_pending -= 1;
        match result {
            Ok((record, encode_ms, upload_ms)) => {
                m.records[index] = Some(record);
                m.remaining -= 1;
                m.encode_ms += encode_ms;
                m.upload_ms += upload_ms;
                if m.failure.is_none() && m.remaining == 0 {
                    return Some(Next::Complete(seq));
                }
                self.settle_if_failed(seq)
                    .map(|s| Next::Settle(Box::new(s)))
            }
            Err(e) => self.fail(seq, e).map(|s| Next::Settle(Box::new(s))),
        }
    }

    /// The manifest and event of a complete message are done (or failed): settle it.
    pub fn finished(&mut self, seq: u64, result: Result<(), WorkerError>) -> Option<Settled<H>> {
        let m = self.messages.remove(&seq)?;
        let mut stored = m.stored_keys();
        // A manifest that was written belongs to the batch too.
        stored.push(m.batch.manifest_key());
        Some(Settled {
            verdict: verdict(&result, m.previous_failures, self.delivery_limit),
            message: m,
            result,
            stored,
        })
    }

    /// Message `seq` failed: its waiting images are dropped; it is settled once its pending
    /// uploads have reported (now, when none are pending). The first failure is the one reported.
    pub fn fail(&mut self, seq: u64, error: WorkerError) -> Option<Settled<H>> {
        let m = self.messages.get_mut(&seq)?;
        if m.failure.is_none() {
            let dropped = self.planner.remove_where(|t| t.0 == seq);
            m.ungenerated = m.ungenerated.saturating_sub(dropped);
            tracing::debug!(dropped, error = %error, "dropping the failed message's waiting images");
            m.failure = Some(error);
        }
        self.settle_if_failed(seq)
    }

    fn settle_if_failed(&mut self, seq: u64) -> Option<Settled<H>> {
        let ready = self
            .messages
            .get(&seq)
            .is_some_and(|m| m.failure.is_some() && m.uploads_pending == 0);
        if !ready {
            return None;
        }
        let mut m = self.messages.remove(&seq)?;
        let error = m
            .failure
            .take()
            .unwrap_or_else(|| WorkerError::Other("failed".into()));
        let result = Err(error);
        Some(Settled {
            verdict: verdict(&result, m.previous_failures, self.delivery_limit),
            stored: m.stored_keys(),
            message: m,
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Limits, parse};
    use crate::queue::QueueError;
    use crate::storage::StorageError;
    use crate::worker::gpu::GpuError;
    use crate::worker::reasons;
    use std::time::Duration;

    const LIMIT: u32 = 3;

    /// A batch of `images` images (one item) with its own id and shape (`steps`).
    fn admission(id: &str, images: u32, steps: u32) -> Admission {
        admission_with(id, images, serde_json::json!({"steps": steps}))
    }

    /// [`admission`] with these `params`.
    fn admission_with(id: &str, images: u32, params: serde_json::Value) -> Admission {
        let body = serde_json::json!({"schema_version": 1, "batch_id": id,
            "items": [{"id": "a", "prompt": "p", "num_images": images}],
            "params": params});
        let limits = Limits {
            default_bucket: Some("images".into()),
            ..Limits::default()
        };
        let batch = parse(&serde_json::to_vec(&body).unwrap(), &limits, 64).unwrap();
        let requests = batch.image_requests();
        Admission {
            records: vec![None; requests.len()],
            work: batch.work_sha256().into(),
            batch: Arc::new(batch),
            requests,
            safety: false,
            previous_failures: 0,
            units_per_image: 1.0,
            inputs: Vec::new(),
        }
    }

    fn record(a: &Admission, index: usize) -> ImageRecord {
        let (item, n, _) = a.requests[index];
        ImageRecord {
            bytes: 10,
            ..ImageRecord::planned(&a.batch, item, n)
        }
    }

    fn stored(ledger: &Ledger<&'static str>, tag: Tag) -> (ImageRecord, f64, f64) {
        let m = ledger.get(tag.0).unwrap();
        let (item, n, _) = m.requests[tag.1];
        let r = ImageRecord {
            bytes: 10,
            ..ImageRecord::planned(&m.batch, item, n)
        };
        (r, 1.0, 2.0)
    }

    fn refused() -> WorkerError {
        WorkerError::Storage(StorageError::permanent("put", "b/k", "HTTP 403"))
    }

    fn down() -> WorkerError {
        WorkerError::Storage(StorageError::transient("put", "b/k", "connection refused"))
    }

    fn settled(next: Option<Next<&'static str>>) -> Settled<&'static str> {
        match next {
            Some(Next::Settle(s)) => *s,
            Some(Next::Complete(seq)) => panic!("expected a settle, got Complete({seq})"),
            None => panic!("expected a settle, got nothing"),
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&Ok(()), 0, LIMIT), Verdict::Ack);
        let lost = Err(WorkerError::Queue(QueueError::Timeout {
            op: "basic.ack",
            limit: Duration::from_secs(1),
        }));
        assert_eq!(verdict(&lost, 0, LIMIT), Verdict::Abandon);
        assert_eq!(
            verdict(&Err(refused()), 0, LIMIT),
            Verdict::DeadLetter {
                reason: reasons::STORAGE_REFUSED
            }
        );
        let oom = Err(WorkerError::Gpu(GpuError::OutOfMemory("x".into())));
        assert_eq!(
            verdict(&oom, 0, LIMIT),
            Verdict::DeadLetter {
                reason: reasons::GENERATION_FAILED
            }
        );
        for (failures, last_attempt) in [(0, false), (2, false), (3, true), (i64::MAX, true)] {
            assert_eq!(
                verdict(&Err(down()), failures, LIMIT),
                Verdict::Requeue { last_attempt },
                "{failures}"
            );
        }
    }

    #[test]
    fn a_message_goes_from_admitted_to_acked() {
        let mut l = Ledger::new(LIMIT, 256);
        let (seq, next) = l.admit("m", admission("b1", 3, 5));
        assert!(next.is_none());
        assert_eq!(l.ungenerated_units(), 3.0);
        let job = l.next_gpu_batch(|_| 2).unwrap();
        assert_eq!(job.tags, vec![(seq, 0), (seq, 1)]);
        assert!(!job.safety);
        let store = l.gpu_succeeded(job.id, &job.tags, 100.0).store;
        assert_eq!(store, vec![(0, (seq, 0)), (1, (seq, 1))]);
        assert_eq!(l.ungenerated_units(), 1.0);
        assert_eq!(l.get(seq).unwrap().generate_ms, 100.0);
        let r = stored(&l, (seq, 0));
        assert!(l.upload_done((seq, 0), Ok(r)).is_none());
        let job = l.next_gpu_batch(|_| 2).unwrap();
        assert_eq!(job.tags, vec![(seq, 2)]);
        assert!(l.next_gpu_batch(|_| 2).is_none(), "nothing left to plan");
        assert_eq!(
            l.gpu_succeeded(job.id, &job.tags, 50.0).store,
            vec![(0, (seq, 2))]
        );
        let r = stored(&l, (seq, 2));
        assert!(l.upload_done((seq, 2), Ok(r)).is_none());
        let r = stored(&l, (seq, 1));
        assert!(matches!(l.upload_done((seq, 1), Ok(r)), Some(Next::Complete(s)) if s == seq));
        assert!(!l.is_idle(), "in hand until the manifest is written");
        let s = l.finished(seq, Ok(())).unwrap();
        assert_eq!(s.verdict, Verdict::Ack);
        assert_eq!(s.message.handle, "m");
        assert_eq!(s.message.records.iter().flatten().count(), 3);
        assert_eq!(s.message.encode_ms, 3.0);
        assert_eq!(s.message.upload_ms, 6.0);
        assert!(s.stored.contains(&s.message.batch.manifest_key()));
        assert!(l.is_idle());
        assert!(l.finished(seq, Ok(())).is_none(), "settled once");
    }

    #[test]
    fn a_hires_fix_runs_as_two_gpu_batches_of_two_shapes() {
        use crate::pipeline::RgbImage;
        let mut l = Ledger::new(LIMIT, 3);
        let hires = serde_json::json!({"steps": 5, "width": 256, "height": 256,
            "hires": {"scale": 2, "steps": 4, "strength": 0.5, "upscaler": "lanczos"}});
        let mut with_safety = admission_with("h", 2, hires);
        with_safety.safety = true;
        let (h, _) = l.admit("h", with_safety);
        let (p, _) = l.admit(
            "p",
            admission_with(
                "p",
                2,
                serde_json::json!({"steps": 5, "width": 256, "height": 256}),
            ),
        );
        assert_eq!(l.ungenerated_units(), 4.0);
        // The first passes (txt2img at 256²) share a batch with the plain message's images.
        let first = l.next_gpu_batch(|_| 3).unwrap();
        assert_eq!(first.tags, vec![(h, 0), (h, 1), (p, 0)]);
        assert_eq!((first.key.width, first.key.mode), (256, Mode::Txt2Img));
        assert!(!first.safety, "first passes are not checked");
        // Three images in flight fill the bound of 3: p1 waits.
        assert!(l.next_gpu_batch(|_| 3).is_none());
        let back = l.gpu_succeeded(first.id, &first.tags, 30.0);
        assert_eq!(back.store, vec![(2, (p, 0))]);
        assert_eq!(back.first_passes, vec![(0, (h, 0)), (1, (h, 1))]);
        assert_eq!(
            l.ungenerated_units(),
            3.0,
            "a first pass is not the image yet"
        );
        let image = |v: u8| {
            Arc::new(FirstPass::Image(RgbImage {
                width: 256,
                height: 256,
                pixels: vec![v; 256 * 256 * 3],
            }))
        };
        assert!(
            l.queue_second_passes(vec![((h, 0), Some(image(0))), ((h, 1), Some(image(1)))])
                .is_empty()
        );
        assert_eq!(
            l.images_in_flight(),
            3,
            "p0's upload and two halfway images"
        );
        // The second passes go first, at 512² with 4 steps, although the bound is full.
        let second = l.next_gpu_batch(|_| 3).unwrap();
        assert_eq!(second.tags, vec![(h, 0), (h, 1)]);
        assert_eq!(
            (second.key.width, second.params.height, second.params.steps),
            (512, 512, 4)
        );
        assert!(second.key.mode.is_second_pass());
        assert!(second.safety, "the images h stores are");
        assert_eq!(second.inputs[1].first_pass, Some(image(1)));
        assert!(l.next_gpu_batch(|_| 3).is_none(), "p1 still waits for room");
        let back = l.gpu_succeeded(second.id, &second.tags, 20.0);
        assert_eq!(back.store, vec![(0, (h, 0)), (1, (h, 1))]);
        assert!(back.first_passes.is_empty());
        assert_eq!(l.ungenerated_units(), 1.0);
        assert_eq!(
            l.get(h).unwrap().generate_ms,
            40.0,
            "10 ms per first pass, 10 per second"
        );
        for i in 0..2 {
            let r = stored(&l, (h, i));
            let next = l.upload_done((h, i), Ok(r));
            assert_eq!(matches!(next, Some(Next::Complete(s)) if s == h), i == 1);
        }
    }

    #[test]
    fn a_message_that_fails_between_the_passes_drops_its_second_passes() {
        let mut l = Ledger::new(LIMIT, 256);
        let hires = serde_json::json!({"steps": 5,
            "hires": {"scale": 1.5, "steps": 4, "strength": 0.5, "upscaler": "latent"}});
        let (h, _) = l.admit("h", admission_with("h", 3, hires));
        let first = l.next_gpu_batch(|_| 2).unwrap();
        assert_eq!(first.key.mode, Mode::Txt2Latents);
        let rest = l.next_gpu_batch(|_| 2).unwrap();
        let back = l.gpu_succeeded(first.id, &first.tags, 1.0);
        let latents = |i: usize| {
            Arc::new(FirstPass::Latents(crate::pipeline::hires::LatentImage {
                shape: [4, 1, 1],
                kind: tch::Kind::Float,
                values: vec![i as f32; 4],
            }))
        };
        let firsts = back
            .first_passes
            .iter()
            .map(|&(i, t)| (t, Some(latents(i))));
        assert!(l.queue_second_passes(firsts.collect()).is_empty());
        assert_eq!(l.images_in_flight(), 3);
        assert!(
            l.fail(h, down()).is_some(),
            "nothing of it was being stored"
        );
        assert_eq!(l.images_in_flight(), 1, "its second passes are gone");
        let back = l.gpu_succeeded(rest.id, &rest.tags, 1.0);
        assert_eq!(back, GpuReturn::default());
        assert!(
            l.queue_second_passes(vec![((h, 2), Some(latents(2)))])
                .is_empty()
        );
        assert!(l.next_gpu_batch(|_| 2).is_none());
        assert!(l.is_idle());

        // A first pass the model did not return fails its message at once.
        let hires = serde_json::json!({"steps": 5,
            "hires": {"scale": 2, "steps": 4, "strength": 0.5, "upscaler": "latent"}});
        l.admit("g", admission_with("g", 1, hires));
        let job = l.next_gpu_batch(|_| 2).unwrap();
        let back = l.gpu_succeeded(job.id, &job.tags, 1.0);
        let settled = l.queue_second_passes(vec![(back.first_passes[0].1, None)]);
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].message.handle, "g");
        assert!(matches!(settled[0].verdict, Verdict::Requeue { .. }));
        assert!(l.is_idle());
    }

    #[test]
    fn a_cancel_drops_planned_images_stops_unwanted_gpu_batches_and_keeps_what_was_stored() {
        let mut l = Ledger::new(LIMIT, 256);
        let (a, _) = l.admit("a", admission("a", 5, 5));
        let (b, _) = l.admit("b", admission("b", 2, 5));
        // [a0 a1] alone, [a2 a3 a4 b0] shared; b1 waits.
        let only_a = l.next_gpu_batch(|_| 2).unwrap();
        let shared = l.next_gpu_batch(|_| 4).unwrap();
        assert_eq!(shared.tags, vec![(a, 2), (a, 3), (a, 4), (b, 0)]);
        assert!(l.unwanted_gpu_jobs().is_empty());
        // a0 and a1 came back before the cancel: a0 is stored, a1's upload is under way.
        assert_eq!(
            l.gpu_succeeded(only_a.id, &only_a.tags, 10.0).store.len(),
            2
        );
        let r = stored(&l, (a, 0));
        assert!(l.upload_done((a, 0), Ok(r)).is_none());

        assert_eq!(l.find_batch("a", "images", ""), vec![a]);
        assert!(l.find_batch("a", "other", "").is_empty());
        assert!(l.find_batch("a", "images", "p").is_empty());
        let pending = l.cancel(a).expect("cancellable");
        assert!(pending.is_none(), "a1's upload has not reported");
        assert!(l.cancel(a).is_none(), "cancelled once");
        // The shared batch still has b0 to store: it runs on.
        assert!(l.unwanted_gpu_jobs().is_empty());
        let s = settled(l.upload_done((a, 1), Ok(stored(&l, (a, 1)))));
        assert_eq!(s.verdict, Verdict::Cancelled);
        assert!(matches!(s.result, Err(WorkerError::Cancelled)));
        assert_eq!(s.stored.len(), 2, "what was stored stays and is reported");
        // Only b's images are stored from the shared batch.
        assert_eq!(
            l.gpu_succeeded(shared.id, &shared.tags, 40.0).store,
            vec![(3, (b, 0))]
        );
        let last = l.next_gpu_batch(|_| 4).unwrap();
        assert_eq!(last.tags, vec![(b, 1)], "a's planned images were dropped");

        // A batch of a cancelled message alone is unwanted, and stopping it settles nothing
        // more (the message settled already).
        let (c, _) = l.admit("c", admission("c", 2, 5));
        let job_c = l.next_gpu_batch(|_| 2).unwrap();
        assert!(l.unwanted_gpu_jobs().is_empty());
        let now = l.cancel(c).expect("cancellable");
        assert_eq!(now.unwrap().verdict, Verdict::Cancelled, "nothing pending");
        assert_eq!(l.unwanted_gpu_jobs(), vec![job_c.id]);
        assert!(l.gpu_stopped(job_c.id, &job_c.tags).is_empty());
        assert!(l.unwanted_gpu_jobs().is_empty());
    }

    #[test]
    fn a_cancel_comes_too_late_for_a_complete_or_failing_message() {
        let mut l = Ledger::new(LIMIT, 256);
        let (seq, _) = l.admit("m", admission("done", 1, 5));
        let job = l.next_gpu_batch(|_| 1).unwrap();
        l.gpu_succeeded(job.id, &job.tags, 1.0);
        let r = stored(&l, (seq, 0));
        assert!(matches!(
            l.upload_done((seq, 0), Ok(r)),
            Some(Next::Complete(_))
        ));
        assert!(l.cancel(seq).is_none(), "its manifest is being written");
        assert_eq!(l.finished(seq, Ok(())).unwrap().verdict, Verdict::Ack);

        let (seq, _) = l.admit("m", admission("failing", 2, 5));
        let job = l.next_gpu_batch(|_| 2).unwrap();
        l.gpu_succeeded(job.id, &job.tags, 1.0);
        let failed = l.upload_done((seq, 0), Err(refused()));
        assert!(failed.is_none(), "waits for the other upload");
        assert!(l.cancel(seq).is_none(), "the failure stands");
        let s = settled(l.upload_done((seq, 1), Ok(stored(&l, (seq, 1)))));
        assert!(matches!(s.verdict, Verdict::DeadLetter { .. }));
        assert!(l.cancel(99).is_none(), "unknown message");
    }

    #[test]
    fn gpu_batches_cross_messages_and_are_bounded() {
        let mut l = Ledger::new(LIMIT, 5);
        let (a, _) = l.admit("a", admission("a", 2, 5));
        let (b, _) = l.admit("b", admission("b", 3, 5));
        let (c, _) = l.admit("c", admission("c", 1, 7)); // another shape
        let mut safe = admission("d", 1, 5);
        safe.safety = true;
        let (d, _) = l.admit("d", safe);
        let first = l.next_gpu_batch(|_| 3).unwrap();
        assert_eq!(first.tags, vec![(a, 0), (a, 1), (b, 0)]);
        // 3 on the GPU; another 3 would exceed the 5 pending images allowed.
        assert!(l.next_gpu_batch(|_| 3).is_none());
        let second = l.next_gpu_batch(|_| 2).unwrap();
        assert_eq!(second.tags, vec![(b, 1), (b, 2)]);
        assert!(!second.safety);
        // Two batches queued: the model thread is full whatever the size.
        assert!(l.next_gpu_batch(|_| 1).is_none());
        assert_eq!(l.images_in_flight(), 5);
        l.gpu_succeeded(first.id, &first.tags, 30.0);
        l.gpu_succeeded(second.id, &second.tags, 20.0);
        // 5 images wait for storage: no new batch until some are stored.
        assert!(l.next_gpu_batch(|_| 1).is_none());
        let r = stored(&l, (a, 0));
        l.upload_done((a, 0), Ok(r));
        // The sizer's size counts, not the images that happen to wait: 4 more would not fit.
        assert!(l.next_gpu_batch(|_| 4).is_none());
        let third = l.next_gpu_batch(|_| 1).unwrap();
        assert_eq!(third.tags, vec![(c, 0)], "oldest waiting image first");
        let r = stored(&l, (a, 1));
        l.upload_done((a, 1), Ok(r));
        let fourth = l.next_gpu_batch(|_| 1).unwrap();
        assert_eq!(fourth.tags, vec![(d, 0)]);
        assert!(fourth.safety);
    }

    #[test]
    fn resumed_images_are_not_generated_again() {
        let mut l = Ledger::new(LIMIT, 256);
        let mut a = admission("b1", 3, 5);
        a.records[1] = Some(record(&a, 1));
        let (seq, next) = l.admit("m", a);
        assert!(next.is_none());
        assert_eq!(l.get(seq).unwrap().resumed, 1);
        assert_eq!(l.ungenerated_units(), 2.0);
        let job = l.next_gpu_batch(|_| 8).unwrap();
        assert_eq!(job.tags, vec![(seq, 0), (seq, 2)]);

        // Everything stored before: complete at once.
        let mut all = admission("b2", 2, 5);
        all.records = vec![Some(record(&all, 0)), Some(record(&all, 1))];
        let (seq2, next) = l.admit("n", all);
        assert!(matches!(next, Some(Next::Complete(s)) if s == seq2));
        let s = l.finished(seq2, Ok(())).unwrap();
        assert_eq!(s.verdict, Verdict::Ack);
    }

    #[test]
    fn a_failed_upload_waits_for_the_others_then_dead_letters_what_was_stored() {
        let mut l = Ledger::new(LIMIT, 256);
        let (seq, _) = l.admit("m", admission("b1", 4, 5));
        let job = l.next_gpu_batch(|_| 3).unwrap();
        l.gpu_succeeded(job.id, &job.tags, 30.0);
        let r = stored(&l, (seq, 0));
        assert!(l.upload_done((seq, 0), Ok(r)).is_none());
        // The store refuses image 1 while image 2 is still uploading: no verdict yet, and the
        // waiting image 3 is dropped.
        assert!(l.upload_done((seq, 1), Err(refused())).is_none());
        assert!(
            l.next_gpu_batch(|_| 3).is_none(),
            "its waiting image is dropped"
        );
        assert_eq!(l.ungenerated_units(), 0.0);
        let r = stored(&l, (seq, 2));
        let s = settled(l.upload_done((seq, 2), Ok(r)));
        assert_eq!(
            s.verdict,
            Verdict::DeadLetter {
                reason: reasons::STORAGE_REFUSED
            }
        );
        let m = &s.message;
        assert_eq!(
            s.stored,
            vec![m.batch.image_key("a", 0), m.batch.image_key("a", 2)],
            "what it stored is deleted"
        );
        assert!(l.is_idle());
    }

    #[test]
    fn images_of_a_failed_message_are_not_stored() {
        let mut l = Ledger::new(LIMIT, 256);
        let (a, _) = l.admit("a", admission("a", 2, 5));
        let (b, _) = l.admit("b", admission("b", 2, 5));
        let job = l.next_gpu_batch(|_| 8).unwrap();
        assert_eq!(job.tags.len(), 4);
        // Message a fails (a transient store error of an earlier image, say) while the batch runs.
        let s = l.fail(a, down()).unwrap();
        assert_eq!(
            s.verdict,
            Verdict::Requeue {
                last_attempt: false
            }
        );
        assert_eq!(s.message.handle, "a");
        assert!(s.stored.is_empty());
        assert!(l.fail(a, refused()).is_none(), "settled once");
        let store = l.gpu_succeeded(job.id, &job.tags, 40.0).store;
        assert_eq!(store, vec![(2, (b, 0)), (3, (b, 1))]);
    }

    #[test]
    fn gpu_failures_blame_a_message_only_when_the_batch_was_all_its_own() {
        let mut l = Ledger::new(LIMIT, 256);
        let (a, _) = l.admit("a", admission("a", 1, 5));
        let (b, _) = l.admit("b", admission("b", 1, 5));
        let shared = l.next_gpu_batch(|_| 8).unwrap();
        let oom = || WorkerError::Gpu(GpuError::OutOfMemory("CUDA out of memory".into()));
        let mut settled = l.gpu_failed(shared.id, &shared.tags, oom());
        settled.sort_by_key(|s| s.message.handle);
        assert_eq!(settled.len(), 2);
        for s in &settled {
            assert_eq!(
                s.verdict,
                Verdict::Requeue {
                    last_attempt: false
                }
            );
            assert!(matches!(s.result, Err(WorkerError::SharedGpu(_))));
        }
        assert_eq!(
            (settled[0].message.handle, settled[1].message.handle),
            ("a", "b")
        );
        let _ = (a, b);

        let mut own = admission("c", 1, 5);
        own.previous_failures = 3;
        let (c, _) = l.admit("c", own);
        let job = l.next_gpu_batch(|_| 8).unwrap();
        assert_eq!(job.tags, vec![(c, 0)]);
        let s = l.gpu_failed(job.id, &job.tags, oom()).pop().unwrap();
        assert_eq!(
            s.verdict,
            Verdict::DeadLetter {
                reason: reasons::GENERATION_FAILED
            }
        );
        let (d, _) = {
            let mut last = admission("d", 1, 5);
            last.previous_failures = 3;
            l.admit("d", last)
        };
        let job = l.next_gpu_batch(|_| 8).unwrap();
        let panicked = WorkerError::Gpu(GpuError::Panicked("boom".into()));
        let s = l.gpu_failed(job.id, &job.tags, panicked).pop().unwrap();
        assert_eq!(s.message.handle, "d");
        assert_eq!(s.verdict, Verdict::Requeue { last_attempt: true });
        let _ = d;
        assert!(l.is_idle());
    }

    #[test]
    fn a_failed_manifest_is_settled_with_the_manifest_among_what_was_stored() {
        let mut l = Ledger::new(LIMIT, 256);
        let (seq, _) = l.admit("m", admission("b1", 1, 5));
        let job = l.next_gpu_batch(|_| 8).unwrap();
        l.gpu_succeeded(job.id, &job.tags, 1.0);
        let r = stored(&l, (seq, 0));
        assert!(matches!(
            l.upload_done((seq, 0), Ok(r)),
            Some(Next::Complete(_))
        ));
        let s = l.finished(seq, Err(refused())).unwrap();
        assert_eq!(
            s.verdict,
            Verdict::DeadLetter {
                reason: reasons::STORAGE_REFUSED
            }
        );
        assert_eq!(s.stored.len(), 2);
        assert_eq!(s.stored[1], s.message.batch.manifest_key());

        // A broker failure while publishing: nothing to settle on that channel.
        let (seq, _) = l.admit("n", admission("b2", 1, 5));
        let job = l.next_gpu_batch(|_| 8).unwrap();
        l.gpu_succeeded(job.id, &job.tags, 1.0);
        let r = stored(&l, (seq, 0));
        l.upload_done((seq, 0), Ok(r));
        let lost = WorkerError::Queue(QueueError::ChannelClosed {
            op: "basic.publish",
        });
        assert_eq!(
            l.finished(seq, Err(lost)).unwrap().verdict,
            Verdict::Abandon
        );
    }

    #[test]
    fn consumers_count_their_own_deliveries() {
        let mut l: Ledger<&str> = Ledger::new(LIMIT, 256);
        l.admit("a", admission("a", 1, 5));
        assert_eq!(l.from_current_consumer(), 1);
        assert_eq!(l.next_consumer(), 1);
        assert_eq!(l.from_current_consumer(), 0);
        l.admit("b", admission("b", 1, 5));
        l.admit("c", admission("c", 1, 5));
        assert_eq!((l.len(), l.from_current_consumer()), (3, 2));
        assert_eq!(l.consumer_gen(), 1);
    }
}
