//! sdbatch: Stable Diffusion v1 batch image generation on libtorch.
//!
//! - [`pipeline`]: the model (tokenizer, CLIP, UNet, VAE, schedulers) and the text-to-image loop.
//! - [`device`]: CUDA start-up and device/dtype selection.
//! - [`prompts`]: prompt files (`.txt`, `.jsonl`).
//! - [`output`]: PNG files and their JSON sidecars.
pub mod device;
pub mod error;
pub mod output;
pub mod pipeline;
pub mod prompts;

pub use error::{Error, Result};
