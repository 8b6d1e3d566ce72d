//! `qlorad train`: QLoRA fine-tuning from the command line (the same engine the daemon's jobs use).

use anyhow::{bail, Context, Result};
use qlorad_model::Quant;
use qlorad_trainer::data::{load_examples, pack, DataOptions};
use qlorad_trainer::step::{AdamWConfig, TrainableLora};
use qlorad_trainer::train::{save_peft, train, Schedule, TrainConfig};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Base model folder.
    #[arg(long)]
    model: PathBuf,
    /// Training data (.jsonl chat / prompt-completion / text, .json Alpaca, .parquet with `text`).
    #[arg(long)]
    data: PathBuf,
    /// Output adapter folder (PEFT format).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "nf4")]
    quant: Quant,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps (0: run the epochs).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// Comma-separated projections to adapt.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        value_delimiter = ','
    )]
    target_modules: Vec<String>,
    #[arg(long, default_value = "constant")]
    schedule: Schedule,
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    /// Global-norm gradient clipping (0: off).
    #[arg(long, default_value_t = 0.3)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train on prompt tokens too (default: assistant/completion tokens only).
    #[arg(long)]
    train_on_prompt: bool,
    /// Pack examples into full sequences.
    #[arg(long)]
    pack: bool,
    /// Write one JSON object per step here.
    #[arg(long)]
    log: Option<PathBuf>,
    #[arg(long)]
    overwrite: bool,
}

const PROJ: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub fn run(a: TrainArgs) -> Result<()> {
    if let Some(bad) = a
        .target_modules
        .iter()
        .find(|t| !PROJ.contains(&t.as_str()))
    {
        bail!(
            "--target-modules: {bad:?} is not one of {}",
            PROJ.join(", ")
        );
    }
    if a.lora_r == 0 || a.batch_size == 0 || a.grad_accum == 0 || a.max_seq_len < 2 {
        bail!(
            "--lora-r, --batch-size and --grad-accum must be positive and --max-seq-len at least 2"
        );
    }
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: output already exists (pass --overwrite to replace it)",
            a.out.display()
        );
    }
    let (model, tok) = qlorad_model::load_model(&a.model, a.quant)
        .with_context(|| format!("loading model from {}", a.model.display()))?;
    let opts = DataOptions {
        max_seq_len: a.max_seq_len,
        completion_only: !a.train_on_prompt,
    };
    let mut examples = load_examples(&a.data, &tok, &opts)?;
    if a.pack {
        examples = pack(&examples, a.max_seq_len);
    }
    let lora = TrainableLora::new(
        model.config(),
        a.lora_r,
        a.lora_alpha,
        &a.target_modules,
        a.seed,
    )?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        adamw: AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        schedule: a.schedule,
        warmup_ratio: a.warmup_ratio,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        group_by_length: true,
    };
    let mut log = match &a.log {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let pad = tok.eos_id().unwrap_or(0);
    eprintln!(
        "training on {} examples from {}",
        examples.len(),
        a.data.display()
    );
    let logs = train(&model, &lora, &examples, &cfg, pad, |s| {
        let eta = s.elapsed_s / s.step as f64 * (s.total_steps - s.step) as f64;
        eprint!(
            "\rstep {}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  ETA {:.0}s   ",
            s.step, s.total_steps, s.loss, s.lr, s.tokens_per_s, eta
        );
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{}", serde_json::to_string(s).unwrap_or_default());
        }
    })?;
    eprintln!();
    save_peft(&lora, &a.model.display().to_string(), &a.out, a.overwrite)?;
    if let (Some(first), Some(last)) = (logs.first(), logs.last()) {
        eprintln!(
            "saved {} (loss {:.4} → {:.4} over {} steps)",
            a.out.display(),
            first.loss,
            last.loss,
            logs.len()
        );
    }
    Ok(())
}
