//! A `batch_id` names one piece of work: the same work again is answered from what is stored
//! (republished, or only the missing images generated); other work under a used id is a conflict,
//! dead-lettered without touching what is stored. Real RabbitMQ and S3 server, tiny model, CPU.
mod common;

use common::broker::metric;
use common::stack::{Stack, batch};
use sdbatch::events::Event;
use sdbatch::queue::header_str;
use sha2::Digest;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn same_work_is_republished_other_work_is_a_conflict() {
    let stack = Stack::new("identity", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);
    let body = batch("same-1", 2, &[("a", "a kettle", 8, 1)]);
    stack.broker.publish(&body).await;
    let Some(Event::Completed(first)) = events.next(LONG).await else {
        panic!("no completion")
    };
    assert_eq!(first.work_sha256.as_ref().map(String::len), Some(64));

    // Other work under the same id: a new prompt.
    stack
        .broker
        .publish(&batch("same-1", 2, &[("a", "a teapot", 8, 1)]))
        .await;
    let event = events.next(LONG).await.expect("batch.failed");
    let Event::Failed(failed) = event else {
        panic!("expected batch.failed, got {event:?}")
    };
    assert_eq!(failed.reason, "batch_id_conflict");
    assert_eq!(failed.batch_id.as_deref(), Some("same-1"));

    // The identical message again (a producer retrying): republished, nothing generated.
    stack.broker.publish(&body).await;
    let Some(Event::Completed(again)) = events.next(LONG).await else {
        panic!("no republished completion")
    };
    assert!(again.redelivered);
    assert_eq!(again.images, first.images);

    let dead = stack.broker.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0].properties, "x-sdbatch-error").as_deref(),
        Some("batch_id_conflict")
    );
    let m = worker.metrics();
    assert_eq!(
        metric(&m, "sdbatch_gpu_images_total"),
        1.0,
        "generated once"
    );
    let png = stack
        .storage
        .get(&stack.bucket, &first.images[0].key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&png)),
        first.images[0].sha256,
        "the stored image is untouched"
    );
    stack.broker.cleanup().await;
}

/// Images of other work stored under the id without a manifest (an interrupted batch of another
/// message): a conflict too, found from the images' metadata.
#[tokio::test(flavor = "multi_thread")]
async fn stored_images_of_other_work_are_a_conflict() {
    let stack = Stack::new("identity2", 3).await;
    let mut events = stack.broker.watch_events().await;
    let worker = stack.worker("w1", &[]);
    let other = "f".repeat(64);
    stack
        .storage
        .put(
            &stack.bucket,
            "half-1/z/0.png",
            b"not ours".to_vec(),
            "image/png",
            &[("sdbatch-work-sha256".to_string(), other)],
        )
        .await
        .unwrap();
    stack
        .broker
        .publish(&batch("half-1", 2, &[("a", "a kettle", 8, 1)]))
        .await;
    let event = events.next(LONG).await.expect("batch.failed");
    let Event::Failed(failed) = event else {
        panic!("expected batch.failed, got {event:?}")
    };
    assert_eq!(failed.reason, "batch_id_conflict");
    assert!(failed.error.contains("half-1/z/0.png"), "{}", failed.error);
    assert_eq!(metric(&worker.metrics(), "sdbatch_gpu_images_total"), 0.0);
    assert_eq!(stack.keys().await, ["half-1/z/0.png"]);
    stack.broker.cleanup().await;
}
