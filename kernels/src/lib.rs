//! qlorad-kernels: the NF4 format (byte-compatible with bitsandbytes) and the numeric ops of qlorad.
//!
//! Tensors in, tensors out: nothing here knows about models. Every op has a CPU implementation that
//! is always compiled and serves as the reference for the CUDA one (behind the `cuda` feature).

#[cfg(feature = "cuda")]
pub mod attention_train_cuda;
pub mod bgmv;
#[cfg(feature = "cuda")]
mod bgmv_cuda;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod decode_cuda;
mod decode_split;
pub mod dynamic;
pub mod error;
pub mod gemv;
#[cfg(feature = "cuda")]
mod kv_table_cuda;
#[cfg(feature = "cuda")]
pub mod lora_train_cuda;
#[cfg(feature = "cuda")]
pub mod mapped_cuda;
#[cfg(feature = "cuda")]
pub mod module_cuda;
#[cfg(feature = "cuda")]
pub mod multi_tensor_cuda;
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod nf4_group_cuda;
pub mod nf4_matmul;
pub mod nf4_op;
#[cfg(feature = "cuda")]
mod norm_shrink_cuda;
#[cfg(feature = "cuda")]
pub mod pdl_cuda;
#[cfg(feature = "cuda")]
pub mod readback_cuda;
#[cfg(feature = "cuda")]
pub mod staged_cuda;
#[cfg(feature = "cuda")]
pub mod step_graph_cuda;
pub mod switch;
pub mod tiled;
#[cfg(feature = "cuda")]
pub mod train_cuda;
#[cfg(feature = "cuda")]
pub mod train_elem_cuda;
#[cfg(feature = "cuda")]
pub mod upload_cuda;

pub use error::{KernelError, Result};
pub use nf4::{Absmax, DoubleQuant, Nf4Config, Nf4Tensor, NF4_CODE};
pub use nf4_op::{nf4_linear, Nf4Matmul, Nf4MatmulGrad, Nf4Weight};
