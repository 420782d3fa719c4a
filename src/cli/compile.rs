//! `sdbatch compile`: the UNet and VAE decoder of a model folder compiled ahead of time
//! (AOTInductor) for this machine's device and torch, into a folder `--compiled` loads.
//!
//! The compilation itself is `scripts/compile_unet.py` (embedded in the binary, run with the
//! venv's Python: torch and diffusers are needed here, not where the packages are used). This
//! command picks the files the pipeline would load, hashes them, and tells the script the shapes
//! and what to record.
use anyhow::{Context, Result, bail};
use clap::Args;
use sdbatch::device::{dtype_name, parse_device, parse_dtype};
use sdbatch::pipeline::compiled::{CompiledMeta, Target, UNetEntry, VaeEntry, expand_gpu};
use sdbatch::pipeline::config::{UNetConfig, VaeConfig, read_json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SCRIPT: &str = include_str!("../../scripts/compile_unet.py");

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Model folder in the diffusers layout (single-file checkpoints: convert them first).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder: unet.pt2, vae_decoder.pt2, sdbatch-compiled.json. `{gpu}` in it stands for
    /// the GPU's model (`nvidia-h200`), as in the worker's --compiled. A folder already compiled
    /// for this model, device, dtype, torch and shapes is left as it is (an init container can
    /// run this on every start); --force compiles again.
    #[arg(long)]
    pub out: PathBuf,
    /// Compile even when --out already holds packages for this model and machine.
    #[arg(long)]
    pub force: bool,
    /// Batch sizes (images) to serve compiled: one dynamic batch dimension covers 1 up to the
    /// largest (twice that for the UNet, which sees both guidance halves).
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch_sizes: Vec<u32>,
    /// Image width in pixels (default: the model's native size). Other sizes run eagerly.
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<i64>,
    /// Text-encoder tokens per prompt (77; long a1111 prompts use multiples and run eagerly).
    #[arg(long, default_value_t = 77)]
    pub context_tokens: i64,
    /// auto, cpu, cuda, cuda:N: compile for this device (a package runs on its device kind and
    /// GPU model only).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16: the dtype the worker will run.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Weights variant to compile from, as for `generate`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Compile the UNet only (the VAE decoder then runs eagerly).
    #[arg(long)]
    pub no_vae: bool,
    /// Python with torch (the same version as sdbatch's libtorch) and diffusers. Default: the
    /// active venv's, else python3.
    #[arg(long, env = "SDBATCH_PYTHON", hide_env_values = true)]
    pub python: Option<PathBuf>,
}

/// Whether `meta` (an existing output) already is what this run would make: it fits `target`
/// and was compiled for the same shapes.
fn is_current(meta: &CompiledMeta, target: &Target, wanted: &CompiledMeta) -> bool {
    meta.mismatches(target).is_empty()
        && meta.latent_height == wanted.latent_height
        && meta.latent_width == wanted.latent_width
        && meta.unet.min_batch == wanted.unet.min_batch
        && meta.unet.max_batch == wanted.unet.max_batch
        && meta.unet.context_tokens == wanted.unet.context_tokens
        && meta.vae_decoder.as_ref().map(|v| v.max_batch)
            == wanted.vae_decoder.as_ref().map(|v| v.max_batch)
}

/// The batch ranges a package is compiled for: (UNet min, UNet max, VAE max).
pub fn batch_ranges(batch_sizes: &[u32]) -> Option<(i64, i64, i64)> {
    let max = i64::from(*batch_sizes.iter().max()?);
    Some((1, 2 * max, max))
}

fn default_python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|v| Path::new(&v).join("bin/python"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

pub fn run(args: CompileArgs) -> Result<()> {
    if !args.model.is_dir() {
        bail!(
            "--model {}: compiling needs a diffusers model folder",
            args.model.display()
        );
    }
    let (min_batch, max_batch, vae_max_batch) =
        batch_ranges(&args.batch_sizes).context("--batch-sizes is empty")?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, device)?;
    let unet: UNetConfig = read_json(&args.model.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&args.model.join("vae/config.json"))?;
    let scale = vae.scale_factor();
    let native = unet.sample_size.unwrap_or(64) * scale;
    let (width, height) = (args.width.unwrap_or(native), args.height.unwrap_or(native));
    if width % scale != 0 || height % scale != 0 || width <= 0 || height <= 0 {
        bail!("--width/--height must be positive multiples of {scale}");
    }
    let files = sdbatch::pipeline::compile_inputs(&args.model, dtype, args.variant.as_deref())?;
    let hash = sdbatch::pipeline::hash_files(&files)?;
    let target = Target::of(device, dtype, hash.clone());
    let out = expand_gpu(&args.out, target.gpu_name.as_deref());
    let (lh, lw) = (height / scale, width / scale);
    // The shapes this run compiles, in the metadata's terms (the rest is the target's).
    let wanted = CompiledMeta {
        format: sdbatch::pipeline::compiled::FORMAT,
        torch_version: target.torch_version.clone(),
        device: target.device.clone(),
        gpu_name: target.gpu_name.clone(),
        dtype: target.dtype.clone(),
        model_sha256: hash.clone(),
        latent_height: lh,
        latent_width: lw,
        unet: UNetEntry {
            file: String::new(),
            min_batch,
            max_batch,
            in_channels: 0,
            context_tokens: args.context_tokens,
            context_dim: 0,
        },
        vae_decoder: (!args.no_vae).then(|| VaeEntry {
            file: String::new(),
            min_batch: 1,
            max_batch: vae_max_batch,
            latent_channels: 0,
        }),
        compile_seconds: Default::default(),
    };
    if !args.force
        && let Ok(meta) = CompiledMeta::read(&out)
        && is_current(&meta, &target, &wanted)
    {
        println!("{} is up to date: nothing to compile", out.display());
        return Ok(());
    }
    // Compiled beside the output and renamed into place when complete: a failed run leaves no
    // half folder, and pods compiling at once on one volume each finish with a whole one.
    let partial = PathBuf::from(format!("{}.partial-{}", out.display(), std::process::id()));
    let device_arg = match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let python = args.python.clone().unwrap_or_else(default_python);
    let mut cmd = Command::new(&python);
    cmd.arg("-")
        .args(["--unet-config", &files[0].to_string_lossy()])
        .args(["--unet-weights", &files[1].to_string_lossy()])
        .args(["--vae-config", &files[2].to_string_lossy()])
        .args(["--vae-weights", &files[3].to_string_lossy()])
        .args(["--out", &partial.to_string_lossy()])
        .args(["--device", &device_arg])
        .args(["--dtype", dtype_name(dtype)])
        .args(["--latent-height", &lh.to_string()])
        .args(["--latent-width", &lw.to_string()])
        .args(["--context-tokens", &args.context_tokens.to_string()])
        .args(["--min-batch", &min_batch.to_string()])
        .args(["--max-batch", &max_batch.to_string()])
        .args(["--vae-max-batch", &vae_max_batch.to_string()])
        .args(["--model-sha256", &hash]);
    if args.no_vae {
        cmd.arg("--no-vae");
    }
    if let Some(name) = &target.gpu_name {
        cmd.args(["--gpu-name", name]);
    }
    tracing::info!(model = %args.model.display(), out = %out.display(), device = %device_arg,
        dtype = dtype_name(dtype), width, height, max_batch = vae_max_batch, "compiling (minutes)");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", python.display()))?;
    {
        use std::io::Write;
        let mut stdin = child
            .stdin
            .take()
            .context("no stdin for the compile script")?;
        stdin.write_all(SCRIPT.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        bail!("the compile script failed ({status})");
    }
    replace_dir(&partial, &out)?;
    println!(
        "compiled {} for {device_arg} {} {width}x{height}, batches 1..={vae_max_batch}, into {} in {:.1} s",
        args.model.display(),
        dtype_name(dtype),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Moves the finished `partial` folder to `out`, replacing what was there.
fn replace_dir(partial: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = PathBuf::from(format!("{}.old-{}", out.display(), std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(partial, out)
        .with_context(|| format!("moving {} to {}", partial.display(), out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unet_range_covers_both_guidance_halves() {
        assert_eq!(batch_ranges(&[1, 4, 8]), Some((1, 16, 8)));
        assert_eq!(batch_ranges(&[3]), Some((1, 6, 3)));
        assert_eq!(batch_ranges(&[]), None);
    }
}
