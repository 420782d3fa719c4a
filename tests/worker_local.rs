//! `sdbatch worker --messages`: the worker path without a broker (an in-memory queue and the
//! local-folder sink), as the GPU proof runs it on a machine without RabbitMQ. The same session
//! code as on RabbitMQ, so what matters here is that it is the whole path: messages checked and
//! dead-lettered with their reason, images equal to the pipeline's, manifests and events written,
//! a second run resuming from what the first stored, and an exit status that says whether
//! anything was dead-lettered.
mod common;

use sdbatch::pipeline::schedulers::SchedulerKind;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output};

fn message(batch_id: &str, item: &str, prompt: &str, seed: u64, num_images: u32) -> String {
    json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": item, "prompt": prompt, "seed": seed, "num_images": num_images}],
        "params": {"steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "scheduler": "pndm"},
    })
    .to_string()
}

/// Runs the worker on `messages` with the local sink in `store`; returns its output and report.
fn run(messages: &Path, store: &Path, report: &Path) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(["worker", "--device", "cpu", "--metrics-addr", "off"])
        .arg("--model")
        .arg(common::model_dir())
        .arg("--messages")
        .arg(messages)
        .arg("--report")
        .arg(report)
        .arg("--storage-url")
        .arg(format!("file://{}", store.display()))
        .args(["--bucket", "images", "--worker-id", "local-test"])
        .env_remove("SDBATCH_CONFIG")
        .output()
        .expect("sdbatch runs");
    let report = serde_json::from_slice(&std::fs::read(report).expect("a report")).unwrap();
    (out, report)
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn events<'a>(report: &'a Value, name: &'a str) -> Vec<&'a Value> {
    report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["routing_key"] == name)
        .map(|e| &e["body"])
        .collect()
}

#[test]
fn a_broker_less_run_stores_the_pipelines_images_and_dead_letters_bad_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let messages = dir.path().join("messages.jsonl");
    let cat = message("local-cat", "cat", "a photo of a cat", 11, 2);
    let dog = message("local-dog", "dog", "a dog in the snow", 5, 1);
    std::fs::write(&messages, format!("{cat}\nthis is not json\n\n{dog}\n")).unwrap();

    let (out, report) = run(&messages, &store, &dir.path().join("first.json"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One message was dead-lettered: the run fails, after doing the others.
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 of 3 message(s) dead-lettered"),
        "{stderr}"
    );
    let outcomes: Vec<(&str, Option<&str>)> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["outcome"].as_str().unwrap(), m["why"].as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("acked", None),
            ("dead_lettered", Some("not_json")),
            ("acked", None)
        ]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("GPU images        3"), "{stdout}");
    assert!(
        stdout.contains("completed         2 (0 announced"),
        "{stdout}"
    );

    // The dead letter carries the worker's reason headers, and batch.failed says why.
    let copies = report["dead_letters"].as_array().unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["body"], "this is not json");
    let failed = events(&report, "batch.failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["reason"], "not_json");

    // Each batch completed, with its manifest stored, and its images are the pipeline's.
    let completed = events(&report, "batch.completed");
    assert_eq!(completed.len(), 2);
    let model = common::load_cpu();
    let params = common::params(4, 7.5, 64, SchedulerKind::Pndm);
    let limits = sdbatch::message::Limits {
        default_bucket: Some("images".into()),
        ..Default::default()
    };
    for (done, body) in completed.iter().zip([&cat, &dog]) {
        let batch = sdbatch::message::parse(body.as_bytes(), &limits, 64).unwrap();
        assert_eq!(done["batch_id"], batch.batch_id.as_str());
        let folder = store.join("images").join(&batch.batch_id);
        assert!(folder.join("manifest.json").is_file());
        let requests: Vec<_> = batch
            .image_requests()
            .into_iter()
            .map(|(_, _, r)| r)
            .collect();
        let want = model
            .generate(&requests, &params, &mut sdbatch::pipeline::ignore_steps)
            .unwrap();
        let records = done["images"].as_array().unwrap();
        assert_eq!(records.len(), requests.len());
        for (record, want) in records.iter().zip(&want.images) {
            let key = record["key"].as_str().unwrap();
            let got = image::open(store.join("images").join(key))
                .unwrap()
                .to_rgb8();
            common::assert_images_match(key, got.as_raw(), &want.pixels);
        }
    }

    // A second run of the good messages finds their manifests: announced again, nothing
    // regenerated, and the run succeeds.
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::write(good.join("1.json"), &cat).unwrap();
    std::fs::write(good.join("2.json"), &dog).unwrap();
    let (out, report) = run(&good, &store, &dir.path().join("second.json"));
    assert_success(&out);
    let again = events(&report, "batch.completed");
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|e| e["redelivered"] == true), "{again:?}");
    assert_eq!(report["progress_events"], 0, "nothing was generated");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("completed         2 (2 announced"),
        "{stdout}"
    );
    assert!(stdout.contains("GPU images        0"), "{stdout}");
}

#[test]
fn a_missing_or_empty_messages_file_stops_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    for (path, want) in [
        (dir.path().join("missing.jsonl"), "No such file"),
        (empty, "no messages"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .args(["worker", "--device", "cpu", "--metrics-addr", "off"])
            .args(["--model", "/nonexistent/model", "--bucket", "images"])
            .arg("--messages")
            .arg(&path)
            .env_remove("SDBATCH_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("--messages") && stderr.contains(want),
            "{stderr}"
        );
        assert!(!stderr.contains("/nonexistent/model"), "{stderr}");
    }
}

/// A delivery that stored some images and a progress object, then died (the state a broker
/// restart leaves): the next delivery takes the stored images over, makes the rest in one GPU
/// batch (so it reports no progress of its own) and still removes the stale progress object.
#[test]
fn a_resumed_batch_removes_the_progress_object_an_earlier_delivery_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let messages = dir.path().join("messages.jsonl");
    std::fs::write(&messages, message("resume", "a", "a windmill", 3, 2)).unwrap();
    let (out, _) = run(&messages, &store, &dir.path().join("first.json"));
    assert_success(&out);

    // Undo the end of that run: the second image and the manifest go, a progress object stays.
    let bucket = store.join("images");
    let meta = bucket.join(".sdbatch-meta");
    for key in ["resume/a/1.png", "resume/manifest.json"] {
        std::fs::remove_file(bucket.join(key)).unwrap();
        std::fs::remove_file(meta.join(format!("{key}.json"))).unwrap();
    }
    let progress = bucket.join("resume/progress.json");
    std::fs::write(&progress, br#"{"batch_id":"resume","images_done":1}"#).unwrap();

    let (out, report) = run(&messages, &store, &dir.path().join("second.json"));
    assert_success(&out);
    let done = events(&report, "batch.completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["resumed_images"], 1, "{}", done[0]);
    assert_eq!(report["progress_events"], 0);
    assert!(bucket.join("resume/a/1.png").is_file());
    assert!(bucket.join("resume/manifest.json").is_file());
    assert!(
        !progress.exists(),
        "the stale progress object is left behind"
    );
}
