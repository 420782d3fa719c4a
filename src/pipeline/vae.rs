//! diffusers' `AutoencoderKL`: the decoder (latents, already divided by the scaling factor, to
//! images in [-1, 1]) and the encoder (images in [-1, 1] to the latent distribution, for
//! img2img). Sizes come from `vae/config.json`.
use super::attention::{Attention, AttentionOptions};
use super::config::VaeConfig;
use super::nn::{Conv2d, GroupNorm};
use super::resnet::{Downsample, ResnetBlock, Upsample};
use super::weights::Scope;
use crate::error::Result;
use std::path::Path;
use tch::Tensor;

const EPS: f64 = 1e-6;

/// The mid block's single-head spatial self-attention (group norm, attention, residual).
struct SpatialAttention {
    norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn load(s: &Scope, channels: i64, groups: i64) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(&s.sub("group_norm"), groups, channels, EPS)?,
            attn: Attention::load(
                s,
                channels,
                channels,
                1,
                channels,
                true,
                AttentionOptions::default(),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.size4()?;
        // As diffusers: the group norm runs on `[b, c, h·w]`. Three dimensions take libtorch's
        // contiguous kernel even when `xs` is channels last (an encoded init image), whose
        // 4-D kernel sums in another order.
        let tokens = self
            .norm
            .forward(&xs.f_view([b, c, h * w])?)?
            .f_transpose(1, 2)?;
        let out = self.attn.forward(&tokens, None)?;
        let out = out.f_transpose(1, 2)?.f_reshape([b, c, h, w])?;
        Ok(out.f_add(xs)?)
    }
}

/// The mid block both halves share: resnet, optional single-head attention, resnet.
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn load(s: &Scope, channels: i64, groups: i64, attention: bool) -> Result<Self> {
        let resnet = |j: usize| {
            ResnetBlock::load(
                &s.sub(format!("resnets.{j}")),
                channels,
                channels,
                None,
                groups,
                EPS,
            )
        };
        Ok(Self {
            resnet_in: resnet(0)?,
            attention: attention
                .then(|| SpatialAttention::load(&s.sub("attentions.0"), channels, groups))
                .transpose()?,
            resnet_out: resnet(1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet_out.forward(&xs, None)
    }
}

struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpDecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    latent_channels: i64,
}

impl VaeDecoder {
    pub fn load(config: &VaeConfig, config_path: &Path, w: &Scope) -> Result<Self> {
        config.validate(config_path)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups;
        let lat = config.latent_channels;
        let d = w.sub("decoder");
        let top = ch[n - 1];

        let mut up = Vec::with_capacity(n);
        let mut prev_out = top;
        for i in 0..n {
            let s = d.sub(format!("up_blocks.{i}"));
            let out_ch = ch[n - 1 - i];
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let in_ch = if j == 0 { prev_out } else { out_ch };
                    ResnetBlock::load(
                        &s.sub(format!("resnets.{j}")),
                        in_ch,
                        out_ch,
                        None,
                        groups,
                        EPS,
                    )
                })
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < n)
                .then(|| Upsample::load(&s.sub("upsamplers.0"), out_ch))
                .transpose()?;
            up.push(UpDecoderBlock { resnets, upsample });
            prev_out = out_ch;
        }

        Ok(Self {
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::load(&w.sub("post_quant_conv"), lat, lat, 1, 1, 0))
                .transpose()?,
            conv_in: Conv2d::load(&d.sub("conv_in"), lat, top, 3, 1, 1)?,
            mid: MidBlock::load(
                &d.sub("mid_block"),
                top,
                groups,
                config.mid_block_add_attention,
            )?,
            up,
            norm_out: GroupNorm::load(&d.sub("conv_norm_out"), groups, ch[0], EPS)?,
            conv_out: Conv2d::load(&d.sub("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            latent_channels: lat,
        })
    }

    pub fn latent_channels(&self) -> i64 {
        self.latent_channels
    }

    /// Decodes `z` (`[batch, latent_channels, h, w]`, already divided by the scaling factor).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.shallow_clone(),
        };
        let mut xs = self.mid.forward(&self.conv_in.forward(&z)?)?;
        for block in &self.up {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsample {
                let (_, _, h, w) = xs.size4()?;
                xs = up.forward(&xs, [h * 2, w * 2])?;
            }
        }
        let xs = self.norm_out.forward(&xs)?.f_silu()?;
        self.conv_out.forward(&xs)
    }
}

struct DownEncoderBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

/// The encoder half: `[batch, 3, H, W]` in [-1, 1] to the diagonal Gaussian over latents
/// (`[batch, 2 · latent_channels, H/8, W/8]`: means, then log-variances).
pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: i64,
}

/// The latent distribution an image encodes to.
pub struct LatentDistribution {
    pub mean: Tensor,
    /// `exp(0.5 · logvar)`, the log-variance clamped to [-30, 20] as diffusers does.
    pub std: Tensor,
}

impl LatentDistribution {
    /// `mean + std · noise`: diffusers' `latent_dist.sample(generator)` with `noise` drawn from
    /// that generator.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok(self.mean.f_add(&self.std.f_mul(noise)?)?)
    }
}

impl VaeEncoder {
    /// `None` when the weights have no encoder (a decoder-only VAE file).
    pub fn load(config: &VaeConfig, config_path: &Path, w: &Scope) -> Result<Option<Self>> {
        config.validate(config_path)?;
        let e = w.sub("encoder");
        if !e.contains("conv_in.weight") {
            return Ok(None);
        }
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups;
        let lat = config.latent_channels;
        let top = ch[n - 1];
        let mut down = Vec::with_capacity(n);
        let mut prev_out = ch[0];
        for (i, &out_ch) in ch.iter().enumerate() {
            let s = e.sub(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let in_ch = if j == 0 { prev_out } else { out_ch };
                    ResnetBlock::load(
                        &s.sub(format!("resnets.{j}")),
                        in_ch,
                        out_ch,
                        None,
                        groups,
                        EPS,
                    )
                })
                .collect::<Result<_>>()?;
            // diffusers' encoder downsamples with padding 0 (one row and column padded at the end).
            let downsample = (i + 1 < n)
                .then(|| Downsample::load(&s.sub("downsamplers.0"), out_ch, 0))
                .transpose()?;
            down.push(DownEncoderBlock {
                resnets,
                downsample,
            });
            prev_out = out_ch;
        }
        Ok(Some(Self {
            conv_in: Conv2d::load(&e.sub("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: MidBlock::load(
                &e.sub("mid_block"),
                top,
                groups,
                config.mid_block_add_attention,
            )?,
            norm_out: GroupNorm::load(&e.sub("conv_norm_out"), groups, top, EPS)?,
            conv_out: Conv2d::load(&e.sub("conv_out"), top, 2 * lat, 3, 1, 1)?,
            quant_conv: config
                .use_quant_conv
                .unwrap_or(true)
                .then(|| Conv2d::load(&w.sub("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0))
                .transpose()?,
            latent_channels: lat,
        }))
    }

    /// Encodes `images` (`[batch, 3, H, W]` in [-1, 1], H and W multiples of 8).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(down) = &block.downsample {
                xs = down.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        let xs = self.norm_out.forward(&xs)?.f_silu()?;
        let mut moments = self.conv_out.forward(&xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let parts = moments.f_split(self.latent_channels, 1)?;
        let logvar = parts[1].f_clamp(-30.0, 20.0)?;
        Ok(LatentDistribution {
            mean: parts[0].shallow_clone(),
            std: logvar.f_mul_scalar(0.5)?.f_exp()?,
        })
    }
}
