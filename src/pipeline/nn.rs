//! The few layer types the models are built from, each holding tensors taken from [`Scope`] with
//! the shape the config implies. Forward passes return `Result` so a CUDA error (out of memory)
//! reaches the caller as an error instead of a panic.
use super::weights::Scope;
use crate::error::Result;
use tch::Tensor;

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(s: &Scope, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: s.get("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(s.get("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn load(
        s: &Scope,
        in_ch: i64,
        out_ch: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: s.get("weight", &[out_ch, in_ch, kernel, kernel])?,
            bias: s.get("bias", &[out_ch])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv(xs)
    }

    fn conv(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?)
    }
}

pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn load(s: &Scope, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: s.get("weight", &[channels])?,
            bias: s.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn load(s: &Scope, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: s.get("weight", &[dim])?,
            bias: s.get("bias", &[dim])?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}
