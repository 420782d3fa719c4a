//! Inpainting and the hires fix through the worker: one message mixing txt2img, img2img and
//! inpainting items completes in one GPU batch per kind, its images are the pipeline's own on the
//! same inputs, and bad masks are dead-lettered with their reason before any work; a hires
//! message stores the larger images of `generate_hires`; a worker with an inpainting model only
//! inpaints. Real RabbitMQ and S3 server (s3s-fs), tiny models, CPU.
mod common;

use base64::Engine as _;
use common::broker::metric;
use common::stack::Stack;
use sdbatch::events::{BatchCompleted, Event};
use sdbatch::pipeline::hires::{Hires, Upscaler};
use sdbatch::pipeline::prompt_weights::PromptSyntax;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::{
    GenerateParams, GrayImage, ImageRequest, Img2Img, Inpaint, LoadOptions, RgbImage,
    StableDiffusion,
};
use sdbatch::queue::header_str;
use serde_json::json;
use sha2::Digest;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);
const STEPS: usize = 4;

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

fn params(scheduler: SchedulerKind) -> GenerateParams {
    GenerateParams {
        steps: STEPS,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        scheduler,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: PromptSyntax::Plain,
        loras: Vec::new(),
    }
}

fn request(prompt: &str, seed: u64) -> ImageRequest {
    ImageRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        seed,
    }
}

/// The stored image of `record`, decoded.
async fn stored(stack: &Stack, key: &str) -> image::RgbImage {
    let bytes = stack
        .storage
        .get(&stack.bucket, key)
        .await
        .unwrap()
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

async fn completed(
    events: &mut common::broker::Events,
    worker: &common::broker::WorkerProcess,
) -> BatchCompleted {
    match events.next(LONG).await {
        Some(Event::Completed(done)) => done,
        other => panic!("no completion: {other:?}\n{}", worker.log_text()),
    }
}

struct Inputs {
    init: image::RgbImage,
    init_png: Vec<u8>,
    mask: image::RgbImage,
    mask_png: Vec<u8>,
}

/// The fixtures' 64x64 init image and mask, stored in the bucket under `inputs/`, with a
/// half-size mask and a text file beside them for the refusals.
async fn put_inputs(stack: &Stack) -> Inputs {
    let init_png = std::fs::read(common::fixtures().join("img2img/init.png")).unwrap();
    let mask_png = std::fs::read(common::fixtures().join("inpaint/mask.png")).unwrap();
    let init = image::load_from_memory(&init_png).unwrap().to_rgb8();
    let mask = image::load_from_memory(&mask_png).unwrap().to_rgb8();
    let small_mask = image::imageops::resize(&mask, 32, 32, image::imageops::FilterType::Nearest);
    for (key, bytes) in [
        ("inputs/init.png", init_png.clone()),
        ("inputs/mask.png", mask_png.clone()),
        ("inputs/mask-32.png", png(&small_mask)),
        ("inputs/notes.png", b"not pixels".to_vec()),
        ("inputs/black.png", png(&image::RgbImage::new(64, 64))),
    ] {
        stack
            .storage
            .put(&stack.bucket, key, bytes, "image/png", &[])
            .await
            .unwrap();
    }
    Inputs {
        init,
        init_png,
        mask,
        mask_png,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn txt2img_img2img_and_inpainting_items_run_apart_and_bad_masks_are_dead_lettered() {
    let stack = Stack::new("inpaint", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &["--max-batch", "4"]);
    let inputs = put_inputs(&stack).await;
    // The second inpainting item's mask is the same picture inverted, as a data URI.
    let mut inverted = inputs.mask.clone();
    image::imageops::invert(&mut inverted);
    let inverted_png = png(&inverted);
    let data_mask = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&inverted_png)
    );
    let message = |batch_id: &str, items: serde_json::Value| {
        serde_json::to_vec(&json!({
            "schema_version": 1,
            "batch_id": batch_id,
            "items": items,
            "params": {"steps": STEPS, "guidance_scale": 7.5, "scheduler": "euler"}
        }))
        .unwrap()
    };
    let init = "s3://images/inputs/init.png";
    let body = message(
        "mix-3",
        json!([
            {"id": "t", "prompt": "a kettle", "seed": 5},
            {"id": "i", "prompt": "a teapot", "seed": 7, "init_image": init},
            {"id": "m", "prompt": "a teapot on a beach", "seed": 9, "init_image": init,
             "mask_image": "s3://images/inputs/mask.png"},
            {"id": "n", "prompt": "a teapot in snow", "seed": 11, "init_image": init,
             "mask_image": data_mask}
        ]),
    );
    stack.broker.publish(&body).await;
    let done = completed(&mut events, &worker).await;
    assert_eq!(done.batch_id, "mix-3");
    // diffusers' defaults: 0.8 for img2img, 1.0 for inpainting.
    assert_eq!(done.params.strength, Some(0.8));
    assert_eq!(done.params.inpaint_strength, Some(1.0));
    let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let records: Vec<(&str, Option<&str>, Option<&str>)> = done
        .images
        .iter()
        .map(|r| {
            (
                r.item_id.as_str(),
                r.mask_image.as_deref(),
                r.mask_image_sha256.as_deref(),
            )
        })
        .collect();
    let (mask_sha, inverted_sha) = (sha(&inputs.mask_png), sha(&inverted_png));
    assert_eq!(
        records,
        [
            ("t", None, None),
            ("i", None, None),
            (
                "m",
                Some("s3://images/inputs/mask.png"),
                Some(mask_sha.as_str())
            ),
            ("n", Some("data:"), Some(inverted_sha.as_str())),
        ]
    );
    assert_eq!(
        done.images[2].init_image_sha256.as_deref(),
        Some(sha(&inputs.init_png).as_str())
    );
    // One GPU batch per kind: txt2img, img2img, inpainting.
    let metrics = worker.metrics();
    assert_eq!(metric(&metrics, "sdbatch_gpu_batches_total"), 3.0);
    assert_eq!(metric(&metrics, "sdbatch_gpu_images_total"), 4.0);

    // Each image is the pipeline's own on the same inputs, in the same batches.
    let model = common::load_cpu();
    let p = params(SchedulerKind::Euler);
    let t = model
        .generate(
            &[request("a kettle", 5)],
            &p,
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    let init_rgb = rgb(inputs.init.clone());
    let i = model
        .generate_with(
            &[request("a teapot", 7)],
            &p,
            Some(Img2Img {
                images: std::slice::from_ref(&init_rgb),
                strength: 0.8,
            }),
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    let inits = [init_rgb.clone(), init_rgb.clone()];
    let masks = [
        GrayImage::from_rgb(&rgb(inputs.mask.clone())),
        GrayImage::from_rgb(&rgb(inverted)),
    ];
    let inpainted = model
        .generate_inpaint(
            &[
                request("a teapot on a beach", 9),
                request("a teapot in snow", 11),
            ],
            &p,
            Inpaint {
                images: &inits,
                masks: &masks,
                strength: 1.0,
                mask_blur: 0.0,
                padding_mask_crop: None,
            },
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    let expected = [
        &t.images[0],
        &i.images[0],
        &inpainted.images[0],
        &inpainted.images[1],
    ];
    for (record, want) in done.images.iter().zip(expected) {
        let got = stored(&stack, &record.key).await;
        common::assert_images_match(&record.key, got.as_raw(), &want.pixels);
    }
    // The masks mattered: the two inpaintings keep opposite parts of the init image.
    assert_ne!(inpainted.images[0].pixels, inpainted.images[1].pixels);

    // Bad masks: dead-lettered with their reason before any work, nothing stored.
    let cases = [
        (
            "mask-missing",
            json!("s3://images/inputs/nope.png"),
            "mask_image_missing",
        ),
        (
            "mask-text",
            json!("s3://images/inputs/notes.png"),
            "mask_image_unreadable",
        ),
        (
            "mask-size",
            json!("s3://images/inputs/mask-32.png"),
            "mask_image_size",
        ),
    ];
    for (id, mask, _) in &cases {
        let items = json!([{"id": "t", "prompt": "a kettle", "seed": 1},
                           {"id": "m", "prompt": "a teapot", "seed": 2, "init_image": init,
                            "mask_image": mask}]);
        stack.broker.publish(&message(id, items)).await;
    }
    // A mask without an init image: refused when read.
    let alone = json!([{"id": "m", "prompt": "a teapot", "seed": 2,
                        "mask_image": "s3://images/inputs/mask.png"}]);
    stack.broker.publish(&message("mask-alone", alone)).await;
    // An all-black mask with padding_mask_crop: no area to crop to, refused when read.
    let black = serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": "mask-black",
        "items": [{"id": "m", "prompt": "a teapot", "seed": 2, "init_image": init,
                   "mask_image": "s3://images/inputs/black.png"}],
        "params": {"steps": STEPS, "scheduler": "euler", "padding_mask_crop": 8}
    }))
    .unwrap();
    stack.broker.publish(&black).await;
    let want: Vec<(&str, &str)> = cases
        .iter()
        .map(|c| (c.0, c.2))
        .chain([("mask-alone", "mask_image"), ("mask-black", "mask_image")])
        .collect();
    for (id, reason) in &want {
        let Some(Event::Failed(failed)) = events.next(LONG).await else {
            panic!("{id}: expected batch.failed")
        };
        assert_eq!(failed.batch_id.as_deref(), Some(*id));
        assert_eq!(failed.reason, *reason, "{id}: {}", failed.error);
        assert!(failed.error.contains("mask_image"), "{}", failed.error);
    }
    let dead = stack.broker.drain_dead().await;
    let reasons: Vec<Option<String>> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error"))
        .collect();
    let want_reasons: Vec<Option<String>> = want.iter().map(|w| Some(w.1.to_string())).collect();
    assert_eq!(reasons, want_reasons, "dead letters");
    assert_eq!(
        metric(&worker.metrics(), "sdbatch_gpu_batches_total"),
        3.0,
        "no work for the refused messages"
    );
    let mut keys = stack.keys().await;
    keys.retain(|k| !k.starts_with("inputs/"));
    assert_eq!(
        keys,
        [
            "mix-3/i/0.png",
            "mix-3/m/0.png",
            "mix-3/manifest.json",
            "mix-3/n/0.png",
            "mix-3/t/0.png"
        ]
    );
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hires_message_stores_the_larger_images_of_generate_hires() {
    let stack = Stack::new("hires", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &["--max-batch", "4"]);
    let model = common::load_cpu();
    let requests = [request("a kettle", 5), request("a teapot", 6)];
    // One message per upscaler, the second sent once the first completed: each runs as two GPU
    // batches, its first passes at 64x64 and then its second passes at 128x128.
    for (n, upscaler) in [Upscaler::Latent, Upscaler::Lanczos]
        .into_iter()
        .enumerate()
    {
        let hires = Hires {
            scale: 2.0,
            steps: 4,
            strength: 0.5,
            upscaler,
        };
        let body = serde_json::to_vec(&json!({
            "schema_version": 1,
            "batch_id": format!("hires-{n}"),
            "items": [{"id": "a", "prompt": "a kettle", "seed": 5},
                      {"id": "b", "prompt": "a teapot", "seed": 6}],
            "params": {"steps": STEPS, "guidance_scale": 7.5, "scheduler": "euler_ancestral",
                       "hires": {"scale": 2, "steps": 4, "strength": 0.5,
                                 "upscaler": upscaler.name()}}
        }))
        .unwrap();
        stack.broker.publish(&body).await;
        let done = completed(&mut events, &worker).await;
        assert_eq!(done.params.hires, Some(hires));
        assert_eq!((done.params.width, done.params.height), (64, 64));
        assert!(
            done.images
                .iter()
                .all(|r| (r.width, r.height) == (128, 128))
        );
        assert_eq!(
            metric(&worker.metrics(), "sdbatch_gpu_batches_total"),
            2.0 * (n + 1) as f64,
            "{upscaler:?}: one GPU batch per pass"
        );
        assert_eq!(
            metric(&worker.metrics(), "sdbatch_gpu_images_total"),
            4.0 * (n + 1) as f64,
            "{upscaler:?}: both images in each"
        );
        // The same images as the pipeline's one-call hires fix.
        let out = model
            .generate_hires(
                &requests,
                &params(SchedulerKind::EulerAncestral),
                hires,
                &mut sdbatch::pipeline::ignore_steps,
            )
            .unwrap();
        for (record, want) in done.images.iter().zip(&out.images) {
            let got = stored(&stack, &record.key).await;
            assert_eq!(got.dimensions(), (128, 128));
            common::assert_images_match(&record.key, got.as_raw(), &want.pixels);
        }
        // The embedded parameters say how it was made, as AUTOMATIC1111 writes them.
        let bytes = stack
            .storage
            .get(&stack.bucket, &done.images[0].key)
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let want = format!(
            "Hires upscale: 2, Hires steps: 4, Hires upscaler: {}",
            upscaler.a1111_name()
        );
        assert!(
            text.contains("Size: 64x64") && text.contains(&want),
            "no hires parameters in the PNG"
        );
    }
    stack.broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inpainting_model_worker_refuses_items_without_a_mask_and_inpaints_the_rest() {
    let stack = Stack::new("inpaint-model", 3).await;
    let mut events = stack.broker.watch_events().await;
    let model_dir = common::fixtures().join("tiny-sd-inpaint");
    let worker = stack.worker("w1", &["--model", model_dir.to_str().unwrap()]);
    let inputs = put_inputs(&stack).await;
    let message = |batch_id: &str, items: serde_json::Value, extra: serde_json::Value| {
        let mut params = json!({"steps": STEPS, "scheduler": "ddim"});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&json!({"schema_version": 1, "batch_id": batch_id,
                                   "items": items, "params": params}))
        .unwrap()
    };
    let init = "s3://images/inputs/init.png";
    let mask = "s3://images/inputs/mask.png";
    stack
        .broker
        .publish(&message(
            "no-mask",
            json!([{"id": "m", "prompt": "a", "init_image": init, "mask_image": mask},
                   {"id": "t", "prompt": "a kettle"}]),
            json!({}),
        ))
        .await;
    stack
        .broker
        .publish(&message(
            "hires",
            json!([{"id": "t", "prompt": "a kettle"}]),
            json!({"hires": {"scale": 2}}),
        ))
        .await;
    stack
        .broker
        .publish(&message(
            "inpaint",
            json!([{"id": "m", "prompt": "a teapot on a beach", "seed": 3,
                    "init_image": init, "mask_image": mask}]),
            json!({"strength": 0.75}),
        ))
        .await;
    for (id, reason) in [("no-mask", "mask_image"), ("hires", "hires")] {
        let Some(Event::Failed(failed)) = events.next(LONG).await else {
            panic!("{id}: expected batch.failed\n{}", worker.log_text())
        };
        assert_eq!(failed.batch_id.as_deref(), Some(id));
        assert_eq!(failed.reason, reason, "{}", failed.error);
    }
    let done = completed(&mut events, &worker).await;
    assert_eq!(done.batch_id, "inpaint");
    let model = StableDiffusion::load(
        &model_dir,
        LoadOptions::new(tch::Device::Cpu, tch::Kind::Float),
    )
    .unwrap();
    let out = model
        .generate_inpaint(
            &[request("a teapot on a beach", 3)],
            &params(SchedulerKind::Ddim),
            Inpaint {
                images: &[rgb(inputs.init.clone())],
                masks: &[GrayImage::from_rgb(&rgb(inputs.mask.clone()))],
                strength: 0.75,
                mask_blur: 0.0,
                padding_mask_crop: None,
            },
            &mut sdbatch::pipeline::ignore_steps,
        )
        .unwrap();
    let got = stored(&stack, &done.images[0].key).await;
    common::assert_images_match("9-channel inpainting", got.as_raw(), &out.images[0].pixels);
    stack.broker.cleanup().await;
}
