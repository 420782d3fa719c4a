//! Writing generated images: a PNG and a JSON sidecar with everything needed to reproduce it.
use crate::error::{Error, Result};
use crate::pipeline::{RgbImage, Timings};
use serde::Serialize;
use std::path::Path;

/// What the sidecar records for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Sidecar<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: i64,
    pub height: i64,
    pub scheduler: &'a str,
    /// Clip skip when other than 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<usize>,
    /// Guidance rescale when used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// The prompt syntax when not `plain`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_syntax: Option<&'a str>,
    /// The LoRAs fused, when any.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub loras: &'a [crate::pipeline::adapters::LoraWeight],
    pub model: &'a str,
    pub device: &'a str,
    pub dtype: &'a str,
    /// Timings of the batch the image was made in.
    pub batch_size: usize,
    pub timings: &'a Timings,
    /// Safety checker verdict (absent when it did not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nsfw: Option<bool>,
    /// flag, blank or drop: what was done with a flagged image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safety_action: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_clip_score: Option<bool>,
}

/// Encodes `image` as PNG bytes.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut out);
    image::ImageEncoder::write_image(
        encoder,
        &image.pixels,
        image.width,
        image.height,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::InvalidArgument(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Writes `dir/{stem}.png` (unless `image` is `None`: a dropped image) and `dir/{stem}.json`.
pub fn write_image(
    dir: &Path,
    stem: &str,
    image: Option<&RgbImage>,
    sidecar: &Sidecar,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    if let Some(image) = image {
        let png = dir.join(format!("{stem}.png"));
        std::fs::write(&png, encode_png(image)?).map_err(io(&png))?;
    }
    let json = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(sidecar).map_err(|source| Error::Json {
        path: json.clone(),
        source,
    })?;
    std::fs::write(&json, text).map_err(io(&json))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips() {
        let img = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![255, 0, 0, 0, 255, 0],
        };
        let bytes = encode_png(&img).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), &img.pixels);
    }
}
