//! img2img through the worker: one message mixing a txt2img item and img2img items (an init image
//! in the bucket and one in a `data:` URI) completes, its txt2img and img2img images run in
//! separate GPU batches, the img2img images are the pipeline's own `generate_with` on the same
//! inputs, and bad inputs are dead-lettered with their reason before any work, storing nothing.
//! Real RabbitMQ and S3 server (s3s-fs), tiny model, CPU.
mod common;

use base64::Engine as _;
use common::broker::metric;
use common::stack::Stack;
use sdbatch::events::Event;
use sdbatch::pipeline::prompt_weights::PromptSyntax;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{GenerateParams, ImageRequest, Img2Img, RgbImage};
use sdbatch::queue::header_str;
use serde_json::json;
use sha2::Digest;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);
const STEPS: usize = 4;
const STRENGTH: f64 = 0.5;

fn rgb(img: image::RgbImage) -> RgbImage {
    RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    }
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_txt2img_and_img2img_batches_complete_and_bad_inputs_are_dead_lettered() {
    let stack = Stack::new("img2img", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &["--max-batch", "4"]);

    // Two init images: the fixture (64x64, the tiny model's size) in the bucket, and the same
    // picture flipped, as a data URI.
    let init_bytes = std::fs::read(common::fixtures().join("img2img/init.png")).unwrap();
    let init = image::load_from_memory(&init_bytes).unwrap().to_rgb8();
    let flipped = image::imageops::flip_horizontal(&init);
    let flipped_png = png(&flipped);
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&flipped_png)
    );
    let put = |key: &'static str, bytes: Vec<u8>| {
        let storage = &stack.storage;
        let bucket = &stack.bucket;
        async move {
            storage
                .put(bucket, key, bytes, "application/octet-stream", &[])
                .await
                .unwrap()
        }
    };
    put("inputs/init.png", init_bytes.clone()).await;
    put("inputs/notes.png", b"these are not pixels".to_vec()).await;
    put(
        "inputs/huge.png",
        vec![0u8; sdbatch::message::MAX_INIT_IMAGE_BYTES + 1],
    )
    .await;

    let message = |batch_id: &str, items: serde_json::Value, strength: f64| {
        serde_json::to_vec(&json!({
            "schema_version": 1,
            "batch_id": batch_id,
            "items": items,
            "params": {"steps": STEPS, "guidance_scale": 7.5, "scheduler": "euler",
                       "strength": strength}
        }))
        .unwrap()
    };
    let body = message(
        "mix-1",
        json!([
            {"id": "t", "prompt": "a kettle", "seed": 5},
            {"id": "s", "prompt": "a teapot", "seed": 7, "init_image": "s3://images/inputs/init.png"},
            {"id": "d", "prompt": "a teapot", "negative_prompt": "blurry", "seed": 9,
             "init_image": data_uri}
        ]),
        STRENGTH,
    );
    stack.broker.publish(&body).await;
    let Some(Event::Completed(done)) = events.next(LONG).await else {
        panic!("no completion: {}", worker.log_text())
    };
    assert_eq!(done.batch_id, "mix-1");
    assert_eq!(done.params.strength, Some(STRENGTH));
    let records: Vec<(&str, Option<&str>, Option<&str>)> = done
        .images
        .iter()
        .map(|r| {
            (
                r.item_id.as_str(),
                r.init_image.as_deref(),
                r.init_image_sha256.as_deref(),
            )
        })
        .collect();
    let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let (init_sha, flipped_sha) = (sha(&init_bytes), sha(&flipped_png));
    assert_eq!(
        records,
        [
            ("t", None, None),
            (
                "s",
                Some("s3://images/inputs/init.png"),
                Some(init_sha.as_str())
            ),
            ("d", Some("data:"), Some(flipped_sha.as_str())),
        ]
    );
    // The txt2img image and the two img2img images ran as two GPU batches, never mixed.
    let metrics = worker.metrics();
    assert_eq!(metric(&metrics, "sdbatch_gpu_batches_total"), 2.0);
    assert_eq!(metric(&metrics, "sdbatch_gpu_images_total"), 3.0);

    // The img2img images are the pipeline's own, on the same inputs in the same batch.
    let model = common::load_cpu();
    let params = GenerateParams {
        steps: STEPS,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Euler,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let requests = [
        ImageRequest {
            prompt: "a teapot".into(),
            negative_prompt: None,
            seed: 7,
        },
        ImageRequest {
            prompt: "a teapot".into(),
            negative_prompt: Some("blurry".into()),
            seed: 9,
        },
    ];
    let inits = [rgb(init.clone()), rgb(flipped)];
    let ours = model
        .generate_with(
            &requests,
            &params,
            Some(Img2Img {
                images: &inits,
                strength: STRENGTH,
            }),
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    for (record, expected) in done.images[1..].iter().zip(&ours.images) {
        let stored = stack
            .storage
            .get(&stack.bucket, &record.key)
            .await
            .unwrap()
            .unwrap();
        let stored = image::load_from_memory(&stored).unwrap().to_rgb8();
        common::assert_images_match(&record.key, stored.as_raw(), &expected.pixels);
    }
    // And not a txt2img image of the same seed: the init image mattered.
    let txt2img = model
        .generate(
            &requests[..1],
            &params,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    assert_ne!(txt2img.images[0].pixels, ours.images[0].pixels);

    // Bad inputs: each message dead-lettered with its reason before any work, nothing stored.
    let cases = [
        (
            "missing",
            "s3://images/inputs/nope.png",
            0.5,
            "init_image_missing",
        ),
        (
            "not-image",
            "s3://images/inputs/notes.png",
            0.5,
            "init_image_unreadable",
        ),
        (
            "too-large",
            "s3://images/inputs/huge.png",
            0.5,
            "init_image_too_large",
        ),
        ("strength-0", "s3://images/inputs/init.png", 0.0, "strength"),
    ];
    for (id, uri, strength, _) in cases {
        let items = json!([{"id": "t", "prompt": "a kettle", "seed": 1},
                           {"id": "i", "prompt": "a teapot", "seed": 2, "init_image": uri}]);
        stack.broker.publish(&message(id, items, strength)).await;
    }
    for (id, _, _, reason) in cases {
        let Some(Event::Failed(failed)) = events.next(LONG).await else {
            panic!("{id}: expected batch.failed")
        };
        assert_eq!(failed.batch_id.as_deref(), Some(id));
        assert_eq!(failed.reason, reason, "{id}: {}", failed.error);
        assert!(failed.error.len() <= 512, "{}", failed.error);
    }
    let dead = stack.broker.drain_dead().await;
    let reasons: Vec<Option<String>> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error"))
        .collect();
    assert_eq!(
        reasons,
        cases.map(|c| Some(c.3.to_string())).to_vec(),
        "dead letters"
    );
    let metrics = worker.metrics();
    assert_eq!(
        metric(&metrics, "sdbatch_gpu_batches_total"),
        2.0,
        "no work"
    );
    let mut keys = stack.keys().await;
    keys.retain(|k| !k.starts_with("inputs/"));
    assert_eq!(
        keys,
        [
            "mix-1/d/0.png",
            "mix-1/manifest.json",
            "mix-1/s/0.png",
            "mix-1/t/0.png"
        ]
    );
    stack.broker.cleanup().await;
}

/// A store that fails while an init image is fetched: the fetch is retried like an upload, and the
/// message completes once the store is back (the init image's bytes as recorded).
#[tokio::test(flavor = "multi_thread")]
async fn init_image_fetch_is_retried_through_a_storage_outage() {
    let mut stack = Stack::new("i2i-s3down", 3).await;
    let mut events = stack.broker.watch_events().await;
    let init_bytes = std::fs::read(common::fixtures().join("img2img/init.png")).unwrap();
    stack
        .storage
        .put(
            &stack.bucket,
            "inputs/init.png",
            init_bytes.clone(),
            "image/png",
            &[],
        )
        .await
        .unwrap();
    let worker = stack.worker("w1", &[]);
    worker.wait_ready(LONG).await;
    // The fetch is the delivery's first store operation, so the retries below are its.
    stack.s3.stop();
    let body = serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": "outage-i2i",
        "items": [{"id": "i", "prompt": "a teapot", "seed": 2,
                   "init_image": "s3://images/inputs/init.png"}],
        "params": {"steps": 2, "strength": 1.0}
    }))
    .unwrap();
    stack.broker.publish(&body).await;
    // Restarted once the worker has retried twice (counted live, while the fetch still retries).
    worker
        .wait_for_metric(r#"sdbatch_retries_total{cause="storage"}"#, 2.0, LONG)
        .await;
    stack.s3.restart();
    let Some(Event::Completed(done)) = events.next(LONG).await else {
        panic!("no completion: {}", worker.log_text())
    };
    assert_eq!(done.batch_id, "outage-i2i");
    assert_eq!(
        done.images[0].init_image_sha256.as_deref(),
        Some(hex::encode(sha2::Sha256::digest(&init_bytes)).as_str())
    );
    stack.broker.cleanup().await;
}
