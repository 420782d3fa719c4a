//! The broker side of taking messages in from the two lanes (which lane is
//! [`super::lanes::LanePolicy`]'s decision): one message pulled with `basic.get` from a given
//! lane ([`Link::pull`]), and, while both lanes are empty, a consumer on each lane that wakes the
//! worker up (here; an in-memory run waits on its queue instead).
//!
//! Why pull: RabbitMQ pushes to a consumer as many messages as its prefetch allows, in the order
//! of its own queue, and a prefetch is per consumer (quorum queues have no channel-wide
//! "global" prefetch). Two consumers would each need room of their own, so the worker would hold
//! up to twice what [`super::holding`] allows, and a push cannot say "high first". A pull takes
//! exactly one message from exactly the lane chosen, so the messages in hand keep the holding
//! bound and the order is the policy's. Waiting on empty lanes is push (prefetch 1 per lane) so
//! an idle worker does not poll; the first delivery cancels both consumers and pulling resumes.
use super::memory::MemoryBroker;
use super::transport::{Delivery, Link};
use crate::queue::{self, Lane, QueueError, QueueResult, Topology};
use futures_lite::StreamExt;
use lapin::Consumer;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::time::Duration;

struct LaneConsumer {
    tag: String,
    lane: Lane,
    consumer: Consumer,
}

impl LaneConsumer {
    async fn next(&mut self) -> Option<QueueResult<Delivery>> {
        let lane = self.lane;
        let next = self.consumer.next().await?;
        Some(
            next.map(|d| Delivery::from_amqp(d, lane))
                .map_err(QueueError::from),
        )
    }
}

/// The consumers that wait for a message while both lanes are empty (none otherwise).
#[derive(Default)]
pub(super) struct Waiting {
    consumers: Vec<LaneConsumer>,
    /// An in-memory run's queue, while waiting on it.
    memory: Option<MemoryBroker>,
}

impl Waiting {
    pub fn is_active(&self) -> bool {
        !self.consumers.is_empty() || self.memory.is_some()
    }

    /// Subscribes to both lanes with prefetch 1 each, tags `{tag}-{lane}`. While the worker
    /// holds less than its bound minus one this stays within it; at exactly one message of room,
    /// messages arriving on both lanes at the same moment can make it one over, for as long
    /// as the cancel takes (the worker then holds nothing more until it is back under).
    pub async fn subscribe(
        &mut self,
        link: &Link,
        topology: &Topology,
        tag: &str,
        arguments: FieldTable,
        limit: Duration,
    ) -> QueueResult<()> {
        let channel = match link {
            Link::Amqp { channel, .. } => channel,
            Link::Memory(broker) => {
                self.memory = Some(broker.clone());
                return Ok(());
            }
        };
        // basic.qos (not global) applies to the consumers subscribed after it on this channel.
        queue::within(
            limit,
            "basic.qos",
            channel.basic_qos(1, BasicQosOptions::default()),
        )
        .await?;
        for lane in Lane::ALL {
            let tag = format!("{tag}-{}", lane.as_str());
            let consumer = queue::within(
                limit,
                "basic.consume",
                channel.basic_consume(
                    topology.queue(lane).into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    arguments.clone(),
                ),
            )
            .await?;
            self.consumers.push(LaneConsumer {
                tag,
                lane,
                consumer,
            });
        }
        Ok(())
    }

    /// The next delivery of either lane; never resolves while none is subscribed. `None` or an
    /// error: the consumer's channel is gone.
    pub async fn next(&mut self) -> Option<QueueResult<Delivery>> {
        if let Some(broker) = &self.memory {
            return Some(Ok(Delivery::from_memory(broker.next_ready().await)));
        }
        match self.consumers.as_mut_slice() {
            [] => std::future::pending().await,
            [one] => one.next().await,
            [a, b, ..] => tokio::select! {
                d = a.next() => d,
                d = b.next() => d,
            },
        }
    }

    /// Cancels the consumers and returns what they delivered before the cancel took effect
    /// (lapin ends a consumer's stream after the deliveries that arrived before the cancel-ok):
    /// those are the worker's now and must be handled.
    pub async fn cancel(&mut self, link: &Link, limit: Duration) -> QueueResult<Vec<Delivery>> {
        self.memory = None;
        let mut delivered = Vec::new();
        let Link::Amqp { channel, .. } = link else {
            return Ok(delivered);
        };
        for mut c in std::mem::take(&mut self.consumers) {
            queue::within(
                limit,
                "basic.cancel",
                channel.basic_cancel(c.tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await?;
            loop {
                match tokio::time::timeout(limit, c.consumer.next()).await {
                    Ok(Some(Ok(delivery))) => delivered.push(Delivery::from_amqp(delivery, c.lane)),
                    Ok(Some(Err(e))) => return Err(e.into()),
                    Ok(None) => break,
                    Err(_) => {
                        return Err(QueueError::Timeout {
                            op: "basic.cancel (draining)",
                            limit,
                        });
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// Cancels the consumers without waiting for what is on its way (shutdown: deliveries not
    /// taken in stay unacked and go back to their queue when the connection closes).
    pub async fn abandon(&mut self, link: &Link, limit: Duration) {
        self.memory = None;
        let Link::Amqp { channel, .. } = link else {
            return;
        };
        for c in std::mem::take(&mut self.consumers) {
            let cancel = channel.basic_cancel(c.tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(limit, cancel).await;
        }
    }
}
