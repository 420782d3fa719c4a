//! A slow store slows the GPU down instead of filling host memory: at most
//! `--max-pending-images` images are on the GPU or waiting for their upload. The store is the real
//! S3 server behind a proxy that holds each of its responses for 300 ms. Real RabbitMQ, tiny
//! model, CPU.
mod common;

use common::broker::{WorkerProcess, metric};
use common::slow_proxy::SlowProxy;
use common::stack::Stack;
use sdbatch::events::Event;
use serde_json::json;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);
const SIGTERM: i32 = 15;

/// Runs one 16-image batch through a worker allowed `max_pending` images in flight; returns the
/// largest `sdbatch_pending_images` seen while it ran and the worker's peak RSS in KiB.
async fn run(stack: &Stack, proxy: &SlowProxy, name: &str, max_pending: &str) -> (f64, u64) {
    let mut events = stack.broker.watch_events().await;
    let mut worker = WorkerProcess::spawn_via(
        &stack.prefix,
        &stack.s3,
        &proxy.endpoint,
        &stack.bucket,
        stack.logs.path(),
        name,
        &["--max-batch", "2", "--max-pending-images", max_pending],
        &[],
    );
    worker.wait_ready(LONG).await;
    assert!(worker.metrics().contains("sdbatch_pending_images "));
    let batch_id = format!("slow-{name}");
    let body = json!({"schema_version": 1, "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a lamp", "seed": 7, "num_images": 16}],
        "params": {"steps": 2, "width": 128, "height": 128}});
    stack
        .broker
        .publish(&serde_json::to_vec(&body).unwrap())
        .await;
    // Sampled while the batch runs (the gauge is the worker's own count, so a sample can miss the
    // largest value but never show one above it).
    let mut max_seen: f64 = 0.0;
    let started = std::time::Instant::now();
    loop {
        max_seen = max_seen.max(metric(&worker.metrics(), "sdbatch_pending_images"));
        match events.next(Duration::from_millis(20)).await {
            Some(Event::Completed(c)) if c.batch_id == batch_id => {
                assert_eq!(c.images.len(), 16);
                break;
            }
            Some(other) => panic!("{other:?}\n{}", worker.log_text()),
            None => assert!(
                started.elapsed() < LONG,
                "batch never completed:\n{}",
                worker.log_text()
            ),
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // The event comes before the ack: a graceful stop acks the batch, so it is not redelivered
    // to the next run's worker on the same queue (a kill here once was).
    worker.signal(SIGTERM);
    let status = worker.wait(LONG).await;
    assert!(status.success(), "{status:?}\n{}", worker.log_text());
    (max_seen, hwm_kib)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_store_holds_the_gpu_back_instead_of_filling_memory() {
    let stack = Stack::new("slow-s3", 3).await;
    let upstream = format!("127.0.0.1:{}", stack.s3.port()).parse().unwrap();
    let proxy = SlowProxy::start(upstream, Duration::from_millis(300)).await;

    let (bounded, bounded_rss) = run(&stack, &proxy, "bounded", "4").await;
    // For comparison only (how far a worker runs ahead of a slow store depends on the machine).
    let (loose, loose_rss) = run(&stack, &proxy, "loose", "256").await;
    println!(
        "slow store (300 ms per response), 16 images of 128x128: --max-pending-images 4 → at most \
         {bounded} in flight, peak RSS {} MiB; 256 → {loose} in flight, peak RSS {} MiB",
        bounded_rss / 1024,
        loose_rss / 1024
    );
    assert!(bounded <= 4.0, "{bounded} images in flight, limit 4");
    let keys = stack.keys().await;
    assert_eq!(
        keys.len(),
        2 * 17,
        "16 images and a manifest per run: {keys:?}"
    );
    stack.broker.cleanup().await;
}
