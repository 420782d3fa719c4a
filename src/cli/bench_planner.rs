//! `sdbatch bench --planner`: many small messages through the real worker path (RabbitMQ, the
//! planner, the model thread, uploads, events), once with cross-message batching and once with
//! one message per GPU batch, printing images/s for both.
use super::bench::BenchArgs;
use anyhow::{Context, Result, bail};
use futures_lite::StreamExt;
use lapin::options::BasicAckOptions;
use sdbatch::config::defaults;
use sdbatch::events::Event;
use sdbatch::message::Limits;
use sdbatch::pipeline::{GenerateParams, ImageRequest, LoadOptions, StableDiffusion};
use sdbatch::queue::{self, Publisher, Topology};
use sdbatch::storage::{Storage, StorageConfig};
use sdbatch::worker::gpu::GpuExecutor;
use sdbatch::worker::{Worker, WorkerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct ModeResult {
    name: &'static str,
    seconds: f64,
    images: u64,
    gpu_batches: u64,
    gpu_images: u64,
    idle_ms: f64,
    busy_ms: f64,
}

#[allow(clippy::too_many_arguments)]
async fn run_mode(
    name: &'static str,
    prefetch: u16,
    max_batch: usize,
    args: &BenchArgs,
    amqp_url: &str,
    gpu: Arc<GpuExecutor>,
    storage: Arc<Storage>,
    bucket: &str,
) -> Result<ModeResult> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topology = Topology::with_prefix(&format!("sdbatch-bench-{name}-{stamp}"));
    let cfg = WorkerConfig {
        amqp_url: amqp_url.to_string(),
        topology: topology.clone(),
        prefetch,
        high_lane_ratio: defaults::HIGH_LANE_RATIO,
        worker_id: format!("bench-{name}"),
        model_name: args.model.model.display().to_string(),
        limits: Limits {
            default_bucket: Some(bucket.to_string()),
            ..Limits::default()
        },
        max_batch,
        memory_margin: defaults::MEMORY_MARGIN,
        grace_period: Duration::from_secs(defaults::GRACE_PERIOD_SECS),
        broker_timeout: queue::DEFAULT_OPERATION_TIMEOUT,
        consumer_timeout: Duration::from_secs(defaults::CONSUMER_TIMEOUT_SECS),
        max_pending_images: defaults::MAX_PENDING_IMAGES,
        progress_interval: sdbatch::progress::DEFAULT_INTERVAL,
        reconnect_min: Duration::from_millis(defaults::RECONNECT_MIN_MS),
        // Shorter than a worker's: a bench run that loses the broker should end soon.
        reconnect_max: Duration::from_secs(5),
        publish_attempts: defaults::PUBLISH_ATTEMPTS,
        safety_default: false,
        safety_policy: sdbatch::worker::SafetyPolicy::Flag,
        min_clip_score: None,
        // As a production worker: calibrated before the first message (CUDA only).
        warm_up: defaults::WARM_UP,
        calibration_file: None,
        lora_dir: None,
        lora_cache_bytes: defaults::LORA_CACHE_MB << 20,
        ai_marking: defaults::AI_MARKING,
        webhook: sdbatch::webhook::WebhookConfig::default(),
    };
    let conn = queue::connect(amqp_url, "sdbatch bench").await?;
    let channel = conn.create_channel().await?;
    queue::declare(&channel, &topology).await?;
    let mut consumer = queue::subscribe_events(&channel, &topology, &["#"]).await?;

    let metrics = sdbatch::metrics::Metrics::new();
    let worker = Worker::new(cfg, gpu, storage, metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(async move { worker.run(stop_rx).await });

    let publisher = Publisher::new(&conn).await?;
    let steps = args.sampling.steps;
    let started = Instant::now();
    for m in 0..args.messages {
        let items: Vec<_> = (0..args.prompts_per_message)
            .map(|i| {
                serde_json::json!({
                    "id": format!("p{i}"),
                    "prompt": format!("product shot number {m}, variant {i}, studio lighting"),
                    "seed": u64::from(m) * 100 + u64::from(i),
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "schema_version": 1,
            "batch_id": format!("bench-{name}-{stamp}-{m:04}"),
            "items": items,
            "params": {"steps": steps, "guidance_scale": args.sampling.guidance},
        }))?;
        publisher
            .publish_json(
                &topology.jobs_exchange,
                &topology.jobs_queue,
                &body,
                None,
                true,
            )
            .await?;
    }
    let mut completed = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.planner_timeout_secs);
    while completed.len() < args.messages as usize {
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = tokio::time::sleep_until(deadline) => bail!("{name}: timed out after {} of {} batches", completed.len(), args.messages),
        };
        let d = next.context("events consumer closed")??;
        d.acker.ack(BasicAckOptions::default()).await?;
        match Event::from_json(&d.data)? {
            Event::Completed(c) => {
                completed.insert(c.batch_id);
            }
            Event::Failed(f) => bail!("{name}: batch failed: {} {}", f.reason, f.error),
            Event::Cancelled(c) => bail!("{name}: batch {} was cancelled", c.batch_id),
            Event::Progress(_) => {}
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    handle.await??;
    for q in [
        &topology.jobs_queue,
        &topology.jobs_high_queue,
        &topology.dead_queue,
    ] {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    for e in [
        &topology.jobs_exchange,
        &topology.dead_exchange,
        &topology.events_exchange,
    ] {
        let _ = channel
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(ModeResult {
        name,
        seconds,
        images: u64::from(args.messages) * u64::from(args.prompts_per_message),
        gpu_batches: metrics.gpu_batches.get(),
        gpu_images: metrics.gpu_images.get(),
        idle_ms: metrics.gpu_idle_seconds.get() * 1e3,
        busy_ms: metrics.gpu_busy_seconds.get() * 1e3,
    })
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let device = sdbatch::device::parse_device(&args.model.device)?;
    let dtype = sdbatch::device::parse_dtype(&args.model.dtype, device)?;
    let amqp_url = args
        .amqp_url
        .clone()
        .unwrap_or_else(super::default_amqp_url);
    let mut storage_cfg =
        StorageConfig::new(args.storage_url.clone().unwrap_or_else(|| "s3://".into()));
    storage_cfg.endpoint = args.s3_endpoint.clone();
    let storage = Arc::new(Storage::connect(&storage_cfg).await?);
    storage.create_bucket(&args.bucket).await?;

    let dir = args.model.model.clone();
    let options = LoadOptions {
        variant: args.model.variant.clone(),
        attention_slice: args.model.attention_slicing,
        vae_slicing: args.model.vae_slicing,
        ..LoadOptions::new(device, dtype)
    };
    let gpu = Arc::new(
        GpuExecutor::start(move || {
            StableDiffusion::load(&dir, options).map(sdbatch::worker::gpu::Models::pipeline_only)
        })
        .await?,
    );
    // Warm-up (kernel selection, allocator growth) so neither mode pays for it.
    let native = gpu.info().native_size;
    let warm = GenerateParams {
        steps: args.sampling.steps as usize,
        guidance_scale: args.sampling.guidance,
        width: native,
        height: native,
        scheduler: args.sampling.scheduler,
        clip_skip: 1,
        guidance_rescale: 0.0,
        prompt_syntax: sdbatch::pipeline::prompt_weights::PromptSyntax::Plain,
        loras: Vec::new(),
    };
    let reqs: Vec<ImageRequest> = (0..args.planner_max_batch)
        .map(|i| ImageRequest {
            prompt: "warm-up".into(),
            negative_prompt: None,
            seed: i as u64,
        })
        .collect();
    gpu.generate(reqs, warm, false).await?;

    let per_message = args.prompts_per_message as usize;
    let modes = [
        ("one-message-per-batch", 1u16, per_message),
        ("planner", args.planner_prefetch, args.planner_max_batch),
    ];
    let mut results = Vec::new();
    for (name, prefetch, max_batch) in modes {
        results.push(
            run_mode(
                name,
                prefetch,
                max_batch,
                &args,
                &amqp_url,
                gpu.clone(),
                storage.clone(),
                &args.bucket,
            )
            .await?,
        );
    }
    println!(
        "sdbatch bench --planner: {} messages x {} prompts, {} steps, {} {}, worker path (RabbitMQ + {})",
        args.messages,
        args.prompts_per_message,
        args.sampling.steps,
        sdbatch::device::device_name(device),
        sdbatch::device::dtype_name(dtype),
        storage.describe()
    );
    println!(
        "{:<22} | {:>8} | {:>6} | {:>8} | {:>11} | {:>14} | {:>10}",
        "mode", "seconds", "images", "images/s", "GPU batches", "mean GPU batch", "GPU idle %"
    );
    println!("{}", "-".repeat(96));
    for r in &results {
        let idle_pct = 100.0 * r.idle_ms / (r.idle_ms + r.busy_ms).max(1e-9);
        println!(
            "{:<22} | {:>8.2} | {:>6} | {:>8.2} | {:>11} | {:>14.2} | {:>10.1}",
            r.name,
            r.seconds,
            r.images,
            r.images as f64 / r.seconds,
            r.gpu_batches,
            r.gpu_images as f64 / r.gpu_batches.max(1) as f64,
            idle_pct
        );
    }
    if let [base, planner] = &results[..] {
        println!(
            "speed-up: {:.2}x",
            (planner.images as f64 / planner.seconds) / (base.images as f64 / base.seconds)
        );
    }
    Ok(())
}
