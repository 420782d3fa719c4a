//! img2img init images: from untrusted bytes to the output-sized RGB image the pipeline takes.
//!
//! The bytes come from a producer (a `data:` URI or an S3 object it named), so decoding is
//! bounded before anything is allocated: only PNG, JPEG and WebP (sniffed from the content, not
//! from a name or media type), at most [`MAX_SIDE`] pixels a side and [`MAX_PIXELS`] in all,
//! checked on the dimensions the header declares (a decompression bomb is refused without
//! decoding it), and the decoder's own allocation capped. The EXIF orientation is applied (a
//! phone photo comes out upright, as a browser shows it), then the image is resized to the output
//! size with Lanczos3 when it differs: the same rule as diffusers' image processor, which
//! resizes to the requested size without keeping the aspect ratio.
use crate::pipeline::RgbImage;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use std::io::Cursor;

/// Widest or tallest init image accepted, as declared by its header.
pub const MAX_SIDE: u32 = 8192;
/// Most pixels of an init image (24 Mpx: a large phone photo), as declared by its header.
pub const MAX_PIXELS: u64 = 24_000_000;
/// The decoder's allocation cap: the RGBA8 buffer of [`MAX_PIXELS`] and some slack.
const MAX_ALLOC: u64 = MAX_PIXELS * 4 + (16 << 20);

/// Why an init image cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitImageError {
    /// Not PNG, JPEG or WebP, or a file of one of them that does not decode (truncated, corrupt).
    #[error("{0}")]
    Unreadable(String),
    /// Larger than the limits.
    #[error("{0}")]
    TooLarge(String),
}

/// Decodes `bytes` (PNG, JPEG or WebP) within the limits, applies its EXIF orientation and
/// resizes it to `width`×`height` (Lanczos3) when its size differs.
pub fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, InitImageError> {
    decode_sized(bytes, width, height).map(|(image, _)| image)
}

/// [`decode`], also returning the image's own size (after its EXIF orientation), so a mask can
/// be checked against its init image.
pub fn decode_sized(
    bytes: &[u8],
    width: u32,
    height: u32,
) -> Result<(RgbImage, (u32, u32)), InitImageError> {
    let unreadable = |e: &dyn std::fmt::Display| InitImageError::Unreadable(bound(e));
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| unreadable(&e))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(InitImageError::Unreadable(format!(
                "{other:?} is not accepted: PNG, JPEG or WebP only"
            )));
        }
        None => {
            return Err(InitImageError::Unreadable(
                "not a PNG, JPEG or WebP image".into(),
            ));
        }
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    let mut reader = reader;
    reader.limits(limits);
    // Reads the header only: the declared size is checked before the pixels are decoded.
    let mut decoder = reader.into_decoder().map_err(|e| classify(&e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(InitImageError::Unreadable(format!("{w}x{h} has no pixels")));
    }
    if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(too_large(w, h));
    }
    let orientation = decoder.orientation().map_err(|e| classify(&e))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| classify(&e))?;
    image.apply_orientation(orientation);
    let own_size = (image.width(), image.height());
    let rgb = if own_size == (width, height) {
        image.into_rgb8()
    } else {
        image::imageops::resize(
            &image.into_rgb8(),
            width,
            height,
            image::imageops::FilterType::Lanczos3,
        )
    };
    Ok((
        RgbImage {
            width,
            height,
            pixels: rgb.into_raw(),
        },
        own_size,
    ))
}

fn too_large(w: u32, h: u32) -> InitImageError {
    InitImageError::TooLarge(format!(
        "the image is {w}x{h}, limit {MAX_SIDE} a side and {MAX_PIXELS} pixels"
    ))
}

/// The decoder's own limit errors are "too large"; everything else is "unreadable".
fn classify(e: &image::ImageError) -> InitImageError {
    match e {
        image::ImageError::Limits(_) => InitImageError::TooLarge(bound(e)),
        _ => InitImageError::Unreadable(bound(e)),
    }
}

/// Decoder messages can quote file content: cut them.
fn bound(e: &dyn std::fmt::Display) -> String {
    crate::bounded::cut(&e.to_string(), 256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb};

    fn png(img: &image::RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
    }

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 7])
        })
    }

    #[test]
    fn same_size_is_taken_as_is_and_other_sizes_are_resized() {
        let img = gradient(16, 8);
        let out = decode(&png(&img), 16, 8).unwrap();
        assert_eq!(out.pixels, img.as_raw().clone());
        let out = decode(&png(&img), 32, 32).unwrap();
        assert_eq!(
            (out.width, out.height, out.pixels.len()),
            (32, 32, 32 * 32 * 3)
        );
    }

    #[test]
    fn jpeg_and_webp_are_read() {
        let img = gradient(16, 16);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .write_image(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode(&jpeg, 16, 16).unwrap().width, 16);
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode(&webp, 16, 16).unwrap().pixels, img.as_raw().clone());
    }

    #[test]
    fn other_formats_and_garbage_are_unreadable() {
        // A BMP header (the format is known to `image` but not accepted here).
        let bmp = b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0";
        assert!(matches!(
            decode(bmp, 8, 8),
            Err(InitImageError::Unreadable(_))
        ));
        assert!(matches!(
            decode(b"not an image at all", 8, 8),
            Err(InitImageError::Unreadable(_))
        ));
        assert!(matches!(
            decode(b"", 8, 8),
            Err(InitImageError::Unreadable(_))
        ));
    }

    #[test]
    fn truncated_files_are_unreadable() {
        let bytes = png(&gradient(64, 64));
        for cut in [8, 40, bytes.len() / 2, bytes.len() - 13] {
            assert!(
                matches!(
                    decode(&bytes[..cut], 64, 64),
                    Err(InitImageError::Unreadable(_))
                ),
                "cut at {cut}"
            );
        }
    }

    /// A PNG whose header declares `w`×`h` and whose data is a stub: what a decompression bomb
    /// looks like before it is inflated.
    fn declared_png(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut c = Vec::new();
            c.extend_from_slice(&(data.len() as u32).to_be_bytes());
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            let mut crc = crc32(kind, data);
            crc = crc.to_be();
            c.extend_from_slice(&crc.to_ne_bytes());
            c
        };
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend(chunk(b"IHDR", &ihdr));
        out.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        out.extend(chunk(b"IEND", &[]));
        out
    }

    fn crc32(kind: &[u8], data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in kind.iter().chain(data) {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn huge_declared_dimensions_are_refused_before_decoding() {
        // 60000² RGB would be 10 GiB; 8192x4096 is within the side limit, over the pixel limit.
        for (w, h) in [(60_000, 60_000), (MAX_SIDE + 8, 16), (8192, 4096)] {
            assert!(
                matches!(
                    decode(&declared_png(w, h), 8, 8),
                    Err(InitImageError::TooLarge(_))
                ),
                "{w}x{h}"
            );
        }
        // The same stub at a small size is merely truncated data.
        assert!(matches!(
            decode(&declared_png(64, 64), 8, 8),
            Err(InitImageError::Unreadable(_))
        ));
    }

    /// A JPEG with an EXIF APP1 segment whose orientation tag is `orientation`.
    fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        // TIFF, big-endian, one IFD with one entry: Orientation (0x0112), SHORT, 1 value.
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 32 wide, 16 tall: left half red, right half blue.
        let img = image::RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let upright = decode(&jpeg_with_orientation(&img, 1), 32, 16).unwrap();
        let px = |o: &RgbImage, x: u32, y: u32| {
            let i = ((y * o.width + x) * 3) as usize;
            [o.pixels[i], o.pixels[i + 1], o.pixels[i + 2]]
        };
        assert!(px(&upright, 2, 8)[0] > 200 && px(&upright, 29, 8)[2] > 200);
        // 6: the camera was turned 90° clockwise: shown rotated 90° clockwise, 16 wide and 32
        // tall, red (the stored left) on top. Decoded at its displayed size, so not resized.
        let rotated = decode(&jpeg_with_orientation(&img, 6), 16, 32).unwrap();
        assert!(px(&rotated, 8, 2)[0] > 200, "{:?}", px(&rotated, 8, 2));
        assert!(px(&rotated, 8, 29)[2] > 200, "{:?}", px(&rotated, 8, 29));
    }
}
