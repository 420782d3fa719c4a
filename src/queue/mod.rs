//! RabbitMQ: topology, connections, publishing with confirms, header helpers.
//!
//! Topology (declared idempotently by the worker at start-up and by `sdbatch topology`):
//! - exchange `sdbatch.jobs` (direct) → quorum queue `sdbatch.jobs`, with a delivery limit (a batch
//!   that keeps failing is dead-lettered instead of looping forever) and at-least-once
//!   dead-lettering to `sdbatch.dlx` → queue `sdbatch.jobs.dead`;
//! - the same exchange → quorum queue `sdbatch.jobs.high`, the high-priority lane, with the same
//!   arguments and the same dead-letter queue (routing key = queue name, as for the normal lane);
//! - exchange `sdbatch.events` (topic) for `batch.completed` / `batch.failed`.
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::future::Future;
use std::time::Duration;

/// Default time limit of one broker operation (a publish with its confirm, an ack, a declare).
/// RabbitMQ answers in milliseconds; a call still waiting after this is a dead connection whose
/// heartbeat has not noticed yet, and waiting longer would hang the caller.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one broker operation under `limit`; running out of time is [`QueueError::Timeout`].
pub async fn within<T, E>(
    limit: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> QueueResult<T>
where
    QueueError: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(QueueError::Timeout { op, limit }),
    }
}

/// Queue and exchange names plus the delivery limit; every name is configurable so several
/// deployments (or tests) can share one broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub jobs_exchange: String,
    /// The normal lane.
    pub jobs_queue: String,
    /// The high-priority lane ([`Lane::High`]): workers take from it first (see
    /// `worker::lanes`).
    pub jobs_high_queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub events_exchange: String,
    /// Fanout exchange of control messages to every connected worker (`sdbatch cancel`'s
    /// [`crate::cancel::CancelRequest`]). Each worker binds its own private queue.
    pub control_exchange: String,
    /// Deliveries after which the broker dead-letters a message (`x-delivery-limit`). RabbitMQ
    /// 3.10+ defaults quorum queues to unlimited redeliveries, so this is always set.
    pub delivery_limit: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Self::with_prefix("sdbatch")
    }
}

impl Topology {
    /// Names `{prefix}.jobs`, `{prefix}.jobs.high`, `{prefix}.dlx`, `{prefix}.jobs.dead`,
    /// `{prefix}.events`, `{prefix}.control`.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            jobs_exchange: format!("{prefix}.jobs"),
            jobs_queue: format!("{prefix}.jobs"),
            jobs_high_queue: format!("{prefix}.jobs.high"),
            dead_exchange: format!("{prefix}.dlx"),
            dead_queue: format!("{prefix}.jobs.dead"),
            events_exchange: format!("{prefix}.events"),
            control_exchange: format!("{prefix}.control"),
            delivery_limit: 3,
        }
    }

    /// The queue of `lane`; publishing to the jobs exchange with this routing key reaches it.
    pub fn queue(&self, lane: Lane) -> &str {
        match lane {
            Lane::Normal => &self.jobs_queue,
            Lane::High => &self.jobs_high_queue,
        }
    }

    /// The lane a queue name (or a routing key on the jobs exchange, which names its queue)
    /// belongs to; anything else is the normal lane.
    pub fn lane_of(&self, queue_or_routing_key: &str) -> Lane {
        if queue_or_routing_key == self.jobs_high_queue {
            Lane::High
        } else {
            Lane::Normal
        }
    }
}

/// A priority lane: each is its own quorum queue of batch messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Lane {
    Normal,
    High,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::High, Lane::Normal];

    /// The `lane` label of metrics, and the `--priority` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Normal => "normal",
            Lane::High => "high",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// An ack, nack or reject could not be sent: its channel is closed.
    #[error("RabbitMQ: {op} not sent: the channel is closed")]
    ChannelClosed { op: &'static str },
    /// A broker operation did not finish in time: the connection is treated as lost.
    #[error("RabbitMQ: {op} did not finish within {limit:?}")]
    Timeout { op: &'static str, limit: Duration },
    #[error("RabbitMQ did not confirm the publish to `{exchange}` ({routing_key})")]
    NotConfirmed {
        exchange: String,
        routing_key: String,
    },
}

pub type QueueResult<T> = Result<T, QueueError>;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

pub fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k.to_string()), v.clone());
    }
    t
}

/// A string-valued header, if present.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// An integer header, if present (`x-delivery-count` arrives as one of several integer types).
pub fn header_int(props: &BasicProperties, key: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(*v as i64),
        AMQPValue::ShortShortUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::ShortUInt(v) => Some(*v as i64),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// The lane a dead letter came from, for sending it back there: the worker's `x-sdbatch-lane`
/// header on the copies it dead-letters itself, else the broker's `x-first-death-queue` (a
/// delivery limit or a reject), else the normal lane (a letter from before the lanes existed).
pub fn dead_letter_lane(props: &BasicProperties, t: &Topology) -> Lane {
    if let Some(lane) = header_str(props, "x-sdbatch-lane") {
        return if lane == Lane::High.as_str() {
            Lane::High
        } else {
            Lane::Normal
        };
    }
    header_str(props, "x-first-death-queue")
        .map(|q| t.lane_of(&q))
        .unwrap_or(Lane::Normal)
}

/// `amqp://user:***@host/vhost`: the URL with its password hidden, for logs.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

/// Connects with a connection name that shows up in the management UI and `rabbitmqctl`, within
/// [`DEFAULT_OPERATION_TIMEOUT`].
pub async fn connect(url: &str, name: &str) -> QueueResult<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    within(
        DEFAULT_OPERATION_TIMEOUT,
        "connect",
        Connection::connect(url, props),
    )
    .await
}

/// Declares the whole topology. Idempotent; a queue that exists with other arguments is a
/// channel error from the broker (PRECONDITION_FAILED) naming the queue.
pub async fn declare(channel: &Channel, t: &Topology) -> QueueResult<()> {
    declare_exchange(channel, &t.dead_exchange, ExchangeKind::Direct).await?;
    declare_bound_queue(
        channel,
        &t.dead_exchange,
        &t.dead_queue,
        table(&[("x-queue-type", long("quorum"))]),
    )
    .await?;
    declare_exchange(channel, &t.jobs_exchange, ExchangeKind::Direct).await?;
    // Both lanes get identical arguments: a message has the same delivery limit and reaches the
    // same dead-letter queue whichever lane it was published to.
    let jobs_args = table(&[
        ("x-queue-type", long("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongInt(t.delivery_limit as i32),
        ),
        ("x-dead-letter-exchange", long(&t.dead_exchange)),
        ("x-dead-letter-routing-key", long(&t.dead_queue)),
        // At-least-once dead-lettering: the broker keeps a message until the DLQ confirms it
        // (needs reject-publish overflow), so nothing is lost on the way to the DLQ.
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
    ]);
    declare_bound_queue(channel, &t.jobs_exchange, &t.jobs_queue, jobs_args.clone()).await?;
    // Declared after the normal lane: a deployment that predates the lanes gains the queue and
    // keeps its existing one unchanged.
    declare_bound_queue(channel, &t.jobs_exchange, &t.jobs_high_queue, jobs_args).await?;
    declare_exchange(channel, &t.events_exchange, ExchangeKind::Topic).await?;
    declare_exchange(channel, &t.control_exchange, ExchangeKind::Fanout).await
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> QueueResult<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await?;
    Ok(())
}

/// A durable queue bound to `exchange` with its own name as the routing key.
async fn declare_bound_queue(
    channel: &Channel,
    exchange: &str,
    queue_name: &str,
    arguments: FieldTable,
) -> QueueResult<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue_name.into(), options, arguments)
        .await?;
    channel
        .queue_bind(
            queue_name.into(),
            exchange.into(),
            queue_name.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A server-named queue of this connection alone, deleted with it.
async fn private_queue(channel: &Channel) -> QueueResult<lapin::Queue> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    Ok(channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?)
}

/// Subscribes to the events exchange with a private, auto-deleted queue bound to `keys`
/// (`#` for every event). Subscribe before publishing work so no event can be missed.
pub async fn subscribe_events(
    channel: &Channel,
    t: &Topology,
    keys: &[&str],
) -> QueueResult<lapin::Consumer> {
    let queue = private_queue(channel).await?;
    for key in keys {
        channel
            .queue_bind(
                queue.name().clone(),
                t.events_exchange.as_str().into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Subscribes to the control exchange with a private, auto-deleted queue (gone with the
/// connection: a worker hears the control messages sent while it is connected; what it misses
/// is covered by the tombstone it checks per delivery). Deliveries need no ack.
pub async fn subscribe_control(channel: &Channel, t: &Topology) -> QueueResult<lapin::Consumer> {
    let queue = private_queue(channel).await?;
    channel
        .queue_bind(
            queue.name().clone(),
            t.control_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// A channel in confirm mode: every publish waits for the broker's ack, within a time limit.
/// Clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    timeout: Duration,
}

impl Publisher {
    /// A publisher whose publishes time out after [`DEFAULT_OPERATION_TIMEOUT`].
    pub async fn new(connection: &Connection) -> QueueResult<Self> {
        Self::with_timeout(connection, DEFAULT_OPERATION_TIMEOUT).await
    }

    /// A publisher whose publishes (confirm included) time out after `timeout`.
    pub async fn with_timeout(connection: &Connection, timeout: Duration) -> QueueResult<Self> {
        let channel = within(timeout, "channel.open", connection.create_channel()).await?;
        within(
            timeout,
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Self { channel, timeout })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes persistent JSON and waits for the confirm. `mandatory` makes an unroutable
    /// message an error instead of a silent drop (jobs and dead letters must reach a queue).
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
        mandatory: bool,
    ) -> QueueResult<()> {
        let mut props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2);
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        let confirm = within(self.timeout, "basic.publish", async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?
                .await
        })
        .await?;
        if confirm.is_ack() && confirm.take_message().is_none() {
            Ok(())
        } else {
            Err(QueueError::NotConfirmed {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            })
        }
    }
}

pub use lapin::types::AMQPValue as HeaderValue;

/// A long-string header value.
pub fn header_value(s: &str) -> AMQPValue {
    long(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("not a url"), "<unparseable URL>");
    }

    #[test]
    fn dead_letters_go_back_to_their_lane() {
        let t = Topology::with_prefix("t1");
        let with = |entries: &[(&str, &str)]| {
            let headers: Vec<(&str, AMQPValue)> =
                entries.iter().map(|(k, v)| (*k, long(v))).collect();
            BasicProperties::default().with_headers(table(&headers))
        };
        let lane = |entries: &[(&str, &str)]| dead_letter_lane(&with(entries), &t);
        assert_eq!(lane(&[("x-sdbatch-lane", "high")]), Lane::High);
        assert_eq!(lane(&[("x-sdbatch-lane", "normal")]), Lane::Normal);
        assert_eq!(lane(&[("x-first-death-queue", "t1.jobs.high")]), Lane::High);
        assert_eq!(lane(&[("x-first-death-queue", "t1.jobs")]), Lane::Normal);
        // The worker's own header wins over the broker's (it is the more recent life).
        assert_eq!(
            lane(&[
                ("x-first-death-queue", "t1.jobs"),
                ("x-sdbatch-lane", "high")
            ]),
            Lane::High
        );
        assert_eq!(lane(&[]), Lane::Normal);
        assert_eq!(
            dead_letter_lane(&BasicProperties::default(), &t),
            Lane::Normal
        );
    }

    #[test]
    fn prefixed_names() {
        let t = Topology::with_prefix("t1");
        assert_eq!(t.jobs_queue, "t1.jobs");
        assert_eq!(t.dead_queue, "t1.jobs.dead");
        assert_eq!(t.jobs_high_queue, "t1.jobs.high");
        assert_eq!(t.queue(Lane::High), "t1.jobs.high");
        assert_eq!(t.queue(Lane::Normal), "t1.jobs");
        assert_eq!(t.lane_of("t1.jobs.high"), Lane::High);
        assert_eq!(t.lane_of("t1.jobs"), Lane::Normal);
        assert_eq!(t.lane_of("t1.jobs.dead"), Lane::Normal);
        assert_eq!(Topology::default().events_exchange, "sdbatch.events");
    }
}
