//! Webhooks: a batch whose message has `output.webhook: {"url": …}` gets every event the worker
//! publishes for it on the events exchange POSTed to that URL as well, the same JSON bytes,
//! signed ([`sign`]), retried with backoff for a bounded time ([`deliver`]), and only to hosts the
//! worker allows ([`policy`]). docs/webhooks.md is the receiver's side.
//!
//! Delivery never holds up the batch: [`WebhookSender::enqueue`] returns at once (the event is
//! already confirmed on the exchange, the message is acked independently) and the delivery runs
//! on a task of its own. Each delivery has its own task, rather than one queue worked in order,
//! so that a receiver that is down (retried for up to `give_up`) does not delay the others. What
//! waits is bounded: at most `max_pending` deliveries and `max_pending_bytes` of bodies; beyond
//! that an event is dropped and counted, never waited for. Deliveries live in memory only: a
//! worker that exits (after waiting a few seconds for them) loses those still pending; the events
//! exchange remains the durable record.
mod deliver;
pub mod policy;
pub mod sign;

pub use deliver::{Client, Lookup, Outcome, Resolve, Settings, SystemResolver, schedule};
pub use policy::{AllowEntry, MAX_URL_BYTES, Policy, Refusal, WebhookUrl};
pub use sign::{SIGNATURE_HEADER, Secret, VerifyError, verify};

use crate::config::defaults;
use crate::message::Batch;
use crate::metrics::Metrics;
use hyper::body::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

/// The worker's webhook settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub policy: Policy,
    /// The signing secret; without one the worker sends no webhooks.
    pub secret: Option<Secret>,
    pub settings: Settings,
    /// Deliveries waiting or in progress, at most; more are dropped.
    pub max_pending: usize,
    /// Their bodies' bytes, at most.
    pub max_pending_bytes: usize,
    /// Connections to receivers open at once, at most.
    pub max_connections: usize,
}

impl Default for WebhookConfig {
    /// No webhooks (an empty allow list, no secret), the default bounds.
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            secret: None,
            settings: Settings {
                timeout: Duration::from_secs(defaults::WEBHOOK_TIMEOUT_SECS),
                give_up: Duration::from_secs(defaults::WEBHOOK_GIVE_UP_SECS),
                min_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(300),
            },
            max_pending: 1024,
            max_pending_bytes: 64 << 20,
            max_connections: 32,
        }
    }
}

impl WebhookConfig {
    /// Whether this worker sends webhooks at all: an allow list and a secret.
    pub fn is_enabled(&self) -> bool {
        self.policy.is_enabled() && self.secret.is_some()
    }

    /// Whether the worker may send to `url` (checked when a message arrives; addresses a host
    /// resolves to are checked before every request).
    pub fn check_url(&self, url: &WebhookUrl) -> Result<(), Refusal> {
        if self.secret.is_none() {
            return Err(Refusal::Disabled);
        }
        self.policy.check_url(url)
    }
}

/// Hands events to their webhooks without waiting (see the module's documentation). Cheap to
/// clone: clones share the bounds and the connections.
#[derive(Clone)]
pub struct WebhookSender {
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

struct Inner {
    client: Client,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// Deliveries not yet over, for [`WebhookSender::wait_idle`].
    pending: watch::Sender<usize>,
}

impl WebhookSender {
    /// A sender for `cfg`, resolving names with the system's resolver.
    pub fn new(cfg: &WebhookConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_resolver(cfg, metrics, Arc::new(SystemResolver))
    }

    /// A sender resolving names with `resolver` (tests).
    pub fn with_resolver(
        cfg: &WebhookConfig,
        metrics: Arc<Metrics>,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        let inner = match (&cfg.secret, cfg.is_enabled()) {
            (Some(secret), true) => Some(Arc::new(Inner {
                client: Client::new(
                    cfg.policy.clone(),
                    secret.clone(),
                    cfg.settings,
                    cfg.max_connections,
                    resolver,
                    metrics.clone(),
                ),
                slots: Arc::new(Semaphore::new(cfg.max_pending)),
                bytes: Arc::new(Semaphore::new(
                    cfg.max_pending_bytes.min(Semaphore::MAX_PERMITS),
                )),
                pending: watch::Sender::new(0),
            })),
            _ => None,
        };
        Self { inner, metrics }
    }

    /// Starts delivering `body` (the event `event` exactly as published) to `url` and returns at
    /// once. A full queue drops the delivery (`outcome="dropped"`); a URL the policy refuses is
    /// not sent (`outcome="refused"`). Call it from within the tokio runtime.
    pub fn enqueue(&self, url: &WebhookUrl, event: &str, batch_id: Option<&str>, body: &[u8]) {
        let span = tracing::info_span!("webhook", batch_id, event, to = %url.origin());
        let _enter = span.enter();
        let count = |outcome: &str| {
            self.metrics
                .webhook_deliveries
                .with_label_values(&[outcome])
                .inc()
        };
        let Some(inner) = &self.inner else {
            count("refused");
            tracing::warn!("webhook not sent: this worker sends no webhooks");
            return;
        };
        let slot = inner.slots.clone().try_acquire_owned().ok();
        let bytes = u32::try_from(body.len())
            .ok()
            .and_then(|n| inner.bytes.clone().try_acquire_many_owned(n).ok());
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (Some(slot), Some(bytes), Some(runtime)) = (slot, bytes, runtime) else {
            count("dropped");
            tracing::warn!(
                bytes = body.len(),
                "webhook queue full: delivery dropped (the event is on the events exchange)"
            );
            return;
        };
        inner.pending.send_modify(|n| *n += 1);
        self.metrics.webhook_pending.inc();
        let (inner, metrics) = (inner.clone(), self.metrics.clone());
        let (url, event, body) = (url.clone(), event.to_string(), Bytes::copy_from_slice(body));
        runtime.spawn(
            async move {
                match inner.client.deliver(&url, &event, body).await {
                    Outcome::Delivered { attempts } => {
                        tracing::info!(attempts, "webhook delivered")
                    }
                    Outcome::GaveUp {
                        attempts,
                        last_error,
                    } => tracing::warn!(attempts, error = last_error, "webhook given up"),
                    Outcome::Refused(why) => tracing::warn!(why, "webhook refused"),
                }
                drop((slot, bytes));
                metrics.webhook_pending.dec();
                inner.pending.send_modify(|n| *n -= 1);
            }
            .instrument(span.clone()),
        );
    }

    /// Waits until every delivery handed over so far is over (delivered, given up or refused).
    pub async fn wait_idle(&self) {
        if let Some(inner) = &self.inner {
            let mut rx = inner.pending.subscribe();
            let _ = rx.wait_for(|n| *n == 0).await;
        }
    }
}

/// One batch's webhook, if its message had one: where the batch's events go besides the events
/// exchange. Every event the worker publishes for a batch takes its target, so a new event
/// cannot forget the webhook; [`Target::none`] for messages that never became a batch.
#[derive(Clone, Default)]
pub struct Target(Option<(WebhookSender, WebhookUrl, String)>);

impl Target {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn for_batch(sender: &WebhookSender, batch: &Batch) -> Self {
        Self(
            batch
                .webhook
                .clone()
                .map(|url| (sender.clone(), url, batch.batch_id.clone())),
        )
    }

    /// Hands `body`, the event `event` as published, to the webhook; returns at once.
    pub fn send(&self, event: &str, body: &[u8]) {
        if let Some((sender, url, batch_id)) = &self.0 {
            sender.enqueue(url, event, Some(batch_id), body);
        }
    }
}
