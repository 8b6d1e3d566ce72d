//! `qlorad train`: QLoRA fine-tuning from the command line (the same engine the daemon's jobs use).

use anyhow::{bail, Context, Result};
use qlorad_model::{DeviceSpec, Placement, Quant};
use qlorad_trainer::data::{load_examples, pack, split_validation, DataOptions};
use qlorad_trainer::parallel::{Collective, ThreadGroup};
use qlorad_trainer::step::{AdamWConfig, LoraSpec, TrainableLora};
use qlorad_trainer::train::{save_peft, Schedule, TrainConfig, Trainer};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Where to train: cpu (f32) or cuda:N (base in bf16, f32 LoRA master weights and AdamW state).
    /// Several, comma-separated (cuda:0,cuda:1), train data-parallel: one copy of the base per
    /// device, each optimizer step's micro-batches split over them and the gradients summed
    /// (NCCL between GPUs when libnccl is found, one process per GPU, or one thread each with
    /// QLORAD_DP=threads; host memory otherwise); the same result as one device with
    /// --grad-accum multiplied by the number of devices.
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    device: Vec<DeviceSpec>,
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
    /// Dropout on the LoRA branch's input.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// rsLoRA scaling (alpha/sqrt(r)).
    #[arg(long)]
    rslora: bool,
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
    /// Recompute each decoder layer in the backward pass (less memory, one extra forward).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Keep AdamW's moments in host memory, paged onto the device per tensor for each update
    /// (8 bytes per trainable parameter less device memory; same results).
    #[arg(long)]
    paged_optimizer: bool,
    /// Pack examples into full sequences.
    #[arg(long)]
    pack: bool,
    /// Validation data (same formats); eval loss and perplexity are logged.
    #[arg(long)]
    validation_file: Option<PathBuf>,
    /// Hold out this fraction of the training data for validation (when no --validation-file).
    #[arg(long, default_value_t = 0.0)]
    val_split: f64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Save a checkpoint every N steps into --checkpoint-dir (0: none).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Where checkpoints go (default: OUT-checkpoints).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint folder (same data and settings).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write one JSON object per step here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Before training, write this epoch's batches and learning rates here as JSON lines (for a
    /// reference implementation to train on the same batches: bench/gpu_epoch_reference.py).
    #[arg(long)]
    dump_plan: Option<PathBuf>,
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let spec = LoraSpec {
        r: a.lora_r,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        rslora: a.rslora,
        targets: a.target_modules.clone(),
    };
    spec.validate()?;
    if a.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    if !(0.0..0.5).contains(&a.val_split) {
        bail!("--val-split must be in [0, 0.5)");
    }
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: output already exists (pass --overwrite to replace it)",
            a.out.display()
        );
    }
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
        eval_every: a.eval_every,
        gradient_checkpointing: a.gradient_checkpointing,
        paged_optimizer: a.paged_optimizer,
    };
    cfg.validate()?;
    #[cfg(feature = "cuda")]
    if let Some(r) = process_rank(&a)? {
        return run_rank(&a, &spec, cfg, r.0, Some(r.1));
    }
    match a.device.as_slice() {
        [] => bail!("--device names no device"),
        [one] => run_rank(&a, &spec, cfg, Placement::open(*one)?, None),
        many => data_parallel(&a, &spec, cfg, many),
    }
}

/// This process as one rank of an NCCL group, when QLORAD_RANK and QLORAD_WORLD are set (by
/// [`launch_processes`] for the GPUs of one host, or by hand / a scheduler on each host of a
/// multi-node run), with the group's id in QLORAD_NCCL_ID or, for hosts that share storage, in the
/// file QLORAD_NCCL_ID_FILE, which rank 0 writes and the others wait for. Its device is `--device`'s
/// entry `rank`, or its only entry.
#[cfg(feature = "cuda")]
fn process_rank(a: &TrainArgs) -> Result<Option<(Placement, Arc<dyn Collective>)>> {
    use qlorad_trainer::parallel_nccl::NcclGroup;
    let var = |k: &str| std::env::var(k).ok();
    let (Some(rank), Some(world)) = (var("QLORAD_RANK"), var("QLORAD_WORLD")) else {
        return Ok(None);
    };
    let (rank, world): (usize, usize) = (
        rank.parse().context("QLORAD_RANK")?,
        world.parse().context("QLORAD_WORLD")?,
    );
    let dev = match a.device.as_slice() {
        [one] => *one,
        all if all.len() == world && rank < world => all[rank],
        _ => bail!("rank {rank} of {world}: --device must list one device or {world} devices"),
    };
    let placement = Placement::open(dev)?;
    let id = match (var("QLORAD_NCCL_ID"), var("QLORAD_NCCL_ID_FILE")) {
        (Some(id), _) => id,
        (None, Some(file)) => {
            let file = PathBuf::from(file);
            if rank == 0 {
                // Rank 0 makes the id (NCCL's rendezvous root lives in the process that made it)
                // and publishes it whole: written beside, then renamed into place.
                let id = NcclGroup::unique_id()?;
                let tmp = file.with_extension("tmp");
                std::fs::write(&tmp, &id).with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &file)
                    .with_context(|| format!("publishing {}", file.display()))?;
                id
            } else {
                let t = std::time::Instant::now();
                loop {
                    if let Ok(id) = std::fs::read_to_string(&file) {
                        break id.trim().to_string();
                    }
                    if t.elapsed().as_secs() > 600 {
                        bail!("rank {rank}: no NCCL id in {} after 10 min", file.display());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
        (None, None) => bail!("QLORAD_RANK is set without QLORAD_NCCL_ID or QLORAD_NCCL_ID_FILE"),
    };
    let group = NcclGroup::join(&placement.device, &id, rank, world)?;
    Ok(Some((placement, Arc::new(group))))
}

/// The GPUs of one host as one process each (as torchrun runs DDP): this process makes the NCCL
/// id, starts itself once per device with QLORAD_RANK / QLORAD_WORLD / QLORAD_NCCL_ID set, and
/// waits; if one rank fails the others are stopped.
#[cfg(feature = "cuda")]
fn launch_processes(n: usize) -> Result<()> {
    let id = qlorad_trainer::parallel_nccl::NcclGroup::unique_id()?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("QLORAD_RANK", rank.to_string())
            .env("QLORAD_WORLD", n.to_string())
            .env("QLORAD_NCCL_ID", &id)
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    loop {
        let mut running = 0;
        for (rank, c) in children.iter_mut().enumerate() {
            match c.try_wait()? {
                None => running += 1,
                Some(st) if st.success() => {}
                Some(st) => {
                    for other in children.iter_mut() {
                        let _ = other.kill();
                    }
                    bail!("rank {rank} failed ({st})");
                }
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Trains on every device of `devices` at once, one rank per device on its own thread.
fn data_parallel(
    a: &TrainArgs,
    spec: &LoraSpec,
    cfg: TrainConfig,
    devices: &[DeviceSpec],
) -> Result<()> {
    for (i, d) in devices.iter().enumerate() {
        if *d != DeviceSpec::Cpu && devices[..i].contains(d) {
            bail!("--device lists {d:?} twice (one rank per GPU)");
        }
    }
    // GPUs train as one process each unless QLORAD_DP=threads: on two H200s processes scaled
    // 0.96 and threads 0.90 in the same run (BENCHMARKS.md), the threads of one process sharing
    // the host work of issuing kernels.
    #[cfg(feature = "cuda")]
    if devices.iter().all(|d| *d != DeviceSpec::Cpu)
        && std::env::var("QLORAD_DP").map_or(true, |v| v != "threads")
        && qlorad_trainer::parallel_nccl::available()
    {
        eprintln!(
            "data parallel over {} GPUs (NCCL, one process each)",
            devices.len()
        );
        return launch_processes(devices.len());
    }
    let placements = devices
        .iter()
        .map(|d| Placement::open(*d))
        .collect::<Result<Vec<_>, _>>()?;
    let (groups, how) = collectives(&placements)?;
    eprintln!("data parallel over {} devices ({how})", placements.len());
    std::thread::scope(|s| {
        let ranks: Vec<_> = placements
            .into_iter()
            .zip(groups)
            .enumerate()
            .map(|(rank, (p, g))| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let r = run_rank(a, spec, cfg, p, Some(g));
                    if let Err(e) = &r {
                        // The other ranks would wait for this one forever in the next exchange.
                        eprintln!("error: rank {rank}: {e:#}");
                        std::process::exit(1);
                    }
                    r
                })
            })
            .collect();
        for r in ranks {
            r.join()
                .map_err(|_| anyhow::anyhow!("a training rank panicked"))??;
        }
        Ok(())
    })
}

/// The group's exchanges, in rank order, and what carries them: NCCL when every rank is a GPU
/// and libnccl opens (unless QLORAD_COLLECTIVE=host), sums through host memory otherwise.
fn collectives(ps: &[Placement]) -> Result<(Vec<Arc<dyn Collective>>, &'static str)> {
    #[cfg(feature = "cuda")]
    if ps.iter().all(|p| p.device.is_cuda())
        && std::env::var("QLORAD_COLLECTIVE").map_or(true, |v| v != "host")
    {
        use qlorad_trainer::parallel_nccl::{available, NcclGroup};
        if available() {
            let devices: Vec<_> = ps.iter().map(|p| p.device.clone()).collect();
            let groups = NcclGroup::new_local(&devices)?;
            return Ok((
                groups
                    .into_iter()
                    .map(|g| Arc::new(g) as Arc<dyn Collective>)
                    .collect(),
                "NCCL",
            ));
        }
        eprintln!("warning: libnccl.so.2 not found; summing gradients through host memory");
    }
    Ok((
        ThreadGroup::new(ps.len())
            .into_iter()
            .map(|g| Arc::new(g) as Arc<dyn Collective>)
            .collect(),
        "host memory",
    ))
}

/// One rank's run (the whole run on a single device): rank 0 (or a lone device) logs, writes
/// checkpoints and the adapter; the others only train.
fn run_rank(
    a: &TrainArgs,
    spec: &LoraSpec,
    cfg: TrainConfig,
    placement: Placement,
    group: Option<Arc<dyn Collective>>,
) -> Result<()> {
    let lead = group.as_ref().is_none_or(|g| g.rank() == 0);
    let (model, tok) = qlorad_model::load_model_on(&a.model, a.quant, &placement)
        .with_context(|| format!("loading model from {}", a.model.display()))?;
    let opts = DataOptions {
        max_seq_len: a.max_seq_len,
        completion_only: !a.train_on_prompt,
    };
    let mut examples = load_examples(&a.data, &tok, &opts)?;
    let mut eval = match &a.validation_file {
        Some(v) => load_examples(v, &tok, &opts)?,
        None => Vec::new(),
    };
    if a.validation_file.is_none() && a.val_split > 0.0 {
        (examples, eval) = split_validation(examples, a.val_split, a.seed);
    }
    if a.pack {
        examples = pack(&examples, a.max_seq_len);
    }
    let pad = tok.eos_id().unwrap_or(0);
    let base = a.model.display().to_string();
    let mut trainer = match &a.resume {
        Some(dir) => {
            Trainer::resume_in_group(&model, spec, examples, eval, cfg, pad, dir, group.clone())?
        }
        None => {
            let lora = TrainableLora::new_on(model.config(), spec, a.seed, model.device())?;
            let mut t = Trainer::new(&model, lora, examples, eval, cfg, pad)?;
            if let Some(g) = &group {
                t.set_collective(g.clone());
            }
            t
        }
    };
    if !lead {
        while trainer.step()?.is_some() {}
        return Ok(());
    }
    if let Some(p) = &a.dump_plan {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        );
        let n = trainer.write_plan(&mut f)?;
        f.flush()?;
        eprintln!("wrote the plan of {n} steps to {}", p.display());
    }
    let ckpt_root = a.checkpoint_dir.clone().unwrap_or_else(|| {
        let mut p = a.out.clone().into_os_string();
        p.push("-checkpoints");
        PathBuf::from(p)
    });
    let mut log = match &a.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(a.resume.is_some())
                .write(true)
                .truncate(a.resume.is_none())
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?,
        ),
        None => None,
    };
    eprintln!(
        "training on {} examples from {} ({} steps{})",
        trainer.n_examples(),
        a.data.display(),
        trainer.total_steps(),
        match trainer.position().step {
            0 => String::new(),
            s => format!(", resuming after step {s}"),
        }
    );
    let (mut done_here, mut last) = (0usize, None);
    while let Some(s) = trainer.step()? {
        done_here += 1;
        let eta = s.elapsed_s / done_here as f64 * (s.total_steps - s.step) as f64;
        eprint!(
            "\rstep {}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  ETA {:.0}s{}   ",
            s.step,
            s.total_steps,
            s.loss,
            s.lr,
            s.tokens_per_s,
            eta,
            s.eval_loss
                .map(|e| format!("  eval {e:.4} (ppl {:.2})", e.exp()))
                .unwrap_or_default()
        );
        if let Some(f) = log.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&s)?)?;
        }
        if a.save_every > 0 && s.step % a.save_every == 0 && s.step < s.total_steps {
            let dir = ckpt_root.join(format!("checkpoint-{}", s.step));
            trainer.save_checkpoint(&dir, &base, true)?;
        }
        last = Some(s);
    }
    eprintln!();
    save_peft(trainer.lora()?, &base, &a.out, a.overwrite)?;
    if let Some(l) = last {
        eprintln!(
            "saved {} (final loss {:.4}{} after {} steps, {} tokens; peak RSS {} MiB)",
            a.out.display(),
            l.loss,
            l.eval_loss
                .map(|e| format!(", eval loss {e:.4}"))
                .unwrap_or_default(),
            l.step,
            l.trained_tokens,
            peak_rss_bytes() >> 20
        );
    }
    Ok(())
}

/// Peak resident set size of this process (VmHWM), 0 where /proc is unavailable.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}
