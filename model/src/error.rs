//! Errors of the model crate. Each names the file (and tensor) it is about, so a CLI can print one
//! clear line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json is malformed or describes an unsupported model.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A safetensors file is corrupt or unreadable.
    #[error("{path}: invalid safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// A tensor the architecture needs is absent from every weight file.
    #[error("{dir}: missing tensor {name}")]
    MissingTensor { dir: PathBuf, name: String },
    /// A tensor has the wrong shape or dtype.
    #[error("{path}: tensor {name}: {msg}")]
    BadTensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// A GGUF file is corrupt or uses something we cannot import.
    #[error("{path}: {msg}")]
    Gguf { path: PathBuf, msg: String },
    /// The tokenizer files are missing or invalid.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Tokenizing or detokenizing failed at run time.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request that the model cannot serve (e.g. longer than its context).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Kernel(#[from] qlorad_kernels::KernelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
