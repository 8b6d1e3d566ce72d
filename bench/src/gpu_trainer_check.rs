//! The trainer on a GPU with staged paged moments, each step's update deferred into the next
//! step's forward (kernels/src/staged_cuda.rs): the same run as with resident moments, bit for bit,
//! through gradient accumulation, LoRA dropout, evaluation, an epoch boundary, and a checkpoint
//! taken mid-run that resumes without paging (gpu-check's trainer section; the CPU runs the same
//! scenario in trainer/tests/resume.rs, where nothing is deferred).

use crate::gpu_check::Report;
use crate::random_model::{nf4, RandomSpec};
use anyhow::{Context, Result};
use qlorad_model::Placement;
use qlorad_trainer::step::{AdamWConfig, LoraSpec, TrainableLora};
use qlorad_trainer::train::{StepLog, TrainConfig, Trainer};
use qlorad_trainer::Example;
use rand::{Rng, SeedableRng};

fn examples(n: usize, seed: u64, vocab: usize) -> Vec<Example> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(6..40);
            let prompt = rng.random_range(1..len - 1);
            Example {
                input_ids: (0..len)
                    .map(|_| rng.random_range(3..vocab as u32))
                    .collect(),
                loss_mask: (0..len).map(|i| i >= prompt).collect(),
            }
        })
        .collect()
}

fn spec() -> LoraSpec {
    LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        rslora: false,
        targets: qlorad_trainer::step::TARGET_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

fn cfg(paged: bool) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 3,
        grad_accum: 2,
        adamw: AdamWConfig {
            lr: 5e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        eval_every: 2,
        gradient_checkpointing: true,
        paged_optimizer: paged,
        ..Default::default()
    }
}

/// (loss, lr, eval loss) bits and tokens of a step: what must match exactly.
fn key(l: &StepLog) -> (u64, u64, Option<u64>, u64) {
    (
        l.loss.to_bits(),
        l.lr.to_bits(),
        l.eval_loss.map(f64::to_bits),
        l.trained_tokens,
    )
}

fn weights(t: &Trainer) -> Result<Vec<Vec<f32>>> {
    t.lora()?
        .named_vars()
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

pub fn checks(gpu: &Placement, r: &mut Report) -> Result<()> {
    let (_, m) = crate::gpu_check::random_pair(&RandomSpec::small(), nf4(), gpu)?;
    let vocab = m.config().vocab_size;
    let trainer = |paged: bool| -> Result<Trainer<'_>> {
        let lora = TrainableLora::new_on(m.config(), &spec(), 7, &gpu.device)?;
        Ok(Trainer::new(
            &m,
            lora,
            examples(14, 1, vocab),
            examples(4, 2, vocab),
            cfg(paged),
            0,
        )?)
    };
    let run = |t: &mut Trainer| -> Result<Vec<StepLog>> {
        let mut out = Vec::new();
        while let Some(l) = t.step()? {
            out.push(l);
        }
        Ok(out)
    };
    let mut resident = trainer(false)?;
    let want: Vec<_> = run(&mut resident)?.iter().map(key).collect();
    let want_w = weights(&resident)?;
    let trained: usize = want_w.iter().map(Vec::len).sum();
    anyhow::ensure!(
        trained > 0,
        "trainer check: the adapter has no trainable weights"
    );

    let mut staged = trainer(true)?;
    let slots = staged.optimizer().bytes_on(&gpu.device);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(key(&staged.step()?.context("run ended early")?));
    }
    let dir = std::env::temp_dir().join(format!("qlorad-gpu-check-{}", std::process::id()));
    let ckpt = dir.join("checkpoint-3");
    staged.save_checkpoint(&ckpt, "random", false)?;
    got.extend(run(&mut staged)?.iter().map(key));
    let same_run = got == want && weights(&staged)? == want_w;
    r.add(
        "trainer, staged paged moments with deferred updates vs resident: losses, evals, weights (1 = differ)".into(),
        if same_run { 0.0 } else { 1.0 },
        0.0,
        format!(
            "{} steps (accumulation 2, dropout 0.1, eval every 2, 2 epochs, recompute), {trained} LoRA values; optimizer on the device: {slots} bytes (slots)",
            want.len()
        ),
    );
    let mut resumed = Trainer::resume(
        &m,
        &spec(),
        examples(14, 1, vocab),
        examples(4, 2, vocab),
        cfg(false),
        0,
        &ckpt,
    )?;
    let tail: Vec<_> = run(&mut resumed)?.iter().map(key).collect();
    let same_tail = tail.as_slice() == &want[3..] && weights(&resumed)? == want_w;
    r.add(
        "trainer, checkpoint of a staged run (update pending) resumed with resident moments (1 = differ)".into(),
        if same_tail { 0.0 } else { 1.0 },
        0.0,
        format!("steps 4..{} bit for bit, final weights", want.len()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
