//! LoRAs through the worker: messages with different LoRA sets, all in hand at once, are
//! denoised in separate GPU batches, and their images equal `sdbatch generate` with the same
//! LoRAs; a LoRA the worker's folder lacks is dead-lettered before any work. Real RabbitMQ and S3
//! server, tiny model and the peft-made LoRAs of the fixtures, CPU.
mod common;

use common::broker::metric;
use common::stack::Stack;
use sdbatch::events::Event;
use sdbatch::queue::header_str;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);
const PROMPT: &str = "a red apple on a wooden table";
const SEED: u64 = 7;

fn message(batch_id: &str, loras: Option<Value>) -> Vec<u8> {
    let mut params = json!({"steps": 2, "guidance_scale": 7.5, "scheduler": "pndm"});
    if let Some(loras) = loras {
        params["loras"] = loras;
    }
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": "a", "prompt": PROMPT, "seed": SEED, "num_images": 2}],
        "params": params,
    }))
    .unwrap()
}

/// `sdbatch generate` of the item's two images in one batch, as the worker batches them, with
/// `loras` (NAME:WEIGHT flags): the first image's RGB8 pixels.
fn generate(loras: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        json!({"id": "a", "prompt": PROMPT, "seed": SEED}).to_string(),
    )
    .unwrap();
    let out = dir.path().join("out");
    let lora_dir = common::fixtures().join("loras");
    let model = common::model_dir();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--guidance",
        "7.5",
        "--scheduler",
        "pndm",
        "--images-per-prompt",
        "2",
        "--batch-size",
        "2",
        "--lora-dir",
        lora_dir.to_str().unwrap(),
    ];
    for l in loras {
        args.extend(["--lora", l]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("a_0.json")).unwrap()).unwrap();
    assert_eq!(
        sidecar["loras"].as_array().map(Vec::len).unwrap_or(0),
        loras.len()
    );
    image::open(out.join("a_0.png"))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

#[tokio::test(flavor = "multi_thread")]
async fn lora_sets_are_batched_apart_and_match_generate() {
    let stack = Stack::new("lora", 3).await;
    let mut events = stack.broker.watch_events().await;
    // All in the queue before the worker starts, so it holds them at once (prefetch 8): a
    // planner that ignored the LoRA set would put these 6 images into 2 batches of at most 4.
    let sets: [(&str, Option<Value>, &[&str]); 3] = [
        (
            "two",
            Some(json!([{"name": "style", "weight": 0.7}, {"name": "locon", "weight": -0.3}])),
            &["locon:-0.3", "style:0.7"],
        ),
        ("locon", Some(json!([{"name": "locon"}])), &["locon"]),
        ("plain", None, &[]),
    ];
    for (id, loras, _) in &sets {
        stack.broker.publish(&message(id, loras.clone())).await;
    }
    stack
        .broker
        .publish(&message("missing", Some(json!([{"name": "no-such-lora"}]))))
        .await;
    let lora_dir = common::fixtures().join("loras");
    let worker = stack.worker(
        "w1",
        &["--max-batch", "4", "--lora-dir", lora_dir.to_str().unwrap()],
    );

    let mut done = HashMap::new();
    let mut failed = Vec::new();
    while done.len() + failed.len() < 4 {
        match events.next(LONG).await.expect("an event") {
            Event::Completed(c) => {
                done.insert(c.batch_id.clone(), c);
            }
            Event::Failed(f) => failed.push(f),
            Event::Progress(_) => unreachable!("Events::next skips progress reports"),
            Event::Cancelled(c) => panic!("nothing is cancelled here: {c:?}"),
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].reason, "lora");
    assert_eq!(failed[0].batch_id.as_deref(), Some("missing"));
    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 1);
    let why = header_str(&dead[0].properties, "x-sdbatch-reason").unwrap();
    assert!(why.contains("unknown LoRA \"no-such-lora\""), "{why}");

    let m = worker.metrics();
    assert_eq!(metric(&m, "sdbatch_gpu_images_total"), 6.0, "{m}");
    assert_eq!(
        metric(&m, "sdbatch_gpu_batches_total"),
        3.0,
        "one GPU batch per LoRA set"
    );
    for (id, _, flags) in &sets {
        let c = &done[*id];
        let recorded: Vec<String> = c
            .params
            .loras
            .iter()
            .flatten()
            .map(|l| format!("{}:{}", l.name, l.weight))
            .collect();
        let expected: Vec<String> = flags
            .iter()
            .map(|f| {
                if f.contains(':') {
                    f.to_string()
                } else {
                    format!("{f}:1")
                }
            })
            .collect();
        assert_eq!(recorded, expected, "{id}: the event records the set");
        let key = &c.images.iter().find(|i| i.n == 0).unwrap().key;
        let png = stack
            .storage
            .get(&stack.bucket, key)
            .await
            .unwrap()
            .unwrap();
        let stored = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
        // The same batch composition on the same device: the same bits.
        assert!(
            stored == generate(flags),
            "{id}: worker and generate differ"
        );
    }
    let distinct: std::collections::HashSet<&str> = done
        .values()
        .map(|c| c.images.iter().find(|i| i.n == 0).unwrap().sha256.as_str())
        .collect();
    assert_eq!(distinct.len(), 3, "each LoRA set gives its own image");
    stack.broker.cleanup().await;
}
