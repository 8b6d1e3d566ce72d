//! LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in the
//! Hugging Face PEFT format, and their batched application.
//!
//! `y = W·x + s·B·(A·x)` with `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA, Kalajdzievski 2023),
//! per module, with PEFT's `rank_pattern` / `alpha_pattern` overrides. Serving applies several
//! adapters in one batch the way vLLM's punica path does, without padding to the largest rank or a
//! forward pass per adapter: each projection runs the frozen base once for all rows, then for each
//! adapter present gathers its rows, applies the shrink `x·Aᵀ` and expand `·Bᵀ`, and adds the result
//! back at those rows ([`LoraBatch`] carries the row → adapter mapping). On CUDA, decode-sized
//! batches instead run Punica's BGMV kernels (Chen et al. 2023; `qlorad_kernels::bgmv`): two
//! launches per projection for all rows, whatever mix of adapters and ranks ([`LoraKernel`]).

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::loader::{projection_shape, PROJECTIONS};
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use qlorad_kernels::bgmv::{AdapterTable, BgmvModule, BgmvPlan, BGMV_MAX_ROWS, MAX_GROUP};
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

mod pack;

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
    /// The modules' device table for the BGMV kernels, when they live on a GPU in bf16.
    bgmv: Option<Arc<AdapterTable>>,
    /// The packed bf16 host form the modules are views of ([`LoraAdapter::load_packed`]).
    packed: Option<Arc<pack::Packed>>,
}

impl Drop for LoraAdapter {
    /// A GPU copy frees its memory under the GPU gate: the last holder may be any thread, and a
    /// decode-step capture on another thread must not record the frees (`crate::gpu_gate`).
    fn drop(&mut self) {
        let on_gpu = self
            .modules
            .iter()
            .flatten()
            .next()
            .is_some_and(|m| m.a.device().is_cuda());
        if on_gpu {
            let _gpu = crate::gpu_gate::gpu_work();
            self.modules.clear();
            self.bgmv = None;
        }
    }
}

/// The BGMV table of `modules`, or `None` when they are not on a GPU in bf16. A failure to build
/// it only costs speed (the batch takes the gather path), so it is logged, not returned.
fn bgmv_table(name: &str, modules: &[Option<LoraModule>]) -> Option<Arc<AdapterTable>> {
    let on_gpu = modules
        .iter()
        .flatten()
        .next()
        .is_some_and(|m| m.a.device().is_cuda());
    if !on_gpu {
        return None;
    }
    let ms: Vec<Option<BgmvModule<'_>>> = modules
        .iter()
        .map(|m| {
            m.as_ref().map(|m| BgmvModule {
                a: &m.a,
                b: &m.b,
                scale: m.scale,
            })
        })
        .collect();
    match AdapterTable::build(&ms) {
        Ok(t) => t.map(Arc::new),
        Err(e) => {
            tracing::warn!(adapter = name, error = %e, "no BGMV table; LoRA takes the gather path");
            None
        }
    }
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
    /// Loads a PEFT adapter folder and checks it against the base model's shapes (f32 host
    /// modules; [`LoraAdapter::load_for`] picks the form for a placement).
    pub fn load(dir: &Path, name: &str, cfg: &Config) -> Result<Self> {
        let (store, wanted) = plan(dir, cfg)?;
        let read = wanted
            .par_iter()
            .map(|w| {
                let a = store.f32_tensor(&w.a_name, None)?;
                let b = store.f32_tensor(&w.b_name, None)?;
                Ok((
                    w.slot,
                    LoraModule {
                        a,
                        b,
                        scale: w.scale,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut modules: Vec<Option<LoraModule>> = (0..cfg.num_layers * 7).map(|_| None).collect();
        let mut bytes = 0;
        for (slot, m) in read {
            bytes += (m.a.elem_count() + m.b.elem_count()) * 4;
            modules[slot] = Some(m);
        }
        Ok(Self {
            name: name.to_string(),
            modules,
            bytes,
            bgmv: None,
            packed: None,
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
            bgmv: bgmv_table(name, &modules),
            modules,
            bytes,
            packed: None,
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
    /// step on the gather path, and the BGMV table is built; on the CPU the modules are kept as
    /// they are.
    pub fn to_placement(&self, p: &crate::device::Placement) -> Result<Self> {
        // Placing issues GPU work from the caller's thread: no decode-step capture meanwhile.
        let _gpu = p.is_cuda().then(crate::gpu_gate::gpu_work);
        if p.is_cuda() && p.dtype == DType::BF16 {
            if let Some(placed) = self.to_gpu_packed(p)? {
                return Ok(placed);
            }
        }
        self.to_placement_each(p)
    }

    /// [`LoraAdapter::to_placement`] one module at a time (the reference for the packed GPU
    /// path, and the path for everything it does not take).
    pub fn to_placement_each(&self, p: &crate::device::Placement) -> Result<Self> {
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
            bgmv: bgmv_table(&self.name, &modules),
            modules,
            bytes,
            packed: None,
        })
    }

    /// The device table the BGMV kernels read, if the adapter is on a GPU in bf16.
    pub fn bgmv_table(&self) -> Option<&Arc<AdapterTable>> {
        self.bgmv.as_ref()
    }

    /// Merges into a dense (out, in) weight: `W + scale·B·A`.
    pub fn merge_into(&self, layer: usize, proj: usize, w: &Tensor) -> Result<Tensor> {
        match self.module(layer, proj) {
            None => Ok(w.clone()),
            Some(m) => Ok((w + (m.b.matmul(&m.a)? * m.scale)?)?),
        }
    }
}

/// One adapted module of a folder being loaded: its tensors' names, slot and scale.
struct Wanted {
    a_name: String,
    b_name: String,
    slot: usize,
    scale: f64,
}

/// Opens an adapter folder and checks its config, tensor names and shapes against the base (cheap,
/// in file order, so the first bad tensor is the one reported) before any weight is read.
fn plan(dir: &Path, cfg: &Config) -> Result<(WeightStore, Vec<Wanted>)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let pc: PeftConfig =
        serde_json::from_str(&text).map_err(|e| invalid(&cfg_path, e.to_string()))?;
    pc.validate(&cfg_path)?;
    let store = WeightStore::open_files(dir, vec![dir.join("adapter_model.safetensors")])?;
    let mut wanted = Vec::new();
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
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        for (name, shape, want) in [
            (tensor, store.raw(tensor)?.shape, [r, inp]),
            (b_name.as_str(), store.raw(&b_name)?.shape, [out, r]),
        ] {
            if shape != want {
                return Err(bad(
                    dir,
                    name,
                    format!("shape {shape:?}, expected {want:?} for this base model"),
                ));
            }
        }
        wanted.push(Wanted {
            a_name: tensor.to_string(),
            b_name,
            slot: layer * 7 + proj,
            scale,
        });
    }
    if wanted.is_empty() {
        return Err(invalid(
            &dir.join("adapter_model.safetensors"),
            "the adapter has no LoRA weights",
        ));
    }
    Ok((store, wanted))
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

/// From this many rows, a batch whose rows all use one adapter takes the GEMM path instead of
/// BGMV (see [`LoraBatch::with_kernel`]).
pub const SHARED_ADAPTER_GEMM_ROWS: usize = 8;

/// How a batch's LoRA deltas are computed on a GPU (the CPU always gathers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKernel {
    /// Per adapter in the batch: gather its rows, two GEMMs, scatter-add (3–4 launches each).
    Gather,
    /// Up to [`BGMV_MAX_ROWS`] rows: the BGMV shrink and expand, two launches per projection for
    /// all rows; larger batches gather.
    Bgmv,
}

impl LoraKernel {
    pub const ALL: [LoraKernel; 2] = [LoraKernel::Gather, LoraKernel::Bgmv];

    pub fn name(self) -> &'static str {
        match self {
            LoraKernel::Gather => "gather",
            LoraKernel::Bgmv => "bgmv",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// `QLORAD_LORA_KERNEL` (`gather` or `bgmv`) if set to a known name, else BGMV.
    pub fn from_env() -> Self {
        std::env::var("QLORAD_LORA_KERNEL")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or(LoraKernel::Bgmv)
    }
}

/// Which rows of a flattened batch use which adapter (rows without an adapter use the base alone).
#[derive(Debug)]
pub struct LoraBatch {
    /// Each adapter with its rows.
    groups: Vec<(Arc<LoraAdapter>, Vec<u32>)>,
    rows: usize,
    device: Device,
    /// Per group, its rows as an index tensor (`None` when it has every row: no gather or
    /// scatter), built on the first gather (a BGMV batch never needs them).
    row_index: OnceLock<Vec<Option<Tensor>>>,
    /// The BGMV plan when the batch takes that path.
    bgmv: Option<BgmvPlan>,
}

impl LoraBatch {
    /// Groups rows by adapter; `per_row[i]` is row i's adapter. Adapters are told apart by identity.
    /// Always the gather path (the reference); see [`LoraBatch::with_kernel`].
    pub fn new(per_row: &[Option<Arc<LoraAdapter>>], device: &Device) -> Result<Self> {
        Self::with_kernel(per_row, device, LoraKernel::Gather)
    }

    /// As [`LoraBatch::new`]; with [`LoraKernel::Bgmv`], a batch of at most [`BGMV_MAX_ROWS`] rows
    /// on a GPU whose adapters all have BGMV tables uploads its row → adapter map once here, and
    /// every projection (or group of projections reading one input) then runs the two BGMV
    /// launches.
    pub fn with_kernel(
        per_row: &[Option<Arc<LoraAdapter>>],
        device: &Device,
        kernel: LoraKernel,
    ) -> Result<Self> {
        let mut groups: Vec<(Arc<LoraAdapter>, Vec<u32>)> = Vec::new();
        for (i, a) in per_row.iter().enumerate() {
            let Some(a) = a else { continue };
            match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
                Some((_, rows)) => rows.push(i as u32),
                None => groups.push((a.clone(), vec![i as u32])),
            }
        }
        // One adapter on every row of a batch of several rows is two plain GEMMs on the gather
        // path (no gather or scatter), which read A and B once; BGMV re-reads them per row. On the
        // H200 at 32 rows: 255 tok/s (GEMMs) vs 206 (BGMV); at 1 row BGMV wins, 131 vs 74.
        let one_adapter_everywhere = groups.len() == 1 && groups[0].1.len() == per_row.len();
        let bgmv = if kernel == LoraKernel::Bgmv
            && device.is_cuda()
            && !groups.is_empty()
            && per_row.len() <= BGMV_MAX_ROWS
            && !(one_adapter_everywhere && per_row.len() >= SHARED_ADAPTER_GEMM_ROWS)
            && groups.iter().all(|(a, _)| a.bgmv.is_some())
        {
            let tables: Vec<Option<Arc<AdapterTable>>> = per_row
                .iter()
                .map(|a| a.as_ref().and_then(|a| a.bgmv.clone()))
                .collect();
            BgmvPlan::new(&tables)?
        } else {
            None
        };
        Ok(Self {
            groups,
            rows: per_row.len(),
            device: device.clone(),
            row_index: OnceLock::new(),
            bgmv,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The BGMV plan when the batch takes that path (a GPU batch of few rows).
    pub fn bgmv_plan(&self) -> Option<&BgmvPlan> {
        self.bgmv.as_ref()
    }

    /// Takes the BGMV plan out of the batch (a captured decode step keeps it; the batch then
    /// runs as a base batch would, which the caller must not do).
    #[cfg(feature = "cuda")]
    pub(crate) fn take_bgmv(&mut self) -> Option<BgmvPlan> {
        self.bgmv.take()
    }

    /// Whether a projection took the gather path (built the row index tensors) since the batch
    /// was made: a captured decode step must not have (its index uploads are host data).
    #[cfg(feature = "cuda")]
    pub(crate) fn gathered(&self) -> bool {
        self.row_index.get().is_some()
    }

    /// Drops the row index tensors a projection built (inside an abandoned capture their memory
    /// was never real), so that the next gather builds them again.
    #[cfg(feature = "cuda")]
    pub(crate) fn forget_gather(&mut self) {
        self.row_index.take();
    }

    /// Whether this batch's projections run the BGMV kernels.
    pub fn uses_bgmv(&self) -> bool {
        self.bgmv.is_some()
    }

    fn row_index(&self) -> Result<&[Option<Tensor>]> {
        if let Some(r) = self.row_index.get() {
            return Ok(r);
        }
        let built = self
            .groups
            .iter()
            .map(|(_, rows)| {
                if rows.len() == self.rows {
                    return Ok(None);
                }
                Ok(Some(Tensor::from_slice(rows, rows.len(), &self.device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.row_index.get_or_init(|| built))
    }

    /// Adds every adapter's delta for projection `proj` of `layer` to `y` (rows, out), given the
    /// projection's input `x` (rows, in). On the BGMV path y is updated in place (it must be a
    /// fresh tensor, such as a base projection's output).
    pub fn apply(&self, layer: usize, proj: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let mut ys = self.apply_group(layer, proj, x, vec![y])?;
        ys.pop()
            .ok_or_else(|| ModelError::Invalid("LoRA apply lost its output".into()))
    }

    /// [`LoraBatch::apply`] for projections `proj0, proj0 + 1, …` of `layer` that all read `x`
    /// (q/k/v, or gate/up), with outputs `ys`: on the BGMV path one launch pair serves the group.
    pub fn apply_group(
        &self,
        layer: usize,
        proj0: usize,
        x: &Tensor,
        ys: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        if let Some(plan) = &self.bgmv {
            // Inference only (no autograd through an in-place op), bf16 as the kernels take.
            let fits = |t: &Tensor| !t.track_op() && t.dtype() == DType::BF16;
            if ys.len() <= MAX_GROUP && fits(x) && ys.iter().all(|y| fits(y) && y.is_contiguous()) {
                let refs: Vec<&Tensor> = ys.iter().collect();
                plan.apply_group(layer * 7 + proj0, x, &refs)?;
                return Ok(ys);
            }
        }
        ys.into_iter()
            .enumerate()
            .map(|(i, y)| self.gather(layer, proj0 + i, x, y))
            .collect()
    }

    /// The gather path: per adapter, gather its rows, shrink and expand, scatter-add.
    fn gather(&self, layer: usize, proj: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let mut y = y;
        for ((adapter, _), rows) in self.groups.iter().zip(self.row_index()?) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use qlorad_kernels::bgmv::{bgmv_reference, RowLora};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// A one-slot adapter (layer 0, projection 0) with host copies of A and B.
    fn adapter(
        rng: &mut ChaCha8Rng,
        r: usize,
        in_f: usize,
        out_f: usize,
        scale: f64,
    ) -> (Arc<LoraAdapter>, Vec<f32>, Vec<f32>) {
        let a = random(rng, r * in_f);
        let b = random(rng, out_f * r);
        let m = LoraModule {
            a: Tensor::from_slice(&a, (r, in_f), &Device::Cpu).unwrap(),
            b: Tensor::from_slice(&b, (out_f, r), &Device::Cpu).unwrap(),
            scale,
        };
        let ad = LoraAdapter::from_modules(&format!("r{r}"), vec![Some(m)]);
        (Arc::new(ad), a, b)
    }

    /// The BGMV semantics (each row its own adapter, rank and scale, or none) are those of the
    /// gather path: the CPU reference of the kernels against `LoraBatch::apply`.
    #[test]
    fn bgmv_reference_matches_the_gather_path() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (in_f, out_f) = (24, 10);
        let ads = [(2usize, 0.5f64), (5, 2.0), (8, 1.0)]
            .map(|(r, s)| adapter(&mut rng, r, in_f, out_f, s));
        let patterns: [&[Option<usize>]; 3] = [
            &[Some(0), None, Some(1), Some(0), Some(2), None, Some(1)],
            &[Some(2), Some(2), Some(2)], // one adapter on every row: no gather
            &[None, Some(1)],
        ];
        for pattern in patterns {
            let n = pattern.len();
            let x = random(&mut rng, n * in_f);
            let y0 = random(&mut rng, n * out_f);
            let per_row: Vec<Option<Arc<LoraAdapter>>> = pattern
                .iter()
                .map(|p| p.map(|i| ads[i].0.clone()))
                .collect();
            let batch = LoraBatch::new(&per_row, &Device::Cpu).unwrap();
            assert!(!batch.uses_bgmv());
            let xt = Tensor::from_slice(&x, (n, in_f), &Device::Cpu).unwrap();
            let yt = Tensor::from_slice(&y0, (n, out_f), &Device::Cpu).unwrap();
            let got = batch.apply(0, 0, &xt, yt).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rows: Vec<Option<RowLora<'_>>> = pattern
                .iter()
                .map(|p| {
                    p.map(|i| {
                        let (ad, a, b) = &ads[i];
                        let m = ad.module(0, 0).unwrap();
                        RowLora {
                            a,
                            b,
                            rank: m.a.dims()[0],
                            scale: m.scale as f32,
                        }
                    })
                })
                .collect();
            let mut want = y0.clone();
            bgmv_reference(&x, in_f, &mut want, out_f, &rows).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{i}: {g} vs {w}");
            }
            // Rows on the base are untouched.
            for (row, p) in pattern.iter().enumerate() {
                if p.is_none() {
                    assert_eq!(
                        got[row * out_f..(row + 1) * out_f],
                        y0[row * out_f..(row + 1) * out_f]
                    );
                }
            }
        }
    }

    #[test]
    fn cpu_batches_never_take_bgmv() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (ad, _, _) = adapter(&mut rng, 4, 8, 8, 1.0);
        assert!(ad.bgmv_table().is_none());
        let b = LoraBatch::with_kernel(&[Some(ad)], &Device::Cpu, LoraKernel::Bgmv).unwrap();
        assert!(!b.uses_bgmv());
        assert_eq!(LoraKernel::parse("gather"), Some(LoraKernel::Gather));
        assert_eq!(LoraKernel::parse("bgmv"), Some(LoraKernel::Bgmv));
        assert_eq!(LoraKernel::parse("punica"), None);
    }
}
