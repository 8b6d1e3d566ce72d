//! Hugging Face `config.json` for the Llama and Mistral architectures, validated into [`Config`].
//!
//! Field names and defaults follow transformers' `LlamaConfig` / `MistralConfig`.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// The raw JSON, as transformers writes it. Unknown fields are kept so a rewrite preserves them.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `rope_parameters` (`rope_theta`, `rope_type`, scaling fields) instead of
    /// the top-level `rope_theta` / `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// RoPE frequency scaling (transformers' `rope_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (linear interpolation, Chen et al. 2023).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Which of the two supported architectures (they share every layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
}

/// A validated model configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON this came from (kept to write it back out, e.g. on export).
    pub raw: HfConfig,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::from_hf(raw).map_err(|msg| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Validates a parsed config; the error says which rule failed.
    pub fn from_hf(raw: HfConfig) -> std::result::Result<Self, String> {
        let arch_names = raw.architectures.clone().unwrap_or_default();
        let arch = match raw.model_type.as_deref() {
            Some("llama") => Arch::Llama,
            Some("mistral") => Arch::Mistral,
            Some(other) => {
                return Err(format!(
                    "unsupported architecture: model_type {other:?} {arch_names:?} (supported: llama, mistral)"
                ))
            }
            None => match arch_names.first().map(String::as_str) {
                Some("LlamaForCausalLM") => Arch::Llama,
                Some("MistralForCausalLM") => Arch::Mistral,
                _ => return Err(format!("unsupported architecture: {arch_names:?} (supported: llama, mistral)")),
            },
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!("unsupported hidden_act {act:?} (only silu)"));
            }
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err("attention_bias / mlp_bias are not supported".into());
        }
        let num_heads = raw.num_attention_heads;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be positive and even"));
        }
        let params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref().or(params))?;
        // Mistral's sliding window only matters when it is shorter than the context.
        let sliding_window = match arch {
            Arch::Mistral => raw
                .sliding_window
                .filter(|&w| w < raw.max_position_embeddings),
            Arch::Llama => None,
        };
        Ok(Self {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            sliding_window,
            bos_token_id: raw
                .bos_token_id
                .as_ref()
                .and_then(|b| b.to_vec().first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            raw,
        })
    }

    /// Inverse frequencies of RoPE, with the configured scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let v = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        v as f32
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> std::result::Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    let factor =
        || num("factor").ok_or_else(|| format!("rope_scaling {kind:?} needs a numeric factor"));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        }),
        other => Err(format!(
            "unsupported rope_scaling type {other:?} (supported: default, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(j: &str) -> std::result::Result<Config, String> {
        Config::from_hf(serde_json::from_str(j).map_err(|e| e.to_string())?)
    }

    const BASE: &str = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
        "num_attention_heads":4,"vocab_size":100"#;

    #[test]
    fn defaults_and_gqa() {
        let c = parse(&format!(
            r#"{{"model_type":"llama",{BASE},"num_key_value_heads":2}}"#
        ))
        .unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope_theta), (2, 16, 10000.0));
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rejects_unsupported_architecture_and_bad_heads() {
        let e = parse(&format!(r#"{{"model_type":"gpt2",{BASE}}}"#)).unwrap_err();
        assert!(e.contains("unsupported architecture"), "{e}");
        let e = parse(&format!(
            r#"{{"model_type":"llama",{BASE},"num_key_value_heads":3}}"#
        ))
        .unwrap_err();
        assert!(e.contains("multiple"), "{e}");
    }

    #[test]
    fn transformers_v5_rope_parameters() {
        let c = parse(&format!(
            r#"{{"model_type":"llama",{BASE},"rope_parameters":{{"rope_theta":500000.0,"rope_type":"default"}}}}"#
        ))
        .unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling.clone()),
            (500000.0, RopeScaling::None)
        );
    }

    #[test]
    fn mistral_sliding_window_and_llama3_scaling() {
        let c = parse(&format!(
            r#"{{"model_type":"mistral",{BASE},"sliding_window":16,"max_position_embeddings":64,
            "rope_scaling":{{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#
        ))
        .unwrap();
        assert_eq!(c.sliding_window, Some(16));
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0); // highest frequency is left alone
    }
}
