//! Hires fix: generate at the model's size, upscale the image, then img2img at the larger size
//! (AUTOMATIC1111's "Hires. fix" with an image upscaler; diffusers users write it as two calls:
//! txt2img, resize, img2img). SD 1.x composes well at 512² and badly at 1024²; the second pass
//! adds detail at the large size without re-composing.
use super::{BatchOutput, GenerateParams, ImageRequest, Img2Img, RgbImage, StableDiffusion};
use super::{StepCallback, Timings};
use crate::error::{Error, Result};

/// The second pass of a hires fix.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Hires {
    /// Output size over the first pass's, in (1, 4]; sizes are rounded down to multiples of 8.
    pub scale: f64,
    /// Steps of the second pass's schedule (of which `strength` runs).
    pub steps: usize,
    /// img2img strength of the second pass, in (0, 1].
    pub strength: f64,
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
    /// A hires fix: `params` at its size, each image upscaled (Lanczos3) by `hires.scale`, then
    /// img2img at the larger size with `hires.steps` and `hires.strength` (same prompts, seeds
    /// and other parameters). `on_step` sees both passes' steps. Timings add up both passes.
    pub fn generate_hires(
        &self,
        requests: &[ImageRequest],
        params: &GenerateParams,
        hires: Hires,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        let (width, height) = hires.size(params.width, params.height, self.size_multiple())?;
        let second = GenerateParams {
            width,
            height,
            steps: hires.steps,
            ..params.clone()
        };
        super::img2img_begin(second.steps, hires.strength)?;
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
        let (a, b) = (&first.timings, &out.timings);
        Ok(BatchOutput {
            images: out.images,
            timings: Timings {
                lora_ms: a.lora_ms + b.lora_ms,
                text_encode_ms: a.text_encode_ms + b.text_encode_ms,
                denoise_ms: a.denoise_ms + b.denoise_ms,
                unet_steps: a.unet_steps + b.unet_steps,
                vae_decode_ms: a.vae_decode_ms + b.vae_decode_ms,
                total_ms: a.total_ms + b.total_ms,
            },
        })
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
