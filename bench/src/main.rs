//! `qlorad-bench`: benchmarks and device checks of the model path.
//!
//! - no subcommand: the CPU inference benchmark (prefill and decode tokens/s, peak RSS), emitting
//!   the same JSON keys as bench/cpu_reference.py so bench/run-cpu.sh can put qlorad and
//!   transformers side by side in one run (`--device cuda:N` runs the same loop on a GPU);
//! - `gpu-check`: every CUDA kernel against its CPU reference, and GPU-vs-CPU greedy decoding
//!   (scripts/gpu-test.sh);
//! - `gpu-bench`: the serving figures of issue 5 on a GPU (bench/run-gpu.sh);
//! - `gpu-train-bench`: QLoRA training tokens/s and peak GPU memory, issue 6 (bench/run-gpu-train.sh);
//! - `write-adapter`: a random PEFT LoRA adapter for a model folder (the benchmark's adapter);
//! - `decode-step`: one batched CPU decode step at several batch sizes, per attention path (issue 8).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qlorad_model::sampling::argmax;
use qlorad_model::{DeviceSpec, Llama, Logits, Placement, Quant, SeqInput};
use std::path::PathBuf;
use std::time::Instant;

mod adapter_gen;
mod decode_step;
#[cfg(feature = "cuda")]
mod gpu_bench;
#[cfg(feature = "cuda")]
mod gpu_check;
#[cfg(feature = "cuda")]
mod gpu_train;
#[cfg(feature = "cuda")]
mod gpu_train_ops;
#[cfg(feature = "cuda")]
mod gpu_train_pieces;
#[cfg(feature = "cuda")]
mod gpu_train_profile;
#[cfg(feature = "cuda")]
mod gpu_trainer_check;
#[cfg(feature = "cuda")]
mod hot_load_probe;
mod random_model;

#[derive(Parser)]
#[command(about = "Benchmarks and device checks of qlorad's model path")]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    cpu: Args,
}

#[derive(Subcommand)]
enum Cmd {
    /// CUDA kernels vs their CPU references, and GPU vs CPU greedy tokens (needs the cuda feature).
    GpuCheck(GpuCheckArgs),
    /// Decode/prefill/adapter/memory figures on a GPU (needs the cuda feature).
    GpuBench(GpuBenchArgs),
    /// QLoRA training steps on a GPU: tokens/s and peak memory, plain and checkpointed.
    GpuTrainBench(GpuTrainBenchArgs),
    /// One training layer taken apart: forward and backward time of each piece (needs cuda).
    GpuTrainProfile(GpuTrainProfileArgs),
    /// Where an adapter hot-load's time goes, piece by piece (needs the cuda feature).
    #[cfg(feature = "cuda")]
    HotLoadProbe(hot_load_probe::HotLoadProbeArgs),
    /// Writes a random PEFT LoRA adapter (all 7 projections) for a model folder.
    WriteAdapter(adapter_gen::WriteAdapterArgs),
    /// One decode step at several batch sizes, per CPU attention path (batched vs reference).
    DecodeStep(decode_step::DecodeStepArgs),
}

#[derive(clap::Args)]
pub struct GpuCheckArgs {
    /// GPU to check.
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// A real model folder for the greedy check (e.g. SmolLM2); without it only random models.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Greedy tokens compared.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// JSON list of prompt token ids for --model (default: a fixed synthetic prompt).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Skip the kernel checks (only the greedy comparisons).
    #[arg(long)]
    pub skip_kernels: bool,
}

#[derive(clap::Args)]
pub struct GpuBenchArgs {
    /// Model folder (HF layout; projections quantized to NF4 on load unless already bnb 4-bit).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// PEFT adapter folder for the adapter figures (hot-load and decode).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt length before the timed decode.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Prompt length for time-to-first-token.
    #[arg(long, default_value_t = 1024)]
    pub ttft_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Sequences of the multi-adapter throughput test (0: skip).
    #[arg(long, default_value_t = 32)]
    pub multi: usize,
    /// Decode steps timed in the batched tests.
    #[arg(long, default_value_t = 16)]
    pub batch_steps: usize,
    /// Batch size of the aggregate-throughput test on the base (0: skip).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Write the results as JSON here (also printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// For same-call A/Bs (bench/ab-gpu.sh): leave out the runs that only compare paths — the
    /// other LoRA kernel (gather) and the general (unfused) decode path — about a fifth of a run.
    #[arg(long)]
    pub quick: bool,
}

#[derive(clap::Args)]
pub struct GpuTrainProfileArgs {
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// Write the per-piece times as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct GpuTrainBenchArgs {
    /// Model folder (projections quantized to NF4 with double quantization on load).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Untimed steps first (PTX JIT, cuBLAS handles, pool growth).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed optimizer steps per mode.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Which modes to run, in order: gc_paged (checkpointing + AdamW state paged from the host),
    /// gc (checkpointing), plain, plain_dropout (LoRA dropout 0.05). Run smaller peaks first: the stream-ordered pool keeps what a
    /// larger one reserved.
    #[arg(long, value_delimiter = ',', default_value = "gc,plain")]
    pub modes: Vec<String>,
    /// Then a loss curve of this many plain steps (0: none) from a saved initial adapter over
    /// saved batches, for the reference to repeat (bench/gpu_train_reference.py --curve).
    #[arg(long, default_value_t = 0)]
    pub curve_steps: usize,
    /// Where the curve's initial adapter (init/) and batches (batches.json) are written.
    #[arg(long, default_value = "/tmp/qlorad-curve")]
    pub curve_dir: PathBuf,
    /// Write the results as JSON here (also printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct Args {
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "nf4")]
    quant: Quant,
    /// Where to run: cpu (f32) or cuda:N (bf16).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
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

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size in MB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
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

/// A deterministic synthetic prompt of `n` token ids below `vocab`.
pub fn synthetic_prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (100 + (i * 7919) % 20000) % vocab as u32)
        .collect()
}

fn prefill(model: &Llama, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let t = Instant::now();
    let l = model.forward(&mut [SeqInput::new(ids, &mut cache)], Logits::Last)?;
    // Reading the logits back waits for the device.
    argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
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

fn cpu_bench(a: Args) -> Result<()> {
    let dir = a.model.context("--model is required")?;
    let placement = Placement::open(a.device)?;
    let t = Instant::now();
    let (model, _tok) =
        qlorad_model::load_model_on(&dir, a.quant, &placement).context("loading model")?;
    let load_s = t.elapsed().as_secs_f64();
    let ids: Vec<u32> = match &a.prompt_file {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).context("reading prompt file")?)?
        }
        None => synthetic_prompt(a.prompt_tokens, model.config().vocab_size),
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
        "device": a.device.to_string(),
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
            "{quant} on {}: prefill {prefill_tok_s:.1} tok/s ({} tokens), decode {decode_tok_s:.1} tok/s, load {load_s:.2}s, peak RSS {:.0} MB",
            a.device,
            ids.len(),
            peak_rss_mb()
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Result<()> {
    anyhow::bail!(
        "this qlorad-bench was built without the cuda feature (--features qlorad-bench/cuda)"
    )
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The model's warnings (a decode graph that could not be captured, a kernel that fell back)
    // belong in a check's log: `QLORAD_LOG` as for the daemon, warnings by default.
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
        .with_env_var("QLORAD_LOG")
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        None => cpu_bench(cli.cpu),
        Some(Cmd::WriteAdapter(a)) => adapter_gen::run(a),
        Some(Cmd::DecodeStep(a)) => decode_step::run(a),
        #[cfg(feature = "cuda")]
        Some(Cmd::GpuCheck(a)) => gpu_check::run(a),
        #[cfg(feature = "cuda")]
        Some(Cmd::GpuBench(a)) => gpu_bench::run(a),
        #[cfg(feature = "cuda")]
        Some(Cmd::HotLoadProbe(a)) => hot_load_probe::run(a),
        #[cfg(feature = "cuda")]
        Some(Cmd::GpuTrainBench(a)) => gpu_train::bench(a),
        #[cfg(feature = "cuda")]
        Some(Cmd::GpuTrainProfile(a)) => gpu_train_profile::run(a.device, a.json_out),
        #[cfg(not(feature = "cuda"))]
        Some(
            Cmd::GpuCheck(_) | Cmd::GpuBench(_) | Cmd::GpuTrainBench(_) | Cmd::GpuTrainProfile(_),
        ) => no_cuda(),
    }
}
