//! The library's error type. Every loader error names the file (and the tensor or key) it is about,
//! so a user with a broken model folder knows what to fix.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing file {path}")]
    MissingFile { path: PathBuf },

    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },

    #[error("{path}: unsupported value for `{key}`: {value} ({reason})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },

    /// A model file in a format that is never read because reading it could run code (pickle).
    #[error(
        "{path}: {detail}. sdbatch never unpickles model files (a pickle can run arbitrary code), \
         so this file was not read. Convert a checkpoint you trust to safetensors, e.g.:\n  \
         python -c \"import torch; from safetensors.torch import save_file; \
         sd = torch.load('model.ckpt', map_location='cpu', weights_only=True); \
         sd = sd.get('state_dict', sd); \
         save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, \
         'model.safetensors')\"\n\
         or convert it to a diffusers folder with diffusers' \
         scripts/convert_original_stable_diffusion_to_diffusers.py --from_safetensors"
    )]
    NotSafetensors { path: PathBuf, detail: String },

    /// A single-file checkpoint whose keys or shapes fit no supported Stable Diffusion layout.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// A LoRA that cannot be applied: unknown name, unreadable file, unknown keys, a layer the
    /// model lacks.
    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },

    /// A textual-inversion embedding file that cannot be used (layout, shape, trigger, format).
    #[error("{path}: textual-inversion embedding: {message}")]
    Embedding { path: PathBuf, message: String },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A compiled model folder (`--compiled`) that cannot be used: refused, unreadable, failing.
    #[error("compiled model {path}: {message}")]
    Compiled { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{path}:{line}: {message}")]
    PromptFile {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An image the encoder (or the metadata step after it) could not write.
    #[error("{format} encoding failed: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },

    #[error(
        "unknown scheduler `{0}` (known: pndm, ddim, euler, euler_karras, euler_ancestral, euler_ancestral_karras, heun, heun_karras, lms, lms_karras, dpmpp_2m, dpmpp_2m_karras, unipc, unipc_karras, lcm)"
    )]
    UnknownScheduler(String),

    /// The step callback asked to stop (the worker's cancel): no images were made.
    #[error("stopped after step {step} of {steps} at the caller's request")]
    Stopped { step: usize, steps: usize },

    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
