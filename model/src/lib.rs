//! qlorad-model: the Llama/Mistral transformer over a frozen NF4 (or full-precision) base.
//!
//! Config parsing, weight loading (safetensors, sharded, bitsandbytes 4-bit layout), GGUF import,
//! the decoder with an explicit per-sequence KV cache, tokenizer + chat template, and sampling.

pub mod attention_cpu;
pub mod bnb;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf_import;
mod gguf_tokenizer;
pub mod gpu_gate;
pub mod graph_cache;
pub mod host_profile;
pub mod io;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod quantize;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use attention_cpu::CpuAttention;
pub use config::Config;
pub use device::{DeviceSpec, Placement};
pub use error::{ModelError, Result};
pub use generate::{generate, FinishReason, GenerateParams, Generation};
pub use kv_cache::KvCache;
pub use llama::{Llama, Logits, SeqInput};
pub use loader::Quant;
pub use lora::LoraAdapter;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{ChatMessage, Tokenizer};

/// Loads a model folder: config, weights stored as `quant` asks, and tokenizer (on the CPU, f32).
pub fn load_model(dir: &std::path::Path, quant: Quant) -> Result<(Llama, Tokenizer)> {
    load_model_on(dir, quant, &Placement::cpu())
}

/// Loads a model folder with its weights placed on `p` (device and compute dtype).
pub fn load_model_on(
    dir: &std::path::Path,
    quant: Quant,
    p: &Placement,
) -> Result<(Llama, Tokenizer)> {
    let (cfg, weights) = loader::load(dir, quant)?;
    let eos = cfg.eos_token_ids.clone();
    let model = Llama::new_on(cfg, weights, p)?;
    let tok = Tokenizer::from_dir(dir, &eos)?;
    Ok((model, tok))
}
