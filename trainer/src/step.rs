//! The QLoRA training step, top to bottom: trainable LoRA weights over the frozen base, the causal-LM
//! loss on masked targets, gradients, global-norm clipping and AdamW with f32 state.
//!
//! Initialization follows PEFT (`LoraLayer.reset_lora_parameters`): A is Kaiming-uniform with
//! a = √5 (bound 1/√fan_in), B is zero, so a fresh adapter starts as the identity. AdamW follows
//! `torch.optim.AdamW` (Loshchilov & Hutter, 2019): decoupled weight decay applied first, bias-corrected
//! moments, `eps` added to the corrected second-moment root.

use crate::data::Example;
pub use crate::optim::{AdamW, AdamWConfig};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use qlorad_model::llama::train::{LoraWeights, TrainOps};
use qlorad_model::loader::{projection_shape, PROJECTIONS};
use qlorad_model::{Config, Llama};
use rand::{Rng, SeedableRng};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] qlorad_model::ModelError),
    #[error("{0}")]
    Invalid(String),
    #[error("checkpoint {0}")]
    Checkpoint(String),
}

pub type Result<T> = std::result::Result<T, StepError>;

/// One trainable module: `delta = scale · (x·Aᵀ)·Bᵀ`.
pub struct TrainModule {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// The projections LoRA can target, by their PEFT short names (the order of `PROJECTIONS`).
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The shape of an adapter being trained: rank, scaling, dropout and target projections.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the LoRA branch's input (PEFT's `lora_dropout`), training only.
    pub dropout: f64,
    /// rsLoRA scaling α/√r (Kalajdzievski, 2023) instead of α/r.
    pub rslora: bool,
    /// Short projection names (`q_proj`, …).
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        const SHORT: [&str; 7] = TARGET_MODULES;
        if self.r == 0 || self.r > 1024 {
            return Err(StepError::Invalid(format!(
                "lora r must be in 1..=1024, got {}",
                self.r
            )));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(StepError::Invalid("lora alpha must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(StepError::Invalid("lora dropout must be in [0, 1)".into()));
        }
        if self.targets.is_empty() {
            return Err(StepError::Invalid("no target modules".into()));
        }
        if let Some(bad) = self.targets.iter().find(|t| !SHORT.contains(&t.as_str())) {
            return Err(StepError::Invalid(format!(
                "target module {bad:?} is not one of {}",
                SHORT.join(", ")
            )));
        }
        Ok(())
    }
}

/// A LoRA adapter being trained (modules indexed by `layer * 7 + projection`).
pub struct TrainableLora {
    pub spec: LoraSpec,
    pub modules: Vec<Option<TrainModule>>,
    /// Seed of the current micro-batch's dropout masks; `None` means evaluation (no dropout). The
    /// trainer sets it per micro-batch from (seed, step, micro-batch), so a resumed run draws the
    /// same masks without saving RNG state.
    dropout_seed: Mutex<Option<u64>>,
}

impl LoraWeights for TrainableLora {
    fn module(&self, layer: usize, proj: usize) -> Option<(&Tensor, &Tensor, f64)> {
        self.modules
            .get(layer * 7 + proj)
            .and_then(Option::as_ref)
            .map(|m| (m.a.as_tensor(), m.b.as_tensor(), m.scale))
    }

    fn dropout_mask(&self, layer: usize, proj: usize) -> Option<(u64, f64)> {
        let p = self.spec.dropout;
        let seed = *self
            .dropout_seed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seed.filter(|_| p > 0.0)
            .map(|s| (mask_seed(s, layer, proj), p))
    }

    fn dropout(&self, layer: usize, proj: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.spec.dropout;
        let seed = *self
            .dropout_seed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(seed) = seed.filter(|_| p > 0.0) else {
            return Ok(x.clone());
        };
        // The mask is a function of (micro-batch seed, layer, projection), not of call order, so
        // gradient checkpointing's recomputation draws exactly the forward pass's masks.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mask_seed(seed, layer, proj));
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }
}

impl TrainableLora {
    fn with_modules(spec: &LoraSpec, modules: Vec<Option<TrainModule>>) -> Self {
        Self {
            spec: spec.clone(),
            modules,
            dropout_seed: Mutex::new(None),
        }
    }

    /// A fresh adapter, PEFT's initialization, on the CPU.
    pub fn new(cfg: &Config, spec: &LoraSpec, seed: u64) -> Result<Self> {
        Self::new_on(cfg, spec, seed, &Device::Cpu)
    }

    /// A fresh adapter with its f32 master weights on `device` (the model's). The values are drawn
    /// on the host, so every device starts from the same adapter for a seed.
    pub fn new_on(cfg: &Config, spec: &LoraSpec, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (r, scale) = (spec.r, spec.scale());
        let mut modules = Vec::with_capacity(cfg.num_layers * 7);
        for _layer in 0..cfg.num_layers {
            for proj in PROJECTIONS {
                let short = proj.rsplit('.').next().unwrap_or(proj);
                if !spec.targets.iter().any(|t| t == short) {
                    modules.push(None);
                    continue;
                }
                let (out, inp) = projection_shape(cfg, proj);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                modules.push(Some(TrainModule {
                    a: Var::from_vec(a, (r, inp), device)?,
                    b: Var::zeros((out, r), DType::F32, device)?,
                    scale,
                }));
            }
        }
        Ok(Self::with_modules(spec, modules))
    }

    /// Starts from a saved PEFT adapter (e.g. a checkpoint, or a reference's initial weights), on
    /// the CPU.
    pub fn from_adapter(
        a: &qlorad_model::LoraAdapter,
        cfg: &Config,
        spec: &LoraSpec,
    ) -> Result<Self> {
        Self::from_adapter_on(a, cfg, spec, &Device::Cpu)
    }

    /// [`Self::from_adapter`] with the f32 master weights on `device`.
    pub fn from_adapter_on(
        a: &qlorad_model::LoraAdapter,
        cfg: &Config,
        spec: &LoraSpec,
        device: &Device,
    ) -> Result<Self> {
        let master = |t: &Tensor| -> Result<Var> {
            Ok(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(device)?,
            )?)
        };
        let mut modules = Vec::with_capacity(cfg.num_layers * 7);
        for layer in 0..cfg.num_layers {
            for proj in 0..7 {
                modules.push(match a.module(layer, proj) {
                    None => None,
                    Some(m) => Some(TrainModule {
                        a: master(&m.a)?,
                        b: master(&m.b)?,
                        scale: m.scale,
                    }),
                });
            }
        }
        Ok(Self::with_modules(spec, modules))
    }

    /// Dropout on (`Some(seed)`: masks drawn from that seed's stream) or off (`None`: evaluation).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self
            .dropout_seed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = seed;
    }

    /// Every trainable tensor with its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            if let Some(m) = m {
                let (layer, proj) = (i / 7, PROJECTIONS[i % 7]);
                let base = format!("base_model.model.model.layers.{layer}.{proj}");
                out.push((format!("{base}.lora_A.weight"), &m.a));
                out.push((format!("{base}.lora_B.weight"), &m.b));
            }
        }
        out
    }
}

/// A batch: right-padded ids and the loss mask (padding is masked).
pub struct Batch {
    pub ids: Tensor,
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    pub fn from_examples(examples: &[&Example], pad_id: u32) -> Result<Self> {
        let seq = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        if seq < 2 {
            return Err(StepError::Invalid(
                "a batch needs sequences of at least 2 tokens".into(),
            ));
        }
        let mut ids = Vec::with_capacity(examples.len() * seq);
        let mut mask = Vec::with_capacity(examples.len() * seq);
        for e in examples {
            ids.extend_from_slice(&e.input_ids);
            ids.extend(std::iter::repeat_n(pad_id, seq - e.input_ids.len()));
            mask.extend_from_slice(&e.loss_mask);
            mask.extend(std::iter::repeat_n(false, seq - e.loss_mask.len()));
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (examples.len(), seq), &Device::Cpu)?,
            mask,
            batch: examples.len(),
            seq,
        })
    }

    /// Target tokens: positions t ≥ 1 whose mask is set (each predicted from t − 1).
    pub fn target_count(&self) -> usize {
        (0..self.batch)
            .map(|b| {
                (1..self.seq)
                    .filter(|&t| self.mask[b * self.seq + t])
                    .count()
            })
            .sum()
    }
}

/// The dropout mask seed of (micro-batch seed, layer, projection).
fn mask_seed(seed: u64, layer: usize, proj: usize) -> u64 {
    seed ^ ((layer as u64) << 32 | proj as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Mean cross-entropy over the batch's target tokens (transformers' causal-LM loss: shift by one,
/// average over every unmasked target in the batch).
pub fn loss(model: &Llama, lora: &dyn LoraWeights, batch: &Batch) -> Result<Tensor> {
    loss_from_logits(
        model.train_ops(),
        &model.forward_train(&batch.ids, lora)?,
        batch,
    )
}

/// The masked causal-LM loss of `logits (b, t, vocab)` for `batch`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `ops` picks CUDA kernels
pub fn loss_from_logits(ops: TrainOps, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    #[cfg(feature = "cuda")]
    if ops == TrainOps::Fused {
        // Every row in place with its target (or none): no copy of the target rows, no f32
        // logits (kernels/cuda/train.cu's cross-entropy).
        let targets = row_targets(batch)?;
        let flat = logits.reshape((b * t, v))?;
        return Ok(qlorad_kernels::train_cuda::cross_entropy(&flat, &targets)?);
    }
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let ids = batch.ids.to_vec2::<u32>()?;
    for (bi, row_ids) in ids.iter().enumerate() {
        for (ti, &id) in row_ids.iter().enumerate().skip(1) {
            if batch.mask[bi * t + ti] {
                rows.push((bi * t + ti - 1) as u32);
                targets.push(id);
            }
        }
    }
    if rows.is_empty() {
        return Err(StepError::Invalid("the batch has no target tokens".into()));
    }
    let n = rows.len();
    let dev = logits.device();
    let flat = logits.reshape((b * t, v))?;
    let picked = flat.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?; // (n, vocab)
                                                                          // The log-softmax in f32 whatever the compute dtype (transformers upcasts logits for the loss).
    let picked = picked.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let tgt = Tensor::from_vec(targets, (n, 1), dev)?;
    Ok(logp.gather(&tgt, 1)?.mean_all()?.neg()?)
}

/// Each position's target for the fused cross-entropy: the next token where the mask is set,
/// `NO_TARGET` elsewhere (the last position of every row has none).
#[cfg(feature = "cuda")]
pub fn row_targets(batch: &Batch) -> Result<Vec<u32>> {
    let t = batch.seq;
    let ids = batch.ids.to_vec2::<u32>()?;
    let mut targets = vec![qlorad_kernels::train_cuda::NO_TARGET; batch.batch * t];
    for (bi, row_ids) in ids.iter().enumerate() {
        for (ti, &id) in row_ids.iter().enumerate().skip(1) {
            if batch.mask[bi * t + ti] {
                targets[bi * t + ti - 1] = id;
            }
        }
    }
    if targets
        .iter()
        .all(|&x| x == qlorad_kernels::train_cuda::NO_TARGET)
    {
        return Err(StepError::Invalid("the batch has no target tokens".into()));
    }
    Ok(targets)
}

/// `scale · loss` of `batch` and its gradients for `vars` (zeros where a var gets none).
///
/// With `checkpointing`, activations inside decoder layers are not kept: the forward pass stores
/// only each layer's input, and the backward pass recomputes one layer at a time and back-propagates
/// through it with the incoming gradient (Chen et al., 2016, "Training Deep Nets with Sublinear
/// Memory Cost"; the per-layer policy of transformers' `gradient_checkpointing_enable`). Peak
/// activation memory drops from all layers' to one layer's plus the layer inputs, for one extra
/// forward pass.
///
/// `between_layers`, if given, is called after every layer of both passes in checkpointing mode: a
/// preemption point (the daemon's job runner uses it to give the cores back to serving mid-step).
///
/// On a GPU with the fused training ops, layers back-propagate through their hand-written backward
/// (`Llama::block_backward`); elsewhere through candle's autograd ([`loss_and_grads_autograd`]).
pub fn loss_and_grads(
    model: &Llama,
    lora: &dyn LoraWeights,
    batch: &Batch,
    vars: &[&Var],
    scale: f64,
    checkpointing: bool,
    between_layers: Option<&(dyn Fn() + Send + Sync)>,
) -> Result<(f64, Vec<Tensor>)> {
    loss_and_grads_hooked(
        model,
        lora,
        batch,
        vars,
        scale,
        checkpointing,
        between_layers,
        &|_| Ok(()),
    )
}

/// [`loss_and_grads`] with `before_layer(li)` called before the forward pass first reads layer
/// `li`'s LoRA vars, and `before_layer(usize::MAX)` before anything else reads any var (the
/// trainer applies a deferred optimizer update there: `AdamW::apply_through`).
#[allow(clippy::too_many_arguments)] // loss_and_grads' arguments and the hook
pub fn loss_and_grads_hooked(
    model: &Llama,
    lora: &dyn LoraWeights,
    batch: &Batch,
    vars: &[&Var],
    scale: f64,
    checkpointing: bool,
    between_layers: Option<&(dyn Fn() + Send + Sync)>,
    before_layer: &dyn Fn(usize) -> Result<()>,
) -> Result<(f64, Vec<Tensor>)> {
    #[cfg(feature = "cuda")]
    if model.train_ops() == TrainOps::Fused {
        let pause = pauser(between_layers);
        return crate::step_layered::loss_and_grads(
            model,
            lora,
            batch,
            vars,
            scale,
            checkpointing,
            &pause,
            before_layer,
        );
    }
    // Autograd builds the whole graph from the vars: everything must be current first.
    before_layer(usize::MAX)?;
    loss_and_grads_autograd(
        model,
        lora,
        batch,
        vars,
        scale,
        checkpointing,
        between_layers,
    )
}

/// [`loss_and_grads`] through candle's autograd whatever the ops (gpu-check compares it with
/// the hand-written layer backward).
pub fn loss_and_grads_autograd(
    model: &Llama,
    lora: &dyn LoraWeights,
    batch: &Batch,
    vars: &[&Var],
    scale: f64,
    checkpointing: bool,
    between_layers: Option<&(dyn Fn() + Send + Sync)>,
) -> Result<(f64, Vec<Tensor>)> {
    let pause = pauser(between_layers);
    if !checkpointing {
        let l = (loss(model, lora, batch)? * scale)?;
        let value = l.to_scalar::<f32>()? as f64;
        return Ok((value, collect_grads(&l.backward()?, vars)?));
    }
    let ctx = model.train_context(batch.seq)?;
    let mut inputs = Vec::with_capacity(model.num_layers() + 1);
    inputs.push(model.embed_train(&batch.ids)?);
    for li in 0..model.num_layers() {
        // detach: this pass keeps no graph, only the layer's input for the recomputation.
        let y = model.block_train(li, &inputs[li], &ctx, lora)?.detach();
        inputs.push(y);
        pause();
    }
    let top = Var::from_tensor(&inputs[model.num_layers()])?;
    let logits = model.head_train(top.as_tensor())?;
    let l = (loss_from_logits(model.train_ops(), &logits, batch)? * scale)?;
    let value = l.to_scalar::<f32>()? as f64;
    let mut g = l
        .backward()?
        .get(top.as_tensor())
        .cloned()
        .ok_or_else(|| StepError::Invalid("no gradient reached the last layer".into()))?;
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for li in (0..model.num_layers()).rev() {
        let x = Var::from_tensor(&inputs[li])?;
        let y = model.block_train(li, x.as_tensor(), &ctx, lora)?;
        // d/dy Σ(y ⊙ g) = g: back-propagates the incoming gradient through this layer alone.
        // Summed per row first: candle reduces a whole tensor to one value in a single block
        // (~7 ms for a 4 × 512 × 4096 layer output on an H200, issue 6's profile).
        let store = (y * &g)?.sum(D::Minus1)?.sum_all()?.backward()?;
        for (slot, v) in grads.iter_mut().zip(vars) {
            if let Some(gv) = store.get(v.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => gv.clone(),
                    Some(acc) => (acc + gv)?,
                });
            }
        }
        pause();
        if li > 0 {
            g = store
                .get(x.as_tensor())
                .cloned()
                .ok_or_else(|| StepError::Invalid(format!("no gradient reached layer {li}")))?;
        }
    }
    Ok((value, fill_missing(grads, vars)?))
}

/// The gradients in var order, zeros where a var got none.
pub(crate) fn fill_missing(grads: Vec<Option<Tensor>>, vars: &[&Var]) -> Result<Vec<Tensor>> {
    grads
        .into_iter()
        .zip(vars)
        .map(|(g, v)| match g {
            Some(g) => Ok(g),
            None => Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?),
        })
        .collect()
}

/// The preemption callback as a plain closure (a no-op without one).
fn pauser(between_layers: Option<&(dyn Fn() + Send + Sync)>) -> impl Fn() + '_ {
    move || {
        if let Some(f) = between_layers {
            f()
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping. (A GPU step folds the
/// coefficient into the update instead: [`AdamW::clip_and_update`].)
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// The global L2 norm of all gradients together.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(sum_squares(grads)?.sqrt())
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients by: `max_norm / (norm + 1e-6)`,
/// at most 1.
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Σ g² over all gradients: on a GPU one multi-tensor launch and one read-back (candle's
/// `sum_all` reduces a tensor in one block and each `to_scalar` waits: 121 ms for r=64 on all 7
/// projections of a 7B model); per tensor in f32, totalled in f64, elsewhere.
fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if grads
        .iter()
        .all(|g| g.device().is_cuda() && g.dtype() == DType::F32)
    {
        return Ok(qlorad_kernels::multi_tensor_cuda::sum_squares(grads)?);
    }
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq)
}

/// Gradients of the named vars from a backward pass (zeros where a var got none).
pub fn collect_grads(grads: &GradStore, vars: &[&Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?),
        })
        .collect()
}
