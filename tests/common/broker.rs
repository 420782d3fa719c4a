//! Test helpers for the worker: a real RabbitMQ (127.0.0.1:5672, started by scripts/services.sh),
//! unique queue names per test, worker processes, and event watchers.
use super::s3::S3Server;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sdbatch::events::Event;
use sdbatch::queue::{self, Publisher, Topology};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t-{name}-{}-{nanos}", std::process::id())
}

/// Ready messages in `queue_name` on `conn` (not counting ones delivered and unacked).
pub async fn ready_count(conn: &Connection, queue_name: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue_name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "".into()).await;
    q.message_count()
}

pub struct Broker {
    pub conn: Connection,
    pub channel: Channel,
    pub publisher: Publisher,
    pub topology: Topology,
}

impl Broker {
    /// Connects and declares the topology for `prefix` with `delivery_limit`.
    pub async fn new(prefix: &str, delivery_limit: u32) -> Broker {
        Self::open(
            &amqp_url(),
            prefix,
            delivery_limit,
            "RabbitMQ on 127.0.0.1:5672 (run scripts/services.sh)",
        )
        .await
    }

    /// Like `new`, on the broker at `url` (a `PrivateBroker`'s, say) instead of the shared one.
    pub async fn connect(url: &str, prefix: &str, delivery_limit: u32) -> Broker {
        Self::open(url, prefix, delivery_limit, &format!("RabbitMQ at {url}")).await
    }

    async fn open(url: &str, prefix: &str, delivery_limit: u32, what: &str) -> Broker {
        let conn = queue::connect(url, &format!("test {prefix}"))
            .await
            .expect(what);
        let channel = conn.create_channel().await.unwrap();
        let mut topology = Topology::with_prefix(prefix);
        topology.delivery_limit = delivery_limit;
        queue::declare(&channel, &topology).await.unwrap();
        let publisher = Publisher::new(&conn).await.unwrap();
        Broker {
            conn,
            channel,
            publisher,
            topology,
        }
    }

    pub async fn publish(&self, body: &[u8]) {
        self.publish_with_headers(body, None).await
    }

    /// Publishes to the queue of `lane` (what `submit --priority` does).
    pub async fn publish_to(&self, lane: queue::Lane, body: &[u8]) {
        let t = &self.topology;
        self.publisher
            .publish_json(&t.jobs_exchange, t.queue(lane), body, None, true)
            .await
            .unwrap();
    }

    /// Publishes to the jobs queue with producer headers.
    pub async fn publish_with_headers(&self, body: &[u8], headers: Option<FieldTable>) {
        let t = &self.topology;
        self.publisher
            .publish_json(&t.jobs_exchange, &t.jobs_queue, body, headers, true)
            .await
            .unwrap();
    }

    /// Ready messages in `queue` (not counting ones delivered and unacked).
    pub async fn ready(&self, queue_name: &str) -> u32 {
        ready_count(&self.conn, queue_name).await
    }

    /// Takes (acks) every dead letter.
    pub async fn drain_dead(&self) -> Vec<lapin::message::Delivery> {
        self.drain(&self.topology.dead_queue).await
    }

    /// Takes (acks) every message of `queue_name`, in queue order.
    pub async fn drain(&self, queue_name: &str) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue_name.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            out.push(m.delivery);
        }
        out
    }

    /// Subscribes to every event of this topology.
    pub async fn watch_events(&self) -> Events {
        let ch = self.conn.create_channel().await.unwrap();
        let consumer = queue::subscribe_events(&ch, &self.topology, &["#"])
            .await
            .unwrap();
        Events {
            _channel: ch,
            consumer,
        }
    }

    pub async fn cleanup(self) {
        let t = &self.topology;
        for q in [&t.jobs_queue, &t.jobs_high_queue, &t.dead_queue] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [&t.jobs_exchange, &t.dead_exchange, &t.events_exchange] {
            let _ = self
                .channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "".into()).await;
    }
}

pub struct Events {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl Events {
    /// The next completion or failure (progress reports skipped), or None after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_any(left).await? {
                Event::Progress(_) => continue,
                other => return Some(other),
            }
        }
    }

    /// The next event of any kind, `batch.progress` included, or None after `timeout`.
    pub async fn next_any(&mut self, timeout: Duration) -> Option<Event> {
        let d = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        d.acker.ack(BasicAckOptions::default()).await.ok()?;
        Some(Event::from_json(&d.data).expect("events are valid JSON"))
    }

    /// Every event that arrives within `quiet` of the previous one.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next(quiet).await {
            out.push(e);
        }
        out
    }
}

/// A `sdbatch worker` child process writing its log to a file.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
    /// Where its /metrics, /healthz and /readyz are served.
    pub metrics_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET on 127.0.0.1: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line of a Prometheus text exposition (e.g.
/// `sdbatch_batches_total{status="completed"}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

impl WorkerProcess {
    pub fn spawn(
        prefix: &str,
        s3: &S3Server,
        bucket: &str,
        log_dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> WorkerProcess {
        Self::spawn_env(prefix, s3, bucket, log_dir, name, extra, &[])
    }

    /// Like `spawn`, with extra environment variables (they win over the defaults).
    pub fn spawn_env(
        prefix: &str,
        s3: &S3Server,
        bucket: &str,
        log_dir: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        Self::spawn_via(prefix, s3, &s3.endpoint, bucket, log_dir, name, extra, env)
    }

    /// Like `spawn_env`, reaching the store through `endpoint` (a proxy in front of `s3`).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_via(
        prefix: &str,
        s3: &S3Server,
        endpoint: &str,
        bucket: &str,
        log_dir: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let model = super::model_dir();
        let metrics_port = free_port();
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        // The tiny model unless `extra` names another.
        let model_args: &[&str] = if extra.contains(&"--model") {
            &[]
        } else {
            &["--model", model.to_str().unwrap()]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_sdbatch"))
            .arg("worker")
            .args(model_args)
            .args([
                "--queue-prefix",
                prefix,
                "--s3-endpoint",
                endpoint,
                "--bucket",
                bucket,
                "--worker-id",
                name,
                "--metrics-addr",
                &metrics_addr,
            ])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", &s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "info,sdbatch=debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        WorkerProcess {
            child,
            log,
            metrics_port,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").1
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200: model loaded, broker connected, store reachable.
    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        while http_get(self.metrics_port, "/readyz").0 != 200 {
            assert!(
                start.elapsed() < timeout,
                "worker never ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the metric `series` reaches `at_least` (an event the worker counted, not a
    /// log line that may come before or after the work it names).
    pub async fn wait_for_metric(&self, series: &str, at_least: f64, timeout: Duration) {
        let start = Instant::now();
        while metric(&self.metrics(), series) < at_least {
            assert!(
                start.elapsed() < timeout,
                "{series} never reached {at_least}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "worker did not exit:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
