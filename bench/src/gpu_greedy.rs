//! GPU (bf16) vs CPU (f32) greedy decoding of whole models: the same weights on both backends,
//! prefill through the GPU's GEMM path (prompt > 32 tokens), decode through its GEMV.
//!
//! bf16 compute cannot reproduce f32 logits exactly, so beside the free-running token comparison
//! the GPU is also run teacher-forced on the CPU's tokens: that gives the logit error at every
//! step, and a divergence is called a near-tie (explained by rounding) only when the CPU's own
//! top-1/top-2 margin at that step is within twice the largest logit difference measured there.

use super::{adapter_pair, random_pair, rel_err, Report};
use crate::random_model::{nf4, RandomSpec};
use anyhow::Result;
use candle_core::{Device, Tensor};
use qlorad_model::sampling::argmax;
use qlorad_model::{ChatMessage, Llama, Logits, LoraAdapter, Placement, Quant, SeqInput};
use std::path::Path;
use std::sync::Arc;

/// End-to-end logit error bound, bf16 model vs f32 model (loose: a whole network of bf16 ops).
pub(super) const LOGIT_BOUND: f64 = 0.1;

struct Run {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Greedy decoding of `n` tokens; with `forced`, each step's input is `forced[i]` instead of the
/// model's own choice (teacher forcing), and the logits of every step are kept.
fn greedy(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    adapter: Option<Arc<LoraAdapter>>,
    forced: Option<&[u32]>,
) -> Result<Run> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut run = Run {
        tokens: Vec::with_capacity(n),
        logits: Vec::with_capacity(n),
    };
    for i in 0..n {
        let l = model.forward(
            &mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
                adapter: adapter.clone(),
            }],
            Logits::Last,
        )?;
        let row = l.squeeze(0)?.to_vec1::<f32>()?;
        let id = argmax(&row);
        run.tokens.push(id);
        run.logits.push(row);
        input = vec![forced.map_or(id, |f| f[i])];
    }
    Ok(run)
}

pub(super) fn top2_margin(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in l {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

pub(super) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// What one comparison found.
pub struct Outcome {
    pub equal_prefix: usize,
    pub cpu_tokens: Vec<u32>,
    pub gpu_tokens: Vec<u32>,
}

/// Compares greedy decoding on the two models and adds the report lines. `strict`: the free-running
/// tokens must be equal for all `n` steps; otherwise only divergences that are not near-ties fail.
#[allow(clippy::too_many_arguments)] // a report line's worth of context, used in three places
fn compare(
    name: &str,
    cpu: &Llama,
    gpu: &Llama,
    prompt: &[u32],
    n: usize,
    adapters: Option<(Arc<LoraAdapter>, Arc<LoraAdapter>)>,
    strict: bool,
    r: &mut Report,
) -> Result<Outcome> {
    let (ac, ag) = match adapters {
        Some((c, g)) => (Some(c), Some(g)),
        None => (None, None),
    };
    let c = greedy(cpu, prompt, n, ac, None)?;
    let g = greedy(gpu, prompt, n, ag.clone(), None)?;
    let tf = greedy(gpu, prompt, n, ag, Some(&c.tokens))?;
    let equal = c
        .tokens
        .iter()
        .zip(&g.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    let mut worst_rel = 0f64;
    let mut unexplained = 0usize;
    let mut near_ties = 0usize;
    for i in 0..n {
        let want = Tensor::new(c.logits[i].as_slice(), &Device::Cpu)?;
        let got = Tensor::new(tf.logits[i].as_slice(), &Device::Cpu)?;
        worst_rel = worst_rel.max(rel_err(&got, &want)?);
        if argmax(&tf.logits[i]) != c.tokens[i] {
            let diff = max_abs_diff(&tf.logits[i], &c.logits[i]);
            if top2_margin(&c.logits[i]) <= 2.0 * diff {
                near_ties += 1;
            } else {
                unexplained += 1;
            }
        }
    }
    let note = if equal < n {
        let diff = max_abs_diff(&tf.logits[equal], &c.logits[equal]);
        format!(
            "equal for {equal}/{n} tokens; at step {equal} CPU margin {:.3}, max |logit diff| {diff:.3}",
            top2_margin(&c.logits[equal])
        )
    } else {
        format!("equal for {n}/{n} tokens")
    };
    if strict {
        r.add(
            format!("{name}: greedy tokens GPU == CPU (first {n})"),
            (n - equal) as f64,
            0.0,
            note,
        );
    } else {
        r.add(
            format!("{name}: steps disagreeing beyond a near-tie"),
            unexplained as f64,
            0.0,
            format!("{note}; teacher-forced near-ties {near_ties}"),
        );
    }
    r.add(
        format!("{name}: teacher-forced logits rel err (max)"),
        worst_rel,
        LOGIT_BOUND,
        String::new(),
    );
    Ok(Outcome {
        equal_prefix: equal,
        cpu_tokens: c.tokens,
        gpu_tokens: g.tokens,
    })
}

/// Random small Llamas from one seed on both backends: NF4 base, NF4 base + LoRA, dense base.
pub fn random_models(gpu: &Placement, n: usize, r: &mut Report) -> Result<()> {
    let spec = RandomSpec::small();
    let prompt = crate::synthetic_prompt(40, spec.vocab);
    let (cpu_m, gpu_m) = random_pair(&spec, nf4(), gpu)?;
    let o = compare(
        "random llama nf4",
        &cpu_m,
        &gpu_m,
        &prompt,
        n,
        None,
        false,
        r,
    )?;
    r.extra.insert(
        "random_nf4_equal_prefix".into(),
        serde_json::json!(o.equal_prefix),
    );
    let ads = adapter_pair(&cpu_m, &gpu_m, 16)?;
    let o = compare(
        "random llama nf4 + lora r16",
        &cpu_m,
        &gpu_m,
        &prompt,
        n,
        Some(ads),
        false,
        r,
    )?;
    r.extra.insert(
        "random_nf4_lora_equal_prefix".into(),
        serde_json::json!(o.equal_prefix),
    );
    drop((cpu_m, gpu_m));
    let (cpu_m, gpu_m) = random_pair(&spec, Quant::None, gpu)?;
    let o = compare(
        "random llama dense",
        &cpu_m,
        &gpu_m,
        &prompt,
        n,
        None,
        false,
        r,
    )?;
    r.extra.insert(
        "random_dense_equal_prefix".into(),
        serde_json::json!(o.equal_prefix),
    );
    Ok(())
}

/// A real model folder (e.g. SmolLM2) with NF4 projections on both backends: its greedy tokens
/// must be equal for the first `n`.
pub fn real_model(
    gpu: &Placement,
    dir: &Path,
    n: usize,
    prompt_file: Option<&Path>,
    r: &mut Report,
) -> Result<()> {
    let (cpu_m, tok) = qlorad_model::load_model(dir, nf4())?;
    let (gpu_m, _) = qlorad_model::load_model_on(dir, nf4(), gpu)?;
    let prompt: Vec<u32> = match prompt_file {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None if tok.has_chat_template() => {
            let text = tok.apply_chat_template(
                &[ChatMessage::new(
                    "user",
                    "What is the capital of France? Answer, then describe the city in a few sentences.",
                )],
                true,
            )?;
            tok.encode(&text, false)?
        }
        None => tok.encode("The capital of France is", true)?,
    };
    let name = format!(
        "{} nf4",
        dir.file_name()
            .map_or("model".into(), |s| s.to_string_lossy())
    );
    let o = compare(&name, &cpu_m, &gpu_m, &prompt, n, None, true, r)?;
    let cpu_text = tok.decode(&o.cpu_tokens, true)?;
    let gpu_text = tok.decode(&o.gpu_tokens, true)?;
    println!("INFO prompt: {} tokens", prompt.len());
    println!("INFO cpu f32:  {cpu_text:?}");
    println!("INFO gpu bf16: {gpu_text:?}");
    r.extra.insert(
        "real_model_equal_prefix".into(),
        serde_json::json!(o.equal_prefix),
    );
    r.extra
        .insert("real_model_cpu_text".into(), serde_json::json!(cpu_text));
    r.extra
        .insert("real_model_gpu_text".into(), serde_json::json!(gpu_text));
    Ok(())
}
