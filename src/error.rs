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

    #[error(
        "unknown scheduler `{0}` (known: pndm, ddim, euler, euler_karras, euler_ancestral, euler_ancestral_karras, heun, heun_karras, lms, lms_karras, dpmpp_2m, dpmpp_2m_karras, unipc, unipc_karras, lcm)"
    )]
    UnknownScheduler(String),

    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
