//! Webhooks through `sdbatch worker`, against a real RabbitMQ and S3 server (s3s-fs), tiny model,
//! CPU: a batch's `batch.completed` reaches its webhook, signed, the same JSON as on the events
//! exchange; a batch that fails after parsing (a LoRA the worker lacks) gets its `batch.failed`
//! there too; a webhook the worker may not call dead-letters its message with reason `webhook`
//! before any work, and is never called.
mod common;

use common::broker::metric;
use common::stack::Stack;
use common::webhook_receiver::Receiver;
use sdbatch::events::Event;
use sdbatch::queue::header_str;
use sdbatch::webhook::{SIGNATURE_HEADER, Secret, verify};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LONG: Duration = Duration::from_secs(120);
const SECRET: &str = "worker-webhook-secret-0123456789";

fn message(batch_id: &str, webhook: &str, params: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema_version": 1,
        "batch_id": batch_id,
        "items": [{"id": "a", "prompt": "a red sneaker", "seed": 7}],
        "params": params,
        "output": {"webhook": {"url": webhook}},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_events_reach_the_webhook_signed_and_refused_webhooks_are_dead_lettered() {
    let stack = Stack::new("webhook", 3).await;
    let mut events = stack.broker.watch_events().await;
    let mut receiver = Receiver::start("127.0.0.1", &[]).await;
    let secret_file = stack.logs.path().join("webhook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let worker = stack.worker(
        "w1",
        &[
            "--webhook-allow",
            "127.0.0.1",
            "--webhook-secret-file",
            secret_file.to_str().unwrap(),
            "--webhook-allow-private",
            "--webhook-allow-http",
        ],
    );
    let port = receiver.addr.port();
    let two_steps = json!({"steps": 2});
    // Completes: its webhook gets batch.completed.
    let done_url = format!("http://127.0.0.1:{port}/done?token=t");
    stack
        .broker
        .publish(&message("hook-done", &done_url, two_steps.clone()))
        .await;
    // The same receiver under a name off the allow list: refused before any work, never called.
    let refused_url = format!("http://localhost:{port}/refused");
    stack
        .broker
        .publish(&message("hook-refused", &refused_url, two_steps.clone()))
        .await;
    // Fails after parsing (no LoRA folder on this worker): its webhook gets batch.failed.
    let failed_url = format!("http://127.0.0.1:{port}/failed");
    stack
        .broker
        .publish(&message(
            "hook-failed",
            &failed_url,
            json!({"steps": 2, "loras": [{"name": "missing"}]}),
        ))
        .await;

    let mut on_exchange = Vec::new();
    while on_exchange.len() < 3 {
        on_exchange.push(events.next(LONG).await.expect("three events"));
    }
    let by_id = |id: &str| {
        on_exchange
            .iter()
            .find(|e| e.batch_id() == Some(id) && !matches!(e, Event::Progress(_)))
            .unwrap_or_else(|| panic!("no event for {id}: {on_exchange:?}"))
            .clone()
    };
    let Event::Failed(refused) = by_id("hook-refused") else {
        panic!("hook-refused did not fail")
    };
    assert_eq!(refused.reason, "webhook");
    assert!(
        refused.error.contains("--webhook-allow"),
        "{}",
        refused.error
    );

    // Exactly two deliveries, both signed, each the event as the exchange carried it.
    worker
        .wait_for_metric(
            r#"sdbatch_webhook_deliveries_total{outcome="delivered"}"#,
            2.0,
            LONG,
        )
        .await;
    let mut got = [receiver.next().await, receiver.next().await];
    got.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        got.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        ["/done?token=t", "/failed"]
    );
    let secret = Secret::from_text(SECRET).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (r, id, event) in [
        (&got[0], "hook-done", "batch.completed"),
        (&got[1], "hook-failed", "batch.failed"),
    ] {
        verify(
            &secret,
            r.header(SIGNATURE_HEADER),
            &r.body,
            now,
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(r.header("sdbatch-event"), event);
        let delivered = Event::from_json(&r.body).unwrap();
        assert_eq!(
            delivered,
            by_id(id),
            "{id}: the webhook got the exchange's event"
        );
    }
    let Event::Failed(failed) = by_id("hook-failed") else {
        panic!("hook-failed did not fail")
    };
    assert_eq!(failed.reason, "lora");
    assert!(receiver.received().is_empty(), "nothing for hook-refused");

    let dead = stack.broker.drain_dead().await;
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|d| header_str(&d.properties, "x-sdbatch-error").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["lora", "webhook"]);
    let m = worker.metrics();
    assert_eq!(
        metric(&m, r#"sdbatch_dead_letters_total{reason="webhook"}"#),
        1.0,
        "{m}"
    );
    for outcome in ["refused", "gave_up", "dropped", "failed_retrying"] {
        let series = format!(r#"sdbatch_webhook_deliveries_total{{outcome="{outcome}"}}"#);
        assert_eq!(metric(&m, &series), 0.0, "{series}\n{m}");
    }
    // The secret never reaches the log.
    assert!(!worker.log_text().contains(SECRET));
    stack.broker.cleanup().await;
}
