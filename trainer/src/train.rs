//! A training run: epochs over shuffled (optionally length-grouped) batches, gradient accumulation,
//! LR schedule with warmup, clipping, AdamW, and the adapter saved in PEFT format so `qlorad serve`
//! and peft load it. The loop reads top to bottom as llm.c's does: forward → loss → backward →
//! clip → step → log.

use crate::data::{batches, Example};
use crate::step::{
    clip_grad_norm, collect_grads, loss, AdamW, AdamWConfig, Batch, Result, StepError,
    TrainableLora,
};
use qlorad_model::io::{write_json, write_safetensors, OwnedTensor, StagingDir};
use qlorad_model::Llama;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Learning-rate schedule after linear warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
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
#[derive(Debug, Clone)]
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
        }
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Trains `lora` on `examples`, calling `on_step` after every optimizer step.
pub fn train(
    model: &Llama,
    lora: &TrainableLora,
    examples: &[Example],
    cfg: &TrainConfig,
    pad_id: u32,
    mut on_step: impl FnMut(&StepLog),
) -> Result<Vec<StepLog>> {
    if examples.is_empty() {
        return Err(StepError::Invalid("no training examples".into()));
    }
    let named = lora.named_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
    let mut opt = AdamW::new(&vars, cfg.adamw)?;
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    let per_epoch = lengths
        .len()
        .div_ceil(cfg.batch_size.max(1))
        .div_ceil(cfg.grad_accum.max(1));
    let total = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        per_epoch * cfg.epochs.max(1)
    };
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let start = Instant::now();
    let (mut logs, mut tokens, mut step) = (Vec::new(), 0usize, 0usize);
    'epochs: for epoch in 0.. {
        let order = batches(
            &lengths,
            cfg.batch_size,
            cfg.group_by_length,
            cfg.seed.wrapping_add(epoch),
        );
        for group in order.chunks(cfg.grad_accum.max(1)) {
            let mut acc: Option<Vec<candle_core::Tensor>> = None;
            let mut loss_sum = 0.0;
            for idx in group {
                let exs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
                let batch = Batch::from_examples(&exs, pad_id)?;
                tokens += batch.batch * batch.seq;
                let l = (loss(model, lora, &batch)? / group.len() as f64)?;
                loss_sum += l.to_scalar::<f32>()? as f64;
                let g = collect_grads(&l.backward()?, &vars)?;
                acc = Some(match acc {
                    None => g,
                    Some(a) => a
                        .iter()
                        .zip(&g)
                        .map(|(x, y)| x + y)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            let mut grads = acc.unwrap_or_default();
            let grad_norm = if cfg.max_grad_norm > 0.0 {
                clip_grad_norm(&mut grads, cfg.max_grad_norm)?
            } else {
                f64::NAN
            };
            let lr = lr_at(cfg.adamw.lr, cfg.schedule, warmup, step, total);
            opt.update(&vars, &grads, lr)?;
            step += 1;
            let elapsed = start.elapsed().as_secs_f64();
            let log = StepLog {
                step,
                total_steps: total,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens_per_s: tokens as f64 / elapsed.max(1e-9),
                elapsed_s: elapsed,
            };
            on_step(&log);
            logs.push(log);
            if step >= total {
                break 'epochs;
            }
        }
    }
    Ok(logs)
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
    let mut tensors = Vec::new();
    for (name, var) in lora.named_vars() {
        let t = var.as_tensor();
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        tensors.push(OwnedTensor::f32(&name, t.dims().to_vec(), &v));
    }
    write_safetensors(&staging.path().join("adapter_model.safetensors"), &tensors)?;
    let cfg = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0, "target_modules": lora.targets, "bias": "none", "fan_in_fan_out": false,
        "use_rslora": false, "use_dora": false, "modules_to_save": null, "inference_mode": true,
        "init_lora_weights": true, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": null,
        "base_model_name_or_path": base_model
    });
    write_json(&staging.path().join("adapter_config.json"), &cfg)?;
    Ok(staging.commit()?)
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
