//! `qlorad-bench decode-step`: the time of one batched decode step (every sequence contributing one
//! token, as the engine's steady state under load) at several batch sizes, for each CPU attention
//! path in the same run (issue 8: the batched CPU attention against the per-sequence candle ops).
//!
//! Each sequence starts from a copy of one prefilled prompt (`--context` tokens), takes one
//! untimed step (it crosses the cache's doubling boundary when the context is a power of two), then
//! `--steps` timed steps. The paths alternate within each round so that a shared machine's load
//! drifts over both alike; the figure is the median step over all rounds.

use crate::{median, synthetic_prompt};
use anyhow::{Context, Result};
use qlorad_model::{
    CpuAttention, KvCache, Llama, Logits, Quant, Sampler, SamplingParams, SeqInput,
};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DecodeStepArgs {
    /// Model folder (e.g. models/smollm2).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "nf4")]
    pub quant: Quant,
    /// Batch sizes (sequences per step).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batches: Vec<usize>,
    /// Cached tokens of every sequence before the timed steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed steps per batch size, path and round.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Rounds (each runs every path once per batch size).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Sample every row at this temperature inside the timed step, as the engine does (the load
    /// test uses 0.7); 0: greedy (argmax).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Paths to compare.
    #[arg(long, value_delimiter = ',', default_value = "reference,batched")]
    pub paths: Vec<String>,
    /// Write the results as JSON here (also printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Seconds of each timed decode step of `batch` sequences, each a copy of `base`.
fn time_steps(
    model: &Llama,
    base: &KvCache,
    batch: usize,
    steps: usize,
    temperature: f32,
) -> Result<Vec<f64>> {
    let mut caches = (0..batch)
        .map(|_| base.try_clone())
        .collect::<qlorad_model::Result<Vec<_>>>()?;
    let vocab = model.config().vocab_size as u32;
    let mut next: Vec<u32> = (0..batch as u32).map(|i| (100 + 37 * i) % vocab).collect();
    let mut samplers: Vec<Sampler> = (0..batch as u64)
        .map(|i| {
            Sampler::new(SamplingParams {
                temperature,
                seed: Some(i),
                ..Default::default()
            })
        })
        .collect();
    let mut times = Vec::with_capacity(steps);
    for step in 0..=steps {
        let t = Instant::now();
        let mut inputs: Vec<SeqInput<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(tok, c)| SeqInput::new(std::slice::from_ref(tok), c))
            .collect();
        // As the engine does: logits of the last token of each sequence, read back to the host.
        let rows = model.forward(&mut inputs, Logits::Last)?.to_vec2::<f32>()?;
        next = rows
            .iter()
            .zip(samplers.iter_mut())
            .map(|(r, s)| s.sample(r))
            .collect();
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

pub fn run(a: DecodeStepArgs) -> Result<()> {
    let paths = a
        .paths
        .iter()
        .map(|p| CpuAttention::parse(p).with_context(|| format!("unknown attention path {p}")))
        .collect::<Result<Vec<_>>>()?;
    let (mut model, _tok) = qlorad_model::load_model(&a.model, a.quant).context("loading model")?;
    let prompt = synthetic_prompt(a.context, model.config().vocab_size);
    // One prefilled cache per path, so that each path starts from caches in its own form.
    let mut bases = Vec::new();
    for &p in &paths {
        model.set_cpu_attention(p);
        let mut c = model.new_cache();
        model.forward(&mut [SeqInput::new(&prompt, &mut c)], Logits::Last)?;
        bases.push(c);
    }
    let mut results = Vec::new();
    for &batch in &a.batches {
        let mut per_path: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for round in 0..a.rounds.max(1) {
            for i in 0..paths.len() {
                // alternate the order between rounds
                let i = if round % 2 == 0 {
                    i
                } else {
                    paths.len() - 1 - i
                };
                model.set_cpu_attention(paths[i]);
                per_path[i].extend(time_steps(
                    &model,
                    &bases[i],
                    batch,
                    a.steps.max(1),
                    a.temperature,
                )?);
            }
        }
        let meds: Vec<f64> = per_path.into_iter().map(median).collect();
        for (p, &m) in paths.iter().zip(&meds) {
            println!(
                "batch {batch:>3}  {:<9}  step {:>8.1} ms  {:>7.1} tok/s  ({:.2}x the first path)",
                p.name(),
                m * 1e3,
                batch as f64 / m,
                meds[0] / m
            );
            results.push(serde_json::json!({
                "batch": batch, "path": p.name(), "step_ms": m * 1e3,
                "tok_s": batch as f64 / m,
            }));
        }
    }
    let out = serde_json::json!({
        "model": a.model, "context": a.context, "steps": a.steps, "rounds": a.rounds,
        "temperature": a.temperature,
        "results": results,
    });
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
