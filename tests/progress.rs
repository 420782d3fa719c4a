//! A producer's view of a batch: `batch.progress` events arrive in order with growing counts and
//! keys before `batch.completed`, the progress object mirrors them, and `sdbatch status` reports
//! completed (with keys), failed (with the dead letter's reason), running (a worker killed
//! mid-batch leaves its progress) and queued. Real RabbitMQ and S3 server, tiny model, CPU.
mod common;

use common::stack::Stack;
use sdbatch::events::{BatchProgress, Event};
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);

fn message(batch_id: &str, images: u32, steps: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a kettle", "seed": 1, "num_images": images}],
        "params": {"steps": steps, "scheduler": "ddim"}
    }))
    .unwrap()
}

/// `sdbatch status --json` for `ids`, one JSON object per batch.
fn status(stack: &Stack, ids: &[&str]) -> Vec<Value> {
    stack.cli_json("status", ids)
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_events_and_status_follow_a_batch_through_every_state() {
    let stack = Stack::new("progress", 3).await;
    let mut events = stack.broker.watch_events().await;
    // One image per GPU batch, a report for each (never for the last image).
    let worker = stack.worker("w1", &["--max-batch", "1", "--progress-interval-secs", "0"]);
    stack.broker.publish(&message("prog-1", 3, 4)).await;
    let mut reports: Vec<BatchProgress> = Vec::new();
    let done = loop {
        match events.next_any(LONG).await {
            Some(Event::Progress(p)) => reports.push(p),
            Some(Event::Completed(c)) => break c,
            other => panic!("unexpected {other:?}\n{}", worker.log_text()),
        }
    };
    let counts: Vec<(usize, usize)> = reports
        .iter()
        .map(|p| (p.images_done, p.images_total))
        .collect();
    assert_eq!(counts, [(1, 3), (2, 3)], "in order, one per GPU batch");
    assert_eq!(reports[0].keys, ["prog-1/a/0.png"]);
    assert_eq!(reports[1].keys, ["prog-1/a/0.png", "prog-1/a/1.png"]);
    for p in &reports {
        assert_eq!(p.batch_id, "prog-1");
        let eta = p.eta_seconds.expect("an ETA once an image is made");
        assert!(eta >= 0.0 && p.images_per_second.unwrap() > 0.0, "{p:?}");
    }
    assert_eq!(done.images.len(), 3);
    // A completed batch keeps its manifest, not its progress object (gone before the event).
    assert!(
        stack
            .storage
            .get(&stack.bucket, "prog-1/progress.json")
            .await
            .unwrap()
            .is_none()
    );

    // Status of the completed batch, a dead-lettered one and an unknown one.
    stack.broker.publish(&message("prog-bad", 1, 0)).await;
    let Some(Event::Failed(f)) = events.next(LONG).await else {
        panic!("prog-bad: expected batch.failed")
    };
    assert_eq!(f.reason, "steps");
    let s = status(&stack, &["prog-1", "prog-bad", "prog-never"]);
    assert_eq!(s[0]["status"], "completed", "{s:?}");
    assert_eq!(s[0]["images"], 3);
    assert_eq!(
        s[0]["keys"],
        json!([
            "s3://images/prog-1/a/0.png",
            "s3://images/prog-1/a/1.png",
            "s3://images/prog-1/a/2.png"
        ])
    );
    assert_eq!(s[1]["status"], "failed", "{s:?}");
    assert_eq!(s[1]["reason"], "steps");
    assert_eq!(s[2]["status"], "queued", "{s:?}");
    // Reading the dead letters returned them to the queue.
    assert_eq!(stack.broker.drain_dead().await.len(), 1);

    // A worker killed after its first report of a long batch leaves a running batch behind.
    stack.broker.publish(&message("prog-long", 16, 100)).await;
    let first = loop {
        match events.next_any(LONG).await {
            Some(Event::Progress(p)) if p.batch_id == "prog-long" => break p,
            Some(Event::Progress(_)) => continue,
            other => panic!("unexpected {other:?}\n{}", worker.log_text()),
        }
    };
    assert_eq!(first.images_done, 1);
    // The progress object is written in order, off the worker's loop: once it is there, the
    // worker is killed mid-batch.
    let key = "prog-long/progress.json";
    let deadline = tokio::time::Instant::now() + LONG;
    while stack
        .storage
        .get(&stack.bucket, key)
        .await
        .unwrap()
        .is_none()
    {
        assert!(tokio::time::Instant::now() < deadline, "no progress object");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(worker);
    let s = status(&stack, &["prog-long"]);
    assert_eq!(s[0]["status"], "running", "{s:?}");
    let done = s[0]["images_done"].as_u64().unwrap();
    assert!((1..16).contains(&done), "{s:?}");
    assert_eq!(s[0]["images_total"], 16);
    assert_eq!(s[0]["worker_id"], "w1");
    stack.broker.cleanup().await;
}
