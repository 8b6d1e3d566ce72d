//! qlorad-trainer: QLoRA training on a frozen NF4 base (data, step, optimizer, checkpoints,
//! merge/export). Landed so far: the data layer (formats, validation with line numbers, tokenization
//! with assistant-only loss masks, packing, length-grouped batching) and the training step (LoRA
//! weights as candle Vars over the NF4 base, masked causal-LM loss, clipping, AdamW), and promotion
//! (an adapter merged into its base and exported as a plain Hugging Face model, [`merge`]).

pub mod checkpoint;
pub mod data;
pub mod merge;
pub mod optim;
pub mod parallel;
#[cfg(feature = "cuda")]
pub mod parallel_nccl;
pub mod step;
#[cfg(feature = "cuda")]
mod step_layered;
pub mod train;

pub use data::{load_examples, validate_file, DataError, DataOptions, Example};
