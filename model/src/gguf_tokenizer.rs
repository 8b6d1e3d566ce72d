//! Rebuilds a Hugging Face `tokenizer.json` + `tokenizer_config.json` from GGUF tokenizer metadata
//! (`tokenizer.ggml.*`, llama.cpp's `gguf-py/gguf/constants.py` names).
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers `smollm`
//! (digits split one by one, then GPT-2 byte-level — what SmolLM's own tokenizer.json has; without
//! the digit split ~19 % of Guanaco texts tokenize differently), `gpt2` and `default`.

use crate::error::Result;
use crate::gguf_import::MetaView;
use serde_json::{json, Map, Value};

/// llama.cpp token types (`gguf.TokenType`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub(crate) struct BuiltTokenizer {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

pub(crate) fn build(m: &MetaView) -> Result<BuiltTokenizer> {
    let model = m.opt_s("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(m.err(format!(
            "unsupported tokenizer model {model:?} (import-gguf supports byte-level BPE, \"gpt2\")"
        )));
    }
    let pre = m
        .opt_s("tokenizer.ggml.pre")
        .unwrap_or_else(|| "default".into());
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre.as_str() {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level,
        other => {
            return Err(m.err(format!(
                "unsupported pre-tokenizer {other:?} (supported: smollm, gpt2, default)"
            )))
        }
    };
    let tokens = m.strings("tokenizer.ggml.tokens")?;
    let merges = m.strings("tokenizer.ggml.merges")?;
    let types = m.opt_ints("tokenizer.ggml.token_type").unwrap_or_default();
    let id = |key: &str| m.opt_u(key).map(|x| x as u32);
    let (bos_id, eos_id, pad_id, unk_id) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        id("tokenizer.ggml.padding_token_id"),
        id("tokenizer.ggml.unknown_token_id"),
    );
    let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());

    let mut vocab = Map::new();
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            let special = ty == TOKEN_TYPE_CONTROL;
            let entry = json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special});
            added_decoder.insert(
                i.to_string(),
                json!({"content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": !special, "special": special}),
            );
            added.push(entry);
        }
    }
    let add_bos = m.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let post_processor = match (add_bos, name(bos_id)) {
        (true, Some(bos)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}
        }),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": name(unk_id), "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_prefix_space".into(), json!(false));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert("added_tokens_decoder".into(), Value::Object(added_decoder));
    if let Some(ctx) = m.opt_u("llama.context_length") {
        cfg.insert("model_max_length".into(), json!(ctx));
    }
    for (key, idv) in [
        ("bos_token", bos_id),
        ("eos_token", eos_id),
        ("pad_token", pad_id),
        ("unk_token", unk_id),
    ] {
        if let Some(n) = name(idv) {
            cfg.insert(key.into(), json!(n));
        }
    }
    if let Some(t) = m.opt_s("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok(BuiltTokenizer {
        tokenizer_json,
        tokenizer_config: Value::Object(cfg),
        bos_id,
        eos_id,
        pad_id,
    })
}
