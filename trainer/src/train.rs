//! A training run: epochs over shuffled (optionally length-grouped) batches, gradient accumulation,
//! LR schedule with warmup, clipping, AdamW, and the adapter saved in PEFT format so `qlorad serve`
//! and peft load it. The loop reads top to bottom as llm.c's does: forward → loss → backward →
//! clip → step → log.

use crate::data::{batches, Example};
use crate::step::{
    loss, loss_and_grads_hooked, AdamW, AdamWConfig, Batch, Result, StepError, TrainableLora,
};
use qlorad_model::io::{write_json, write_safetensors, OwnedTensor, StagingDir};
use qlorad_model::Llama;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Learning-rate schedule after linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            o => Err(format!("unknown schedule {o:?} (constant, linear, cosine)")),
        }
    }
}

/// Settings of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run the epochs).
    pub max_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    /// Global-norm clip (0: off).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub group_by_length: bool,
    /// Evaluate on the validation examples every this many steps and at the end (0: only at the end).
    pub eval_every: usize,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Keep AdamW's moments in host memory, paged onto the device per tensor for each update
    /// (see [`AdamW`]); results are identical, device memory smaller by 8 bytes per parameter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paged_optimizer: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            adamw: AdamWConfig::default(),
            schedule: Schedule::Constant,
            warmup_ratio: 0.03,
            max_grad_norm: 0.3,
            seed: 42,
            group_by_length: true,
            eval_every: 0,
            gradient_checkpointing: false,
            paged_optimizer: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(StepError::Invalid(m.into()));
        if self.batch_size == 0 || self.batch_size > 4096 {
            return bad("batch_size must be in 1..=4096");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be positive");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("n_epochs must be positive");
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr < 1.0) {
            return bad("learning rate must be in (0, 1)");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio must be in [0, 1)");
        }
        if self.max_grad_norm < 0.0 || self.adamw.weight_decay < 0.0 {
            return bad("max_grad_norm and weight_decay must not be negative");
        }
        Ok(())
    }
}

/// The LR at optimizer step `step` (0-based) of `total` (HF's `get_*_schedule_with_warmup`).
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// What each optimizer step reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Non-padding tokens trained on so far (the whole run, across resumes).
    pub trained_tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_perplexity: Option<f64>,
}

/// Where a run stands: everything besides weights and moments that a resume needs. The data order
/// is a pure function of (seed, epoch), so (epoch, group) is the data position and no RNG state is
/// saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Accumulation groups of `epoch` done.
    pub group: usize,
    pub trained_tokens: u64,
}

/// A training run that advances one optimizer step at a time, so a caller (the CLI, or the daemon's
/// job runner interleaving with serving) can log, checkpoint, pause or cancel between steps.
pub struct Trainer<'m> {
    model: &'m Llama,
    lora: TrainableLora,
    examples: Vec<Example>,
    eval: Vec<Example>,
    cfg: TrainConfig,
    opt: AdamW,
    pad_id: u32,
    lengths: Vec<usize>,
    order: Vec<Vec<usize>>,
    pos: Position,
    total: usize,
    warmup: usize,
    started: Instant,
    session_tokens: u64,
    between_layers: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
    /// Data-parallel group this trainer is one rank of (`None`: trains alone).
    collective: Option<std::sync::Arc<dyn crate::parallel::Collective>>,
    /// Where each layer's LoRA vars sit in the optimizer's groups, for an update deferred into
    /// the next forward pass (staged paged moments on a GPU; empty otherwise: nothing deferred).
    layer_groups: LayerGroups,
}

impl<'m> Trainer<'m> {
    /// A fresh run.
    pub fn new(
        model: &'m Llama,
        lora: TrainableLora,
        examples: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
        pad_id: u32,
    ) -> Result<Self> {
        let opt = {
            let named = lora.named_vars();
            let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
            AdamW::new(&vars, cfg.adamw)?
        };
        Self::assemble(
            model,
            lora,
            examples,
            eval,
            cfg,
            pad_id,
            opt,
            Position::default(),
        )
    }

    #[allow(clippy::too_many_arguments)] // the parts of a run, fresh or restored
    pub(crate) fn assemble(
        model: &'m Llama,
        lora: TrainableLora,
        examples: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
        pad_id: u32,
        opt: AdamW,
        pos: Position,
    ) -> Result<Self> {
        cfg.validate()?;
        if examples.is_empty() {
            return Err(StepError::Invalid("no training examples".into()));
        }
        let (opt, layer_groups) = LayerGroups::place(opt, model, &lora, cfg.paged_optimizer)?;
        let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
        let (total, warmup) = schedule_len(lengths.len(), &cfg, 1);
        let order = batches(
            &lengths,
            cfg.batch_size,
            cfg.group_by_length,
            cfg.seed.wrapping_add(pos.epoch as u64),
        );
        Ok(Self {
            model,
            lora,
            examples,
            eval,
            cfg,
            opt,
            pad_id,
            lengths,
            order,
            pos,
            total,
            warmup,
            started: Instant::now(),
            session_tokens: 0,
            between_layers: None,
            collective: None,
            layer_groups,
        })
    }

    /// The adapter being trained, with any deferred optimizer update applied.
    pub fn lora(&self) -> Result<&TrainableLora> {
        self.opt.flush()?;
        Ok(&self.lora)
    }

    /// Makes this trainer one rank of a data-parallel group (crate::parallel): every rank must
    /// hold the same adapter, examples and config, and call `step` in lockstep; a step then covers
    /// `grad_accum × world` micro-batches, this rank's share of them computed here. Call before the
    /// first step.
    pub fn set_collective(&mut self, c: std::sync::Arc<dyn crate::parallel::Collective>) {
        (self.total, self.warmup) = schedule_len(self.lengths.len(), &self.cfg, c.world());
        self.collective = Some(c);
    }

    /// Micro-batches per optimizer step, over all ranks.
    fn accum(&self) -> usize {
        self.cfg.grad_accum.max(1) * self.collective.as_ref().map_or(1, |c| c.world().max(1))
    }

    /// A function called between decoder layers during a step (with gradient checkpointing), e.g. to
    /// yield the CPU to a server sharing the process.
    pub fn set_between_layers(&mut self, f: std::sync::Arc<dyn Fn() + Send + Sync>) {
        self.between_layers = Some(f);
    }

    pub fn total_steps(&self) -> usize {
        self.total
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn n_examples(&self) -> usize {
        self.examples.len()
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    pub fn is_done(&self) -> bool {
        self.pos.step >= self.total
    }

    /// Writes this epoch's remaining optimizer steps as JSON lines — per step its learning rate and
    /// each micro-batch's examples (token ids, loss masks, the pad id) — so a reference
    /// implementation can train on exactly these batches (bench/gpu_epoch_reference.py). Returns
    /// the number of steps written.
    pub fn write_plan(&self, w: &mut dyn std::io::Write) -> Result<usize> {
        let accum = self.accum();
        let mut step = self.pos.step;
        let first = (self.pos.group * accum).min(self.order.len());
        for group in self.order[first..].chunks(accum) {
            if step >= self.total {
                break;
            }
            let micro: Vec<serde_json::Value> = group
                .iter()
                .map(|idx| {
                    let exs: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
                    json!({
                        "input_ids": exs.iter().map(|e| &e.input_ids).collect::<Vec<_>>(),
                        "loss_mask": exs.iter().map(|e| &e.loss_mask).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let lr = lr_at(
                self.cfg.adamw.lr,
                self.cfg.schedule,
                self.warmup,
                step,
                self.total,
            );
            let line = json!({"step": step + 1, "lr": lr, "pad_id": self.pad_id, "micro": micro});
            writeln!(w, "{line}")
                .map_err(|e| StepError::Invalid(format!("writing the plan: {e}")))?;
            step += 1;
        }
        Ok(step - self.pos.step)
    }

    /// One optimizer step (forward, backward over the accumulation group, clip, AdamW), or `None`
    /// when the run is complete.
    pub fn step(&mut self) -> Result<Option<StepLog>> {
        if self.is_done() {
            return Ok(None);
        }
        let accum = self.accum();
        if self.pos.group * accum >= self.order.len() {
            self.pos.epoch += 1;
            self.pos.group = 0;
            self.order = batches(
                &self.lengths,
                self.cfg.batch_size,
                self.cfg.group_by_length,
                self.cfg.seed.wrapping_add(self.pos.epoch as u64),
            );
        }
        let first = self.pos.group * accum;
        let group = &self.order[first..(first + accum).min(self.order.len())];
        let named = self.lora.named_vars();
        let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
        let mut acc: Option<Vec<candle_core::Tensor>> = None;
        let (mut loss_sum, mut step_tokens) = (0.0, 0u64);
        let (rank, world) = self.rank_world();
        for (micro, idx) in group.iter().enumerate() {
            // Data-parallel: micro-batch k belongs to rank k mod world.
            if micro % world != rank {
                continue;
            }
            let exs: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
            step_tokens += exs.iter().map(|e| e.input_ids.len() as u64).sum::<u64>();
            let batch = Batch::from_examples(&exs, self.pad_id)?;
            self.lora
                .set_dropout_seed(Some(dropout_seed(self.cfg.seed, self.pos.step, micro)));
            // The previous step's update, if deferred, lands layer by layer in this forward.
            let (opt, layer_groups) = (&self.opt, &self.layer_groups);
            let before_layer = |li: usize| layer_groups.before_layer(opt, li);
            let r = loss_and_grads_hooked(
                self.model,
                &self.lora,
                &batch,
                &vars,
                1.0 / group.len() as f64,
                self.cfg.gradient_checkpointing,
                self.between_layers.as_deref(),
                &before_layer,
            );
            self.lora.set_dropout_seed(None);
            let (l, g) = r?;
            loss_sum += l;
            acc = Some(match acc {
                None => g,
                Some(a) => a
                    .iter()
                    .zip(&g)
                    .map(|(x, y)| x + y)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = match acc {
            Some(g) => g,
            // A rank with no micro-batch in this (short, last) step contributes zeros.
            None => vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        };
        if let Some(c) = &self.collective {
            c.all_reduce_sum(&mut grads)?;
            let s = c.all_reduce_sum_f64(&[loss_sum, step_tokens as f64])?;
            loss_sum = s[0];
            step_tokens = s[1] as u64;
        }
        let lr = lr_at(
            self.cfg.adamw.lr,
            self.cfg.schedule,
            self.warmup,
            self.pos.step,
            self.total,
        );
        // Preemption points after the gradient norm and between the update's launches (a paged
        // update streams the moments over the host link: tens of milliseconds of GPU work that
        // serving would otherwise wait behind).
        let between = self.between_layers.clone();
        let pause = move || {
            if let Some(f) = &between {
                f()
            }
        };
        // Deferred with staged paged moments: applied in the next step's forward or on the next
        // read of the weights (`lora`, `evaluate`, a checkpoint), whichever comes first.
        let grad_norm =
            self.opt
                .clip_and_defer(&vars, &grads, lr, self.cfg.max_grad_norm, &pause)?;
        self.pos.step += 1;
        self.pos.group += 1;
        self.pos.trained_tokens += step_tokens;
        self.session_tokens += step_tokens;
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut log = StepLog {
            step: self.pos.step,
            total_steps: self.total,
            epoch: self.pos.epoch,
            loss: loss_sum,
            lr,
            grad_norm,
            trained_tokens: self.pos.trained_tokens,
            tokens_per_s: self.session_tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eval_loss: None,
            eval_perplexity: None,
        };
        let every = self.cfg.eval_every;
        if !self.eval.is_empty()
            && ((every > 0 && self.pos.step.is_multiple_of(every)) || self.is_done())
        {
            let e = self.evaluate()?;
            log.eval_loss = Some(e);
            log.eval_perplexity = Some(e.exp());
        }
        Ok(Some(log))
    }

    /// (rank, world) of this trainer's data-parallel group; (0, 1) alone.
    fn rank_world(&self) -> (usize, usize) {
        self.collective
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world().max(1)))
    }

    /// Mean cross-entropy per target token over the validation examples (no dropout). In a
    /// data-parallel group every rank calls it: each evaluates its share of the batches and the
    /// sums are exchanged.
    pub fn evaluate(&self) -> Result<f64> {
        self.opt.flush()?;
        let (rank, world) = self.rank_world();
        let (mut sum, mut count) = (0.0, 0usize);
        for (k, chunk) in self.eval.chunks(self.cfg.batch_size.max(1)).enumerate() {
            if k % world != rank {
                continue;
            }
            let exs: Vec<&Example> = chunk.iter().collect();
            let batch = Batch::from_examples(&exs, self.pad_id)?;
            let n = batch.target_count();
            if n == 0 {
                continue;
            }
            sum += loss(self.model, &self.lora, &batch)?.to_scalar::<f32>()? as f64 * n as f64;
            count += n;
        }
        if let Some(c) = &self.collective {
            let s = c.all_reduce_sum_f64(&[sum, count as f64])?;
            (sum, count) = (s[0], s[1] as usize);
        }
        if count == 0 {
            return Err(StepError::Invalid(
                "the validation data has no target tokens".into(),
            ));
        }
        Ok(sum / count as f64)
    }
}

/// Optimizer steps of a run over `n` examples.
/// A deferred optimizer update's groups of vars (indices into `named_vars`), in the order a
/// forward pass reads them: vars that belong to no decoder layer first, then each layer's LoRA
/// vars; and per layer, the group holding its vars.
#[derive(Debug, Clone, Default)]
pub struct LayerGroups {
    pub groups: Vec<Vec<usize>>,
    pub of_layer: Vec<Option<usize>>,
}

impl LayerGroups {
    pub fn new(model: &Llama, lora: &TrainableLora) -> Self {
        use qlorad_model::llama::train::LoraWeights;
        let named = lora.named_vars();
        let index: std::collections::HashMap<_, usize> = named
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (v.as_tensor().id(), i))
            .collect();
        let mut taken = vec![false; named.len()];
        let mut per_layer = Vec::with_capacity(model.num_layers());
        for li in 0..model.num_layers() {
            let mut g = Vec::new();
            for proj in 0..qlorad_model::loader::PROJECTIONS.len() {
                if let Some((a, b, _)) = lora.module(li, proj) {
                    for t in [a, b] {
                        if let Some(&i) = index.get(&t.id()) {
                            if !taken[i] {
                                taken[i] = true;
                                g.push(i);
                            }
                        }
                    }
                }
            }
            per_layer.push(g);
        }
        let rest: Vec<usize> = (0..named.len()).filter(|&i| !taken[i]).collect();
        let mut groups = Vec::new();
        if !rest.is_empty() {
            groups.push(rest);
        }
        let mut of_layer = Vec::with_capacity(per_layer.len());
        for g in per_layer {
            if g.is_empty() {
                // Nothing of this layer to update: what comes before it is applied by then.
                of_layer.push(groups.len().checked_sub(1));
            } else {
                groups.push(g);
                of_layer.push(Some(groups.len() - 1));
            }
        }
        Self { groups, of_layer }
    }

    /// Puts `opt`'s moments where a run keeps them: paged to the host (`paged`; on a GPU staged
    /// per layer, with updates deferred, so the groups come back too) or on the model's device.
    pub fn place(
        opt: AdamW,
        model: &Llama,
        lora: &TrainableLora,
        paged: bool,
    ) -> Result<(AdamW, Self)> {
        if paged && model.device().is_cuda() {
            let lg = Self::new(model, lora);
            Ok((opt.paged_in_groups(model.device(), lg.groups.clone())?, lg))
        } else {
            Ok((opt.paged(paged, model.device())?, Self::default()))
        }
    }

    /// The hook of [`crate::step::loss_and_grads_hooked`]: applies `opt`'s deferred update up to
    /// layer `li`'s group (everything for an index past the layers).
    pub fn before_layer(&self, opt: &AdamW, li: usize) -> Result<()> {
        match self.of_layer.get(li) {
            Some(Some(g)) => opt.apply_through(*g),
            Some(None) => Ok(()),
            None => opt.flush(),
        }
    }
}

pub fn total_steps(n: usize, cfg: &TrainConfig) -> usize {
    schedule_len(n, cfg, 1).0
}

/// (optimizer steps, warmup steps) of a run over `n` examples on `world` data-parallel ranks
/// (each step covers `grad_accum × world` micro-batches).
fn schedule_len(n: usize, cfg: &TrainConfig, world: usize) -> (usize, usize) {
    let total = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        n.div_ceil(cfg.batch_size.max(1))
            .div_ceil(cfg.grad_accum.max(1) * world.max(1))
            * cfg.epochs.max(1)
    };
    (total, (cfg.warmup_ratio * total as f64).ceil() as usize)
}

/// The dropout stream of one micro-batch: a pure function of where it is in the run (SplitMix64
/// finalizer over the mixed inputs), so resumed runs draw identical masks.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((micro as u64) << 48);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `lora` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
/// atomically.
pub fn save_peft(
    lora: &TrainableLora,
    base_model: &str,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let staging = StagingDir::new(out, overwrite)?;
    write_peft_files(lora, base_model, staging.path())?;
    Ok(staging.commit()?)
}

/// The two PEFT files of `lora`, written into `dir`.
pub(crate) fn write_peft_files(lora: &TrainableLora, base_model: &str, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, var) in lora.named_vars() {
        let t = var.as_tensor();
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        tensors.push(OwnedTensor::f32(&name, t.dims().to_vec(), &v));
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let spec = &lora.spec;
    let cfg = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": spec.targets, "bias": "none",
        "fan_in_fan_out": false, "use_rslora": spec.rslora, "use_dora": false, "modules_to_save": null, "inference_mode": true,
        "init_lora_weights": true, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": null,
        "base_model_name_or_path": base_model
    });
    write_json(&dir.join("adapter_config.json"), &cfg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(lr_at(1.0, Schedule::Constant, 2, 0, 10), 0.5);
        assert_eq!(lr_at(1.0, Schedule::Constant, 2, 5, 10), 1.0);
        assert!((lr_at(1.0, Schedule::Linear, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!(lr_at(1.0, Schedule::Cosine, 0, 10, 10).abs() < 1e-12);
    }
}
