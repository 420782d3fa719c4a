//! Webhook delivery against local HTTP receivers (no broker, no model): the signature verifies by
//! the documented scheme (also with the Python and openssl snippets of docs/webhooks.md), 500s are
//! retried, a receiver that never recovers is given up after the bound, and neither a host off
//! the allow list, nor a name resolving to a private address, nor a redirect's target is ever
//! sent a request. The tests wait on what the receivers saw and on the deliveries' outcomes,
//! never on sleeps.
mod common;

use axum::body::Bytes;
use common::webhook_receiver::{Answer, Received, Receiver};
use sdbatch::metrics::Metrics;
use sdbatch::webhook::{
    Client, Lookup, Outcome, Policy, Resolve, SIGNATURE_HEADER, Secret, Settings, WebhookConfig,
    WebhookSender, WebhookUrl, verify,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "whsec_test_0123456789abcdef";
const EVENT: &[u8] =
    br#"{"schema_version":1,"event":"batch.completed","batch_id":"b1","status":"completed"}"#;

/// Resolves every name to fixed addresses.
struct FixedResolver(Vec<SocketAddr>);

impl Resolve for FixedResolver {
    fn resolve<'a>(&'a self, _host: &'a str, port: u16) -> Lookup<'a> {
        let addrs = self
            .0
            .iter()
            .map(|a| SocketAddr::new(a.ip(), if a.port() == 0 { port } else { a.port() }))
            .collect();
        Box::pin(async move { Ok(addrs) })
    }
}

fn secret() -> Secret {
    Secret::from_text(SECRET).unwrap()
}

/// What the tests' worker allows: loopback receivers over plain http, small bounds.
fn config(allow: &[&str]) -> WebhookConfig {
    WebhookConfig {
        policy: Policy {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            allow_http: true,
            allow_private: true,
        },
        secret: Some(secret()),
        settings: Settings {
            timeout: Duration::from_secs(5),
            give_up: Duration::from_secs(30),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        },
        ..WebhookConfig::default()
    }
}

fn client(cfg: &WebhookConfig, metrics: &Arc<Metrics>, resolver: Arc<dyn Resolve>) -> Client {
    Client::new(
        cfg.policy.clone(),
        cfg.secret.clone().unwrap(),
        cfg.settings,
        cfg.max_connections,
        resolver,
        metrics.clone(),
    )
}

fn system(cfg: &WebhookConfig, metrics: &Arc<Metrics>) -> Client {
    client(cfg, metrics, Arc::new(sdbatch::webhook::SystemResolver))
}

fn count(metrics: &Metrics, outcome: &str) -> u64 {
    metrics
        .webhook_deliveries
        .with_label_values(&[outcome])
        .get()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.header(name)
}

/// The signature header checked by the library and, independently, by recomputing the HMAC.
fn assert_signed(r: &Received) {
    let sig = header(r, SIGNATURE_HEADER);
    verify(&secret(), sig, &r.body, now(), Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{sig}: {e}"));
    use hmac::{Hmac, Mac};
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(hex::encode(mac.finalize().into_bytes()), v1);
}

#[tokio::test]
async fn the_event_arrives_signed_without_the_caller_waiting() {
    let mut receiver = Receiver::start("127.0.0.1", &[Answer::Status(204)]).await;
    let metrics = Metrics::new();
    let sender = WebhookSender::new(&config(&["127.0.0.1"]), metrics.clone());
    sender.enqueue(
        &receiver.url("/hooks/sdbatch?token=abc"),
        "batch.completed",
        Some("b1"),
        EVENT,
    );
    let r = receiver.next().await;
    sender.wait_idle().await;

    assert_eq!(r.path, "/hooks/sdbatch?token=abc");
    assert_eq!(r.body.as_ref(), EVENT, "the event's bytes, unchanged");
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, "sdbatch-event"), "batch.completed");
    assert!(header(&r, "user-agent").starts_with("sdbatch/"));
    assert!(uuid::Uuid::parse_str(header(&r, "sdbatch-delivery")).is_ok());
    assert_eq!(header(&r, "host"), receiver.addr.to_string());
    assert_signed(&r);
    assert_eq!(count(&metrics, "delivered"), 1);
    assert_eq!(metrics.webhook_pending.get(), 0);
    assert_eq!(metrics.webhook_request_seconds.get_sample_count(), 1);
    let text = metrics.render();
    assert!(
        text.contains(r#"sdbatch_webhook_deliveries_total{outcome="delivered"} 1"#),
        "{text}"
    );
}

/// The Python and openssl snippets of docs/webhooks.md accept a real delivery, and refuse it
/// with another secret.
#[tokio::test]
async fn the_documented_snippets_verify_a_real_delivery() {
    let mut receiver = Receiver::start("127.0.0.1", &[]).await;
    let metrics = Metrics::new();
    let outcome = system(&config(&["127.0.0.1"]), &metrics)
        .deliver(
            &receiver.url("/"),
            "batch.completed",
            Bytes::from_static(EVENT),
        )
        .await;
    assert_eq!(outcome, Outcome::Delivered { attempts: 1 });
    let r = receiver.next().await;
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, &r.body).unwrap();

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/webhooks.md")).unwrap();
    let block = |lang: &str| {
        let start = format!("```{lang}\n");
        let from = doc
            .find(&start)
            .unwrap_or_else(|| panic!("no {lang} block"))
            + start.len();
        doc[from..][..doc[from..].find("```").unwrap()].to_string()
    };
    let python = dir.path().join("verify.py");
    std::fs::write(&python, block("python")).unwrap();
    let shell = dir.path().join("verify.sh");
    std::fs::write(&shell, block("sh")).unwrap();

    let run = |program: &str, script: &std::path::Path, secret: &str| {
        std::process::Command::new(program)
            .arg(script)
            .env("SDBATCH_WEBHOOK_SECRET", secret)
            .env("SIGNATURE", header(&r, SIGNATURE_HEADER))
            .env("BODY_FILE", &body)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    };
    for (program, script) in [("python3", &python), ("bash", &shell)] {
        let ok = run(program, script, SECRET);
        assert!(
            ok.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let bad = run(program, script, "another-secret-0123456789");
        assert!(!bad.status.success(), "{program} accepted a wrong secret");
    }
}

#[tokio::test]
async fn retries_after_500s_then_delivers() {
    let answers = [
        Answer::Status(500),
        Answer::Status(503),
        Answer::Status(200),
    ];
    let mut receiver = Receiver::start("127.0.0.1", &answers).await;
    let metrics = Metrics::new();
    let outcome = system(&config(&["127.0.0.1"]), &metrics)
        .deliver(
            &receiver.url("/"),
            "batch.completed",
            Bytes::from_static(EVENT),
        )
        .await;
    assert_eq!(outcome, Outcome::Delivered { attempts: 3 });
    let seen = receiver.received();
    assert_eq!(seen.len(), 3);
    // One delivery id for all attempts (receivers deduplicate by it), each attempt signed.
    let id = header(&seen[0], "sdbatch-delivery");
    for r in &seen {
        assert_eq!(header(r, "sdbatch-delivery"), id);
        assert_eq!(r.body.as_ref(), EVENT);
        assert_signed(r);
    }
    assert_eq!(count(&metrics, "failed_retrying"), 2);
    assert_eq!(count(&metrics, "delivered"), 1);
    assert_eq!(count(&metrics, "gave_up"), 0);
    assert_eq!(metrics.webhook_request_seconds.get_sample_count(), 3);
}

#[tokio::test]
async fn gives_up_after_the_bound() {
    let mut receiver = Receiver::start("127.0.0.1", &[Answer::Status(500)]).await;
    let metrics = Metrics::new();
    let mut cfg = config(&["127.0.0.1"]);
    cfg.settings.give_up = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = system(&cfg, &metrics)
        .deliver(
            &receiver.url("/"),
            "batch.completed",
            Bytes::from_static(EVENT),
        )
        .await;
    let took = started.elapsed();
    let Outcome::GaveUp {
        attempts,
        last_error,
    } = outcome
    else {
        panic!("expected to give up, got {outcome:?}")
    };
    assert!(attempts >= 2, "retried before giving up: {attempts}");
    assert!(last_error.contains("500"), "{last_error}");
    assert!(
        last_error.contains("receiver says hi"),
        "the body's start is kept: {last_error}"
    );
    assert_eq!(receiver.received().len() as u32, attempts);
    // No attempt starts after the bound (the last one may run up to its own timeout).
    assert!(
        took < cfg.settings.give_up + cfg.settings.timeout,
        "{took:?}"
    );
    assert_eq!(count(&metrics, "gave_up"), 1);
    assert_eq!(count(&metrics, "failed_retrying"), u64::from(attempts - 1));
    assert_eq!(count(&metrics, "delivered"), 0);
}

#[tokio::test]
async fn a_final_answer_is_not_retried() {
    let mut receiver = Receiver::start("127.0.0.1", &[Answer::Status(404)]).await;
    let metrics = Metrics::new();
    let outcome = system(&config(&["127.0.0.1"]), &metrics)
        .deliver(
            &receiver.url("/"),
            "batch.completed",
            Bytes::from_static(EVENT),
        )
        .await;
    assert!(
        matches!(&outcome, Outcome::GaveUp { attempts: 1, last_error } if last_error.contains("404")),
        "{outcome:?}"
    );
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn a_host_off_the_allow_list_is_never_sent_a_request() {
    let mut receiver = Receiver::start("127.0.0.1", &[]).await;
    let metrics = Metrics::new();
    let cfg = config(&["hooks.example.com"]);
    let outcome = system(&cfg, &metrics)
        .deliver(
            &receiver.url("/"),
            "batch.completed",
            Bytes::from_static(EVENT),
        )
        .await;
    assert!(
        matches!(&outcome, Outcome::Refused(why) if why.contains("--webhook-allow")),
        "{outcome:?}"
    );
    // Through the sender too: refused, counted, nothing sent.
    let sender = WebhookSender::new(&cfg, metrics.clone());
    sender.enqueue(&receiver.url("/"), "batch.failed", Some("b1"), EVENT);
    sender.wait_idle().await;
    assert_eq!(count(&metrics, "refused"), 2);
    assert!(
        receiver.received().is_empty(),
        "no request reached the receiver"
    );
    assert_eq!(metrics.webhook_request_seconds.get_sample_count(), 0);
}

/// An allowed name that resolves to a private address is refused unless private addresses are
/// allowed; the connection goes to the address that was checked (the resolver's answer), so a
/// second lookup cannot redirect it.
#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused() {
    let mut receiver = Receiver::start("127.0.0.1", &[]).await;
    let metrics = Metrics::new();
    let url = WebhookUrl::parse(&format!(
        "http://hooks.example.com:{}/x",
        receiver.addr.port()
    ))
    .unwrap();
    let to_receiver: Arc<dyn Resolve> = Arc::new(FixedResolver(vec![receiver.addr]));
    let mut cfg = config(&["hooks.example.com"]);
    cfg.policy.allow_private = false;
    let outcome = client(&cfg, &metrics, to_receiver.clone())
        .deliver(&url, "batch.completed", Bytes::from_static(EVENT))
        .await;
    assert!(
        matches!(&outcome, Outcome::Refused(why) if why.contains("loopback")),
        "{outcome:?}"
    );
    // One private address among public ones refuses them all.
    let mixed: Arc<dyn Resolve> = Arc::new(FixedResolver(vec![
        "93.184.216.34:0".parse().unwrap(),
        "[::ffff:169.254.169.254]:0".parse().unwrap(),
    ]));
    let outcome = client(&cfg, &metrics, mixed)
        .deliver(&url, "batch.completed", Bytes::from_static(EVENT))
        .await;
    assert!(
        matches!(&outcome, Outcome::Refused(why) if why.contains("link-local")),
        "{outcome:?}"
    );
    assert!(receiver.received().is_empty());

    // Allowed: the request reaches the resolved address, with the URL's host in `Host`.
    cfg.policy.allow_private = true;
    let outcome = client(&cfg, &metrics, to_receiver)
        .deliver(&url, "batch.completed", Bytes::from_static(EVENT))
        .await;
    assert_eq!(outcome, Outcome::Delivered { attempts: 1 });
    let r = receiver.next().await;
    assert_eq!(
        header(&r, "host"),
        format!("hooks.example.com:{}", receiver.addr.port())
    );
}

/// A receiver answering with a redirect to another host: refused at once, the `Location` never
/// fetched (receiver B gets nothing), whether B's host is allowed or not.
#[tokio::test]
async fn a_redirect_is_never_followed() {
    let mut b = Receiver::start("127.0.0.2", &[]).await;
    let location = format!("http://{}/stolen", b.addr);
    let mut a = Receiver::start("127.0.0.1", &[Answer::Redirect(location)]).await;
    for allow in [&["127.0.0.1"][..], &["127.0.0.1", "127.0.0.2"][..]] {
        let metrics = Metrics::new();
        let outcome = system(&config(allow), &metrics)
            .deliver(&a.url("/"), "batch.completed", Bytes::from_static(EVENT))
            .await;
        assert!(
            matches!(&outcome, Outcome::Refused(why) if why.contains("302") && why.contains("not followed")),
            "{outcome:?}"
        );
        assert_eq!(a.received().len(), 1, "one request to A, no retry");
        assert_eq!(count(&metrics, "refused"), 1);
    }
    assert!(b.received().is_empty(), "B was never contacted");
}

/// With the queue full, a new delivery is dropped and counted at once: `enqueue` never waits.
#[tokio::test]
async fn a_full_queue_drops_without_waiting() {
    let mut receiver = Receiver::start("127.0.0.1", &[Answer::Hang]).await;
    let metrics = Metrics::new();
    let mut cfg = config(&["127.0.0.1"]);
    cfg.max_pending = 1;
    let sender = WebhookSender::new(&cfg, metrics.clone());
    sender.enqueue(&receiver.url("/"), "batch.completed", Some("b1"), EVENT);
    // The first delivery is in progress (the receiver holds its request unanswered).
    receiver.next().await;
    assert_eq!(metrics.webhook_pending.get(), 1);
    sender.enqueue(&receiver.url("/"), "batch.completed", Some("b2"), EVENT);
    assert_eq!(
        count(&metrics, "dropped"),
        1,
        "decided before enqueue returned"
    );
    // A body larger than the byte budget is dropped too.
    let mut cfg = config(&["127.0.0.1"]);
    cfg.max_pending_bytes = 16;
    let small = WebhookSender::new(&cfg, metrics.clone());
    small.enqueue(&receiver.url("/"), "batch.completed", Some("b3"), EVENT);
    assert_eq!(count(&metrics, "dropped"), 2);
}

/// A worker without a secret or an allow list sends nothing.
#[tokio::test]
async fn no_webhooks_without_an_allow_list_and_a_secret() {
    let mut receiver = Receiver::start("127.0.0.1", &[]).await;
    let metrics = Metrics::new();
    let mut no_secret = config(&["127.0.0.1"]);
    no_secret.secret = None;
    for cfg in [WebhookConfig::default(), no_secret] {
        assert!(!cfg.is_enabled());
        assert!(cfg.check_url(&receiver.url("/")).is_err());
        let sender = WebhookSender::new(&cfg, metrics.clone());
        sender.enqueue(&receiver.url("/"), "batch.completed", Some("b1"), EVENT);
        sender.wait_idle().await;
    }
    assert_eq!(count(&metrics, "refused"), 2);
    assert!(receiver.received().is_empty());
}
