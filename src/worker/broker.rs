//! The worker's side of the broker for one message: ack, nack, reject and event publishing, each
//! within the broker timeout, so a silent connection ends the session instead of hanging it
//! ([`super::transport`] carries them out on RabbitMQ or the in-memory queue).
use super::transport::{Acker, EventSink};
use super::{WorkerConfig, WorkerError};
use crate::events::{self, BatchFailed};
use crate::metrics::Metrics;
use crate::queue::{QueueError, QueueResult};
use crate::webhook::Target;
use backon::{ExponentialBuilder, Retryable};
use std::time::Duration;

/// Publishes an event with confirms, then hands the same bytes to the batch's webhook (which
/// returns at once: a webhook never holds up the ack). A publish the broker refused (nack,
/// unroutable) is retried with backoff; a broken or silent connection is not (the same channel
/// cannot recover): that error goes up and ends the session.
pub(super) async fn publish_event<T: serde::Serialize>(
    cfg: &WorkerConfig,
    metrics: &Metrics,
    publisher: &EventSink,
    key: &str,
    event: &T,
    webhook: &Target,
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
    webhook.send(key, &body);
    Ok(())
}

/// Publishes `batch.failed` ([`BatchFailed::new`] bounds the error text).
pub(super) async fn publish_failed(
    cfg: &WorkerConfig,
    metrics: &Metrics,
    publisher: &EventSink,
    batch_id: Option<String>,
    reason: &str,
    error: &str,
    webhook: &Target,
) -> Result<(), WorkerError> {
    let event = BatchFailed::new(batch_id, reason, error, &cfg.worker_id);
    publish_event(
        cfg,
        metrics,
        publisher,
        events::BATCH_FAILED,
        &event,
        webhook,
    )
    .await
}

/// The broker's view of one message: ack, nack (requeue) or reject, each within the broker
/// timeout.
pub(super) async fn ack(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    acker.ack(cfg.broker_timeout).await
}

pub(super) async fn requeue(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    acker.requeue(cfg.broker_timeout).await
}

/// Rejects without requeueing: the queue's dead-letter exchange takes the message as it is.
pub(super) async fn reject(cfg: &WorkerConfig, acker: &Acker) -> QueueResult<()> {
    acker.reject(cfg.broker_timeout).await
}

/// The failures a message has had before this delivery. `x-delivery-count` is the quorum queue's
/// count on a redelivery; on a first delivery it can only be the producer's, so it is ignored
/// (a producer-set i64::MAX once overflowed the arithmetic). Clamped to the delivery limit.
pub(super) fn previous_failures(
    redelivered: bool,
    header: Option<i64>,
    delivery_limit: u32,
) -> i64 {
    if !redelivered {
        return 0;
    }
    header.unwrap_or(0).clamp(0, i64::from(delivery_limit))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
