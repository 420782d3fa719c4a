//! `sdbatch generate`: prompts file → images (PNG, JPEG or WebP, parameters embedded) + JSON
//! sidecars, in batches, with progress bars.
use super::{ModelArgs, SamplingArgs};
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sdbatch::device::{device_name, dtype_name};
use sdbatch::output::{Encoding, ImageFormat, Infotext, Sidecar, write_image};
use sdbatch::pipeline::ImageRequest;
use sdbatch::pipeline::clip_score::ClipScorer;
use sdbatch::pipeline::safety::{SafetyChecker, blank};
use sdbatch::prompts::{PromptEntry, read_prompts};
use sdbatch::worker::SafetyPolicy;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts: .txt (one a line) or .jsonl ({"prompt", "negative_prompt"?, "seed"?, "id"?}).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output folder (created if missing): <id or index>.png (.jpg, .webp) and .json per image.
    #[arg(long)]
    pub out: PathBuf,
    /// Image format; webp is lossless.
    #[arg(long, value_enum, default_value = "png")]
    pub format: ImageFormat,
    /// JPEG quality, 1..=100 (default 90; jpeg only).
    #[arg(long)]
    pub quality: Option<u32>,
    /// Mark images as AI-generated in their XMP (IPTC DigitalSourceType trainedAlgorithmicMedia);
    /// `--ai-marking false` leaves it out.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", action = clap::ArgAction::Set)]
    pub ai_marking: bool,
    /// Images per UNet batch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch_size: u32,
    /// Images per prompt (each with its own seed: the prompt's seed + n).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub images_per_prompt: u32,
    /// Base seed for prompts without one (prompt k, image n gets seed + k * images_per_prompt + n).
    /// Default: random, recorded in each sidecar.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Negative prompt for entries that have none.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Run the model folder's safety checker (safety_checker/ + feature_extractor/) on every image.
    #[arg(long)]
    pub safety_checker: bool,
    /// What happens to a flagged image: flag (write it, mark the sidecar), blank (write a black
    /// image, as diffusers does), drop (write only the sidecar).
    #[arg(long, value_enum, default_value = "blank", requires = "safety_checker")]
    pub safety_policy: SafetyPolicy,
    /// CLIP model folder (transformers layout): a CLIP score per image in its sidecar.
    #[arg(long)]
    pub clip_model: Option<PathBuf>,
    /// Mark images whose CLIP score is below this in their sidecar (they are kept).
    #[arg(long, requires = "clip_model")]
    pub min_clip_score: Option<f32>,
    /// img2img: start every prompt from this image (PNG, JPEG or WebP; EXIF orientation
    /// applied). Without --width/--height the output takes its size (multiples of 8); with them
    /// it is resized to that size (Lanczos3).
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the schedule runs, in (0, 1] (1: only the composition survives).
    /// Default 0.8; with --mask 1.0 (diffusers' inpainting default).
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
    /// Inpainting: repaint the white part of this mask (black keeps the init image; grey
    /// levels are thresholded at 50 %). Same formats and limits as --init-image; resized to the
    /// output size like it. Works with inpainting models (9-channel UNet) and ordinary ones.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask (at the output size) with this Gaussian radius in pixels,
    /// 0..=64, before it is thresholded: diffusers' `mask_processor.blur`, A1111's "Mask blur".
    /// Rounds the mask's corners and closes thin gaps.
    #[arg(long, value_name = "R", default_value_t = 0.0, requires = "mask")]
    pub mask_blur: f64,
    /// Inpainting: repaint only the mask's bounding box grown by N pixels (and widened to the
    /// output's aspect), enlarged to the output size, then pasted back through the mask:
    /// diffusers' `padding_mask_crop`, A1111's "Only masked" inpaint area. Small masked areas
    /// get the model's full resolution.
    #[arg(long, value_name = "N", requires = "mask",
          value_parser = clap::value_parser!(u32).range(0..=i64::from(sdbatch::pipeline::mask::MAX_PADDING_MASK_CROP)))]
    pub padding_mask_crop: Option<u32>,
    /// Hires fix: generate, upscale by this factor (in (1, 4], sizes rounded down to multiples
    /// of 8), then img2img at the larger size.
    #[arg(long, conflicts_with = "init_image")]
    pub hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass's schedule.
    #[arg(long, default_value_t = 20, requires = "hires_scale",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub hires_steps: u32,
    /// Hires fix: strength of the second pass, in (0, 1].
    #[arg(long, default_value_t = 0.5, requires = "hires_scale")]
    pub hires_strength: f64,
    /// Hires fix: `lanczos` resizes the decoded image (Lanczos3) and encodes it again; `latent`
    /// resizes the latents bilinearly (no VAE round trip; wants a strength of 0.5-0.7).
    #[arg(long, default_value = "lanczos", requires = "hires_scale",
          value_parser = clap::builder::PossibleValuesParser::new(["lanczos", "latent"]))]
    pub hires_upscaler: String,
}

impl GenerateArgs {
    /// --strength as given, else the mode's default.
    fn strength(&self) -> f64 {
        self.strength
            .unwrap_or(if self.mask.is_some() { 1.0 } else { 0.8 })
    }
}

/// The mask blur to record (sidecar, infotext): inpainting with a blur only.
fn mask_blur(args: &GenerateArgs) -> Option<f64> {
    (args.mask.is_some() && args.mask_blur != 0.0).then_some(args.mask_blur)
}

/// Largest init image accepted, in pixels per side (decoding allocates width x height x 4).
const MAX_INIT_SIDE: u32 = 4096;

/// Reads `path` as an RGB image with EXIF orientation applied, under decode limits (a
/// decompression bomb fails before it allocates).
fn read_init_image(path: &std::path::Path) -> Result<image::RgbImage> {
    read_image("--init-image", path)
}

/// [`read_init_image`] for the flag `flag` (errors name it).
fn read_image(flag: &str, path: &std::path::Path) -> Result<image::RgbImage> {
    use image::ImageDecoder;
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("{flag} {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{flag} {}", path.display()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INIT_SIDE);
    limits.max_image_height = Some(MAX_INIT_SIDE);
    limits.max_alloc = Some(u64::from(MAX_INIT_SIDE) * u64::from(MAX_INIT_SIDE) * 4);
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("{flag} {}: not a PNG, JPEG or WebP image", path.display()))?;
    decoder.set_limits(limits).with_context(|| {
        format!(
            "{flag} {}: larger than {MAX_INIT_SIDE}x{MAX_INIT_SIDE}",
            path.display()
        )
    })?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{flag} {}: cannot decode", path.display()))?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// The init image at the output size: its own size when no --width/--height was given (which
/// must then be multiples of 8), else resized to the requested size.
fn fit_init_image(
    img: image::RgbImage,
    width: Option<i64>,
    height: Option<i64>,
) -> Result<sdbatch::pipeline::RgbImage> {
    let (w, h) = match (width, height) {
        (None, None) => {
            if !img.width().is_multiple_of(8) || !img.height().is_multiple_of(8) {
                bail!(
                    "--init-image is {}x{}: not multiples of 8; pass --width and --height to resize it",
                    img.width(),
                    img.height()
                );
            }
            (img.width(), img.height())
        }
        (w, h) => (
            w.map_or(img.width(), |w| w as u32),
            h.map_or(img.height(), |h| h as u32),
        ),
    };
    let img = if (w, h) == img.dimensions() {
        img
    } else {
        image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3)
    };
    Ok(sdbatch::pipeline::RgbImage {
        width: w,
        height: h,
        pixels: img.into_raw(),
    })
}

/// The mask at the init image's (fitted) size: resized with the same filter when it differs
/// (diffusers resizes the mask to the output size too), then reduced to grey as PIL does.
fn fit_mask(
    mask: image::RgbImage,
    init: &sdbatch::pipeline::RgbImage,
) -> Result<sdbatch::pipeline::GrayImage> {
    let (w, h) = (init.width, init.height);
    let mask = if mask.dimensions() == (w, h) {
        mask
    } else {
        image::imageops::resize(&mask, w, h, image::imageops::FilterType::Lanczos3)
    };
    Ok(sdbatch::pipeline::GrayImage::from_rgb(
        &sdbatch::pipeline::RgbImage {
            width: w,
            height: h,
            pixels: mask.into_raw(),
        },
    ))
}

/// One image to make, with where it goes.
struct Job {
    stem: String,
    request: ImageRequest,
}

fn plan(entries: &[PromptEntry], args: &GenerateArgs, base_seed: u64) -> Vec<Job> {
    let per = args.images_per_prompt as u64;
    let mut jobs = Vec::new();
    for (k, e) in entries.iter().enumerate() {
        let first_seed = e
            .seed
            .unwrap_or_else(|| base_seed.wrapping_add(k as u64 * per));
        for n in 0..per {
            let base = e.id.clone().unwrap_or_else(|| k.to_string());
            let stem = if per > 1 { format!("{base}_{n}") } else { base };
            jobs.push(Job {
                stem,
                request: ImageRequest {
                    prompt: e.prompt.clone(),
                    negative_prompt: e
                        .negative_prompt
                        .clone()
                        .or_else(|| args.negative_prompt.clone()),
                    seed: first_seed.wrapping_add(n),
                },
            });
        }
    }
    jobs
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is seeded from the OS; hashing the time through it gives an unpredictable seed
    // without another dependency.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    RandomState::new().hash_one(now) >> 1
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Validate everything cheap before loading a model.
    let entries = read_prompts(&args.prompts)?;
    for dim in [args.sampling.width, args.sampling.height]
        .into_iter()
        .flatten()
    {
        if dim <= 0 || dim % 8 != 0 || dim > 4096 {
            bail!("--width/--height must be positive multiples of 8 up to 4096, got {dim}");
        }
    }
    if !args.sampling.guidance.is_finite() || args.sampling.guidance < 0.0 {
        bail!("--guidance must be a finite number >= 0");
    }
    let encoding =
        Encoding::new(args.format, args.quality).map_err(|e| anyhow::anyhow!("--{e}"))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base_seed = args.seed.unwrap_or_else(random_seed);
    let jobs = plan(&entries, &args, base_seed);
    let init_image = args
        .init_image
        .as_deref()
        .map(|path| {
            fit_init_image(
                read_init_image(path)?,
                args.sampling.width,
                args.sampling.height,
            )
        })
        .transpose()?;
    let strength = args.strength();
    if init_image.is_some() {
        sdbatch::pipeline::img2img_begin(args.sampling.steps as usize, strength)
            .map_err(|e| anyhow::anyhow!("--strength: {e}"))?;
    }
    let hires = args
        .hires_scale
        .map(|scale| sdbatch::pipeline::hires::Hires {
            scale,
            steps: args.hires_steps as usize,
            strength: args.hires_strength,
            upscaler: args.hires_upscaler.parse().unwrap_or_default(),
        });
    if let Some(h) = &hires {
        h.size(8, 8, 8)
            .map_err(|e| anyhow::anyhow!("--hires-scale: {e}"))?;
        sdbatch::pipeline::img2img_begin(h.steps, h.strength)
            .map_err(|e| anyhow::anyhow!("--hires-strength: {e}"))?;
    }
    sdbatch::pipeline::mask::check_mask_blur(args.mask_blur)
        .map_err(|e| anyhow::anyhow!("--mask-blur: {e}"))?;
    let mask = match (&args.mask, &init_image) {
        (Some(path), Some(init)) => Some(fit_mask(read_image("--mask", path)?, init)?),
        _ => None,
    };

    let model = args.model.load()?;
    let check_options = sdbatch::pipeline::LoadOptions::new(model.device(), model.dtype());
    let checker = if args.safety_checker {
        Some(
            SafetyChecker::load(
                &super::extras_dir(&args.model.model, args.model.model_config.as_deref()),
                &check_options,
            )?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--safety-checker: {} has no safety_checker/ folder",
                    args.model.model.display()
                )
            })?,
        )
    } else {
        None
    };
    let scorer = args
        .clip_model
        .as_ref()
        .map(|dir| ClipScorer::load(dir, &check_options))
        .transpose()?;
    let mut params = args.sampling.params(&model)?;
    if let Some(init) = &init_image {
        // The output takes the init image's size (already fitted to --width/--height).
        params.width = i64::from(init.width);
        params.height = i64::from(init.height);
    }
    model.validate(&[jobs[0].request.clone()], &params)?;
    let model_name = args.model.model.display().to_string();
    // For the infotext's `Model hash`; a model whose files cannot be read again goes without.
    let model_sha256 = model
        .content_sha256()
        .inspect_err(|e| tracing::warn!(error = %e, "cannot hash the model's files"))
        .ok();
    let device = device_name(model.device());
    let dtype = dtype_name(model.dtype());
    tracing::info!(
        images = jobs.len(),
        prompts = entries.len(),
        base_seed,
        "generating"
    );

    let bars = MultiProgress::new();
    let images_bar = bars.add(ProgressBar::new(jobs.len() as u64));
    images_bar.set_style(
        ProgressStyle::with_template(
            "images {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let steps_bar = bars.add(ProgressBar::new(0));
    steps_bar.set_style(
        ProgressStyle::with_template("steps  {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    for chunk in jobs.chunks(args.batch_size as usize) {
        let requests: Vec<ImageRequest> = chunk.iter().map(|j| j.request.clone()).collect();
        steps_bar.reset();
        steps_bar.set_message(format!("batch of {}", requests.len()));
        let inits: Vec<sdbatch::pipeline::RgbImage> = init_image
            .iter()
            .flat_map(|img| std::iter::repeat_n(img.clone(), requests.len()))
            .collect();
        let mut on_step = |i: usize, total: usize, _: &tch::Tensor| {
            steps_bar.set_length(total as u64);
            steps_bar.set_position(i as u64 + 1);
            std::ops::ControlFlow::Continue(())
        };
        let out = match (hires, &mask) {
            (Some(h), _) => model.generate_hires(&requests, &params, h, &mut on_step)?,
            (None, Some(mask)) => {
                let masks = vec![mask.clone(); requests.len()];
                let inpaint = sdbatch::pipeline::Inpaint {
                    images: &inits,
                    masks: &masks,
                    strength,
                    mask_blur: args.mask_blur,
                    padding_mask_crop: args.padding_mask_crop,
                };
                model.generate_inpaint(&requests, &params, inpaint, &mut on_step)?
            }
            (None, None) => {
                let img2img = init_image.as_ref().map(|_| sdbatch::pipeline::Img2Img {
                    images: &inits,
                    strength,
                });
                model.generate_with(&requests, &params, img2img, &mut on_step)?
            }
        };
        let verdicts = checker.as_ref().map(|c| c.check(&out.images)).transpose()?;
        let scores = match &scorer {
            Some(s) => {
                let prompts: Vec<&str> = requests.iter().map(|r| r.prompt.as_str()).collect();
                Some(s.scores(&prompts, &out.images)?)
            }
            None => None,
        };
        for (i, (job, image)) in chunk.iter().zip(&out.images).enumerate() {
            let nsfw = verdicts.as_ref().map(|v| v[i].nsfw);
            let action = (nsfw == Some(true)).then_some(args.safety_policy);
            let clip_score = scores.as_ref().map(|s| s[i]);
            let blanked;
            let written = match action {
                Some(SafetyPolicy::Drop) => None,
                Some(SafetyPolicy::Blank) => {
                    blanked = blank(image);
                    Some(&blanked)
                }
                _ => Some(image),
            };
            let sidecar = Sidecar {
                prompt: &job.request.prompt,
                negative_prompt: job.request.negative_prompt.as_deref(),
                seed: job.request.seed,
                steps: params.steps,
                guidance_scale: params.guidance_scale,
                width: i64::from(image.width),
                height: i64::from(image.height),
                hires,
                scheduler: params.scheduler.name(),
                init_image: args.init_image.as_deref().and_then(|p| p.to_str()),
                strength: init_image.as_ref().map(|_| strength),
                mask_blur: mask_blur(&args),
                padding_mask_crop: args.padding_mask_crop,
                clip_skip: (params.clip_skip != 1).then_some(params.clip_skip),
                guidance_rescale: (params.guidance_rescale != 0.0)
                    .then_some(params.guidance_rescale),
                prompt_syntax: (params.prompt_syntax
                    != sdbatch::pipeline::prompt_weights::PromptSyntax::Plain)
                    .then(|| params.prompt_syntax.as_str()),
                loras: &params.loras,
                model: &model_name,
                device: &device,
                dtype,
                batch_size: requests.len(),
                timings: &out.timings,
                nsfw,
                safety_action: action.map(SafetyPolicy::name),
                clip_score,
                low_clip_score: clip_score.zip(args.min_clip_score).map(|(s, min)| s < min),
            };
            let infotext = Infotext {
                prompt: &job.request.prompt,
                negative_prompt: job.request.negative_prompt.as_deref(),
                seed: job.request.seed,
                params: &params,
                model: &model_name,
                model_sha256: model_sha256.as_deref(),
                denoising_strength: init_image.as_ref().map(|_| strength),
                hires,
                mask_blur: mask_blur(&args),
                padding_mask_crop: args.padding_mask_crop,
            };
            write_image(
                &args.out,
                &job.stem,
                written,
                &sidecar,
                encoding,
                &infotext,
                args.ai_marking,
            )?;
            images_bar.inc(1);
        }
        tracing::debug!(?out.timings, "batch done");
    }
    steps_bar.finish_and_clear();
    images_bar.finish();
    println!("wrote {} images to {}", jobs.len(), args.out.display());
    Ok(())
}
