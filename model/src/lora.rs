//! LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in the
//! Hugging Face PEFT format, and their batched application.
//!
//! `y = W·x + s·B·(A·x)` with `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA, Kalajdzievski 2023),
//! per module, with PEFT's `rank_pattern` / `alpha_pattern` overrides. Serving applies several
//! adapters in one batch the way vLLM's punica path does, without padding to the largest rank or a
//! forward pass per adapter: each projection runs the frozen base once for all rows, then for each
//! adapter present gathers its rows, applies the shrink `x·Aᵀ` and expand `·Bᵀ`, and adds the result
//! back at those rows ([`LoraBatch`] carries the row → adapter mapping).

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::loader::{projection_shape, PROJECTIONS};
use crate::weights::WeightStore;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One adapted projection: `delta = scale · (x·Aᵀ)·Bᵀ`.
#[derive(Debug)]
pub struct LoraModule {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scale: f64,
}

impl LoraModule {
    /// `scale · (x·Aᵀ)·Bᵀ`: the shrink to rank r, the expand back, (n, in) → (n, out). A scale of
    /// exactly 1 (folded into B at placement) costs no multiply.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?;
        if self.scale == 1.0 {
            return Ok(d);
        }
        Ok((d * self.scale)?)
    }
}

/// A loaded adapter: modules indexed by `layer * 7 + projection`.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    modules: Vec<Option<LoraModule>>,
    bytes: usize,
}

/// The fields of PEFT's `adapter_config.json` that matter.
#[derive(Debug, Clone, Deserialize)]
pub struct PeftConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

fn invalid(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// PEFT matches pattern keys against the module name as `(.*\.)?{key}$`.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

impl PeftConfig {
    /// Rejects what the serving path does not implement, with the reason.
    fn validate(&self, path: &Path) -> Result<()> {
        if let Some(t) = &self.peft_type {
            if t != "LORA" {
                return Err(invalid(
                    path,
                    format!("peft_type {t:?} is not supported (only LORA)"),
                ));
            }
        }
        if self.use_dora {
            return Err(invalid(path, "DoRA adapters (use_dora) are not supported"));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(invalid(
                path,
                "adapters with modules_to_save are not supported",
            ));
        }
        if self.fan_in_fan_out {
            return Err(invalid(path, "fan_in_fan_out adapters are not supported"));
        }
        if let Some(b) = self.bias.as_deref() {
            if b != "none" {
                return Err(invalid(
                    path,
                    format!("bias {b:?} is not supported (only \"none\")"),
                ));
            }
        }
        if self.r == 0 {
            return Err(invalid(path, "r must be positive"));
        }
        let targets: Vec<String> = match &self.target_modules {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => vec![],
        };
        if let Some(t) = targets
            .iter()
            .find(|t| t.contains("embed_tokens") || t.contains("lm_head"))
        {
            return Err(invalid(
                path,
                format!(
                    "adapters on {t} are not supported (only the q/k/v/o/gate/up/down projections)"
                ),
            ));
        }
        Ok(())
    }

    /// (rank, scale) of the module named `module` (e.g. `model.layers.3.self_attn.q_proj`).
    fn rank_and_scale(&self, module: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.r, |(_, &r)| r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.lora_alpha, |(_, &a)| a);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }
}

impl LoraAdapter {
    /// Loads a PEFT adapter folder and checks it against the base model's shapes.
    pub fn load(dir: &Path, name: &str, cfg: &Config) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let pc: PeftConfig =
            serde_json::from_str(&text).map_err(|e| invalid(&cfg_path, e.to_string()))?;
        pc.validate(&cfg_path)?;
        let store = WeightStore::open_files(dir, vec![dir.join("adapter_model.safetensors")])?;
        let mut modules: Vec<Option<LoraModule>> = (0..cfg.num_layers * 7).map(|_| None).collect();
        let mut bytes = 0;
        for tensor in store.names() {
            // base_model.model.model.layers.{i}.{proj}.lora_A.weight
            let Some(rest) = tensor.strip_prefix("base_model.model.") else {
                return Err(bad(
                    dir,
                    tensor,
                    "unexpected tensor (not under base_model.model.)",
                ));
            };
            let Some(module) = rest.strip_suffix(".lora_A.weight") else {
                if rest.ends_with(".lora_B.weight") {
                    continue; // read with its A
                }
                return Err(bad(dir, tensor, "only lora_A/lora_B weights are supported (embedding, lm_head or DoRA tensors are not)"));
            };
            let (layer, proj) = parse_module(module).ok_or_else(|| {
                bad(
                    dir,
                    tensor,
                    "only the q/k/v/o/gate/up/down projections of decoder layers can be adapted",
                )
            })?;
            if layer >= cfg.num_layers {
                return Err(bad(
                    dir,
                    tensor,
                    format!(
                        "layer {layer} does not exist (the base has {})",
                        cfg.num_layers
                    ),
                ));
            }
            let (out, inp) = projection_shape(cfg, PROJECTIONS[proj]);
            let (r, scale) = pc.rank_and_scale(module);
            let a = store.f32_tensor(tensor, None)?;
            let b_name = format!("base_model.model.{module}.lora_B.weight");
            let b = store.f32_tensor(&b_name, None)?;
            if a.dims() != [r, inp] {
                return Err(bad(
                    dir,
                    tensor,
                    format!(
                        "shape {:?}, expected [{r}, {inp}] for this base model",
                        a.dims()
                    ),
                ));
            }
            if b.dims() != [out, r] {
                return Err(bad(
                    dir,
                    &b_name,
                    format!(
                        "shape {:?}, expected [{out}, {r}] for this base model",
                        b.dims()
                    ),
                ));
            }
            bytes += (a.elem_count() + b.elem_count()) * 4;
            modules[layer * 7 + proj] = Some(LoraModule { a, b, scale });
        }
        if modules.iter().all(Option::is_none) {
            return Err(invalid(
                &dir.join("adapter_model.safetensors"),
                "the adapter has no LoRA weights",
            ));
        }
        Ok(Self {
            name: name.to_string(),
            modules,
            bytes,
        })
    }

    /// An adapter from modules already in memory, indexed by `layer * 7 + projection` (training
    /// exports and benchmarks build them without a folder).
    pub fn from_modules(name: &str, modules: Vec<Option<LoraModule>>) -> Self {
        let bytes = modules
            .iter()
            .flatten()
            .map(|m| {
                m.a.elem_count() * m.a.dtype().size_in_bytes()
                    + m.b.elem_count() * m.b.dtype().size_in_bytes()
            })
            .sum();
        Self {
            name: name.to_string(),
            modules,
            bytes,
        }
    }

    /// The module for `layer`, projection index `proj` (order of [`PROJECTIONS`]).
    pub fn module(&self, layer: usize, proj: usize) -> Option<&LoraModule> {
        self.modules.get(layer * 7 + proj).and_then(Option::as_ref)
    }

    /// Bytes of adapter weights held (where they are placed, in their dtype).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The adapter placed on `p`'s device in its compute dtype. On a GPU the scale is folded into
    /// B (`B·s`, computed in f32 before the cast), which saves one kernel launch per module and
    /// step; on the CPU the modules are kept as they are.
    pub fn to_placement(&self, p: &crate::device::Placement) -> Result<Self> {
        let fold = p.is_cuda();
        let modules = self
            .modules
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| {
                        let (b, scale) = if fold {
                            (p.put(&(m.b.to_device(&p.device)? * m.scale)?)?, 1.0)
                        } else {
                            (p.put(&m.b)?, m.scale)
                        };
                        Ok(LoraModule {
                            a: p.put(&m.a)?,
                            b,
                            scale,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = modules
            .iter()
            .flatten()
            .map(|m| (m.a.elem_count() + m.b.elem_count()) * p.dtype.size_in_bytes())
            .sum();
        Ok(Self {
            name: self.name.clone(),
            modules,
            bytes,
        })
    }

    /// Merges into a dense (out, in) weight: `W + scale·B·A`.
    pub fn merge_into(&self, layer: usize, proj: usize, w: &Tensor) -> Result<Tensor> {
        match self.module(layer, proj) {
            None => Ok(w.clone()),
            Some(m) => Ok((w + (m.b.matmul(&m.a)? * m.scale)?)?),
        }
    }
}

fn bad(dir: &Path, name: &str, msg: impl Into<String>) -> ModelError {
    ModelError::BadTensor {
        path: dir.join("adapter_model.safetensors"),
        name: name.to_string(),
        msg: msg.into(),
    }
}

/// `model.layers.{i}.{self_attn|mlp}.{proj}` → (layer, projection index).
fn parse_module(module: &str) -> Option<(usize, usize)> {
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, proj) = rest.split_once('.')?;
    let idx = PROJECTIONS.iter().position(|p| *p == proj)?;
    Some((layer.parse().ok()?, idx))
}

/// Which rows of a flattened batch use which adapter (rows without an adapter use the base alone).
#[derive(Debug, Default)]
pub struct LoraBatch {
    /// Each adapter with its rows; `None` when it has every row of the batch (no gather/scatter).
    groups: Vec<(Arc<LoraAdapter>, Option<Tensor>)>,
}

impl LoraBatch {
    /// Groups rows by adapter; `per_row[i]` is row i's adapter. Adapters are told apart by identity.
    pub fn new(per_row: &[Option<Arc<LoraAdapter>>], device: &Device) -> Result<Self> {
        let mut groups: Vec<(Arc<LoraAdapter>, Vec<u32>)> = Vec::new();
        for (i, a) in per_row.iter().enumerate() {
            let Some(a) = a else { continue };
            match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
                Some((_, rows)) => rows.push(i as u32),
                None => groups.push((a.clone(), vec![i as u32])),
            }
        }
        let total = per_row.len();
        let groups = groups
            .into_iter()
            .map(|(a, rows)| {
                let n = rows.len();
                if n == total {
                    return Ok((a, None));
                }
                Ok((a, Some(Tensor::from_vec(rows, n, device)?)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds every adapter's delta for projection `proj` of `layer` to `y` (rows, out), given the
    /// projection's input `x` (rows, in).
    pub fn apply(&self, layer: usize, proj: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let mut y = y;
        for (adapter, rows) in &self.groups {
            let Some(m) = adapter.module(layer, proj) else {
                continue;
            };
            let Some(rows) = rows else {
                // Every row uses this adapter: no gather or scatter.
                y = (y + m.delta(x)?)?;
                continue;
            };
            let xs = x.index_select(rows, 0)?; // gather: (n, in)
            y = y.index_add(rows, &m.delta(&xs)?, 0)?; // scatter-add back
        }
        Ok(y)
    }
}

impl crate::llama::train::LoraWeights for LoraAdapter {
    fn module(&self, layer: usize, proj: usize) -> Option<(&Tensor, &Tensor, f64)> {
        LoraAdapter::module(self, layer, proj).map(|m| (&m.a, &m.b, m.scale))
    }
}
