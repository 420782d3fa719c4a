//! diffusers' `UNet2DConditionModel` as SD v1 uses it: sinusoidal timestep embedding, a down path of
//! ResNet (+ cross-attention transformer) blocks, a middle block, an up path fed by skip connections.
//! Every size comes from `unet/config.json`.
use super::attention::AttentionOptions;
use super::config::{UNetConfig, UNetLayout};
use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample, ResnetBlock, Upsample};
use super::transformer::Transformer2D;
use super::weights::Scope;
use crate::error::Result;
use std::path::Path;
use tch::{Kind, Tensor};

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

pub struct UNet2DConditionModel {
    time_proj_dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    in_channels: i64,
    cross_attention_dim: i64,
}

impl UNet2DConditionModel {
    /// Builds the model from its config and weights. `attention_slice`: see [`super::attention::attend`].
    pub fn load(
        config: &UNetConfig,
        config_path: &Path,
        w: &Scope,
        attention_slice: Option<i64>,
    ) -> Result<Self> {
        let l: UNetLayout = config.layout(config_path)?;
        let n = l.channels.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let ch0 = l.channels[0];
        let temb = ch0 * 4;
        let ctx = l.cross_attention_dim;
        let transformer = |s: &Scope, ch: i64, heads: i64, layers: i64| {
            Transformer2D::load(
                s,
                ch,
                heads,
                ctx,
                layers,
                groups,
                config.use_linear_projection,
                AttentionOptions {
                    slice: attention_slice,
                    upcast: config.upcast_attention,
                },
            )
        };

        let mut down = Vec::with_capacity(n);
        let mut in_ch = ch0;
        for i in 0..n {
            let s = w.sub(format!("down_blocks.{i}"));
            let out_ch = l.channels[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..l.layers_per_block[i] {
                let res_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock::load(
                    &s.sub(format!("resnets.{j}")),
                    res_in,
                    out_ch,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if l.down_attn[i] {
                    attentions.push(transformer(
                        &s.sub(format!("attentions.{j}")),
                        out_ch,
                        l.heads[i],
                        l.transformer_layers[i],
                    )?);
                }
            }
            let downsample = (i + 1 < n)
                .then(|| {
                    Downsample::load(&s.sub("downsamplers.0"), out_ch, config.downsample_padding)
                })
                .transpose()?;
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
            in_ch = out_ch;
        }

        let ch_last = l.channels[n - 1];
        let ms = w.sub("mid_block");
        let mid = MidBlock {
            resnet_in: ResnetBlock::load(
                &ms.sub("resnets.0"),
                ch_last,
                ch_last,
                Some(temb),
                groups,
                eps,
            )?,
            attention: transformer(
                &ms.sub("attentions.0"),
                ch_last,
                l.heads[n - 1],
                l.transformer_layers[n - 1],
            )?,
            resnet_out: ResnetBlock::load(
                &ms.sub("resnets.1"),
                ch_last,
                ch_last,
                Some(temb),
                groups,
                eps,
            )?,
        };

        // The up path mirrors the down path; block i of the up path pairs with down block n-1-i.
        let mut up = Vec::with_capacity(n);
        let mut prev_out = ch_last;
        for i in 0..n {
            let s = w.sub(format!("up_blocks.{i}"));
            let r = n - 1 - i;
            let out_ch = l.channels[r];
            let skip_in = l.channels[r.saturating_sub(1)];
            let layers = l.layers_per_block[r] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip_ch = if j == layers - 1 { skip_in } else { out_ch };
                let res_in = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock::load(
                    &s.sub(format!("resnets.{j}")),
                    res_in + skip_ch,
                    out_ch,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if l.up_attn[i] {
                    attentions.push(transformer(
                        &s.sub(format!("attentions.{j}")),
                        out_ch,
                        l.heads[r],
                        l.transformer_layers[r],
                    )?);
                }
            }
            let upsample = (i + 1 < n)
                .then(|| Upsample::load(&s.sub("upsamplers.0"), out_ch))
                .transpose()?;
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = out_ch;
        }

        Ok(Self {
            time_proj_dim: ch0,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            time_linear_1: Linear::load(&w.sub("time_embedding.linear_1"), ch0, temb, true)?,
            time_linear_2: Linear::load(&w.sub("time_embedding.linear_2"), temb, temb, true)?,
            conv_in: Conv2d::load(&w.sub("conv_in"), config.in_channels, ch0, 3, 1, 1)?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(&w.sub("conv_norm_out"), groups, ch0, eps)?,
            conv_out: Conv2d::load(&w.sub("conv_out"), ch0, config.out_channels, 3, 1, 1)?,
            in_channels: config.in_channels,
            cross_attention_dim: ctx,
        })
    }

    pub fn in_channels(&self) -> i64 {
        self.in_channels
    }

    pub fn cross_attention_dim(&self) -> i64 {
        self.cross_attention_dim
    }

    /// Sinusoidal embedding of `timesteps` (`[batch]`, any numeric kind), computed in float32 as
    /// diffusers' `get_timestep_embedding` does.
    fn timestep_embedding(&self, timesteps: &Tensor) -> Result<Tensor> {
        let half = self.time_proj_dim / 2;
        let device = timesteps.device();
        let exponent = Tensor::f_arange(half, (Kind::Float, device))?
            .f_mul_scalar(-(10000f64).ln())?
            .f_div_scalar(half as f64 - self.freq_shift)?;
        let freqs = exponent.f_exp()?;
        let args = timesteps
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&freqs.f_unsqueeze(0)?)?;
        let (sin, cos) = (args.f_sin()?, args.f_cos()?);
        let parts = if self.flip_sin_to_cos {
            [cos, sin]
        } else {
            [sin, cos]
        };
        Ok(Tensor::f_cat(&parts, -1)?)
    }

    /// Predicts the noise in `sample` (`[batch, in_channels, h, w]`) at `timesteps` (`[batch]`),
    /// conditioned on `context` (`[batch, tokens, cross_attention_dim]`).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        let emb = self
            .timestep_embedding(timesteps)?
            .f_to_kind(sample.kind())?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&emb)?.f_silu()?)?;
        // Every ResNet block applies SiLU to the embedding before its projection: do it once.
        let temb = emb.f_silu()?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.shallow_clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.shallow_clone());
            }
            if let Some(down) = &block.downsample {
                xs = down.forward(&xs)?;
                skips.push(xs.shallow_clone());
            }
        }

        xs = self.mid.resnet_in.forward(&xs, Some(&temb))?;
        xs = self.mid.attention.forward(&xs, context)?;
        xs = self.mid.resnet_out.forward(&xs, Some(&temb))?;

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    crate::error::Error::InvalidArgument(
                        "UNet skip connections exhausted (inconsistent block layout)".into(),
                    )
                })?;
                xs = resnet.forward(&Tensor::f_cat(&[&xs, &skip], 1)?, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(up) = &block.upsample {
                let size = skips.last().map(|t| t.size()).unwrap_or_default();
                let target = if size.len() == 4 {
                    [size[2], size[3]]
                } else {
                    [xs.size()[2] * 2, xs.size()[3] * 2]
                };
                xs = up.forward(&xs, target)?;
            }
        }

        let xs = self.norm_out.forward(&xs)?.f_silu()?;
        self.conv_out.forward(&xs)
    }
}
