//! Multi-head attention through `scaled_dot_product_attention` (flash / memory-efficient kernels on
//! CUDA), shared by the CLIP text encoder, the UNet's transformer blocks and the VAE.
use super::nn::Linear;
use super::weights::Scope;
use crate::error::Result;
use tch::Tensor;

/// How attention runs, beyond its weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionOptions {
    /// With `Some(n)`, attention runs for `n` batch rows at a time ("attention slicing"),
    /// trading a little speed for a lower peak of memory on large batches.
    pub slice: Option<i64>,
    /// Compute attention in float32 when the model runs in half precision (the UNet config's
    /// `upcast_attention`, set by SD 2.1 whose fp16 attention scores can overflow). In float32
    /// it changes nothing, as in diffusers.
    pub upcast: bool,
}

/// Attention over `[batch, tokens, heads * head_dim]` projections.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
    options: AttentionOptions,
) -> Result<Tensor> {
    let kind = q.kind();
    if options.upcast && kind != tch::Kind::Float {
        let up = |t: &Tensor| t.f_to_kind(tch::Kind::Float);
        let out = attend(
            &up(q)?,
            &up(k)?,
            &up(v)?,
            heads,
            causal,
            AttentionOptions {
                upcast: false,
                ..options
            },
        )?;
        return Ok(out.f_to_kind(kind)?);
    }
    let slice = options.slice;
    let (b, n, inner) = q.size3()?;
    let m = k.size()[1];
    let d = inner / heads;
    let split = |t: &Tensor, len: i64| -> Result<Tensor> {
        Ok(t.f_view([b, len, heads, d])?.f_transpose(1, 2)?)
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let run = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
        Ok(Tensor::f_scaled_dot_product_attention::<Tensor>(
            q, k, v, None, 0.0, causal, None, false,
        )?)
    };
    let out = match slice {
        Some(s) if s > 0 && s < b => {
            let mut parts = Vec::new();
            let mut start = 0;
            while start < b {
                let len = s.min(b - start);
                parts.push(run(
                    &q.f_narrow(0, start, len)?,
                    &k.f_narrow(0, start, len)?,
                    &v.f_narrow(0, start, len)?,
                )?);
                start += len;
            }
            Tensor::f_cat(&parts, 0)?
        }
        _ => run(&q, &k, &v)?,
    };
    Ok(out.f_transpose(1, 2)?.f_reshape([b, n, inner])?)
}

/// diffusers' `Attention` module as used in SD: `to_q`, `to_k`, `to_v`, `to_out.0`.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    options: AttentionOptions,
}

impl Attention {
    /// `context_dim`: width of the key/value input (the text embeddings for cross-attention, the
    /// query width for self-attention). `qkv_bias`: the VAE's attention has biases, the UNet's not.
    pub fn load(
        s: &Scope,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
        options: AttentionOptions,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        // Checkpoints saved before diffusers 0.14 name the VAE's attention projections
        // query/key/value/proj_attn; diffusers renames them on load, so do we.
        let legacy = !s.contains("to_q.weight") && s.contains("query.weight");
        let (q, k, v, o) = if legacy {
            ("query", "key", "value", "proj_attn".to_string())
        } else {
            ("to_q", "to_k", "to_v", "to_out.0".to_string())
        };
        Ok(Self {
            to_q: Linear::load(&s.sub(q), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&s.sub(k), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&s.sub(v), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&s.sub(o), inner, query_dim, true)?,
            heads,
            options,
        })
    }

    /// `xs`: `[batch, tokens, query_dim]`; `context`: `[batch, tokens', context_dim]` or `None` for
    /// self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = attend(&q, &k, &v, self.heads, false, self.options)?;
        self.to_out.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn upcast_attention_runs_in_float32_under_half_precision() {
        tch::manual_seed(0);
        let t = |_| Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let (q, k, v) = (t(0), t(1), t(2));
        let half = |x: &Tensor| x.to_kind(Kind::Half);
        let upcast = AttentionOptions {
            upcast: true,
            ..Default::default()
        };
        let reference = attend(
            &half(&q).to_kind(Kind::Float),
            &half(&k).to_kind(Kind::Float),
            &half(&v).to_kind(Kind::Float),
            4,
            false,
            AttentionOptions::default(),
        )
        .unwrap();
        let out = attend(&half(&q), &half(&k), &half(&v), 4, false, upcast).unwrap();
        assert_eq!(out.kind(), Kind::Half);
        assert!(out.equal(&reference.to_kind(Kind::Half)));
        // In float32 the flag changes nothing.
        let plain = attend(&q, &k, &v, 4, false, AttentionOptions::default()).unwrap();
        assert!(attend(&q, &k, &v, 4, false, upcast).unwrap().equal(&plain));
    }
}
