//! serde mirrors of the diffusers / transformers `config.json` files.
//!
//! Only the keys that change the computation are modelled. Keys that select features this crate does
//! not implement are still read, so a model that needs them is refused with an error naming the key
//! instead of being run wrongly.
use crate::error::{Error, Result};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn unsupported(path: &Path, key: &str, value: impl std::fmt::Debug, reason: &str) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        key: key.to_string(),
        value: format!("{value:?}"),
        reason: reason.to_string(),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// diffusers accepts either one value for every block or one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(i64),
    Many(Vec<i64>),
}

impl PerBlock {
    /// The value for each of `blocks` blocks.
    pub fn expand(&self, blocks: usize, path: &Path, key: &str) -> Result<Vec<i64>> {
        let values = match self {
            PerBlock::One(v) => vec![*v; blocks],
            PerBlock::Many(v) if v.len() == blocks => v.clone(),
            PerBlock::Many(v) => {
                return Err(invalid(
                    path,
                    format!("`{key}` has {} entries for {blocks} blocks", v.len()),
                ));
            }
        };
        if values.iter().any(|&v| v <= 0) {
            return Err(invalid(
                path,
                format!("`{key}` must be positive: {values:?}"),
            ));
        }
        Ok(values)
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
}

fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        if !["quick_gelu", "gelu"].contains(&self.hidden_act.as_str()) {
            return Err(unsupported(
                path,
                "hidden_act",
                &self.hidden_act,
                "quick_gelu or gelu",
            ));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid(
                path,
                "hidden_size must be a multiple of num_attention_heads",
            ));
        }
        if self.vocab_size <= 0 || self.max_position_embeddings <= 0 || self.intermediate_size <= 0
        {
            return Err(invalid(path, "sizes must be positive"));
        }
        Ok(())
    }
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_latent_channels")]
    pub in_channels: i64,
    #[serde(default = "default_latent_channels")]
    pub out_channels: i64,
    pub sample_size: Option<i64>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_two")]
    pub layers_per_block: PerBlock,
    #[serde(default = "default_eight")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_ln_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one_i")]
    pub downsample_padding: i64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_one_f")]
    pub mid_block_scale_factor: f64,
    // Features that change the computation and are not implemented: refused when set.
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_resnet_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "default_three")]
    pub conv_out_kernel: i64,
}

fn default_latent_channels() -> i64 {
    4
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_two() -> PerBlock {
    PerBlock::One(2)
}
fn default_eight() -> PerBlock {
    PerBlock::One(8)
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_groups() -> i64 {
    32
}
fn default_true() -> bool {
    true
}
fn default_one_i() -> i64 {
    1
}
fn default_one_f() -> f64 {
    1.0
}
fn default_three() -> i64 {
    3
}
fn default_silu() -> String {
    "silu".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_resnet_shift() -> String {
    "default".into()
}

/// Per-block values of a [`UNetConfig`], validated and expanded.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub channels: Vec<i64>,
    pub layers_per_block: Vec<i64>,
    /// Attention heads per down block (the up path uses them reversed).
    pub heads: Vec<i64>,
    pub transformer_layers: Vec<i64>,
    pub cross_attention_dim: i64,
    /// Whether down block `i` has attention (`CrossAttnDownBlock2D`).
    pub down_attn: Vec<bool>,
    /// Whether up block `i` has attention (`CrossAttnUpBlock2D`).
    pub up_attn: Vec<bool>,
}

impl UNetConfig {
    pub fn layout(&self, path: &Path) -> Result<UNetLayout> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(invalid(path, "block_out_channels is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(invalid(
                path,
                "down_block_types, up_block_types and block_out_channels must have the same length",
            ));
        }
        let down_attn = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(unsupported(
                    path,
                    "down_block_types",
                    other,
                    "CrossAttnDownBlock2D or DownBlock2D",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_attn = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(unsupported(
                    path,
                    "up_block_types",
                    other,
                    "CrossAttnUpBlock2D or UpBlock2D",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(unsupported(
                path,
                "mid_block_type",
                &self.mid_block_type,
                "UNetMidBlock2DCrossAttn",
            ));
        }
        let checks: [(&str, bool); 13] = [
            ("center_input_sample", !self.center_input_sample),
            (
                "only_cross_attention",
                matches!(
                    &self.only_cross_attention,
                    serde_json::Value::Null | serde_json::Value::Bool(false)
                ) || self
                    .only_cross_attention
                    .as_array()
                    .is_some_and(|a| a.iter().all(|v| v == false)),
            ),
            ("dual_cross_attention", !self.dual_cross_attention),
            ("class_embed_type", self.class_embed_type.is_none()),
            ("addition_embed_type", self.addition_embed_type.is_none()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_none()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_none()),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
            ),
            ("act_fn", self.act_fn == "silu"),
            ("conv_in_kernel", self.conv_in_kernel == 3),
            ("conv_out_kernel", self.conv_out_kernel == 3),
            ("mid_block_scale_factor", self.mid_block_scale_factor == 1.0),
        ];
        for (key, ok) in checks {
            if !ok {
                let value = serde_json::to_value(self.raw_value(key)).unwrap_or_default();
                return Err(unsupported(path, key, value, "not implemented by sdbatch"));
            }
        }
        let channels = self.block_out_channels.clone();
        if channels
            .iter()
            .any(|&c| c <= 0 || c % self.norm_num_groups != 0)
        {
            return Err(invalid(
                path,
                format!(
                    "block_out_channels {channels:?} must be multiples of norm_num_groups {}",
                    self.norm_num_groups
                ),
            ));
        }
        // diffusers' legacy naming: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        let heads_src = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let heads = heads_src.expand(n, path, "num_attention_heads")?;
        for (c, h) in channels.iter().zip(&heads) {
            if c % h != 0 {
                return Err(invalid(
                    path,
                    format!("{c} channels are not divisible into {h} heads"),
                ));
            }
        }
        let cross = self
            .cross_attention_dim
            .expand(n, path, "cross_attention_dim")?;
        if cross.iter().any(|&c| c != cross[0]) {
            return Err(unsupported(
                path,
                "cross_attention_dim",
                &cross,
                "one value for all blocks",
            ));
        }
        Ok(UNetLayout {
            layers_per_block: self.layers_per_block.expand(n, path, "layers_per_block")?,
            transformer_layers: self.transformer_layers_per_block.expand(
                n,
                path,
                "transformer_layers_per_block",
            )?,
            heads,
            cross_attention_dim: cross[0],
            channels,
            down_attn,
            up_attn,
        })
    }

    fn raw_value(&self, key: &str) -> serde_json::Value {
        use serde_json::json;
        match key {
            "center_input_sample" => json!(self.center_input_sample),
            "only_cross_attention" => self.only_cross_attention.clone(),
            "dual_cross_attention" => json!(self.dual_cross_attention),
            "class_embed_type" => json!(self.class_embed_type),
            "addition_embed_type" => json!(self.addition_embed_type),
            "encoder_hid_dim" => json!(self.encoder_hid_dim),
            "time_cond_proj_dim" => json!(self.time_cond_proj_dim),
            "time_embedding_type" => json!(self.time_embedding_type),
            "resnet_time_scale_shift" => json!(self.resnet_time_scale_shift),
            "act_fn" => json!(self.act_fn),
            "conv_in_kernel" => json!(self.conv_in_kernel),
            "conv_out_kernel" => json!(self.conv_out_kernel),
            "mid_block_scale_factor" => json!(self.mid_block_scale_factor),
            _ => serde_json::Value::Null,
        }
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`); only the decoder half is used.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: i64,
    #[serde(default = "default_three")]
    pub out_channels: i64,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_one_i")]
    pub layers_per_block: i64,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub use_quant_conv: Option<bool>,
}

fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(invalid(path, "block_out_channels is empty"));
        }
        if !self.up_block_types.is_empty()
            && (self.up_block_types.len() != n
                || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D"))
        {
            return Err(unsupported(
                path,
                "up_block_types",
                &self.up_block_types,
                "UpDecoderBlock2D for every block",
            ));
        }
        if self.act_fn != "silu" {
            return Err(unsupported(path, "act_fn", &self.act_fn, "silu"));
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(unsupported(
                path,
                "shift_factor",
                self.shift_factor,
                "SD v1 VAEs have none",
            ));
        }
        if self.layers_per_block <= 0 || self.latent_channels <= 0 || self.scaling_factor <= 0.0 {
            return Err(invalid(
                path,
                "layers_per_block, latent_channels and scaling_factor must be positive",
            ));
        }
        if self
            .block_out_channels
            .iter()
            .any(|&c| c <= 0 || c % self.norm_num_groups != 0)
        {
            return Err(invalid(
                path,
                "block_out_channels must be multiples of norm_num_groups",
            ));
        }
        Ok(())
    }

    /// How many pixels one latent cell covers along each axis (8 for SD).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(json: serde_json::Value) -> UNetConfig {
        serde_json::from_value(json).unwrap()
    }

    fn sd14_unet() -> serde_json::Value {
        serde_json::json!({
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        })
    }

    #[test]
    fn sd14_unet_layout() {
        let l = unet(sd14_unet())
            .layout(Path::new("unet/config.json"))
            .unwrap();
        assert_eq!(l.heads, vec![8, 8, 8, 8]);
        assert_eq!(l.cross_attention_dim, 768);
        assert_eq!(l.down_attn, vec![true, true, true, false]);
        assert_eq!(l.up_attn, vec![false, true, true, true]);
        assert_eq!(l.layers_per_block, vec![2, 2, 2, 2]);
    }

    #[test]
    fn unsupported_values_are_named() {
        // SD 2.1's upcast attention is supported (float32 attention under half precision).
        let mut j = sd14_unet();
        j["upcast_attention"] = serde_json::json!(true);
        assert!(unet(j).layout(Path::new("unet/config.json")).is_ok());
        let mut j = sd14_unet();
        j["center_input_sample"] = serde_json::json!(true);
        let err = unet(j)
            .layout(Path::new("unet/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet/config.json") && err.contains("center_input_sample"),
            "{err}"
        );

        let mut j = sd14_unet();
        j["down_block_types"][0] = serde_json::json!("AttnDownBlock2D");
        let err = unet(j)
            .layout(Path::new("unet/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("down_block_types") && err.contains("AttnDownBlock2D"),
            "{err}"
        );
    }

    #[test]
    fn per_block_lengths_are_checked() {
        let mut j = sd14_unet();
        j["attention_head_dim"] = serde_json::json!([8, 8]);
        let err = unet(j).layout(Path::new("u.json")).unwrap_err().to_string();
        assert!(err.contains("2 entries for 4 blocks"), "{err}");
    }

    #[test]
    fn vae_scale_factor() {
        let v: VaeConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "norm_num_groups": 32, "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }))
        .unwrap();
        v.validate(Path::new("vae/config.json")).unwrap();
        assert_eq!(v.scale_factor(), 8);
    }
}
