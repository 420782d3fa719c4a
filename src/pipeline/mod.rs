//! Stable Diffusion v1 text-to-image: tokenizer → CLIP text encoder → UNet denoising loop with
//! classifier-free guidance under a scheduler → VAE decoder → RGB8 pixels.
//!
//! Every image carries its own seed and draws its noise from its own generator (see [`noise`]), so
//! its pixels depend only on (prompt, negative prompt, seed, parameters), never on the batch.
pub mod adapters;
pub mod attention;
pub mod clip;
pub mod clip_score;
pub mod clip_vision;
pub mod compiled;
pub mod config;
pub mod embeddings;
pub mod hires;
pub mod inpaint;
pub mod lora;
pub mod mapped;
pub mod mask;
pub mod nn;
pub mod noise;
pub mod pil;
pub mod prompt_weights;
pub mod resnet;
pub mod safety;
pub mod schedulers;
pub mod single_file;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;

use crate::error::{Error, Result};
use config::{ClipTextConfig, UNetConfig, VaeConfig, read_json};
use schedulers::{SchedulerConfig, SchedulerKind};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use weights::Weights;

pub use inpaint::{GrayImage, Inpaint};

/// How to load a model folder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype: `Float` on the CPU; `Half` (default) or `BFloat16` on CUDA.
    pub dtype: Kind,
    /// Weights variant (`fp16` → `*.fp16.safetensors`). `None` picks the file matching `dtype` and
    /// falls back to the other one.
    pub variant: Option<String>,
    /// Attention slicing: attention for this many batch rows at a time (`None`: all at once).
    pub attention_slice: Option<i64>,
    /// Decode one image at a time through the VAE (lower peak memory on large batches).
    pub vae_slicing: bool,
}

impl LoadOptions {
    pub fn new(device: Device, dtype: Kind) -> Self {
        Self {
            device,
            dtype,
            variant: None,
            attention_slice: None,
            vae_slicing: false,
        }
    }
}

/// Pulls the guided prediction's per-image standard deviation towards the text branch's by
/// `phi`: `phi * guided * (std(text) / std(guided)) + (1 - phi) * guided`, standard deviations
/// over every dimension but the batch (unbiased, as torch's `std`).
fn rescale_guidance(guided: &Tensor, text: &Tensor, phi: f64) -> Result<Tensor> {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std = |t: &Tensor| t.f_std_dim(dims.as_slice(), true, true);
    let rescaled = guided.f_mul(&std(text)?.f_div(&std(guided)?)?)?;
    Ok(rescaled
        .f_mul_scalar(phi)?
        .f_add(&guided.f_mul_scalar(1.0 - phi)?)?)
}

/// img2img inputs for a batch: one init image per request, the output's size, and the strength.
#[derive(Debug, Clone, Copy)]
pub struct Img2Img<'a> {
    pub images: &'a [RgbImage],
    /// In (0, 1]: the fraction of the schedule that runs (1: the init image is fully noised,
    /// only its composition survives; small: a light touch-up).
    pub strength: f64,
}

/// diffusers' img2img `get_timesteps`: the step the schedule starts at for `strength`
/// (`steps − min(⌊steps · strength⌋, steps)`). A strength that runs no step is refused.
pub fn img2img_begin(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "strength must be in (0, 1], got {strength}"
        )));
    }
    // Python's int() of a float: truncation.
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(Error::InvalidArgument(format!(
            "strength {strength} with {steps} steps runs no step: raise the strength or the steps"
        )));
    }
    Ok(steps - run)
}

/// RGB8 images to `[n, 3, H, W]` float32 in [-1, 1], as diffusers' image processor normalises,
/// in its memory layout too: channels last (`numpy_to_pt` transposes an `[n, H, W, 3]` array).
/// libtorch's CPU convolutions and group norms take another code path for channels-last
/// tensors, whose float sums differ in the last bits; the VAE encoder must see the layout
/// diffusers gives it to encode the same latents.
fn images_to_tensor(images: &[RgbImage]) -> Result<Tensor> {
    let parts = images
        .iter()
        .map(|img| {
            Ok(Tensor::from_slice(&img.pixels)
                .f_view([1, i64::from(img.height), i64::from(img.width), 3])?
                .f_to_kind(Kind::Float)?
                .f_div_scalar(255.0)?
                .f_mul_scalar(2.0)?
                .f_sub_scalar(1.0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 0)?.f_permute([0, 3, 1, 2])?)
}

/// `[n, c, H, W]` in the channels-last layout (strides `[H·W·c, 1, W·c, c]`), which libtorch
/// recognises as such (a size-1 batch's stride included).
fn channels_last(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// One image to make.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// Parameters shared by every image of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: i64,
    pub height: i64,
    pub scheduler: SchedulerKind,
    /// Text-encoder layers skipped from the end, numbered as AUTOMATIC1111/ComfyUI do (1 = none,
    /// 2 = the penultimate layer); applied to the prompt and the negative prompt alike.
    pub clip_skip: usize,
    /// Guidance rescale φ in 0..=1 (Lin et al., "Common Diffusion Noise Schedules and Sample
    /// Steps are Flawed", §3.4): the guided prediction's standard deviation is pulled towards the
    /// text branch's, against over-exposure with zero-terminal-SNR models. 0 turns it off.
    pub guidance_rescale: f64,
    /// How prompts are read: plain (as diffusers) or AUTOMATIC1111's weights and long prompts.
    pub prompt_syntax: prompt_weights::PromptSyntax,
    /// LoRAs fused into the model for this batch, in canonical order ([`adapters::canonical`]).
    pub loras: Vec<adapters::LoraWeight>,
}

/// An RGB8 image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Wall-clock time of each phase of one batch.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Fusing the batch's LoRAs into the weights (0 when the set did not change).
    pub lora_ms: f64,
    pub text_encode_ms: f64,
    pub denoise_ms: f64,
    pub unet_steps: usize,
    pub vae_decode_ms: f64,
    pub total_ms: f64,
}

impl Timings {
    pub fn ms_per_step(&self) -> f64 {
        if self.unet_steps == 0 {
            0.0
        } else {
            self.denoise_ms / self.unet_steps as f64
        }
    }
}

pub struct BatchOutput {
    pub images: Vec<RgbImage>,
    /// The final latents instead of images, from [`StableDiffusion::generate_latents`] (a
    /// latent hires fix's first pass); empty otherwise.
    pub latents: Vec<hires::LatentImage>,
    pub timings: Timings,
}

/// Where a denoising loop starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// Pure noise (txt2img).
    Noise,
    /// Init images, encoded by the VAE and noised to their strength's level (img2img).
    Images(Img2Img<'a>),
    /// Latents already (`[n, c, h/8, w/8]`, scaled as the UNet sees them: a latent hires fix's
    /// upscaled first pass), noised to `strength`'s level, as diffusers' img2img pipeline does
    /// with a 4-channel `image`.
    Latents { latents: &'a Tensor, strength: f64 },
}

impl Start<'_> {
    /// The img2img strength, `None` for txt2img.
    fn strength(&self) -> Option<f64> {
        match self {
            Start::Noise => None,
            Start::Images(init) => Some(init.strength),
            Start::Latents { strength, .. } => Some(*strength),
        }
    }
}

/// The latents a denoising loop ended with, and what it took.
pub(crate) struct Denoised {
    pub latents: Tensor,
    pub lora: Duration,
    pub text_encode: Duration,
    pub denoise: Duration,
    pub unet_steps: usize,
}

impl Denoised {
    /// The batch's timings: these phases, then a VAE decode of `vae_decode`, all started at
    /// `started`.
    pub(crate) fn timings(&self, vae_decode: Duration, started: Instant) -> Timings {
        Timings {
            lora_ms: ms(self.lora),
            text_encode_ms: ms(self.text_encode),
            denoise_ms: ms(self.denoise),
            unet_steps: self.unet_steps,
            vae_decode_ms: ms(vae_decode),
            total_ms: ms(started.elapsed()),
        }
    }
}

/// Called after each denoising step with the step index, the number of steps and the latents
/// after the step. `Break` stops the loop there: the call returns [`Error::Stopped`].
pub type StepCallback<'a> = dyn FnMut(usize, usize, &Tensor) -> ControlFlow<()> + 'a;

/// A [`StepCallback`] that watches nothing and never stops.
pub fn ignore_steps(_step: usize, _steps: usize, _latents: &Tensor) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Runs `on_step` for step `i` of `steps`; its `Break` becomes [`Error::Stopped`].
pub(crate) fn after_step(
    on_step: &mut StepCallback<'_>,
    i: usize,
    steps: usize,
    latents: &Tensor,
) -> Result<()> {
    match on_step(i, steps, latents) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Stopped { step: i + 1, steps }),
    }
}

pub struct StableDiffusion {
    pub tokenizer: tokenizer::ClipTokenizer,
    pub text_encoder: clip::ClipTextModel,
    pub unet: unet::UNet2DConditionModel,
    pub vae: vae::VaeDecoder,
    /// The VAE's encoder (img2img), when the weights have one.
    pub vae_encoder: Option<vae::VaeEncoder>,
    pub scheduler_config: SchedulerConfig,
    vae_scaling_factor: f64,
    vae_scale_factor: i64,
    native_size: i64,
    options: LoadOptions,
    /// The LoRA set fused into the UNet and text encoder weights now ([`adapters`]). A `RefCell`
    /// because generation takes `&self`; the model lives on one thread.
    adapters: std::cell::RefCell<adapters::Adapters>,
    model_dir: PathBuf,
    /// Every file the load read (weights, configs, tokenizer, embeddings), for
    /// [`Self::content_sha256`].
    source_files: Vec<PathBuf>,
    /// The UNet's and VAE's config and weight files: what a compiled package is built from
    /// ([`Self::compiled_model_sha256`]).
    compile_inputs: Vec<PathBuf>,
    /// The AOTInductor-compiled UNet and VAE decoder (`--compiled`), used while `use_compiled`.
    compiled: Option<compiled::CompiledModels>,
    use_compiled: std::cell::Cell<bool>,
}

/// The files a compiled package of the model folder `dir` is built from, in the order
/// [`StableDiffusion::compiled_model_sha256`] hashes them: UNet config and weights, VAE config and
/// weights (the weight files picked as [`StableDiffusion::load`] picks them for `dtype`).
pub fn compile_inputs(dir: &Path, dtype: Kind, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let base = "diffusion_pytorch_model";
    Ok(vec![
        dir.join("unet/config.json"),
        weights_file(&dir.join("unet"), base, dtype, variant)?,
        dir.join("vae/config.json"),
        weights_file(&dir.join("vae"), base, dtype, variant)?,
    ])
}

/// SHA-256 over `paths`: each file's name and content hash, in order.
pub fn hash_files(paths: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut all = Sha256::new();
    hash_files_into(&mut all, paths)?;
    Ok(hex::encode(all.finalize()))
}

fn hash_files_into(all: &mut sha2::Sha256, paths: &[PathBuf]) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut one = Sha256::new();
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            one.update(&buf[..n]);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        all.update(name.as_bytes());
        all.update(b"\0");
        all.update(one.finalize());
    }
    Ok(())
}

/// Picks `dir/{base}.{variant}.safetensors` or `dir/{base}.safetensors`.
fn weights_file(dir: &Path, base: &str, dtype: Kind, variant: Option<&str>) -> Result<PathBuf> {
    let plain = dir.join(format!("{base}.safetensors"));
    if let Some(v) = variant {
        let file = dir.join(format!("{base}.{v}.safetensors"));
        return if file.is_file() {
            Ok(file)
        } else {
            Err(Error::MissingFile { path: file })
        };
    }
    let fp16 = dir.join(format!("{base}.fp16.safetensors"));
    let order = if dtype == Kind::Half {
        [&fp16, &plain]
    } else {
        [&plain, &fp16]
    };
    match order.into_iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(Error::MissingFile {
            path: plain.clone(),
        }),
    }
}

fn load_weights(dir: &Path, base: &str, opts: &LoadOptions) -> Result<Weights> {
    let path = weights_file(dir, base, opts.dtype, opts.variant.as_deref())?;
    tracing::debug!(file = %path.display(), "loading weights");
    Weights::load(&path, opts.dtype, opts.device)
}

/// Parses a config value; `path` (where it came from) names it in errors.
fn parse_config<T: serde::de::DeserializeOwned>(
    (value, path): (serde_json::Value, PathBuf),
) -> Result<(T, PathBuf)> {
    let parsed = serde_json::from_value(value).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    Ok((parsed, path))
}

/// A model's configs, weights and tokenizer, however they were found.
struct Parts {
    text_encoder: (ClipTextConfig, PathBuf, Weights),
    unet: (UNetConfig, PathBuf, Weights),
    vae: (VaeConfig, PathBuf, Weights),
    tokenizer: TokenizerSource,
    scheduler_config: SchedulerConfig,
}

/// Where the tokenizer comes from.
enum TokenizerSource {
    /// A folder with `vocab.json` and `merges.txt`.
    Folder(PathBuf),
    /// CLIP's vocabulary embedded in the binary (single-file checkpoints without a folder).
    Builtin(tokenizer::BuiltinPad),
}

type VaeSource = (
    std::collections::HashMap<String, Tensor>,
    PathBuf,
    Option<PathBuf>,
);

/// `--vae`: a diffusers VAE folder (its config.json is used), or one `.safetensors` file in
/// diffusers names (`decoder.up_blocks.*`) or LDM names (`decoder.up.*`, with or without
/// `first_stage_model.`), whose config is inferred from its shapes.
fn load_vae_override(path: &Path) -> Result<VaeSource> {
    let (file, config_dir) = if path.is_dir() {
        (
            weights_file(path, "diffusion_pytorch_model", Kind::Float, None)?,
            Some(path.to_path_buf()),
        )
    } else {
        (path.to_path_buf(), None)
    };
    single_file::ensure_safetensors(&file)?;
    let tensors = Tensor::read_safetensors(&file).map_err(|e| Error::Config {
        path: file.clone(),
        message: format!("not a readable safetensors file: {e}"),
    })?;
    let tensors: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| match k.strip_prefix(single_file::VAE_PREFIX) {
            Some(rest) => (rest.to_string(), v),
            None => (k, v),
        })
        .collect();
    let tensors = if tensors.keys().any(|k| k.starts_with("decoder.up_blocks.")) {
        tensors
    } else if tensors.keys().any(|k| k.starts_with("decoder.up.")) {
        single_file::rename_ldm_vae(&file, tensors)?
    } else {
        return Err(Error::Checkpoint {
            path: file,
            message: "not a VAE: no `decoder.up_blocks.*` (diffusers) or `decoder.up.*` (LDM) keys"
                .into(),
        });
    };
    Ok((tensors, file, config_dir))
}

impl StableDiffusion {
    /// Loads a model folder in the diffusers layout (`model_index.json`, `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/`, `scheduler/`).
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let index: serde_json::Value = read_json(&dir.join("model_index.json"))?;
        if let Some(class) = index.get("_class_name").and_then(|c| c.as_str())
            && !class.starts_with("StableDiffusion")
        {
            tracing::warn!(
                class,
                "model_index.json names a pipeline other than StableDiffusion*"
            );
        }

        let te_cfg_path = dir.join("text_encoder/config.json");
        let te_cfg: ClipTextConfig = read_json(&te_cfg_path)?;
        let te_weights = load_weights(&dir.join("text_encoder"), "model", &options)?;
        let unet_cfg_path = dir.join("unet/config.json");
        let unet_cfg: UNetConfig = read_json(&unet_cfg_path)?;
        let unet_weights = load_weights(&dir.join("unet"), "diffusion_pytorch_model", &options)?;
        let vae_cfg_path = dir.join("vae/config.json");
        let vae_cfg: VaeConfig = read_json(&vae_cfg_path)?;
        let vae_weights = load_weights(&dir.join("vae"), "diffusion_pytorch_model", &options)?;
        let scheduler_config =
            SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?;
        Self::assemble(
            Parts {
                text_encoder: (te_cfg, te_cfg_path, te_weights),
                unet: (unet_cfg, unet_cfg_path, unet_weights),
                vae: (vae_cfg, vae_cfg_path, vae_weights),
                tokenizer: TokenizerSource::Folder(dir.join("tokenizer")),
                scheduler_config,
            },
            options,
            dir,
        )
    }

    /// Loads `path`: a diffusers model folder ([`load`](Self::load)) or a single-file
    /// checkpoint ([`load_single_file`](Self::load_single_file)).
    pub fn load_any(
        path: &Path,
        options: LoadOptions,
        single: single_file::SingleFileOptions,
    ) -> Result<Self> {
        if path.is_dir() {
            Self::load(path, options)
        } else {
            Self::load_single_file(path, options, single)
        }
    }

    /// Loads a single-file checkpoint in the original CompVis/LDM layout (SD 1.x or 2.x, see
    /// [`single_file`]). Configs come from `single.model_config` when given, else are inferred
    /// from the tensors' shapes.
    pub fn load_single_file(
        file: &Path,
        options: LoadOptions,
        single: single_file::SingleFileOptions,
    ) -> Result<Self> {
        use single_file::{PredictionType, TextEncoderKind};
        let _no_grad = tch::no_grad_guard();
        single_file::ensure_safetensors(file)?;
        // A mistyped --tokenizer fails before the (large) checkpoint is read.
        if let Some(dir) = &single.tokenizer {
            for name in ["vocab.json", "merges.txt"] {
                if !dir.join(name).is_file() {
                    return Err(Error::MissingFile {
                        path: dir.join(name),
                    });
                }
            }
        }
        // Mapped, as model folders are: each tensor the model uses is made once, straight in the
        // model's dtype on its device, and the entries it does not use (EMA weights, schedules:
        // half of many checkpoints) are never read.
        let mapped = mapped::MappedSafetensors::open(file)?;
        let mut tensors = std::collections::HashMap::new();
        for name in mapped.names().filter(|n| single_file::is_model_key(n)) {
            if let Some(t) = mapped.tensor(name, options.dtype, options.device)? {
                tensors.insert(name.clone(), t);
            }
        }
        drop(mapped);
        let parts = single_file::split_checkpoint(file, tensors)?;
        let sd2 = parts.text_kind == TextEncoderKind::OpenClip;

        // The checkpoint has no tokenizer: --tokenizer, else --model-config's tokenizer/ when it
        // has one, else CLIP's built-in vocabulary (the same for every SD 1.x/2.x model) with the
        // pad token of the family's diffusers folders.
        let config_tokenizer = single
            .model_config
            .as_ref()
            .map(|dir| dir.join("tokenizer"))
            .filter(|dir| dir.is_dir());
        let tokenizer = match single.tokenizer.clone().or(config_tokenizer) {
            Some(dir) => {
                tracing::info!(tokenizer = %dir.display(), "tokenizer from folder");
                TokenizerSource::Folder(dir)
            }
            None => {
                let pad = if sd2 {
                    tokenizer::BuiltinPad::Bang
                } else {
                    tokenizer::BuiltinPad::Eos
                };
                tracing::info!(
                    pad = pad.token(),
                    "built-in CLIP tokenizer (no --tokenizer or --model-config tokenizer/)"
                );
                TokenizerSource::Builtin(pad)
            }
        };

        // The prediction type: the flag, else the LDM .yaml sidecar, else the architecture's
        // default — epsilon for SD 1.x; for SD 2.x v-prediction (SD 2.0/2.1 at 768 px, the
        // checkpoints people use; diffusers' from_single_file makes the same guess). SD 2.x
        // *base* (512 px, epsilon) needs --prediction-type epsilon or its .yaml. The one SD 2.x
        // inpainting model (stabilityai/stable-diffusion-2-inpainting, 512 px) is epsilon, and
        // diffusers takes a 9-channel OpenCLIP checkpoint for it.
        let from_yaml = match single_file::sidecar_yaml(file) {
            Some(yaml) => {
                let text = std::fs::read_to_string(&yaml).map_err(|source| Error::Io {
                    path: yaml.clone(),
                    source,
                })?;
                single_file::yaml_prediction_type(&text).or(Some(PredictionType::Epsilon))
            }
            None => None,
        };
        let explicit = single.prediction_type.or(from_yaml);
        let prediction =
            explicit.unwrap_or(if sd2 && !single_file::is_inpainting_unet(&parts.unet) {
                PredictionType::VPrediction
            } else {
                PredictionType::Epsilon
            });

        let wrap = |tensors| Weights::from_tensors(file, tensors, options.dtype, options.device);
        let config =
            |name: &str, inferred: serde_json::Value| -> Result<(serde_json::Value, PathBuf)> {
                match &single.model_config {
                    Some(dir) => {
                        let path = dir.join(name).join("config.json");
                        Ok((read_json(&path)?, path))
                    }
                    None => Ok((inferred, file.to_path_buf())),
                }
            };
        let text_inferred = if single.model_config.is_none() {
            single_file::infer_text_config(file, &parts.text_encoder, parts.text_kind)?
        } else {
            serde_json::Value::Null
        };
        let (te_cfg, te_cfg_path) = parse_config(config("text_encoder", text_inferred)?)?;
        let unet_inferred = if single.model_config.is_none() {
            single_file::infer_unet_config(file, &parts.unet, sd2, prediction)?
        } else {
            serde_json::Value::Null
        };
        let (unet_cfg, unet_cfg_path) = parse_config(config("unet", unet_inferred)?)?;

        // The VAE: --vae (a folder or a file), else the checkpoint's.
        let (vae_tensors, vae_file, vae_config_dir) = match &single.vae {
            Some(vae) => {
                let (tensors, file, dir) = load_vae_override(vae)?;
                drop(parts.vae);
                (tensors, file, dir)
            }
            None if parts.vae.is_empty() => {
                return Err(Error::Checkpoint {
                    path: file.to_path_buf(),
                    message: format!(
                        "no VAE in the checkpoint (no `{}*` keys): pass --vae with a VAE folder \
                         or .safetensors file",
                        single_file::VAE_PREFIX
                    ),
                });
            }
            None => (parts.vae, file.to_path_buf(), None),
        };
        let (vae_cfg, vae_cfg_path) = match (vae_config_dir, &single.model_config) {
            (Some(dir), _) => parse_config((
                read_json(&dir.join("config.json"))?,
                dir.join("config.json"),
            ))?,
            (None, Some(dir)) => parse_config((
                read_json(&dir.join("vae/config.json"))?,
                dir.join("vae/config.json"),
            ))?,
            (None, None) => parse_config((
                single_file::infer_vae_config(&vae_file, &vae_tensors)?,
                vae_file.clone(),
            ))?,
        };

        let mut scheduler_config = match &single.model_config {
            Some(dir) => SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?,
            // SD 1.x: SD v1-4's config, which is SchedulerConfig's default.
            None if sd2 => SchedulerConfig::from_json(single_file::SD2_SCHEDULER_CONFIG, file)?,
            None => SchedulerConfig::default(),
        };
        // A model folder's scheduler already says what its model predicts; only an explicit
        // choice (flag or .yaml) replaces it.
        if single.model_config.is_none() || explicit.is_some() {
            scheduler_config.prediction_type = Some(prediction.as_str().to_string());
        }

        let vae_weights =
            Weights::from_tensors(&vae_file, vae_tensors, options.dtype, options.device);
        Self::assemble(
            Parts {
                text_encoder: (te_cfg, te_cfg_path, wrap(parts.text_encoder)),
                unet: (unet_cfg, unet_cfg_path, wrap(parts.unet)),
                vae: (vae_cfg, vae_cfg_path, vae_weights),
                tokenizer,
                scheduler_config,
            },
            options,
            file,
        )
    }

    /// Builds the pipeline from configs and weights, checking that the parts fit together.
    fn assemble(parts: Parts, options: LoadOptions, source: &Path) -> Result<Self> {
        let compile_inputs = vec![
            parts.unet.1.clone(),
            parts.unet.2.path().to_path_buf(),
            parts.vae.1.clone(),
            parts.vae.2.path().to_path_buf(),
        ];
        let mut source_files = vec![
            parts.text_encoder.1.clone(),
            parts.text_encoder.2.path().to_path_buf(),
            parts.unet.1.clone(),
            parts.unet.2.path().to_path_buf(),
            parts.vae.1.clone(),
            parts.vae.2.path().to_path_buf(),
        ];
        // The built-in tokenizer has no files: its label goes into the hash instead.
        if let TokenizerSource::Folder(dir) = &parts.tokenizer {
            source_files.extend(
                tokenizer::ClipTokenizer::FILES
                    .iter()
                    .map(|f| dir.join(f))
                    .filter(|p| p.is_file()),
            );
        }
        // Configs inferred from a single file have no file of their own: the checkpoint is there.
        source_files.retain(|p| p.is_file());
        source_files.sort();
        source_files.dedup();
        let (te_cfg, te_cfg_path, te_weights) = parts.text_encoder;
        let text_encoder = clip::ClipTextModel::load(&te_cfg, &te_cfg_path, &te_weights.root())?;
        let te_layers = te_weights.finish();
        let max_len = te_cfg.max_position_embeddings as usize;
        let tokenizer = match &parts.tokenizer {
            TokenizerSource::Folder(dir) => tokenizer::ClipTokenizer::load(dir, max_len)?,
            TokenizerSource::Builtin(pad) => tokenizer::ClipTokenizer::builtin(max_len, *pad)?,
        };

        let (unet_cfg, unet_cfg_path, unet_weights) = parts.unet;
        let unet = unet::UNet2DConditionModel::load(
            &unet_cfg,
            &unet_cfg_path,
            &unet_weights.root(),
            options.attention_slice,
        )?;
        let unet_layers = unet_weights.finish();
        if unet.cross_attention_dim() != text_encoder.hidden_size() {
            return Err(Error::Config {
                path: unet_cfg_path,
                message: format!(
                    "cross_attention_dim {} does not match the text encoder's hidden_size {}",
                    unet.cross_attention_dim(),
                    text_encoder.hidden_size()
                ),
            });
        }

        let (vae_cfg, vae_cfg_path, vae_weights) = parts.vae;
        let vae = vae::VaeDecoder::load(&vae_cfg, &vae_cfg_path, &vae_weights.root())?;
        let vae_encoder = vae::VaeEncoder::load(&vae_cfg, &vae_cfg_path, &vae_weights.root())?;
        drop(vae_weights);
        // An inpainting UNet (stable-diffusion-inpainting) also takes the mask (1 channel) and
        // the masked image's latents: latents + 1 + latents input channels.
        let inpainting_unet = unet.in_channels() == 2 * vae.latent_channels() + 1;
        if vae.latent_channels() != unet.in_channels() && !inpainting_unet {
            return Err(Error::Config {
                path: vae_cfg_path,
                message: format!(
                    "latent_channels {} does not match the UNet's in_channels {} (nor its \
                     inpainting layout, latents + mask + masked-image latents)",
                    vae.latent_channels(),
                    unet.in_channels()
                ),
            });
        }

        let scheduler_config = parts.scheduler_config;
        // The noise schedule itself is shared by every scheduler: a bad one fails the load.
        scheduler_config.alphas_cumprod()?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_encoder,
            scheduler_config,
            vae_scaling_factor: vae_cfg.scaling_factor,
            vae_scale_factor: vae_cfg.scale_factor(),
            // SD v1 UNets say 64 (latent cells): 512 px. Models without the key get the same.
            native_size: unet_cfg.sample_size.unwrap_or(64) * vae_cfg.scale_factor(),
            options,
            adapters: std::cell::RefCell::new(adapters::Adapters::new(unet_layers, te_layers)),
            model_dir: source.to_path_buf(),
            source_files,
            compile_inputs,
            compiled: None,
            use_compiled: std::cell::Cell::new(false),
        })
    }

    /// SHA-256 (hex) naming the model as served: each file the load read, textual-inversion
    /// embeddings included (name and content hash, in path order; an A1111 file's name is its
    /// trigger), the built-in tokenizer's label (data hash and pad token) when it was used,
    /// and the scheduler configuration as resolved (it can come from flags or a
    /// sidecar rather than a file). Reads every weight file once (a few seconds for SD 1.x).
    pub fn content_sha256(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut all = Sha256::new();
        hash_files_into(&mut all, &self.source_files)?;
        if let Some(label) = self.tokenizer.builtin_label() {
            all.update(label.as_bytes());
        }
        all.update(format!("{:?}", self.scheduler_config).as_bytes());
        Ok(hex::encode(all.finalize()))
    }

    /// [`hash_files`] of the UNet's and VAE's config and weight files: what a compiled package
    /// records and must match.
    pub fn compiled_model_sha256(&self) -> Result<String> {
        hash_files(&self.compile_inputs)
    }

    /// Loads the compiled UNet (and VAE decoder) of `dir` and uses it from now on. Refused with
    /// every difference named when it was compiled for another model, dtype, device, GPU or torch.
    /// `{gpu}` in `dir` stands for this GPU's model ([`compiled::expand_gpu`]).
    pub fn load_compiled(&mut self, dir: &Path) -> Result<()> {
        let device = self.options.device;
        let target =
            compiled::Target::of(device, self.options.dtype, self.compiled_model_sha256()?);
        let dir = &compiled::expand_gpu(dir, target.gpu_name.as_deref());
        let models = compiled::CompiledModels::load(dir, &target, device)?;
        tracing::info!(dir = %dir.display(), unet_batch = ?(models.meta().unet.min_batch, models.meta().unet.max_batch), vae = models.meta().vae_decoder.is_some(), "compiled model loaded");
        self.compiled = Some(models);
        self.use_compiled.set(true);
        Ok(())
    }

    /// The compiled folder's metadata, when one is loaded.
    pub fn compiled(&self) -> Option<&compiled::CompiledMeta> {
        self.compiled.as_ref().map(|c| c.meta())
    }

    /// Uses the compiled models (when loaded) or the eager ones: `bench` compares the two.
    pub fn set_compiled_enabled(&self, on: bool) {
        self.use_compiled.set(on && self.compiled.is_some());
    }

    /// The compiled models to use now: loaded, enabled, and holding the weights the eager model
    /// holds (a fused LoRA changes the eager weights only, so it runs eagerly).
    fn compiled_now(&self) -> Option<&compiled::CompiledModels> {
        let c = self.compiled.as_ref().filter(|_| self.use_compiled.get())?;
        let loras = self.active_loras();
        if loras.is_empty() {
            Some(c)
        } else {
            c.report_eager(
                format!("LoRA set {loras:?}"),
                "LoRA weights are fused into the eager model only",
            );
            None
        }
    }

    /// Serves LoRAs by name from `dir` (`--lora-dir`), keeping up to `cache_bytes` of files read.
    pub fn set_lora_dir(&self, dir: &Path, cache_bytes: u64) -> Result<()> {
        let library = adapters::LoraLibrary::new(dir, cache_bytes)?;
        self.adapters.borrow_mut().set_library(library);
        Ok(())
    }

    /// The LoRA set fused into the weights now.
    pub fn active_loras(&self) -> Vec<adapters::LoraWeight> {
        self.adapters.borrow().active().to_vec()
    }

    /// Fuses `loras` (canonical order) into the weights, or restores the originals for an empty
    /// set; nothing happens when that set is already fused. Returns whether anything changed.
    pub fn apply_loras(&self, loras: &[adapters::LoraWeight]) -> Result<bool> {
        let _no_grad = tch::no_grad_guard();
        self.adapters.borrow_mut().activate(loras)
    }

    /// Adds every textual-inversion embedding of `dir` ([`embeddings`]) to the text encoder and
    /// its trigger word to the tokenizer, and the files to [`Self::content_sha256`]. Everything is
    /// checked before anything changes, so on an error (a file that cannot be used, a width that is
    /// not the text encoder's, a trigger used twice) the model is as it was. Returns what was
    /// added, in path order.
    pub fn load_embeddings(&mut self, dir: &Path) -> Result<Vec<embeddings::Embedding>> {
        let found = embeddings::read_dir(dir)?;
        let hidden = self.text_encoder.hidden_size();
        // One chunk of an A1111 prompt, and a whole plain prompt, hold this many tokens.
        let room = self.tokenizer.max_len() as i64 - 2;
        let mut seen: std::collections::HashMap<String, &Path> = Default::default();
        for e in &found {
            let bad = |message: String| Error::Embedding {
                path: e.path.clone(),
                message,
            };
            if e.dim() != hidden {
                return Err(bad(format!(
                    "vectors of width {} (trained for {}), but this model's text encoder is {hidden} wide",
                    e.dim(),
                    match e.dim() {
                        768 => "SD 1.x".to_string(),
                        1024 => "SD 2.x".to_string(),
                        d => format!("a {d}-wide text encoder"),
                    }
                )));
            }
            if e.n_vectors() > room {
                return Err(bad(format!(
                    "{} vectors: a prompt holds {room} tokens at most",
                    e.n_vectors()
                )));
            }
            let key = self.tokenizer.normalize(&e.trigger)?;
            if let Some(other) = seen.insert(key, &e.path) {
                return Err(bad(format!(
                    "trigger `{}` is also the trigger of {} (triggers ignore case)",
                    e.trigger,
                    other.display()
                )));
            }
            if self.tokenizer.has_trigger(&e.trigger)? {
                return Err(bad(format!("trigger `{}` is already loaded", e.trigger)));
            }
        }
        if found.is_empty() {
            tracing::warn!(dir = %dir.display(), "no .safetensors embeddings in the folder");
            return Ok(found);
        }
        // One new table for all of them (it is copied on each addition).
        let all: Vec<&Tensor> = found.iter().map(|e| &e.vectors).collect();
        let mut next = self
            .text_encoder
            .add_token_embeddings(&Tensor::f_cat(&all, 0)?)?;
        for e in &found {
            let ids: Vec<i64> = (next..next + e.n_vectors()).collect();
            next += e.n_vectors();
            self.tokenizer.add_trigger(&e.trigger, ids)?;
            self.source_files.push(e.path.clone());
            tracing::info!(
                trigger = %e.trigger,
                vectors = e.n_vectors(),
                layout = ?e.layout,
                file = %e.path.display(),
                "textual-inversion embedding loaded"
            );
        }
        self.source_files.sort();
        self.source_files.dedup();
        Ok(found)
    }

    /// The files [`Self::content_sha256`] covers.
    pub fn source_files(&self) -> &[PathBuf] {
        &self.source_files
    }

    pub fn device(&self) -> Device {
        self.options.device
    }

    pub fn dtype(&self) -> Kind {
        self.options.dtype
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The image size the model was trained at (512 for SD v1), the default width and height.
    pub fn native_size(&self) -> i64 {
        self.native_size
    }

    /// Image sizes must be multiples of this (8 for SD).
    pub fn size_multiple(&self) -> i64 {
        self.vae_scale_factor
    }

    /// Tokenizes prompts to a `[n, 77]` id tensor on the model's device.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_len());
        for prompt in prompts {
            let tokens = self.tokenizer.encode(prompt)?;
            if tokens.truncated > 0 {
                tracing::warn!(
                    dropped_tokens = tokens.truncated,
                    max_tokens = self.tokenizer.max_len(),
                    "prompt truncated: CLIP can only handle {} tokens",
                    self.tokenizer.max_len()
                );
            }
            ids.extend(tokens.ids);
        }
        Ok(Tensor::from_slice(&ids)
            .f_view([prompts.len() as i64, self.tokenizer.max_len() as i64])?
            .f_to_device(self.options.device)?)
    }

    /// Text embeddings (`[n, 77, hidden]`) of `prompts`, in one text-encoder call.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        self.encode_prompts_skipping(prompts, 1)
    }

    /// [`encode_prompts`](Self::encode_prompts) with a clip skip (see [`GenerateParams`]).
    pub fn encode_prompts_skipping(&self, prompts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        self.text_encoder
            .forward_skipping(&self.tokenize(prompts)?, clip_skip)
    }

    /// Text embeddings of prompts in AUTOMATIC1111's syntax ([`prompt_weights`]): each prompt is
    /// split into chunks of `max_len - 2` tokens, each chunk is encoded alone as BOS + tokens + EOS +
    /// padding, every token's embedding is scaled by its weight and the chunk's mean restored
    /// (A1111's "Original" emphasis), and the chunks are concatenated along the token axis:
    /// `[n, 77·k, hidden]`, k the most chunks of any prompt (shorter ones get empty chunks, as
    /// A1111 pads a batch). All chunks of all prompts go through one text-encoder call.
    ///
    /// Unlike A1111, whose mean spans the whole batch tensor, the mean is taken per prompt and
    /// chunk, so an image does not depend on what it was batched with.
    pub fn encode_prompts_a1111(&self, prompts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let max_len = self.tokenizer.max_len();
        let (bos, eos, pad) = self.tokenizer.special_ids();
        let comma = self.tokenizer.comma_id();
        let per_prompt: Vec<Vec<prompt_weights::Chunk>> = prompts
            .iter()
            .map(|p| {
                let fragments = prompt_weights::parse(p)?;
                prompt_weights::chunks(&fragments, max_len - 2, comma, |t| {
                    self.tokenizer.encode_units(t)
                })
            })
            .collect::<Result<_>>()?;
        let k = per_prompt.iter().map(Vec::len).max().unwrap_or(1);
        let rows = prompts.len() * k;
        let mut ids: Vec<i64> = Vec::with_capacity(rows * max_len);
        let mut weights: Vec<f32> = Vec::with_capacity(rows * max_len);
        let empty = prompt_weights::Chunk::default();
        for chunks in &per_prompt {
            for i in 0..k {
                let chunk = chunks.get(i).unwrap_or(&empty);
                ids.push(bos);
                ids.extend(&chunk.ids);
                ids.push(eos);
                ids.resize(ids.len() + max_len - 2 - chunk.ids.len(), pad);
                // BOS, EOS and padding keep weight 1, as in A1111.
                weights.push(1.0);
                weights.extend(chunk.weights.iter().map(|&w| w as f32));
                weights.resize(weights.len() + max_len - 1 - chunk.weights.len(), 1.0);
            }
        }
        let (n, rows, len) = (prompts.len() as i64, rows as i64, max_len as i64);
        let device = self.options.device;
        let ids = Tensor::from_slice(&ids)
            .f_view([rows, len])?
            .f_to_device(device)?;
        let z = self.text_encoder.forward_skipping(&ids, clip_skip)?;
        let hidden = z.size()[2];
        // The weighting in f32 whatever the model's dtype, then back.
        let z = z.f_to_kind(Kind::Float)?;
        let w = Tensor::from_slice(&weights)
            .f_view([rows, len, 1])?
            .f_to_device(device)?;
        let mean = |t: &Tensor| t.f_mean_dim(&[1i64, 2][..], true, Kind::Float);
        let original = mean(&z)?;
        let weighted = z.f_mul(&w)?;
        let restored = weighted.f_mul(&original.f_div(&mean(&weighted)?)?)?;
        Ok(restored
            .f_view([n, k as i64 * len, hidden])?
            .f_to_kind(self.options.dtype)?)
    }

    /// Checks img2img inputs: one image per request, each of the output's size, a strength that
    /// runs at least one step, a scheduler that supports starting mid-schedule.
    fn validate_img2img(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        init: &Img2Img<'_>,
    ) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if init.images.len() != requests.len() {
            return bad(format!(
                "{} init images for {} requests",
                init.images.len(),
                requests.len()
            ));
        }
        for (i, img) in init.images.iter().enumerate() {
            if (i64::from(img.width), i64::from(img.height)) != (p.width, p.height)
                || img.pixels.len() != img.width as usize * img.height as usize * 3
            {
                return bad(format!(
                    "init image {i} is {}x{}, the output {}x{}: resize it first",
                    img.width, img.height, p.width, p.height
                ));
            }
        }
        if self.vae_encoder.is_none() {
            return bad("img2img needs the VAE's encoder, which this model's weights lack".into());
        }
        let mut probe = p.scheduler.build(&self.scheduler_config, p.steps)?;
        probe.start_at(img2img_begin(p.steps, init.strength)?)?;
        Ok(())
    }

    /// Checks parameters before any work is done.
    pub fn validate(&self, requests: &[ImageRequest], p: &GenerateParams) -> Result<()> {
        let m = self.vae_scale_factor;
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if requests.is_empty() {
            return bad("no images requested".into());
        }
        if p.width <= 0 || p.height <= 0 || p.width % m != 0 || p.height % m != 0 {
            return bad(format!(
                "width and height must be positive multiples of {m}, got {}x{}",
                p.width, p.height
            ));
        }
        if p.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if !p.guidance_scale.is_finite() || p.guidance_scale < 0.0 {
            return bad(format!(
                "guidance scale must be a finite number >= 0, got {}",
                p.guidance_scale
            ));
        }
        let layers = self.text_encoder.num_layers();
        if p.clip_skip == 0 || p.clip_skip > layers {
            return bad(format!(
                "clip skip must be in 1..={layers} for this model's text encoder, got {}",
                p.clip_skip
            ));
        }
        if !(0.0..=1.0).contains(&p.guidance_rescale) {
            return bad(format!(
                "guidance rescale must be in 0..=1, got {}",
                p.guidance_rescale
            ));
        }
        // Scheduler options this config cannot drive (e.g. an unsupported prediction type).
        p.scheduler.build(&self.scheduler_config, p.steps)?;
        match adapters::canonical(p.loras.clone()) {
            Ok(canonical) if canonical == p.loras => {}
            Ok(_) => return bad("LoRAs must be given in canonical order (by name)".into()),
            Err(e) => return bad(e),
        }
        self.adapters.borrow().check_names(&p.loras)?;
        Ok(())
    }

    /// Generates one image per request, all in one batch.
    pub fn generate(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        self.generate_with(requests, p, None, on_step)
    }

    /// [`generate`](Self::generate), from init images when `init` is given (img2img, as
    /// diffusers' `StableDiffusionImg2ImgPipeline`): each init image is encoded by the VAE
    /// (a sample of its latent distribution, drawn from the image's own generator), noised to
    /// the level of the step `strength` starts at, and denoised from there.
    pub fn generate_with(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        init: Option<Img2Img<'_>>,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        self.validate(requests, p)?;
        let start = match init {
            Some(init) => {
                self.validate_img2img(requests, p, &init)?;
                Start::Images(init)
            }
            None => Start::Noise,
        };
        let started = Instant::now();
        let denoised = self.denoise(requests, p, start, on_step)?;
        self.finish(denoised, started)
    }

    /// Decodes denoised latents into the batch's images and timings.
    pub(crate) fn finish(&self, d: Denoised, started: Instant) -> Result<BatchOutput> {
        let _no_grad = tch::no_grad_guard();
        let t2 = Instant::now();
        let images = self.decode(&d.latents)?;
        let vae_decode = self.sync_elapsed(t2);
        Ok(BatchOutput {
            images,
            latents: Vec::new(),
            timings: d.timings(vae_decode, started),
        })
    }

    /// The denoising loop of txt2img and img2img (inputs validated by the caller): the text
    /// conditioning, the starting latents of `start`, every scheduler step. Returns the final
    /// latents, not yet decoded.
    pub(crate) fn denoise(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        start: Start<'_>,
        on_step: &mut StepCallback<'_>,
    ) -> Result<Denoised> {
        if self.is_inpainting_model() {
            return Err(Error::InvalidArgument(
                "this is an inpainting model (its UNet also takes a mask): give it an init \
                 image and a mask"
                    .into(),
            ));
        }
        let _no_grad = tch::no_grad_guard();
        let device = self.options.device;
        let kind = self.options.dtype;
        // As diffusers: guidance only when the scale is above 1 (a scale of 1 is the text branch alone).
        let guided = p.guidance_scale > 1.0;

        let t_lora = Instant::now();
        self.apply_loras(&p.loras)?;
        let lora = self.sync_elapsed(t_lora);

        // One text-encoder call: [negatives..., positives...] with guidance, positives alone without.
        let t0 = Instant::now();
        let context = self.encode_requests(requests, p, guided)?;
        let text_encode = self.sync_elapsed(t0);

        let t1 = Instant::now();
        let mut scheduler = p.scheduler.build(&self.scheduler_config, p.steps)?;
        if let Some(strength) = start.strength() {
            scheduler.start_at(img2img_begin(p.steps, strength)?)?;
        }
        let timesteps = scheduler.timesteps().to_vec();
        let shape = [
            1,
            self.unet.in_channels(),
            p.height / self.vae_scale_factor,
            p.width / self.vae_scale_factor,
        ];
        // Each image's generator gives, in order: the initial noise (txt2img), or the VAE
        // sample and then the noise added to it (img2img from images; from latents there is
        // no VAE sample); then one draw per step for ancestral samplers. diffusers draws in the
        // same order.
        let first_step_draw = match start {
            Start::Noise | Start::Latents { .. } => 1,
            Start::Images(_) => 2,
        };
        let draws = first_step_draw
            + if scheduler.needs_noise() {
                timesteps.len()
            } else {
                0
            };
        let noise = noise::BatchNoise::new(requests.iter().map(|r| r.seed), shape, kind, draws)?;
        let batch_noise = |draw: usize| noise.batch(draw, device);
        let mut latents = match &start {
            Start::Noise => batch_noise(0)?.f_mul_scalar(scheduler.init_noise_sigma())?,
            Start::Images(init) => {
                let clean = self.encode_images(&images_to_tensor(init.images)?, &noise, 0)?;
                scheduler.add_noise(&clean, &batch_noise(1)?)?
            }
            Start::Latents { latents, .. } => {
                let clean = latents.f_to_device(device)?.f_to_kind(kind)?;
                scheduler.add_noise(&clean, &batch_noise(0)?)?
            }
        };

        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = if guided {
                Tensor::f_cat(&[&latents, &latents], 0)?
            } else {
                latents.shallow_clone()
            };
            let model_in = scheduler.scale_model_input(&model_in, i);
            let eps = self.guided_prediction(&model_in, t, &context, p, guided)?;
            let step_noise = if scheduler.needs_noise() {
                Some(batch_noise(first_step_draw + i)?)
            } else {
                None
            };
            latents = scheduler.step(&eps, i, &latents, step_noise.as_ref())?;
            after_step(on_step, i, timesteps.len(), &latents)?;
        }
        let denoise = self.sync_elapsed(t1);
        Ok(Denoised {
            latents,
            lora,
            text_encode,
            denoise,
            unet_steps: timesteps.len(),
        })
    }

    /// `pixels` (`[n, 3, H, W]` in [-1, 1]) to latents as img2img and inpainting start from them:
    /// a sample of each image's latent distribution, drawn from draw `draw` of that image's own
    /// generator (one image at a time, as diffusers encodes with one generator per image), times
    /// the VAE's scaling factor.
    pub(crate) fn encode_images(
        &self,
        pixels: &Tensor,
        noise: &noise::BatchNoise,
        draw: usize,
    ) -> Result<Tensor> {
        let encoder = self.vae_encoder.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "img2img and inpainting need the VAE's encoder, which this model's weights lack"
                    .into(),
            )
        })?;
        let device = self.options.device;
        let pixels = pixels.f_to_device(device)?.f_to_kind(self.options.dtype)?;
        let parts = (0..pixels.size()[0])
            .map(|i| {
                let dist = encoder.encode(&pixels.f_narrow(0, i, 1)?)?;
                dist.sample(&noise.image(i as usize, draw).f_to_device(device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_cat(&parts, 0)?.f_mul_scalar(self.vae_scaling_factor)?)
    }

    /// The UNet's noise prediction for `model_in` (scaled, and doubled as [uncond, text] when
    /// `guided`) at timestep `t`, combined by classifier-free guidance and its rescale.
    pub(crate) fn guided_prediction(
        &self,
        model_in: &Tensor,
        t: f64,
        context: &Tensor,
        p: &GenerateParams,
        guided: bool,
    ) -> Result<Tensor> {
        let batch = model_in.size()[0];
        let ts = Tensor::from_slice(&[t as f32])
            .f_to_device(self.options.device)?
            .f_expand([batch], false)?;
        let compiled = match self.compiled_now() {
            Some(c) => c.unet(model_in, &ts, context)?,
            None => None,
        };
        let eps = match compiled {
            Some(eps) => eps,
            None => self.unet.forward(model_in, &ts, context)?,
        };
        if !guided {
            return Ok(eps);
        }
        let halves = eps.f_chunk(2, 0)?;
        let (uncond, text) = (&halves[0], &halves[1]);
        let combined = uncond.f_add(&text.f_sub(uncond)?.f_mul_scalar(p.guidance_scale)?)?;
        if p.guidance_rescale > 0.0 {
            rescale_guidance(&combined, text, p.guidance_rescale)
        } else {
            Ok(combined)
        }
    }

    /// Latents → RGB8 images, post-processed as diffusers does (`(x/2 + 0.5).clamp(0, 1)` in the
    /// model dtype, then ×255 and round-half-even in float32).
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let _no_grad = tch::no_grad_guard();
        let z = latents.f_div_scalar(self.vae_scaling_factor)?;
        let decoded = if self.options.vae_slicing && z.size()[0] > 1 {
            let parts = z
                .f_split(1, 0)?
                .iter()
                .map(|zi| self.vae.decode(zi))
                .collect::<Result<Vec<_>>>()?;
            Tensor::f_cat(&parts, 0)?
        } else {
            let compiled = match self.compiled_now() {
                Some(c) => c.decode(&z)?,
                None => None,
            };
            match compiled {
                Some(image) => image,
                None => self.vae.decode(&z)?,
            }
        };
        let pixels = decoded
            .f_div_scalar(2.0)?
            .f_add_scalar(0.5)?
            .f_clamp(0.0, 1.0)?
            .f_to_device(Device::Cpu)?
            .f_permute([0, 2, 3, 1])?
            .f_to_kind(Kind::Float)?
            .f_mul_scalar(255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_contiguous()?;
        let (b, h, w, _) = pixels.size4()?;
        (0..b)
            .map(|i| {
                let img = pixels.f_get(i)?;
                let len = (h * w * 3) as usize;
                let mut buf = vec![0u8; len];
                img.f_copy_data_u8(&mut buf, len)?;
                Ok(RgbImage {
                    width: w as u32,
                    height: h as u32,
                    pixels: buf,
                })
            })
            .collect()
    }

    /// Elapsed time since `t`, after waiting for queued CUDA work so phases are timed honestly.
    fn sync_elapsed(&self, t: Instant) -> Duration {
        if let Device::Cuda(i) = self.options.device {
            tch::Cuda::synchronize(i as i64);
        }
        t.elapsed()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
