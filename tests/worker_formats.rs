//! Output formats through the worker: a JPEG (and a WebP) batch stores `.jpg`/`.webp` objects
//! with their content type and embedded parameters, a redelivered batch resumes from its stored
//! JPEGs (identical bytes), and a bad format or quality is dead-lettered with nothing stored.
//! Real RabbitMQ and S3 server (s3s-fs), tiny model, CPU.
mod common;

use common::broker::metric;
use common::stack::Stack;
use sdbatch::events::Event;
use sdbatch::output::TRAINED_ALGORITHMIC_MEDIA;
use sdbatch::queue::header_str;
use serde_json::{Value, json};
use sha2::Digest;
use std::io::Cursor;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn message(batch_id: &str, output: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a kettle", "negative_prompt": "blurry", "seed": 8, "num_images": 2},
                  {"id": "b", "prompt": "a teapot", "seed": 3}],
        "params": {"steps": 2, "guidance_scale": 7.5, "scheduler": "dpmpp_2m_karras"},
        "output": output
    }))
    .unwrap()
}

/// The content type S3 serves for an object (the worker's `Storage` does not expose it).
async fn content_type(stack: &Stack, key: &str) -> Option<String> {
    let creds = aws_sdk_s3::config::Credentials::new(
        &stack.s3.access_key,
        &stack.s3.secret_key,
        None,
        None,
        "test",
    );
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(&stack.s3.endpoint)
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    let head = aws_sdk_s3::Client::from_conf(conf)
        .head_object()
        .bucket(&stack.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    head.content_type().map(str::to_string)
}

fn user_comment(bytes: &[u8]) -> String {
    let exif = exif::Reader::new()
        .read_from_container(&mut Cursor::new(bytes))
        .unwrap();
    let field = exif
        .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
        .expect("UserComment");
    let exif::Value::Undefined(raw, _) = &field.value else {
        panic!("UserComment is {:?}", field.value)
    };
    assert_eq!(&raw[..8], b"UNICODE\0");
    let units: Vec<u16> = raw[8..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn jpeg_batches_store_jpgs_and_resume_from_them() {
    let stack = Stack::new("formats", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);

    let body = message("jpeg-1", json!({"format": "jpeg", "quality": 80}));
    stack.broker.publish(&body).await;
    let Some(Event::Completed(first)) = events.next(LONG).await else {
        panic!("no completion")
    };
    let keys: Vec<&str> = first.images.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["jpeg-1/a/0.jpg", "jpeg-1/a/1.jpg", "jpeg-1/b/0.jpg"]);
    assert_eq!(
        stack.keys().await,
        [
            "jpeg-1/a/0.jpg",
            "jpeg-1/a/1.jpg",
            "jpeg-1/b/0.jpg",
            "jpeg-1/manifest.json"
        ]
    );
    for image in &first.images {
        assert_eq!(
            content_type(&stack, &image.key).await.as_deref(),
            Some("image/jpeg")
        );
        let bytes = stack
            .storage
            .get(&stack.bucket, &image.key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), image.sha256);
        assert_eq!(bytes.len() as u64, image.bytes);
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(decoded.dimensions(), (image.width, image.height));
        // The infotext, read by kamadak-exif.
        let text = user_comment(&bytes);
        assert!(
            text.contains(&format!(
                "\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: {}, \
                 Size: {}x{}, Model hash: ",
                image.seed, image.width, image.height
            )),
            "{text}"
        );
        let prompt = if image.item_id == "a" {
            "a kettle\nNegative prompt: blurry\n"
        } else {
            "a teapot\nSteps: "
        };
        assert!(text.starts_with(prompt), "{text}");
        let hash = first.model_sha256.as_deref().unwrap();
        assert!(
            text.contains(&format!("Model hash: {}, ", &hash[..10])),
            "{text}"
        );
        // The AI marking, found by the image crate's JPEG decoder (zune-jpeg).
        use image::ImageDecoder;
        let xmp = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&bytes))
            .unwrap()
            .xmp_metadata()
            .unwrap()
            .expect("XMP");
        assert!(
            String::from_utf8(xmp)
                .unwrap()
                .contains(TRAINED_ALGORITHMIC_MEDIA)
        );
    }

    // An interrupted delivery: the manifest and one image never made it. The redelivered message
    // finds the two stored JPEGs by their keys and makes only the missing one, byte for byte.
    stack
        .storage
        .delete(&stack.bucket, "jpeg-1/manifest.json")
        .await
        .unwrap();
    stack
        .storage
        .delete(&stack.bucket, "jpeg-1/a/1.jpg")
        .await
        .unwrap();
    stack.broker.publish(&body).await;
    let Some(Event::Completed(again)) = events.next(LONG).await else {
        panic!("no completion after the resume")
    };
    assert_eq!(again.resumed_images, Some(2));
    assert_eq!(again.images, first.images, "same keys, same bytes");
    assert_eq!(metric(&worker.metrics(), "sdbatch_gpu_images_total"), 4.0);

    // The same batch id as PNG is other work (the format is in the work hash): a conflict found
    // from the stored JPEGs.
    stack
        .storage
        .delete(&stack.bucket, "jpeg-1/manifest.json")
        .await
        .unwrap();
    stack.broker.publish(&message("jpeg-1", json!({}))).await;
    let Some(Event::Failed(conflict)) = events.next(LONG).await else {
        panic!("expected batch.failed")
    };
    assert_eq!(conflict.reason, "batch_id_conflict");

    // WebP: lossless, its own extension and content type.
    stack
        .broker
        .publish(&message("webp-1", json!({"format": "webp"})))
        .await;
    let Some(Event::Completed(webp)) = events.next(LONG).await else {
        panic!("no webp completion")
    };
    assert_eq!(webp.images[0].key, "webp-1/a/0.webp");
    assert_eq!(
        content_type(&stack, "webp-1/a/0.webp").await.as_deref(),
        Some("image/webp")
    );
    let bytes = stack
        .storage
        .get(&stack.bucket, "webp-1/a/0.webp")
        .await
        .unwrap()
        .unwrap();
    assert!(user_comment(&bytes).contains("Seed: 8, "));
    // Same seed and parameters as jpeg-1/a/0.jpg: a lossless copy of those pixels.
    let jpeg = stack
        .storage
        .get(&stack.bucket, "jpeg-1/a/0.jpg")
        .await
        .unwrap()
        .unwrap();
    let (w, j) = (
        image::load_from_memory(&bytes).unwrap().to_rgb8(),
        image::load_from_memory(&jpeg).unwrap().to_rgb8(),
    );
    let diff: f64 = w
        .as_raw()
        .iter()
        .zip(j.as_raw())
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / w.as_raw().len() as f64;
    // The tiny model's images are close to noise, JPEG's worst case: a loose bound.
    assert!(
        diff > 0.0 && diff < 16.0,
        "the JPEG at q80 is close to the lossless pixels: {diff}"
    );

    // A bad format or quality: dead-lettered with the reason, nothing stored.
    for (id, output, reason) in [
        ("bad-format", json!({"format": "gif"}), "format"),
        (
            "bad-quality",
            json!({"format": "jpeg", "quality": 0}),
            "quality",
        ),
        (
            "lossless-quality",
            json!({"format": "webp", "quality": 80}),
            "quality",
        ),
    ] {
        stack.broker.publish(&message(id, output)).await;
        let Some(Event::Failed(failed)) = events.next(LONG).await else {
            panic!("{id}: expected batch.failed")
        };
        assert_eq!(failed.reason, reason, "{id}: {}", failed.error);
        assert_eq!(failed.batch_id.as_deref(), Some(id));
    }
    let dead = stack.broker.drain_dead().await;
    let reasons: Vec<Option<String>> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error"))
        .collect();
    assert_eq!(
        reasons,
        [
            Some("batch_id_conflict".to_string()),
            Some("format".into()),
            Some("quality".into()),
            Some("quality".into())
        ]
    );
    let keys = stack.keys().await;
    assert!(
        keys.iter()
            .all(|k| k.starts_with("jpeg-1/") || k.starts_with("webp-1/")),
        "{keys:?}"
    );
    stack.broker.cleanup().await;
}
