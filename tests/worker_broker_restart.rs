//! The broker restarts while a worker is mid-batch: the worker reconnects and finishes, nothing is
//! lost or stored twice. Its own test binary, because it restarts the shared RabbitMQ node (cargo
//! runs test binaries one after another, so no other test sees the restart).
mod common;

use common::broker::{Broker, WorkerProcess, http_get, unique};
use common::s3::S3Server;
use sdbatch::events::Event;
use sdbatch::storage::{StaticCredentials, Storage, StorageConfig};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl on PATH");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn body(batch_id: &str, steps: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": 1, "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a windmill", "seed": 1, "num_images": 2}],
        "params": {"steps": steps}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_reconnects_after_broker_restart_and_finishes() {
    let s3 = S3Server::start();
    let mut cfg = StorageConfig::new("s3://");
    cfg.endpoint = Some(s3.endpoint.clone());
    let storage = Storage::connect_with_credentials(
        &cfg,
        StaticCredentials {
            access_key_id: s3.access_key.clone(),
            secret_access_key: s3.secret_key.clone(),
            session_token: None,
        },
    )
    .await
    .unwrap();
    storage.create_bucket("images").await.unwrap();
    let prefix = unique("restart");
    let logs = tempfile::tempdir().unwrap();

    let broker = Broker::new(&prefix, 3).await;
    let worker = WorkerProcess::spawn(
        &prefix,
        &s3,
        "images",
        logs.path(),
        "w1",
        &["--max-batch", "1"],
    );
    worker
        .wait_for_log("consuming", Duration::from_secs(120))
        .await;
    broker.publish(&body("before-restart", 40)).await;
    worker
        .wait_for_log("GPU batch", Duration::from_secs(120))
        .await;
    drop(broker);

    rabbitmqctl(&["stop_app"]);
    // Not ready while the broker is away...
    let start = Instant::now();
    while http_get(worker.metrics_port, "/readyz").0 != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "readyz never failed:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        http_get(worker.metrics_port, "/healthz").0,
        200,
        "still alive"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    // The first batch is finished (stored once) and its message acked after the reconnect.
    let broker = Broker::new(&prefix, 3).await;
    let mut events = broker.watch_events().await;
    let start = Instant::now();
    loop {
        let done = storage
            .exists("images", "before-restart/manifest.json")
            .await
            .unwrap();
        if done && broker.ready(&broker.topology.jobs_queue).await == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "batch never finished:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and ready again after the reconnect.
    let (status, why) = http_get(worker.metrics_port, "/readyz");
    assert_eq!(status, 200, "{why}");
    // And the reconnected worker takes new work.
    broker.publish(&body("after-restart", 2)).await;
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while after == 0 && Instant::now() < deadline {
        if let Some(Event::Completed(c)) = events.next(Duration::from_secs(5)).await
            && c.batch_id == "after-restart"
        {
            after += 1;
        }
    }
    assert_eq!(
        after,
        1,
        "worker did not process new work after the restart:\n{}",
        worker.log_text()
    );
    let keys = storage.list("images", "").await.unwrap();
    assert_eq!(
        keys.len(),
        6,
        "2 batches x (2 images + manifest), no duplicates: {keys:?}"
    );
    let reconnects = worker.log_text().matches("reconnecting").count();
    println!(
        "broker restart: 2 messages sent, 2 completed, 0 dead-lettered, 0 duplicate objects, {reconnects} reconnect attempt(s) logged"
    );
    assert!(reconnects >= 1);
    assert_eq!(broker.ready(&broker.topology.dead_queue).await, 0);
    broker.cleanup().await;
}
