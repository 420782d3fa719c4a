//! `sdbatch cancel` against the real broker and S3 server with the tiny model on the CPU: a
//! running batch stops (its GPU batch between UNet steps, its planned images dropped) and stores
//! nothing more; a batch sharing a GPU batch with a cancelled one completes; a batch cancelled
//! before delivery is acked without work; a finished batch is left alone. The pipeline's step
//! callback stopping a run is checked directly first.
mod common;

use common::broker::metric;
use common::stack::Stack;
use sdbatch::events::{BatchCancelled, BatchCompleted, Event};
use sdbatch::pipeline::prompt_weights::PromptSyntax;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, LoadOptions, StableDiffusion};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(240);

/// A batch of `images` images of one item at `side`² and `steps` DDIM steps.
fn message(batch_id: &str, images: u32, side: u32, steps: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a kettle", "seed": 1, "num_images": images}],
        "params": {"steps": steps, "scheduler": "ddim", "width": side, "height": side}
    }))
    .unwrap()
}

/// Runs `sdbatch <command> … --json` against the stack; one JSON object per line of output.
fn cli(stack: &Stack, command: &str, ids: &[&str]) -> Vec<Value> {
    stack.cli_json(command, ids)
}

/// Collects events until every batch of `want` has its final one (completed or cancelled).
async fn finals(
    events: &mut common::broker::Events,
    want: &[&str],
    log: impl Fn() -> String,
) -> HashMap<String, Event> {
    let mut got = HashMap::new();
    while want.iter().any(|id| !got.contains_key(*id)) {
        match events.next(LONG).await {
            Some(e @ (Event::Completed(_) | Event::Cancelled(_))) => {
                let id = e.batch_id().unwrap().to_string();
                got.entry(id).or_insert(e);
            }
            other => panic!("unexpected {other:?}\n{}", log()),
        }
    }
    got
}

fn cancelled(e: &Event) -> &BatchCancelled {
    match e {
        Event::Cancelled(c) => c,
        other => panic!("expected batch.cancelled, got {other:?}"),
    }
}

fn completed(e: &Event) -> &BatchCompleted {
    match e {
        Event::Completed(c) => c,
        other => panic!("expected batch.completed, got {other:?}"),
    }
}

/// The image objects stored under `batch_id/`.
async fn images_of(stack: &Stack, batch_id: &str) -> Vec<String> {
    let mut keys: Vec<String> = stack
        .storage
        .list(&stack.bucket, &format!("{batch_id}/"))
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".png"))
        .collect();
    keys.sort();
    keys
}

#[test]
fn the_step_callback_stops_a_run_between_steps() {
    let model = StableDiffusion::load(
        &common::model_dir(),
        LoadOptions::new(tch::Device::Cpu, tch::Kind::Float),
    )
    .unwrap();
    let params = GenerateParams {
        steps: 6,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let request = ImageRequest {
        prompt: "a kettle".into(),
        negative_prompt: None,
        seed: 1,
    };
    let mut seen = Vec::new();
    let stopped = model.generate(&[request], &params, &mut |i, n, _| {
        seen.push((i, n));
        if i == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    match stopped {
        Err(sdbatch::Error::Stopped { step: 2, steps: 6 }) => {}
        Err(e) => panic!("expected Stopped after step 2 of 6, got {e}"),
        Ok(_) => panic!("expected Stopped after step 2 of 6, got images"),
    }
    assert_eq!(seen, [(0, 6), (1, 6)], "no step runs after the Break");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_batch_and_spares_the_batch_sharing_its_gpu_batch() {
    let stack = Stack::new("cancel-run", 3).await;
    let mut events = stack.broker.watch_events().await;
    // At most 4 images on the GPU or waiting for storage: one GPU batch at a time, and the next
    // is planned only once the previous one's images are stored. 128² and many steps make a
    // GPU batch last seconds on the CPU (a cancel takes milliseconds to arrive).
    let worker = stack.worker(
        "w1",
        &[
            "--max-batch",
            "4",
            "--max-pending-images",
            "4",
            "--progress-interval-secs",
            "0",
        ],
    );
    worker.wait_ready(LONG).await;

    // 1. A running GPU batch holding only the cancelled batch's images stops; its planned
    //    images are dropped. The batch queued behind it completes.
    stack.broker.publish(&message("run-a", 6, 128, 150)).await;
    // Another shape: it cannot join run-a's GPU batches, and waits for the GPU.
    stack.broker.publish(&message("run-b", 2, 128, 40)).await;
    worker
        .wait_for_metric("sdbatch_gpu_batches_total", 1.0, LONG)
        .await;
    let said = cli(&stack, "cancel", &["run-a"]);
    assert_eq!(said[0]["outcome"], "cancel_requested", "{said:?}");
    assert_eq!(said[0]["before"]["status"], "queued", "no image stored yet");
    // 2. Two batches of a third shape share one GPU batch (both are taken in while run-b's
    //    GPU batch runs, and planned together once its images are stored); cancelling one lets
    //    the GPU batch finish for the other.
    stack.broker.publish(&message("share-c", 2, 128, 60)).await;
    stack.broker.publish(&message("share-d", 2, 128, 60)).await;
    worker
        .wait_for_metric("sdbatch_gpu_batches_total", 3.0, LONG)
        .await;
    let said = cli(&stack, "cancel", &["share-c"]);
    assert_eq!(said[0]["outcome"], "cancel_requested", "{said:?}");

    let got = finals(
        &mut events,
        &["run-a", "run-b", "share-c", "share-d"],
        || worker.log_text(),
    )
    .await;
    let a = cancelled(&got["run-a"]);
    assert!(a.stored_keys.is_empty(), "{a:?}");
    assert_eq!(a.images_total, 6);
    assert_eq!(a.not_stored_keys.len(), 6);
    assert_eq!(a.not_stored_keys[0], "run-a/a/0.png");
    assert!(images_of(&stack, "run-a").await.is_empty());
    assert_eq!(completed(&got["run-b"]).images.len(), 2);
    let c = cancelled(&got["share-c"]);
    assert!(c.stored_keys.is_empty(), "{c:?}");
    assert_eq!(c.not_stored_keys, ["share-c/a/0.png", "share-c/a/1.png"]);
    assert!(images_of(&stack, "share-c").await.is_empty());
    let d = completed(&got["share-d"]);
    assert_eq!(d.images.len(), 2);
    assert_eq!(
        images_of(&stack, "share-d").await,
        ["share-d/a/0.png", "share-d/a/1.png"]
    );

    let m = worker.metrics();
    // run-a's GPU batch stopped between steps; the shared one ran to its end.
    assert_eq!(metric(&m, "sdbatch_gpu_batches_stopped_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "sdbatch_gpu_batches_total"), 3.0, "{m}");
    assert_eq!(
        metric(&m, "sdbatch_cancel_requests_total{outcome=\"cancelled\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "sdbatch_batches_total{status=\"cancelled\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "sdbatch_images_total{status=\"cancelled\"}"),
        8.0
    );
    // Nothing was stored after the events: no progress object, no late image.
    let s = cli(&stack, "status", &["run-a", "run-b", "share-c", "share-d"]);
    let states: Vec<&str> = s.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(states, ["cancelled", "completed", "cancelled", "completed"]);
    for id in ["run-a", "share-c"] {
        assert!(images_of(&stack, id).await.is_empty());
        let progress = format!("{id}/progress.json");
        assert!(
            stack
                .storage
                .get(&stack.bucket, &progress)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        stack.broker.ready(&stack.broker.topology.jobs_queue).await,
        0
    );
    assert!(stack.broker.drain_dead().await.is_empty(), "nothing failed");
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_cancelled_before_delivery_is_acked_without_work_and_a_finished_one_is_left_alone()
{
    let stack = Stack::new("cancel-early", 3).await;
    let mut events = stack.broker.watch_events().await;
    // Queued with no worker running: the cancel finds it queued and leaves a tombstone (its
    // broadcast reaches nobody).
    stack.broker.publish(&message("early-q", 2, 64, 2)).await;
    let said = cli(&stack, "cancel", &["early-q"]);
    assert_eq!(said[0]["outcome"], "cancel_requested", "{said:?}");
    assert_eq!(said[0]["before"]["status"], "queued");
    assert!(
        stack
            .storage
            .get(&stack.bucket, "early-q/cancelled.json")
            .await
            .unwrap()
            .is_some()
    );

    let worker = stack.worker("w1", &[]);
    worker.wait_ready(LONG).await;
    let got = finals(&mut events, &["early-q"], || worker.log_text()).await;
    let q = cancelled(&got["early-q"]);
    assert!(q.stored_keys.is_empty());
    assert_eq!(q.not_stored_keys, ["early-q/a/0.png", "early-q/a/1.png"]);
    assert_eq!(q.worker_id, "w1");
    assert_eq!(metric(&worker.metrics(), "sdbatch_gpu_batches_total"), 0.0);

    // A control message that is not a cancel request is ignored; the worker goes on.
    stack
        .broker
        .publisher
        .publish_json(
            &stack.broker.topology.control_exchange,
            "",
            b"{\"command\": \"batch.delete\"}",
            None,
            false,
        )
        .await
        .unwrap();
    worker
        .wait_for_metric(
            "sdbatch_cancel_requests_total{outcome=\"invalid\"}",
            1.0,
            LONG,
        )
        .await;
    stack.broker.publish(&message("early-r", 1, 64, 2)).await;
    let got = finals(&mut events, &["early-r"], || worker.log_text()).await;
    assert_eq!(completed(&got["early-r"]).images.len(), 1);

    // Finished: left alone, and said so. Cancelled: asked again.
    let said = cli(&stack, "cancel", &["early-r", "early-q"]);
    assert_eq!(said[0]["outcome"], "already_completed", "{said:?}");
    assert_eq!(said[1]["outcome"], "already_cancelled", "{said:?}");
    assert!(
        stack
            .storage
            .get(&stack.bucket, "early-r/cancelled.json")
            .await
            .unwrap()
            .is_none(),
        "no tombstone for a finished batch"
    );
    let s = cli(&stack, "status", &["early-q", "early-r"]);
    assert_eq!(s[0]["status"], "cancelled", "{s:?}");
    assert_eq!(s[1]["status"], "completed", "{s:?}");
    // The repeated broadcast found nothing of early-q in hand.
    worker
        .wait_for_metric(
            "sdbatch_cancel_requests_total{outcome=\"not_here\"}",
            1.0,
            LONG,
        )
        .await;
    assert!(images_of(&stack, "early-q").await.is_empty());
    assert!(stack.broker.drain_dead().await.is_empty(), "nothing failed");
    stack.broker.cleanup().await;
}
