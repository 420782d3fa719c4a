//! An in-memory stand-in for RabbitMQ (`sdbatch worker --messages FILE`): the worker path end to
//! end (intake, planner, GPU batches, uploads, manifests, events, dead letters) on a machine
//! without a broker, such as the GPU proof's, or for a developer trying a few messages.
//!
//! It keeps the broker behaviour the worker relies on, so the same session code runs on it:
//! - a message is handed to the worker once and stays outstanding until it is acked, rejected or
//!   requeued (a second settlement of one delivery is an error, as on a real channel);
//! - a requeue makes it ready again, redelivered, with its delivery count raised; past the
//!   delivery limit it is dead-lettered (`delivery_limit`) as a quorum queue does;
//! - a reject (no requeue) dead-letters it (`rejected`);
//! - publishes to the dead-letter exchange are the worker's dead-letter copies; every other
//!   publish is an event. Both are kept, in order, for the run's report (progress events are
//!   only counted: a long run makes many).
//!
//! Nothing here is persistent: a run that is interrupted leaves its outstanding messages in the
//! report as not settled, and the caller says so.
use crate::queue::{Lane, QueueError, QueueResult, Topology};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::Notify;

/// How a message left the queue, if it has.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Acked: done (completed, cancelled or announced again).
    Acked,
    /// In the dead-letter queue. `why`: the worker's reason code when it copied the message
    /// there and acked it (`x-sdbatch-error`, e.g. `not_json`); `rejected` or `delivery_limit`
    /// when the queue moved it itself.
    DeadLettered { why: String },
}

/// One message of the run, as the report shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MessageReport {
    /// Its place in the input (0-based).
    pub index: usize,
    pub lane: &'static str,
    /// Deliveries that ended in a requeue (the quorum queue's `x-delivery-count`).
    pub requeues: u32,
    /// `None`: never settled (the run was stopped).
    #[serde(flatten)]
    pub outcome: Option<Outcome>,
}

/// Something the worker published: an event, or a dead-letter copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
    /// The body as JSON when it is JSON (events are), else as (lossy) text.
    pub body: serde_json::Value,
    /// The message headers, as text (`x-sdbatch-error` etc. on dead letters).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// The state of the run: what the worker did with every message, and what it published.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub messages: Vec<MessageReport>,
    /// Every event but `batch.progress`, in the order published.
    pub events: Vec<Published>,
    /// `batch.progress` events published.
    pub progress_events: usize,
    pub dead_letters: Vec<Published>,
    /// From the first delivery to the last settlement (model load and warm-up left out).
    pub seconds: f64,
}

impl Report {
    /// Messages acked: completed (or cancelled, or announced again).
    pub fn acked(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.outcome == Some(Outcome::Acked))
            .count()
    }

    /// Messages that ended in the dead-letter queue, by the worker's copy or the queue's own.
    pub fn dead_lettered(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| matches!(m.outcome, Some(Outcome::DeadLettered { .. })))
            .count()
    }

    /// Messages still outstanding (ready or in the worker's hands).
    pub fn unsettled(&self) -> usize {
        self.messages.iter().filter(|m| m.outcome.is_none()).count()
    }

    /// The events published under `routing_key`.
    pub fn events_named<'a>(&'a self, routing_key: &'a str) -> impl Iterator<Item = &'a Published> {
        self.events
            .iter()
            .filter(move |e| e.routing_key == routing_key)
    }
}

/// A delivery handed to the worker: the message, and the ticket that settles it.
pub struct MemoryDelivery {
    pub tag: u64,
    pub body: Vec<u8>,
    pub lane: Lane,
    pub redelivered: bool,
    /// The quorum queue's `x-delivery-count` on a redelivery.
    pub delivery_count: Option<i64>,
    pub ticket: Ticket,
}

struct Message {
    body: Arc<[u8]>,
    lane: Lane,
    requeues: u32,
    /// The tag of the delivery in the worker's hands, if it is.
    delivered_as: Option<u64>,
    outcome: Option<Outcome>,
}

/// How the worker settles a delivery.
enum Settle {
    Ack,
    /// Acked after publishing a dead-letter copy with this reason code.
    AckCopied(String),
    Requeue,
    Reject,
}

impl Settle {
    fn op(&self) -> &'static str {
        match self {
            Settle::Ack | Settle::AckCopied(_) => "basic.ack",
            Settle::Requeue => "basic.nack",
            Settle::Reject => "basic.reject",
        }
    }
}

struct State {
    messages: Vec<Message>,
    /// Ready messages by lane, oldest first.
    ready: [VecDeque<usize>; 2],
    next_tag: u64,
    events: Vec<Published>,
    progress_events: usize,
    dead_letters: Vec<Published>,
    first_delivery: Option<Instant>,
    last_settled: Option<Instant>,
}

struct Inner {
    state: Mutex<State>,
    /// Woken whenever a message becomes ready.
    became_ready: Notify,
    delivery_limit: u32,
    dead_exchange: String,
}

/// The queue of a broker-less run. Clones share it.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

fn slot(lane: Lane) -> usize {
    match lane {
        Lane::High => 0,
        Lane::Normal => 1,
    }
}

impl MemoryBroker {
    /// A queue holding `messages` (bodies as a producer would publish them, each with its lane),
    /// with the topology's delivery limit and dead-letter exchange.
    pub fn new(messages: Vec<(Lane, Vec<u8>)>, topology: &Topology) -> Self {
        let mut ready = [VecDeque::new(), VecDeque::new()];
        let messages: Vec<Message> = messages
            .into_iter()
            .enumerate()
            .map(|(i, (lane, body))| {
                ready[slot(lane)].push_back(i);
                Message {
                    body: body.into(),
                    lane,
                    requeues: 0,
                    delivered_as: None,
                    outcome: None,
                }
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    messages,
                    ready,
                    next_tag: 1,
                    events: Vec::new(),
                    progress_events: 0,
                    dead_letters: Vec::new(),
                    first_delivery: None,
                    last_settled: None,
                }),
                became_ready: Notify::new(),
                delivery_limit: topology.delivery_limit,
                dead_exchange: topology.dead_exchange.clone(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the oldest ready message of `lane` (`basic.get`).
    pub fn pull(&self, lane: Lane) -> Option<MemoryDelivery> {
        let mut state = self.state();
        let index = state.ready[slot(lane)].pop_front()?;
        Some(self.deliver(&mut state, index))
    }

    /// Waits for a ready message of either lane, high first (a consumer on each lane).
    pub async fn next_ready(&self) -> MemoryDelivery {
        loop {
            // Registered before looking, so a message made ready in between is not missed.
            let woken = self.inner.became_ready.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(d) = Lane::ALL.iter().find_map(|&lane| self.pull(lane)) {
                return d;
            }
            woken.await;
        }
    }

    fn deliver(&self, state: &mut State, index: usize) -> MemoryDelivery {
        let tag = state.next_tag;
        state.next_tag += 1;
        state.first_delivery.get_or_insert_with(Instant::now);
        let m = &mut state.messages[index];
        m.delivered_as = Some(tag);
        let redelivered = m.requeues > 0;
        MemoryDelivery {
            tag,
            body: m.body.to_vec(),
            lane: m.lane,
            redelivered,
            delivery_count: redelivered.then_some(i64::from(m.requeues)),
            ticket: Ticket {
                broker: self.clone(),
                index,
                tag,
            },
        }
    }

    /// Whether no message is ready. With nothing in the worker's hands either, nothing can
    /// become ready again: the run is over (a message still marked as delivered then was
    /// dropped unsettled, and the report shows it as not settled).
    pub fn nothing_ready(&self) -> bool {
        self.state().ready.iter().all(VecDeque::is_empty)
    }

    /// Records a publish: a dead-letter copy when it goes to the dead-letter exchange, else an
    /// event. Always "confirmed".
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Vec<(String, String)>,
    ) {
        let mut state = self.state();
        if routing_key == crate::events::BATCH_PROGRESS && exchange != self.inner.dead_exchange {
            state.progress_events += 1;
            return;
        }
        let published = Published {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: serde_json::from_slice(body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(body).into())
            }),
            headers,
        };
        if exchange == self.inner.dead_exchange {
            state.dead_letters.push(published);
        } else {
            state.events.push(published);
        }
    }

    /// What happened so far.
    pub fn report(&self) -> Report {
        let state = self.state();
        Report {
            messages: state
                .messages
                .iter()
                .enumerate()
                .map(|(index, m)| MessageReport {
                    index,
                    lane: m.lane.as_str(),
                    requeues: m.requeues,
                    outcome: m.outcome.clone(),
                })
                .collect(),
            events: state.events.clone(),
            progress_events: state.progress_events,
            dead_letters: state.dead_letters.clone(),
            seconds: match (state.first_delivery, state.last_settled) {
                (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
                _ => 0.0,
            },
        }
    }

    /// Settles delivery `tag` of message `index`. A delivery settled twice is a channel error,
    /// as on RabbitMQ.
    fn settle(&self, index: usize, tag: u64, how: Settle) -> QueueResult<()> {
        let mut state = self.state();
        state.last_settled = Some(Instant::now());
        let limit = self.inner.delivery_limit;
        let m = &mut state.messages[index];
        if m.delivered_as != Some(tag) || m.outcome.is_some() {
            return Err(QueueError::ChannelClosed { op: how.op() });
        }
        m.delivered_as = None;
        match how {
            Settle::Ack => m.outcome = Some(Outcome::Acked),
            Settle::AckCopied(why) => m.outcome = Some(Outcome::DeadLettered { why }),
            Settle::Reject => {
                m.outcome = Some(Outcome::DeadLettered {
                    why: "rejected".into(),
                })
            }
            Settle::Requeue => {
                m.requeues += 1;
                if m.requeues > limit {
                    m.outcome = Some(Outcome::DeadLettered {
                        why: "delivery_limit".into(),
                    });
                } else {
                    let lane = slot(m.lane);
                    state.ready[lane].push_back(index);
                    drop(state);
                    self.inner.became_ready.notify_waiters();
                }
            }
        }
        Ok(())
    }
}

/// Settles one delivery (the in-memory `Acker`).
pub struct Ticket {
    broker: MemoryBroker,
    index: usize,
    tag: u64,
}

impl Ticket {
    pub fn ack(&self) -> QueueResult<()> {
        self.broker.settle(self.index, self.tag, Settle::Ack)
    }

    /// The ack that follows the worker's dead-letter copy (reason code `why`): the message
    /// counts as dead-lettered.
    pub fn ack_copied(&self, why: &str) -> QueueResult<()> {
        self.broker
            .settle(self.index, self.tag, Settle::AckCopied(why.to_string()))
    }

    pub fn requeue(&self) -> QueueResult<()> {
        self.broker.settle(self.index, self.tag, Settle::Requeue)
    }

    pub fn reject(&self) -> QueueResult<()> {
        self.broker.settle(self.index, self.tag, Settle::Reject)
    }
}

/// The most bytes [`read_messages`] reads (a message is at most a few MiB; more is a mistake, such
/// as a wrong file, not a queue). The error text says 256 MiB.
pub const MAX_INPUT_BYTES: u64 = 256 << 20;
/// The most messages [`read_messages`] takes.
pub const MAX_MESSAGES: usize = 100_000;

/// Reads the messages of a broker-less run: a JSON Lines file (one message per line, blank lines
/// skipped) or a folder of `*.json` files (one message each, in name order). The bodies are not
/// parsed here: the worker checks each as it would a delivery, so a bad one is dead-lettered
/// with its reason and the others still run.
pub fn read_messages(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    read_messages_within(path, MAX_INPUT_BYTES)
}

/// [`read_messages`] with a limit of `max_bytes` in all.
fn read_messages_within(path: &Path, max_bytes: u64) -> std::io::Result<Vec<Vec<u8>>> {
    let mut budget = max_bytes;
    if std::fs::metadata(path)?.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.retain(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"))
                && p.is_file()
        });
        files.sort();
        check_count(files.len())?;
        files
            .iter()
            .map(|file| read_bounded(file, &mut budget))
            .collect()
    } else {
        let bodies = split_lines(&read_bounded(path, &mut budget)?);
        check_count(bodies.len())?;
        Ok(bodies)
    }
}

/// Reads `path` if it fits in `budget` bytes, taking its size off. The read itself is bounded,
/// so a pipe or a device (`/dev/stdin`, whose size says nothing) cannot exhaust memory.
fn read_bounded(path: &Path, budget: &mut u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(*budget + 1)
        .read_to_end(&mut bytes)?;
    let len = bytes.len() as u64;
    if len > *budget {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "more messages than one run takes (256 MiB in all): split them into several runs",
        ));
    }
    *budget -= len;
    Ok(bytes)
}

/// The non-blank lines of a JSON Lines file, without their line ends.
fn split_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect()
}

fn check_count(n: usize) -> std::io::Result<()> {
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no messages (a JSON Lines file, or a folder of .json files)",
        ));
    }
    if n > MAX_MESSAGES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{n} messages: at most {MAX_MESSAGES} per run"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(delivery_limit: u32) -> Topology {
        let mut t = Topology::with_prefix("t");
        t.delivery_limit = delivery_limit;
        t
    }

    fn broker(bodies: &[(Lane, &str)], delivery_limit: u32) -> MemoryBroker {
        let messages = bodies
            .iter()
            .map(|(lane, b)| (*lane, b.as_bytes().to_vec()))
            .collect();
        MemoryBroker::new(messages, &topology(delivery_limit))
    }

    #[test]
    fn pulls_each_lane_in_order_and_ack_settles() {
        let b = broker(
            &[
                (Lane::Normal, "n1"),
                (Lane::High, "h1"),
                (Lane::Normal, "n2"),
            ],
            3,
        );
        assert!(!b.nothing_ready());
        assert_eq!(b.pull(Lane::High).map(|d| d.body), Some(b"h1".to_vec()));
        assert!(b.pull(Lane::High).is_none());
        let n1 = b.pull(Lane::Normal).expect("n1");
        assert_eq!(
            (n1.body.as_slice(), n1.redelivered, n1.delivery_count),
            (&b"n1"[..], false, None)
        );
        n1.ticket.ack().expect("ack");
        // Settling one delivery twice is an error, as on a channel.
        assert!(matches!(
            n1.ticket.ack(),
            Err(QueueError::ChannelClosed { .. })
        ));
        assert!(matches!(
            n1.ticket.requeue(),
            Err(QueueError::ChannelClosed { .. })
        ));
        let report = b.report();
        assert_eq!(report.messages[0].outcome, Some(Outcome::Acked));
        assert_eq!(
            report.messages[1].outcome, None,
            "h1 is in the worker's hands"
        );
        assert_eq!(report.unsettled(), 2);
    }

    #[test]
    fn requeue_redelivers_until_the_delivery_limit_then_dead_letters() {
        let b = broker(&[(Lane::Normal, "m")], 2);
        for expected_count in [None, Some(1), Some(2)] {
            let d = b.pull(Lane::Normal).expect("ready again");
            assert_eq!(d.delivery_count, expected_count);
            assert_eq!(d.redelivered, expected_count.is_some());
            d.ticket.requeue().expect("nack");
        }
        assert!(
            b.pull(Lane::Normal).is_none(),
            "dead-lettered after 3 deliveries"
        );
        assert!(b.nothing_ready());
        let report = b.report();
        assert_eq!(
            report.messages[0].outcome,
            Some(Outcome::DeadLettered {
                why: "delivery_limit".into()
            })
        );
        assert_eq!(report.messages[0].requeues, 3);
        assert_eq!(report.dead_lettered(), 1);
    }

    #[test]
    fn reject_dead_letters_and_publishes_are_sorted_into_events_and_copies() {
        let t = topology(3);
        let b = MemoryBroker::new(
            vec![
                (Lane::Normal, b"x".to_vec()),
                (Lane::Normal, b"y".to_vec()),
                (Lane::Normal, b"y".to_vec()),
                (Lane::Normal, br#"{"batch_id":"p"}"#.to_vec()),
            ],
            &t,
        );
        b.pull(Lane::Normal)
            .expect("x")
            .ticket
            .reject()
            .expect("reject");
        // The same body twice in hand: each copy counts for the delivery that made it.
        let y = b.pull(Lane::Normal).expect("y");
        let y2 = b.pull(Lane::Normal).expect("y again");
        assert_eq!(b.report().dead_lettered(), 1, "x, by the queue");
        b.publish(
            &t.dead_exchange,
            &t.dead_queue,
            b"y",
            vec![("x-sdbatch-error".into(), "invalid_json".into())],
        );
        b.publish(
            &t.events_exchange,
            "batch.failed",
            br#"{"reason":"invalid_json"}"#,
            Vec::new(),
        );
        y2.ticket.ack().expect("y2 completed");
        y.ticket.ack_copied("invalid_json").expect("ack");
        let p = b.pull(Lane::Normal).expect("p");
        // Progress events are counted, not kept.
        b.publish(&t.events_exchange, "batch.progress", br#"{}"#, Vec::new());
        p.ticket.ack().expect("ack");
        let report = b.report();
        assert_eq!(report.progress_events, 1);
        assert!(report.seconds >= 0.0);
        assert_eq!(report.dead_letters.len(), 1);
        assert_eq!(report.dead_letters[0].body, serde_json::json!("y"));
        assert_eq!(report.events_named("batch.failed").count(), 1);
        assert_eq!(report.events.len(), 1);
        assert_eq!(report.events[0].body["reason"], "invalid_json");
        // x by the queue, y by the worker's copy and ack; y2 and p completed.
        assert_eq!(
            report.messages[1].outcome,
            Some(Outcome::DeadLettered {
                why: "invalid_json".into()
            })
        );
        assert_eq!(
            (report.dead_lettered(), report.acked(), report.unsettled()),
            (2, 2, 0)
        );
    }

    #[test]
    fn reads_json_lines_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("m.jsonl");
        std::fs::write(&lines, b"{\"a\":1}\r\n\n  \nnot json\n{\"b\":2}").unwrap();
        let bodies = read_messages(&lines).unwrap();
        // Blank lines go; a bad line stays, for the worker to dead-letter with its reason.
        assert_eq!(bodies, [&b"{\"a\":1}"[..], b"not json", b"{\"b\":2}"]);

        let folder = dir.path().join("f");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("2.json"), b"two").unwrap();
        std::fs::write(folder.join("1.JSON"), b"one").unwrap();
        std::fs::write(folder.join("notes.txt"), b"skipped").unwrap();
        assert_eq!(read_messages(&folder).unwrap(), [&b"one"[..], b"two"]);

        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, b"\n\n").unwrap();
        let e = read_messages(&empty).unwrap_err();
        assert!(e.to_string().contains("no messages"), "{e}");
        assert!(read_messages(&dir.path().join("missing")).is_err());

        // A device says nothing of its size: the read itself is bounded.
        let e = read_messages_within(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(e.to_string().contains("split them"), "{e}");
        // And so is a folder's total.
        assert!(read_messages_within(&folder, 5).is_err());
        assert_eq!(read_messages_within(&folder, 6).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_a_requeue() {
        let b = broker(&[(Lane::Normal, "m")], 3);
        let first = b.pull(Lane::Normal).expect("m");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.next_ready().await.delivery_count }
        });
        // Whether the waiter is already waiting or not, the requeue reaches it.
        tokio::task::yield_now().await;
        first.ticket.requeue().expect("nack");
        let count = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(count, Some(1));
    }
}
