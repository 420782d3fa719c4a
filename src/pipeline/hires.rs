//! Hires fix: generate at the model's size, upscale the image, then img2img at the larger size
//! (AUTOMATIC1111's "Hires. fix" with an image upscaler; diffusers users write it as two calls:
//! txt2img, resize, img2img). SD 1.x composes well at 512² and badly at 1024²; the second pass
//! adds detail at the large size without re-composing.
//!
//! Two upscalers, as AUTOMATIC1111's: `lanczos` decodes the first pass, resizes the image
//! (Lanczos3) and encodes it again; `latent` resizes the first pass's latents bilinearly and
//! starts the second pass from them (no VAE round trip: faster, softer, and it needs a higher
//! strength, ~0.5–0.7, to clean up the interpolation).
use super::{BatchOutput, GenerateParams, ImageRequest, Img2Img, RgbImage, StableDiffusion, Start};
use super::{StepCallback, Timings};
use crate::error::{Error, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How the first pass is enlarged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Upscaler {
    /// The decoded image, resized with a Lanczos3 filter, then encoded again.
    #[default]
    Lanczos,
    /// The latents, resized bilinearly (`align_corners = false`, no antialiasing: A1111's
    /// "Latent").
    Latent,
}

impl Upscaler {
    pub const ALL: [Upscaler; 2] = [Upscaler::Lanczos, Upscaler::Latent];

    pub fn name(self) -> &'static str {
        match self {
            Upscaler::Lanczos => "lanczos",
            Upscaler::Latent => "latent",
        }
    }

    /// The name AUTOMATIC1111's infotext gives it (`Hires upscaler: …`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Upscaler::Lanczos => "Lanczos",
            Upscaler::Latent => "Latent",
        }
    }
}

impl std::str::FromStr for Upscaler {
    type Err = ();

    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Self::ALL.into_iter().find(|u| u.name() == s).ok_or(())
    }
}

/// The second pass of a hires fix.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hires {
    /// Output size over the first pass's, in (1, 4]; sizes are rounded down to multiples of 8.
    pub scale: f64,
    /// Steps of the second pass's schedule (of which `strength` runs).
    pub steps: usize,
    /// img2img strength of the second pass, in (0, 1].
    pub strength: f64,
    /// How the first pass is enlarged.
    pub upscaler: Upscaler,
}

/// Largest hires scale: 4 × 512 = 2048 px is already beyond what SD 1.x holds together.
pub const MAX_SCALE: f64 = 4.0;

impl Hires {
    /// The second pass's size for a first pass of `width` × `height` (rounded down to
    /// multiples of `multiple`).
    pub fn size(&self, width: i64, height: i64, multiple: i64) -> Result<(i64, i64)> {
        if !(self.scale > 1.0 && self.scale <= MAX_SCALE) {
            return Err(Error::InvalidArgument(format!(
                "hires scale must be in (1, {MAX_SCALE}], got {}",
                self.scale
            )));
        }
        let scaled = |v: i64| ((v as f64 * self.scale) as i64 / multiple) * multiple;
        Ok((scaled(width), scaled(height)))
    }
}

/// `image` resized to `width` × `height` with a Lanczos3 filter.
pub fn upscale_lanczos(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let src = image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .ok_or_else(|| Error::InvalidArgument("image buffer does not match its size".into()))?;
    let out = image::imageops::resize(&src, width, height, image::imageops::FilterType::Lanczos3);
    Ok(RgbImage {
        width,
        height,
        pixels: out.into_raw(),
    })
}

/// A latent hires fix's first pass, kept off the device between the passes: one image's
/// latents (`[channels, height/8, width/8]`) as float32 values, with the dtype they had (float32
/// holds float16 and bfloat16 exactly, so the second pass gets the same tensor back).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentImage {
    pub shape: [i64; 3],
    pub kind: Kind,
    pub values: Vec<f32>,
}

impl LatentImage {
    /// The images of a `[n, c, h, w]` batch of latents.
    pub fn split(latents: &Tensor) -> Result<Vec<LatentImage>> {
        let kind = latents.kind();
        let (n, c, h, w) = latents.size4()?;
        let all = latents
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        (0..n)
            .map(|i| {
                let one = all.f_get(i)?.f_flatten(0, -1)?;
                Ok(LatentImage {
                    shape: [c, h, w],
                    kind,
                    values: Vec::<f32>::try_from(&one)?,
                })
            })
            .collect()
    }

    /// `images` as one `[n, c, h, w]` batch on `device`, in their dtype.
    pub fn stack(images: &[&LatentImage], device: Device) -> Result<Tensor> {
        let first = images
            .first()
            .ok_or_else(|| Error::InvalidArgument("no first-pass latents".into()))?;
        if images
            .iter()
            .any(|l| l.shape != first.shape || l.kind != first.kind)
        {
            return Err(Error::InvalidArgument(
                "first-pass latents of one batch differ in shape or dtype".into(),
            ));
        }
        let parts = images
            .iter()
            .map(|l| {
                Ok(Tensor::from_slice(&l.values)
                    .f_view(l.shape)?
                    .f_to_kind(l.kind)?
                    .f_unsqueeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_cat(&parts, 0)?.f_to_device(device)?)
    }
}

/// What a hires fix's first pass hands the second, per image: the decoded image (`lanczos`) or
/// the latents (`latent`), both at the first pass's size. The worker plans the two passes as
/// two GPU batches of different shapes and keeps these in between.
#[derive(Debug, Clone, PartialEq)]
pub enum FirstPass {
    Image(RgbImage),
    Latents(LatentImage),
}

/// A first pass's results and what it took.
pub struct FirstPassOutput {
    pub first: Vec<FirstPass>,
    pub timings: Timings,
}

impl StableDiffusion {
    /// A hires fix: `params` at its size, each image upscaled by `hires.scale` (see
    /// [`Upscaler`]), then img2img at the larger size with `hires.steps` and `hires.strength`
    /// (same prompts, seeds and other parameters). `on_step` sees both passes' steps. Timings
    /// add up both passes. The same as [`Self::hires_first_pass`] then
    /// [`Self::hires_second_pass`], which the worker runs as two GPU batches.
    pub fn generate_hires(
        &self,
        requests: &[ImageRequest],
        params: &GenerateParams,
        hires: Hires,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        let second = self.hires_params(params, &hires)?;
        // Both passes' inputs are checked before either runs.
        self.validate(requests, &second)?;
        let first = self.hires_first_pass(requests, params, hires.upscaler, on_step)?;
        let first_passes: Vec<&FirstPass> = first.first.iter().collect();
        let out =
            self.hires_second_pass(requests, &second, hires.strength, &first_passes, on_step)?;
        Ok(BatchOutput {
            images: out.images,
            latents: Vec::new(),
            timings: sum(&first.timings, &out.timings),
        })
    }

    /// The first pass of a hires fix with `upscaler`: txt2img at `params`' size, decoded for
    /// `lanczos` (the same images as [`Self::generate`]), left as latents for `latent`.
    pub fn hires_first_pass(
        &self,
        requests: &[ImageRequest],
        params: &GenerateParams,
        upscaler: Upscaler,
        on_step: &mut StepCallback<'_>,
    ) -> Result<FirstPassOutput> {
        match upscaler {
            Upscaler::Lanczos => {
                let out = self.generate(requests, params, on_step)?;
                Ok(FirstPassOutput {
                    first: out.images.into_iter().map(FirstPass::Image).collect(),
                    timings: out.timings,
                })
            }
            Upscaler::Latent => {
                let out = self.generate_latents(requests, params, on_step)?;
                Ok(FirstPassOutput {
                    first: out.latents.into_iter().map(FirstPass::Latents).collect(),
                    timings: out.timings,
                })
            }
        }
    }

    /// txt2img without the VAE decode: each image's final latents ([`BatchOutput::latents`];
    /// `images` is empty and the decode time 0).
    pub fn generate_latents(
        &self,
        requests: &[ImageRequest],
        params: &GenerateParams,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        self.validate(requests, params)?;
        let started = Instant::now();
        let d = self.denoise(requests, params, Start::Noise, on_step)?;
        Ok(BatchOutput {
            images: Vec::new(),
            latents: LatentImage::split(&d.latents)?,
            timings: d.timings(std::time::Duration::ZERO, started),
        })
    }

    /// The second pass of a hires fix: img2img at `second`'s size (see [`Self::hires_params`])
    /// and `strength` from each request's first pass, upscaled here (a decoded image with
    /// Lanczos3 and encoded again; latents bilinearly, `align_corners = false`, no
    /// antialiasing). One kind of first pass per batch.
    pub fn hires_second_pass(
        &self,
        requests: &[ImageRequest],
        second: &GenerateParams,
        strength: f64,
        first: &[&FirstPass],
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        if first.len() != requests.len() {
            return Err(Error::InvalidArgument(format!(
                "{} first passes for {} requests",
                first.len(),
                requests.len()
            )));
        }
        let (width, height) = (second.width, second.height);
        let mut images = Vec::new();
        let mut latents = Vec::new();
        for &f in first {
            match f {
                FirstPass::Image(i) => images.push(i),
                FirstPass::Latents(l) => latents.push(l),
            }
        }
        if !images.is_empty() && !latents.is_empty() {
            return Err(Error::InvalidArgument(
                "a hires batch mixes decoded and latent first passes".into(),
            ));
        }
        if latents.is_empty() {
            let upscaled = images
                .into_iter()
                .map(|img| upscale_lanczos(img, width as u32, height as u32))
                .collect::<Result<Vec<_>>>()?;
            return self.generate_with(
                requests,
                second,
                Some(Img2Img {
                    images: &upscaled,
                    strength,
                }),
                on_step,
            );
        }
        self.validate(requests, second)?;
        let started = Instant::now();
        let upscaled = LatentImage::stack(&latents, self.device())?.f_upsample_bilinear2d(
            [
                height / self.vae_scale_factor,
                width / self.vae_scale_factor,
            ],
            false,
            None,
            None,
        )?;
        let out = self.denoise(
            requests,
            second,
            Start::Latents {
                latents: &upscaled,
                strength,
            },
            on_step,
        )?;
        self.finish(out, started)
    }

    /// The second pass's parameters: the first pass's at the hires size and steps, checked
    /// (scale, strength and scheduler) before any work runs.
    pub fn hires_params(&self, params: &GenerateParams, hires: &Hires) -> Result<GenerateParams> {
        let (width, height) = hires.size(params.width, params.height, self.size_multiple())?;
        let second = GenerateParams {
            width,
            height,
            steps: hires.steps,
            ..params.clone()
        };
        super::img2img_begin(second.steps, hires.strength)?;
        let mut probe = second
            .scheduler
            .build(&self.scheduler_config, second.steps)?;
        probe.start_at(super::img2img_begin(second.steps, hires.strength)?)?;
        Ok(second)
    }
}

/// The timings of two passes, added up.
fn sum(a: &Timings, b: &Timings) -> Timings {
    Timings {
        lora_ms: a.lora_ms + b.lora_ms,
        text_encode_ms: a.text_encode_ms + b.text_encode_ms,
        denoise_ms: a.denoise_ms + b.denoise_ms,
        unet_steps: a.unet_steps + b.unet_steps,
        vae_decode_ms: a.vae_decode_ms + b.vae_decode_ms,
        total_ms: a.total_ms + b.total_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_down_to_multiples_of_8() {
        let h = |scale| Hires {
            scale,
            steps: 10,
            strength: 0.5,
            upscaler: Upscaler::Lanczos,
        };
        assert_eq!(h(2.0).size(512, 512, 8).unwrap(), (1024, 1024));
        assert_eq!(h(1.5).size(512, 768, 8).unwrap(), (768, 1152));
        assert_eq!(h(1.3).size(512, 512, 8).unwrap(), (664, 664));
        for bad in [1.0, 0.5, 4.5, f64::NAN] {
            assert!(h(bad).size(512, 512, 8).is_err(), "{bad}");
        }
    }

    #[test]
    fn lanczos_keeps_a_flat_image_flat_and_scales() {
        let img = RgbImage {
            width: 8,
            height: 8,
            pixels: [10u8, 200, 90].repeat(64),
        };
        let up = upscale_lanczos(&img, 16, 24).unwrap();
        assert_eq!((up.width, up.height), (16, 24));
        assert!(up.pixels.chunks(3).all(|p| p == [10, 200, 90]));
    }
}
