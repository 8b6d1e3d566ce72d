//! Errors of the kernels crate.

/// What can go wrong quantizing, dequantizing or multiplying NF4 tensors.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The blocksize is outside what bitsandbytes accepts (a power of two in 32..=4096).
    #[error("invalid NF4 blocksize {0}: must be a power of two between 32 and 4096")]
    InvalidBlocksize(usize),
    /// Two buffers or shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A tensor has a dtype this op does not take.
    #[error("unsupported dtype {dtype} for {op}")]
    Dtype { op: &'static str, dtype: String },
    /// A value that must be finite is not (NaN or infinite weights cannot be quantized).
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// An error from candle while building or reading a tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KernelError>;
