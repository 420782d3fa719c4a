//! Inpainting, as diffusers' `StableDiffusionInpaintPipeline`: repaint the white part of a mask,
//! keep the black part.
//!
//! Two kinds of UNet do it:
//! - **Inpainting UNets** (`stable-diffusion-inpainting` layout, `in_channels` 9): the UNet sees
//!   `[latents (4), mask (1), masked-image latents (4)]` at every step and repaints by itself.
//! - **Ordinary UNets** (`in_channels` 4): after every step the kept area is overwritten by the
//!   init image's latents noised to the next step's level, `(1 − m)·add_noise(x₀, ε, t₊₁) + m·x`.
//!
//! Each image's generator gives, in diffusers' order: the init image's VAE sample (when the
//! image latents are needed: an ordinary UNet, or a strength below 1), the initial noise, the
//! masked image's VAE sample, then one draw per step for ancestral samplers.
use super::pil::Image8;
use super::{
    BatchOutput, GenerateParams, ImageRequest, Img2Img, RgbImage, StableDiffusion, StepCallback,
    Timings, channels_last, images_to_tensor, img2img_begin, ms, noise, prompt_weights,
};
use crate::error::{Error, Result};
use std::time::Instant;
use tch::{Kind, Tensor};

/// One 8-bit grey channel (a mask: 255 repaints, 0 keeps; binarised at 128).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrayImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl GrayImage {
    /// PIL's `convert("L")` of an RGB image (ITU-R 601-2 luma in 16-bit fixed point, rounded),
    /// which is what diffusers' mask processor does to a colour mask.
    pub fn from_rgb(img: &RgbImage) -> Self {
        let pixels = img
            .pixels
            .chunks_exact(3)
            .map(|p| {
                let l = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
                // At most 255 · 65536 + 0x8000 >> 16 = 255: the cast cannot truncate.
                ((l + 0x8000) >> 16) as u8
            })
            .collect();
        Self {
            width: img.width,
            height: img.height,
            pixels,
        }
    }

    /// The mask under PIL's `GaussianBlur(radius)` (diffusers' `mask_processor.blur`,
    /// AUTOMATIC1111's "Mask blur"): PIL's bytes exactly, see [`super::mask`]. Radius 0 is the
    /// mask itself.
    pub fn blurred(&self, radius: f64) -> Result<Self> {
        super::mask::check_mask_blur(radius).map_err(Error::InvalidArgument)?;
        // PIL takes the radius as a C float.
        let pixels = super::mask::gaussian_blur(
            &self.pixels,
            self.width as usize,
            self.height as usize,
            radius as f32,
        )?;
        Ok(Self {
            width: self.width,
            height: self.height,
            pixels,
        })
    }
}

/// Inpainting inputs for a batch: per request an init image and a mask of the output's size.
#[derive(Debug, Clone, Copy)]
pub struct Inpaint<'a> {
    pub images: &'a [RgbImage],
    /// White (≥ 128) repaints, black keeps.
    pub masks: &'a [GrayImage],
    /// In (0, 1]: as img2img. diffusers' default for inpainting is 1: the masked area starts
    /// from pure noise (the init image still shows through the mask input or the blend).
    pub strength: f64,
    /// Gaussian blur radius applied to every mask first (diffusers' `mask_processor.blur`,
    /// A1111's "Mask blur"), in `0..=`[`super::mask::MAX_MASK_BLUR`]; 0: none. The mask is
    /// still binarised afterwards, as diffusers does, so the blur moves the mask's edge
    /// (rounding corners, closing thin gaps) rather than feathering it.
    pub mask_blur: f64,
    /// diffusers' `padding_mask_crop`: inpaint only the mask's bounding box grown by this many
    /// pixels (and widened to the output's aspect), resized to the output size, so a small
    /// area gets the model's full resolution; the result is resized back into the box and laid
    /// under the init image through the mask. `None`: the whole image, as usual. At most
    /// [`super::mask::MAX_PADDING_MASK_CROP`]; a mask with no white pixel is refused.
    pub padding_mask_crop: Option<u32>,
}

/// Masks to `[n, 1, H, W]` float32 of 0 and 1, as diffusers' mask processor (`/255`, then
/// `< 0.5 → 0`, `≥ 0.5 → 1`).
fn masks_to_tensor(masks: &[GrayImage]) -> Result<Tensor> {
    let parts = masks
        .iter()
        .map(|m| {
            Ok(Tensor::from_slice(&m.pixels)
                .f_view([1, 1, i64::from(m.height), i64::from(m.width)])?
                .f_to_kind(Kind::Float)?
                .f_div_scalar(255.0)?
                .f_ge(0.5)?
                .f_to_kind(Kind::Float)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// diffusers' `VaeImageProcessor._resize_and_fill`: `img` resized (PIL Lanczos) to fit
/// `width` x `height` keeping its aspect, centred, and the bands it leaves filled by stretching
/// its first and last rows (or columns).
fn resize_and_fill(img: &Image8, width: usize, height: usize) -> Result<Image8> {
    let ratio = width as f64 / height as f64;
    let src_ratio = img.width as f64 / img.height as f64;
    let src_w = if ratio < src_ratio {
        width
    } else {
        img.width * height / img.height
    };
    let src_h = if ratio >= src_ratio {
        height
    } else {
        img.height * width / img.width
    };
    let resized = img.resize(src_w, src_h, None)?;
    let mut res = Image8::zeros(width, height, img.channels);
    let centre = |a: usize, b: usize| (a / 2) as i64 - (b / 2) as i64;
    res.paste(&resized, centre(width, src_w), centre(height, src_h));
    let (rw, rh) = (resized.width as f32, resized.height as f32);
    if ratio < src_ratio {
        let fill = centre(height, src_h);
        if fill > 0 {
            let f = fill as usize;
            // A zero-height source box: PIL samples the rows next to it.
            res.paste(&resized.resize(width, f, Some([0.0, 0.0, rw, 0.0]))?, 0, 0);
            let bottom = resized.resize(width, f, Some([0.0, rh, rw, rh]))?;
            res.paste(&bottom, 0, fill + src_h as i64);
        }
    } else if ratio > src_ratio {
        let fill = centre(width, src_w);
        if fill > 0 {
            let f = fill as usize;
            res.paste(&resized.resize(f, height, Some([0.0, 0.0, 0.0, rh]))?, 0, 0);
            let right = resized.resize(f, height, Some([rw, 0.0, rw, rh]))?;
            res.paste(&right, fill + src_w as i64, 0);
        }
    }
    Ok(res)
}

impl StableDiffusion {
    /// `padding_mask_crop` (diffusers' pipeline with it): per request, the mask's crop region
    /// (after the blur, which diffusers' caller applies to the mask it passes), the init image
    /// and mask cropped to it and resized to the output size ([`resize_and_fill`]), inpainted
    /// there, and the result laid back into the init image ([`super::pil::overlay`]).
    fn generate_inpaint_cropped(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        inpaint: Inpaint<'_>,
        pad: u32,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        let (w, h) = (p.width as usize, p.height as usize);
        let masks = inpaint
            .masks
            .iter()
            .map(|m| m.blurred(inpaint.mask_blur))
            .collect::<Result<Vec<_>>>()?;
        let mut originals = Vec::with_capacity(masks.len());
        let mut images = Vec::with_capacity(masks.len());
        let mut crop_masks = Vec::with_capacity(masks.len());
        for (i, (img, mask)) in inpaint.images.iter().zip(&masks).enumerate() {
            let (mw, mh) = (mask.width as usize, mask.height as usize);
            let region = super::mask::crop_region(&mask.pixels, mw, mh, w, h, pad)
                .map_err(|e| Error::InvalidArgument(format!("mask {i}: {e}")))?;
            let [x0, y0, x1, y1] = region;
            let init = Image8::new(
                img.width as usize,
                img.height as usize,
                3,
                img.pixels.clone(),
            )?;
            let mask8 = Image8::new(mw, mh, 1, mask.pixels.clone())?;
            let crop_init = resize_and_fill(&init.crop(x0, y0, x1, y1)?, w, h)?;
            let crop_mask = resize_and_fill(&mask8.crop(x0, y0, x1, y1)?, w, h)?;
            images.push(RgbImage {
                width: w as u32,
                height: h as u32,
                pixels: crop_init.pixels,
            });
            crop_masks.push(GrayImage {
                width: w as u32,
                height: h as u32,
                pixels: crop_mask.pixels,
            });
            originals.push((init, mask8, region));
        }
        let cropped = Inpaint {
            images: &images,
            masks: &crop_masks,
            strength: inpaint.strength,
            mask_blur: 0.0,
            padding_mask_crop: None,
        };
        let mut out = self.generate_inpaint(requests, p, cropped, on_step)?;
        for (image, (init, mask, region)) in out.images.iter_mut().zip(&originals) {
            let made = Image8::new(
                image.width as usize,
                image.height as usize,
                3,
                std::mem::take(&mut image.pixels),
            )?;
            let laid = super::pil::overlay(mask, init, &made, *region)?;
            *image = RgbImage {
                width: laid.width as u32,
                height: laid.height as u32,
                pixels: laid.pixels,
            };
        }
        Ok(out)
    }

    /// Whether the UNet is an inpainting one (`in_channels` = latents + mask + masked-image
    /// latents): it needs a mask and an image, so plain text-to-image cannot drive it.
    pub fn is_inpainting_model(&self) -> bool {
        self.unet.in_channels() == 2 * self.vae.latent_channels() + 1
    }

    /// Checks inpainting inputs: img2img's checks on the images and the strength (which also
    /// refuse schedulers that cannot start mid-schedule or add noise), one mask per request at
    /// the output's size.
    fn validate_inpaint(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        inpaint: &Inpaint<'_>,
    ) -> Result<()> {
        let images = Img2Img {
            images: inpaint.images,
            strength: inpaint.strength,
        };
        self.validate_img2img(requests, p, &images)
            .map_err(|e| match e {
                Error::InvalidArgument(m) => {
                    Error::InvalidArgument(m.replace("img2img", "inpainting"))
                }
                other => other,
            })?;
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        super::mask::check_mask_blur(inpaint.mask_blur).map_err(Error::InvalidArgument)?;
        if let Some(pad) = inpaint.padding_mask_crop
            && pad > super::mask::MAX_PADDING_MASK_CROP
        {
            return bad(format!(
                "padding_mask_crop {pad} is over {}",
                super::mask::MAX_PADDING_MASK_CROP
            ));
        }
        if inpaint.masks.len() != requests.len() {
            return bad(format!(
                "{} masks for {} requests",
                inpaint.masks.len(),
                requests.len()
            ));
        }
        for (i, m) in inpaint.masks.iter().enumerate() {
            if (i64::from(m.width), i64::from(m.height)) != (p.width, p.height)
                || m.pixels.len() != m.width as usize * m.height as usize
            {
                return bad(format!(
                    "mask {i} is {}x{}, the output {}x{}: resize it first",
                    m.width, m.height, p.width, p.height
                ));
            }
        }
        Ok(())
    }

    /// The text conditioning of a batch (txt2img, img2img and inpainting alike):
    /// `[negatives…, positives…]` with guidance, positives alone without. Clip skip applies to
    /// the negative prompts too (diffusers applies it to the prompt only; AUTOMATIC1111 and
    /// ComfyUI to both, which is what users who set it expect).
    pub(super) fn encode_requests(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        guided: bool,
    ) -> Result<Tensor> {
        let mut texts: Vec<&str> = Vec::with_capacity(requests.len() * 2);
        if guided {
            texts.extend(
                requests
                    .iter()
                    .map(|r| r.negative_prompt.as_deref().unwrap_or("")),
            );
        }
        texts.extend(requests.iter().map(|r| r.prompt.as_str()));
        match p.prompt_syntax {
            prompt_weights::PromptSyntax::Plain => {
                self.encode_prompts_skipping(&texts, p.clip_skip)
            }
            prompt_weights::PromptSyntax::A1111 => self.encode_prompts_a1111(&texts, p.clip_skip),
        }
    }

    /// Inpaints one image per request (diffusers' `StableDiffusionInpaintPipeline`): the white
    /// part of each mask is generated from the prompt, the black part kept from the init image.
    /// Works with inpainting UNets (9 input channels) and ordinary ones (4: the kept area is
    /// blended back in after every step, so its edges can show a seam).
    pub fn generate_inpaint(
        &self,
        requests: &[ImageRequest],
        p: &GenerateParams,
        inpaint: Inpaint<'_>,
        on_step: &mut StepCallback<'_>,
    ) -> Result<BatchOutput> {
        self.validate(requests, p)?;
        self.validate_inpaint(requests, p, &inpaint)?;
        if let Some(pad) = inpaint.padding_mask_crop {
            return self.generate_inpaint_cropped(requests, p, inpaint, pad, on_step);
        }
        let _no_grad = tch::no_grad_guard();
        let started = Instant::now();
        let device = self.options.device;
        let kind = self.options.dtype;
        let guided = p.guidance_scale > 1.0;
        let uses_mask_input = self.is_inpainting_model();

        let t_lora = Instant::now();
        self.apply_loras(&p.loras)?;
        let lora = self.sync_elapsed(t_lora);

        let t0 = Instant::now();
        let context = self.encode_requests(requests, p, guided)?;
        let text_encode = self.sync_elapsed(t0);

        let t1 = Instant::now();
        let mut scheduler = p.scheduler.build(&self.scheduler_config, p.steps)?;
        scheduler.start_at(img2img_begin(p.steps, inpaint.strength)?)?;
        let timesteps = scheduler.timesteps().to_vec();
        let (lat_h, lat_w) = (
            p.height / self.vae_scale_factor,
            p.width / self.vae_scale_factor,
        );
        let shape = [1, self.vae.latent_channels(), lat_h, lat_w];
        // diffusers compares the float with 1.0 exactly (`is_strength_max`).
        let pure_noise = inpaint.strength == 1.0;
        // The init image's own latents: the blend needs them, and so does a start below
        // strength 1 (noised image latents).
        let needs_image_latents = !uses_mask_input || !pure_noise;
        let noise_draw = usize::from(needs_image_latents);
        let masked_draw = noise_draw + 1;
        let first_step_draw = masked_draw + 1;
        let draws = first_step_draw
            + if scheduler.needs_noise() {
                timesteps.len()
            } else {
                0
            };
        let noise = noise::BatchNoise::new(requests.iter().map(|r| r.seed), shape, kind, draws)?;
        let batch_noise = |draw: usize| noise.batch(draw, device);
        // VAE samples as diffusers' `_encode_vae_image` with a list of generators.
        let encode = |pixels: &Tensor, draw: usize| self.encode_images(pixels, &noise, draw);

        // Pixels and mask stay float32 until encoded, as diffusers keeps `init_image` and
        // `mask_condition` in float32.
        let pixels = images_to_tensor(inpaint.images)?;
        let mask_full = if inpaint.mask_blur == 0.0 {
            masks_to_tensor(inpaint.masks)?
        } else {
            // diffusers blurs the PIL mask before its mask processor binarises it.
            let blurred = inpaint
                .masks
                .iter()
                .map(|m| m.blurred(inpaint.mask_blur))
                .collect::<Result<Vec<_>>>()?;
            masks_to_tensor(&blurred)?
        };
        // Channels last, as diffusers' product of two channels-last tensors (see
        // `images_to_tensor`).
        let masked_pixels = channels_last(&pixels.f_mul(&mask_full.f_lt(0.5)?)?)?;
        let image_latents = if needs_image_latents {
            // Contiguous, as diffusers' `image_latents.repeat(...)` leaves them (the layout
            // decides libtorch's kernels in the UNet calls that follow; see `images_to_tensor`).
            Some(encode(&pixels, 0)?.f_contiguous()?)
        } else {
            None
        };
        let init_noise = batch_noise(noise_draw)?;
        let mut latents = match &image_latents {
            Some(clean) if !pure_noise => scheduler.add_noise(clean, &init_noise)?,
            _ => init_noise.f_mul_scalar(scheduler.init_noise_sigma())?,
        };
        // `interpolate` to the latent size, default mode "nearest".
        let mask = mask_full
            .f_upsample_nearest2d([lat_h, lat_w], None, None)?
            .f_to_device(device)?
            .f_to_kind(kind)?;
        let masked_latents = encode(&masked_pixels, masked_draw)?;
        let double = |t: &Tensor| -> Result<Tensor> {
            Ok(if guided {
                Tensor::f_cat(&[t, t], 0)?
            } else {
                t.shallow_clone()
            })
        };
        let unet_extra = [double(&mask)?, double(&masked_latents)?];
        let keep = mask.f_mul_scalar(-1.0)?.f_add_scalar(1.0)?;

        for (i, &t) in timesteps.iter().enumerate() {
            let model_in = scheduler.scale_model_input(&double(&latents)?, i);
            let model_in = if uses_mask_input {
                Tensor::f_cat(&[&model_in, &unet_extra[0], &unet_extra[1]], 1)?
            } else {
                model_in
            };
            let eps = self.guided_prediction(&model_in, t, &context, p, guided)?;
            let step_noise = if scheduler.needs_noise() {
                Some(batch_noise(first_step_draw + i)?)
            } else {
                None
            };
            latents = scheduler.step(&eps, i, &latents, step_noise.as_ref())?;
            if let Some(clean) = image_latents.as_ref().filter(|_| !uses_mask_input) {
                // The kept area, at the noise level of the step that comes next (clean after
                // the last step), with the same noise the run started from.
                let proper = if i + 1 < timesteps.len() {
                    scheduler.add_noise_at(clean, &init_noise, i + 1)?
                } else {
                    clean.shallow_clone()
                };
                latents = keep.f_mul(&proper)?.f_add(&mask.f_mul(&latents)?)?;
            }
            super::after_step(on_step, i, timesteps.len(), &latents)?;
        }
        let denoise = self.sync_elapsed(t1);

        let t2 = Instant::now();
        let images = self.decode(&latents)?;
        let vae_decode = self.sync_elapsed(t2);
        Ok(BatchOutput {
            images,
            latents: Vec::new(),
            timings: Timings {
                lora_ms: ms(lora),
                text_encode_ms: ms(text_encode),
                denoise_ms: ms(denoise),
                unet_steps: timesteps.len(),
                vae_decode_ms: ms(vae_decode),
                total_ms: ms(started.elapsed()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pil() {
        // Values from PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        let img = RgbImage {
            width: 4,
            height: 1,
            pixels: vec![100, 200, 50, 200, 100, 50, 255, 255, 255, 1, 0, 0],
        };
        assert_eq!(GrayImage::from_rgb(&img).pixels, vec![153, 124, 255, 0]);
    }

    #[test]
    fn masks_binarise_at_half() {
        let m = GrayImage {
            width: 3,
            height: 1,
            pixels: vec![127, 128, 255],
        };
        let t = masks_to_tensor(&[m]).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(),
            vec![0.0, 1.0, 1.0]
        );
    }
}
