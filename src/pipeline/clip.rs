//! transformers' `CLIPTextModel`: token + position embeddings, pre-norm transformer layers with a
//! causal mask, final layer norm. The pipeline uses the last hidden state.
use super::attention::{AttentionOptions, attend};
use super::config::ClipTextConfig;
use super::nn::{LayerNorm, Linear};
use super::weights::Scope;
use crate::error::{Error, Result};
use std::path::Path;
use tch::Tensor;

/// transformers' `ACT2FN` entries CLIP checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's approximation (every released CLIP).
    QuickGelu,
    /// The exact, erf-based GELU.
    Gelu,
}

pub(crate) fn activation(name: &str, path: &Path, key: &str) -> Result<Activation> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        other => Err(Error::Unsupported {
            path: path.to_path_buf(),
            key: key.into(),
            value: format!("{other:?}"),
            reason: "quick_gelu or gelu".into(),
        }),
    }
}

impl Activation {
    pub(crate) fn forward(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::QuickGelu => xs.f_mul(&xs.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            Activation::Gelu => xs.f_gelu("none")?,
        })
    }
}

/// One pre-norm transformer layer of a CLIP tower (text or vision).
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    pub(crate) fn load(s: &Scope, d: i64, intermediate: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::load(&s.sub("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&s.sub("self_attn.q_proj"), d, d, true)?,
            k_proj: Linear::load(&s.sub("self_attn.k_proj"), d, d, true)?,
            v_proj: Linear::load(&s.sub("self_attn.v_proj"), d, d, true)?,
            out_proj: Linear::load(&s.sub("self_attn.out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&s.sub("layer_norm2"), d, eps)?,
            fc1: Linear::load(&s.sub("mlp.fc1"), d, intermediate, true)?,
            fc2: Linear::load(&s.sub("mlp.fc2"), intermediate, d, true)?,
        })
    }

    /// `xs + attn(ln1(xs))`, then `+ mlp(ln2(.))`; `causal` for the text tower.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        heads: i64,
        causal: bool,
        act: Activation,
    ) -> Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let attn = attend(
            &self.q_proj.forward(&h)?,
            &self.k_proj.forward(&h)?,
            &self.v_proj.forward(&h)?,
            heads,
            causal,
            AttentionOptions::default(),
        )?;
        let xs = xs.f_add(&self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self.fc2.forward(&act.forward(&self.fc1.forward(&h)?)?)?;
        Ok(xs.f_add(&h)?)
    }
}

pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    heads: i64,
    act: Activation,
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
                EncoderLayer::load(
                    &t.sub(format!("encoder.layers.{i}")),
                    d,
                    config.intermediate_size,
                    eps,
                )
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
            act: activation(&config.hidden_act, config_path, "hidden_act")?,
            max_positions: config.max_position_embeddings,
            vocab_size: config.vocab_size,
        })
    }

    pub fn hidden_size(&self) -> i64 {
        self.token_embedding.size()[1]
    }

    /// Rows of the token-embedding table: the vocabulary and any added embeddings.
    pub fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    /// Appends `vectors` (`[n, hidden]`, any float dtype and device) to the token-embedding table,
    /// in the table's dtype and device, as diffusers' `load_textual_inversion` does; returns the
    /// first new id (the others follow it).
    pub fn add_token_embeddings(&mut self, vectors: &Tensor) -> Result<i64> {
        let _no_grad = tch::no_grad_guard();
        let (_, d) = vectors.size2()?;
        if d != self.hidden_size() {
            return Err(Error::InvalidArgument(format!(
                "token embeddings of width {d} for a text encoder of width {}",
                self.hidden_size()
            )));
        }
        let table = &self.token_embedding;
        let vectors = vectors
            .f_to_kind(table.kind())?
            .f_to_device(table.device())?;
        let first = self.vocab_size;
        self.token_embedding = Tensor::f_cat(&[table, &vectors], 0)?;
        self.vocab_size = self.token_embedding.size()[0];
        Ok(first)
    }

    /// Transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `input_ids`: `[batch, tokens]` (int64) → last hidden state `[batch, tokens, hidden]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_skipping(input_ids, 1)
    }

    /// Like [`forward`](Self::forward), stopping `clip_skip - 1` layers before the last, then
    /// the final layer norm: "clip skip" as AUTOMATIC1111 and ComfyUI number it (1 = every layer,
    /// 2 = the penultimate layer's output, which diffusers calls `clip_skip=1`).
    pub fn forward_skipping(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        if clip_skip == 0 || clip_skip > layers {
            return Err(Error::InvalidArgument(format!(
                "clip skip must be in 1..={layers} for this text encoder ({layers} layers), got \
                 {clip_skip}"
            )));
        }
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
        for layer in &self.layers[..layers - (clip_skip - 1)] {
            xs = layer.forward(&xs, self.heads, true, self.act)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
