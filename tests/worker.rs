//! `sdbatch worker` end to end against a real RabbitMQ and a real S3 server (s3s-fs), on the tiny
//! model, CPU: the happy path and the fault scenarios. Every test has its own queue names, bucket
//! and S3 server, so tests are independent of order and leftovers.
mod common;

use common::broker::{WorkerProcess, http_get, metric};
use common::stack::{Stack, batch, completed};
use sdbatch::events::Event;
use sdbatch::queue::header_str;
use serde_json::json;
use std::time::Duration;

const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;
const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn batch_to_pngs_manifest_and_one_event() {
    let stack = Stack::new("happy", 3).await;
    let mut events = stack.broker.watch_events().await;
    let mut worker = stack.worker("w1", &["--max-batch", "2"]);
    stack
        .broker
        .publish(&batch(
            "shoes-1",
            3,
            &[
                ("sku-1", "a red sneaker", 1, 2),
                ("sku-2", "a leather bag", 2, 1),
            ],
        ))
        .await;

    let event = events.next(LONG).await.expect("an event");
    let Event::Completed(done) = event else {
        panic!("expected batch.completed, got {event:?}")
    };
    assert_eq!(done.batch_id, "shoes-1");
    assert_eq!(done.images.len(), 3);
    assert_eq!(done.worker_id, "w1");

    let mut expected = vec![
        "shoes-1/manifest.json".to_string(),
        "shoes-1/sku-1/0.png".into(),
        "shoes-1/sku-1/1.png".into(),
        "shoes-1/sku-2/0.png".into(),
    ];
    expected.sort();
    assert_eq!(stack.keys().await, expected);
    for record in &done.images {
        let png = stack
            .storage
            .get(&stack.bucket, &record.key)
            .await
            .unwrap()
            .unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        assert_eq!(png.len() as u64, record.bytes);
        let meta = stack
            .storage
            .head_metadata(&stack.bucket, &record.key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            meta.get("sdbatch-seed").map(String::as_str),
            Some(record.seed.to_string().as_str())
        );
    }
    // Image n of an item has seed + n.
    assert_eq!(
        done.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        vec![1, 2, 2]
    );
    let manifest = stack
        .storage
        .get(&stack.bucket, "shoes-1/manifest.json")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<sdbatch::events::BatchCompleted>(&manifest).unwrap(),
        done
    );

    // Exactly one event, nothing left in the queue, nothing dead-lettered.
    assert!(events.drain(Duration::from_secs(1)).await.is_empty());
    // The metrics count what was processed.
    let m = worker.metrics();
    assert_eq!(
        metric(&m, r#"sdbatch_batches_total{status="completed"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"sdbatch_images_total{status="completed"}"#),
        3.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sdbatch_gpu_images_total"), 3.0, "{m}");
    assert_eq!(
        metric(&m, "sdbatch_gpu_batches_total"),
        2.0,
        "max batch 2: 3 images in 2 GPU batches"
    );
    assert_eq!(metric(&m, "sdbatch_batch_seconds_count"), 1.0);
    assert_eq!(metric(&m, "sdbatch_upload_seconds_count"), 3.0);
    assert_eq!(metric(&m, "sdbatch_inflight_batches"), 0.0);
    let (status, body) = http_get(worker.metrics_port, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(worker.metrics_port, "/healthz").0, 200);
    worker.signal(SIGTERM);
    assert!(worker.wait(LONG).await.success());
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        0
    );
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.dead_queue).await,
        0
    );
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_message_is_dead_lettered_with_reason_and_worker_keeps_going() {
    let stack = Stack::new("invalid", 3).await;
    let mut events = stack.broker.watch_events().await;
    let _worker = stack.worker("w1", &[]);
    stack
        .broker
        .publish(br#"{"schema_version": 1, "batch_id": "bad-1", "items": [], "params": {}}"#)
        .await;
    stack.broker.publish(b"not json at all").await;
    stack
        .broker
        .publish(&batch("good-1", 2, &[("a", "a cat", 5, 1)]))
        .await;

    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(events.next(LONG).await.expect("three events"));
    }
    let failed: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Failed(f) => Some((f.batch_id.clone(), f.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            (Some("bad-1".into()), "items".into()),
            (None, "not_json".into())
        ]
    );
    assert_eq!(
        completed(&seen, "good-1"),
        1,
        "worker kept consuming after invalid messages"
    );

    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 2);
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error").unwrap())
        .collect();
    assert_eq!(reasons, vec!["items", "not_json"]);
    assert!(
        header_str(&dead[0].properties, "x-sdbatch-reason")
            .unwrap()
            .contains("item")
    );
    assert_eq!(
        dead[1].data, b"not json at all",
        "the dead letter keeps the original body"
    );
    let m = _worker.metrics();
    assert_eq!(
        metric(&m, r#"sdbatch_dead_letters_total{reason="items"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"sdbatch_dead_letters_total{reason="not_json"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"sdbatch_batches_total{status="completed"}"#),
        1.0,
        "{m}"
    );
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_outage_is_retried_then_succeeds() {
    let mut stack = Stack::new("s3down", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);
    worker.wait_ready(LONG).await;
    stack.s3.stop();
    stack
        .broker
        .publish(&batch("outage-1", 2, &[("a", "a lamp", 3, 1)]))
        .await;
    // The store is restarted once the worker has retried twice (counted live, while the
    // operation is still retrying), so the outage spans retries whatever the machine's speed.
    worker
        .wait_for_metric(r#"sdbatch_retries_total{cause="storage"}"#, 2.0, LONG)
        .await;
    stack.s3.restart();

    let event = events.next(LONG).await.expect("an event");
    assert!(
        matches!(&event, Event::Completed(c) if c.batch_id == "outage-1"),
        "{event:?}"
    );
    assert_eq!(stack.keys().await.len(), 2, "one image and the manifest");
    let retries = worker.log_text().matches("retrying").count();
    let counted = metric(
        &worker.metrics(),
        r#"sdbatch_retries_total{cause="storage"}"#,
    );
    println!("storage outage: {retries} retries logged ({counted} counted), batch completed once");
    assert!(retries >= 1);
    assert_eq!(counted, retries as f64);
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_failing_every_time_is_dead_lettered_after_the_delivery_limit() {
    let mut stack = Stack::new("poison", 2).await;
    let mut events = stack.broker.watch_events().await;
    // The store is down for good: every attempt fails transiently (after the in-process retries),
    // however often the batch is delivered.
    stack.s3.stop();
    let _worker = stack.worker("w1", &["--delivery-limit", "2"]);
    stack
        .broker
        .publish(&batch("poison-1", 1, &[("a", "a chair", 4, 1)]))
        .await;

    let event = events.next(LONG).await.expect("a batch.failed event");
    let Event::Failed(failed) = event else {
        panic!("expected batch.failed, got {event:?}")
    };
    assert_eq!(failed.batch_id.as_deref(), Some("poison-1"));
    assert_eq!(failed.reason, "delivery_limit");

    // The broker dead-letters it after the last nack.
    let start = std::time::Instant::now();
    let dead = loop {
        let d = stack.broker.drain_dead().await;
        if !d.is_empty() || start.elapsed() > LONG {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0].properties, "x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        0
    );
    let attempts = _worker
        .log_text()
        .matches("batch failed; requeueing")
        .count();
    println!("poison batch: {attempts} failed deliveries, then dead-lettered");
    assert_eq!(
        attempts, 3,
        "delivery limit 2 = the first delivery + 2 redeliveries"
    );
    stack.broker.cleanup().await;
}

/// A store that refuses the worker's credentials would fail every batch permanently and
/// dead-letter the whole queue: the worker refuses to start instead, naming the problem.
#[tokio::test(flavor = "multi_thread")]
async fn worker_with_refused_credentials_does_not_start() {
    let stack = Stack::new("badcreds", 2).await;
    stack
        .broker
        .publish(&batch("kept-1", 1, &[("a", "a chair", 4, 1)]))
        .await;
    let mut worker = WorkerProcess::spawn_env(
        &stack.prefix,
        &stack.s3,
        &stack.bucket,
        stack.logs.path(),
        "w1",
        &[],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret")],
    );
    let status = worker.wait(LONG).await;
    assert!(!status.success());
    let log = worker.log_text();
    assert!(
        log.contains("default bucket images") && log.contains("403"),
        "{log}"
    );
    assert!(!log.contains("wrong-secret"), "the secret leaked: {log}");
    // The message was never taken.
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        1
    );
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_batch_is_completed_by_another_with_identical_images() {
    let stack = Stack::new("sigkill", 3).await;
    let mut events = stack.broker.watch_events().await;
    let body = batch(
        "crash-1",
        8,
        &[
            ("a", "a red apple", 11, 2),
            ("b", "a green pear", 12, 2),
            ("c", "a blue plum", 13, 2),
        ],
    );
    let n = 6;

    // Batch size 1 everywhere: batched kernels are only bit-identical for the same batch shape,
    // and a resumed run regenerates a subset of the images.
    let mut first = stack.worker("w1", &["--max-batch", "1"]);
    stack.broker.publish(&body).await;
    // Killed once two of its images are stored (objects appear whole or not at all).
    let pngs = |keys: Vec<String>| keys.into_iter().filter(|k| k.ends_with(".png")).count();
    let start = std::time::Instant::now();
    while pngs(stack.keys().await) < 2 {
        assert!(
            start.elapsed() < LONG,
            "no image stored:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal(SIGKILL);
    first.wait(LONG).await;
    let stored = pngs(stack.keys().await);
    assert!(stored < n, "the first worker finished before the kill");

    let second = stack.worker("w2", &["--max-batch", "1"]);
    let event = events.next(LONG).await.expect("an event");
    let Event::Completed(done) = event else {
        panic!("{event:?}")
    };
    assert_eq!(done.worker_id, "w2");
    assert!(done.redelivered);
    assert_eq!(done.images.len(), n, "the event lists every image");
    assert_eq!(done.resumed_images, Some(stored));
    let generated = metric(&second.metrics(), "sdbatch_gpu_images_total") as usize;
    assert_eq!(
        generated,
        n - stored,
        "only the missing images are generated"
    );
    let keys = stack.keys().await;
    assert_eq!(
        keys.len(),
        n + 1,
        "6 images + manifest, no extra objects: {keys:?}"
    );

    // The same message through a clean run elsewhere gives the same bytes.
    let clean = Stack::new("sigkill-ref", 3).await;
    let mut clean_events = clean.broker.watch_events().await;
    let _w = clean.worker("ref", &["--max-batch", "1"]);
    clean.broker.publish(&body).await;
    let Some(Event::Completed(reference)) = clean_events.next(LONG).await else {
        panic!("no reference event")
    };
    for (a, b) in done.images.iter().zip(&reference.images) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.sha256, b.sha256, "{} differs from a clean run", a.key);
        let png = stack
            .storage
            .get(&stack.bucket, &a.key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(png.len() as u64, a.bytes);
    }
    assert!(
        events.drain(Duration::from_secs(1)).await.is_empty(),
        "one event only"
    );
    println!(
        "SIGKILL after {stored} of {n} images stored: the next worker generated {generated}, \
         sha256 of all {n} equal to a clean run"
    );
    stack.broker.cleanup().await;
    clean.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_batch_in_hand_and_exits_zero() {
    let stack = Stack::new("sigterm", 3).await;
    let mut events = stack.broker.watch_events().await;
    let mut worker = stack.worker("w1", &["--max-batch", "1"]);
    stack
        .broker
        .publish(&batch("term-1", 30, &[("a", "a blue vase", 21, 3)]))
        .await;
    worker
        .wait_for_metric("sdbatch_gpu_batches_total", 1.0, LONG)
        .await;
    worker.signal(SIGTERM);
    let status = worker.wait(LONG).await;
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        worker.log_text()
    );
    let event = events
        .next(Duration::from_secs(10))
        .await
        .expect("the batch completed before exit");
    assert!(
        matches!(&event, Event::Completed(c) if c.batch_id == "term-1"),
        "{event:?}"
    );
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        0,
        "acked, not requeued"
    );
    assert!(worker.log_text().contains("finishing the messages in hand"));
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_batch_with_manifest_is_not_regenerated() {
    let stack = Stack::new("redeliver", 3).await;
    let mut events = stack.broker.watch_events().await;
    let _worker = stack.worker("w1", &[]);
    let body = batch("again-1", 2, &[("a", "a kettle", 8, 1)]);
    stack.broker.publish(&body).await;
    let Some(Event::Completed(first)) = events.next(LONG).await else {
        panic!()
    };
    // The same message again (as after a lost ack): the event is republished, nothing regenerated.
    stack.broker.publish(&body).await;
    let Some(Event::Completed(second)) = events.next(LONG).await else {
        panic!()
    };
    assert!(second.redelivered);
    assert_eq!(first.images, second.images);
    assert_eq!(stack.keys().await.len(), 2);
    stack.broker.cleanup().await;
}

/// Safety checker (drop policy) and CLIP scores through the worker: the flagged image is not
/// stored and the event says so; the others carry their verdict, score and metadata.
#[tokio::test(flavor = "multi_thread")]
async fn safety_checker_and_clip_score_through_the_worker() {
    let stack = Stack::new("safety", 3).await;
    let mut events = stack.broker.watch_events().await;
    let clip = common::fixtures().join("tiny-clip");
    let worker = stack.worker(
        "w1",
        &[
            "--max-batch",
            "3",
            "--safety-policy",
            "drop",
            "--clip-model",
            clip.to_str().unwrap(),
        ],
    );
    let meta = common::meta();
    let b = &meta["batch"];
    let items: Vec<_> = (0..3)
        .map(|i| {
            json!({"id": format!("i{i}"), "prompt": b["prompts"][i], "negative_prompt": b["negative_prompts"][i],
                   "seed": b["seeds"][i]})
        })
        .collect();
    let body = serde_json::to_vec(&json!({
        "schema_version": 1, "batch_id": "safe-1", "items": items,
        "params": {"steps": b["num_inference_steps"], "guidance_scale": 7.5, "safety_checker": true}
    }))
    .unwrap();
    stack.broker.publish(&body).await;
    let event = events.next(LONG).await.expect("an event");
    let Event::Completed(done) = event else {
        panic!("{event:?}")
    };
    let verdicts: Vec<_> = done.images.iter().map(|i| i.nsfw).collect();
    assert_eq!(verdicts, vec![Some(false), Some(true), Some(false)]);
    let dropped = &done.images[1];
    assert_eq!(dropped.safety_action.as_deref(), Some("drop"));
    assert_eq!((dropped.bytes, dropped.sha256.as_str()), (0, ""));
    assert!(done.images.iter().all(|i| i.clip_score.is_some()));
    let keys = stack.keys().await;
    assert_eq!(
        keys,
        vec!["safe-1/i0/0.png", "safe-1/i2/0.png", "safe-1/manifest.json"]
    );
    let meta0 = stack
        .storage
        .head_metadata(&stack.bucket, "safe-1/i0/0.png")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meta0.get("sdbatch-nsfw").map(String::as_str), Some("false"));
    assert!(meta0.contains_key("sdbatch-clip-score"));
    let m = worker.metrics();
    assert_eq!(
        metric(&m, r#"sdbatch_safety_flagged_total{action="drop"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sdbatch_clip_score_count"), 3.0, "{m}");
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_up_and_calibration_file_are_a_no_op_on_the_cpu() {
    let stack = Stack::new("warmup", 3).await;
    let mut events = stack.broker.watch_events().await;
    let dir = tempfile::tempdir().unwrap();
    // Not a calibration file at all: on the CPU it is neither read nor rewritten.
    let file = dir.path().join("calibrations.json");
    std::fs::write(&file, "left alone").unwrap();
    let worker = stack.worker(
        "w1",
        &["--warm-up", "--calibration-file", file.to_str().unwrap()],
    );
    worker.wait_ready(LONG).await;
    let m = worker.metrics();
    assert_eq!(metric(&m, "sdbatch_warm_up_batches_total"), 0.0, "{m}");
    assert_eq!(metric(&m, "sdbatch_gpu_batches_total"), 0.0, "{m}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "left alone");
    assert!(
        !worker.log_text().contains("calibration file"),
        "{}",
        worker.log_text()
    );
    // Ready means ready: the first batch runs at the configured CPU batch size.
    stack
        .broker
        .publish(&batch("warm-1", 2, &[("a", "a lamp", 3, 2)]))
        .await;
    let event = events.next(LONG).await.expect("an event");
    assert!(
        matches!(&event, Event::Completed(c) if c.batch_id == "warm-1"
            && c.model_sha256.as_ref().is_some_and(|h| h.len() == 64)),
        "{event:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "left alone");
    stack.broker.cleanup().await;
}
