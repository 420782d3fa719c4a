//! The few PIL image operations diffusers' inpainting preprocessing relies on, reproduced byte
//! for byte (Pillow's `src/libImaging`): Lanczos resampling (`Resample.c`, with a source box),
//! pasting through an `L` mask (`Paste.c`), premultiplied-alpha conversions (`Convert.c`) and
//! alpha compositing (`AlphaComposite.c`). Images are row-major interleaved 8-bit channels.
//!
//! They exist so that `padding_mask_crop` (crop, resize to the model's size, paste back) gives
//! diffusers' pixels, which go through the VAE: an approximate resampler would move latents
//! far past the references' tolerance.
use crate::error::{Error, Result};

/// Fixed-point bits of the resampling coefficients (`Resample.c`: 32 bits less 8 for the
/// pixel and 2 for the overshoot of negative lobes).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Lanczos' support (a = 3).
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One output pixel's taps: the first input index and its fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc`: for each of `out_size` outputs, the input
/// pixels of `in0..in1` (a float box in input coordinates) under a Lanczos window stretched by
/// the downscale factor, normalised in double, then rounded to fixed point (away from zero).
fn coefficients(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Vec<Taps> {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let inv_filterscale = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, then clamps.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let count = (xmax - xmin as i64).max(0) as usize;
            let mut k: Vec<f64> = (0..count)
                .map(|x| lanczos(((x + xmin) as f64 - center + 0.5) * inv_filterscale))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                for w in &mut k {
                    *w /= ww;
                }
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// `clip8`: the fixed-point sum back to a byte (arithmetic shift, clamped).
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit image: `channels` interleaved per pixel (1: L, 3: RGB, 4: RGBA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl Image8 {
    pub fn new(width: usize, height: usize, channels: usize, pixels: Vec<u8>) -> Result<Self> {
        if pixels.len() != width * height * channels {
            return Err(Error::InvalidArgument(format!(
                "{} bytes for a {width}x{height} image of {channels} channels",
                pixels.len()
            )));
        }
        Ok(Self {
            width,
            height,
            channels,
            pixels,
        })
    }

    /// All zeros (PIL's `Image.new(mode, size)`).
    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Self {
            width,
            height,
            channels,
            pixels: vec![0; width * height * channels],
        }
    }

    /// `image.crop((x0, y0, x1, y1))` within the image.
    pub fn crop(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> Result<Self> {
        if x0 > x1 || y0 > y1 || x1 > self.width || y1 > self.height {
            return Err(Error::InvalidArgument(format!(
                "crop ({x0}, {y0}, {x1}, {y1}) is not inside a {}x{} image",
                self.width, self.height
            )));
        }
        let c = self.channels;
        let mut pixels = Vec::with_capacity((x1 - x0) * (y1 - y0) * c);
        for y in y0..y1 {
            let row = (y * self.width) * c;
            pixels.extend_from_slice(&self.pixels[row + x0 * c..row + x1 * c]);
        }
        Ok(Self {
            width: x1 - x0,
            height: y1 - y0,
            channels: c,
            pixels,
        })
    }

    /// `Image.resize((width, height), LANCZOS, box)`: PIL's two-pass fixed-point resampling
    /// (horizontal first, on only the rows the vertical pass reads). `box` (x0, y0, x1, y1) is
    /// the source region in input pixels, default the whole image; it may be empty in one
    /// direction (diffusers' fill strips stretch a zero-height row band).
    pub fn resize(&self, width: usize, height: usize, source: Option<[f32; 4]>) -> Result<Self> {
        let whole = [0.0, 0.0, self.width as f32, self.height as f32];
        let b = source.unwrap_or(whole);
        if width == 0 || height == 0 || self.width == 0 || self.height == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot resize a {}x{} image to {width}x{height}",
                self.width, self.height
            )));
        }
        if !b.iter().all(|v| v.is_finite())
            || b[0] < 0.0
            || b[1] < 0.0
            || b[2] > self.width as f32
            || b[3] > self.height as f32
            || b[2] < b[0]
            || b[3] < b[1]
        {
            return Err(Error::InvalidArgument(format!(
                "resize box {b:?} is not inside a {}x{} image",
                self.width, self.height
            )));
        }
        // PIL: a straight copy when nothing changes.
        if (width, height) == (self.width, self.height) && b == whole {
            return Ok(self.clone());
        }
        let c = self.channels;
        let need_horizontal = width != self.width || b[0] != 0.0 || b[2] != width as f32;
        let need_vertical = height != self.height || b[1] != 0.0 || b[3] != height as f32;
        let vert = coefficients(self.height, b[1], b[3], height);
        // The rows the vertical pass reads: the horizontal pass runs on those only.
        let first_row = vert.first().map_or(0, |t| t.first);
        let last_row = vert.last().map_or(0, |t| t.first + t.weights.len());
        let mut img = self.clone();
        let mut row_offset = 0;
        if need_horizontal {
            let horiz = coefficients(self.width, b[0], b[2], width);
            let rows = last_row.saturating_sub(first_row);
            let mut out = vec![0u8; width * rows * c];
            for y in 0..rows {
                let line = &self.pixels[(y + first_row) * self.width * c..][..self.width * c];
                for (xx, taps) in horiz.iter().enumerate() {
                    for ch in 0..c {
                        let mut sum = 1i32 << (PRECISION_BITS - 1);
                        for (x, &w) in taps.weights.iter().enumerate() {
                            sum = sum.wrapping_add(
                                i32::from(line[(x + taps.first) * c + ch]).wrapping_mul(w),
                            );
                        }
                        out[(y * width + xx) * c + ch] = clip8(sum);
                    }
                }
            }
            img = Self {
                width,
                height: rows,
                channels: c,
                pixels: out,
            };
            row_offset = first_row;
        }
        if need_vertical {
            let w = img.width;
            let mut out = vec![0u8; w * height * c];
            for (yy, taps) in vert.iter().enumerate() {
                let first = taps.first - row_offset;
                for x in 0..w * c {
                    let mut sum = 1i32 << (PRECISION_BITS - 1);
                    for (y, &k) in taps.weights.iter().enumerate() {
                        sum = sum.wrapping_add(
                            i32::from(img.pixels[(y + first) * w * c + x]).wrapping_mul(k),
                        );
                    }
                    out[yy * w * c + x] = clip8(sum);
                }
            }
            img = Self {
                width: w,
                height,
                channels: c,
                pixels: out,
            };
        }
        Ok(img)
    }

    /// `self.paste(other, (x, y))` of an image with as many channels, clipped to `self`.
    pub fn paste(&mut self, other: &Self, x: i64, y: i64) {
        let c = self.channels;
        debug_assert_eq!(c, other.channels);
        for oy in 0..other.height {
            let ty = y + oy as i64;
            if ty < 0 || ty >= self.height as i64 {
                continue;
            }
            for ox in 0..other.width {
                let tx = x + ox as i64;
                if tx < 0 || tx >= self.width as i64 {
                    continue;
                }
                let to = (ty as usize * self.width + tx as usize) * c;
                let from = (oy * other.width + ox) * c;
                self.pixels[to..to + c].copy_from_slice(&other.pixels[from..from + c]);
            }
        }
    }
}

/// PIL's `DIV255`: `a / 255` rounded, in shifts.
fn div255(a: u32) -> u32 {
    let t = a + 128;
    ((t >> 8) + t) >> 8
}

/// diffusers' `apply_overlay(mask, init_image, image, crop)` with PIL's arithmetic: `image`
/// (the inpainted crop, RGB) is resized into the crop box (`_resize_and_crop`, centred, black
/// where it does not reach) on a black canvas of the init image's size, then the init image is
/// laid over it with alpha = 255 − mask (premultiplied through PIL's `RGBa`, unpremultiplied,
/// then alpha-composited): white mask shows the inpainting, black keeps the original, grey
/// levels blend.
pub fn overlay(mask: &Image8, init: &Image8, image: &Image8, crop: [usize; 4]) -> Result<Image8> {
    let (w, h) = (init.width, init.height);
    if init.channels != 3 || image.channels != 3 || mask.channels != 1 {
        return Err(Error::InvalidArgument(
            "overlay takes an RGB init image, an RGB image and an L mask".into(),
        ));
    }
    if (mask.width, mask.height) != (w, h) {
        return Err(Error::InvalidArgument(format!(
            "the mask is {}x{}, the init image {w}x{h}",
            mask.width, mask.height
        )));
    }
    let [x0, y0, x1, y1] = crop;
    // `resize(image, h, w, resize_mode="crop")`: fit the larger side, centre, crop the rest.
    let (cw, ch) = (x1 - x0, y1 - y0);
    if cw == 0 || ch == 0 || x1 > w || y1 > h {
        return Err(Error::InvalidArgument(format!(
            "crop {crop:?} is not a region of a {w}x{h} image"
        )));
    }
    let ratio = cw as f64 / ch as f64;
    let src_ratio = image.width as f64 / image.height as f64;
    let src_w = if ratio > src_ratio {
        cw
    } else {
        image.width * ch / image.height
    };
    let src_h = if ratio <= src_ratio {
        ch
    } else {
        image.height * cw / image.width
    };
    let resized = image.resize(src_w, src_h, None)?;
    let mut fitted = Image8::zeros(cw, ch, 3);
    // Python's floor division of possibly negative offsets.
    let off = |a: usize, b: usize| (a as i64).div_euclid(2) - (b as i64).div_euclid(2);
    fitted.paste(&resized, off(cw, src_w), off(ch, src_h));
    let mut base = Image8::zeros(w, h, 3);
    base.paste(&fitted, x0 as i64, y0 as i64);

    let mut out = base;
    for i in 0..w * h {
        // init.convert("RGBA").convert("RGBa") is the init image itself (alpha 255); pasted
        // onto transparent black through invert(mask): every band blended with 0.
        let a = 255 - u32::from(mask.pixels[i]);
        if a == 0 {
            continue; // alpha_composite keeps the destination where the source is transparent.
        }
        let premultiplied = |v: u8| div255(u32::from(v) * a);
        let src_a = div255(255 * a);
        // RGBa -> RGBA: unpremultiply (truncating), except for alpha 0 and 255.
        let unpremultiply = |v: u32| {
            if src_a == 255 || src_a == 0 {
                v
            } else {
                (255 * v / src_a).min(255)
            }
        };
        let src: [u32; 3] =
            std::array::from_fn(|ch| unpremultiply(premultiplied(init.pixels[i * 3 + ch])));
        if src_a == 0 {
            continue;
        }
        // alpha_composite(dst = the canvas, alpha 255; src): 7 bits of extra precision.
        const BITS: u32 = 7;
        let dst_a = 255u32;
        let blend = dst_a * (255 - src_a);
        let outa255 = src_a * 255 + blend;
        let coef1 = src_a * 255 * 255 * (1 << BITS) / outa255;
        let coef2 = 255 * (1 << BITS) - coef1;
        for (ch, &s) in src.iter().enumerate() {
            let d = u32::from(out.pixels[i * 3 + ch]);
            let t = s * coef1 + d * coef2 + (0x80 << BITS);
            out.pixels[i * 3 + ch] = ((((t >> 8) + t) >> 8) >> BITS) as u8;
        }
    }
    Ok(out)
}
