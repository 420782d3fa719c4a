//! The private RabbitMQ node helper (`common::private_broker`): it starts, restarts and goes away
//! with its test (also a panicking one), and its consumer-timeout lever works: a consumer that
//! holds a delivery unacked past `consumer_timeout` has its channel closed by the broker and the
//! message is back in the queue.
mod common;

use common::broker::ready_count;
use common::private_broker::PrivateBroker;
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use std::time::{Duration, Instant};

const CONSUMER_TIMEOUT_MS: u64 = 5000;
/// The tick the helper sets with a consumer timeout (the check runs once per tick per channel).
const TICK_MS: u64 = 1000;

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

async fn publish_confirmed(ch: &Channel, queue: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
}

/// Whether any live process runs with `RABBITMQ_NODENAME=node` (RabbitMQ 3.10 takes the node name
/// from the environment, not the command line; a zombie's environment reads empty).
fn node_process_alive(node: &str) -> bool {
    let needle = format!("RABBITMQ_NODENAME={node}\0");
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("environ"))
            .map(|env| String::from_utf8_lossy(&env).contains(&needle))
            .unwrap_or(false)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_timeout_closes_the_channel_and_requeues_the_message() {
    let broker = PrivateBroker::builder()
        .consumer_timeout(CONSUMER_TIMEOUT_MS)
        .start()
        .await;
    println!(
        "private node {} started in {:.2} s",
        broker.node(),
        broker.startup_time().as_secs_f64()
    );
    // The node has the lowered timeout and the fine tick; the shared node is not involved.
    assert_eq!(
        broker
            .eval("application:get_env(rabbit, consumer_timeout).")
            .await,
        format!("{{ok,{CONSUMER_TIMEOUT_MS}}}")
    );
    assert_eq!(
        broker
            .eval("application:get_env(rabbit, channel_tick_interval).")
            .await,
        format!("{{ok,{TICK_MS}}}")
    );

    let conn = connect(&broker.url()).await;
    let setup = conn.create_channel().await.unwrap();
    let queue = "consumer-timeout";
    setup
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    setup
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&setup, queue, b"slow job").await;

    let consuming = conn.create_channel().await.unwrap();
    consuming
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consuming
        .basic_consume(
            queue.into(),
            "slow-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no delivery")
        .expect("consumer ended")
        .expect("delivery error");
    let delivered_at = Instant::now();
    assert_eq!(delivery.data, b"slow job");
    assert!(!delivery.redelivered);

    // Never acked: the next thing the consumer sees is the broker closing its channel. Bounded
    // well below the default 60 s tick, so this also proves the lowered tick is in effect.
    let closed = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("the broker did not close the channel within 30 s");
    let waited = delivered_at.elapsed();
    let error = match closed {
        Some(Err(e)) => e,
        other => panic!("expected a channel error, got {other:?}"),
    };
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        panic!("expected a protocol error, got {error}");
    };
    let message = amqp.get_message().to_string();
    println!(
        "channel closed {:.2} s after the delivery: {} {message}",
        waited.as_secs_f64(),
        amqp.get_id()
    );
    assert_eq!(amqp.get_id(), 406, "PRECONDITION_FAILED: {amqp}");
    assert!(
        message.contains("delivery acknowledgement on channel") && message.contains("timed out"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(CONSUMER_TIMEOUT_MS - 100),
        "closed before the timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(CONSUMER_TIMEOUT_MS + 2 * TICK_MS + 3000),
        "closed much later than timeout + tick: {waited:?}"
    );
    assert!(!consuming.status().connected(), "the channel is closed");
    // Note for workers: lapin 4 reports a late ack on the closed channel as a success (it is
    // dropped); the consumer's error above is the signal to rely on.
    let late_ack = delivery
        .acker
        .ack(lapin::options::BasicAckOptions::default())
        .await;
    println!("ack after the channel was closed: {late_ack:?}");
    // The connection survives (a channel error, not a connection error).
    assert!(conn.status().connected());

    // The queue requeues the message when the closed channel's process is gone, just after the
    // client saw the close: wait (bounded) for it to be ready again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready_count(&conn, queue).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the message did not come back to the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = setup
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the queue");
    assert_eq!(again.delivery.data, b"slow job");
    assert!(again.delivery.redelivered, "it comes back as a redelivery");
    assert_eq!(ready_count(&conn, queue).await, 0);
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_drops_connections_then_accepts_them_again() {
    let mut broker = PrivateBroker::start().await;
    println!(
        "private node {} on port {} started in {:.2} s",
        broker.node(),
        broker.port(),
        broker.startup_time().as_secs_f64()
    );
    let url = broker.url();
    let conn = connect(&url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "durable".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    ch.basic_publish(
        "".into(),
        "durable".into(),
        BasicPublishOptions::default(),
        b"kept",
        persistent,
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let mut events = conn.events_listener();
    broker.stop_app().await;
    // The client learns that the broker went away...
    let lost = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                return e;
            }
        }
        panic!("events ended without an error");
    })
    .await
    .expect("no connection error after stop_app");
    println!("connection error after stop_app: {lost}");
    assert!(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .is_err(),
        "connections are refused while the app is stopped"
    );

    let started = Instant::now();
    broker.start_app().await;
    println!(
        "start_app until connections accepted: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let conn = connect(&url).await;
    assert_eq!(
        ready_count(&conn, "durable").await,
        1,
        "durable data survives"
    );
    let _ = conn.close(200, "".into()).await;

    let node = broker.node().to_string();
    let port = broker.port();
    assert!(node_process_alive(&node));
    drop(broker);
    assert!(!node_process_alive(&node), "node {node} outlived its drop");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_test_stops_its_node() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let broker = PrivateBroker::start().await;
        tx.send((broker.node().to_string(), broker.port())).unwrap();
        panic!("a failing test holding a private node");
    });
    let joined = task.await;
    assert!(joined.unwrap_err().is_panic());
    let (node, port) = rx.await.unwrap();
    assert!(!node_process_alive(&node), "node {node} outlived the panic");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
