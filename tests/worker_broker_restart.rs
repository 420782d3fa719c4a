//! The broker restarts while a worker is mid-batch: the worker reconnects and finishes, nothing is
//! lost or stored twice, and /readyz says 503 while the broker is away. The restart is of a
//! private RabbitMQ node of this test's own (`PrivateBroker`), never the shared one, so tests
//! running at the same time (cargo-nextest runs every test in parallel) do not see it.
mod common;

use common::broker::{Broker, WorkerProcess, http_get, unique};
use common::private_broker::PrivateBroker;
use common::s3::S3Server;
use common::stack::store;
use sdbatch::events::Event;
use serde_json::json;
use std::time::{Duration, Instant};

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
    let storage = store(&s3).await;
    storage.create_bucket("images").await.unwrap();
    let prefix = unique("restart");
    let logs = tempfile::tempdir().unwrap();
    let mut rabbit = PrivateBroker::start().await;
    println!(
        "private RabbitMQ node {} started in {:.2} s",
        rabbit.node(),
        rabbit.startup_time().as_secs_f64()
    );
    let url = rabbit.url();

    let broker = Broker::connect(&url, &prefix, 3).await;
    let worker = WorkerProcess::spawn_env(
        &prefix,
        &s3,
        "images",
        logs.path(),
        "w1",
        &["--max-batch", "1"],
        &[("AMQP_URL", &url)],
    );
    worker.wait_ready(Duration::from_secs(120)).await;
    broker.publish(&body("before-restart", 40)).await;
    worker
        .wait_for_metric("sdbatch_gpu_batches_total", 1.0, Duration::from_secs(120))
        .await;
    drop(broker);

    rabbit.stop_app().await;
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
    rabbit.start_app().await;

    // The first batch is finished (stored once) and its message acked after the reconnect.
    let broker = Broker::connect(&url, &prefix, 3).await;
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
    // ... and ready again once it has reconnected (it may still be in its reconnect backoff).
    let start = Instant::now();
    loop {
        let (status, why) = http_get(worker.metrics_port, "/readyz");
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never ready again: {why}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
