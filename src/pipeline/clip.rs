//! transformers' `CLIPTextModel`: token + position embeddings, pre-norm transformer layers with a
//! causal mask, final layer norm. The pipeline uses the last hidden state.
use super::attention::attend;
use super::config::ClipTextConfig;
use super::nn::{LayerNorm, Linear};
use super::weights::Scope;
use crate::error::{Error, Result};
use std::path::Path;
use tch::Tensor;

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    heads: i64,
    quick_gelu: bool,
    max_positions: i64,
    vocab_size: i64,
}

impl ClipTextModel {
    pub fn load(config: &ClipTextConfig, config_path: &Path, w: &Scope) -> Result<Self> {
        config.validate(config_path)?;
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        // transformers 4 saves `CLIPTextModel` under `text_model.`; transformers 5 saves it
        // without the prefix. Both layouts are in use.
        let t = if w.contains("text_model.embeddings.token_embedding.weight") {
            w.sub("text_model")
        } else {
            w.clone()
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let s = t.sub(format!("encoder.layers.{i}"));
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(&s.sub("layer_norm1"), d, eps)?,
                    q_proj: Linear::load(&s.sub("self_attn.q_proj"), d, d, true)?,
                    k_proj: Linear::load(&s.sub("self_attn.k_proj"), d, d, true)?,
                    v_proj: Linear::load(&s.sub("self_attn.v_proj"), d, d, true)?,
                    out_proj: Linear::load(&s.sub("self_attn.out_proj"), d, d, true)?,
                    layer_norm2: LayerNorm::load(&s.sub("layer_norm2"), d, eps)?,
                    fc1: Linear::load(&s.sub("mlp.fc1"), d, config.intermediate_size, true)?,
                    fc2: Linear::load(&s.sub("mlp.fc2"), config.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: t.get("embeddings.token_embedding.weight", &[config.vocab_size, d])?,
            position_embedding: t.get(
                "embeddings.position_embedding.weight",
                &[config.max_position_embeddings, d],
            )?,
            layers,
            final_layer_norm: LayerNorm::load(&t.sub("final_layer_norm"), d, eps)?,
            heads: config.num_attention_heads,
            quick_gelu: config.hidden_act == "quick_gelu",
            max_positions: config.max_position_embeddings,
            vocab_size: config.vocab_size,
        })
    }

    pub fn hidden_size(&self) -> i64 {
        self.token_embedding.size()[1]
    }

    fn activation(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(if self.quick_gelu {
            // x * sigmoid(1.702 x), OpenAI CLIP's approximation.
            xs.f_mul(&xs.f_mul_scalar(1.702)?.f_sigmoid()?)?
        } else {
            xs.f_gelu("none")?
        })
    }

    /// `input_ids`: `[batch, tokens]` (int64) → last hidden state `[batch, tokens, hidden]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.size2()?;
        if len > self.max_positions {
            return Err(Error::InvalidArgument(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.max_positions
            )));
        }
        let max_id = input_ids.f_max()?.int64_value(&[]);
        if max_id >= self.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "token id {max_id} is outside the text encoder's vocabulary of {}",
                self.vocab_size
            )));
        }
        let positions = self.position_embedding.f_narrow(0, 0, len)?;
        let mut xs = Tensor::f_embedding(&self.token_embedding, input_ids, -1, false, false)?
            .f_add(&positions.f_unsqueeze(0)?)?;
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(&xs)?;
            let attn = attend(
                &layer.q_proj.forward(&h)?,
                &layer.k_proj.forward(&h)?,
                &layer.v_proj.forward(&h)?,
                self.heads,
                true,
                None,
            )?;
            xs = xs.f_add(&layer.out_proj.forward(&attn)?)?;
            let h = layer.layer_norm2.forward(&xs)?;
            let h = layer
                .fc2
                .forward(&self.activation(&layer.fc1.forward(&h)?)?)?;
            xs = xs.f_add(&h)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
