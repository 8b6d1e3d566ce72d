//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint folder holds the adapter in PEFT format (so every checkpoint is also servable and
//! loadable by peft), `optimizer.safetensors` (AdamW's f32 moments, named after their parameters) and
//! `trainer_state.json` (position in the data, optimizer step count, and fingerprints of the settings
//! and data it was made with). It is written through a staging folder and renamed into place, so a
//! crash leaves either the previous checkpoint or the new one, never half of one. Weights and moments
//! are stored as exact f32 and the data order is a pure function of (seed, epoch), so on CPU a resumed
//! run reproduces the uninterrupted run bit for bit (tested).

use crate::data::Example;
use crate::step::{AdamW, LoraSpec, Result, StepError, TrainableLora};
use crate::train::{write_peft_files, Position, TrainConfig, Trainer};
use candle_core::Tensor;
use qlorad_model::io::{write_json, write_safetensors, OwnedTensor, StagingDir};
use qlorad_model::{Llama, LoraAdapter};
use std::path::Path;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const FORMAT: u32 = 1;

/// `trainer_state.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    pub position: Position,
    pub adam_step: u64,
    pub total_steps: usize,
    /// The run's settings and adapter shape as JSON text: compared verbatim on resume (text, not
    /// parsed floats, so the check cannot be fooled by float round trips).
    pub config_json: String,
    pub lora_json: String,
    pub n_examples: usize,
    /// FNV-1a over every training example's ids and mask.
    pub data_fingerprint: String,
    pub base_model: String,
}

fn bad(dir: &Path, msg: impl std::fmt::Display) -> StepError {
    StepError::Checkpoint(format!("{}: {msg}", dir.display()))
}

/// A fingerprint of the tokenized training data, so a resume on different data is refused.
pub fn data_fingerprint(examples: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in examples {
        eat(e.input_ids.len() as u64);
        for (&id, &m) in e.input_ids.iter().zip(&e.loss_mask) {
            eat(((id as u64) << 1) | m as u64);
        }
    }
    format!("{h:016x}")
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StepError::Invalid(e.to_string()))
}

/// The settings a checkpoint must be resumed with: all of them but where the optimizer state is
/// kept, which does not change the run (a run may switch paging on or off across a resume).
fn settings_json(cfg: &TrainConfig) -> Result<String> {
    to_json(&TrainConfig {
        paged_optimizer: false,
        ..cfg.clone()
    })
}

/// Reads and checks a checkpoint's `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| bad(dir, e))?;
    let st: CheckpointState =
        serde_json::from_str(&text).map_err(|e| bad(dir, format!("{STATE_FILE}: {e}")))?;
    if st.format != FORMAT {
        return Err(bad(dir, format!("unsupported format {}", st.format)));
    }
    Ok(st)
}

impl Trainer<'_> {
    /// Writes a checkpoint of the current state to `dir` (atomically; replaces an existing one if
    /// `overwrite`).
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str, overwrite: bool) -> Result<()> {
        let staging = StagingDir::new(dir, overwrite)?;
        write_peft_files(self.lora()?, base_model, staging.path())?;
        let (m, v) = self.optimizer().moments()?;
        let mut tensors = Vec::with_capacity(2 * m.len());
        for ((name, _), (m, v)) in self.lora()?.named_vars().iter().zip(m.iter().zip(&v)) {
            for (prefix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let vals = t.flatten_all()?.to_vec1::<f32>()?;
                tensors.push(OwnedTensor::f32(
                    &format!("{prefix}.{name}"),
                    t.dims().to_vec(),
                    &vals,
                ));
            }
        }
        write_safetensors(&staging.path().join(OPTIMIZER_FILE), &tensors)?;
        let state = CheckpointState {
            format: FORMAT,
            position: self.position(),
            adam_step: self.optimizer().step,
            total_steps: self.total_steps(),
            config_json: settings_json(self.config())?,
            lora_json: to_json(&self.lora()?.spec)?,
            n_examples: self.n_examples(),
            data_fingerprint: data_fingerprint(self.examples()),
            base_model: base_model.to_string(),
        };
        let value = serde_json::to_value(&state).map_err(|e| StepError::Invalid(e.to_string()))?;
        write_json(&staging.path().join(STATE_FILE), &value)?;
        Ok(staging.commit()?)
    }
}

impl<'m> Trainer<'m> {
    /// Continues the run saved in `dir`. The settings, adapter shape and data must be those the
    /// checkpoint was made with; anything else is refused with the reason.
    pub fn resume(
        model: &'m Llama,
        spec: &LoraSpec,
        examples: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
        pad_id: u32,
        dir: &Path,
    ) -> Result<Self> {
        Self::resume_in_group(model, spec, examples, eval, cfg, pad_id, dir, None)
    }

    /// [`Trainer::resume`] as one rank of a data-parallel group (every rank resumes from the same
    /// checkpoint; it must come from a run over as many ranks, or the step positions differ).
    #[allow(clippy::too_many_arguments)] // resume's parts and the group
    pub fn resume_in_group(
        model: &'m Llama,
        spec: &LoraSpec,
        examples: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
        pad_id: u32,
        dir: &Path,
        group: Option<std::sync::Arc<dyn crate::parallel::Collective>>,
    ) -> Result<Self> {
        let st = read_state(dir)?;
        if st.config_json != settings_json(&cfg)? {
            return Err(bad(dir, "made with different training settings"));
        }
        if st.lora_json != to_json(spec)? {
            return Err(bad(dir, "made with a different LoRA shape"));
        }
        if st.n_examples != examples.len() || st.data_fingerprint != data_fingerprint(&examples) {
            return Err(bad(dir, "made on different training data"));
        }
        let adapter = LoraAdapter::load(dir, "checkpoint", model.config())
            .map_err(|e| bad(dir, format!("adapter: {e}")))?;
        let lora = TrainableLora::from_adapter_on(&adapter, model.config(), spec, model.device())?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let buf = std::fs::read(&opt_path).map_err(|e| bad(dir, e))?;
        let st_file = safetensors::SafeTensors::deserialize(&buf)
            .map_err(|e| bad(dir, format!("{OPTIMIZER_FILE}: {e}")))?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, var) in lora.named_vars() {
            for (prefix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{prefix}.{name}");
                let view = st_file
                    .tensor(&key)
                    .map_err(|_| bad(dir, format!("{OPTIMIZER_FILE} lacks {key}")))?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != var.dims() {
                    return Err(bad(dir, format!("{key}: wrong dtype or shape")));
                }
                let vals: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                out.push(Tensor::from_vec(vals, view.shape(), var.device())?);
            }
        }
        let opt = AdamW::from_state(cfg.adamw, m, v, st.adam_step);
        let mut t = Trainer::assemble(model, lora, examples, eval, cfg, pad_id, opt, st.position)?;
        if let Some(g) = group {
            t.set_collective(g);
        }
        if t.total_steps() != st.total_steps {
            return Err(bad(
                dir,
                "the run's length changed (other settings, or another number of devices)",
            ));
        }
        Ok(t)
    }
}
