//! diffusers' `StableDiffusionSafetyChecker` (`safety_checker/` + `feature_extractor/` of an SD
//! folder): a CLIP vision tower and projection embed each image; its cosine similarity with 17
//! "concept" and 3 "special care" embeddings, minus per-concept thresholds, decides.
//!
//! The decision is diffusers' `forward` loop, kept in its exact float32 arithmetic:
//!
//! ```text
//! adjustment = 0
//! for each special concept j:  s_j = round(cos_special[j] - special_threshold[j] + adjustment, 3)
//!                              if s_j > 0: special care; adjustment = 0.01   (applies to the
//!                                                                             following j too)
//! for each concept j:          c_j = round(cos[j] - threshold[j] + adjustment, 3)
//! nsfw = any(c_j > 0)
//! ```
//!
//! Blanking a flagged image (diffusers returns a black image) is the caller's policy: see [`blank`].
use super::clip_vision::{ClipImageProcessor, ClipVisionConfig, ClipVisionModel, normalize_rows};
use super::config::read_json;
use super::nn::Linear;
use super::{LoadOptions, RgbImage, load_weights};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Concept embeddings in diffusers' checker (fixed by its `__init__`).
pub const CONCEPTS: i64 = 17;
/// Special-care embeddings in diffusers' checker.
pub const SPECIAL_CONCEPTS: i64 = 3;
/// What a special-care hit adds to every later score of the image.
const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// `safety_checker/config.json`: a transformers `CLIPConfig`; only the vision half and the
/// projection are used (the text half describes a tower the checker does not have).
#[derive(Debug, Clone, Deserialize)]
pub struct SafetyCheckerConfig {
    #[serde(default)]
    pub vision_config: Option<ClipVisionConfig>,
    /// Old checkpoints (SD v1-4's): rebuilds the vision config, see
    /// [`ClipVisionConfig::from_clip_config`].
    #[serde(default)]
    pub vision_config_dict: Option<ClipVisionConfig>,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
}

fn default_projection_dim() -> i64 {
    512
}

/// The checker's verdict on one image, with the scores diffusers computes (rounded to 3 decimals,
/// adjustment included; > 0 means over the threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyResult {
    /// diffusers' `has_nsfw_concept`.
    pub nsfw: bool,
    /// A special-care concept was hit (which lowers every later threshold by 0.01).
    pub special_care: bool,
    /// Indices of the concepts over their threshold.
    pub bad_concepts: Vec<usize>,
    pub concept_scores: Vec<f32>,
    pub special_scores: Vec<f32>,
}

pub struct SafetyChecker {
    processor: ClipImageProcessor,
    vision: ClipVisionModel,
    visual_projection: Linear,
    /// Normalised once, float32, on the model's device.
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_thresholds: Vec<f32>,
    special_thresholds: Vec<f32>,
}

impl SafetyChecker {
    /// Loads `model_dir/safety_checker` (config.json, model.safetensors or model.fp16.safetensors,
    /// chosen like the other components) and `model_dir/feature_extractor/preprocessor_config.json`.
    /// `Ok(None)` when the model has no `safety_checker/` folder; every other problem is an error
    /// naming the file (and tensor or key).
    pub fn load(model_dir: &Path, options: &LoadOptions) -> Result<Option<Self>> {
        let dir = model_dir.join("safety_checker");
        if !dir.is_dir() {
            return Ok(None);
        }
        let _no_grad = tch::no_grad_guard();
        let cfg_path = dir.join("config.json");
        let cfg: SafetyCheckerConfig = read_json(&cfg_path)?;
        let vision_cfg = ClipVisionConfig::from_clip_config(
            cfg.vision_config.as_ref(),
            cfg.vision_config_dict.as_ref(),
        );
        if cfg.projection_dim <= 0 {
            return Err(Error::Config {
                path: cfg_path,
                message: format!(
                    "projection_dim must be positive, got {}",
                    cfg.projection_dim
                ),
            });
        }
        let processor = ClipImageProcessor::load(
            &model_dir.join("feature_extractor/preprocessor_config.json"),
        )?;
        let weights = load_weights(&dir, "model", options)?;
        let w = weights.root();
        // transformers 4 saved the checker's `CLIPVisionModel` with its inner `vision_model` level
        // (`vision_model.vision_model.…`, as in SD v1-4's and v1-5's files); transformers 5 saves
        // `vision_model.…`. transformers 5 loads both; so does this.
        let tower = if w.contains("vision_model.vision_model.embeddings.class_embedding") {
            w.sub("vision_model.vision_model")
        } else {
            w.sub("vision_model")
        };
        let vision = ClipVisionModel::load(&vision_cfg, &cfg_path, &tower)?;
        processor.check_output_size(vision.image_size())?;
        let proj = cfg.projection_dim;
        let visual_projection = Linear::load(
            &w.sub("visual_projection"),
            vision.hidden_size(),
            proj,
            false,
        )?;
        let concept_embeds = normalize_rows(&w.get("concept_embeds", &[CONCEPTS, proj])?)?;
        let special_care_embeds =
            normalize_rows(&w.get("special_care_embeds", &[SPECIAL_CONCEPTS, proj])?)?;
        // The thresholds keep the precision of the weights they were loaded as (diffusers reads
        // them with `.item()` from the model's parameters).
        let thresholds = |name: &str, n: i64| -> Result<Vec<f32>> {
            let t = w
                .get(name, &[n])?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?;
            Ok(Vec::<f32>::try_from(&t)?)
        };
        let concept_thresholds = thresholds("concept_embeds_weights", CONCEPTS)?;
        let special_thresholds = thresholds("special_care_embeds_weights", SPECIAL_CONCEPTS)?;
        weights.finish();
        Ok(Some(Self {
            processor,
            vision,
            visual_projection,
            concept_embeds,
            special_care_embeds,
            concept_thresholds,
            special_thresholds,
        }))
    }

    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    pub fn vision(&self) -> &ClipVisionModel {
        &self.vision
    }

    /// `pixel_values` → image embeddings `[n, projection_dim]` (the model's dtype and device).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        self.visual_projection
            .forward(&self.vision.forward(pixel_values)?)
    }

    /// Cosine similarities of the image embeddings with the special-care and the concept
    /// embeddings: (`[n, 3]`, `[n, 17]`), float32 on the CPU. diffusers computes them in the model
    /// dtype; they are computed in float32 here (the same numbers for a float32 model, closer to them
    /// for a half-precision one).
    pub fn cosine_distances(&self, image_embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        let _no_grad = tch::no_grad_guard();
        let e = normalize_rows(image_embeds)?;
        let special = e
            .f_mm(&self.special_care_embeds.f_tr()?)?
            .f_to_device(Device::Cpu)?;
        let concept = e
            .f_mm(&self.concept_embeds.f_tr()?)?
            .f_to_device(Device::Cpu)?;
        Ok((special, concept))
    }

    /// The verdict on each image, all images in one batch. Images may have any size: the
    /// processor resizes and crops them as diffusers' feature extractor does.
    pub fn check(&self, images: &[RgbImage]) -> Result<Vec<SafetyResult>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixel_values = self.processor.preprocess(images)?;
        let embeds = self.image_embeds(&pixel_values)?;
        let (special, concept) = self.cosine_distances(&embeds)?;
        let rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> {
            let t = t.f_contiguous()?;
            Ok(Vec::<Vec<f32>>::try_from(&t)?)
        };
        let (special, concept) = (rows(&special)?, rows(&concept)?);
        Ok(special
            .iter()
            .zip(&concept)
            .map(|(s, c)| self.decide(s, c))
            .collect())
    }

    /// diffusers' per-image loop on one image's cosines (see the module docs).
    pub fn decide(&self, special_cos: &[f32], concept_cos: &[f32]) -> SafetyResult {
        // numpy: float32 score minus a Python-float threshold stays float32 (NEP 50).
        let mut adjustment = 0.0f32;
        let mut special_care = false;
        let special_scores = special_cos
            .iter()
            .zip(&self.special_thresholds)
            .map(|(&cos, &threshold)| {
                let score = round3(cos - threshold + adjustment);
                if score > 0.0 {
                    special_care = true;
                    adjustment = SPECIAL_CARE_ADJUSTMENT;
                }
                score
            })
            .collect();
        let concept_scores: Vec<f32> = concept_cos
            .iter()
            .zip(&self.concept_thresholds)
            .map(|(&cos, &threshold)| round3(cos - threshold + adjustment))
            .collect();
        let bad_concepts: Vec<usize> = concept_scores
            .iter()
            .enumerate()
            .filter(|(_, s)| **s > 0.0)
            .map(|(i, _)| i)
            .collect();
        SafetyResult {
            nsfw: !bad_concepts.is_empty(),
            special_care,
            bad_concepts,
            concept_scores,
            special_scores,
        }
    }
}

/// `round(x, 3)` of a numpy float32: `rint(x * 1000) / 1000`, every step in float32, ties to even.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// The black image diffusers returns in place of a flagged one (same size).
pub fn blank(image: &RgbImage) -> RgbImage {
    RgbImage {
        width: image.width,
        height: image.height,
        pixels: vec![0; image.pixels.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round3_is_numpy_float32_round() {
        // Values checked against `round(np.float32(x), 3)` with numpy 2.4.
        assert_eq!(round3(0.0005), 0.0);
        assert_eq!(round3(0.000_500_01), 0.001);
        assert_eq!(round3(0.0015), 0.002);
        assert_eq!(round3(-0.166_543_23), -0.167);
    }

    #[test]
    fn blank_is_black_and_same_size() {
        let img = RgbImage {
            width: 2,
            height: 3,
            pixels: vec![9; 18],
        };
        let b = blank(&img);
        assert_eq!((b.width, b.height), (2, 3));
        assert!(b.pixels.len() == 18 && b.pixels.iter().all(|&p| p == 0));
    }
}
