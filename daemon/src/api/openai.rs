//! OpenAI request and response bodies (chat completions, completions, models) and their validation.
//! Unknown fields are accepted and ignored, as OpenAI-compatible servers (vLLM, TGI) do, so newer
//! clients keep working; every validation error names its field.

use super::error::ApiError;
use qlorad_model::generate::GenerateParams;
use qlorad_model::{ChatMessage, SamplingParams};
use serde::{Deserialize, Serialize};

/// `content` is a string or a list of parts (`{"type": "text", "text": …}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop` is a string or a list of up to 4 strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both completion routes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (vLLM, TGI): keep the k most likely tokens.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt` is a string (a list with one string is accepted too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// For adapters: the base model they apply to (as vLLM reports LoRA models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "developer"];

impl ChatRequest {
    /// The messages as the chat template takes them (`developer` is OpenAI's new name for system).
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must contain at least one message",
                Some("messages"),
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role must be one of system, user, assistant, developer; got {:?}", m.role),
                        Some(&format!("messages[{i}].role")),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            if p.kind != "text" {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]: only text parts are supported, got {:?}", p.kind),
                                    Some(&format!("messages[{i}].content")),
                                ));
                            }
                            s.push_str(p.text.as_deref().unwrap_or(""));
                        }
                        s
                    }
                };
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                Ok(ChatMessage::new(role, &content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            Prompt::One(s) => Ok(s),
            Prompt::Many(v) if v.len() == 1 => Ok(&v[0]),
            Prompt::Many(_) => Err(ApiError::invalid(
                "only one prompt per request is supported",
                Some("prompt"),
            )),
        }
    }
}

impl Sampling {
    /// Validates and converts to generation parameters. `default_max` applies when no limit is given
    /// (OpenAI: 16 for completions, up to the context for chat).
    pub fn to_params(&self, default_max: usize) -> Result<GenerateParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("n must be 1 (got {n})"),
                    Some("n"),
                ));
            }
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        format!("{name} must be between -2 and 2"),
                        Some(name),
                    ));
                }
                if v != 0.0 {
                    return Err(ApiError::invalid(
                        format!("{name} is not supported (only 0)"),
                        Some(name),
                    ));
                }
            }
        }
        let (max, field) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        let max_tokens = match max {
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    format!("{field} must be at least 1 (got {m})"),
                    Some(field),
                ))
            }
            Some(m) => m as usize,
            None => default_max,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2 (got {temperature})"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p must be in (0, 1] (got {top_p})"),
                Some("top_p"),
            ));
        }
        let top_k = match self.top_k {
            Some(k) if k < 0 => return Err(ApiError::invalid("top_k must be >= 0", Some("top_k"))),
            Some(k) => k as usize,
            None => 0,
        };
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(ApiError::invalid(
                    "stop may hold at most 4 sequences",
                    Some("stop"),
                ))
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(GenerateParams {
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: self.seed,
            },
            max_tokens,
            stop,
            adapter: None,
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}
