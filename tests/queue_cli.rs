//! The producer-side commands against a real broker and S3 server: `submit` (file, template,
//! `--wait`), `dlq list|show|requeue|purge`, `topology`; and the worker's local-directory sink,
//! TOML config and secret redaction.
mod common;

use common::broker::{Broker, WorkerProcess, amqp_url, unique};
use common::s3::S3Server;
use common::stack::store;
use std::process::{Command, Output};
use std::time::Duration;

fn sdbatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_template_and_wait_lists_the_keys() {
    let s3 = S3Server::start();
    let storage = store(&s3).await;
    storage.create_bucket("catalog").await.unwrap();
    let prefix = unique("submit");
    let broker = Broker::new(&prefix, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let _worker = WorkerProcess::spawn(
        &prefix,
        &s3,
        "catalog",
        dir.path(),
        "w1",
        &["--max-batch", "4"],
    );

    let products = dir.path().join("products.txt");
    std::fs::write(&products, "a red sneaker\na leather handbag\n").unwrap();
    let var = format!("product=@{}", products.display());
    let o = tokio::task::spawn_blocking(move || {
        sdbatch(&[
            "submit",
            "--queue-prefix",
            &prefix,
            "--template",
            "professional product photography of {product}, {style}",
            "--var",
            &var,
            "--var",
            "style=studio,lifestyle",
            "--batch-size",
            "3",
            "--steps",
            "2",
            "--batch-prefix",
            "shop",
            "--prefix",
            "shots",
            "--wait",
            "--timeout-secs",
            "120",
        ])
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}");
    assert!(out.contains("submitted 2 batch(es), 4 image(s)"), "{out}");
    assert!(
        out.contains("2 batch(es) completed, 0 failed, 0 cancelled, 0 missing"),
        "{out}"
    );
    assert!(
        out.contains("s3://catalog/shots/shop-0001/t0001/0.png"),
        "{out}"
    );
    let keys = storage.list("catalog", "shots/").await.unwrap();
    assert_eq!(keys.len(), 4 + 2, "4 images + 2 manifests: {keys:?}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_rejects_bad_input_before_publishing() {
    let prefix = unique("submit-bad");
    let broker = Broker::new(&prefix, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("p.csv");
    std::fs::write(&csv, "prompt,colour\na cat,red\n").unwrap();
    let p = prefix.clone();
    let c = csv.clone();
    let o = tokio::task::spawn_blocking(move || {
        sdbatch(&[
            "submit",
            "--queue-prefix",
            &p,
            "--prompts",
            c.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("p.csv"), "{}", stderr(&o));
    let p = prefix.clone();
    let o = tokio::task::spawn_blocking(move || {
        sdbatch(&[
            "submit",
            "--queue-prefix",
            &p,
            "--template",
            "a {thing}",
            "--var",
            "thing=cat",
            "--steps",
            "500",
        ])
    })
    .await
    .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("steps"), "{}", stderr(&o));
    assert_eq!(
        broker.ready(&broker.topology.jobs_queue).await,
        0,
        "nothing published"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_show_requeue_purge() {
    let prefix = unique("dlq");
    let broker = Broker::new(&prefix, 3).await;
    let s3 = S3Server::start();
    store(&s3).await.create_bucket("images").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Worker rejects an over-limit message (steps 100 > its configured max of 50 in the config file).
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, "prefetch = 2\n[limits]\nmax_steps = 50\n").unwrap();
    let worker = WorkerProcess::spawn(
        &prefix,
        &s3,
        "images",
        dir.path(),
        "w1",
        &["--config", config.to_str().unwrap()],
    );
    let body = br#"{"schema_version": 1, "batch_id": "too-long-1", "items": [{"id": "a", "prompt": "a cat"}], "params": {"steps": 100}}"#;
    broker.publish(body).await;
    broker
        .publish(br#"{"schema_version": 1, "batch_id": "bad id!", "items": []}"#)
        .await;
    let start = std::time::Instant::now();
    while broker.ready(&broker.topology.dead_queue).await < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(worker);

    let p = prefix.clone();
    let run = move |args: Vec<String>| {
        let mut full = vec!["dlq".to_string(), "--queue-prefix".into(), p.clone()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        sdbatch(&refs)
    };
    let r = run.clone();
    let o = tokio::task::spawn_blocking(move || r(vec!["list".into()]))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}");
    assert!(out.contains("too-long-1") && out.contains("steps"), "{out}");
    assert!(out.contains("2 dead letter(s)"), "{out}");
    assert_eq!(
        broker.ready(&broker.topology.dead_queue).await,
        2,
        "list keeps the messages"
    );

    let r = run.clone();
    let o = tokio::task::spawn_blocking(move || r(vec!["show".into(), "too-long-1".into()]))
        .await
        .unwrap();
    assert!(stdout(&o).contains("\"steps\": 100"), "{}", stdout(&o));

    let r = run.clone();
    // The worker rejected it as invalid: requeued only when asked for explicitly.
    let o = tokio::task::spawn_blocking(move || {
        r(vec![
            "requeue".into(),
            "too-long-1".into(),
            "--include-invalid".into(),
        ])
    })
    .await
    .unwrap();
    assert!(
        stdout(&o).contains("1 dead letter(s) sent back"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(broker.ready(&broker.topology.jobs_queue).await, 1);
    assert_eq!(broker.ready(&broker.topology.dead_queue).await, 1);

    let r = run.clone();
    let o = tokio::task::spawn_blocking(move || r(vec!["purge".into()]))
        .await
        .unwrap();
    assert!(!o.status.success(), "purge without --yes must refuse");
    let r = run.clone();
    let o = tokio::task::spawn_blocking(move || r(vec!["purge".into(), "--yes".into()]))
        .await
        .unwrap();
    assert!(stdout(&o).contains("purged 1"), "{}", stdout(&o));
    assert_eq!(broker.ready(&broker.topology.dead_queue).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_directory_sink_and_no_secrets_in_logs() {
    let prefix = unique("local");
    let broker = Broker::new(&prefix, 3).await;
    let mut events = broker.watch_events().await;
    let s3 = S3Server::start(); // unused by this worker, but `spawn` wants one
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink");
    let url = format!("file://{}", sink.display());
    // The URL carries a password (guest's), which must not reach the log.
    let secret_url = amqp_url();
    assert!(secret_url.contains("guest:guest@"));
    let worker = WorkerProcess::spawn_env(
        &prefix,
        &s3,
        "local-bucket",
        dir.path(),
        "w1",
        &["--storage-url", &url],
        &[("AMQP_URL", &secret_url)],
    );
    broker
        .publish(br#"{"schema_version": 1, "batch_id": "local-1", "items": [{"id": "a", "prompt": "a cat", "seed": 1}], "params": {"steps": 2}}"#)
        .await;
    let event = events.next(Duration::from_secs(120)).await.expect("event");
    assert!(
        matches!(event, sdbatch::events::Event::Completed(_)),
        "{event:?}"
    );
    let png = sink.join("local-bucket/local-1/a/0.png");
    assert!(image::open(&png).is_ok(), "{} missing", png.display());
    assert!(sink.join("local-bucket/local-1/manifest.json").is_file());
    let log = worker.log_text();
    assert!(log.contains("guest:***@"), "{log}");
    assert!(
        !log.contains("guest:guest@"),
        "password leaked into the log"
    );
    broker.cleanup().await;
}

#[test]
fn topology_declares_and_prints() {
    let prefix = unique("topo");
    let o = sdbatch(&[
        "topology",
        "--queue-prefix",
        &prefix,
        "--delivery-limit",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("{prefix}.jobs.dead")) && out.contains("x-delivery-limit 5"),
        "{out}"
    );
    // Idempotent.
    assert!(
        sdbatch(&[
            "topology",
            "--queue-prefix",
            &prefix,
            "--delivery-limit",
            "5"
        ])
        .status
        .success()
    );
    // A different delivery limit on the existing queue is refused by the broker, with a message.
    let o = sdbatch(&[
        "topology",
        "--queue-prefix",
        &prefix,
        "--delivery-limit",
        "7",
    ]);
    assert!(!o.status.success());
    println!("{}", stderr(&o));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async { Broker::new(&prefix, 5).await.cleanup().await });
}
