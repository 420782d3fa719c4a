//! `sdbatch worker`: consumes batch messages, generates their images on the model thread, uploads
//! PNGs and a manifest, publishes `batch.completed` with publisher confirms and only then acks.
//!
//! Failure handling:
//! - invalid message → copied to the dead-letter exchange with `x-sdbatch-error` /
//!   `x-sdbatch-reason` headers, `batch.failed` published, original acked;
//! - transient failure (storage, broker) → retried in-process with backoff; still failing → nack
//!   with requeue, and the quorum queue's delivery limit dead-letters a batch that keeps failing;
//! - redelivery of a batch whose manifest exists → no regeneration: the event is published again;
//! - lost connection → reconnect with backoff; unacked messages are redelivered by the broker;
//! - SIGTERM/SIGINT → stop consuming, finish the batch in hand within the grace period, exit.
pub mod gpu;

use crate::events::{self, BatchCompleted, BatchFailed, ImageRecord};
use crate::message::{self, Batch, Invalid, Limits};
use crate::output::encode_png;
use crate::queue::{self, Publisher, QueueError, Topology, header_int, header_value};
use crate::storage::{Storage, StorageError};
use backon::{ExponentialBuilder, Retryable};
use futures_lite::StreamExt;
use gpu::GpuExecutor;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// Everything the worker needs besides the model and the store.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Unacked messages the broker may hand this worker at once (basic.qos).
    pub prefetch: u16,
    pub worker_id: String,
    /// Model name recorded in events and metadata.
    pub model_name: String,
    pub limits: Limits,
    /// Images per GPU batch.
    pub max_batch: usize,
    /// How long a batch in hand may take to finish after SIGTERM.
    pub grace_period: Duration,
    /// Bounds of the reconnect backoff.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Attempts for publishing an event (each with a fresh confirm).
    pub publish_attempts: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Pipeline(#[from] crate::Error),
    #[error("the batch in hand did not finish within the {0:?} grace period")]
    GraceExpired(Duration),
    #[error("{0}")]
    Other(String),
}

/// How a connection's session ended.
enum SessionEnd {
    Shutdown,
    ConnectionLost(String),
}

pub struct Worker {
    cfg: WorkerConfig,
    gpu: Arc<GpuExecutor>,
    storage: Arc<Storage>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Worker {
    pub fn new(cfg: WorkerConfig, gpu: Arc<GpuExecutor>, storage: Arc<Storage>) -> Self {
        Self { cfg, gpu, storage }
    }

    /// Runs until `shutdown` turns true (then finishes the batch in hand) or a fatal error.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut delay = self.cfg.reconnect_min;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let started = Instant::now();
            match self.session(&mut shutdown).await {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(WorkerError::GraceExpired(d)) => return Err(WorkerError::GraceExpired(d)),
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
    ) -> Result<SessionEnd, WorkerError> {
        let cfg = &self.cfg;
        let conn =
            queue::connect(&cfg.amqp_url, &format!("sdbatch-worker {}", cfg.worker_id)).await?;
        let channel = conn.create_channel().await.map_err(QueueError::from)?;
        queue::declare(&channel, &cfg.topology).await?;
        channel
            .basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(QueueError::from)?;
        let publisher = Publisher::new(&conn).await?;
        let tag = format!("sdbatch-{}", cfg.worker_id);
        let mut consumer = channel
            .basic_consume(
                cfg.topology.jobs_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(QueueError::from)?;
        tracing::info!(
            broker = %queue::redact_url(&cfg.amqp_url),
            queue = %cfg.topology.jobs_queue,
            prefetch = cfg.prefetch,
            "consuming"
        );

        loop {
            let delivery = tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("shutdown requested: no batch in hand");
                        let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                        let _ = conn.close(200, "worker shutting down".into()).await;
                        return Ok(SessionEnd::Shutdown);
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => return Ok(SessionEnd::ConnectionLost("consumer stream ended".into())),
            };

            // The batch in hand runs to completion; a shutdown request meanwhile only starts the
            // grace-period clock and stops further deliveries.
            let work = self.handle_delivery(&publisher, delivery);
            tokio::pin!(work);
            let mut deadline: Option<tokio::time::Instant> = None;
            let outcome = loop {
                tokio::select! {
                    r = &mut work => break r,
                    changed = shutdown.changed(), if deadline.is_none() => {
                        if changed.is_err() || *shutdown.borrow() {
                            tracing::info!(grace = ?cfg.grace_period, "shutdown requested: finishing the batch in hand");
                            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                            deadline = Some(tokio::time::Instant::now() + cfg.grace_period);
                        }
                    }
                    _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                        return Err(WorkerError::GraceExpired(cfg.grace_period));
                    }
                }
            };
            if let Err(e) = outcome {
                // Acking or nacking failed: the channel is gone and the broker will redeliver.
                return Ok(SessionEnd::ConnectionLost(e.to_string()));
            }
            if deadline.is_some() || *shutdown.borrow() {
                let _ = conn.close(200, "worker shutting down".into()).await;
                return Ok(SessionEnd::Shutdown);
            }
        }
    }

    /// Processes one delivery and acks or nacks it. Errors only when the ack/nack itself failed.
    async fn handle_delivery(
        &self,
        publisher: &Publisher,
        delivery: Delivery,
    ) -> Result<(), WorkerError> {
        let span = tracing::info_span!(
            "batch",
            batch_id = tracing::field::Empty,
            tag = delivery.delivery_tag
        );
        async {
            let parsed = message::parse(&delivery.data, &self.cfg.limits, self.gpu.info().native_size);
            let batch = match parsed {
                Ok(b) => b,
                Err(invalid) => {
                    if let Some(id) = &invalid.batch_id {
                        tracing::Span::current().record("batch_id", id.as_str());
                    }
                    return self.reject_invalid(publisher, delivery, invalid).await;
                }
            };
            tracing::Span::current().record("batch_id", batch.batch_id.as_str());
            let previous_failures = header_int(&delivery.properties, "x-delivery-count").unwrap_or(0);
            match self.process(publisher, &batch, delivery.redelivered).await {
                Ok(()) => {
                    delivery.acker.ack(BasicAckOptions::default()).await.map_err(QueueError::from)?;
                    Ok(())
                }
                Err(e) => {
                    let last = previous_failures + 1 > i64::from(self.cfg.topology.delivery_limit);
                    tracing::error!(error = %e, previous_failures, last_attempt = last, "batch failed; requeueing");
                    if last {
                        // The broker dead-letters it on this nack: tell the producers.
                        self.publish_failed(publisher, Some(batch.batch_id.clone()), "delivery_limit", &e.to_string())
                            .await;
                    }
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                        .map_err(QueueError::from)?;
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Dead-letters an invalid message with its reason, publishes `batch.failed`, acks it.
    async fn reject_invalid(
        &self,
        publisher: &Publisher,
        delivery: Delivery,
        invalid: Invalid,
    ) -> Result<(), WorkerError> {
        tracing::warn!(reason = invalid.reason.as_str(), error = %invalid.message, "invalid message: dead-lettering");
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-sdbatch-error".into(),
            header_value(invalid.reason.as_str()),
        );
        headers.insert("x-sdbatch-reason".into(), header_value(&invalid.message));
        headers.insert("x-sdbatch-worker".into(), header_value(&self.cfg.worker_id));
        let t = &self.cfg.topology;
        let dead_lettered = publisher
            .publish_json(
                &t.dead_exchange,
                &t.dead_queue,
                &delivery.data,
                Some(headers),
                true,
            )
            .await;
        match dead_lettered {
            Ok(()) => {
                self.publish_failed(
                    publisher,
                    invalid.batch_id.clone(),
                    invalid.reason.as_str(),
                    &invalid.message,
                )
                .await;
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(QueueError::from)?;
            }
            Err(e) => {
                // Keep the message: it goes back to the queue and is rejected again later.
                tracing::error!(error = %e, "could not dead-letter the invalid message; requeueing");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(QueueError::from)?;
            }
        }
        Ok(())
    }

    async fn publish_failed(
        &self,
        publisher: &Publisher,
        batch_id: Option<String>,
        reason: &str,
        error: &str,
    ) {
        let event = BatchFailed::new(batch_id, reason, error, &self.cfg.worker_id);
        if let Err(e) = self
            .publish_event(publisher, events::BATCH_FAILED, &event)
            .await
        {
            tracing::error!(error = %e, "could not publish batch.failed");
        }
    }

    async fn publish_event<T: serde::Serialize>(
        &self,
        publisher: &Publisher,
        key: &str,
        event: &T,
    ) -> Result<(), WorkerError> {
        let body = serde_json::to_vec(event).map_err(|e| WorkerError::Other(e.to_string()))?;
        let exchange = self.cfg.topology.events_exchange.clone();
        (|| async {
            publisher
                .publish_json(&exchange, key, &body, None, false)
                .await
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(self.cfg.publish_attempts.saturating_sub(1))
                .with_jitter(),
        )
        .notify(
            |e, d| tracing::warn!(error = %e, retry_in = ?d, "publishing {key} failed; retrying"),
        )
        .await?;
        Ok(())
    }

    /// Generates, uploads and announces one valid batch.
    async fn process(
        &self,
        publisher: &Publisher,
        batch: &Batch,
        redelivered: bool,
    ) -> Result<(), WorkerError> {
        let started = Instant::now();
        let manifest_key = batch.manifest_key();
        if let Some(bytes) = self.storage.get(&batch.bucket, &manifest_key).await? {
            // Already done (a previous delivery crashed or lost its connection after uploading):
            // announce it again instead of regenerating.
            let mut event: BatchCompleted = serde_json::from_slice(&bytes).map_err(|e| {
                WorkerError::Other(format!("{manifest_key}: unreadable manifest: {e}"))
            })?;
            event.redelivered = true;
            tracing::info!("manifest exists: republishing batch.completed without regenerating");
            return self
                .publish_event(publisher, events::BATCH_COMPLETED, &event)
                .await;
        }

        let total = batch.total_images();
        tracing::info!(images = total, redelivered, "generating");
        let requests = batch.image_requests();
        let t_gen = Instant::now();
        let mut images = Vec::with_capacity(total);
        for chunk in requests.chunks(self.cfg.max_batch.max(1)) {
            let reqs = chunk.iter().map(|(_, _, r)| r.clone()).collect();
            let out = self.gpu.generate(reqs, batch.params.clone()).await?;
            images.extend(out.images);
        }
        let generate_ms = t_gen.elapsed().as_secs_f64() * 1e3;

        // PNG encoding is CPU work: off the async runtime.
        let t_enc = Instant::now();
        let pngs = tokio::task::spawn_blocking(move || -> crate::Result<Vec<Vec<u8>>> {
            images.iter().map(encode_png).collect()
        })
        .await
        .map_err(|e| WorkerError::Other(format!("PNG encoder task failed: {e}")))??;
        let encode_ms = t_enc.elapsed().as_secs_f64() * 1e3;

        let t_up = Instant::now();
        let mut records = Vec::with_capacity(total);
        for ((item_index, n, request), png) in requests.iter().zip(pngs) {
            let item = &batch.items[*item_index];
            let key = batch.image_key(&item.id, *n);
            let digest = sha256_hex(&png);
            let metadata = vec![
                ("sdbatch-batch-id".to_string(), batch.batch_id.clone()),
                ("sdbatch-item-id".to_string(), item.id.clone()),
                ("sdbatch-seed".to_string(), request.seed.to_string()),
                ("sdbatch-steps".to_string(), batch.params.steps.to_string()),
                (
                    "sdbatch-guidance".to_string(),
                    batch.params.guidance_scale.to_string(),
                ),
                (
                    "sdbatch-scheduler".to_string(),
                    batch.params.scheduler.name().to_string(),
                ),
                ("sdbatch-model".to_string(), self.cfg.model_name.clone()),
                (
                    "sdbatch-prompt-sha256".to_string(),
                    sha256_hex(request.prompt.as_bytes()),
                ),
            ];
            let bytes = png.len() as u64;
            self.storage
                .put(&batch.bucket, &key, png, "image/png", &metadata)
                .await?;
            records.push(ImageRecord {
                item_id: item.id.clone(),
                n: *n,
                bucket: batch.bucket.clone(),
                key,
                seed: request.seed,
                seed_derived: item.seed_derived,
                bytes,
                sha256: digest,
                width: batch.params.width as u32,
                height: batch.params.height as u32,
            });
        }
        let upload_ms = t_up.elapsed().as_secs_f64() * 1e3;

        let event = BatchCompleted::new(
            batch,
            records,
            &self.cfg.model_name,
            &self.cfg.worker_id,
            events::Timings {
                queue_wait_ms: None,
                generate_ms,
                encode_ms,
                upload_ms,
                total_ms: started.elapsed().as_secs_f64() * 1e3,
            },
            redelivered,
        );
        let manifest =
            serde_json::to_vec_pretty(&event).map_err(|e| WorkerError::Other(e.to_string()))?;
        // The manifest goes last: its presence means every image of the batch is stored.
        self.storage
            .put(
                &batch.bucket,
                &manifest_key,
                manifest,
                "application/json",
                &[],
            )
            .await?;
        self.publish_event(publisher, events::BATCH_COMPLETED, &event)
            .await?;
        tracing::info!(images = total, generate_ms, upload_ms, "batch completed");
        Ok(())
    }
}
