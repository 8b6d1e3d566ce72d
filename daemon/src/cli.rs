//! Command-line interface of `qlorad`: `serve` and the one-shot commands (generate, train, merge,
//! import-gguf, quantize).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qlorad_kernels::Nf4Config;
use qlorad_model::generate::GenerateParams;
use qlorad_model::{ChatMessage, DeviceSpec, Placement, Quant, SamplingParams};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "qlorad", version, about = "QLoRA serving and training daemon")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(crate::server::ServeArgs),
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Fine-tune a LoRA adapter (QLoRA) and save it in PEFT format.
    Train(crate::train_cmd::TrainArgs),
    /// Merge a LoRA adapter into its base model and export a Hugging Face model folder.
    Merge(crate::merge_cmd::MergeArgs),
    /// Convert a llama.cpp GGUF file into a Hugging Face model folder.
    ImportGguf(ImportArgs),
    /// Write a model folder in the bitsandbytes 4-bit (NF4) layout transformers loads.
    Quantize(QuantizeArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "QLORAD_MODEL")]
    model: PathBuf,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Base weight storage: nf4 (quantize on load) or none (full precision).
    #[arg(long, default_value = "nf4")]
    quant: Quant,
    /// Where the model computes: cpu (f32) or cuda:N (bf16; needs a build with the cuda feature).
    #[arg(long, env = "QLORAD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// A PEFT LoRA adapter folder to apply (the same code path as serving).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Print timing (prefill/decode tokens per second) to stderr.
    #[arg(long)]
    stats: bool,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The GGUF file.
    #[arg(long)]
    gguf: PathBuf,
    /// Output folder (must not exist unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// dtype of the written weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// Source model folder (full precision).
    #[arg(long)]
    model: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// NF4 blocksize (power of two, 32..4096; transformers always uses 64).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Disable double quantization of the absmax.
    #[arg(long)]
    no_double_quant: bool,
    #[arg(long)]
    overwrite: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => crate::server::serve(a),
        Command::Train(a) => crate::train_cmd::run(a),
        Command::Merge(a) => crate::merge_cmd::run(a),
        Command::Generate(a) => generate(a),
        Command::ImportGguf(a) => {
            let dtype = match a.dtype.as_str() {
                "f16" => safetensors::Dtype::F16,
                "bf16" => safetensors::Dtype::BF16,
                _ => safetensors::Dtype::F32,
            };
            let opts = qlorad_model::gguf_import::ImportOptions {
                dtype,
                overwrite: a.overwrite,
            };
            qlorad_model::gguf_import::import_gguf(&a.gguf, &a.out, &opts)?;
            eprintln!("imported {} -> {}", a.gguf.display(), a.out.display());
            Ok(())
        }
        Command::Quantize(a) => {
            let cfg = Nf4Config {
                blocksize: a.blocksize,
                double_quant: !a.no_double_quant,
            };
            qlorad_model::quantize::quantize_model(&a.model, &a.out, cfg, a.overwrite)?;
            eprintln!("quantized {} -> {}", a.model.display(), a.out.display());
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    if let Err(msg) = sampling.validate() {
        bail!("{msg}");
    }
    let t0 = Instant::now();
    let placement = Placement::open(a.device)?;
    let (model, tok) = qlorad_model::load_model_on(&a.model, a.quant, &placement)
        .with_context(|| format!("loading model from {}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &a.prompt));
        tok.apply_chat_template(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    // A rendered chat template already holds its special tokens; a raw prompt gets the tokenizer's.
    let ids = tok.encode(&text, !a.chat)?;
    let adapter = match &a.adapter {
        Some(dir) => Some(std::sync::Arc::new(
            model.place_adapter(
                qlorad_model::LoraAdapter::load(dir, "adapter", model.config())
                    .with_context(|| format!("loading adapter {}", dir.display()))?,
            )?,
        )),
        None => None,
    };
    let params = GenerateParams {
        sampling,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        adapter,
    };
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let mut first: Option<f64> = None;
    let gen = qlorad_model::generate(&model, &tok, &ids, &params, |piece| {
        if first.is_none() {
            first = Some(t1.elapsed().as_secs_f64());
        }
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    if a.stats {
        let total = t1.elapsed().as_secs_f64();
        let prefill = first.unwrap_or(total);
        let decode_tokens = gen.tokens.len().saturating_sub(1);
        eprintln!(
            "load {load_s:.2}s | prompt {} tokens, first token after {prefill:.3}s | {} tokens in {total:.2}s ({:.1} tok/s decode) | finish: {} | base weights {:.1} MB",
            gen.prompt_tokens,
            gen.tokens.len(),
            decode_tokens as f64 / (total - prefill).max(1e-9),
            gen.finish_reason.as_str(),
            model.weight_bytes() as f64 / 1e6,
        );
    }
    Ok(())
}
