//! `qlorad import-gguf`: converts a llama.cpp GGUF (architecture `llama`) into a Hugging Face folder
//! (safetensors, config.json, tokenizer.json, tokenizer_config.json with the chat template,
//! generation_config.json).
//!
//! Tensors are dequantized by candle's GGML kernels (F32/F16/Q8_0/Q4_0/Q4_1 and the k-quants), renamed
//! to transformers' names, and llama.cpp's Q/K row permutation is undone: `convert_hf_to_gguf.py`
//! applies `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`, so we apply the inverse
//! `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)` (transformers' `gguf` loader does the
//! same in `reverse_permute_weights`). The tokenizer is rebuilt from the GGUF vocabulary and merges as
//! a byte-level BPE with a digit-by-digit pre-tokenizer, as SmolLM's tokenizer.json has.

use crate::error::{ModelError, Result};
use crate::io::{torch_dtype_name, write_json, write_safetensors, OwnedTensor, StagingDir};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use safetensors::Dtype;
use serde_json::{json, Map};
use std::fs::File;
use std::path::Path;

/// Options of an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// dtype of the written weights (F32, F16 or BF16).
    pub dtype: Dtype,
    pub overwrite: bool,
}

fn err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
    fn u(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| err(self.path, format!("missing metadata {key}")))?;
        value_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| err(self.path, format!("metadata {key} is not an integer")))
    }
    fn opt_u(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(value_u64).map(|x| x as usize)
    }
    fn opt_f(&self, key: &str) -> Option<f64> {
        self.get(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }
    fn opt_s(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok().cloned())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .get(key)
            .ok_or_else(|| err(self.path, format!("missing metadata {key}")))?;
        let arr = v
            .to_vec()
            .map_err(|_| err(self.path, format!("metadata {key} is not an array")))?;
        arr.iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|_| err(self.path, format!("{key}: non-string entry")))
            })
            .collect()
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    v.to_u64()
        .ok()
        .or_else(|| v.to_u32().ok().map(u64::from))
        .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
        .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
}

/// Model hyper-parameters read from GGUF metadata.
struct Hparams {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    ctx: usize,
    theta: f64,
    eps: f64,
    head_dim: usize,
}

fn hparams(m: &Meta) -> Result<Hparams> {
    let arch = m.opt_s("general.architecture").unwrap_or_default();
    if arch != "llama" {
        return Err(err(
            m.path,
            format!("unsupported architecture {arch:?} (import-gguf reads llama GGUFs; Mistral GGUFs also use \"llama\")"),
        ));
    }
    let heads = m.u("llama.attention.head_count")?;
    let hidden = m.u("llama.embedding_length")?;
    Ok(Hparams {
        layers: m.u("llama.block_count")?,
        hidden,
        ffn: m.u("llama.feed_forward_length")?,
        heads,
        kv_heads: m.opt_u("llama.attention.head_count_kv").unwrap_or(heads),
        ctx: m.opt_u("llama.context_length").unwrap_or(2048),
        theta: m.opt_f("llama.rope.freq_base").unwrap_or(10_000.0),
        eps: m
            .opt_f("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5),
        head_dim: m
            .opt_u("llama.rope.dimension_count")
            .unwrap_or(hidden / heads.max(1)),
    })
}

/// GGUF tensor name → transformers name, and the head count to un-permute with (Q and K only).
fn hf_name(gguf: &str, hp: &Hparams) -> Option<(String, Option<usize>)> {
    match gguf {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (name, perm) = match tail {
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(hp.heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(hp.kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{name}"), perm))
}

/// Undoes llama.cpp's rotary permutation of a (rows, cols) Q or K weight.
fn unpermute(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((n_head, rows / n_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Imports `gguf` into the folder `out`.
pub fn import_gguf(gguf: &Path, out: &Path, opts: &ImportOptions) -> Result<()> {
    let mut file = File::open(gguf).map_err(|e| ModelError::io(gguf, e))?;
    let content =
        Content::read(&mut file).map_err(|e| err(gguf, format!("not a valid GGUF file: {e}")))?;
    let meta = Meta {
        path: gguf,
        content: &content,
    };
    let hp = hparams(&meta)?;
    let tok = crate::gguf_tokenizer::build(&meta_view(&meta))?;
    let staging = StagingDir::new(out, opts.overwrite)?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for gname in names {
        let Some((name, perm)) = hf_name(gname, &hp) else {
            // rope_freqs and other llama.cpp-only tensors have no transformers counterpart.
            tracing::debug!(tensor = %gname, "skipping GGUF tensor with no HF equivalent");
            continue;
        };
        let q = content
            .tensor(&mut file, gname, &Device::Cpu)
            .map_err(|e| err(gguf, format!("tensor {gname}: {e}")))?;
        let mut w = q.dequantize(&Device::Cpu).map_err(|e| {
            err(
                gguf,
                format!("tensor {gname}: cannot dequantize {:?}: {e}", q.dtype()),
            )
        })?;
        if let Some(n) = perm {
            w = unpermute(&w, n).map_err(|e| err(gguf, format!("tensor {gname}: {e}")))?;
        }
        let shape = w.dims().to_vec();
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        tensors.push(OwnedTensor::float(&name, shape, &values, opts.dtype));
    }
    let has_output = tensors.iter().any(|t| t.name == "lm_head.weight");
    let vocab = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .map(|t| t.shape[0])
        .ok_or_else(|| err(gguf, "missing tensor token_embd.weight"))?;
    write_safetensors(&staging.path().join("model.safetensors"), &tensors)?;
    drop(tensors);

    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    cfg.insert("model_type".into(), json!("llama"));
    cfg.insert("hidden_size".into(), json!(hp.hidden));
    cfg.insert("intermediate_size".into(), json!(hp.ffn));
    cfg.insert("num_hidden_layers".into(), json!(hp.layers));
    cfg.insert("num_attention_heads".into(), json!(hp.heads));
    cfg.insert("num_key_value_heads".into(), json!(hp.kv_heads));
    cfg.insert("head_dim".into(), json!(hp.head_dim));
    cfg.insert("hidden_act".into(), json!("silu"));
    cfg.insert("max_position_embeddings".into(), json!(hp.ctx));
    cfg.insert("rms_norm_eps".into(), json!(hp.eps));
    cfg.insert("rope_theta".into(), json!(hp.theta));
    cfg.insert("vocab_size".into(), json!(vocab));
    cfg.insert("tie_word_embeddings".into(), json!(!has_output));
    cfg.insert("attention_bias".into(), json!(false));
    cfg.insert("mlp_bias".into(), json!(false));
    cfg.insert("torch_dtype".into(), json!(torch_dtype_name(opts.dtype)));
    if let Some(b) = tok.bos_id {
        cfg.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = tok.eos_id {
        cfg.insert("eos_token_id".into(), json!(e));
    }
    let dir = staging.path();
    write_json(&dir.join("config.json"), &serde_json::Value::Object(cfg))?;
    write_json(&dir.join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(&dir.join("tokenizer_config.json"), &tok.tokenizer_config)?;
    let mut gen = Map::new();
    if let Some(b) = tok.bos_id {
        gen.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = tok.eos_id {
        gen.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = tok.pad_id {
        gen.insert("pad_token_id".into(), json!(p));
    }
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::Value::Object(gen),
    )?;
    staging.commit()
}

/// The metadata accessors the tokenizer builder needs.
pub(crate) struct MetaView<'a> {
    pub path: &'a Path,
    pub content: &'a Content,
}

fn meta_view<'a>(m: &Meta<'a>) -> MetaView<'a> {
    MetaView {
        path: m.path,
        content: m.content,
    }
}

impl MetaView<'_> {
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        Meta {
            path: self.path,
            content: self.content,
        }
        .strings(key)
    }
    pub fn opt_u(&self, key: &str) -> Option<usize> {
        self.content
            .metadata
            .get(key)
            .and_then(value_u64)
            .map(|x| x as usize)
    }
    pub fn opt_s(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    }
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_bool().ok())
    }
    pub fn opt_ints(&self, key: &str) -> Option<Vec<i64>> {
        let arr = self.content.metadata.get(key)?.to_vec().ok()?;
        Some(
            arr.iter()
                .filter_map(|v| {
                    v.to_i32()
                        .ok()
                        .map(i64::from)
                        .or_else(|| value_u64(v).map(|x| x as i64))
                })
                .collect(),
        )
    }
    pub fn err(&self, msg: impl Into<String>) -> ModelError {
        err(self.path, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() -> candle_core::Result<()> {
        let (n_head, rows, cols) = (3usize, 12usize, 2usize);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        // convert_hf_to_gguf.py's permute
        let p = w
            .reshape((n_head, 2, rows / n_head / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
        let back = unpermute(&p, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
