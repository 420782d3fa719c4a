//! Hostile and careless producers, and a broker that goes silent: one message must never take a
//! worker down, nothing is lost, and everything the worker sends back is bounded. Real RabbitMQ and
//! a real S3 server (s3s-fs), tiny model, CPU.
mod common;

use common::amqp_proxy::AmqpProxy;
use common::broker::{WorkerProcess, http_get, metric};
use common::stack::{Stack, batch};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sdbatch::events::{BatchCompleted, BatchFailed, Event};
use sdbatch::queue::header_str;
use serde_json::json;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
const SIGTERM: i32 = 15;
/// `crate::bounded::MAX_REASON_BYTES`: the bound of every reason text the worker sends.
const MAX_REASON: usize = sdbatch::bounded::MAX_REASON_BYTES;

async fn wait_ready(worker: &WorkerProcess) {
    let start = Instant::now();
    while http_get(worker.metrics_port, "/readyz").0 != 200 {
        assert!(
            start.elapsed() < LONG,
            "never ready:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects events until `done` says the set is complete (each wait bounded by LONG); a wait
/// that runs out fails with what was seen and the worker's log.
async fn events_until(
    events: &mut common::broker::Events,
    worker: &WorkerProcess,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    while !done(&seen) {
        match events.next(LONG).await {
            Some(e) => seen.push(e),
            None => panic!(
                "no further event within {LONG:?}; seen {seen:?}\nworker log:\n{}",
                worker.log_text()
            ),
        }
    }
    seen
}

fn completed_of<'a>(events: &'a [Event], id: &str) -> Vec<&'a BatchCompleted> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Completed(c) if c.batch_id == id => Some(c),
            _ => None,
        })
        .collect()
}

fn failed_with<'a>(events: &'a [Event], reason: &str) -> Vec<&'a BatchFailed> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Failed(f) if f.reason == reason => Some(f),
            _ => None,
        })
        .collect()
}

/// Peak resident set of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

fn long_header(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_string()))
}

/// Two messages whose dead letters once exceeded RabbitMQ's frame size (a reason quoting a 140 kB
/// value; 122 kB of producer headers copied into the dead letter) closed the worker's connection,
/// burned the deliveries of the valid messages held alongside and could hang the worker. Now
/// each poison message is dead-lettered once with a bounded reason, and valid work completes on
/// its first delivery.
#[tokio::test(flavor = "multi_thread")]
async fn frame_size_poison_is_dead_lettered_once_while_valid_work_completes() {
    let stack = Stack::new("frame", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &["--max-batch", "2"]);
    let publish = |body: Vec<u8>, headers: Option<FieldTable>| {
        let broker = &stack.broker;
        async move { broker.publish_with_headers(&body, headers).await }
    };

    // Valid work held alongside the poison. Its producer also set x-delivery-count to i64::MAX,
    // which must not count against it on a first delivery.
    let mut forged = FieldTable::default();
    forged.insert(
        ShortString::from("x-delivery-count"),
        AMQPValue::LongLongInt(i64::MAX),
    );
    publish(
        batch("good-1", 4, &[("a", "a red apple", 1, 2)]),
        Some(forged),
    )
    .await;
    let huge = "9".repeat(140_000);
    publish(
        serde_json::to_vec(&json!({"schema_version": 1, "batch_id": "poison-steps",
            "items": [{"id": "a", "prompt": "p"}], "params": {"steps": huge}}))
        .unwrap(),
        None,
    )
    .await;
    let mut heavy = FieldTable::default();
    for i in 0..120 {
        heavy.insert(
            ShortString::from(format!("x-producer-{i}")),
            long_header(&"h".repeat(1000)),
        );
    }
    publish(
        br#"{"schema_version": 1, "batch_id": "poison-headers", "items": []}"#.to_vec(),
        Some(heavy),
    )
    .await;
    // Published after the poison: the worker is still consuming.
    publish(batch("good-2", 2, &[("b", "a green pear", 2, 1)]), None).await;

    let seen = events_until(&mut events, &worker, |e| e.len() == 4).await;
    for id in ["good-1", "good-2"] {
        let done = completed_of(&seen, id);
        assert_eq!(done.len(), 1, "{id}: {seen:?}");
        assert!(!done[0].redelivered, "{id} burned a delivery");
    }
    let steps = failed_with(&seen, "steps");
    let items = failed_with(&seen, "items");
    assert_eq!(steps.len(), 1, "{seen:?}");
    assert_eq!(items.len(), 1, "{seen:?}");
    assert_eq!(steps[0].batch_id.as_deref(), Some("poison-steps"));
    assert_eq!(items[0].batch_id.as_deref(), Some("poison-headers"));
    for f in [steps[0], items[0]] {
        assert!(f.error.len() <= MAX_REASON, "{} bytes", f.error.len());
    }

    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 2, "each poison message dead-lettered once");
    for d in &dead {
        let headers = d.properties.headers().as_ref().unwrap();
        let reason = header_str(&d.properties, "x-sdbatch-reason").unwrap();
        assert!(reason.len() <= MAX_REASON, "{} bytes", reason.len());
        assert!(
            !headers
                .inner()
                .keys()
                .any(|k| k.as_str().starts_with("x-producer")),
            "producer headers copied into the dead letter"
        );
    }
    let m = worker.metrics();
    assert_eq!(
        metric(&m, r#"sdbatch_dead_letters_total{reason="steps"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"sdbatch_dead_letters_total{reason="items"}"#),
        1.0
    );
    assert_eq!(metric(&m, "sdbatch_gpu_images_total"), 3.0, "{m}");
    println!(
        "frame-size poison: 2 dead letters (reasons {} and {} bytes), 2 valid batches on their first delivery",
        steps[0].error.len(),
        items[0].error.len()
    );
    stack.broker.cleanup().await;
}

/// A 96 MB body (4 M items) once took the worker from 0.4 to 6.7 GB peak RSS: it was parsed twice
/// before `max_items` was checked. Now its size is checked first and it is rejected unparsed; the
/// broker dead-letters it whole (the worker publishes no copy of it).
#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_is_dead_lettered_unparsed_with_bounded_memory() {
    let stack = Stack::new("huge", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);
    wait_ready(&worker).await;
    let before = peak_rss(worker.child.id());

    let mut body = String::from(r#"{"schema_version": 1, "batch_id": "huge-1", "items": ["#);
    let mut i = 0;
    while body.len() < 96_000_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"id": "i{i}", "prompt": "p"}}"#));
        i += 1;
    }
    body.push_str("]}");
    let size = body.len();
    stack.broker.publish(body.as_bytes()).await;
    drop(body);
    stack
        .broker
        .publish(&batch("after-1", 2, &[("a", "a cat", 5, 1)]))
        .await;

    let seen = events_until(&mut events, &worker, |e| e.len() == 2).await;
    let too_large = failed_with(&seen, "too_large");
    assert_eq!(too_large.len(), 1, "{seen:?}");
    assert_eq!(too_large[0].batch_id, None, "the body was not parsed");
    assert!(
        too_large[0].error.contains("limit 1048576"),
        "{}",
        too_large[0].error
    );
    assert_eq!(completed_of(&seen, "after-1").len(), 1, "{seen:?}");
    let after = peak_rss(worker.child.id());
    let grown = after.saturating_sub(before);
    println!(
        "{size} byte body: worker peak RSS {} MB before, {} MB after (+{} MB)",
        before >> 20,
        after >> 20,
        grown >> 20
    );
    // The body itself arrives in memory (lapin assembles it): about its size, never a parse.
    assert!(grown < 400 << 20, "peak RSS grew by {} MB", grown >> 20);

    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data.len(), size, "dead-lettered whole");
    assert_eq!(
        header_str(&dead[0].properties, "x-first-death-reason").as_deref(),
        Some("rejected")
    );
    stack.broker.cleanup().await;
}

/// Names storage reserves are invalid at validation already: dead-lettered at once, never
/// generated, nothing stored. (An item id `.sdbatch-meta` used to pass validation, be generated 4
/// times, and leave a PNG behind.)
#[tokio::test(flavor = "multi_thread")]
async fn reserved_names_are_dead_lettered_at_once() {
    let stack = Stack::new("reserved", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);
    let message = |id: &str, item: &str, output: serde_json::Value| {
        serde_json::to_vec(&json!({"schema_version": 1, "batch_id": id,
            "items": [{"id": item, "prompt": "a vase"}], "params": {"steps": 2},
            "output": output}))
        .unwrap()
    };
    stack
        .broker
        .publish(&message("meta-1", ".sdbatch-meta", json!({})))
        .await;
    stack
        .broker
        .publish(&message(
            "tmp-1",
            "a",
            json!({"prefix": "x/.sdbatch-tmp.1"}),
        ))
        .await;

    let seen = events_until(&mut events, &worker, |e| e.len() == 2).await;
    let reasons: Vec<(Option<String>, String)> = seen
        .iter()
        .map(|e| match e {
            Event::Failed(f) => (f.batch_id.clone(), f.reason.clone()),
            other => panic!("expected batch.failed, got {other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (Some("meta-1".into()), "item_id".into()),
            (Some("tmp-1".into()), "prefix".into()),
        ]
    );
    let dead = stack.broker.drain_dead().await;
    let codes: Vec<String> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error").unwrap())
        .collect();
    assert_eq!(codes, ["item_id", "prefix"]);
    let m = worker.metrics();
    assert_eq!(
        metric(&m, "sdbatch_gpu_images_total"),
        0.0,
        "nothing generated"
    );
    assert!(stack.keys().await.is_empty(), "nothing stored");
    stack.broker.cleanup().await;
}

/// A store that refuses one of a batch's objects (here: the local sink, where a file stands in
/// the way of an item's folder) fails the batch permanently: it is generated once, dead-lettered
/// at once as `storage_refused`, and the image it had already stored is deleted again.
#[tokio::test(flavor = "multi_thread")]
async fn refused_storage_is_permanent_and_leaves_nothing_behind() {
    let stack = Stack::new("refused", 3).await;
    let mut events = stack.broker.watch_events().await;
    let sink = tempfile::tempdir().unwrap();
    let url = format!("file://{}", sink.path().display());
    let bucket_dir = sink.path().join("images");
    std::fs::create_dir_all(bucket_dir.join("refused-1")).unwrap();
    // `refused-1/b/0.png` cannot be written: `refused-1/b` is a file.
    std::fs::write(bucket_dir.join("refused-1/b"), b"in the way").unwrap();
    let worker = stack.worker("w1", &["--storage-url", &url, "--max-batch", "1"]);
    stack
        .broker
        .publish(&batch(
            "refused-1",
            2,
            &[("a", "a vase", 1, 1), ("b", "a cup", 2, 1)],
        ))
        .await;

    let event = events.next(LONG).await.expect("batch.failed");
    let Event::Failed(failed) = event else {
        panic!("expected batch.failed, got {event:?}")
    };
    assert_eq!(failed.batch_id.as_deref(), Some("refused-1"));
    assert_eq!(failed.reason, "storage_refused");
    assert!(failed.error.len() <= MAX_REASON);
    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0].properties, "x-sdbatch-error").as_deref(),
        Some("storage_refused")
    );
    assert!(
        !bucket_dir.join("refused-1/a/0.png").exists(),
        "the stored image was not taken back"
    );
    assert!(!bucket_dir.join("refused-1/manifest.json").exists());
    let m = worker.metrics();
    assert_eq!(
        metric(&m, "sdbatch_gpu_images_total"),
        2.0,
        "generated once"
    );
    assert_eq!(
        metric(
            &m,
            r#"sdbatch_dead_letters_total{reason="storage_refused"}"#
        ),
        1.0
    );
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        0
    );
    stack.broker.cleanup().await;
}

fn silent_worker(stack: &Stack, proxy: &AmqpProxy, extra: &[&str]) -> WorkerProcess {
    let mut args = vec!["--broker-timeout-secs", "2"];
    args.extend_from_slice(extra);
    WorkerProcess::spawn_env(
        &stack.prefix,
        &stack.s3,
        &stack.bucket,
        stack.logs.path(),
        "w1",
        &args,
        &[("AMQP_URL", &proxy.url())],
    )
}

/// The broker stops answering on the worker's connection right after it delivered a batch (the
/// socket stays open, as with a half-dead peer the heartbeat notices only after minutes). The
/// worker's next broker call runs out of time, it reconnects, and once the silent connection is
/// gone the redelivered batch completes from what was stored, without being generated again.
#[tokio::test(flavor = "multi_thread")]
async fn silent_broker_connection_times_out_and_the_batch_is_not_lost() {
    let stack = Stack::new("silent", 3).await;
    let proxy = AmqpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut events = stack.broker.watch_events().await;
    let worker = silent_worker(&stack, &proxy, &[]);
    stack
        .broker
        .publish(&batch("silent-1", 2, &[("a", "a lamp", 3, 1)]))
        .await;
    tokio::time::timeout(LONG, proxy.wait_frozen())
        .await
        .expect("the batch reached the worker");
    // The worker gives up on the silent connection and opens a new one.
    let start = Instant::now();
    while proxy.connections() < 2 {
        assert!(
            start.elapsed() < LONG,
            "no reconnect:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_ready(&worker).await;
    // The silent connection still holds the batch; once it closes, the broker redelivers it.
    proxy.kill_frozen();
    let event = events.next(LONG).await.expect("batch.completed");
    let Event::Completed(done) = event else {
        panic!("expected batch.completed, got {event:?}")
    };
    assert_eq!(done.batch_id, "silent-1");
    assert!(done.redelivered);
    assert!(events.drain(Duration::from_secs(1)).await.is_empty());
    let m = worker.metrics();
    assert_eq!(
        metric(&m, "sdbatch_gpu_images_total"),
        1.0,
        "generated once"
    );
    // Which broker call ran into the silence decides how the redelivery finds the batch: after
    // the manifest (republished) or before it (its stored image taken over). Either way, once.
    let republished = metric(&m, r#"sdbatch_batches_total{status="republished"}"#);
    assert!(
        republished == 1.0 || done.resumed_images == Some(1),
        "republished {republished}, resumed {:?}",
        done.resumed_images
    );
    assert!(worker.log_text().contains("did not finish within 2s"));
    stack.broker.cleanup().await;
}

/// SIGTERM while the broker is silent: the worker still exits within its grace period, and the
/// batch it could not acknowledge goes back to the queue.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_is_honoured_while_the_broker_is_silent() {
    let stack = Stack::new("silentterm", 3).await;
    let proxy = AmqpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut worker = silent_worker(&stack, &proxy, &["--grace-period-secs", "60"]);
    stack
        .broker
        .publish(&batch("silent-2", 2, &[("a", "a lamp", 3, 1)]))
        .await;
    tokio::time::timeout(LONG, proxy.wait_frozen())
        .await
        .expect("the batch reached the worker");
    let signalled = Instant::now();
    worker.signal(SIGTERM);
    let status = worker.wait(Duration::from_secs(60)).await;
    println!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "{}", worker.log_text());
    proxy.kill_frozen();
    let start = Instant::now();
    while stack.broker.ready(&stack.broker.topology.jobs_queue).await != 1 {
        assert!(
            start.elapsed() < LONG,
            "the batch was not returned to the queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.broker.cleanup().await;
}

/// `--grace-period-secs` near u64::MAX once panicked on SIGTERM (deadline overflow): refused at
/// start-up now, before anything is consumed.
#[tokio::test(flavor = "multi_thread")]
async fn absurd_grace_period_is_refused_at_start_up() {
    let stack = Stack::new("grace", 3).await;
    let mut worker = stack.worker("w1", &["--grace-period-secs", "18446744073709551615"]);
    assert!(!worker.wait(LONG).await.success());
    let log = worker.log_text();
    assert!(log.contains("is above 86400"), "{log}");
    stack.broker.cleanup().await;
}
