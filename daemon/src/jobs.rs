//! Fine-tuning jobs: the creation request (OpenAI's shape plus LoRA extensions), its validation with
//! the offending field named, "auto" resolution, and naming of outputs. The runner that executes
//! jobs on the resident base is in `runner.rs`.

use crate::state::JobError;
use qlorad_trainer::step::{AdamWConfig, LoraSpec};
use qlorad_trainer::train::{Schedule, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The QLoRA paper's learning rate for 7B–13B models (Dettmers et al., 2023, table 9); OpenAI's
/// `learning_rate_multiplier` scales it.
pub const BASE_LR: f64 = 2e-4;
pub use qlorad_trainer::step::TARGET_MODULES as ALL_TARGETS;

/// A rejected request: the message and the parameter at fault (`hyperparameters.n_epochs`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct BadParam {
    pub message: String,
    pub param: String,
}

fn bad(param: &str, message: impl Into<String>) -> BadParam {
    BadParam {
        message: message.into(),
        param: param.to_string(),
    }
}

/// Hyperparameters as requested: `None` is "auto".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub use_rslora: Option<bool>,
    pub target_modules: Option<Vec<String>>,
    pub max_seq_len: Option<usize>,
    /// Steps between checkpoints (the most a crash can lose).
    pub checkpoint_interval: Option<usize>,
    /// Steps between validation-loss evaluations.
    pub eval_interval: Option<usize>,
    /// Recompute decoder layers in the backward pass (less memory).
    #[serde(default)]
    pub gradient_checkpointing: Option<bool>,
    /// Keep AdamW's state in host memory, paged onto the GPU per tensor for each update.
    #[serde(default)]
    pub paged_optimizer: Option<bool>,
}

/// Everything a job runs with, every "auto" decided. Stored as JSON and re-read by every run of the
/// job (first or resumed), so the resumed run's settings equal the first run's exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    pub learning_rate: f64,
    pub lora: LoraSpec,
    pub max_seq_len: usize,
    pub checkpoint_interval: usize,
    pub eval_interval: usize,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub paged_optimizer: bool,
    pub seed: u64,
    pub n_train_examples: usize,
    pub n_validation_examples: usize,
    pub total_steps: usize,
}

impl Resolved {
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.n_epochs,
            max_steps: 0,
            batch_size: self.batch_size,
            grad_accum: 1,
            adamw: AdamWConfig {
                lr: self.learning_rate,
                ..Default::default()
            },
            schedule: Schedule::Linear,
            warmup_ratio: 0.03,
            max_grad_norm: 1.0,
            seed: self.seed,
            group_by_length: true,
            eval_every: self.eval_interval,
            gradient_checkpointing: self.gradient_checkpointing,
            paged_optimizer: self.paged_optimizer,
        }
    }
}

fn auto_or<T>(
    hp: &serde_json::Map<String, Value>,
    key: &str,
    get: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Option<T>, BadParam> {
    let param = format!("hyperparameters.{key}");
    match hp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => get(v)
            .map(Some)
            .ok_or_else(|| bad(&param, format!("`{key}` must be \"auto\" or {what}"))),
    }
}

fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    v: Option<T>,
    key: &str,
    lo: T,
    hi: T,
) -> Result<Option<T>, BadParam> {
    match v {
        Some(x) if !(x >= lo && x <= hi) => Err(bad(
            &format!("hyperparameters.{key}"),
            format!("`{key}` must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(v),
    }
}

impl JobRequest {
    /// Reads the hyperparameters of a creation body: `method.supervised.hyperparameters` (current
    /// API) or the top-level `hyperparameters` (legacy), each value "auto" or a number, plus the LoRA
    /// extensions. Every value is range-checked.
    pub fn parse(body: &Value) -> Result<Self, BadParam> {
        let empty = serde_json::Map::new();
        let method = body.get("method");
        if let Some(m) = method.filter(|m| !m.is_null()) {
            match m.get("type").and_then(Value::as_str) {
                None | Some("supervised") => {}
                Some(other) => {
                    return Err(bad(
                        "method.type",
                        format!("method {other:?} is not supported (only \"supervised\")"),
                    ))
                }
            }
        }
        let hp_val = method
            .and_then(|m| m.get("supervised"))
            .and_then(|s| s.get("hyperparameters"))
            .or_else(|| body.get("hyperparameters"));
        let hp = match hp_val {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(_) => return Err(bad("hyperparameters", "must be an object")),
        };
        let int = |v: &Value| v.as_u64().map(|x| x as usize);
        let float = |v: &Value| v.as_f64();
        let r = JobRequest {
            n_epochs: check_range(
                auto_or(hp, "n_epochs", int, "an integer")?,
                "n_epochs",
                1,
                50,
            )?,
            batch_size: check_range(
                auto_or(hp, "batch_size", int, "an integer")?,
                "batch_size",
                1,
                256,
            )?,
            learning_rate_multiplier: check_range(
                auto_or(hp, "learning_rate_multiplier", float, "a number")?,
                "learning_rate_multiplier",
                1e-4,
                100.0,
            )?,
            lora_r: check_range(auto_or(hp, "lora_r", int, "an integer")?, "lora_r", 1, 1024)?,
            lora_alpha: check_range(
                auto_or(hp, "lora_alpha", float, "a number")?,
                "lora_alpha",
                1e-3,
                1e4,
            )?,
            lora_dropout: check_range(
                auto_or(hp, "lora_dropout", float, "a number")?,
                "lora_dropout",
                0.0,
                0.9,
            )?,
            use_rslora: auto_or(hp, "use_rslora", Value::as_bool, "a boolean")?,
            target_modules: auto_or(
                hp,
                "target_modules",
                |v| {
                    v.as_array()?
                        .iter()
                        .map(|x| x.as_str().map(String::from))
                        .collect()
                },
                "a list of projection names",
            )?,
            max_seq_len: check_range(
                auto_or(hp, "max_seq_len", int, "an integer")?,
                "max_seq_len",
                8,
                131_072,
            )?,
            checkpoint_interval: check_range(
                auto_or(hp, "checkpoint_interval", int, "an integer")?,
                "checkpoint_interval",
                1,
                1_000_000,
            )?,
            eval_interval: check_range(
                auto_or(hp, "eval_interval", int, "an integer")?,
                "eval_interval",
                1,
                1_000_000,
            )?,
            gradient_checkpointing: auto_or(
                hp,
                "gradient_checkpointing",
                Value::as_bool,
                "a boolean",
            )?,
            paged_optimizer: auto_or(hp, "paged_optimizer", Value::as_bool, "a boolean")?,
        };
        if let Some(t) = &r.target_modules {
            if t.is_empty() {
                return Err(bad(
                    "hyperparameters.target_modules",
                    "`target_modules` must not be empty",
                ));
            }
            if let Some(x) = t.iter().find(|x| !ALL_TARGETS.contains(&x.as_str())) {
                return Err(bad(
                    "hyperparameters.target_modules",
                    format!("{x:?} is not one of {}", ALL_TARGETS.join(", ")),
                ));
            }
        }
        Ok(r)
    }

    /// Decides every "auto" once the data is known (`n_train` examples). Defaults follow the QLoRA
    /// paper's recipe (r 16 over all linear layers, α 32 — Dettmers et al., 2023) and OpenAI's
    /// documented behaviour for epochs and batch size.
    pub fn resolve(
        &self,
        seed: u64,
        n_train: usize,
        n_val: usize,
        default_checkpoint_interval: usize,
    ) -> Resolved {
        let batch_size = self.batch_size.unwrap_or(n_train.div_ceil(64).clamp(1, 8));
        let n_epochs = self.n_epochs.unwrap_or(3);
        let mult = self.learning_rate_multiplier.unwrap_or(1.0);
        let total_steps = n_train.div_ceil(batch_size) * n_epochs;
        Resolved {
            n_epochs,
            batch_size,
            learning_rate_multiplier: mult,
            learning_rate: BASE_LR * mult,
            lora: LoraSpec {
                r: self.lora_r.unwrap_or(16),
                alpha: self.lora_alpha.unwrap_or(32.0),
                dropout: self.lora_dropout.unwrap_or(0.05),
                rslora: self.use_rslora.unwrap_or(false),
                targets: self
                    .target_modules
                    .clone()
                    .unwrap_or_else(|| ALL_TARGETS.map(String::from).to_vec()),
            },
            max_seq_len: self.max_seq_len.unwrap_or(1024),
            checkpoint_interval: self
                .checkpoint_interval
                .unwrap_or(default_checkpoint_interval)
                .max(1),
            eval_interval: self.eval_interval.unwrap_or(0),
            // On by default in the daemon: the process's memory is shared with serving, and layer
            // boundaries are where a step can pause for serving (see runner.rs).
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(true),
            paged_optimizer: self.paged_optimizer.unwrap_or(false),
            seed,
            n_train_examples: n_train,
            n_validation_examples: n_val,
            total_steps,
        }
    }
}

/// Checks a `suffix`: up to 64 characters of `[A-Za-z0-9_-]` (OpenAI allows 64).
pub fn check_suffix(s: &str) -> Result<(), BadParam> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad(
            "suffix",
            "`suffix` must be 1 to 64 characters of letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

/// `ft:<base>:<suffix>:<job-id>` (an empty suffix leaves the field empty, as OpenAI's names do).
pub fn fine_tuned_name(base: &str, suffix: Option<&str>, job: &str) -> String {
    format!("ft:{base}:{}:{job}", suffix.unwrap_or(""))
}

pub fn checkpoint_name(model: &str, step: usize) -> String {
    format!("{model}:ckpt-step-{step}")
}

pub fn job_error(code: &str, message: impl Into<String>, param: Option<&str>) -> JobError {
    JobError {
        code: code.to_string(),
        message: message.into(),
        param: param.map(String::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_auto_values_and_extensions() {
        let r = JobRequest::parse(
            &json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5,
            "lora_r": 8, "target_modules": ["q_proj", "v_proj"]}}}}),
        )
        .unwrap();
        assert_eq!(
            (
                r.n_epochs,
                r.batch_size,
                r.learning_rate_multiplier,
                r.lora_r
            ),
            (Some(2), None, Some(0.5), Some(8))
        );
        let res = r.resolve(7, 10, 0, 25);
        assert_eq!((res.batch_size, res.total_steps), (1, 20));
        assert_eq!(res.learning_rate, 1e-4);
        assert_eq!(res.checkpoint_interval, 25);
        // Legacy top-level hyperparameters.
        let r = JobRequest::parse(&json!({"hyperparameters": {"n_epochs": 4}})).unwrap();
        assert_eq!(r.n_epochs, Some(4));
    }

    #[test]
    fn names_the_offending_field() {
        for (body, param) in [
            (
                json!({"hyperparameters": {"n_epochs": 0}}),
                "hyperparameters.n_epochs",
            ),
            (
                json!({"hyperparameters": {"batch_size": "big"}}),
                "hyperparameters.batch_size",
            ),
            (
                json!({"hyperparameters": {"learning_rate_multiplier": -1}}),
                "hyperparameters.learning_rate_multiplier",
            ),
            (
                json!({"hyperparameters": {"target_modules": ["lm_head"]}}),
                "hyperparameters.target_modules",
            ),
            (json!({"method": {"type": "dpo"}}), "method.type"),
        ] {
            assert_eq!(JobRequest::parse(&body).unwrap_err().param, param);
        }
        assert!(check_suffix("my-model_1").is_ok());
        assert!(check_suffix("bad suffix").is_err());
    }
}
