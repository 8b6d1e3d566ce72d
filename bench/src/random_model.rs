//! Seeded random Llama models and LoRA modules built in memory, so two backends can be given the
//! same model without a file (the GPU-vs-CPU checks) and benchmarks need no weights on disk.

// The model builders serve the GPU subcommands, compiled only with the `cuda` feature.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use anyhow::Result;
use candle_core::{Device, Tensor};
use qlorad_kernels::Nf4Config;
use qlorad_model::config::HfConfig;
use qlorad_model::linear::{BaseLinear, DenseLinear, Nf4Linear};
use qlorad_model::loader::{projection_shape, LayerWeights, ModelWeights, PROJECTIONS};
use qlorad_model::lora::LoraModule;
use qlorad_model::{Config, Quant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Shape and weight scales of a random model.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub rope_theta: f64,
    /// Std of the token embedding (large: the residual stream is well above the layers' noise).
    pub embed_std: f32,
    /// Std of the projections.
    pub proj_std: f32,
    /// Std of the (untied) LM head: sets how peaked next-token distributions are.
    pub head_std: f32,
}

impl RandomSpec {
    /// A small GQA Llama whose shapes exercise both GPU paths (k % 32 == 0 for the GEMV).
    pub fn small() -> Self {
        Self {
            hidden: 512,
            layers: 4,
            heads: 8,
            kv_heads: 2,
            intermediate: 1408,
            vocab: 2048,
            max_pos: 512,
            rope_theta: 10_000.0,
            embed_std: 1.0,
            proj_std: 0.04,
            head_std: 0.15,
        }
    }

    pub fn config(&self) -> Result<Config> {
        let raw: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_pos,
            "vocab_size": self.vocab,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "eos_token_id": 0,
        }))?;
        Config::from_hf(raw).map_err(anyhow::Error::msg)
    }
}

/// N(0, std²) samples from a seeded generator (Box–Muller: rand 0.9 alone has no normal).
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32 * std);
        if out.len() < n {
            out.push((r * t.sin()) as f32 * std);
        }
    }
    out
}

fn tensor(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        normal(rng, shape.0 * shape.1, std),
        shape,
        &Device::Cpu,
    )?)
}

/// Host weights of a random model (same seed, same weights), projections stored as `quant` asks.
pub fn weights(cfg: &Config, spec: &RandomSpec, seed: u64, quant: Quant) -> Result<ModelWeights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let h = cfg.hidden_size;
    let embed = tensor(&mut rng, (cfg.vocab_size, h), spec.embed_std)?;
    let norm_w = |rng: &mut ChaCha8Rng| -> Result<Tensor> {
        let v: Vec<f32> = normal(rng, h, 0.1).into_iter().map(|x| 1.0 + x).collect();
        Ok(Tensor::from_vec(v, h, &Device::Cpu)?)
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let mut projs: Vec<Box<dyn BaseLinear>> = Vec::with_capacity(7);
        for proj in PROJECTIONS {
            let w = tensor(&mut rng, projection_shape(cfg, proj), spec.proj_std)?;
            projs.push(match quant {
                Quant::None => Box::new(DenseLinear::new(w)),
                Quant::Nf4(c) => Box::new(Nf4Linear::quantize(&w, c)?),
            });
        }
        let mut it = projs.into_iter();
        let mut next = || it.next().ok_or_else(|| anyhow::anyhow!("projection count"));
        layers.push(LayerWeights {
            input_norm: norm_w(&mut rng)?,
            post_norm: norm_w(&mut rng)?,
            q: next()?,
            k: next()?,
            v: next()?,
            o: next()?,
            gate: next()?,
            up: next()?,
            down: next()?,
        });
    }
    let norm = norm_w(&mut rng)?;
    let lm_head = Some(tensor(&mut rng, (cfg.vocab_size, h), spec.head_std)?);
    Ok(ModelWeights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

/// Random LoRA modules of rank `r` on all 7 projections of every layer (host, f32): A with
/// Kaiming-like scale, B small and non-zero so the adapter changes the output.
pub fn lora_modules(cfg: &Config, r: usize, seed: u64) -> Result<Vec<Option<LoraModule>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut modules = Vec::with_capacity(cfg.num_layers * 7);
    for _ in 0..cfg.num_layers {
        for proj in PROJECTIONS {
            let (out, inp) = projection_shape(cfg, proj);
            modules.push(Some(LoraModule {
                a: tensor(&mut rng, (r, inp), 1.0 / (inp as f32).sqrt())?,
                b: tensor(&mut rng, (out, r), 0.02)?,
                scale: 16.0 / r as f64,
            }));
        }
    }
    Ok(modules)
}

/// The default NF4 storage (blocksize 64, double quantization), as transformers configures it.
pub fn nf4() -> Quant {
    Quant::Nf4(Nf4Config::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlorad_model::{Llama, Logits, SeqInput};

    #[test]
    fn same_seed_same_model_and_logits_are_finite() -> Result<()> {
        let spec = RandomSpec {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 96,
            vocab: 50,
            max_pos: 32,
            ..RandomSpec::small()
        };
        let cfg = spec.config()?;
        let run = || -> Result<Vec<f32>> {
            let m = Llama::new(cfg.clone(), weights(&cfg, &spec, 3, nf4())?)?;
            let mut cache = m.new_cache();
            let l = m.forward(&mut [SeqInput::new(&[1, 2, 3], &mut cache)], Logits::Last)?;
            Ok(l.flatten_all()?.to_vec1::<f32>()?)
        };
        let (a, b) = (run()?, run()?);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.is_finite()));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let v = normal(&mut rng, 100_000, 2.0);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05,
            "{mean} {var}"
        );
        Ok(())
    }
}
