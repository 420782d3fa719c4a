//! The UNet's blocks, each with its own small config: a down block (`DownBlock2D` /
//! `CrossAttnDownBlock2D`), the middle block (`UNetMidBlock2DCrossAttn`) and an up block
//! (`UpBlock2D` / `CrossAttnUpBlock2D`). [`plan`] turns the config's layout into per-block
//! configs, so the channel arithmetic of the skip connections is in one pure, tested function
//! rather than spread over the loader.
use super::attention::AttentionOptions;
use super::config::UNetLayout;
use super::resnet::{Downsample, ResnetBlock, Upsample};
use super::transformer::Transformer2D;
use super::weights::Scope;
use crate::error::{Error, Result};
use tch::Tensor;

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    pub norm_groups: i64,
    pub norm_eps: f64,
    /// Width of the time embedding every ResNet projects.
    pub temb_channels: i64,
    pub cross_attention_dim: i64,
    pub linear_projection: bool,
    pub attention: AttentionOptions,
}

/// The cross-attention transformers of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    pub heads: i64,
    pub transformer_layers: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownBlockConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub layers: i64,
    /// `None`: a plain `DownBlock2D`.
    pub attention: Option<AttentionConfig>,
    /// Padding of the strided convolution that halves the resolution; `None` for the last block.
    pub downsample_padding: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MidBlockConfig {
    pub channels: i64,
    pub attention: AttentionConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpBlockConfig {
    pub out_channels: i64,
    /// Per ResNet: (channels coming from below, channels of the skip connection it concatenates).
    pub resnet_inputs: Vec<(i64, i64)>,
    pub attention: Option<AttentionConfig>,
    /// Doubles the resolution after the block (every block but the last).
    pub upsample: bool,
}

/// Per-block configs from the UNet's layout. The up path mirrors the down path: up block `i`
/// pairs with down block `n-1-i`, has one ResNet more than it, and consumes the skip connections
/// the down path pushed (its outputs, and the input of the first block last).
pub fn plan(
    l: &UNetLayout,
    downsample_padding: i64,
) -> (Vec<DownBlockConfig>, MidBlockConfig, Vec<UpBlockConfig>) {
    let n = l.channels.len();
    let attention = |i: usize| AttentionConfig {
        heads: l.heads[i],
        transformer_layers: l.transformer_layers[i],
    };
    let down = (0..n)
        .map(|i| DownBlockConfig {
            in_channels: if i == 0 {
                l.channels[0]
            } else {
                l.channels[i - 1]
            },
            out_channels: l.channels[i],
            layers: l.layers_per_block[i],
            attention: l.down_attn[i].then(|| attention(i)),
            downsample_padding: (i + 1 < n).then_some(downsample_padding),
        })
        .collect();
    let mid = MidBlockConfig {
        channels: l.channels[n - 1],
        attention: attention(n - 1),
    };
    let mut up = Vec::with_capacity(n);
    let mut from_below = l.channels[n - 1];
    for i in 0..n {
        let r = n - 1 - i;
        let out = l.channels[r];
        // The last ResNet of the block takes the skip pushed before down block r started: the
        // output of block r-1 (or conv_in's, for the first block).
        let skip_in = l.channels[r.saturating_sub(1)];
        let layers = l.layers_per_block[r] + 1;
        let resnet_inputs = (0..layers)
            .map(|j| {
                let below = if j == 0 { from_below } else { out };
                let skip = if j == layers - 1 { skip_in } else { out };
                (below, skip)
            })
            .collect();
        up.push(UpBlockConfig {
            out_channels: out,
            resnet_inputs,
            attention: l.up_attn[i].then(|| attention(r)),
            upsample: i + 1 < n,
        });
        from_below = out;
    }
    (down, mid, up)
}

fn transformer(
    s: &Scope,
    channels: i64,
    a: AttentionConfig,
    ctx: &BlockContext,
) -> Result<Transformer2D> {
    Transformer2D::load(
        s,
        channels,
        a.heads,
        ctx.cross_attention_dim,
        a.transformer_layers,
        ctx.norm_groups,
        ctx.linear_projection,
        ctx.attention,
    )
}

fn resnet(s: &Scope, in_ch: i64, out_ch: i64, ctx: &BlockContext) -> Result<ResnetBlock> {
    ResnetBlock::load(
        s,
        in_ch,
        out_ch,
        Some(ctx.temb_channels),
        ctx.norm_groups,
        ctx.norm_eps,
    )
}

/// ResNets, each optionally followed by its transformer.
fn resnets_with_attention(
    s: &Scope,
    inputs: impl Iterator<Item = i64>,
    out_ch: i64,
    attention: Option<AttentionConfig>,
    ctx: &BlockContext,
) -> Result<(Vec<ResnetBlock>, Vec<Transformer2D>)> {
    let mut resnets = Vec::new();
    let mut attentions = Vec::new();
    for (j, in_ch) in inputs.enumerate() {
        resnets.push(resnet(&s.sub(format!("resnets.{j}")), in_ch, out_ch, ctx)?);
        if let Some(a) = attention {
            attentions.push(transformer(
                &s.sub(format!("attentions.{j}")),
                out_ch,
                a,
                ctx,
            )?);
        }
    }
    Ok((resnets, attentions))
}

pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    pub fn load(s: &Scope, c: &DownBlockConfig, ctx: &BlockContext) -> Result<Self> {
        let inputs = (0..c.layers).map(|j| {
            if j == 0 {
                c.in_channels
            } else {
                c.out_channels
            }
        });
        let (resnets, attentions) =
            resnets_with_attention(s, inputs, c.out_channels, c.attention, ctx)?;
        let downsample = c
            .downsample_padding
            .map(|padding| Downsample::load(&s.sub("downsamplers.0"), c.out_channels, padding))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Runs the block, pushing every intermediate output as a skip connection for the up path.
    pub fn forward(
        &self,
        mut xs: Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.shallow_clone());
        }
        if let Some(down) = &self.downsample {
            xs = down.forward(&xs)?;
            skips.push(xs.shallow_clone());
        }
        Ok(xs)
    }
}

pub struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    pub fn load(s: &Scope, c: &MidBlockConfig, ctx: &BlockContext) -> Result<Self> {
        Ok(Self {
            resnet_in: resnet(&s.sub("resnets.0"), c.channels, c.channels, ctx)?,
            attention: transformer(&s.sub("attentions.0"), c.channels, c.attention, ctx)?,
            resnet_out: resnet(&s.sub("resnets.1"), c.channels, c.channels, ctx)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, Some(temb))?;
        let xs = self.attention.forward(&xs, context)?;
        self.resnet_out.forward(&xs, Some(temb))
    }
}

pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    pub fn load(s: &Scope, c: &UpBlockConfig, ctx: &BlockContext) -> Result<Self> {
        let inputs = c.resnet_inputs.iter().map(|(below, skip)| below + skip);
        let (resnets, attentions) =
            resnets_with_attention(s, inputs, c.out_channels, c.attention, ctx)?;
        let upsample = c
            .upsample
            .then(|| Upsample::load(&s.sub("upsamplers.0"), c.out_channels))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    /// Runs the block, taking its skip connections from the end of `skips`.
    pub fn forward(
        &self,
        mut xs: Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                Error::InvalidArgument(
                    "UNet skip connections exhausted (inconsistent block layout)".into(),
                )
            })?;
            xs = resnet.forward(&Tensor::f_cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
        }
        if let Some(up) = &self.upsample {
            // The size of the skip this resolution will be concatenated with (odd sizes do not
            // simply double).
            let target = match skips.last().map(|t| t.size()) {
                Some(size) if size.len() == 4 => [size[2], size[3]],
                _ => [xs.size()[2] * 2, xs.size()[3] * 2],
            };
            xs = up.forward(&xs, target)?;
        }
        Ok(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD v1-4's layout: 320/640/1280/1280, two ResNets per block, 8 heads, no attention in the
    /// last down block and the first up block.
    fn sd14() -> UNetLayout {
        UNetLayout {
            channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            heads: vec![8; 4],
            transformer_layers: vec![1; 4],
            cross_attention_dim: 768,
            down_attn: vec![true, true, true, false],
            up_attn: vec![false, true, true, true],
        }
    }

    #[test]
    fn sd14_block_channels() {
        let (down, mid, up) = plan(&sd14(), 1);
        let io: Vec<(i64, i64)> = down
            .iter()
            .map(|d| (d.in_channels, d.out_channels))
            .collect();
        assert_eq!(io, [(320, 320), (320, 640), (640, 1280), (1280, 1280)]);
        assert_eq!(down[3].attention, None);
        assert_eq!(down[3].downsample_padding, None);
        assert_eq!(down[0].downsample_padding, Some(1));
        assert_eq!(mid.channels, 1280);
        // diffusers' up blocks of SD v1-4 (resnets' in_channels = below + skip):
        // up 0: 2560 2560 2560; up 1: 2560 2560 1920; up 2: 1920 1280 960; up 3: 960 640 640.
        let ins: Vec<Vec<i64>> = up
            .iter()
            .map(|u| u.resnet_inputs.iter().map(|(a, b)| a + b).collect())
            .collect();
        assert_eq!(
            ins,
            [
                vec![2560, 2560, 2560],
                vec![2560, 2560, 1920],
                vec![1920, 1280, 960],
                vec![960, 640, 640]
            ]
        );
        let outs: Vec<i64> = up.iter().map(|u| u.out_channels).collect();
        assert_eq!(outs, [1280, 1280, 640, 320]);
        assert_eq!(up[0].attention, None);
        assert!(up[1].attention.is_some());
        assert_eq!(up.iter().filter(|u| u.upsample).count(), 3);
        assert!(!up[3].upsample);
    }

    #[test]
    fn skips_pushed_equal_skips_consumed() {
        for layout in [
            sd14(),
            UNetLayout {
                channels: vec![32, 64, 64],
                layers_per_block: vec![1, 2, 3],
                heads: vec![2, 4, 4],
                transformer_layers: vec![1, 2, 1],
                cross_attention_dim: 40,
                down_attn: vec![true, true, false],
                up_attn: vec![false, true, true],
            },
        ] {
            let (down, _, up) = plan(&layout, 1);
            // conv_in's output, then one per down ResNet and one per downsampler.
            let mut pushed = vec![layout.channels[0]];
            for d in &down {
                pushed.extend(std::iter::repeat_n(d.out_channels, d.layers as usize));
                if d.downsample_padding.is_some() {
                    pushed.push(d.out_channels);
                }
            }
            let consumed: Vec<i64> = up
                .iter()
                .flat_map(|u| u.resnet_inputs.iter().map(|(_, skip)| *skip))
                .collect();
            pushed.reverse();
            assert_eq!(pushed, consumed, "{layout:?}");
        }
    }
}
