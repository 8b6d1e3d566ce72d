//! `qlorad-bench gpu-bench`: the serving figures of issue 5 for one model on one GPU — batch-1
//! greedy decode tok/s (base, and with one adapter), time to first token, adapter hot-load,
//! resident GPU memory of the base, and batched decode throughput (one adapter for all sequences,
//! a different adapter per sequence, the base alone). bench/run-gpu.sh runs it next to the Python
//! reference (bench/gpu_reference.py) on the same model files.
//!
//! Timing: the host clock around work that ends by reading logits back to the host (which waits
//! for the GPU), after warm-up (PTX JIT, cuBLAS handles); medians of `--repeats`.

use crate::random_model::nf4;
use crate::{median, GpuBenchArgs};
use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Tensor};
use qlorad_model::lora::{LoraKernel, LoraModule};
use qlorad_model::sampling::argmax;
use qlorad_model::{loader, KvCache, Llama, Logits, LoraAdapter, Placement, SeqInput};
use std::sync::Arc;
use std::time::Instant;

/// (free, total) device memory in bytes.
fn mem_info(p: &Placement) -> Result<(usize, usize)> {
    match &p.device {
        Device::Cuda(d) => Ok(d.cuda_stream().context().mem_get_info()?),
        _ => anyhow::bail!("gpu-bench needs a CUDA device"),
    }
}

/// Batch-1 decode timing: tokens/s, and the host time per token spent inside `forward` (issuing
/// the step's kernels, which run asynchronously) — when it is most of a step, the host's launches
/// and not the GPU bound the decode.
struct DecodeTiming {
    tok_s: f64,
    host_ms_per_tok: f64,
    /// GPU time per step between events recorded before and after `forward` (includes gaps
    /// where the GPU waits for the host's next launch).
    gpu_ms_per_tok: f64,
}

/// Greedy decode of `n` tokens after `prompt` (batch 1).
fn decode_timed(
    m: &Llama,
    prompt: &[u32],
    n: usize,
    ad: Option<Arc<LoraAdapter>>,
) -> Result<DecodeTiming> {
    let mut cache = m.new_cache();
    // (next token, seconds inside forward)
    let stream = match m.device() {
        candle_core::Device::Cuda(d) => Some(d.cuda_stream()),
        _ => None,
    };
    let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let gpu_ms = std::cell::Cell::new(0f64);
    let seq = |toks: &[u32], cache: &mut KvCache| -> Result<(u32, f64)> {
        let start = stream.as_ref().map(|s| s.record_event(timed)).transpose()?;
        let t = Instant::now();
        let l = m.forward(
            &mut [SeqInput {
                tokens: toks,
                cache,
                adapter: ad.clone(),
            }],
            Logits::Last,
        )?;
        let issued = t.elapsed().as_secs_f64();
        let end = stream.as_ref().map(|s| s.record_event(timed)).transpose()?;
        let id = argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
        if let (Some(a), Some(b)) = (start, end) {
            gpu_ms.set(gpu_ms.get() + f64::from(a.elapsed_ms(&b)?));
        }
        Ok((id, issued))
    };
    let (mut next, _) = seq(prompt, &mut cache)?;
    gpu_ms.set(0.0);
    let mut host = 0f64;
    let t = Instant::now();
    for _ in 0..n {
        let (id, issued) = seq(&[next], &mut cache)?;
        next = id;
        host += issued;
    }
    let total = t.elapsed().as_secs_f64();
    Ok(DecodeTiming {
        tok_s: n as f64 / total,
        host_ms_per_tok: host * 1e3 / n as f64,
        gpu_ms_per_tok: gpu_ms.get() / n as f64,
    })
}

fn decode_tok_s(m: &Llama, prompt: &[u32], n: usize, ad: Option<Arc<LoraAdapter>>) -> Result<f64> {
    Ok(decode_timed(m, prompt, n, ad)?.tok_s)
}

/// The host's time per decode-step phase since the last take (`QLORAD_HOST_PROFILE=1`), per
/// step: printed, and returned as {phase: µs per step} for the results JSON.
fn host_profile_table() -> serde_json::Value {
    use qlorad_model::host_profile::{take, Phase};
    let t = take();
    let steps = t
        .iter()
        .find(|p| p.phase == Phase::Setup)
        .map_or(0, |p| p.calls)
        .max(1) as f64;
    let total: f64 = t.iter().map(|p| p.seconds).sum();
    println!(
        "host time per decode step by phase ({steps} steps, {:.1} us in all):",
        total * 1e6 / steps
    );
    let mut m = serde_json::Map::new();
    for p in &t {
        let us = p.seconds * 1e6 / steps;
        println!(
            "  {:10} {us:7.1} us ({:.1} calls, {:.2} us each)",
            p.phase.name(),
            p.calls as f64 / steps,
            p.seconds * 1e6 / p.calls.max(1) as f64
        );
        m.insert(p.phase.name().to_string(), serde_json::json!(us));
    }
    serde_json::Value::Object(m)
}

/// Seconds from a fresh request of `prompt` to its first token on the host.
fn ttft_s(m: &Llama, prompt: &[u32]) -> Result<f64> {
    let t = Instant::now();
    let mut cache = m.new_cache();
    let l = m.forward(&mut [SeqInput::new(prompt, &mut cache)], Logits::Last)?;
    argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
    Ok(t.elapsed().as_secs_f64())
}

/// Aggregate decode tokens/s of `ads.len()` sequences decoded together (each with its adapter),
/// after a joint prefill of `prompt_len` tokens each.
fn batch_tok_s(
    m: &Llama,
    ads: &[Option<Arc<LoraAdapter>>],
    prompt_len: usize,
    steps: usize,
) -> Result<f64> {
    let vocab = m.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..ads.len())
        .map(|i| crate::synthetic_prompt(prompt_len + i, vocab)[i..].to_vec())
        .collect();
    let mut caches: Vec<KvCache> = ads.iter().map(|_| m.new_cache()).collect();
    let step = |inputs: &[Vec<u32>], caches: &mut [KvCache]| -> Result<Vec<Vec<u32>>> {
        let mut seqs: Vec<SeqInput<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(ads)
            .map(|((t, c), a)| SeqInput {
                tokens: t,
                cache: c,
                adapter: a.clone(),
            })
            .collect();
        let l = m.forward(&mut seqs, Logits::Last)?.to_vec2::<f32>()?;
        Ok(l.iter().map(|row| vec![argmax(row)]).collect())
    };
    let mut next = step(&prompts, &mut caches)?;
    let t = Instant::now();
    for _ in 0..steps {
        next = step(&next, &mut caches)?;
    }
    Ok((ads.len() * steps) as f64 / t.elapsed().as_secs_f64())
}

/// `count` random adapters with ranks spread over 8..=64 (multiples of 8) on all 7 projections,
/// drawn directly on the model's device in its dtype.
fn spread_adapters(m: &Llama, count: usize) -> Result<Vec<Option<Arc<LoraAdapter>>>> {
    let p = m.placement();
    let cfg = m.config();
    (0..count)
        .map(|i| {
            let r = 8 * (1 + i * 7 / count.saturating_sub(1).max(1));
            let mut modules = Vec::with_capacity(cfg.num_layers * 7);
            for _ in 0..cfg.num_layers {
                for proj in loader::PROJECTIONS {
                    let (o, n) = loader::projection_shape(cfg, proj);
                    let std_a = 1.0 / (n as f32).sqrt();
                    modules.push(Some(LoraModule {
                        a: Tensor::randn(0f32, std_a, (r, n), &p.device)?.to_dtype(p.dtype)?,
                        b: Tensor::randn(0f32, 0.02, (o, r), &p.device)?.to_dtype(p.dtype)?,
                        scale: 16.0 / r as f64,
                    }));
                }
            }
            Ok(Some(Arc::new(LoraAdapter::from_modules(
                &format!("a{i}"),
                modules,
            ))))
        })
        .collect()
}

/// Batch-1 decode with one adapter, and (with `--multi`) `multi` sequences on one adapter vs a
/// different adapter each, with the model's current LoRA path; JSON keys end in `suffix`.
fn adapter_figures(
    model: &Llama,
    ad: &Arc<LoraAdapter>,
    prompt: &[u32],
    decode_b1: f64,
    a: &GpuBenchArgs,
    suffix: &str,
    out: &mut serde_json::Value,
) -> Result<()> {
    let reps = a.repeats.max(1);
    let path = model.lora_kernel().name();
    decode_tok_s(model, &prompt[..8], 4, Some(ad.clone()))?;
    let dec: Vec<f64> = (0..reps)
        .map(|_| decode_tok_s(model, prompt, a.decode_tokens, Some(ad.clone())))
        .collect::<Result<_>>()?;
    let with = median(dec.clone());
    println!(
        "decode batch 1, one r=64 adapter ({path}): {with:.1} tok/s ({:.2}x base; runs {dec:.1?})",
        with / decode_b1
    );
    out[format!("decode_b1_adapter_tok_s{suffix}")] = serde_json::json!(with);
    out[format!("decode_b1_adapter_runs{suffix}")] = serde_json::json!(dec);
    if a.multi > 0 {
        let one: Vec<_> = (0..a.multi).map(|_| Some(ad.clone())).collect();
        let many = spread_adapters(model, a.multi)?;
        batch_tok_s(model, &one, 16, 2)?; // warm-up of the batch shapes
        let single = batch_tok_s(model, &one, 32, a.batch_steps)?;
        let multi = batch_tok_s(model, &many, 32, a.batch_steps)?;
        println!(
            "decode {} sequences ({path}): one adapter {single:.1} tok/s, a different adapter each (r 8..64) {multi:.1} tok/s, ratio {:.2}",
            a.multi,
            multi / single
        );
        out[format!("multi_adapter_32_ratio{suffix}")] = serde_json::json!(multi / single);
        out[format!("decode_b32_one_adapter_tok_s{suffix}")] = serde_json::json!(single);
        out[format!("decode_b32_multi_adapter_tok_s{suffix}")] = serde_json::json!(multi);
    }
    Ok(())
}

pub fn run(a: GpuBenchArgs) -> Result<()> {
    let p = Placement::open(a.device)?;
    let (free0, total) = mem_info(&p)?;
    let t = Instant::now();
    let (cfg, w) = loader::load(&a.model, nf4()).context("loading model")?;
    let host_s = t.elapsed().as_secs_f64();
    let mut model = Llama::new_on(cfg, w, &p)?;
    p.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    let (free1, _) = mem_info(&p)?;
    let base_gpu_gb = (free0 - free1) as f64 / 1e9;
    let weight_gb = model.weight_bytes() as f64 / 1e9;
    println!(
        "loaded in {load_s:.1}s ({host_s:.1}s reading + quantizing on the host); GPU memory of the base {base_gpu_gb:.2} GB (weights {weight_gb:.2} GB), {:.1} GB total",
        total as f64 / 1e9
    );
    let vocab = model.config().vocab_size;
    let prompt = crate::synthetic_prompt(a.prompt_tokens, vocab);
    let long = crate::synthetic_prompt(a.ttft_tokens, vocab);
    // Warm-up: PTX JIT of candle's kernels and ours, cuBLAS heuristics for both GEMM shapes.
    ttft_s(&model, &long)?;
    decode_tok_s(&model, &prompt[..8], 4, None)?;
    let reps = a.repeats.max(1);
    let profile = qlorad_model::host_profile::enabled();
    if profile {
        qlorad_model::host_profile::take(); // the warm-up's
    }
    let timings: Vec<DecodeTiming> = (0..reps)
        .map(|_| decode_timed(&model, &prompt, a.decode_tokens, None))
        .collect::<Result<_>>()?;
    let host_profile = profile.then(host_profile_table);
    let dec: Vec<f64> = timings.iter().map(|t| t.tok_s).collect();
    let decode_b1 = median(dec.clone());
    let host_ms = median(timings.iter().map(|t| t.host_ms_per_tok).collect());
    let gpu_ms = median(timings.iter().map(|t| t.gpu_ms_per_tok).collect());
    println!(
        "decode batch 1, base: {decode_b1:.1} tok/s = {:.2} ms/token, of which {host_ms:.2} ms issuing kernels on the host; {gpu_ms:.2} ms between the step's first and last GPU event (runs {dec:.1?})",
        1e3 / decode_b1
    );
    // Captured decode steps (on unless QLORAD_DECODE_GRAPH=0): how many ran as replays.
    let graphs = model.decode_graph_stats();
    let graph_gb = p.graph_memory().unwrap_or(0) as f64 / 1e9;
    if graphs.on {
        println!(
            "decode graphs: {} captured, {} steps replayed, {} kept, {graph_gb:.3} GB of graph memory",
            graphs.captures, graphs.replays, graphs.kept
        );
    }
    let tt: Vec<f64> = (0..reps)
        .map(|_| ttft_s(&model, &long))
        .collect::<Result<_>>()?;
    let ttft = median(tt);
    println!(
        "TTFT {} tokens: {:.1} ms (prefill {:.0} tok/s)",
        long.len(),
        ttft * 1e3,
        long.len() as f64 / ttft
    );
    let mut out = serde_json::json!({
        "impl": "qlorad",
        "device": a.device.to_string(),
        "gemv_kernel": qlorad_kernels::cuda::GemvKernel::from_env().name(),
        "lora_kernel": model.lora_kernel().name(),
        "model": a.model.display().to_string(),
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "repeats": reps,
        "decode_b1_tok_s": decode_b1,
        "decode_b1_runs": dec,
        "decode_b1_host_ms_per_token": host_ms,
        "decode_b1_gpu_ms_per_token": gpu_ms,
        "decode_graphs": {
            "on": graphs.on,
            "captures": graphs.captures,
            "replays": graphs.replays,
            "memory_gb": graph_gb,
        },
        "ttft_1k_ms": ttft * 1e3,
        "ttft_tokens": long.len(),
        "prefill_tok_s": long.len() as f64 / ttft,
        "base_gpu_gb": base_gpu_gb,
        "base_weight_gb": weight_gb,
        "load_s": load_s,
        "decode_b1_adapter_tok_s": null,
        "adapter_load_ms": null,
        "multi_adapter_32_ratio": null,
    });
    if let Some(p) = host_profile {
        out["decode_b1_host_profile_us_per_token"] = p;
    }
    if let Some(dir) = &a.adapter {
        // The hot-load as the daemon's registry does it with GPUs only: the file converted into
        // pinned staging and uploaded as it converts (`LoraAdapter::load_placed`). Beside it, the
        // two-step path through the packed host form (read, then upload), which a multi-GPU
        // daemon uses to place an adapter on a further GPU.
        let mut loads = Vec::new();
        let mut adapter = None;
        for _ in 0..reps {
            let t = Instant::now();
            let ad = LoraAdapter::load_placed(dir, "bench", model.config(), &p)?;
            p.synchronize()?;
            loads.push(t.elapsed().as_secs_f64() * 1e3);
            adapter = Some(Arc::new(ad));
        }
        let (mut reads, mut uploads) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let host = LoraAdapter::load_for(dir, "bench", model.config(), &p)?;
            reads.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            drop(model.place_adapter(host)?);
            p.synchronize()?;
            uploads.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "adapter via the packed host form: read {reads:.1?} ms, then upload {uploads:.1?} ms"
        );
        out["adapter_host_read_runs_ms"] = serde_json::json!(reads);
        out["adapter_host_upload_runs_ms"] = serde_json::json!(uploads);
        let ad = adapter.context("no adapter loaded")?;
        let load_ms = median(loads.clone());
        println!(
            "adapter hot-load (disk -> servable on the GPU, {:.0} MB there): {load_ms:.1} ms (runs {loads:.1?})",
            ad.bytes() as f64 / 1e6
        );
        out["adapter_load_ms"] = serde_json::json!(load_ms);
        out["adapter_load_runs_ms"] = serde_json::json!(loads);
        out["adapter_gpu_mb"] = serde_json::json!(ad.bytes() as f64 / 1e6);
        // The adapter figures with the configured LoRA path (plain keys), then with the other one
        // (keys suffixed with its name), so one run compares BGMV and gather.
        let primary = model.lora_kernel();
        let other = LoraKernel::ALL
            .into_iter()
            .find(|k| *k != primary)
            .filter(|_| !a.quick);
        for kernel in std::iter::once(primary).chain(other) {
            model.set_lora_kernel(kernel);
            let suffix = if kernel == primary {
                String::new()
            } else {
                format!("_{}", kernel.name())
            };
            adapter_figures(&model, &ad, &prompt, decode_b1, &a, &suffix, &mut out)?;
        }
        model.set_lora_kernel(primary);
    }
    if a.batch > 0 {
        let none: Vec<Option<Arc<LoraAdapter>>> = vec![None; a.batch];
        batch_tok_s(&model, &none[..2], 16, 2)?;
        let agg = batch_tok_s(&model, &none, 32, a.batch_steps)?;
        println!("decode batch {}, base: {agg:.1} tok/s aggregate", a.batch);
        out[format!("decode_b{}_tok_s", a.batch)] = serde_json::json!(agg);
    }
    // The same decode figures through the general (unfused) path, side by side in this run.
    let fused = model.fused_decode();
    out["fused_decode"] = serde_json::json!(fused);
    if fused && !a.quick {
        model.set_fused_decode(false)?;
        let runs: Vec<f64> = (0..reps)
            .map(|_| decode_tok_s(&model, &prompt, a.decode_tokens, None))
            .collect::<Result<_>>()?;
        let general = median(runs.clone());
        println!(
            "decode batch 1, base, general path: {general:.1} tok/s (runs {runs:.1?}); fused {:.2}x",
            decode_b1 / general
        );
        out["decode_b1_general_tok_s"] = serde_json::json!(general);
        if a.batch > 0 {
            let none: Vec<Option<Arc<LoraAdapter>>> = vec![None; a.batch];
            let agg = batch_tok_s(&model, &none, 32, a.batch_steps)?;
            println!(
                "decode batch {}, base, general path: {agg:.1} tok/s",
                a.batch
            );
            out[format!("decode_b{}_general_tok_s", a.batch)] = serde_json::json!(agg);
        }
        model.set_fused_decode(true)?;
    }
    let (free2, _) = mem_info(&p)?;
    out["gpu_used_end_gb"] = serde_json::json!((free0 - free2) as f64 / 1e9);
    println!("{out}");
    if let Some(path) = &a.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
