//! transformers' `CLIPVisionModel` and `CLIPImageProcessor`, shared by the safety checker
//! ([`super::safety`]) and the CLIP score ([`super::clip_score`]).
//!
//! The tower: a patch embedding (a strided convolution without bias), a learned class token,
//! position embeddings, `pre_layrnorm`, pre-norm encoder layers without a mask, and
//! `post_layernorm` applied to the class token: the pooled output.
//!
//! The processor mirrors what transformers 5.23 actually runs for diffusers and torchmetrics. Without
//! torchvision installed, `CLIPImageProcessor` falls back to its PIL backend: the uint8 image is
//! resized by PIL (`Image.resize`, fixed-point separable convolution on 8-bit data, so the result is
//! rounded to uint8 after each pass), centre-cropped with numpy (zero padding where the crop is larger),
//! then rescaled (`f32(u8 as f64 * rescale_factor)`) and normalised (`(x - mean) / std` in float32).
//! PIL's resampler is re-implemented here step for step (fixed-point weights, uint8 between the
//! passes, Pillow 13's pass order), so the pixel values are the same float32 numbers. A float
//! interpolation is not: torch's bicubic with antialiasing (`upsample_bicubic2d` family) is up to 2
//! levels off (mean 0.14) on a 512→224 SD-like image, ~0.03 after normalisation, and up to 130 levels
//! on high-contrast content where PIL clips its intermediate pass to uint8.
use super::RgbImage;
use super::clip::{Activation, EncoderLayer, activation};
use super::config::read_json;
use super::nn::LayerNorm;
use super::weights::Scope;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The vision half of a transformers `CLIPConfig` (`CLIPVisionConfig`); absent keys take
/// transformers' defaults, as `CLIPVisionConfig(**d)` does.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// The effective vision config of a `CLIPConfig`: checkpoints from the transformers 4.2x era
    /// (SD v1-4's safety checker among them) also carry `vision_config_dict`, and transformers
    /// rebuilds the vision config from it (defaults for every key it lacks), overriding
    /// `vision_config`.
    pub fn from_clip_config(
        vision_config: Option<&ClipVisionConfig>,
        vision_config_dict: Option<&ClipVisionConfig>,
    ) -> ClipVisionConfig {
        vision_config_dict
            .or(vision_config)
            .cloned()
            .unwrap_or_default()
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        activation(&self.hidden_act, path, "vision_config.hidden_act")?;
        if self.num_channels != 3 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: "vision_config.num_channels".into(),
                value: self.num_channels.to_string(),
                reason: "images are RGB: 3".into(),
            });
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid(
                path,
                "vision_config.hidden_size must be a multiple of num_attention_heads",
            ));
        }
        if self.hidden_size <= 0
            || self.intermediate_size <= 0
            || self.patch_size <= 0
            || self.image_size < self.patch_size
        {
            return Err(invalid(
                path,
                "vision_config sizes must be positive, image_size at least patch_size",
            ));
        }
        Ok(())
    }

    /// Patches per side (transformers: `image_size // patch_size`).
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// transformers' `CLIPVisionModel`; `forward` gives the pooled output (`pooler_output`).
pub struct ClipVisionModel {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    heads: i64,
    act: Activation,
    image_size: i64,
    patch_size: i64,
}

impl ClipVisionModel {
    /// `w` is scoped at the tower (`vision_model` in `CLIPModel` and safety-checker files).
    pub fn load(config: &ClipVisionConfig, config_path: &Path, w: &Scope) -> Result<Self> {
        config.validate(config_path)?;
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let p = config.patch_size;
        let positions = config.grid() * config.grid() + 1;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::load(
                    &w.sub(format!("encoder.layers.{i}")),
                    d,
                    config.intermediate_size,
                    eps,
                )
            })
            .collect::<Result<_>>()?;
        let e = w.sub("embeddings");
        Ok(Self {
            patch_embedding: e.get("patch_embedding.weight", &[d, config.num_channels, p, p])?,
            class_embedding: e.get("class_embedding", &[d])?,
            position_embedding: e.get("position_embedding.weight", &[positions, d])?,
            // "layrnorm" is transformers' spelling of the tensor names.
            pre_layrnorm: LayerNorm::load(&w.sub("pre_layrnorm"), d, eps)?,
            layers,
            post_layernorm: LayerNorm::load(&w.sub("post_layernorm"), d, eps)?,
            heads: config.num_attention_heads,
            act: activation(&config.hidden_act, config_path, "hidden_act")?,
            image_size: config.image_size,
            patch_size: p,
        })
    }

    pub fn hidden_size(&self) -> i64 {
        self.class_embedding.size()[0]
    }

    /// The input side length the position embeddings were trained for.
    pub fn image_size(&self) -> i64 {
        self.image_size
    }

    /// `pixel_values`: `[batch, 3, image_size, image_size]` (any float dtype, any device; converted
    /// to the weights') → pooled output `[batch, hidden]`: `post_layernorm` of the class token.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.size4()?;
        // transformers refuses other sizes unless asked to interpolate the position embeddings,
        // which no pipeline here does.
        if h != self.image_size || w != self.image_size {
            return Err(Error::InvalidArgument(format!(
                "input image size ({h}*{w}) doesn't match the vision model ({0}*{0})",
                self.image_size
            )));
        }
        let x = pixel_values
            .f_to_device(self.patch_embedding.device())?
            .f_to_kind(self.patch_embedding.kind())?;
        let p = self.patch_size;
        let patches = x
            .f_conv2d::<Tensor>(&self.patch_embedding, None, [p, p], [0, 0], [1, 1], 1)?
            .f_flatten(2, -1)?
            .f_transpose(1, 2)?;
        let d = self.hidden_size();
        let class = self
            .class_embedding
            .f_view([1, 1, d])?
            .f_expand([b, 1, d], false)?;
        let mut xs = Tensor::f_cat(&[&class, &patches], 1)?
            .f_add(&self.position_embedding.f_unsqueeze(0)?)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            // Every patch attends to every other: no mask (unlike the text tower).
            xs = layer.forward(&xs, self.heads, false, self.act)?;
        }
        self.post_layernorm.forward(&xs.f_select(1, 0)?)
    }
}

// ---------------------------------------------------------------------------------------------
// CLIPImageProcessor
// ---------------------------------------------------------------------------------------------

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `size` / `crop_size`: an int (the legacy `CLIPFeatureExtractor` files, SD v1-4's included) or a
/// dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Int(i64),
    Dict {
        #[serde(default)]
        shortest_edge: Option<i64>,
        #[serde(default)]
        longest_edge: Option<i64>,
        #[serde(default)]
        height: Option<i64>,
        #[serde(default)]
        width: Option<i64>,
    },
}

/// One value for all channels, or one per channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerChannel {
    One(f64),
    Many(Vec<f64>),
}

/// `preprocessor_config.json` (transformers `CLIPImageProcessor`); absent keys take the class
/// defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    /// PIL's `Image.Resampling` number: 2 bilinear, 3 bicubic (CLIP's).
    #[serde(default = "bicubic")]
    pub resample: i64,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    #[serde(default = "default_size")]
    pub crop_size: SizeSpec,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "default_mean")]
    pub image_mean: PerChannel,
    #[serde(default = "default_std")]
    pub image_std: PerChannel,
}

fn yes() -> bool {
    true
}
fn default_size() -> SizeSpec {
    SizeSpec::Int(224)
}
fn bicubic() -> i64 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> PerChannel {
    PerChannel::Many(OPENAI_CLIP_MEAN.to_vec())
}
fn default_std() -> PerChannel {
    PerChannel::Many(OPENAI_CLIP_STD.to_vec())
}

/// PIL's resampling filters (`Resample.c`) that CLIP processors are configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    /// The filter kernels exactly as `Resample.c` writes them (same operations, same order, so
    /// the same doubles).
    fn kernel(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Resample::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResizeTo {
    /// Shorter side to this, the longer one scaled (truncated), as
    /// `get_resize_output_image_size(default_to_square=False)`.
    ShortestEdge(usize),
    Exact {
        height: usize,
        width: usize,
    },
}

/// A validated `CLIPImageProcessor`.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    resize: Option<(ResizeTo, Resample)>,
    crop: Option<(usize, usize)>,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
    path: PathBuf,
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: ClipImageProcessorConfig = read_json(path)?;
        Self::new(&config, path)
    }

    /// Validates `config`; `path` names the file in errors.
    pub fn new(config: &ClipImageProcessorConfig, path: &Path) -> Result<Self> {
        let positive = |v: i64, key: &str| -> Result<usize> {
            if v > 0 {
                Ok(v as usize)
            } else {
                Err(invalid(path, format!("`{key}` must be positive, got {v}")))
            }
        };
        let resize = if config.do_resize {
            let to = match &config.size {
                SizeSpec::Int(n) => ResizeTo::ShortestEdge(positive(*n, "size")?),
                SizeSpec::Dict {
                    shortest_edge: Some(n),
                    longest_edge: None,
                    ..
                } => ResizeTo::ShortestEdge(positive(*n, "size.shortest_edge")?),
                SizeSpec::Dict {
                    shortest_edge: None,
                    longest_edge: None,
                    height: Some(h),
                    width: Some(w),
                } => ResizeTo::Exact {
                    height: positive(*h, "size.height")?,
                    width: positive(*w, "size.width")?,
                },
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "size".into(),
                        value: format!("{other:?}"),
                        reason: "an int, {shortest_edge} or {height, width}".into(),
                    });
                }
            };
            let filter = match config.resample {
                2 => Resample::Bilinear,
                3 => Resample::Bicubic,
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "resample".into(),
                        value: other.to_string(),
                        reason: "2 (bilinear) or 3 (bicubic)".into(),
                    });
                }
            };
            Some((to, filter))
        } else {
            None
        };
        let crop = if config.do_center_crop {
            Some(match &config.crop_size {
                SizeSpec::Int(n) => (positive(*n, "crop_size")?, positive(*n, "crop_size")?),
                SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                } => (
                    positive(*h, "crop_size.height")?,
                    positive(*w, "crop_size.width")?,
                ),
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "crop_size".into(),
                        value: format!("{other:?}"),
                        reason: "an int or {height, width}".into(),
                    });
                }
            })
        } else {
            None
        };
        let three = |v: &PerChannel, key: &str| -> Result<[f32; 3]> {
            let values = match v {
                PerChannel::One(x) => vec![*x; 3],
                PerChannel::Many(xs) => xs.clone(),
            };
            match values.as_slice() {
                // numpy builds the mean/std arrays in the image's dtype, float32.
                [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
                _ => Err(invalid(
                    path,
                    format!("`{key}` needs 3 values, got {}", values.len()),
                )),
            }
        };
        let normalize = if config.do_normalize {
            let mean = three(&config.image_mean, "image_mean")?;
            let std = three(&config.image_std, "image_std")?;
            if std.contains(&0.0) {
                return Err(invalid(path, "`image_std` has a zero"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale: config.do_rescale.then_some(config.rescale_factor),
            normalize,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(height, width)` of every output when it does not depend on the input (a centre crop, or
    /// an exact resize), else `None`.
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some((ResizeTo::Exact { height, width }, _))) => Some((height, width)),
            _ => None,
        }
    }

    /// Checks that the processor feeds a tower of `image_size` (an error naming the file otherwise).
    pub fn check_output_size(&self, image_size: i64) -> Result<()> {
        let n = image_size as usize;
        match self.fixed_output_size() {
            Some((h, w)) if h == n && w == n => Ok(()),
            other => Err(invalid(
                &self.path,
                format!(
                    "the processor outputs {other:?} (height, width), the vision model takes {n}x{n}"
                ),
            )),
        }
    }

    /// RGB8 images → `pixel_values` `[n, 3, h, w]` (float32, CPU), as `CLIPImageProcessor(images,
    /// return_tensors="pt")` on the same images as PIL RGB images.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(Error::InvalidArgument("no images to preprocess".into()));
        }
        let mut data = Vec::new();
        let mut shape = None;
        for (i, image) in images.iter().enumerate() {
            let (values, h, w) = self.preprocess_one(image)?;
            if *shape.get_or_insert((h, w)) != (h, w) {
                return Err(Error::InvalidArgument(format!(
                    "image {i} preprocesses to {h}x{w}, image 0 to {:?}: a batch needs one size",
                    shape.unwrap()
                )));
            }
            data.extend(values);
        }
        let (h, w) = shape.unwrap();
        Ok(Tensor::from_slice(&data)
            .f_view([images.len() as i64, 3, h as i64, w as i64])?
            .f_to_device(Device::Cpu)?)
    }

    /// One image → (CHW float32 values, height, width).
    fn preprocess_one(&self, image: &RgbImage) -> Result<(Vec<f32>, usize, usize)> {
        let (w, h) = (image.width as usize, image.height as usize);
        if w == 0 || h == 0 || image.pixels.len() != w * h * 3 {
            return Err(Error::InvalidArgument(format!(
                "image of {w}x{h} pixels has {} bytes, expected {}",
                image.pixels.len(),
                w * h * 3
            )));
        }
        let (pixels, h, w) = match self.resize {
            Some((to, filter)) => {
                let (oh, ow) = match to {
                    ResizeTo::ShortestEdge(size) => shortest_edge_size(h, w, size),
                    ResizeTo::Exact { height, width } => (height, width),
                };
                (pil_resize(&image.pixels, h, w, oh, ow, filter), oh, ow)
            }
            None => (image.pixels.clone(), h, w),
        };
        let (ch, cw) = self.crop.unwrap_or((h, w));
        // numpy's centre crop: top = (h - crop_h) // 2 (floor), zeros where the crop leaves the
        // image (the padded case works out to the same offsets).
        let top = (h as i64 - ch as i64).div_euclid(2);
        let left = (w as i64 - cw as i64).div_euclid(2);
        let mut out = vec![0f32; 3 * ch * cw];
        for c in 0..3 {
            for y in 0..ch {
                for x in 0..cw {
                    let (sy, sx) = (y as i64 + top, x as i64 + left);
                    let v = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        pixels[(sy as usize * w + sx as usize) * 3 + c]
                    } else {
                        0
                    };
                    out[(c * ch + y) * cw + x] = self.to_float(v, c);
                }
            }
        }
        Ok((out, ch, cw))
    }

    /// numpy's `rescale` (float64 product, then float32) and `normalize` (float32 arithmetic).
    fn to_float(&self, v: u8, c: usize) -> f32 {
        let x = match self.rescale {
            Some(scale) => (v as f64 * scale) as f32,
            None => v as f32,
        };
        match self.normalize {
            Some((mean, std)) => (x - mean[c]) / std[c],
            None => x,
        }
    }
}

/// transformers' `get_resize_output_image_size(size, default_to_square=False)`: `(height, width)`.
fn shortest_edge_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Python: int(size * long / short), a true (float) division truncated.
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// PIL's fixed-point precision for 8-bit images (`Resample.c`: 32 - 8 - 2 bits).
const PRECISION_BITS: u32 = 22;

/// Per output pixel: first input index, number of taps; and `ksize` fixed-point weights each.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of PIL's `Resample.c`, for the whole axis
/// (`box` = 0..in_size): the filter widens by the scale when shrinking (antialiasing), taps outside
/// the image are dropped and the rest renormalised.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Coefficients {
    // PIL passes the box edges as C floats; whole pixel counts are exact there.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let taps = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(taps) {
            let w = filter.kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(taps) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin as usize, taps));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

/// PIL's `clip8`: the fixed-point sum back to a byte (arithmetic shift, i.e. floor, then clamp).
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((ow, oh), resample)` of an RGB8 image: two separable passes, each rounding to
/// uint8, so their order matters. Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass
/// first when the height shrinks by more than twice as many pixels as the width does, else the
/// horizontal one (checked against Pillow 13.0 on random sizes, near-ties included). An axis
/// whose size does not change is not resampled at all.
fn pil_resize(src: &[u8], h: usize, w: usize, oh: usize, ow: usize, filter: Resample) -> Vec<u8> {
    let vertical_first = oh < h && (h as i64 - oh as i64) > 2 * (w as i64 - ow as i64);
    let mut img = src.to_vec();
    if vertical_first {
        if oh != h {
            img = resample_vertical(&img, h, w, oh, filter);
        }
        if ow != w {
            img = resample_horizontal(&img, oh, w, ow, filter);
        }
    } else {
        if ow != w {
            img = resample_horizontal(&img, h, w, ow, filter);
        }
        if oh != h {
            img = resample_vertical(&img, h, ow, oh, filter);
        }
    }
    img
}

/// Sums stay below 2^31: 255 × Σ|weights| < 2^8 × 1.25 × 2^22 (the "two extra bits" of PIL).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `ImagingResampleHorizontal_8bpc`: `[h, w, 3]` → `[h, ow, 3]`.
fn resample_horizontal(src: &[u8], h: usize, w: usize, ow: usize, filter: Resample) -> Vec<u8> {
    let c = coefficients(w, ow, filter);
    let mut out = vec![0u8; h * ow * 3];
    for y in 0..h {
        for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + taps];
            for ch in 0..3 {
                let mut ss = HALF;
                for (x, kx) in k.iter().enumerate() {
                    ss += src[(y * w + xmin + x) * 3 + ch] as i32 * kx;
                }
                out[(y * ow + xx) * 3 + ch] = clip8(ss);
            }
        }
    }
    out
}

/// `ImagingResampleVertical_8bpc`: `[h, w, 3]` → `[oh, w, 3]`.
fn resample_vertical(src: &[u8], h: usize, w: usize, oh: usize, filter: Resample) -> Vec<u8> {
    let c = coefficients(h, oh, filter);
    let mut out = vec![0u8; oh * w * 3];
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + taps];
        for x in 0..w {
            for ch in 0..3 {
                let mut ss = HALF;
                for (y, ky) in k.iter().enumerate() {
                    ss += src[((ymin + y) * w + x) * 3 + ch] as i32 * ky;
                }
                out[(yy * w + x) * 3 + ch] = clip8(ss);
            }
        }
    }
    out
}

/// `x / max(‖x‖₂, 1e-12)` along the last dimension (`torch.nn.functional.normalize`), float32.
pub(crate) fn normalize_rows(xs: &Tensor) -> Result<Tensor> {
    let xs = xs.f_to_kind(Kind::Float)?;
    let norm = xs
        .f_norm_scalaropt_dim(2, [-1].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(xs.f_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_aspect_truncating() {
        assert_eq!(shortest_edge_size(512, 512, 224), (224, 224));
        assert_eq!(shortest_edge_size(512, 768, 224), (224, 336));
        // 224 * 700 / 500 = 313.6 -> 313
        assert_eq!(shortest_edge_size(700, 500, 224), (313, 224));
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(64, 32), (512, 224), (24, 56), (7, 3)] {
            for f in [Resample::Bilinear, Resample::Bicubic] {
                let c = coefficients(i, o, f);
                for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
                    assert!(xmin + taps <= i);
                    let sum: i64 = c.weights[xx * c.ksize..xx * c.ksize + taps]
                        .iter()
                        .map(|&k| k as i64)
                        .sum();
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= taps as i64, "{sum}");
                }
            }
        }
    }

    #[test]
    fn resize_of_a_constant_image_is_constant() {
        let src = vec![77u8; 10 * 6 * 3];
        let out = pil_resize(&src, 10, 6, 23, 4, Resample::Bicubic);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn legacy_int_sizes_parse() {
        let cfg: ClipImageProcessorConfig = serde_json::from_value(serde_json::json!({
            "crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]
        }))
        .unwrap();
        let p = ClipImageProcessor::new(&cfg, Path::new("p.json")).unwrap();
        assert_eq!(p.fixed_output_size(), Some((224, 224)));
        p.check_output_size(224).unwrap();
        assert!(p.check_output_size(32).is_err());
    }

    #[test]
    fn unsupported_resample_is_named() {
        let cfg: ClipImageProcessorConfig =
            serde_json::from_value(serde_json::json!({"resample": 1})).unwrap();
        let err = ClipImageProcessor::new(&cfg, Path::new("fe/preprocessor_config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fe/preprocessor_config.json") && err.contains("resample"),
            "{err}"
        );
    }
}
