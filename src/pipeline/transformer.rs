//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s: self-attention,
//! cross-attention on the text embeddings, GEGLU feed-forward, each pre-normed and residual.
use super::attention::{Attention, AttentionOptions};
use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use super::weights::Scope;
use crate::error::Result;
use tch::Tensor;

struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(s: &Scope, dim: i64) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            // GEGLU: one projection yields both the value and the gate.
            proj_in: Linear::load(&s.sub("net.0.proj"), dim, inner * 2, true)?,
            proj_out: Linear::load(&s.sub("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        let parts = h.f_chunk(2, -1)?;
        let gated = parts[0].f_mul(&parts[1].f_gelu("none")?)?;
        self.proj_out.forward(&gated)
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(
        s: &Scope,
        dim: i64,
        heads: i64,
        context_dim: i64,
        attention: AttentionOptions,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::load(&s.sub("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&s.sub("attn1"), dim, dim, heads, head_dim, false, attention)?,
            norm2: LayerNorm::load(&s.sub("norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                &s.sub("attn2"),
                dim,
                context_dim,
                heads,
                head_dim,
                false,
                attention,
            )?,
            norm3: LayerNorm::load(&s.sub("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&s.sub("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self
            .attn1
            .forward(&self.norm1.forward(xs)?, None)?
            .f_add(xs)?;
        let xs = self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            .f_add(&xs)?;
        Ok(self.ff.forward(&self.norm3.forward(&xs)?)?.f_add(&xs)?)
    }
}

/// Projection in and out of the token layout: 1x1 convolutions (SD v1) or linear layers
/// (`use_linear_projection`, SD v2).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        s: &Scope,
        channels: i64,
        heads: i64,
        context_dim: i64,
        layers: i64,
        groups: i64,
        linear_projection: bool,
        attention: AttentionOptions,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if linear_projection {
                Projection::Linear(Linear::load(&s.sub(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&s.sub(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(&s.sub("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &s.sub(format!("transformer_blocks.{i}")),
                        channels,
                        heads,
                        context_dim,
                        attention,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.size4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_permute([0, 2, 3, 1])?.f_reshape([b, h * w, c])?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([b, h, w, c])?
                .f_permute([0, 3, 1, 2])?
                .f_contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        Ok(out.f_add(xs)?)
    }
}
