//! Cancelling a batch (`sdbatch cancel`): the wire formats and the decisions, without I/O.
//!
//! A cancel is two things, in this order:
//! 1. a **tombstone** object, `{prefix}/{batch_id}/cancelled.json` in the batch's bucket. Every
//!    worker looks for it before working on a delivery, so a message that arrives after its
//!    cancel (queued, redelivered, or delivered to a worker that was not connected at the time)
//!    is acked as cancelled without work;
//! 2. a **broadcast** of a [`CancelRequest`] on the control exchange (`{prefix}.control`,
//!    fanout). Every connected worker hears it and stops what it holds of the batch: its planned
//!    images are dropped, a GPU batch holding only its images stops between UNet steps (a GPU
//!    batch shared with other batches finishes, and only the others' images are kept), and once
//!    the uploads already started have reported, the message is acked and `batch.cancelled`
//!    says what was stored and what was not.
//!
//! The tombstone is written first so no worker can miss both: one that checked for the tombstone
//! before it was written already holds the message when the broadcast arrives.
use crate::events::{EVENT_SCHEMA_VERSION, now_rfc3339};
use crate::message::{check_prefix, is_valid_batch_id};
use crate::status::BatchStatus;
use serde::{Deserialize, Serialize};

/// The `command` of a [`CancelRequest`].
pub const CANCEL_COMMAND: &str = "batch.cancel";
/// The tombstone's object name inside the batch's folder.
pub const TOMBSTONE_NAME: &str = "cancelled.json";
/// A control message larger than this is not ours (a cancel is well under 1 KiB).
pub const MAX_CONTROL_BYTES: usize = 4096;

/// What `sdbatch cancel` broadcasts on the control exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub schema_version: u32,
    /// Always [`CANCEL_COMMAND`].
    pub command: String,
    pub batch_id: String,
    /// Where the batch stores its objects: a worker cancels only the message whose bucket and
    /// prefix match, as batch ids are unique per folder, not globally.
    pub bucket: String,
    pub prefix: String,
    /// RFC 3339 UTC.
    pub requested_at: String,
}

/// Why a control message was ignored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {0} bytes: over the {MAX_CONTROL_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("control message is not a cancel request: {0}")]
    Json(String),
    #[error("unknown control command")]
    UnknownCommand,
    #[error("cancel request with an invalid batch id, bucket or prefix")]
    InvalidTarget,
}

impl CancelRequest {
    pub fn new(batch_id: &str, bucket: &str, prefix: &str) -> Self {
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            command: CANCEL_COMMAND.to_string(),
            batch_id: batch_id.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            requested_at: now_rfc3339(),
        }
    }

    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a CancelRequest always serializes")
    }

    /// A control message off the wire, checked: bounded, ours, naming a valid batch folder.
    /// Anyone who may publish to the control exchange can cancel batches; this only keeps
    /// malformed messages from reaching the worker's matching.
    pub fn from_json(body: &[u8]) -> Result<Self, ControlError> {
        if body.len() > MAX_CONTROL_BYTES {
            return Err(ControlError::TooLarge(body.len()));
        }
        let request: CancelRequest = serde_json::from_slice(body)
            .map_err(|e| ControlError::Json(crate::bounded::reason(&e.to_string())))?;
        if request.command != CANCEL_COMMAND {
            return Err(ControlError::UnknownCommand);
        }
        if !is_valid_batch_id(&request.batch_id)
            || crate::storage::validate_bucket("cancel", &request.bucket).is_err()
            || check_prefix(&request.prefix).is_err()
        {
            return Err(ControlError::InvalidTarget);
        }
        Ok(request)
    }

    /// Whether this request is for the batch `batch_id` stored in `bucket` under `prefix`.
    pub fn targets(&self, batch_id: &str, bucket: &str, prefix: &str) -> bool {
        self.batch_id == batch_id && self.bucket == bucket && self.prefix == prefix
    }
}

/// The tombstone object's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub schema_version: u32,
    pub batch_id: String,
    /// Always `"cancelled"`.
    pub status: String,
    /// RFC 3339 UTC.
    pub requested_at: String,
}

impl Tombstone {
    pub fn for_request(request: &CancelRequest) -> Self {
        Self {
            schema_version: EVENT_SCHEMA_VERSION,
            batch_id: request.batch_id.clone(),
            status: "cancelled".to_string(),
            requested_at: request.requested_at.clone(),
        }
    }

    pub fn to_json_vec(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a Tombstone always serializes")
    }
}

/// What `sdbatch cancel` does for a batch in the state `status` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelDecision {
    /// Queued or running: write the tombstone and broadcast.
    Cancel,
    /// Already cancelled: broadcast again (harmless; reaches a worker that reconnected since)
    /// and say so.
    Repeat,
    /// Completed or failed: nothing to cancel; say so and change nothing.
    TooLate,
}

pub fn decide(status: &BatchStatus) -> CancelDecision {
    match status {
        BatchStatus::Queued { .. } | BatchStatus::Running { .. } => CancelDecision::Cancel,
        BatchStatus::Cancelled { .. } => CancelDecision::Repeat,
        BatchStatus::Completed { .. } | BatchStatus::Failed { .. } => CancelDecision::TooLate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_targets_its_folder_only() {
        let r = CancelRequest::new("b-1", "images", "shop/shoes");
        let back = CancelRequest::from_json(&r.to_json_vec()).unwrap();
        assert_eq!(back, r);
        assert!(back.targets("b-1", "images", "shop/shoes"));
        assert!(!back.targets("b-1", "images", ""));
        assert!(!back.targets("b-1", "other", "shop/shoes"));
        assert!(!back.targets("b-2", "images", "shop/shoes"));
    }

    #[test]
    fn malformed_control_messages_are_refused() {
        let big = vec![b' '; MAX_CONTROL_BYTES + 1];
        assert_eq!(
            CancelRequest::from_json(&big),
            Err(ControlError::TooLarge(MAX_CONTROL_BYTES + 1))
        );
        assert!(matches!(
            CancelRequest::from_json(b"{\"command\": 1}"),
            Err(ControlError::Json(_))
        ));
        let mut r = CancelRequest::new("b-1", "images", "");
        r.command = "batch.delete".into();
        assert_eq!(
            CancelRequest::from_json(&r.to_json_vec()),
            Err(ControlError::UnknownCommand)
        );
        for (id, bucket, prefix) in [
            ("../x", "images", ""),
            ("", "images", ""),
            ("b", "", ""),
            ("b", "Images", ""),
            ("b", "images", "/abs"),
            ("b", "images", "a/../b"),
        ] {
            let r = CancelRequest::new(id, bucket, prefix);
            assert_eq!(
                CancelRequest::from_json(&r.to_json_vec()),
                Err(ControlError::InvalidTarget),
                "{id:?} {bucket:?} {prefix:?}"
            );
        }
    }

    #[test]
    fn only_unfinished_batches_are_cancelled() {
        let id = || "b".to_string();
        assert_eq!(
            decide(&BatchStatus::Queued { batch_id: id() }),
            CancelDecision::Cancel
        );
        let running = BatchStatus::Running {
            batch_id: id(),
            images_done: 1,
            images_total: 4,
            eta_seconds: None,
            worker_id: "w".into(),
            updated_at: "t".into(),
        };
        assert_eq!(decide(&running), CancelDecision::Cancel);
        let cancelled = BatchStatus::Cancelled {
            batch_id: id(),
            requested_at: "t".into(),
        };
        assert_eq!(decide(&cancelled), CancelDecision::Repeat);
        let completed = BatchStatus::Completed {
            batch_id: id(),
            images: 1,
            keys: vec![],
            completed_at: "t".into(),
        };
        assert_eq!(decide(&completed), CancelDecision::TooLate);
        let failed = BatchStatus::Failed {
            batch_id: id(),
            reason: "steps".into(),
            detail: String::new(),
        };
        assert_eq!(decide(&failed), CancelDecision::TooLate);
    }
}
