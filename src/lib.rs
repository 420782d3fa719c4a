//! sdbatch: Stable Diffusion v1 batch image generation on libtorch.
//!
//! - [`pipeline`]: the model (tokenizer, CLIP, UNet, VAE, schedulers) and the text-to-image loop.
//! - [`device`]: CUDA start-up and device/dtype selection.
//! - [`prompts`]: prompt files (`.txt`, `.jsonl`).
//! - [`output`]: PNG files and their JSON sidecars.
//! - [`message`], [`events`]: the batch message and the completion events (the wire formats).
//! - [`queue`]: RabbitMQ topology and publishing; [`storage`]: S3 and local-directory sinks.
//! - [`worker`]: the queue consumer; [`config`]: its TOML file; [`submit_input`]: producer input.
pub mod batching;
pub mod bounded;
pub mod bridge;
pub mod cancel;
pub mod config;
pub mod device;
pub mod error;
pub mod events;
pub mod gpu_memory;
pub mod init_image;
pub mod keys;
pub mod message;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod prompts;
pub mod queue;
pub mod status;
pub mod storage;
pub mod submit_input;
pub mod webhook;
pub mod worker;

pub use error::{Error, Result};
