//! Mask preprocessing as diffusers offers it for inpainting.
//!
//! **Mask blur** (`VaeImageProcessor.blur(mask, blur_factor)`, AUTOMATIC1111's "Mask blur"):
//! PIL's `ImageFilter.GaussianBlur(radius)` on the mask. PIL does not convolve with a sampled
//! Gaussian: it runs three *extended box blurs* (Gwosdek et al., "Theoretical foundations of
//! Gaussian convolution by extended box filtering", 2011) horizontally, then three vertically, in
//! 8.24 fixed point. [`gaussian_blur`] is a port of that code (Pillow's
//! `src/libImaging/BoxBlur.c`), with the same float32 box radius, the same integer weights, the
//! same edge handling (the edge pixels repeat) and the same rounding, so it gives PIL's bytes,
//! not merely a Gaussian blur.
//!
//! diffusers then binarises the mask at 50 % (its mask processor's `do_binarize`), so a blur
//! moves the boundary between repainted and kept pixels (rounding corners, closing thin gaps);
//! the model never sees grey levels.
use crate::error::{Error, Result};

/// Passes of PIL's `GaussianBlur` (`_imaging.c`'s `gaussian_blur` default, never overridden by
/// `ImageFilter.GaussianBlur`).
const PASSES: i32 = 3;

/// Largest mask blur radius accepted: AUTOMATIC1111's "Mask blur" slider goes to 64, and a
/// larger one blurs a 512 px mask into a uniform grey that binarises to all or nothing.
pub const MAX_MASK_BLUR: f64 = 64.0;

/// Largest radius [`gaussian_blur`] takes.
const MAX_RADIUS: f32 = 10_000.0;

/// Checks a mask blur radius: finite, in `0..=`[`MAX_MASK_BLUR`] (0 = none).
pub fn check_mask_blur(radius: f64) -> std::result::Result<(), String> {
    if radius.is_finite() && (0.0..=MAX_MASK_BLUR).contains(&radius) {
        Ok(())
    } else {
        Err(format!(
            "mask blur {radius} must be a number in 0..={MAX_MASK_BLUR}"
        ))
    }
}

/// PIL's `_gaussian_blur_radius`: the (fractional) radius of the extended box whose `PASSES`
/// repetitions have the variance of a Gaussian of standard deviation `radius`. The arithmetic
/// is C's: float32, except `sqrt` and `floor`, which C computes in double.
fn box_radius(radius: f32) -> f32 {
    let sigma2 = radius * radius / PASSES as f32;
    // [7] Box length.
    let length = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    // [11] Integer part of the box radius (an integer: exact in f32).
    let l = ((f64::from(length) - 1.0) / 2.0).floor() as f32;
    // [14] Fractional part: the weight of the two pixels just outside the integer box.
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One extended box blur along a line (`ImagingLineBoxBlur8`): each output pixel is the mean
/// of the `2r + 1` pixels around it plus the two next ones weighted by the fractional part, in
/// 8.24 fixed point (`ww` per inner pixel, `fw` per outer one; they sum to 2²⁴); pixels past
/// either end repeat the end pixel. The accumulator arithmetic wraps as C's `UINT32` does: the
/// differences it adds may be negative, the running sum never is.
fn blur_line(out: &mut [u8], line: &[u8], radius: usize, ww: u32, fw: u32) {
    let n = line.len();
    let last = n - 1;
    let edge_a = (radius + 1).min(n);
    let edge_b = n.saturating_sub(radius + 1);
    let px = |i: usize| u32::from(line[i]);
    // The sum for pixel -1 (outside the image): the first pixel repeated radius + 1 times for
    // -radius-1..=-1, then 0..radius, the last pixel standing in for those past the end.
    let mut acc = px(0) * (radius as u32 + 1);
    for x in 0..edge_a - 1 {
        acc = acc.wrapping_add(px(x));
    }
    acc = acc.wrapping_add(px(last) * (radius + 1 - edge_a) as u32);
    let mut step = |x: usize, subtract: usize, add: usize, left: usize, right: usize| {
        acc = acc.wrapping_add(px(add)).wrapping_sub(px(subtract));
        let bulk = acc
            .wrapping_mul(ww)
            .wrapping_add((px(left) + px(right)).wrapping_mul(fw));
        // Round to nearest; C's cast to UINT8 keeps the low byte (the value fits).
        out[x] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
    };
    if edge_a <= edge_b {
        for x in 0..edge_a {
            step(x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_a..edge_b {
            step(
                x,
                x - radius - 1,
                x + radius,
                x - radius - 1,
                x + radius + 1,
            );
        }
        for x in edge_b..=last {
            step(x, x - radius - 1, last, x - radius - 1, last);
        }
    } else {
        // The box is wider than the line: both ends are inside it at once.
        for x in 0..edge_b {
            step(x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_b..edge_a {
            step(x, 0, last, 0, last);
        }
        for x in edge_a..=last {
            step(x, x - radius - 1, last, x - radius - 1, last);
        }
    }
}

/// `passes` extended box blurs of radius `radius` along every row of a `width`-wide image held
/// in `lines` (`ImagingHorizontalBoxBlur`, repeated as `ImagingBoxBlur` does).
fn blur_rows(lines: &mut [u8], width: usize, radius: f32) {
    // As C: the integer part by truncation, the inner weight by float32 division truncated to
    // UINT32, the outer weight what is left of 2²⁴, halved.
    let whole = radius as usize;
    let ww = (16_777_216.0f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = (1u32 << 24).wrapping_sub((whole as u32 * 2 + 1).wrapping_mul(ww)) / 2;
    let mut out = vec![0u8; width];
    for line in lines.chunks_exact_mut(width) {
        for _ in 0..PASSES {
            blur_line(&mut out, line, whole, ww, fw);
            line.copy_from_slice(&out);
        }
    }
}

/// PIL's `image.filter(ImageFilter.GaussianBlur(radius))` on an 8-bit single-channel image
/// (`pixels`, `width` × `height`, row-major): PIL's bytes exactly. `radius` is a float32, as
/// PIL's C code takes it. Radius 0 (or one that rounds to 0 in float32) returns the image.
pub fn gaussian_blur(pixels: &[u8], width: usize, height: usize, radius: f32) -> Result<Vec<u8>> {
    // The upper bound keeps the fixed-point sums inside `u32` (C's `int` would overflow, which
    // is undefined there) with room to spare; masks are blurred by at most MAX_MASK_BLUR.
    if !radius.is_finite() || !(0.0..=MAX_RADIUS).contains(&radius) {
        return Err(Error::InvalidArgument(format!(
            "Gaussian blur radius {radius} must be a number in 0..={MAX_RADIUS}"
        )));
    }
    if pixels.len() != width * height {
        return Err(Error::InvalidArgument(format!(
            "{} pixels for a {width}x{height} image",
            pixels.len()
        )));
    }
    let mut out = pixels.to_vec();
    let r = box_radius(radius);
    if width == 0 || height == 0 || r == 0.0 {
        return Ok(out);
    }
    // Horizontal passes, then vertical ones on the transposed image (as PIL, so the rounding
    // after each pass happens in the same order).
    blur_rows(&mut out, width, r);
    let mut transposed = vec![0u8; width * height];
    for y in 0..height {
        for x in 0..width {
            transposed[x * height + y] = out[y * width + x];
        }
    }
    blur_rows(&mut transposed, height, r);
    for x in 0..width {
        for y in 0..height {
            out[y * width + x] = transposed[x * height + y];
        }
    }
    Ok(out)
}

/// Largest `padding_mask_crop` accepted, in pixels: more than any side sdbatch generates
/// (4096), so larger values mean the same as this one.
pub const MAX_PADDING_MASK_CROP: u32 = 4096;

/// diffusers' `VaeImageProcessor.get_crop_region(mask, width, height, pad)`: the bounding box
/// of the mask's non-zero pixels, grown by `pad` on every side (within the mask), then widened
/// or heightened around its centre to the processing aspect `width / height`, shifted back
/// inside the mask where it overflows (and cut where it still does). Returns
/// `[x0, y0, x1, y1]`, end-exclusive. An all-black mask has no region (diffusers divides by
/// zero): an error.
pub fn crop_region(
    mask: &[u8],
    mask_width: usize,
    mask_height: usize,
    width: usize,
    height: usize,
    pad: u32,
) -> Result<[usize; 4]> {
    if mask.len() != mask_width * mask_height || width == 0 || height == 0 {
        return Err(Error::InvalidArgument(format!(
            "crop region of a {mask_width}x{mask_height} mask ({} bytes) for {width}x{height}",
            mask.len()
        )));
    }
    let (w, h) = (mask_width as i64, mask_height as i64);
    let column_set = |x: usize| (0..mask_height).any(|y| mask[y * mask_width + x] != 0);
    let row_set = |y: usize| {
        mask[y * mask_width..(y + 1) * mask_width]
            .iter()
            .any(|&v| v != 0)
    };
    let (Some(left), Some(top)) = (
        (0..mask_width).position(column_set),
        (0..mask_height).position(row_set),
    ) else {
        return Err(Error::InvalidArgument(
            "the mask is all black: nothing to inpaint, so no region to crop".into(),
        ));
    };
    // Both exist once one does.
    let right = (0..mask_width).rev().position(column_set).unwrap_or(0) as i64;
    let bottom = (0..mask_height).rev().position(row_set).unwrap_or(0) as i64;
    let pad = i64::from(pad);
    let (mut x1, mut y1) = ((left as i64 - pad).max(0), (top as i64 - pad).max(0));
    let (mut x2, mut y2) = ((w - right + pad).min(w), (h - bottom + pad).min(h));

    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    // The side that is too short for the processing size's aspect ratio grows.
    if ratio_crop > ratio_processing {
        widen(&mut y1, &mut y2, (x2 - x1) as f64 / ratio_processing, h);
    } else {
        widen(&mut x1, &mut x2, (y2 - y1) as f64 * ratio_processing, w);
    }
    Ok([x1 as usize, y1 as usize, x2 as usize, y2 as usize])
}

/// diffusers' widening of one side of the crop region: `[lo, hi)` grows to `desired` (Python's
/// `int()` truncates the difference, `//` floors its half), then shifts back inside `0..limit`.
fn widen(lo: &mut i64, hi: &mut i64, desired: f64, limit: i64) {
    let diff = (desired - (*hi - *lo) as f64) as i64;
    *lo -= diff.div_euclid(2);
    *hi += diff - diff.div_euclid(2);
    if *hi >= limit {
        let over = *hi - limit;
        *hi -= over;
        *lo -= over;
    }
    if *lo < 0 {
        *hi -= *lo;
        *lo = 0;
    }
    if *hi >= limit {
        *hi = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_extended_boxes_have_the_gaussians_variance() {
        // What PIL's formula solves for: 3 passes of the extended box have variance sigma².
        for sigma in [0.5f32, 1.0, 2.0, 4.0, 7.3, 33.0, 64.0] {
            let r = f64::from(box_radius(sigma));
            let l = r.floor();
            let a = r - l;
            // Variance of one extended box of integer radius l and fractional weight a.
            let var = ((2.0 * l + 1.0) * l * (l + 1.0) / 3.0 + 2.0 * a * (l + 1.0).powi(2))
                / (2.0 * l + 1.0 + 2.0 * a);
            let want = f64::from(sigma).powi(2) / f64::from(PASSES);
            assert!(
                (var - want).abs() < 1e-3 * want.max(1.0),
                "{sigma}: {var} vs {want}"
            );
        }
    }

    #[test]
    fn constant_images_stay_constant_and_zero_is_identity() {
        for (w, h) in [(1, 1), (3, 7), (40, 9)] {
            let img = vec![200u8; w * h];
            for r in [0.5f32, 3.0, 64.0] {
                assert_eq!(gaussian_blur(&img, w, h, r).unwrap(), img, "{w}x{h} r {r}");
            }
        }
        let ramp: Vec<u8> = (0..=255).collect();
        assert_eq!(gaussian_blur(&ramp, 16, 16, 0.0).unwrap(), ramp);
        assert!(gaussian_blur(&ramp, 16, 16, -1.0).is_err());
        assert!(gaussian_blur(&ramp, 16, 16, f32::NAN).is_err());
        assert!(gaussian_blur(&ramp, 16, 16, 1e30).is_err());
        assert!(gaussian_blur(&ramp, 15, 16, 1.0).is_err());
        assert!(gaussian_blur(&[], 0, 0, 2.0).unwrap().is_empty());
    }

    #[test]
    fn a_blurred_edge_is_symmetric_and_monotonic() {
        // A white half-plane: the blur keeps its mass centred on the edge.
        let (w, h) = (64, 4);
        let img: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 32 { 0 } else { 255 })
            .collect();
        let out = gaussian_blur(&img, w, h, 4.0).unwrap();
        let row = &out[..w];
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        for i in 0..32 {
            assert!(
                (i32::from(row[31 - i]) + i32::from(row[32 + i]) - 255).abs() <= 1,
                "{row:?}"
            );
        }
        assert!(row[31] > 0 && row[32] < 255);
    }

    #[test]
    fn mask_blur_bounds() {
        assert!(check_mask_blur(0.0).is_ok());
        assert!(check_mask_blur(7.3).is_ok());
        assert!(check_mask_blur(MAX_MASK_BLUR).is_ok());
        for bad in [-0.5, 64.5, f64::NAN, f64::INFINITY] {
            let err = check_mask_blur(bad).unwrap_err();
            assert!(err.contains("0..=64"), "{err}");
        }
    }
}
