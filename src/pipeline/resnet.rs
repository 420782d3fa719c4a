//! diffusers' `ResnetBlock2D` and the up/down-sampling convolutions, shared by the UNet and the VAE.
use super::nn::{Conv2d, GroupNorm, Linear};
use super::weights::Scope;
use crate::error::Result;
use tch::Tensor;

pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb_channels`: width of the time embedding (UNet), `None` for the VAE.
    pub fn load(
        s: &Scope,
        in_ch: i64,
        out_ch: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&s.sub("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::load(&s.sub("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: temb_channels
                .map(|t| Linear::load(&s.sub("time_emb_proj"), t, out_ch, true))
                .transpose()?,
            norm2: GroupNorm::load(&s.sub("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::load(&s.sub("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2d::load(&s.sub("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `temb_act`: the time embedding already passed through SiLU (computed once per UNet call).
    pub fn forward(&self, xs: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(xs)?.f_silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_act) {
            h = h.f_add(&proj.forward(temb)?.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.f_silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.shallow_clone(),
        };
        Ok(shortcut.f_add(&h)?)
    }
}

/// `Downsample2D` with a convolution: stride 2.
pub struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    pub fn load(s: &Scope, channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&s.sub("conv"), channels, channels, 3, 2, padding)?,
            // With padding 0 diffusers pads one row and column at the end, keeping sizes halved.
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            self.conv.forward(&xs.f_constant_pad_nd([0, 1, 0, 1])?)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D` with a convolution: nearest-neighbour resize, then a 3x3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(s: &Scope, channels: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&s.sub("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Resizes to `size` (`[h, w]`); the UNet passes the size of the matching skip connection so odd
    /// latent sizes round-trip, which for even sizes is exactly a 2x upscale.
    pub fn forward(&self, xs: &Tensor, size: [i64; 2]) -> Result<Tensor> {
        self.conv
            .forward(&xs.f_upsample_nearest2d(size, None, None)?)
    }
}
