//! Single-sequence text generation: prefill the prompt, then decode token by token with a sampler,
//! streaming text that is final (held back while it could still be the start of a stop string).
//! The serving scheduler batches sequences itself; this is the one-shot path (`qlorad generate`)
//! and the reference the batched path is tested against.

use crate::error::{ModelError, Result};
use crate::llama::{Llama, Logits, SeqInput};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Limits of one generation, and the adapter it runs with.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The LoRA adapter (`None`: the base model).
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

/// Incremental stop-string matching over streamed text: emits only text that can no longer become
/// part of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds `delta`; returns (text now safe to emit, whether a stop string was hit). After a hit the
    /// returned text ends right before the stop string.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = hit {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text still held back when generation ends without a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Incremental detokenization (the prefix/read-offset scheme of TGI's `decode_token`): text is
/// emitted only once the tokens decode to complete UTF-8 (byte-level BPE can split a character
/// across tokens), and a few tokens of left context keep word-boundary spaces right. Owns no borrow
/// of the tokenizer, so one can live in each sequence of a batch.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(prefix.len())
        {
            let new = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

/// Generates a completion of `prompt` (token ids), calling `on_text` with each final piece of text.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("the prompt is empty".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ModelError::Invalid(format!(
            "prompt of {} tokens does not fit the context length {ctx}",
            prompt.len()
        )));
    }
    let max_new = params.max_tokens.min(ctx - prompt.len());
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stop = StopMatcher::new(&params.stop);
    let mut detok = IncrementalDecoder::new();
    let eos = tok.eos_ids();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    let mut finish = FinishReason::Length;
    while tokens.len() < max_new {
        let logits = model.forward(
            &mut [SeqInput {
                tokens: &next_input,
                cache: &mut cache,
                adapter: params.adapter.clone(),
            }],
            Logits::Last,
        )?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let id = sampler.sample(&row);
        if eos.contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(id);
        let piece = detok.step(tok, id)?;
        if !piece.is_empty() {
            let (out, hit) = stop.push(&piece);
            text.push_str(&out);
            on_text(&out);
            if hit {
                finish = FinishReason::Stop;
                break;
            }
        }
        next_input = vec![id];
    }
    // Text held back as a possible stop-string prefix was not one after all.
    let rest = stop.flush();
    if !rest.is_empty() {
        text.push_str(&rest);
        on_text(&rest);
    }
    Ok(Generation {
        text,
        tokens,
        prompt_tokens: prompt.len(),
        finish_reason: finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_prefixes_and_cuts_at_stop() {
        let mut m = StopMatcher::new(&["###".to_string()]);
        assert_eq!(m.push("Hello #"), ("Hello ".to_string(), false));
        assert_eq!(m.push("#"), (String::new(), false));
        assert_eq!(m.push("x"), ("##x".to_string(), false));
        assert_eq!(m.push(" a ##"), (" a ".to_string(), false));
        assert_eq!(m.push("# tail"), (String::new(), true));
    }

    #[test]
    fn stop_matcher_without_stops_passes_through() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("abc"), ("abc".to_string(), false));
        assert_eq!(m.flush(), "");
    }
}
