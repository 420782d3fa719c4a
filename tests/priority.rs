//! Priority lanes end to end against the real RabbitMQ and an S3 server, on the tiny model, CPU:
//! a high batch published behind a backlog of normal ones completes before the backlog drains,
//! and the normal lane keeps moving at the documented ratio (`--high-lane-ratio`). Everything is
//! read from the order of the `batch.completed` events; no sleeps.
mod common;

use common::broker::{Events, metric};
use common::stack::{Stack, batch};
use sdbatch::events::Event;
use sdbatch::queue::Lane;
use std::time::Duration;

const SIGTERM: i32 = 15;
/// The longest wait for any one event.
const LONG: Duration = Duration::from_secs(120);
const RATIO: usize = 2;
const NORMAL: usize = 10;
const HIGH: usize = 6;

fn lane_of(batch_id: &str) -> Lane {
    if batch_id.starts_with("high-") {
        Lane::High
    } else {
        Lane::Normal
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn high_batches_overtake_the_backlog_without_starving_it() {
    let stack = Stack::new("priority", 3).await;
    let mut events = stack.broker.watch_events().await;
    // The backlog first, then the worker: it finds the normal lane full.
    for i in 0..NORMAL {
        let id = format!("normal-{i}");
        let body = batch(&id, 2, &[("a", "a normal shoe", i as u64, 1)]);
        stack.broker.publish_to(Lane::Normal, &body).await;
    }
    // One message in hand at a time, one image per GPU batch: the completion order is the order
    // in which the worker took the messages in.
    let ratio = RATIO.to_string();
    let mut worker = stack.worker(
        "w1",
        &[
            "--max-batch",
            "1",
            "--prefetch",
            "1",
            "--high-lane-ratio",
            &ratio,
        ],
    );

    let mut order: Vec<String> = Vec::new();
    // The backlog is being worked on: now the urgent batches arrive.
    order.push(next_completed(&mut events, &stack).await);
    assert_eq!(lane_of(&order[0]), Lane::Normal);
    for i in 0..HIGH {
        let id = format!("high-{i}");
        let body = batch(&id, 2, &[("a", "an urgent shoe", 100 + i as u64, 1)]);
        stack.broker.publish_to(Lane::High, &body).await;
    }
    let published_high_after = order.len();
    while order.len() < NORMAL + HIGH {
        order.push(next_completed(&mut events, &stack).await);
    }

    let lanes: Vec<Lane> = order.iter().map(|id| lane_of(id)).collect();
    let letters: String = lanes
        .iter()
        .map(|l| if *l == Lane::High { 'H' } else { 'n' })
        .collect();
    println!("completion order: {letters}");
    let mut unique = order.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        NORMAL + HIGH,
        "a batch completed twice: {order:?}"
    );

    let first_high = lanes.iter().position(|l| *l == Lane::High).unwrap();
    let last_high = lanes.iter().rposition(|l| *l == Lane::High).unwrap();
    let last_normal = lanes.iter().rposition(|l| *l == Lane::Normal).unwrap();
    // High first: at most the one normal message already in hand when they were published
    // completes before the first high one...
    assert!(
        first_high <= published_high_after + 1,
        "the first high batch waited behind the backlog: {letters}"
    );
    // ... and every high batch is done before the backlog drains.
    assert!(
        last_high < last_normal,
        "the backlog drained first: {letters}"
    );

    // While both lanes had work, never more than RATIO high batches in a row, and the normal
    // lane kept moving.
    let window = &lanes[first_high..=last_high];
    let high_in_window = window.iter().filter(|l| **l == Lane::High).count();
    let normal_in_window = window.len() - high_in_window;
    let longest_run = letters[first_high..=last_high]
        .split('n')
        .map(str::len)
        .max()
        .unwrap_or(0);
    println!(
        "while both lanes had work: {high_in_window} high : {normal_in_window} normal \
         (longest high run {longest_run}, configured ratio {RATIO}:1)"
    );
    assert!(longest_run <= RATIO, "high run over the ratio: {letters}");
    assert_eq!(normal_in_window, HIGH.div_ceil(RATIO) - 1, "{letters}");

    // Per-lane metrics: every message counted in its lane (the acks follow the events).
    for (lane, n) in [("high", HIGH), ("normal", NORMAL)] {
        let acked = format!("sdbatch_lane_messages_acked_total{{lane=\"{lane}\"}}");
        worker.wait_for_metric(&acked, n as f64, LONG).await;
        let received = format!("sdbatch_lane_messages_received_total{{lane=\"{lane}\"}}");
        assert_eq!(metric(&worker.metrics(), &received), n as f64);
    }
    let t = &stack.broker.topology;
    assert_eq!(stack.broker.ready(&t.jobs_high_queue).await, 0);
    assert_eq!(stack.broker.ready(&t.jobs_queue).await, 0);
    worker.signal(SIGTERM);
    assert!(worker.wait(LONG).await.success());
    stack.broker.cleanup().await;
}

/// The batch id of the next event, which must be a `batch.completed`.
async fn next_completed(events: &mut Events, stack: &Stack) -> String {
    match events.next(LONG).await {
        Some(Event::Completed(done)) => done.batch_id,
        other => {
            let log = std::fs::read_to_string(stack.logs.path().join("w1.log"));
            panic!(
                "expected batch.completed, got {other:?}:\n{}",
                log.unwrap_or_default()
            )
        }
    }
}
