//! Command-line interface: argument definitions and dispatch.
mod bench;
mod bench_planner;
mod cancel;
mod compile;
mod dlq;
mod generate;
mod status;
mod submit;
mod topology;
mod worker;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sdbatch::pipeline::adapters::LoraWeight;
use sdbatch::pipeline::schedulers::SchedulerKind;
use sdbatch::pipeline::single_file::SingleFileOptions;
use sdbatch::pipeline::{LoadOptions, StableDiffusion};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "sdbatch",
    version,
    about = "Batch Stable Diffusion v1 image generation on libtorch"
)]
pub struct Cli {
    /// Log output format (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate images for every prompt of a .txt or .jsonl file.
    Generate(generate::GenerateArgs),
    /// Measure throughput per batch size and print a table.
    Bench(bench::BenchArgs),
    /// Consume batch messages from RabbitMQ, upload images to S3, publish completion events.
    // Boxed: the worker has many flags, and the enum is built once.
    Worker(Box<worker::WorkerArgs>),
    /// Publish batch messages from a prompts file or a template (optionally wait for the results).
    Submit(submit::SubmitArgs),
    /// Inspect, requeue or purge dead-lettered batches.
    Dlq(dlq::DlqArgs),
    /// Declare the exchanges and queues (idempotent) and print them.
    Topology(topology::TopologyArgs),
    /// Each batch's state (queued, running with progress, completed with its keys, failed with
    /// its reason) from its objects and the dead-letter queue.
    Status(status::StatusArgs),
    /// Cancel queued or running batches: their unstarted images are never made, a GPU batch
    /// holding only their images stops, and workers publish `batch.cancelled`. A finished batch
    /// is left alone, and the command says so.
    Cancel(cancel::CancelArgs),
    /// Compile the UNet and VAE decoder ahead of time (AOTInductor) for this device: the folder
    /// `--compiled` takes.
    Compile(compile::CompileArgs),
}

pub fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}

/// Broker connection and topology names, shared by the queue commands.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// AMQP URL (default amqp://guest:guest@127.0.0.1:5672/%2f). Credentials are never logged.
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub amqp_url_flag: Option<String>,
    /// Prefix of the exchange and queue names (`{prefix}.jobs`, `{prefix}.jobs.dead`, ...).
    #[arg(long, env = "SDBATCH_QUEUE_PREFIX", hide_env_values = true)]
    pub queue_prefix: Option<String>,
    /// Deliveries before a failing batch is dead-lettered (x-delivery-limit; default 3). Must
    /// match the existing queue's.
    #[arg(long, env = "SDBATCH_DELIVERY_LIMIT", hide_env_values = true)]
    pub delivery_limit: Option<u32>,
    #[arg(skip = default_amqp_url())]
    pub amqp_url: String,
}

impl BrokerArgs {
    pub fn topology(&self) -> sdbatch::queue::Topology {
        let mut t = sdbatch::queue::Topology::with_prefix(
            self.queue_prefix.as_deref().unwrap_or("sdbatch"),
        );
        if let Some(limit) = self.delivery_limit {
            t.delivery_limit = limit;
        }
        t
    }

    /// Resolves the URL default (clap's `skip` default is only a placeholder).
    fn resolved(mut self) -> Self {
        self.amqp_url = self.amqp_url_flag.clone().unwrap_or_else(default_amqp_url);
        self
    }
}

/// Model, device and precision flags shared by the commands that load a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder in the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    /// or a single-file checkpoint (.safetensors, original CompVis/LDM layout, SD 1.x or 2.x).
    #[arg(long)]
    pub model: PathBuf,
    /// Single-file checkpoints: a diffusers model folder whose unet/, text_encoder/, vae/ configs,
    /// scheduler and tokenizer/ (if present) are used instead of the inferred and built-in ones.
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    /// Single-file checkpoints: a VAE replacing the checkpoint's (a diffusers VAE folder or a
    /// .safetensors file in diffusers or LDM names).
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// Single-file checkpoints: a tokenizer folder (vocab.json, merges.txt). Default: the
    /// --model-config folder's tokenizer/, else the built-in CLIP tokenizer (pads with
    /// <|endoftext|> for SD 1.x, "!" for SD 2.x, as their diffusers folders do).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Single-file checkpoints: epsilon or v_prediction (default: the <file>.yaml sidecar's
    /// parameterization, else epsilon for SD 1.x and v_prediction for SD 2.x).
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,
    /// auto (CUDA if available), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Weights variant to load, e.g. fp16 (*.fp16.safetensors); default: the one matching --dtype.
    #[arg(long)]
    pub variant: Option<String>,
    /// Attention slicing: run attention for N batch rows at a time (lower peak memory).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub attention_slicing: Option<i64>,
    /// Decode one image at a time through the VAE (lower peak memory).
    #[arg(long)]
    pub vae_slicing: bool,
    /// Folder of LoRA files (`NAME.safetensors`, kohya/A1111 or diffusers/PEFT layout) that
    /// --lora names.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Folder of textual-inversion embeddings (.safetensors, searched recursively): AUTOMATIC1111
    /// files are written in prompts by their file name (EasyNegative.safetensors: EasyNegative),
    /// diffusers files by the token they name. Any unusable file (pickle, wrong width) is an error.
    #[arg(long, value_name = "DIR")]
    pub embeddings_dir: Option<PathBuf>,
    /// Folder made by `sdbatch compile` for this model, dtype and device: the UNet and VAE
    /// decoder run compiled where it covers the shapes, eagerly elsewhere (logged).
    #[arg(long, value_name = "DIR")]
    pub compiled: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<StableDiffusion> {
        let device = sdbatch::device::parse_device(&self.device)?;
        let dtype = sdbatch::device::parse_dtype(&self.dtype, device)?;
        tracing::info!(
            device = %sdbatch::device::device_name(device),
            dtype = sdbatch::device::dtype_name(dtype),
            cuda_available = tch::Cuda::is_available(),
            cuda_devices = tch::Cuda::device_count(),
            "using device"
        );
        let options = LoadOptions {
            variant: self.variant.clone(),
            attention_slice: self.attention_slicing,
            vae_slicing: self.vae_slicing,
            ..LoadOptions::new(device, dtype)
        };
        let started = Instant::now();
        let single = single_file_options(
            self.model_config.clone(),
            self.vae.clone(),
            self.tokenizer.clone(),
            self.prediction_type.as_deref(),
        )?;
        let mut model = StableDiffusion::load_any(&self.model, options, single)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", self.model.display()))?;
        if let Some(dir) = &self.embeddings_dir {
            model
                .load_embeddings(dir)
                .map_err(|e| anyhow::anyhow!("loading embeddings from {}: {e}", dir.display()))?;
        }
        tracing::info!(model = %self.model.display(), seconds = started.elapsed().as_secs_f64(), "model loaded");
        if let Some(dir) = &self.compiled {
            let started = Instant::now();
            model
                .load_compiled(dir)
                .map_err(|e| anyhow::anyhow!("--compiled: {e}"))?;
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "compiled model loaded"
            );
        }
        if let Some(dir) = &self.lora_dir {
            model
                .set_lora_dir(dir, sdbatch::config::defaults::LORA_CACHE_MB << 20)
                .map_err(|e| anyhow::anyhow!("--lora-dir: {e}"))?;
        }
        Ok(model)
    }
}

/// The single-file loading flags, validated.
pub fn single_file_options(
    model_config: Option<PathBuf>,
    vae: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    prediction_type: Option<&str>,
) -> Result<SingleFileOptions> {
    Ok(SingleFileOptions {
        model_config,
        vae,
        tokenizer,
        prediction_type: prediction_type.map(str::parse).transpose()?,
    })
}

/// Where a model's optional extras (the safety checker) live: the model folder, or for a
/// single-file checkpoint the --model-config folder.
pub fn extras_dir(model: &std::path::Path, model_config: Option<&std::path::Path>) -> PathBuf {
    match model_config {
        Some(dir) if !model.is_dir() => dir.to_path_buf(),
        _ => model.to_path_buf(),
    }
}

/// Sampling flags shared by generate and bench.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Denoising steps.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub steps: u32,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// pndm (SD v1-4's default), ddim, euler, euler_karras, euler_ancestral, euler_ancestral_karras,
    /// heun, heun_karras, lms, lms_karras, dpmpp_2m, dpmpp_2m_karras, unipc, unipc_karras, lcm (or an
    /// alias such as "Euler a", "k_lms", "DPM++ 2M Karras", "UniPC", "LCM").
    #[arg(long, default_value = "pndm")]
    pub scheduler: SchedulerKind,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<i64>,
    /// Text-encoder layers to skip from the end, as AUTOMATIC1111 and ComfyUI number it: 1 = none,
    /// 2 = the penultimate layer (diffusers' clip_skip=1). Applies to the negative prompt too.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=12))]
    pub clip_skip: u32,
    /// Guidance rescale in 0..=1 (0 = off; 0.7 is the paper's value for zero-terminal-SNR models
    /// such as SD 2.x with v-prediction).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// How prompts are read: plain (as diffusers, at most 75 tokens) or a1111 (AUTOMATIC1111's
    /// `(word:1.3)` / `[word]` weights, BREAK, and long prompts in 75-token chunks).
    #[arg(long, default_value = "plain", value_parser = ["plain", "a1111"])]
    pub prompt_syntax: String,
    /// A LoRA from --lora-dir, NAME or NAME:WEIGHT (weight 1 by default); repeat for several.
    #[arg(long = "lora", value_name = "NAME[:WEIGHT]", value_parser = parse_lora)]
    pub loras: Vec<LoraWeight>,
}

fn parse_lora(text: &str) -> std::result::Result<LoraWeight, String> {
    sdbatch::pipeline::adapters::parse_flag(text)
}

impl SamplingArgs {
    pub fn params(&self, model: &StableDiffusion) -> Result<sdbatch::pipeline::GenerateParams> {
        let native = model.native_size();
        Ok(sdbatch::pipeline::GenerateParams {
            steps: self.steps as usize,
            guidance_scale: self.guidance,
            width: self.width.unwrap_or(native),
            height: self.height.unwrap_or(native),
            scheduler: self.scheduler,
            clip_skip: self.clip_skip as usize,
            guidance_rescale: self.guidance_rescale,
            prompt_syntax: self.prompt_syntax.parse()?,
            loras: sdbatch::pipeline::adapters::canonical(self.loras.clone())
                .map_err(|e| anyhow::anyhow!("--lora: {e}"))?,
        })
    }
}

/// Characters of a producer- or worker-supplied field (batch id, reason, header) printed at most.
pub const MAX_FIELD_CHARS: usize = 128;

/// `text` made safe to print on a terminal, cut to `max_chars` characters (then ending in `…`).
/// Dead letters and events carry text anyone with publish rights chose: raw, an escape sequence
/// (`\x1b[...`) could rewrite the terminal and a newline could forge output lines. Control
/// characters, bidirectional overrides and backslashes are written as Rust escapes (`\u{1b}`,
/// `\n`, `\\`), so the output stays one unambiguous line per field.
pub fn printable(text: &str, max_chars: usize) -> String {
    escaped(text, max_chars, true)
}

/// [`printable`] for text with escapes of its own (serde_json's output): backslashes stay as
/// they are; control characters serde_json leaves raw (DEL, C1) are still escaped.
pub fn printable_json(text: &str, max_chars: usize) -> String {
    escaped(text, max_chars, false)
}

fn escaped(text: &str, max_chars: usize, backslashes: bool) -> String {
    let mut out = String::new();
    let mut chars = 0;
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let piece: String = if c.is_control() || bidi || (backslashes && c == '\\') {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        let len = piece.chars().count();
        if chars + len > max_chars {
            out.push('…');
            break;
        }
        out.push_str(&piece);
        chars += len;
    }
    out
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log collectors (kubectl logs, files) get plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Worker(args) => runtime()?.block_on(worker::run(*args)),
        Command::Submit(mut args) => {
            args.broker = args.broker.resolved();
            runtime()?.block_on(submit::run(args))
        }
        Command::Dlq(mut args) => {
            args.broker = args.broker.resolved();
            runtime()?.block_on(dlq::run(args))
        }
        Command::Topology(mut args) => {
            args.broker = args.broker.resolved();
            runtime()?.block_on(topology::run(args))
        }
        Command::Status(mut args) => {
            args.broker = args.broker.resolved();
            runtime()?.block_on(status::run(args))
        }
        Command::Cancel(mut args) => {
            args.broker = args.broker.resolved();
            runtime()?.block_on(cancel::run(args))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn printable_escapes_control_characters_and_caps_the_length() {
        assert_eq!(printable("a cat", 128), "a cat");
        assert_eq!(printable("café 🎨", 128), "café 🎨");
        assert_eq!(
            printable("id\x1b[31mred\nforged line\r\t\\", 128),
            "id\\u{1b}[31mred\\nforged line\\r\\t\\\\"
        );
        assert_eq!(printable("\u{202e}txt", 128), "\\u{202e}txt");
        assert_eq!(printable("\u{9b}31m", 128), "\\u{9b}31m", "8-bit CSI");
        let long = "x".repeat(500);
        assert_eq!(printable(&long, 128), format!("{}…", "x".repeat(128)));
        // An escape is never cut in half.
        assert_eq!(printable("abc\x1b", 5), "abc…");
    }

    /// Every argument read from the environment hides its value in `--help` (an AMQP URL
    /// carries a password), including arguments added later.
    #[test]
    fn help_never_shows_environment_values() {
        fn check(cmd: &clap::Command, path: &str, shown: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_env().is_some() && !arg.is_hide_env_values_set() {
                    shown.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()), shown);
            }
        }
        let mut shown = Vec::new();
        check(&Cli::command(), "sdbatch", &mut shown);
        assert!(shown.is_empty(), "add hide_env_values = true to: {shown:?}");
    }
}
