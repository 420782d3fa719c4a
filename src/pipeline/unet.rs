//! diffusers' `UNet2DConditionModel` as SD 1.x and 2.x use it: sinusoidal timestep embedding, a
//! down path of ResNet (+ cross-attention transformer) blocks, a middle block, an up path fed by
//! skip connections (the blocks are in [`super::unet_blocks`]). Every size comes from
//! `unet/config.json`.
use super::attention::AttentionOptions;
use super::config::{UNetConfig, UNetLayout};
use super::nn::{Conv2d, GroupNorm, Linear};
use super::unet_blocks::{self, BlockContext, DownBlock, MidBlock, UpBlock};
use super::weights::Scope;
use crate::error::Result;
use std::path::Path;
use tch::{Kind, Tensor};

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
        let ch0 = l.channels[0];
        let ctx = BlockContext {
            norm_groups: config.norm_num_groups,
            norm_eps: config.norm_eps,
            temb_channels: ch0 * 4,
            cross_attention_dim: l.cross_attention_dim,
            linear_projection: config.use_linear_projection,
            attention: AttentionOptions {
                slice: attention_slice,
                upcast: config.upcast_attention,
            },
        };
        let temb = ctx.temb_channels;
        let groups = ctx.norm_groups;
        let eps = ctx.norm_eps;
        let (down_cfg, mid_cfg, up_cfg) = unet_blocks::plan(&l, config.downsample_padding);
        let down = down_cfg
            .iter()
            .enumerate()
            .map(|(i, c)| DownBlock::load(&w.sub(format!("down_blocks.{i}")), c, &ctx))
            .collect::<Result<Vec<_>>>()?;
        let mid = MidBlock::load(&w.sub("mid_block"), &mid_cfg, &ctx)?;
        let up = up_cfg
            .iter()
            .enumerate()
            .map(|(i, c)| UpBlock::load(&w.sub(format!("up_blocks.{i}")), c, &ctx))
            .collect::<Result<Vec<_>>>()?;

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
            cross_attention_dim: ctx.cross_attention_dim,
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
            xs = block.forward(xs, &temb, context, &mut skips)?;
        }
        xs = self.mid.forward(&xs, &temb, context)?;
        for block in &self.up {
            xs = block.forward(xs, &temb, context, &mut skips)?;
        }

        let xs = self.norm_out.forward(&xs)?.f_silu()?;
        self.conv_out.forward(&xs)
    }
}
