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

impl StableDiffusion {
    /// A hires fix: `params` at its size, each image upscaled by `hires.scale` (see
    /// [`Upscaler`]), then img2img at the larger size with `hires.steps` and `hires.strength`
    /// (same prompts, seeds and other parameters). `on_step` sees both passes' steps. Timings
    /// add up both passes.
    pub fn generate_hires(
        &self,
        requests: &[ImageRequest],
        params: &GenerateParams,
        hires: Hires,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        let second = self.hires_params(params, &hires)?;
        let (width, height) = (second.width, second.height);
        match hires.upscaler {
            Upscaler::Lanczos => {
                let first = self.generate(requests, params, on_step)?;
                let upscaled = first
                    .images
                    .iter()
                    .map(|img| upscale_lanczos(img, width as u32, height as u32))
                    .collect::<Result<Vec<_>>>()?;
                let out = self.generate_with(
                    requests,
                    &second,
                    Some(Img2Img {
                        images: &upscaled,
                        strength: hires.strength,
                    }),
                    on_step,
                )?;
                Ok(BatchOutput {
                    images: out.images,
                    timings: sum(&first.timings, &out.timings),
                })
            }
            Upscaler::Latent => {
                self.validate(requests, params)?;
                self.validate(requests, &second)?;
                let started = Instant::now();
                let first = self.denoise(requests, params, Start::Noise, on_step)?;
                let upscaled = first.latents.f_upsample_bilinear2d(
                    [
                        height / self.vae_scale_factor,
                        width / self.vae_scale_factor,
                    ],
                    false,
                    None,
                    None,
                )?;
                let mut out = self.denoise(
                    requests,
                    &second,
                    Start::Latents {
                        latents: &upscaled,
                        strength: hires.strength,
                    },
                    on_step,
                )?;
                out.lora += first.lora;
                out.text_encode += first.text_encode;
                out.denoise += first.denoise;
                out.unet_steps += first.unet_steps;
                self.finish(out, started)
            }
        }
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
