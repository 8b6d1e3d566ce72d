//! `qlorad-bench`: CPU inference benchmark of the model path (prefill and decode tokens/s, peak RSS),
//! emitting the same JSON keys as bench/cpu_reference.py so bench/run-cpu.sh can put qlorad and
//! transformers side by side in one run.

use anyhow::{Context, Result};
use clap::Parser;
use qlorad_model::sampling::argmax;
use qlorad_model::{Llama, Logits, Quant, SeqInput};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Benchmark qlorad's model path on CPU")]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "nf4")]
    quant: Quant,
    /// JSON list of prompt token ids (the reference's --dump-prompt output).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Without --prompt-file: a synthetic prompt of this many tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object instead of a summary line.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size in MB (Linux `VmHWM`).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn prefill(model: &Llama, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let t = Instant::now();
    model.forward(&mut [SeqInput::new(ids, &mut cache)], Logits::Last)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Greedy decode of `n` tokens after the prompt; returns the decode time (prefill excluded).
fn decode(model: &Llama, ids: &[u32], n: usize) -> Result<f64> {
    let mut cache = model.new_cache();
    let l = model.forward(&mut [SeqInput::new(ids, &mut cache)], Logits::Last)?;
    let mut next = argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
    let t = Instant::now();
    for _ in 0..n {
        let l = model.forward(&mut [SeqInput::new(&[next], &mut cache)], Logits::Last)?;
        next = argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let t = Instant::now();
    let (model, _tok) = qlorad_model::load_model(&a.model, a.quant).context("loading model")?;
    let load_s = t.elapsed().as_secs_f64();
    let ids: Vec<u32> = match &a.prompt_file {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).context("reading prompt file")?)?
        }
        None => (0..a.prompt_tokens as u32)
            .map(|i| 100 + (i * 7919) % 20000)
            .collect(),
    };
    prefill(&model, &ids[..ids.len().min(8)])?; // warm-up
    let repeats = a.repeats.max(1);
    let pre: Vec<f64> = (0..repeats)
        .map(|_| prefill(&model, &ids))
        .collect::<Result<_>>()?;
    let dec: Vec<f64> = (0..repeats)
        .map(|_| decode(&model, &ids, a.decode_tokens))
        .collect::<Result<_>>()?;
    let prefill_tok_s = ids.len() as f64 / median(pre);
    let decode_tok_s = a.decode_tokens as f64 / median(dec);
    let quant = match a.quant {
        Quant::None => "none",
        Quant::Nf4(_) => "nf4",
    };
    let out = serde_json::json!({
        "impl": "qlorad",
        "quant": quant,
        "prompt_tokens": ids.len(),
        "decode_tokens": a.decode_tokens,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "load_s": load_s,
        "rss_mb": peak_rss_mb(),
        "weight_mb": model.weight_bytes() as f64 / 1e6,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{quant}: prefill {prefill_tok_s:.1} tok/s ({} tokens), decode {decode_tok_s:.1} tok/s, load {load_s:.2}s, peak RSS {:.0} MB",
            ids.len(),
            peak_rss_mb()
        );
    }
    Ok(())
}
