//! Prometheus metrics and the health endpoints, served on one port (`--metrics-addr`):
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (model loaded, broker connected,
//! storage reachable).
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Metrics {
    pub registry: Registry,
    /// Messages by outcome: completed, republished (manifest existed), failed (requeued),
    /// dead_lettered.
    pub batches: IntCounterVec,
    /// Images by outcome: completed, failed.
    pub images: IntCounterVec,
    pub dead_letters: IntCounterVec,
    /// Retries by cause: storage, publish.
    pub retries: IntCounterVec,
    pub oom_splits: IntCounter,
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
    pub device_memory_bytes: IntGaugeVec,
    pub model_load_seconds: prometheus::Gauge,
    /// Time the model thread waited between batches.
    pub gpu_idle_seconds: prometheus::Counter,
    pub gpu_busy_seconds: prometheus::Counter,
    /// Readiness inputs.
    pub model_loaded: AtomicBool,
    pub broker_connected: AtomicBool,
    pub storage_reachable: AtomicBool,
}

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
            retries: counter_vec(
                "sdbatch_retries_total",
                "In-process retries, by cause.",
                "cause",
            ),
            oom_splits: counter(
                "sdbatch_oom_splits_total",
                "GPU batches split after CUDA ran out of memory.",
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
                "PNG encoding per image.",
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
            model_loaded: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            storage_reachable: AtomicBool::new(false),
            registry,
        };
        Arc::new(m)
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

    pub fn render(&self) -> String {
        self.sample_device_memory();
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

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
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
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and health endpoints listening");
    axum::serve(listener, app).await
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
}
