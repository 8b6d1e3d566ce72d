//! Training data: reading, validating and tokenizing fine-tuning files into examples with a loss mask.
//!
//! Formats (auto-detected per record): OpenAI chat JSONL (`{"messages": [...]}`, the fine-tuning API
//! format), `{"prompt", "completion"}` JSONL, `{"text"}` JSONL, Alpaca JSON (`instruction`, `input`,
//! `output`, one array), and Parquet with a `text` column. Chat (and Alpaca, rendered as a user/assistant
//! exchange) goes through the model's chat template; by default the loss covers only assistant tokens
//! (TRL's `assistant_only_loss`), found by rendering the conversation up to each assistant turn and
//! marking the tokens whose byte spans fall inside that turn. Every problem is reported with its file
//! and line, and no example is produced from a file that has any.

use parquet::file::reader::{FileReader, SerializedFileReader};
use qlorad_model::{ChatMessage, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One problem in a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line (JSONL), record index + 1 (JSON array, Parquet row).
    pub line: usize,
    pub msg: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Records that cannot be used; the first few are listed.
    #[error("{}: {} invalid record(s): {}", path.display(), errors.len(), summarize(errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<LineError>,
    },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
}

fn summarize(errors: &[LineError]) -> String {
    let mut s: Vec<String> = errors
        .iter()
        .take(5)
        .map(|e| format!("line {}: {}", e.line, e.msg))
        .collect();
    if errors.len() > 5 {
        s.push(format!("… and {} more", errors.len() - 5));
    }
    s.join("; ")
}

/// How examples are built.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Examples are truncated to this many tokens.
    pub max_seq_len: usize,
    /// Loss on assistant (completion) tokens only; `false` trains on every token.
    pub completion_only: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 1024,
            completion_only: true,
        }
    }
}

/// A tokenized example: `loss_mask[i]` says whether token i is a target (predicted from i-1).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// Number of tokens that contribute to the loss.
    pub fn target_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|m| **m).count()
    }
}

/// One record, before tokenization.
#[derive(Debug, Clone)]
enum Record {
    Chat(Vec<ChatMessage>),
    PromptCompletion(String, String),
    Text(String),
}

fn parse_record(v: &Value) -> Result<Record, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    if let Some(m) = obj.get("messages") {
        let arr = m.as_array().ok_or("\"messages\" must be an array")?;
        if arr.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        let mut msgs = Vec::with_capacity(arr.len());
        for (i, m) in arr.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or(format!("messages[{i}] has no string \"role\""))?;
            if !["system", "user", "assistant", "developer"].contains(&role) {
                return Err(format!(
                    "messages[{i}].role {role:?} is not system, user or assistant"
                ));
            }
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or(format!("messages[{i}] has no string \"content\""))?;
            let role = if role == "developer" { "system" } else { role };
            msgs.push(ChatMessage::new(role, content));
        }
        if !msgs.iter().any(|m| m.role == "assistant") {
            return Err("the conversation has no assistant message to learn from".into());
        }
        return Ok(Record::Chat(msgs));
    }
    if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
        let p = p.as_str().ok_or("\"prompt\" must be a string")?;
        let c = c.as_str().ok_or("\"completion\" must be a string")?;
        if c.is_empty() {
            return Err("\"completion\" is empty".into());
        }
        return Ok(Record::PromptCompletion(p.into(), c.into()));
    }
    if let Some(out) = obj.get("output") {
        let instr = obj
            .get("instruction")
            .and_then(Value::as_str)
            .ok_or("alpaca record without string \"instruction\"")?;
        let input = obj.get("input").and_then(Value::as_str).unwrap_or("");
        let out = out.as_str().ok_or("\"output\" must be a string")?;
        let user = if input.is_empty() {
            instr.to_string()
        } else {
            format!("{instr}\n\n{input}")
        };
        return Ok(Record::Chat(vec![
            ChatMessage::new("user", &user),
            ChatMessage::new("assistant", out),
        ]));
    }
    if let Some(t) = obj.get("text") {
        let t = t.as_str().ok_or("\"text\" must be a string")?;
        if t.is_empty() {
            return Err("\"text\" is empty".into());
        }
        return Ok(Record::Text(t.into()));
    }
    Err("unrecognized record: expected \"messages\", \"prompt\"+\"completion\", \"text\" or alpaca \"instruction\"+\"output\"".into())
}

/// Reads the records of a file (by extension: .jsonl, .json, .parquet).
fn read_records(path: &Path) -> Result<Vec<(usize, Record)>, DataError> {
    let io = |e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut errors = Vec::new();
    let mut records = Vec::new();
    match ext {
        "parquet" => {
            let file = std::fs::File::open(path).map_err(io)?;
            let reader = SerializedFileReader::new(file).map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                msg: format!("not a readable Parquet file: {e}"),
            })?;
            let rows = reader.get_row_iter(None).map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
            for (i, row) in rows.enumerate() {
                let row = row.map_err(|e| DataError::Format {
                    path: path.to_path_buf(),
                    msg: format!("row {}: {e}", i + 1),
                })?;
                match row.get_column_iter().find(|(n, _)| n.as_str() == "text") {
                    Some((_, parquet::record::Field::Str(s))) if !s.is_empty() => {
                        records.push((i + 1, Record::Text(s.clone())))
                    }
                    Some(_) => errors.push(LineError {
                        line: i + 1,
                        msg: "\"text\" is empty or not a string".into(),
                    }),
                    None => {
                        return Err(DataError::Format {
                            path: path.to_path_buf(),
                            msg: "no \"text\" column".into(),
                        })
                    }
                }
            }
        }
        "json" => {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let v: Value = serde_json::from_str(&text).map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                msg: format!("invalid JSON: {e}"),
            })?;
            let arr = v.as_array().ok_or_else(|| DataError::Format {
                path: path.to_path_buf(),
                msg: "expected a JSON array of records (JSONL files end in .jsonl)".into(),
            })?;
            for (i, r) in arr.iter().enumerate() {
                match parse_record(r) {
                    Ok(rec) => records.push((i + 1, rec)),
                    Err(msg) => errors.push(LineError { line: i + 1, msg }),
                }
            }
        }
        _ => {
            let text = std::fs::read_to_string(path).map_err(io)?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(line) {
                    Err(e) => errors.push(LineError {
                        line: i + 1,
                        msg: format!("invalid JSON: {e}"),
                    }),
                    Ok(v) => match parse_record(&v) {
                        Ok(rec) => records.push((i + 1, rec)),
                        Err(msg) => errors.push(LineError { line: i + 1, msg }),
                    },
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            errors,
        });
    }
    if records.is_empty() {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            msg: "the file holds no records".into(),
        });
    }
    Ok(records)
}

/// Validates a file without tokenizing (upload-time checks): the per-line errors, if any.
pub fn validate_file(path: &Path) -> Result<usize, DataError> {
    read_records(path).map(|r| r.len())
}

/// Marks tokens whose byte span lies inside one of `spans`.
fn mask_from_spans(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(a, b)| b > a && spans.iter().any(|&(s, e)| a >= s && b <= e))
        .collect()
}

fn tokenize(rec: &Record, tok: &Tokenizer, opts: &DataOptions) -> Result<Example, String> {
    let eos = tok.eos_id();
    let (mut ids, mut mask) = match rec {
        Record::Text(t) => {
            let ids = tok.encode(t, false).map_err(|e| e.to_string())?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        Record::PromptCompletion(p, c) => {
            let text = format!("{p}{c}");
            let (ids, offsets) = tok.encode_with_offsets(&text).map_err(|e| e.to_string())?;
            let mask = if opts.completion_only {
                mask_from_spans(&offsets, &[(p.len(), text.len())])
            } else {
                vec![true; ids.len()]
            };
            (ids, mask)
        }
        Record::Chat(msgs) => {
            let full = tok
                .apply_chat_template(msgs, false)
                .map_err(|e| e.to_string())?;
            let (ids, offsets) = tok.encode_with_offsets(&full).map_err(|e| e.to_string())?;
            let mask = if opts.completion_only {
                let mut spans = Vec::new();
                for (i, m) in msgs.iter().enumerate() {
                    if m.role != "assistant" {
                        continue;
                    }
                    let before = tok
                        .apply_chat_template(&msgs[..i], true)
                        .map_err(|e| e.to_string())?;
                    let upto = tok
                        .apply_chat_template(&msgs[..=i], false)
                        .map_err(|e| e.to_string())?;
                    if !full.starts_with(&upto) || !upto.starts_with(&before) {
                        return Err("the chat template does not render conversations incrementally; use completion_only=false".into());
                    }
                    spans.push((before.len(), upto.len()));
                }
                mask_from_spans(&offsets, &spans)
            } else {
                vec![true; ids.len()]
            };
            return finish(ids, mask, opts);
        }
    };
    if let Some(e) = eos {
        ids.push(e);
        mask.push(true);
    }
    finish(ids, mask, opts)
}

fn finish(mut ids: Vec<u32>, mut mask: Vec<bool>, opts: &DataOptions) -> Result<Example, String> {
    ids.truncate(opts.max_seq_len);
    mask.truncate(opts.max_seq_len);
    let ex = Example {
        input_ids: ids,
        loss_mask: mask,
    };
    if ex.target_tokens() == 0 {
        return Err(format!(
            "no trainable tokens within max_seq_len {} (the completion was truncated away)",
            opts.max_seq_len
        ));
    }
    Ok(ex)
}

/// Reads, validates and tokenizes a data file. Any bad record fails the whole file.
pub fn load_examples(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Vec<Example>, DataError> {
    let records = read_records(path)?;
    let mut out = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    for (line, rec) in &records {
        match tokenize(rec, tok, opts) {
            Ok(ex) => out.push(ex),
            Err(msg) => errors.push(LineError { line: *line, msg }),
        }
    }
    if !errors.is_empty() {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            errors,
        });
    }
    Ok(out)
}

/// Packs examples end to end into sequences of at most `max_seq_len` tokens (greedy, in order);
/// an example never straddles two packs.
pub fn pack(examples: &[Example], max_seq_len: usize) -> Vec<Example> {
    let mut packs: Vec<Example> = Vec::new();
    let mut cur = Example {
        input_ids: vec![],
        loss_mask: vec![],
    };
    for ex in examples {
        if !cur.input_ids.is_empty() && cur.input_ids.len() + ex.input_ids.len() > max_seq_len {
            packs.push(std::mem::replace(
                &mut cur,
                Example {
                    input_ids: vec![],
                    loss_mask: vec![],
                },
            ));
        }
        cur.input_ids.extend_from_slice(&ex.input_ids);
        // The first token of a packed example is not predicted from the previous example.
        let start = cur.loss_mask.len();
        cur.loss_mask.extend_from_slice(&ex.loss_mask);
        if start > 0 {
            cur.loss_mask[start] = false;
        }
    }
    if !cur.input_ids.is_empty() {
        packs.push(cur);
    }
    packs
}

/// Holds out `ratio` of the examples (chosen by a `seed`ed shuffle, at least one) for validation;
/// returns (train, validation) with the training examples in their original order.
pub fn split_validation(
    examples: Vec<Example>,
    ratio: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let k = ((n as f64 * ratio).round() as usize)
        .clamp(usize::from(ratio > 0.0 && n > 1), n.saturating_sub(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ 0x005e_ed0f_da7a,
    ));
    let held: std::collections::HashSet<usize> = idx[..k].iter().copied().collect();
    let (mut train, mut val) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, e) in examples.into_iter().enumerate() {
        if held.contains(&i) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// Batches of example indices for one epoch: shuffled with `seed`; with `group_by_length`, batches
/// hold examples of similar length (sorted within shuffled mega-batches of 50 batches) to cut padding.
pub fn batches(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let bs = batch_size.max(1);
    if group_by_length {
        for mega in idx.chunks_mut(bs * 50) {
            mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    idx.chunks(bs).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_detected_and_errors_name_the_problem() {
        let chat: Value = serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
        assert!(matches!(parse_record(&chat), Ok(Record::Chat(m)) if m.len() == 2));
        let alpaca = serde_json::json!({"instruction": "Add", "input": "1+1", "output": "2"});
        assert!(
            matches!(parse_record(&alpaca), Ok(Record::Chat(m)) if m[0].content == "Add\n\n1+1")
        );
        for (bad, why) in [
            (serde_json::json!({"messages": []}), "empty"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}]}),
                "no assistant",
            ),
            (
                serde_json::json!({"messages": [{"role": "robot", "content": "x"}]}),
                "robot",
            ),
            (
                serde_json::json!({"prompt": "a", "completion": 3}),
                "completion",
            ),
            (serde_json::json!({"foo": 1}), "unrecognized"),
            (serde_json::json!([1]), "object"),
        ] {
            let e = parse_record(&bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn jsonl_errors_carry_line_numbers_and_nothing_loads() {
        let d = std::env::temp_dir().join(format!("qlorad-data-{}.jsonl", std::process::id()));
        std::fs::write(&d, "{\"text\": \"ok\"}\n\nnot json\n{\"text\": \"\"}\n").unwrap();
        let e = validate_file(&d).unwrap_err();
        let DataError::Invalid { errors, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [3, 4]);
        assert!(e.to_string().contains("line 3: invalid JSON"), "{e}");
        let _ = std::fs::remove_file(&d);
    }

    #[test]
    fn packing_and_batching() {
        let ex = |n: usize| Example {
            input_ids: vec![1; n],
            loss_mask: vec![true; n],
        };
        let packs = pack(&[ex(3), ex(4), ex(2), ex(6)], 8);
        assert_eq!(
            packs.iter().map(|p| p.input_ids.len()).collect::<Vec<_>>(),
            [7, 8]
        );
        assert!(!packs[0].loss_mask[3], "boundary token is not a target");
        let b = batches(&[5, 1, 9, 3, 7], 2, true, 1);
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 5);
        assert_eq!(
            batches(&[1, 2, 3], 2, false, 7),
            batches(&[1, 2, 3], 2, false, 7)
        );
    }
}
