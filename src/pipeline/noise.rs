//! Per-image random noise, drawn exactly as diffusers draws it with one `torch.Generator("cpu")`
//! per image: `randn([1, c, h, w])` for the initial latents, then (ancestral schedulers) one more
//! `randn` of the same shape per step, all from that image's generator in that order.
//!
//! libtorch's CPU generator behind `tch::manual_seed` is process-global, so each image's whole
//! sequence is drawn up front under one lock: seed, then every draw. The result depends only on the
//! seed, never on the batch the image is in or on other threads.
use crate::error::Result;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// The noise one image needs: `draws` tensors of `shape` (`[1, c, h, w]`), on the CPU, in `kind`
/// (diffusers draws in the pipeline's dtype on the CPU generator, then moves to the device).
pub fn image_noise(seed: u64, shape: [i64; 4], kind: Kind, draws: usize) -> Result<Vec<Tensor>> {
    // A poisoned lock only means another thread panicked mid-draw; reseeding below makes the
    // generator state irrelevant, so carry on.
    let _guard = GLOBAL_GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    // torch's manual_seed takes the seed's 64 bits as unsigned; the cast keeps them.
    tch::manual_seed(seed as i64);
    (0..draws)
        .map(|_| Ok(Tensor::f_randn(shape, (kind, Device::Cpu))?))
        .collect()
}

/// The noise of every image of a batch: `draws` draws each, in the order the pipeline uses them.
pub struct BatchNoise {
    per_image: Vec<Vec<Tensor>>,
}

impl BatchNoise {
    pub fn new(
        seeds: impl IntoIterator<Item = u64>,
        shape: [i64; 4],
        kind: Kind,
        draws: usize,
    ) -> Result<Self> {
        Ok(Self {
            per_image: seeds
                .into_iter()
                .map(|seed| image_noise(seed, shape, kind, draws))
                .collect::<Result<_>>()?,
        })
    }

    /// Draw `draw` of every image, stacked into one batch on `device`.
    pub fn batch(&self, draw: usize, device: Device) -> Result<Tensor> {
        let parts: Vec<&Tensor> = self.per_image.iter().map(|v| &v[draw]).collect();
        Ok(Tensor::f_cat(&parts, 0)?.f_to_device(device)?)
    }

    /// Draw `draw` of image `image` alone (`[1, c, h, w]`, on the CPU).
    pub fn image(&self, image: usize, draw: usize) -> &Tensor {
        &self.per_image[image][draw]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_regardless_of_interleaving() {
        let a = image_noise(42, [1, 4, 8, 8], Kind::Float, 3).unwrap();
        let _other = image_noise(7, [1, 4, 8, 8], Kind::Float, 2).unwrap();
        let b = image_noise(42, [1, 4, 8, 8], Kind::Float, 3).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y));
        }
        assert!(!a[0].equal(&a[1]), "consecutive draws must differ");
    }

    #[test]
    fn full_u64_seed_range() {
        let a = image_noise(u64::MAX, [1, 4, 2, 2], Kind::Float, 1).unwrap();
        let b = image_noise(u64::MAX - 1, [1, 4, 2, 2], Kind::Float, 1).unwrap();
        assert!(!a[0].equal(&b[0]));
    }
}
