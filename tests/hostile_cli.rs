//! The producer-side commands against hostile or careless input (issue 9): `--help` with secrets
//! in the environment, unique default batch ids, dead letters carrying terminal escapes, and
//! `dlq requeue` leaving invalid letters where they are. Against the real broker (see
//! tests/common/broker.rs); no worker and no model needed.
mod common;

use common::broker::{Broker, amqp_url, unique};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::process::{Command, Output};

fn sdbatch(args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdbatch"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `sdbatch` off the async runtime (the tests hold broker connections on it).
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || sdbatch(&args, &[]))
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_does_not_print_environment_values() {
    let env = [
        ("AMQP_URL", "amqp://u:s3cret@h/"),
        ("S3_ENDPOINT", "http://key:s3cret@h/"),
        ("SDBATCH_STORAGE_URL", "s3cret"),
        ("SDBATCH_QUEUE_PREFIX", "s3cret"),
    ];
    for command in [
        &["worker", "--help"][..],
        &["submit", "--help"],
        &["dlq", "--help"],
        &["dlq", "requeue", "--help"],
        &["topology", "--help"],
        &["bench", "--help"],
    ] {
        let args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        let o = sdbatch(&args, &env);
        assert!(o.status.success(), "{command:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(
            !out.contains("s3cret"),
            "{command:?} printed a value:\n{out}"
        );
    }
    // The variables are still named, only their values hidden.
    let o = sdbatch(&["submit".into(), "--help".into()], &env);
    assert!(stdout(&o).contains("AMQP_URL"), "{}", stdout(&o));
}

/// Takes (acks) every message of the jobs queue and returns their batch ids, in queue order.
async fn take_batch_ids(broker: &Broker) -> Vec<String> {
    broker
        .drain(&broker.topology.jobs_queue)
        .await
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            v["batch_id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn submits_without_a_batch_prefix_get_distinct_time_ordered_ids() {
    let prefix = unique("submit-ids");
    let broker = Broker::new(&prefix, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red sneaker\na leather handbag\na wool hat\n").unwrap();
    let prompts = prompts.to_str().unwrap();
    // Back to back: the old default (`batch-<unix seconds>`) gave both the same ids.
    let submit = [
        "submit",
        "--queue-prefix",
        &prefix,
        "--prompts",
        prompts,
        "--batch-size",
        "2",
    ];
    for _ in 0..2 {
        let o = run(&submit).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("submitted 2 batch(es)"),
            "{}",
            stdout(&o)
        );
    }
    let ids = take_batch_ids(&broker).await;
    assert_eq!(ids.len(), 4, "{ids:?}");
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 4, "batch ids collide: {ids:?}");
    let mut uuids = Vec::new();
    for (id, n) in ids.iter().zip(["0001", "0002", "0001", "0002"]) {
        assert!(sdbatch::message::is_valid_batch_id(id), "{id}");
        let uuid = id
            .strip_prefix("batch-")
            .and_then(|rest| rest.strip_suffix(&format!("-{n}")))
            .unwrap_or_else(|| panic!("{id}: expected batch-<uuid>-{n}"));
        let uuid = uuid::Uuid::parse_str(uuid).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        uuids.push(uuid);
    }
    // One prefix per submit; the second submit's sorts after the first's.
    assert_eq!(uuids[0], uuids[1]);
    assert_eq!(uuids[2], uuids[3]);
    assert!(uuids[0] < uuids[2], "{ids:?}");

    // A chosen prefix is still used as it is.
    let mut chosen = submit.to_vec();
    chosen.extend(["--batch-prefix", "mine"]);
    let o = run(&chosen).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(take_batch_ids(&broker).await, ["mine-0001", "mine-0002"]);
    broker.cleanup().await;
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Puts a letter straight into the dead-letter queue, with `headers` as a worker or the broker
/// would have set them.
async fn dead_letter(broker: &Broker, batch_id: &str, headers: &[(&str, &str)]) {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(ShortString::from(*k), long(v));
    }
    let body = serde_json::json!({"schema_version": 1, "batch_id": batch_id, "items": [{"id": "a", "prompt": "a cat"}]});
    let t = &broker.topology;
    broker
        .publisher
        .publish_json(
            &t.dead_exchange,
            &t.dead_queue,
            &serde_json::to_vec(&body).unwrap(),
            Some(table),
            true,
        )
        .await
        .unwrap();
}

/// What a worker sets on a message it rejects as invalid.
const INVALID: &[(&str, &str)] = &[
    ("x-sdbatch-error", "steps"),
    (
        "x-sdbatch-reason",
        "params.steps 100 exceeds the maximum 50",
    ),
];
/// What the broker sets on a message that failed on every delivery.
const POISON: &[(&str, &str)] = &[("x-first-death-reason", "delivery_limit")];

#[tokio::test(flavor = "multi_thread")]
async fn dlq_listings_escape_producer_text() {
    let prefix = unique("dlq-escape");
    let broker = Broker::new(&prefix, 3).await;
    let evil_id = "evil\x1b[31m\nFORGED-LINE\r\u{9b}2J";
    dead_letter(
        &broker,
        evil_id,
        &[
            ("x-sdbatch-error", "schema\x1b]0;pwned\x07"),
            ("x-sdbatch-reason", "bad\nFORGED-DETAIL"),
            ("x-note\x1b[2J", "v\x1b[31m\r\nFORGED-HEADER"),
        ],
    )
    .await;
    let long_id = "L".repeat(500);
    dead_letter(&broker, &long_id, &[("x-sdbatch-reason", &"R".repeat(500))]).await;

    let check = |what: &str, out: &str| {
        for bad in ['\x1b', '\r', '\u{9b}', '\x07'] {
            assert!(!out.contains(bad), "{what} printed {bad:?} raw:\n{out:?}");
        }
        for forged in ["FORGED-LINE", "FORGED-DETAIL", "FORGED-HEADER"] {
            assert!(
                !out.lines().any(|l| l.starts_with(forged)),
                "{what}: a newline in producer text started a line:\n{out}"
            );
        }
        // Fields are capped; `show`'s body (pretty JSON, lines starting with `{`, `}` or
        // spaces) is printed in full, only escaped.
        for l in out.lines().filter(|l| !l.starts_with([' ', '{', '}'])) {
            assert!(!l.contains(&"L".repeat(129)), "{what}: id not capped: {l}");
            assert!(
                !l.contains(&"R".repeat(129)),
                "{what}: detail not capped: {l}"
            );
        }
    };

    let o = run(&["dlq", "--queue-prefix", &prefix, "list"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    check("list", &out);
    assert!(
        out.contains(r"evil\u{1b}[31m\nFORGED-LINE\r\u{9b}2J"),
        "{out}"
    );
    assert!(out.contains(&format!("{}…", "L".repeat(128))), "{out}");
    assert!(out.contains("2 dead letter(s)"), "{out}");

    let o = run(&["dlq", "--queue-prefix", &prefix, "show", evil_id]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    check("show", &out);
    assert!(
        out.contains(r"header x-note\u{1b}[2J: v\u{1b}[31m\r\nFORGED-HEADER"),
        "{out}"
    );

    let o = run(&["dlq", "--queue-prefix", &prefix, "show", &long_id]).await;
    check("show", &stdout(&o));

    let o = run(&[
        "dlq",
        "--queue-prefix",
        &prefix,
        "requeue",
        "--all",
        "--include-invalid",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    check("requeue", &stdout(&o));
    assert!(
        stdout(&o).contains("2 dead letter(s) sent back"),
        "{}",
        stdout(&o)
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requeue_leaves_letters_a_worker_rejected_as_invalid() {
    let prefix = unique("dlq-invalid");
    let broker = Broker::new(&prefix, 3).await;
    dead_letter(&broker, "invalid-1", INVALID).await;
    dead_letter(&broker, "poison-1", POISON).await;
    let jobs = broker.topology.jobs_queue.clone();
    let dead = broker.topology.dead_queue.clone();

    // --all: the failed-on-every-delivery letter goes back, the invalid one stays.
    let o = run(&["dlq", "--queue-prefix", &prefix, "requeue", "--all"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}");
    assert!(out.contains("requeued poison-1"), "{out}");
    assert!(
        out.contains("skipped invalid-1: a worker rejected it as invalid (steps)"),
        "{out}"
    );
    assert!(out.contains("1 dead letter(s) sent back"), "{out}");
    assert!(
        out.contains("1 dead letter(s) skipped") && out.contains("--include-invalid"),
        "{out}"
    );
    assert_eq!(take_batch_ids(&broker).await, ["poison-1"]);
    assert_eq!(broker.ready(&dead).await, 1);

    // Named explicitly, still skipped without --include-invalid, and the output says so.
    let o = run(&["dlq", "--queue-prefix", &prefix, "requeue", "invalid-1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("skipped invalid-1"), "{out}");
    assert!(out.contains("0 dead letter(s) sent back"), "{out}");
    assert!(out.contains("--include-invalid"), "{out}");
    assert_eq!(broker.ready(&jobs).await, 0);
    assert_eq!(broker.ready(&dead).await, 1);

    let o = run(&[
        "dlq",
        "--queue-prefix",
        &prefix,
        "requeue",
        "invalid-1",
        "--include-invalid",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("requeued invalid-1"), "{}", stdout(&o));
    assert_eq!(broker.ready(&dead).await, 0);
    assert_eq!(take_batch_ids(&broker).await, ["invalid-1"]);
    broker.cleanup().await;
}
