//! CLIP score of (prompt, image) pairs with a transformers `CLIPModel` folder (`config.json`,
//! `model.safetensors`, `preprocessor_config.json`, `vocab.json`, `merges.txt`), e.g.
//! `openai/clip-vit-large-patch14`:
//!
//! ```text
//! score = max(100 · cos(text_embeds, image_embeds), 0)
//! ```
//!
//! as torchmetrics' `CLIPScore` reports it for one pair, with `text_embeds` =
//! `CLIPModel.get_text_features` (the final-layer-normed hidden state at the end-of-text token,
//! through `text_projection`) and `image_embeds` = `CLIPModel.get_image_features` (the pooled
//! class token through `visual_projection`), each divided by its L2 norm.
//!
//! Prompts are tokenized like the SD pipeline's (77 tokens, padded with `<|endoftext|>`, longer
//! prompts truncated). torchmetrics pads to the longest prompt with an attention mask instead; with
//! the causal mask and pooling at the first end-of-text token the embeddings are the same.
use super::clip::ClipTextModel;
use super::clip_vision::{ClipImageProcessor, ClipVisionConfig, ClipVisionModel, normalize_rows};
use super::config::{ClipTextConfig, read_json};
use super::nn::Linear;
use super::tokenizer::ClipTokenizer;
use super::{LoadOptions, RgbImage, load_weights};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The text half of a `CLIPConfig` (`CLIPTextConfig`), with transformers' defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextSection {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Decides the pooling position; see [`ClipScorer::eos_positions`].
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextSection {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: Some(49407),
        }
    }
}

/// `config.json` of a transformers `CLIPModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipModelConfig {
    #[serde(default)]
    pub text_config: Option<ClipTextSection>,
    /// Old checkpoints: the text config is rebuilt from this one (defaults for every absent key),
    /// as transformers does.
    #[serde(default)]
    pub text_config_dict: Option<ClipTextSection>,
    #[serde(default)]
    pub vision_config: Option<ClipVisionConfig>,
    #[serde(default)]
    pub vision_config_dict: Option<ClipVisionConfig>,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
}

fn default_projection_dim() -> i64 {
    512
}

impl ClipModelConfig {
    pub fn text(&self) -> ClipTextSection {
        self.text_config_dict
            .as_ref()
            .or(self.text_config.as_ref())
            .cloned()
            .unwrap_or_default()
    }

    pub fn vision(&self) -> ClipVisionConfig {
        ClipVisionConfig::from_clip_config(
            self.vision_config.as_ref(),
            self.vision_config_dict.as_ref(),
        )
    }
}

/// Where the text tower pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// `eos_token_id == 2` (configs from before transformers PR #24773): the position of the largest
    /// id, which is `<|endoftext|>` in CLIP's vocabulary.
    ArgmaxId,
    /// The first position holding this id.
    FirstId(i64),
}

pub struct ClipScorer {
    tokenizer: ClipTokenizer,
    text: ClipTextModel,
    text_projection: Linear,
    vision: ClipVisionModel,
    visual_projection: Linear,
    processor: ClipImageProcessor,
    pooling: Pooling,
    logit_scale: f64,
    device: Device,
    dir: PathBuf,
}

impl ClipScorer {
    /// Loads a `CLIPModel` folder. Weights: `model.safetensors` or `model.fp16.safetensors`, chosen
    /// by `options` like the SD components (a CLIP folder usually has only the first: leave
    /// `options.variant` unset).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let cfg_path = dir.join("config.json");
        let cfg: ClipModelConfig = read_json(&cfg_path)?;
        let t = cfg.text();
        let text_cfg = ClipTextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            max_position_embeddings: t.max_position_embeddings,
            hidden_act: t.hidden_act.clone(),
            layer_norm_eps: t.layer_norm_eps,
        };
        let pooling = match t.eos_token_id {
            Some(2) => Pooling::ArgmaxId,
            Some(id) => Pooling::FirstId(id),
            None => {
                return Err(Error::Config {
                    path: cfg_path,
                    message: "text_config.eos_token_id is null: no pooling position".into(),
                });
            }
        };
        let proj = cfg.projection_dim;
        if proj <= 0 {
            return Err(Error::Config {
                path: cfg_path,
                message: format!("projection_dim must be positive, got {proj}"),
            });
        }
        let processor = ClipImageProcessor::load(&dir.join("preprocessor_config.json"))?;
        let tokenizer = ClipTokenizer::load(dir, text_cfg.max_position_embeddings as usize)?;
        let weights = load_weights(dir, "model", options)?;
        let w = weights.root();
        // ClipTextModel takes the `text_model.` prefix of CLIPModel files itself.
        let text = ClipTextModel::load(&text_cfg, &cfg_path, &w)?;
        let vision = ClipVisionModel::load(&cfg.vision(), &cfg_path, &w.sub("vision_model"))?;
        processor.check_output_size(vision.image_size())?;
        let text_projection = Linear::load(&w.sub("text_projection"), t.hidden_size, proj, false)?;
        let visual_projection = Linear::load(
            &w.sub("visual_projection"),
            vision.hidden_size(),
            proj,
            false,
        )?;
        // Not needed for the score; taken so it is not reported as unused, and exposed.
        let logit_scale = w
            .get("logit_scale", &[])?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?
            .double_value(&[]);
        weights.finish();
        Ok(Self {
            tokenizer,
            text,
            text_projection,
            vision,
            visual_projection,
            processor,
            pooling,
            logit_scale,
            device: options.device,
            dir: dir.to_path_buf(),
        })
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// `CLIPModel.logit_scale` (a log; logits are `exp(logit_scale) · cos`).
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }

    /// Token ids `[n, 77]` (int64, CPU) of `prompts`, as the SD pipeline tokenizes them.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_len());
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.ids);
        }
        Ok(Tensor::from_slice(&ids)
            .f_view([prompts.len() as i64, self.tokenizer.max_len() as i64])?)
    }

    /// transformers' pooling position per row of `input_ids` (`[n, len]`, CPU): the first
    /// `eos_token_id`, or the largest id for legacy configs. `argmax` gives 0 when the row has no
    /// such token; so does this.
    pub fn eos_positions(&self, input_ids: &Tensor) -> Result<Vec<i64>> {
        let rows = Vec::<Vec<i64>>::try_from(&input_ids.f_contiguous()?)?;
        Ok(rows
            .iter()
            .map(|row| {
                let target = match self.pooling {
                    Pooling::ArgmaxId => row.iter().copied().max(),
                    Pooling::FirstId(id) => Some(id),
                };
                target
                    .and_then(|t| row.iter().position(|&v| v == t))
                    .unwrap_or(0) as i64
            })
            .collect())
    }

    /// `get_text_features` from token ids: `[n, projection_dim]`, unnormalised, model dtype/device.
    pub fn text_embeds_from_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let positions = self.eos_positions(input_ids)?;
        let hidden = self.text.forward(&input_ids.f_to_device(self.device)?)?;
        let rows = positions.len() as i64;
        let batch = Tensor::f_arange(rows, (Kind::Int64, self.device))?;
        let pos = Tensor::from_slice(&positions).f_to_device(self.device)?;
        let pooled = hidden.f_index(&[Some(batch), Some(pos)])?;
        self.text_projection.forward(&pooled)
    }

    /// `get_text_features` of prompts: `[n, projection_dim]`, unnormalised.
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        self.text_embeds_from_ids(&self.tokenize(prompts)?)
    }

    /// `get_image_features` from pixel values: `[n, projection_dim]`, unnormalised.
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        self.visual_projection
            .forward(&self.vision.forward(pixel_values)?)
    }

    /// `get_image_features` of RGB8 images (preprocessed by `preprocessor_config.json`).
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.image_embeds_from_pixels(&self.processor.preprocess(images)?)
    }

    /// The CLIP score of each (`prompts[i]`, `images[i]`) pair, in one batch each side.
    pub fn scores(&self, prompts: &[&str], images: &[RgbImage]) -> Result<Vec<f32>> {
        if prompts.len() != images.len() {
            return Err(Error::InvalidArgument(format!(
                "{} prompts for {} images",
                prompts.len(),
                images.len()
            )));
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        clip_scores(&self.text_embeds(prompts)?, &self.image_embeds(images)?)
    }
}

/// `100 · cos(text_embeds[i], image_embeds[i])` per row, float32 (not clamped).
pub fn cosine_scores(text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Vec<f32>> {
    let t = normalize_rows(text_embeds)?.f_to_device(Device::Cpu)?;
    let i = normalize_rows(image_embeds)?.f_to_device(Device::Cpu)?;
    let cos = t
        .f_mul(&i)?
        .f_sum_dim_intlist([-1].as_slice(), false, Kind::Float)?;
    Ok(Vec::<f32>::try_from(&cos.f_mul_scalar(100.0)?)?)
}

/// The CLIP score per row: `max(100 · cos, 0)`.
pub fn clip_scores(text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Vec<f32>> {
    Ok(cosine_scores(text_embeds, image_embeds)?
        .into_iter()
        .map(|s| s.max(0.0))
        .collect())
}
