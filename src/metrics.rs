//! Prometheus metrics and the health endpoints, served on one port (`--metrics-addr`):
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (model loaded, broker connected,
//! storage reachable).
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Metrics {
    pub registry: Registry,
    /// Messages by outcome: completed, republished (manifest existed), failed (requeued),
    /// dead_lettered, cancelled.
    pub batches: IntCounterVec,
    /// Images by outcome: completed, failed, resumed, cancelled (planned, never stored).
    pub images: IntCounterVec,
    /// `sdbatch cancel` broadcasts heard, by outcome: `cancelled` (a message in hand is being
    /// stopped), `too_late` (its images were all stored, or it already failed), `not_here` (no
    /// message of that batch in hand), `invalid` (not a cancel request).
    pub cancel_requests: IntCounterVec,
    /// GPU batches stopped between UNet steps (or before starting) because no image of theirs
    /// was wanted any more.
    pub gpu_batches_stopped: IntCounter,
    pub dead_letters: IntCounterVec,
    /// Batch messages taken in, by priority lane.
    pub lane_received: IntCounterVec,
    /// Batch messages acked (completed, or dead-lettered by the worker), by priority lane.
    pub lane_acked: IntCounterVec,
    /// Retries by cause: storage, publish.
    pub retries: IntCounterVec,
    pub oom_splits: IntCounter,
    /// Calibration batches run at start-up (CUDA only; none when a calibration file had them).
    pub warm_up_batches: IntCounter,
    /// Images the safety checker flagged, by the action taken (flag, blank, drop).
    pub safety_flagged: IntCounterVec,
    /// CLIP scores of generated images.
    pub clip_score: Histogram,
    pub gpu_batches: IntCounter,
    pub gpu_images: IntCounter,
    pub batch_seconds: Histogram,
    pub unet_step_seconds: Histogram,
    pub text_encode_seconds: Histogram,
    pub vae_decode_seconds: Histogram,
    pub png_encode_seconds: Histogram,
    pub upload_seconds: Histogram,
    pub inflight_batches: IntGauge,
    /// Images in the last GPU batch.
    pub batch_size: IntGauge,
    /// The prefetch the worker last asked the broker for (work-aware holding).
    pub prefetch: IntGauge,
    /// Images on the GPU or generated and not yet stored (bounded by `--max-pending-images`).
    pub pending_images: IntGauge,
    pub device_memory_bytes: IntGaugeVec,
    pub model_load_seconds: prometheus::Gauge,
    /// From the metrics' creation (process start) to ready: load, compiled packages, warm-up.
    pub time_to_ready_seconds: prometheus::Gauge,
    created: std::time::Instant,
    /// Time the model thread waited between batches.
    pub gpu_idle_seconds: prometheus::Counter,
    pub gpu_busy_seconds: prometheus::Counter,
    /// Connections to this endpoint closed unserved because `ServerLimits::max_connections` were
    /// open.
    pub http_connections_refused: IntCounter,
    /// Webhook deliveries by outcome: delivered, failed_retrying (an attempt failed, another
    /// follows), gave_up, refused (policy or redirect), dropped (queue full).
    pub webhook_deliveries: IntCounterVec,
    /// Time of each webhook attempt (lookup, connect, TLS, request, response head).
    pub webhook_request_seconds: Histogram,
    /// Webhook deliveries waiting or in progress.
    pub webhook_pending: IntGauge,
    /// Called before each rendering, for values kept elsewhere (the store's retry count).
    refreshers: std::sync::Mutex<Vec<Refresher>>,
    /// Readiness inputs.
    pub model_loaded: AtomicBool,
    pub broker_connected: AtomicBool,
    pub storage_reachable: AtomicBool,
}

type Refresher = Box<dyn Fn(&Metrics) + Send + Sync>;

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let fcounter = |name: &str, help: &str| {
            let c = prometheus::Counter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, b: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let m = Metrics {
            batches: counter_vec(
                "sdbatch_batches_total",
                "Batch messages by outcome.",
                "status",
            ),
            images: counter_vec("sdbatch_images_total", "Images by outcome.", "status"),
            dead_letters: counter_vec(
                "sdbatch_dead_letters_total",
                "Messages dead-lettered, by reason.",
                "reason",
            ),
            lane_received: counter_vec(
                "sdbatch_lane_messages_received_total",
                "Batch messages taken in, by priority lane.",
                "lane",
            ),
            lane_acked: counter_vec(
                "sdbatch_lane_messages_acked_total",
                "Batch messages acked (completed or dead-lettered), by priority lane.",
                "lane",
            ),
            retries: counter_vec(
                "sdbatch_retries_total",
                "In-process retries, by cause.",
                "cause",
            ),
            cancel_requests: counter_vec(
                "sdbatch_cancel_requests_total",
                "Cancel broadcasts heard, by outcome.",
                "outcome",
            ),
            gpu_batches_stopped: counter(
                "sdbatch_gpu_batches_stopped_total",
                "GPU batches stopped because none of their images was wanted any more.",
            ),
            oom_splits: counter(
                "sdbatch_oom_splits_total",
                "GPU batches split after CUDA ran out of memory.",
            ),
            warm_up_batches: counter(
                "sdbatch_warm_up_batches_total",
                "Calibration batches run at start-up (CUDA only).",
            ),
            safety_flagged: counter_vec(
                "sdbatch_safety_flagged_total",
                "Images the safety checker flagged, by action taken.",
                "action",
            ),
            clip_score: histogram(
                "sdbatch_clip_score",
                "CLIP score (100 x cosine) of generated images.",
                prometheus::linear_buckets(0.0, 5.0, 11).unwrap_or_default(),
            ),
            gpu_batches: counter("sdbatch_gpu_batches_total", "GPU batches run."),
            gpu_images: counter(
                "sdbatch_gpu_images_total",
                "Images generated in GPU batches.",
            ),
            batch_seconds: histogram(
                "sdbatch_batch_seconds",
                "Message latency, delivery to ack.",
                buckets(0.5, 2.0, 14),
            ),
            unet_step_seconds: histogram(
                "sdbatch_unet_step_seconds",
                "Time per UNet step of a GPU batch.",
                buckets(0.001, 2.0, 14),
            ),
            text_encode_seconds: histogram(
                "sdbatch_text_encode_seconds",
                "Text encoding per GPU batch.",
                buckets(0.001, 2.0, 12),
            ),
            vae_decode_seconds: histogram(
                "sdbatch_vae_decode_seconds",
                "VAE decoding per GPU batch.",
                buckets(0.005, 2.0, 12),
            ),
            png_encode_seconds: histogram(
                "sdbatch_png_encode_seconds",
                "Image encoding (PNG, JPEG or WebP) per image.",
                buckets(0.001, 2.0, 12),
            ),
            upload_seconds: histogram(
                "sdbatch_upload_seconds",
                "Upload per image, retries included.",
                buckets(0.005, 2.0, 14),
            ),
            inflight_batches: gauge(
                "sdbatch_inflight_batches",
                "Messages in hand (delivered, not yet acked).",
            ),
            batch_size: gauge("sdbatch_batch_size", "Images in the last GPU batch."),
            prefetch: gauge(
                "sdbatch_prefetch",
                "Messages the worker currently lets the broker deliver (work-aware basic.qos).",
            ),
            pending_images: gauge(
                "sdbatch_pending_images",
                "Images on the GPU or generated and not yet stored (--max-pending-images).",
            ),
            device_memory_bytes: {
                let g = IntGaugeVec::new(
                    Opts::new("sdbatch_device_memory_bytes", "CUDA device memory."),
                    &["kind"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            time_to_ready_seconds: {
                let g = prometheus::Gauge::new(
                    "sdbatch_time_to_ready_seconds",
                    "Time from start to ready (model loaded and warmed up): a cold start's cost.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            created: std::time::Instant::now(),
            model_load_seconds: {
                let g = prometheus::Gauge::new(
                    "sdbatch_model_load_seconds",
                    "Time the model took to load.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            gpu_idle_seconds: fcounter(
                "sdbatch_gpu_idle_seconds_total",
                "Time the model thread waited between GPU batches.",
            ),
            gpu_busy_seconds: fcounter(
                "sdbatch_gpu_busy_seconds_total",
                "Time the model thread spent generating.",
            ),
            http_connections_refused: counter(
                "sdbatch_http_connections_refused_total",
                "Connections to the metrics endpoint closed unserved: too many were open.",
            ),
            webhook_deliveries: counter_vec(
                "sdbatch_webhook_deliveries_total",
                "Webhook deliveries by outcome (failed_retrying: attempts that are retried).",
                "outcome",
            ),
            webhook_request_seconds: histogram(
                "sdbatch_webhook_request_seconds",
                "Time of each webhook attempt.",
                buckets(0.005, 2.0, 14),
            ),
            webhook_pending: gauge(
                "sdbatch_webhook_pending",
                "Webhook deliveries waiting or in progress.",
            ),
            refreshers: std::sync::Mutex::new(Vec::new()),
            model_loaded: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            storage_reachable: AtomicBool::new(false),
            registry,
        };
        Arc::new(m)
    }

    /// The model is loaded and warmed up: /readyz may answer 200 (with the other checks), and the
    /// time to get here is recorded.
    pub fn mark_ready(&self) {
        self.time_to_ready_seconds
            .set(self.created.elapsed().as_secs_f64());
        self.model_loaded.store(true, Ordering::Relaxed);
    }

    /// Refreshes the device-memory gauges (CUDA only).
    pub fn sample_device_memory(&self) {
        if let Some((free, total)) = crate::device::cuda_memory() {
            self.device_memory_bytes
                .with_label_values(&["free"])
                .set(free as i64);
            self.device_memory_bytes
                .with_label_values(&["used"])
                .set((total - free) as i64);
        }
    }

    /// Runs `f` before every rendering, so a scrape sees values counted outside the registry as
    /// they are now, not as of the last time the worker's loop carried them over.
    pub fn on_render(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut r) = self.refreshers.lock() {
            r.push(Box::new(f));
        }
    }

    pub fn render(&self) -> String {
        self.sample_device_memory();
        if let Ok(refreshers) = self.refreshers.lock() {
            for f in refreshers.iter() {
                f(self);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Readiness and the reasons it is not ready.
    pub fn readiness(&self) -> (bool, String) {
        let checks = [
            ("model", self.model_loaded.load(Ordering::Relaxed)),
            ("broker", self.broker_connected.load(Ordering::Relaxed)),
            ("storage", self.storage_reachable.load(Ordering::Relaxed)),
        ];
        let ok = checks.iter().all(|(_, v)| *v);
        let text = checks
            .iter()
            .map(|(k, v)| format!("{k}: {}", if *v { "ok" } else { "not ready" }))
            .collect::<Vec<_>>()
            .join("\n");
        (ok, text + "\n")
    }
}

/// Limits of the HTTP server behind `/metrics`, `/healthz` and `/readyz`. Its clients are probes
/// and Prometheus: a few short GETs a minute. Anything slower or bigger is a broken or hostile
/// client, and must not cost the worker file descriptors or memory (the broker connection and the
/// store need them) nor starve the probes.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time a client has to send a whole request head (request line and headers). The clock
    /// starts when the connection is accepted and again after each response on a kept-alive
    /// connection, so this is the idle timeout too. Default 5 s.
    pub header_read_timeout: Duration,
    /// A connection is closed this long after it was accepted, whatever it is doing (a client
    /// that reads the response slowly, or keeps sending requests). Default 30 s.
    pub connection_lifetime: Duration,
    /// Open connections at most. Connections beyond it are closed as soon as they are accepted,
    /// not queued: a queue would hold their file descriptors all the same. Default 64.
    pub max_connections: usize,
    /// Size of a request head (request line and headers) in bytes; larger heads are answered
    /// 431. Default 4096.
    pub max_header_bytes: usize,
    /// Declared request body size in bytes; larger bodies, and bodies of undeclared size
    /// (`Transfer-Encoding`), are answered 413. These are GET endpoints. Default 0.
    pub max_body_bytes: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(30),
            max_connections: 64,
            max_header_bytes: 4096,
            max_body_bytes: 0,
        }
    }
}

/// Headers per request at most (hyper's default is 100; probes send a handful).
const MAX_HEADERS: usize = 32;
/// hyper's smallest read buffer; it must hold a whole request head.
const MIN_READ_BUFFER_BYTES: usize = 8192;
/// Pause after a failed `accept` (typically out of file descriptors): retrying at once would
/// spin, and the connections in hand free theirs as they end.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

fn router(metrics: Arc<Metrics>, max_body_bytes: u64) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let m = m2.clone();
                async move {
                    let (ok, text) = m.readiness();
                    (
                        if ok {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        },
                        text,
                    )
                }
            }),
        )
        // `layer` rather than `route_layer`: unknown paths are refused the same way.
        .layer(axum::middleware::from_fn_with_state(
            max_body_bytes,
            refuse_bodies,
        ))
}

/// Answers 413 to requests that declare a body over the limit or send one of undeclared size.
/// The handlers never read bodies; this stops a client from streaming one into the connection.
async fn refuse_bodies(
    axum::extract::State(max_body_bytes): axum::extract::State<u64>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let headers = req.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    let too_large = match declared {
        // Unparseable lengths never get here (hyper answers 400), but refuse them all the same.
        Some(None) => true,
        Some(Some(n)) => n > max_body_bytes,
        None => headers.contains_key(header::TRANSFER_ENCODING),
    };
    if too_large {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONNECTION, "close")],
            "request bodies are not accepted here\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on an already bound listener (bound by the caller,
/// so a port conflict fails its start-up) until the process ends. Only a failure to
/// accept is retried (after a pause); nothing a client does ends the loop.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: ServerLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper_util::service::TowerToHyperService::new(router(
        metrics.clone(),
        limits.max_body_bytes,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(MAX_HEADERS)
        .max_buf_size(limits.max_header_bytes.max(MIN_READ_BUFFER_BYTES))
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed; pausing");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it. Logged at debug: a flood must not flood the log too.
            metrics.http_connections_refused.inc();
            tracing::debug!(%peer, "metrics endpoint: connection limit reached, closing");
            drop(stream);
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(stream), service.clone());
        let lifetime = limits.connection_lifetime;
        tokio::spawn(async move {
            // Dropping the connection (on error or at the end of its lifetime) closes the socket.
            match tokio::time::timeout(lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics connection closed: lifetime over"),
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_reports_readiness() {
        let m = Metrics::new();
        m.batches.with_label_values(&["completed"]).inc();
        let text = m.render();
        assert!(
            text.contains("sdbatch_batches_total{status=\"completed\"} 1"),
            "{text}"
        );
        let (ok, why) = m.readiness();
        assert!(!ok && why.contains("model: not ready"));
        m.model_loaded.store(true, Ordering::Relaxed);
        m.broker_connected.store(true, Ordering::Relaxed);
        m.storage_reachable.store(true, Ordering::Relaxed);
        assert!(m.readiness().0);
    }

    // The server against real TCP clients on 127.0.0.1. The clients are blocking std sockets on
    // the test thread; the server runs on its own runtime thread, as in the worker.
    use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
    use std::net::TcpStream;

    /// Starts the server on an ephemeral port of 127.0.0.1 and returns the port once it listens.
    fn start(limits: ServerLimits) -> (u16, Arc<Metrics>) {
        let metrics = Metrics::new();
        let m = metrics.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
                // A backlog for the 500-connection burst (std's default is 128).
                let listener = socket.listen(1024).unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                serve_on(listener, m, limits).await.unwrap();
            });
        });
        (rx.recv().unwrap(), metrics)
    }

    /// 500 client sockets and their 500 server ends live in this process: lift the soft
    /// descriptor limit to the hard one where it is lower.
    fn raise_fd_limit() {
        // SAFETY: getrlimit/setrlimit on a local struct.
        unsafe {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
                l.rlim_cur = l.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    }

    fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Only an outer bound: every wait below ends on an event (a response or an EOF).
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Sends `request` on a fresh connection and returns the status code of the answer (0 when
    /// the connection was closed without one).
    fn send(port: u16, request: &[u8]) -> u16 {
        let mut s = connect(port);
        let _ = s.write_all(request);
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    fn get(port: u16, path: &str) -> u16 {
        send(
            port,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    /// A request head cut off in the middle of a header, as a slowloris client sends it.
    const PARTIAL: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa";

    /// Whether the server has closed `s` (EOF or reset) without waiting.
    fn closed_now(s: &TcpStream) -> bool {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let closed = match (&*s).read(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        };
        s.set_nonblocking(false).unwrap();
        closed
    }

    /// Reads until the server closes `s`; returns what it sent. Panics if it never does.
    fn read_until_closed(mut s: &TcpStream) -> String {
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// One line, or None once the server closed the connection. Panics when it neither
    /// answers nor closes.
    fn read_line(reader: &mut BufReader<&TcpStream>) -> Option<String> {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }

    /// Reads one response of a kept-alive connection: its status, or None once the server
    /// closed the connection.
    fn read_response(reader: &mut BufReader<&TcpStream>) -> Option<u16> {
        let status = read_line(reader)?;
        let mut length = 0;
        loop {
            let line = read_line(reader)?;
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        status.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn slow_headers_do_not_block_health_and_are_closed_after_the_header_timeout() {
        raise_fd_limit();
        let (port, _) = start(ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1000,
            ..ServerLimits::default()
        });
        let slow: Vec<TcpStream> = (0..500)
            .map(|_| {
                let mut s = connect(port);
                s.write_all(PARTIAL).unwrap();
                s
            })
            .collect();
        assert_eq!(get(port, "/healthz"), 200);
        // Opening 500 local connections takes far less than the 5 s header timeout, so every
        // one is still open while the probe was answered.
        let early = slow.iter().filter(|s| closed_now(s)).count();
        assert_eq!(
            early, 0,
            "slow connections closed before the header timeout"
        );
        for s in &slow {
            let sent = read_until_closed(s);
            assert!(
                !sent.contains("200"),
                "a partial request was answered: {sent}"
            );
        }
        assert_eq!(get(port, "/healthz"), 200);
    }

    #[test]
    fn connections_over_the_limit_are_closed_at_once() {
        let (port, metrics) = start(ServerLimits {
            // Far longer than the test: only the limit can close a connection.
            header_read_timeout: Duration::from_secs(600),
            connection_lifetime: Duration::from_secs(600),
            max_connections: 4,
            ..ServerLimits::default()
        });
        let held: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut s = connect(port);
                s.write_all(PARTIAL).unwrap();
                s
            })
            .collect();
        // Accepted after the four (one accept loop, in order), so refused and closed.
        let mut extra = connect(port);
        let _ = extra.write_all(PARTIAL);
        read_until_closed(&extra);
        assert_eq!(get(port, "/healthz"), 0, "a fifth connection is refused");
        assert!(
            held.iter().all(|s| !closed_now(s)),
            "the first four stay open"
        );
        assert!(metrics.http_connections_refused.get() >= 2);

        // Once they go, the slots are free again (their release follows the clients' close,
        // so try until one is served).
        drop(held);
        let mut attempts = 0;
        while get(port, "/healthz") != 200 {
            attempts += 1;
            assert!(attempts < 10_000, "slots never freed");
            std::thread::yield_now();
        }
    }

    #[test]
    fn oversized_heads_and_bodies_are_refused() {
        let (port, _) = start(ServerLimits::default());
        assert_eq!(get(port, "/healthz"), 200);
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(5000)
        );
        assert_eq!(send(port, big.as_bytes()), 431);
        let body = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n";
        assert_eq!(send(port, body), 413);
        let chunked = b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        assert_eq!(send(port, chunked), 413);
    }

    #[test]
    fn idle_and_long_lived_connections_are_closed() {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

        // Idle after one answer: closed by the header timeout, which restarts per request.
        let (port, _) = start(ServerLimits {
            header_read_timeout: Duration::from_secs(1),
            connection_lifetime: Duration::from_secs(600),
            ..ServerLimits::default()
        });
        let idle = connect(port);
        (&idle).write_all(request).unwrap();
        let mut reader = BufReader::new(&idle);
        assert_eq!(read_response(&mut reader), Some(200));
        assert_eq!(read_response(&mut reader), None, "idle connection closed");

        // Never idle: requests back to back until the lifetime closes the connection.
        let (port, _) = start(ServerLimits {
            header_read_timeout: Duration::from_secs(600),
            connection_lifetime: Duration::from_secs(1),
            ..ServerLimits::default()
        });
        let busy = connect(port);
        let mut reader = BufReader::new(&busy);
        let mut answered = 0u64;
        // Only an outer bound, far beyond the 1 s lifetime.
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        while (&busy).write_all(request).is_ok() && read_response(&mut reader) == Some(200) {
            answered += 1;
            assert!(
                std::time::Instant::now() < give_up,
                "connection never closed"
            );
        }
        assert!(answered > 0);
    }
}
