//! What the session speaks to instead of lapin directly: a RabbitMQ connection, or the
//! [`MemoryBroker`] of a broker-less run. The session's logic (intake, the ledger, settling,
//! dead letters, events) is the same for both; only these few operations differ.
//!
//! Each AMQP operation runs under the broker timeout (a silent connection ends the session); the
//! in-memory ones return at once.
use super::memory::{MemoryBroker, MemoryDelivery, Ticket};
use crate::queue::{self, Lane, Publisher, QueueError, QueueResult, Topology, header_int};
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

/// A message handed to the worker, whichever the source.
pub(super) struct Delivery {
    pub tag: u64,
    pub data: Vec<u8>,
    pub lane: Lane,
    pub redelivered: bool,
    /// The quorum queue's `x-delivery-count` header (trusted only on a redelivery).
    pub delivery_count: Option<i64>,
    pub acker: Acker,
}

impl Delivery {
    /// A delivery from the queue of `lane` (known from the queue it was taken from, whatever
    /// routing key it was published with).
    pub fn from_amqp(d: lapin::message::Delivery, lane: Lane) -> Self {
        Self {
            tag: d.delivery_tag,
            lane,
            redelivered: d.redelivered,
            delivery_count: header_int(&d.properties, "x-delivery-count"),
            data: d.data,
            acker: Acker::Amqp(d.acker),
        }
    }

    pub fn from_memory(d: MemoryDelivery) -> Self {
        Self {
            tag: d.tag,
            data: d.body,
            lane: d.lane,
            redelivered: d.redelivered,
            delivery_count: d.delivery_count,
            acker: Acker::Memory(d.ticket),
        }
    }
}

/// Settles one delivery.
pub(super) enum Acker {
    Amqp(lapin::Acker),
    Memory(Ticket),
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

impl Acker {
    pub async fn ack(&self, limit: Duration) -> QueueResult<()> {
        match self {
            Acker::Amqp(a) => {
                let sent =
                    queue::within(limit, "basic.ack", a.ack(BasicAckOptions::default())).await?;
                delivered(sent, "basic.ack")
            }
            Acker::Memory(t) => t.ack(),
        }
    }

    /// The ack that follows the worker's own dead-letter copy (reason code `why`): a plain ack
    /// on RabbitMQ; the in-memory queue records the message as dead-lettered.
    pub async fn ack_copied(&self, limit: Duration, why: &str) -> QueueResult<()> {
        match self {
            Acker::Amqp(_) => self.ack(limit).await,
            Acker::Memory(t) => t.ack_copied(why),
        }
    }

    /// Nack with requeue: the queue delivers it again (and counts the delivery).
    pub async fn requeue(&self, limit: Duration) -> QueueResult<()> {
        match self {
            Acker::Amqp(a) => {
                let options = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let sent = queue::within(limit, "basic.nack", a.nack(options)).await?;
                delivered(sent, "basic.nack")
            }
            Acker::Memory(t) => t.requeue(),
        }
    }

    /// Reject without requeueing: the queue's dead-letter exchange takes the message as it is.
    pub async fn reject(&self, limit: Duration) -> QueueResult<()> {
        match self {
            Acker::Amqp(a) => {
                let options = BasicRejectOptions { requeue: false };
                let sent = queue::within(limit, "basic.reject", a.reject(options)).await?;
                delivered(sent, "basic.reject")
            }
            Acker::Memory(t) => t.reject(),
        }
    }
}

/// Where events and dead-letter copies are published (with confirms on AMQP). Clones share it.
#[derive(Clone)]
pub(super) enum EventSink {
    Amqp(Publisher),
    Memory(MemoryBroker),
}

impl EventSink {
    /// Publishes persistent JSON and waits for the confirm; `mandatory`: an unroutable message
    /// is an error.
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
        mandatory: bool,
    ) -> QueueResult<()> {
        match self {
            EventSink::Amqp(p) => {
                p.publish_json(exchange, routing_key, body, headers, mandatory)
                    .await
            }
            EventSink::Memory(b) => {
                b.publish(exchange, routing_key, body, headers_as_text(headers));
                Ok(())
            }
        }
    }
}

/// Headers as text, for the in-memory run's report.
fn headers_as_text(headers: Option<FieldTable>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .inner()
        .iter()
        .map(|(k, v)| {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                other => format!("{other:?}"),
            };
            (k.as_str().to_string(), text)
        })
        .collect()
}

/// The session's link to its messages: a channel on a connection, or the in-memory queue.
pub(super) enum Link {
    Amqp {
        /// Boxed: it is large, and the link is moved around.
        connection: Box<lapin::Connection>,
        channel: lapin::Channel,
    },
    Memory(MemoryBroker),
}

impl Link {
    /// Takes one ready message of `lane`, if it has one (`basic.get`).
    pub async fn pull(
        &self,
        lane: Lane,
        topology: &Topology,
        limit: Duration,
    ) -> QueueResult<Option<Delivery>> {
        match self {
            Link::Amqp { channel, .. } => {
                let got = queue::within(
                    limit,
                    "basic.get",
                    channel.basic_get(
                        topology.queue(lane).into(),
                        lapin::options::BasicGetOptions::default(),
                    ),
                )
                .await?;
                Ok(got.map(|m| Delivery::from_amqp(m.delivery, lane)))
            }
            Link::Memory(b) => Ok(b.pull(lane).map(Delivery::from_memory)),
        }
    }

    /// Whether the source is done once the worker holds nothing: no message ready (a requeue
    /// makes one ready again, and only the worker requeues). Never for a broker, whose queues
    /// can always receive more.
    pub fn exhausted(&self) -> bool {
        match self {
            Link::Amqp { .. } => false,
            Link::Memory(b) => b.nothing_ready(),
        }
    }

    /// Closes the connection at shutdown (best effort, within `limit`).
    pub async fn close(&self, limit: Duration) {
        if let Link::Amqp { connection, .. } = self {
            let _ =
                tokio::time::timeout(limit, connection.close(200, "worker shutting down".into()))
                    .await;
        }
    }
}

/// Control broadcasts (`sdbatch cancel`): a private queue on the control exchange, or none for an
/// in-memory run.
pub(super) enum Control {
    Amqp(lapin::Consumer),
    None,
}

impl Control {
    /// The next control message's body; never resolves for [`Control::None`]. `None` or an
    /// error: the consumer's channel is gone.
    pub async fn next(&mut self) -> Option<QueueResult<Vec<u8>>> {
        match self {
            Control::Amqp(consumer) => consumer
                .next()
                .await
                .map(|d| d.map(|d| d.data).map_err(QueueError::from)),
            Control::None => std::future::pending().await,
        }
    }
}
