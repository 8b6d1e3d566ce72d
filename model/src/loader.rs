//! Loading a Llama/Mistral folder: config, weights (plain or bitsandbytes-4-bit safetensors), and the
//! choice of base storage (NF4 quantized on load by default, or full precision).

use crate::bnb;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::linear::{BaseLinear, DenseLinear, Nf4Linear};
use crate::weights::WeightStore;
use candle_core::Tensor;
use qlorad_kernels::Nf4Config;
use rayon::prelude::*;
use std::path::Path;

/// How the frozen projection weights are stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Full precision (f32 on CPU).
    None,
    /// NF4 with the given blocksize / double quantization.
    Nf4(Nf4Config),
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "f32" | "full" => Ok(Quant::None),
            "nf4" => Ok(Quant::Nf4(Nf4Config::default())),
            other => Err(format!(
                "unknown quantization {other:?} (expected nf4 or none)"
            )),
        }
    }
}

/// The 7 projections of one decoder layer, by their HF names.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One decoder layer's weights.
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub q: Box<dyn BaseLinear>,
    pub k: Box<dyn BaseLinear>,
    pub v: Box<dyn BaseLinear>,
    pub o: Box<dyn BaseLinear>,
    pub gate: Box<dyn BaseLinear>,
    pub up: Box<dyn BaseLinear>,
    pub down: Box<dyn BaseLinear>,
}

/// All weights of a model.
pub struct ModelWeights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    pub lm_head: Option<Tensor>,
}

/// Expected (out, in) of each projection.
pub fn projection_shape(cfg: &Config, proj: &str) -> (usize, usize) {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    match proj {
        "self_attn.q_proj" => (cfg.num_heads * hd, h),
        "self_attn.k_proj" | "self_attn.v_proj" => (cfg.num_kv_heads * hd, h),
        "self_attn.o_proj" => (h, cfg.num_heads * hd),
        "mlp.gate_proj" | "mlp.up_proj" => (i, h),
        _ => (h, i), // mlp.down_proj
    }
}

/// Reads `dir/config.json` and the weights, storing projections as `quant` asks.
pub fn load(dir: &Path, quant: Quant) -> Result<(Config, ModelWeights)> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(dir)?;
    let weights = load_weights(&cfg, &store, quant)?;
    Ok((cfg, weights))
}

fn load_weights(cfg: &Config, store: &WeightStore, quant: Quant) -> Result<ModelWeights> {
    let h = cfg.hidden_size;
    let embed = store.f32_tensor("model.embed_tokens.weight", Some(&[cfg.vocab_size, h]))?;
    let norm = store.f32_tensor("model.norm.weight", Some(&[h]))?;
    let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
        None
    } else {
        Some(store.f32_tensor("lm_head.weight", Some(&[cfg.vocab_size, h]))?)
    };
    // Layers load in parallel: each is independent, and converting + quantizing a 7B model's
    // projections one after another takes most of a minute. Errors are reported in layer order
    // (the first bad tensor of the file), not in whichever order the threads hit them.
    let layers = (0..cfg.num_layers)
        .into_par_iter()
        .map(|l| load_layer(cfg, store, quant, l))
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    Ok(ModelWeights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

fn load_layer(cfg: &Config, store: &WeightStore, quant: Quant, l: usize) -> Result<LayerWeights> {
    let h = cfg.hidden_size;
    let p = format!("model.layers.{l}");
    let mut projs: Vec<Box<dyn BaseLinear>> = Vec::with_capacity(7);
    for proj in PROJECTIONS {
        projs.push(load_projection(
            cfg,
            store,
            &format!("{p}.{proj}"),
            proj,
            quant,
        )?);
    }
    let mut it = projs.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| ModelError::Invalid("projection count".into()))
    };
    Ok(LayerWeights {
        input_norm: store.f32_tensor(&format!("{p}.input_layernorm.weight"), Some(&[h]))?,
        post_norm: store.f32_tensor(&format!("{p}.post_attention_layernorm.weight"), Some(&[h]))?,
        q: next()?,
        k: next()?,
        v: next()?,
        o: next()?,
        gate: next()?,
        up: next()?,
        down: next()?,
    })
}

fn load_projection(
    cfg: &Config,
    store: &WeightStore,
    prefix: &str,
    proj: &str,
    quant: Quant,
) -> Result<Box<dyn BaseLinear>> {
    let (out, inp) = projection_shape(cfg, proj);
    let name = format!("{prefix}.weight");
    if bnb::is_bnb_4bit(store, &name) {
        let t = bnb::read_nf4(store, &name)?;
        if t.shape != [out, inp] {
            return Err(ModelError::BadTensor {
                path: store.dir().to_path_buf(),
                name,
                msg: format!("quantized shape {:?}, expected [{out}, {inp}]", t.shape),
            });
        }
        return Ok(match quant {
            Quant::Nf4(_) => Box::new(Nf4Linear::new(t)),
            Quant::None => {
                let w = Tensor::from_vec(t.dequantize(), (out, inp), &candle_core::Device::Cpu)?;
                Box::new(DenseLinear::new(w))
            }
        });
    }
    let w = store.f32_tensor(&name, Some(&[out, inp]))?;
    Ok(match quant {
        Quant::None => Box::new(DenseLinear::new(w)),
        Quant::Nf4(c) => Box::new(Nf4Linear::quantize(&w, c)?),
    })
}
