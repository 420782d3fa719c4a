//! A producer's view of one batch (`sdbatch status`): what its objects and the dead-letter queue
//! say, decided here without I/O. The manifest wins (the work is done, whatever else exists),
//! then a cancel's tombstone (`sdbatch cancel`; images stored before it stay), then a dead letter (the batch failed; a progress object may remain from the attempt), then a
//! progress object (running, or its worker stopped mid-way and the broker will redeliver it),
//! else the batch is queued, or was never submitted: nothing distinguishes the two without
//! reading the jobs queue.
use crate::cancel::Tombstone;
use crate::events::{BatchCompleted, BatchProgress};
use serde::Serialize;

/// What `status` reports for a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BatchStatus {
    Completed {
        batch_id: String,
        images: usize,
        /// `s3://bucket/key` of every stored image.
        keys: Vec<String>,
        completed_at: String,
    },
    Failed {
        batch_id: String,
        reason: String,
        detail: String,
    },
    Running {
        batch_id: String,
        images_done: usize,
        images_total: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_seconds: Option<f64>,
        worker_id: String,
        updated_at: String,
    },
    /// `sdbatch cancel` wrote its tombstone (the worker holding it may still be winding down).
    Cancelled {
        batch_id: String,
        requested_at: String,
    },
    /// No manifest, tombstone, progress object or dead letter.
    Queued { batch_id: String },
}

/// A dead letter's reason code and detail.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: String,
    pub detail: String,
}

/// The state of `batch_id` from what was found of it.
pub fn classify(
    batch_id: &str,
    manifest: Option<&BatchCompleted>,
    cancelled: Option<&Tombstone>,
    dead: Option<&DeadLetter>,
    progress: Option<&BatchProgress>,
) -> BatchStatus {
    let batch_id = batch_id.to_string();
    if let Some(m) = manifest {
        return BatchStatus::Completed {
            batch_id,
            images: m.images.len(),
            keys: m
                .images
                .iter()
                .filter(|i| !i.sha256.is_empty())
                .map(|i| format!("s3://{}/{}", i.bucket, i.key))
                .collect(),
            completed_at: m.completed_at.clone(),
        };
    }
    if let Some(t) = cancelled {
        return BatchStatus::Cancelled {
            batch_id,
            requested_at: t.requested_at.clone(),
        };
    }
    if let Some(d) = dead {
        return BatchStatus::Failed {
            batch_id,
            reason: d.reason.clone(),
            detail: d.detail.clone(),
        };
    }
    if let Some(p) = progress {
        return BatchStatus::Running {
            batch_id,
            images_done: p.images_done,
            images_total: p.images_total,
            eta_seconds: p.eta_seconds,
            worker_id: p.worker_id.clone(),
            updated_at: p.updated_at.clone(),
        };
    }
    BatchStatus::Queued { batch_id }
}

impl BatchStatus {
    /// One line for people (values are worker- or producer-supplied: the caller escapes them).
    pub fn line(&self) -> String {
        match self {
            BatchStatus::Completed {
                batch_id,
                images,
                completed_at,
                ..
            } => format!("{batch_id}: completed, {images} image(s), at {completed_at}"),
            BatchStatus::Failed {
                batch_id,
                reason,
                detail,
            } => format!("{batch_id}: failed ({reason}) {detail}"),
            BatchStatus::Running {
                batch_id,
                images_done,
                images_total,
                eta_seconds,
                worker_id,
                updated_at,
            } => {
                let eta = eta_seconds.map_or(String::new(), |e| format!(", about {e:.0} s left"));
                format!(
                    "{batch_id}: running, {images_done}/{images_total} image(s){eta} \
                     (worker {worker_id}, as of {updated_at})"
                )
            }
            BatchStatus::Cancelled {
                batch_id,
                requested_at,
            } => format!("{batch_id}: cancelled (requested at {requested_at})"),
            BatchStatus::Queued { batch_id } => {
                format!("{batch_id}: queued (or unknown: no manifest, progress or dead letter)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{BATCH_COMPLETED, EventParams, ImageRecord, Timings};

    fn record(key: &str, sha: &str) -> ImageRecord {
        ImageRecord {
            item_id: "a".into(),
            n: 0,
            bucket: "images".into(),
            key: key.into(),
            seed: 1,
            seed_derived: false,
            bytes: 3,
            sha256: sha.into(),
            width: 64,
            height: 64,
            nsfw: None,
            safety_action: None,
            clip_score: None,
            low_clip_score: None,
            init_image: None,
            init_image_sha256: None,
            mask_image: None,
            mask_image_sha256: None,
        }
    }

    fn manifest() -> BatchCompleted {
        BatchCompleted {
            schema_version: 1,
            event: BATCH_COMPLETED.into(),
            batch_id: "b".into(),
            status: "completed".into(),
            // A dropped image (safety policy) has no object.
            images: vec![record("b/a/0.png", "ab"), record("b/a/1.png", "")],
            params: EventParams {
                steps: 1,
                guidance_scale: 1.0,
                width: 64,
                height: 64,
                scheduler: "pndm".into(),
                preset: None,
                clip_skip: None,
                guidance_rescale: None,
                prompt_syntax: None,
                loras: None,
                strength: None,
                inpaint_strength: None,
                mask_blur: None,
                padding_mask_crop: None,
                hires: None,
            },
            model: "m".into(),
            worker_id: "w".into(),
            timings: Timings::default(),
            completed_at: "2026-11-30T10:00:00.000Z".into(),
            redelivered: false,
            work_sha256: None,
            resumed_images: None,
            model_sha256: None,
        }
    }

    fn progress() -> BatchProgress {
        BatchProgress {
            schema_version: 1,
            event: crate::events::BATCH_PROGRESS.into(),
            batch_id: "b".into(),
            status: "running".into(),
            images_done: 1,
            images_total: 3,
            bucket: "images".into(),
            keys: vec!["b/a/0.png".into()],
            images_per_second: Some(0.5),
            eta_seconds: Some(4.0),
            worker_id: "w".into(),
            updated_at: "2026-11-30T10:00:00.000Z".into(),
        }
    }

    #[test]
    fn the_manifest_wins_then_a_tombstone_then_a_dead_letter_then_progress() {
        let dead = DeadLetter {
            reason: "delivery_limit".into(),
            detail: "failed on every delivery".into(),
        };
        let (m, p) = (manifest(), progress());
        let tombstone = Tombstone {
            schema_version: 1,
            batch_id: "b".into(),
            status: "cancelled".into(),
            requested_at: "2026-11-30T10:00:01.000Z".into(),
        };
        let completed = classify("b", Some(&m), Some(&tombstone), Some(&dead), Some(&p));
        assert_eq!(
            completed,
            BatchStatus::Completed {
                batch_id: "b".into(),
                images: 2,
                keys: vec!["s3://images/b/a/0.png".into()],
                completed_at: "2026-11-30T10:00:00.000Z".into(),
            }
        );
        let cancelled = classify("b", None, Some(&tombstone), Some(&dead), Some(&p));
        assert_eq!(
            cancelled,
            BatchStatus::Cancelled {
                batch_id: "b".into(),
                requested_at: "2026-11-30T10:00:01.000Z".into()
            }
        );
        assert!(
            cancelled.line().contains("cancelled"),
            "{}",
            cancelled.line()
        );
        assert!(matches!(
            classify("b", None, None, Some(&dead), Some(&p)),
            BatchStatus::Failed { reason, .. } if reason == "delivery_limit"
        ));
        let running = classify("b", None, None, None, Some(&p));
        assert!(
            matches!(
                running,
                BatchStatus::Running {
                    images_done: 1,
                    images_total: 3,
                    ..
                }
            ),
            "{running:?}"
        );
        assert!(running.line().contains("1/3"), "{}", running.line());
        assert_eq!(
            classify("b", None, None, None, None),
            BatchStatus::Queued {
                batch_id: "b".into()
            }
        );
        // The JSON form names the state.
        let v = serde_json::to_value(&running).unwrap();
        assert_eq!(v["status"], "running");
        assert_eq!(v["eta_seconds"], 4.0);
    }
}
