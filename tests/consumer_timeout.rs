//! Long work that survives the broker's clock. RabbitMQ closes a channel whose delivery stays
//! unacked longer than its `consumer_timeout`, and every message the channel held loses a delivery.
//! The worker measures its speed and holds only as much work as it can finish well within the
//! timeout. Each test runs its own RabbitMQ node with a lowered consumer timeout (a broker-wide
//! setting on RabbitMQ 3.10), so no other test is affected. Tiny model, CPU.
//!
//! The timeout is sized from this machine's speed, measured in the test: a probe message of the
//! same shape is timed first, and the node's timeout set to several times that (at least 30 s).
//! A fixed timeout made the tests fail on a loaded machine, where one message alone took longer.
mod common;

use common::broker::{Broker, WorkerProcess, metric, unique};
use common::private_broker::PrivateBroker;
use common::s3::S3Server;
use common::stack::{batch, store};
use sdbatch::events::Event;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(300);
/// The private node's consumer timeout at least, and in probe-message durations.
const MIN_TIMEOUT_SECS: u64 = 30;
const TIMEOUT_IN_MESSAGES: f64 = 4.0;
const MESSAGES: usize = 8;
const SIGTERM: i32 = 15;
/// Generous: the control run's closures cost its held messages a delivery each time.
const DELIVERY_LIMIT: u32 = 50;
/// The two runs one after the other: two workers sharing 2 cores would change each other's speed
/// under the very estimate being tested.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Run {
    completed: Vec<sdbatch::events::BatchCompleted>,
    generated: f64,
    dead: usize,
    /// The broker's consumer timeout the run used.
    timeout_secs: u64,
    /// How long the probe message took.
    probe: Duration,
}

/// What the worker is told of the broker's timeout.
enum Told {
    /// This fraction of the real timeout.
    Fraction(f64),
    Secs(u64),
}

/// One batch message of the shape every run uses: 4 images x 150 steps.
fn message(id: &str, seed: u64) -> Vec<u8> {
    batch(
        id,
        150,
        &[("a", "a lighthouse", seed, 2), ("b", "a harbour", 99, 2)],
    )
}

/// Times a probe message, sets the node's timeout to several probes, then publishes 8 messages
/// (together far more than the timeout) and starts a worker told `told` of the timeout; runs
/// until every batch completed once.
async fn run(name: &str, told: Told) -> Run {
    let _serial = SERIAL.lock().await;
    let rabbit = PrivateBroker::builder().start().await;
    let s3 = S3Server::start();
    let storage = store(&s3).await;
    storage.create_bucket("images").await.unwrap();
    let prefix = unique(name);
    let broker = Broker::connect(&rabbit.url(), &prefix, DELIVERY_LIMIT).await;
    let mut events = broker.watch_events().await;
    let logs = tempfile::tempdir().unwrap();

    let limit = DELIVERY_LIMIT.to_string();
    // The probe, under the node's default (long) timeout.
    let probe = {
        let mut worker = WorkerProcess::spawn_env(
            &prefix,
            &s3,
            "images",
            logs.path(),
            "probe",
            &["--max-batch", "2", "--delivery-limit", &limit],
            &[("AMQP_URL", &rabbit.url())],
        );
        worker.wait_ready(LONG).await;
        let started = std::time::Instant::now();
        broker.publish(&message("probe", 1)).await;
        let took = match events.next(LONG).await {
            Some(Event::Completed(c)) if c.batch_id == "probe" => started.elapsed(),
            other => panic!("probe: {other:?}\n{}", worker.log_text()),
        };
        // The event comes before the ack: a graceful stop acks the probe, so it is not
        // redelivered to the worker under test (a kill here once was, counted as a closure).
        worker.signal(SIGTERM);
        let status = worker.wait(LONG).await;
        assert!(
            status.success(),
            "probe worker: {status:?}\n{}",
            worker.log_text()
        );
        took
    };
    let timeout_secs =
        MIN_TIMEOUT_SECS.max((probe.as_secs_f64() * TIMEOUT_IN_MESSAGES).ceil() as u64);
    // Read by channels opened from now on: the worker below opens its own.
    rabbit.set_consumer_timeout(timeout_secs * 1000).await;
    let told_secs = match told {
        Told::Fraction(f) => ((timeout_secs as f64 * f) as u64).max(1),
        Told::Secs(s) => s,
    };

    for i in 0..MESSAGES {
        broker
            .publish(&message(&format!("long-{i}"), i as u64))
            .await;
    }
    let told = told_secs.to_string();
    let worker = WorkerProcess::spawn_env(
        &prefix,
        &s3,
        "images",
        logs.path(),
        "w1",
        &[
            "--prefetch",
            "8",
            "--max-batch",
            "2",
            "--consumer-timeout-secs",
            &told,
            "--delivery-limit",
            &limit,
        ],
        &[("AMQP_URL", &rabbit.url())],
    );
    let mut completed: Vec<sdbatch::events::BatchCompleted> = Vec::new();
    while completed
        .iter()
        .map(|c| &c.batch_id)
        .collect::<std::collections::HashSet<_>>()
        .len()
        < MESSAGES
    {
        match events.next(LONG).await {
            Some(Event::Completed(c)) => completed.push(c),
            Some(other) => panic!("unexpected {other:?}\n{}", worker.log_text()),
            None => panic!("batches missing:\n{}", worker.log_text()),
        }
    }
    let generated = metric(&worker.metrics(), "sdbatch_gpu_images_total");
    if std::env::var_os("SDBATCH_TEST_LOG").is_some() {
        println!("{}", worker.log_text());
    }
    let dead = broker.drain_dead().await.len();
    drop(worker);
    broker.cleanup().await;
    Run {
        completed,
        generated,
        dead,
        timeout_secs,
        probe,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn work_in_hand_stays_within_the_consumer_timeout() {
    // The worker is told a third of the broker's timeout: its 80 % budget is then about one
    // probe's worth of a real four, a margin against this machine's speed changing under the
    // other tests' load.
    let r = run("holding", Told::Fraction(1.0 / 3.0)).await;
    let redelivered = r.completed.iter().filter(|c| c.redelivered).count();
    println!(
        "probe message {:.1} s, consumer timeout {} s, {MESSAGES} messages: {} completions, \
         {redelivered} redelivered, {} images generated, {} dead letters",
        r.probe.as_secs_f64(),
        r.timeout_secs,
        r.completed.len(),
        r.generated,
        r.dead
    );
    assert_eq!(r.completed.len(), MESSAGES, "each batch completed once");
    assert_eq!(redelivered, 0, "no channel was closed under a held message");
    assert_eq!(
        r.generated,
        (4 * MESSAGES) as f64,
        "no image generated twice"
    );
    assert_eq!(r.dead, 0);
}

/// The control: a worker told a far longer timeout holds all 8 messages at once, and the broker
/// takes them back — what the holding rule prevents. Resumed batches still complete.
#[tokio::test(flavor = "multi_thread")]
async fn holding_everything_trips_the_consumer_timeout() {
    let r = run("hoarding", Told::Secs(100_000)).await;
    let redelivered = r.completed.iter().filter(|c| c.redelivered).count();
    println!(
        "probe message {:.1} s, consumer timeout {} s, told 100000 s: {} completions, \
         {redelivered} redelivered, {} images generated",
        r.probe.as_secs_f64(),
        r.timeout_secs,
        r.completed.len(),
        r.generated
    );
    assert!(
        redelivered > 0,
        "the consumer timeout never fired: the test proves nothing"
    );
    assert_eq!(r.dead, 0);
}
