//! One image's way to storage (encoding in the batch's format with the generation parameters
//! embedded, off the runtime; upload with the metadata resuming reads back) and a complete
//! batch's manifest and event.
use super::broker::publish_event;
use super::gpu::GpuOutput;
use super::{ImageChecks, SafetyPolicy, WorkerConfig, WorkerError, resume};
use crate::events::{self, BatchCompleted, ImageRecord};
use crate::message::{Batch, ItemMode};
use crate::metrics::Metrics;
use crate::output::{Embedded, Infotext, a1111_parameters, encode};
use crate::pipeline::ImageRequest;
use crate::storage::Storage;
use crate::webhook::Target;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One generated image on its way to storage.
pub(super) struct ImageJob {
    pub(super) batch: Arc<Batch>,
    /// The batch's [`Batch::work_sha256`], recorded on the object for resuming.
    pub(super) work: Arc<str>,
    pub(super) item_index: usize,
    pub(super) n: u32,
    pub(super) request: ImageRequest,
    pub(super) image: crate::pipeline::RgbImage,
    pub(super) checks: ImageChecks,
    /// The model's content hash (the infotext's `Model hash`), when known.
    pub(super) model_sha256: Option<String>,
}

/// Encodes one image and uploads it with its metadata. Returns the record, encode and upload ms.
pub(super) async fn store_image(
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
        model_sha256,
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
    let parameters = a1111_parameters(&Infotext {
        prompt: &request.prompt,
        negative_prompt: request.negative_prompt.as_deref(),
        seed: request.seed,
        params: &batch.params,
        model: &cfg.model_name,
        model_sha256: model_sha256.as_deref(),
        // img2img and inpainting items record their strength, as A1111 does.
        denoising_strength: match batch.mode(item) {
            ItemMode::Txt2Img => None,
            ItemMode::Img2Img(strength) | ItemMode::Inpaint(strength) => Some(strength),
        },
        hires: batch.hires,
        mask_blur: matches!(batch.mode(item), ItemMode::Inpaint(_)).then_some(batch.mask_blur),
        padding_mask_crop: matches!(batch.mode(item), ItemMode::Inpaint(_))
            .then_some(batch.padding_mask_crop)
            .flatten(),
    });
    let embedded = embedded_record(
        &batch,
        &work,
        &request,
        &record,
        &cfg.model_name,
        model_sha256,
    )?;
    let encoding = batch.encoding;
    let ai_marking = cfg.ai_marking;
    let t0 = Instant::now();
    // Encoding is CPU work: off the async runtime.
    let png = tokio::task::spawn_blocking(move || {
        encode(
            &image,
            encoding,
            &Embedded {
                parameters: &parameters,
                record: Some(&embedded),
                ai_marking,
            },
        )
    })
    .await
    .map_err(|e| WorkerError::Other(format!("image encoder task failed: {e}")))??;
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
        .put(
            &batch.bucket,
            &record.key,
            png,
            batch.encoding.format.content_type(),
            &metadata,
        )
        .await?;
    Ok((record, encode_ms, ms(t1.elapsed())))
}

/// The JSON record a PNG embeds (`sdbatch` chunk): the image's event record without what only
/// the finished file can know (`bytes`, `sha256`), with the prompts, the batch's parameters as the
/// event states them, the model and the work hash. Nothing time-dependent, so the same work on
/// the same model gives the same bytes on every delivery.
fn embedded_record(
    batch: &Batch,
    work: &str,
    request: &ImageRequest,
    record: &ImageRecord,
    model: &str,
    model_sha256: Option<String>,
) -> Result<String, WorkerError> {
    let json_error = |e: serde_json::Error| WorkerError::Other(format!("image record: {e}"));
    let mut value = serde_json::to_value(record).map_err(json_error)?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("bytes");
        obj.remove("sha256");
        obj.insert("batch_id".into(), batch.batch_id.clone().into());
        obj.insert("prompt".into(), request.prompt.clone().into());
        if let Some(neg) = &request.negative_prompt {
            obj.insert("negative_prompt".into(), neg.clone().into());
        }
        let params = events::EventParams::from_batch(batch);
        obj.insert(
            "params".into(),
            serde_json::to_value(params).map_err(json_error)?,
        );
        obj.insert("model".into(), model.into());
        if let Some(hash) = model_sha256 {
            obj.insert("model_sha256".into(), hash.into());
        }
        obj.insert("work_sha256".into(), work.into());
    }
    serde_json::to_string(&value).map_err(json_error)
}

/// Where a completed batch's results go besides the manifest.
pub(super) struct Announce {
    pub webhook: Target,
    /// The progress writer, when the batch may have a progress object (it is then deleted).
    pub progress: Option<tokio::sync::mpsc::Sender<super::session::ProgressOp>>,
}

/// Deletes `batch`'s progress object once every report queued before now is written (so none
/// lands after the delete). Best effort: a leftover only makes `status` say running.
pub(super) async fn remove_progress_object(
    writer: &tokio::sync::mpsc::Sender<super::session::ProgressOp>,
    storage: &Storage,
    batch: &Batch,
) {
    let (done, flushed) = tokio::sync::oneshot::channel();
    if writer
        .send(super::session::ProgressOp::Flush(done))
        .await
        .is_ok()
    {
        let _ = flushed.await;
    }
    if let Err(e) = storage.delete(&batch.bucket, &batch.progress_key()).await {
        tracing::warn!(error = %e, "could not delete the progress object");
    }
}

/// Writes the manifest (last: its presence means every image is stored) and publishes the event.
pub(super) async fn finish_batch(
    cfg: Arc<WorkerConfig>,
    metrics: Arc<Metrics>,
    storage: Arc<Storage>,
    publisher: super::transport::EventSink,
    event: BatchCompleted,
    batch: Arc<Batch>,
    announce: Announce,
) -> Result<(), WorkerError> {
    let Announce { webhook, progress } = announce;
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
    // The progress object of a completed batch goes (status reads the manifest), after every
    // report queued before it was written: removed before the event, so a producer that saw
    // the event finds the batch's final objects only.
    if let Some(writer) = progress {
        remove_progress_object(&writer, &storage, &batch).await;
    }
    publish_event(
        &cfg,
        &metrics,
        &publisher,
        events::BATCH_COMPLETED,
        &event,
        &webhook,
    )
    .await
}

/// The checks' results for image `position` of a GPU batch, and the policy applied to it.
pub(super) fn image_checks(
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
