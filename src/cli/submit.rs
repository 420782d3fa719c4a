//! `sdbatch submit`: prompts file or template → batch messages, published with confirms;
//! `--wait` follows the events exchange until every batch is accounted for.
use super::{BrokerArgs, MAX_FIELD_CHARS, printable};
use anyhow::{Context, Result, bail};
use clap::Args;
use futures_lite::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::BasicAckOptions;
use sdbatch::events::{self, Event};
use sdbatch::message::{self, BatchMessage, Limits, MessageOutput, MessageParams};
use sdbatch::queue::{self, Lane, Publisher};
use sdbatch::submit_input::{Split, expand_template, into_messages, parse_var, read_items};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Prompts: .txt (one a line), .jsonl (prompt, id?, negative_prompt?, seed?, num_images?) or .csv
    /// (header row with the same column names).
    #[arg(
        long,
        conflicts_with = "template",
        required_unless_present = "template"
    )]
    pub prompts: Option<PathBuf>,
    /// Prompt template with {name} placeholders, e.g. "professional product photography of {product}, {style}".
    #[arg(long)]
    pub template: Option<String>,
    /// Template values: NAME=a,b,c or NAME=@file.txt (one value a line). Repeatable.
    #[arg(long = "var", requires = "template")]
    pub vars: Vec<String>,
    /// Prompts per message.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub batch_size: u32,
    /// Work per message at most, in image-steps-megapixels (images x steps x width x height /
    /// 10^6): the workers' `max_message_work`. Messages are split under it as well as under
    /// --batch-size. Without --width/--height, images are counted as 512x512 (SD 1.x).
    #[arg(long, default_value_t = sdbatch::message::DEFAULT_MAX_MESSAGE_WORK)]
    pub max_work: f64,
    /// Batch ids are `{batch-prefix}-0001`, ... (default: `batch-<UUIDv7>`, unique per submit).
    #[arg(long)]
    pub batch_prefix: Option<String>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long)]
    pub scheduler: Option<String>,
    /// concept, quality, production or style-test (explicit parameters win).
    #[arg(long)]
    pub preset: Option<String>,
    /// Ask the workers to run (true) or skip (false) the safety checker (default: theirs).
    #[arg(long)]
    pub safety_checker: Option<bool>,
    /// Text-encoder layers to skip from the end (AUTOMATIC1111 numbering: 2 = penultimate).
    #[arg(long)]
    pub clip_skip: Option<u32>,
    /// Guidance rescale in 0..=1 (0 = off).
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// plain (default) or a1111: AUTOMATIC1111's prompt weights and long prompts.
    #[arg(long, value_parser = ["plain", "a1111"])]
    pub prompt_syntax: Option<String>,
    /// A LoRA in the workers' --lora-dir, NAME or NAME:WEIGHT (weight 1 by default); repeat for
    /// several.
    #[arg(long = "lora", value_name = "NAME[:WEIGHT]", value_parser = sdbatch::pipeline::adapters::parse_flag)]
    pub loras: Vec<sdbatch::pipeline::adapters::LoraWeight>,
    /// Hires fix: generate, upscale by this factor (in (1, 4]), then img2img at the larger size.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass's schedule (default: --steps).
    #[arg(long, requires = "hires_scale")]
    pub hires_steps: Option<u32>,
    /// Hires fix: strength of the second pass, in (0, 1] (default 0.5).
    #[arg(long, requires = "hires_scale")]
    pub hires_strength: Option<f64>,
    /// Hires fix: lanczos (default) or latent.
    #[arg(long, requires = "hires_scale", value_parser = ["lanczos", "latent"])]
    pub hires_upscaler: Option<String>,
    /// Bucket (must be allowed by the workers; default: the workers' default bucket).
    #[arg(long)]
    pub bucket: Option<String>,
    /// Key prefix (default: the workers' default prefix).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Image format: png (default), jpeg or webp (lossless). Checked by validation.
    #[arg(long)]
    pub format: Option<String>,
    /// JPEG quality, 1..=100 (default 90; jpeg only).
    #[arg(long)]
    pub quality: Option<u32>,
    /// Follow the events until every batch completed or failed; print the object keys.
    #[arg(long)]
    pub wait: bool,
    /// The lane: `high` batches go to {prefix}.jobs.high, which workers take from first (still
    /// leaving the normal lane one message in every `--high-lane-ratio` + 1).
    #[arg(long, value_enum, default_value_t = Lane::Normal)]
    pub priority: Lane,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
}

fn build_messages(args: &SubmitArgs) -> Result<Vec<BatchMessage>> {
    let items = match (&args.prompts, &args.template) {
        (Some(path), _) => read_items(path)?,
        (None, Some(template)) => {
            let vars = args
                .vars
                .iter()
                .map(|v| parse_var(v, std::path::Path::new(".")))
                .collect::<Result<Vec<_>, _>>()?;
            expand_template(template, &vars)?
        }
        (None, None) => bail!("pass --prompts FILE or --template TEXT"),
    };
    // A UUIDv7 rather than the time in seconds: two submits in the same second got the same ids,
    // and workers answer a known batch id with the images they already made for it. v7 ids still
    // sort by creation time. `batch-` + 36 + `-NNNN` stays far inside the 128-character limit.
    let prefix = args
        .batch_prefix
        .clone()
        .unwrap_or_else(|| format!("batch-{}", uuid::Uuid::now_v7()));
    let params = MessageParams {
        steps: args.steps,
        guidance_scale: args.guidance,
        width: args.width,
        height: args.height,
        scheduler: args.scheduler.clone(),
        preset: args.preset.clone(),
        safety_checker: args.safety_checker,
        clip_skip: args.clip_skip,
        guidance_rescale: args.guidance_rescale,
        prompt_syntax: args.prompt_syntax.clone(),
        loras: (!args.loras.is_empty()).then(|| {
            args.loras
                .iter()
                .map(|l| sdbatch::message::MessageLora {
                    name: l.name.clone(),
                    weight: Some(l.weight),
                })
                .collect()
        }),
        // img2img and inpainting are not offered by `submit` (prompt files carry no images).
        strength: None,
        mask_blur: None,
        padding_mask_crop: None,
        hires: args
            .hires_scale
            .map(|scale| sdbatch::message::MessageHires {
                scale,
                steps: args.hires_steps,
                strength: args.hires_strength,
                upscaler: args.hires_upscaler.clone(),
            }),
    };
    let output = MessageOutput {
        bucket: args.bucket.clone(),
        prefix: args.prefix.clone(),
        format: args.format.clone(),
        quality: args.quality,
        // Webhooks are for producers that build their own messages; `submit --wait` listens on
        // the events exchange.
        webhook: None,
    };
    if !(args.max_work.is_finite() && args.max_work > 0.0) {
        anyhow::bail!("--max-work must be a positive number");
    }
    let steps = params
        .steps
        .map(|s| s as usize)
        .or_else(|| {
            params
                .preset
                .as_deref()
                .and_then(message::preset)
                .map(|p| p.steps)
        })
        .unwrap_or(message::DEFAULT_STEPS);
    let side = |v: Option<u32>| v.map_or(512, i64::from);
    let split = Split {
        max_items: args.batch_size as usize,
        max_work: args.max_work,
        work_per_image: message::image_work(
            steps,
            side(params.width),
            side(params.height),
            args.hires_scale
                .map(|scale| sdbatch::pipeline::hires::Hires {
                    scale,
                    steps: args.hires_steps.map_or(steps, |s| s as usize),
                    strength: args
                        .hires_strength
                        .unwrap_or(message::DEFAULT_HIRES_STRENGTH),
                    upscaler: Default::default(),
                })
                .as_ref(),
        ),
    };
    let messages = into_messages(items, split, &prefix, &params, &output)?;
    // Catch what a worker would reject before anything is published (bucket allow-lists and
    // size limits are the workers' to enforce).
    let limits = Limits {
        default_bucket: Some(args.bucket.clone().unwrap_or_else(|| "default".into())),
        max_items: usize::MAX,
        max_total_images: usize::MAX,
        max_side: 8192,
        ..Limits::default()
    };
    for m in &messages {
        message::validate(m, &limits, 512)
            .map_err(|e| anyhow::anyhow!("batch {}: {}", m.batch_id, e.message))?;
    }
    Ok(messages)
}

fn images_in(m: &BatchMessage) -> u64 {
    m.items
        .iter()
        .map(|i| u64::from(i.num_images.unwrap_or(1)))
        .sum()
}

pub async fn run(args: SubmitArgs) -> Result<()> {
    let messages = build_messages(&args)?;
    let topology = args.broker.topology();
    let conn = queue::connect(&args.broker.amqp_url, "sdbatch submit").await?;
    let channel = conn.create_channel().await?;
    queue::declare(&channel, &topology).await?;

    // Subscribe before publishing so no event can be missed.
    let mut events_consumer = if args.wait {
        Some(
            queue::subscribe_events(
                &channel,
                &topology,
                &[
                    events::BATCH_COMPLETED,
                    events::BATCH_FAILED,
                    events::BATCH_PROGRESS,
                    events::BATCH_CANCELLED,
                ],
            )
            .await?,
        )
    } else {
        None
    };

    let publisher = Publisher::new(&conn).await?;
    let mut expected: HashMap<String, u64> = HashMap::new();
    let lane_queue = topology.queue(args.priority);
    for m in &messages {
        publisher
            .publish_json(
                &topology.jobs_exchange,
                lane_queue,
                &m.to_json_vec(),
                None,
                true,
            )
            .await
            .with_context(|| format!("publishing batch {}", m.batch_id))?;
        expected.insert(m.batch_id.clone(), images_in(m));
    }
    let total_images: u64 = expected.values().sum();
    println!(
        "submitted {} batch(es), {} image(s) to {}",
        messages.len(),
        total_images,
        lane_queue
    );

    let Some(consumer) = events_consumer.as_mut() else {
        let _ = conn.close(200, "done".into()).await;
        return Ok(());
    };

    let bar = ProgressBar::new(total_images);
    bar.set_style(
        ProgressStyle::with_template("images {bar:30} {pos}/{len} done, {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("0 failed");
    let mut completed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    // `sdbatch cancel`led while waiting: (images stored, of total).
    let mut cancelled: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut failed_images = 0;
    // Images done per batch (progress reports, then the completion): the bar shows their sum.
    let mut done: HashMap<String, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let settled =
        |c: &BTreeMap<String, Vec<String>>,
         f: &BTreeMap<String, String>,
         x: &BTreeMap<String, (usize, usize)>| c.len() + f.len() + x.len();
    while settled(&completed, &failed, &cancelled) < expected.len() {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        let Ok(event) = Event::from_json(&delivery.data) else {
            continue;
        };
        // Events are at-least-once: count each batch once.
        let Some(id) = event.batch_id().map(str::to_string) else {
            continue;
        };
        if !expected.contains_key(&id)
            || completed.contains_key(&id)
            || failed.contains_key(&id)
            || cancelled.contains_key(&id)
        {
            continue;
        }
        match event {
            Event::Progress(p) => {
                // Reports of one batch only grow; an older one arriving late changes nothing.
                let now = (p.images_done as u64).min(expected[&id]);
                let before = done.entry(id).or_insert(0);
                if now > *before {
                    bar.inc(now - *before);
                    *before = now;
                }
            }
            Event::Completed(c) => {
                let before = done.get(&id).copied().unwrap_or(0);
                bar.inc((c.images.len() as u64).saturating_sub(before));
                // Worker-supplied text: printed escaped (see `printable`).
                completed.insert(
                    id,
                    c.images
                        .iter()
                        .map(|i| printable(&format!("s3://{}/{}", i.bucket, i.key), 1024))
                        .collect(),
                );
            }
            Event::Cancelled(c) => {
                failed_images += c.not_stored_keys.len() as u64;
                bar.set_message(format!("{failed_images} failed or cancelled"));
                cancelled.insert(id, (c.stored_keys.len(), c.images_total));
            }
            Event::Failed(f) => {
                failed_images += expected[&id];
                bar.set_message(format!("{failed_images} failed"));
                failed.insert(
                    id,
                    printable(&format!("{}: {}", f.reason, f.error), 4 * MAX_FIELD_CHARS),
                );
            }
        }
    }
    bar.finish();
    let _ = conn.close(200, "done".into()).await;

    let missing = expected.len() - settled(&completed, &failed, &cancelled);
    println!(
        "\n{} batch(es) completed, {} failed, {} cancelled, {} missing",
        completed.len(),
        failed.len(),
        cancelled.len(),
        missing
    );
    for (id, keys) in &completed {
        for k in keys {
            println!("{id}\t{k}");
        }
    }
    for (id, why) in &failed {
        println!("{id}\tFAILED\t{why}");
    }
    for (id, (stored, total)) in &cancelled {
        println!("{id}\tCANCELLED\t{stored} of {total} image(s) stored");
    }
    if missing > 0 {
        bail!(
            "{missing} batch(es) not accounted for after {} s",
            args.timeout_secs
        );
    }
    if !failed.is_empty() {
        bail!("{} batch(es) failed (see `sdbatch dlq list`)", failed.len());
    }
    if !cancelled.is_empty() {
        bail!("{} batch(es) were cancelled", cancelled.len());
    }
    Ok(())
}
