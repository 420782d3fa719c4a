//! Long work that survives the broker's clock. RabbitMQ closes a channel whose delivery stays
//! unacked longer than its `consumer_timeout`, and every message the channel held loses a delivery.
//! The worker measures its speed and holds only as much work as it can finish well within the
//! timeout. Each test runs its own RabbitMQ node with a lowered consumer timeout (a broker-wide
//! setting on RabbitMQ 3.10), so no other test is affected. Tiny model, CPU.
mod common;

use common::broker::{Broker, WorkerProcess, metric, unique};
use common::private_broker::PrivateBroker;
use common::s3::S3Server;
use common::stack::{batch, store};
use sdbatch::events::Event;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(300);
/// The private node's consumer timeout.
const TIMEOUT_SECS: u64 = 30;
const MESSAGES: usize = 8;
/// Generous: the control run's closures cost its held messages a delivery each time.
const DELIVERY_LIMIT: u32 = 50;
/// The two runs one after the other: two workers sharing 2 cores would change each other's speed
/// under the very estimate being tested.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Run {
    completed: Vec<sdbatch::events::BatchCompleted>,
    generated: f64,
    dead: usize,
}

/// 8 messages of 4 images x 150 steps (several seconds each, far more than the timeout together), all published before the worker starts, worker told that
/// the consumer timeout is `told_secs`; runs until every batch completed once.
async fn run(name: &str, told_secs: u64) -> Run {
    let _serial = SERIAL.lock().await;
    let rabbit = PrivateBroker::builder()
        .consumer_timeout(TIMEOUT_SECS * 1000)
        .start()
        .await;
    let s3 = S3Server::start();
    let storage = store(&s3).await;
    storage.create_bucket("images").await.unwrap();
    let prefix = unique(name);
    let broker = Broker::connect(&rabbit.url(), &prefix, DELIVERY_LIMIT).await;
    let mut events = broker.watch_events().await;
    for i in 0..MESSAGES {
        broker
            .publish(&batch(
                &format!("long-{i}"),
                150,
                &[
                    ("a", "a lighthouse", i as u64, 2),
                    ("b", "a harbour", 99, 2),
                ],
            ))
            .await;
    }
    let logs = tempfile::tempdir().unwrap();
    let told = told_secs.to_string();
    let limit = DELIVERY_LIMIT.to_string();
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
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn work_in_hand_stays_within_the_consumer_timeout() {
    // The worker is told a third of the broker's timeout: its 80 % budget is then 8 s of a real
    // 30 s, a margin against this machine's speed changing under the other tests' load.
    let r = run("holding", TIMEOUT_SECS / 3).await;
    let redelivered = r.completed.iter().filter(|c| c.redelivered).count();
    println!(
        "consumer timeout {TIMEOUT_SECS} s, {MESSAGES} messages: {} completions, {redelivered} redelivered, \
         {} images generated, {} dead letters",
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
    let r = run("hoarding", 100_000).await;
    let redelivered = r.completed.iter().filter(|c| c.redelivered).count();
    println!(
        "told 100000 s: {} completions, {redelivered} redelivered, {} images generated",
        r.completed.len(),
        r.generated
    );
    assert!(
        redelivered > 0,
        "the consumer timeout never fired: the test proves nothing"
    );
    assert_eq!(r.dead, 0);
}
