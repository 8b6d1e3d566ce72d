//! Checkpoints and resume: a run stopped after k steps and resumed from its checkpoint produces the
//! same losses, bit for bit, and the same adapter bytes as the uninterrupted run (CPU, NF4 base,
//! gradient accumulation, dropout, crossing an epoch boundary, with evaluation).

mod common;
use common::model;
use qlorad_model::Llama;
use qlorad_trainer::checkpoint::{read_state, OPTIMIZER_FILE};
use qlorad_trainer::step::{AdamWConfig, LoraSpec, StepError, TrainableLora};
use qlorad_trainer::train::{save_peft, Schedule, StepLog, TrainConfig, Trainer};
use qlorad_trainer::Example;

fn examples(n: usize, seed: u64) -> Vec<Example> {
    common::examples(n, seed, 20)
}

fn spec() -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        rslora: true,
        targets: ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
    }
}

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 3,
        grad_accum: 2,
        adamw: AdamWConfig {
            lr: 5e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine,
        warmup_ratio: 0.1,
        eval_every: 2,
        ..Default::default()
    }
}

fn fresh(m: &Llama) -> Trainer<'_> {
    let lora = TrainableLora::new(m.config(), &spec(), 7).unwrap();
    Trainer::new(m, lora, examples(14, 1), examples(4, 2), cfg(), 0).unwrap()
}

/// Continues the run of [`fresh`] (settings `cfg()`) from a checkpoint.
fn resume<'m>(m: &'m Llama, ckpt: &std::path::Path) -> Trainer<'m> {
    Trainer::resume(m, &spec(), examples(14, 1), examples(4, 2), cfg(), 0, ckpt).unwrap()
}

fn run_to_end(t: &mut Trainer) -> Vec<StepLog> {
    std::iter::from_fn(|| t.step().unwrap()).collect()
}

fn key(l: &StepLog) -> (u64, u64, Option<u64>, u64) {
    (
        l.loss.to_bits(),
        l.lr.to_bits(),
        l.eval_loss.map(f64::to_bits),
        l.trained_tokens,
    )
}

#[test]
fn resumed_run_equals_uninterrupted_bit_for_bit() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let mut full = fresh(&m);
    // 14 examples, batch 3, accumulation 2 → 3 steps per epoch, 9 in all.
    assert_eq!(full.total_steps(), 9);
    let whole = run_to_end(&mut full);
    assert_eq!(whole.len(), 9);
    assert!(whole.iter().all(|l| l.loss.is_finite()));
    assert!(whole[1].eval_loss.is_some() && whole[2].eval_loss.is_none());
    save_peft(
        full.lora().unwrap(),
        "tiny",
        &dir.path().join("full"),
        false,
    )
    .unwrap();

    // Stop after 4 steps (mid-epoch), checkpoint, drop everything, resume in a new trainer.
    let ckpt = dir.path().join("checkpoint-4");
    let mut first = fresh(&m);
    let head: Vec<StepLog> = (0..4).map(|_| first.step().unwrap().unwrap()).collect();
    first.save_checkpoint(&ckpt, "tiny", false).unwrap();
    drop(first);
    let st = read_state(&ckpt).unwrap();
    assert_eq!(
        (st.position.step, st.position.epoch, st.position.group),
        (4, 1, 1)
    );
    let mut resumed = resume(&m, &ckpt);
    let tail = run_to_end(&mut resumed);
    save_peft(
        resumed.lora().unwrap(),
        "tiny",
        &dir.path().join("resumed"),
        false,
    )
    .unwrap();

    let got: Vec<_> = head.iter().chain(&tail).map(key).collect();
    let want: Vec<_> = whole.iter().map(key).collect();
    assert_eq!(
        got, want,
        "losses, LRs and eval losses must match bit for bit"
    );
    let bytes =
        |d: &str| std::fs::read(dir.path().join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes("full"), bytes("resumed"), "adapter bytes differ");
}

#[test]
fn resume_refuses_other_settings_data_and_corrupt_files() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut t = fresh(&m);
    t.step().unwrap();
    t.save_checkpoint(&ckpt, "tiny", false).unwrap();
    // A second save to the same place is refused unless overwriting.
    assert!(t.save_checkpoint(&ckpt, "tiny", false).is_err());
    t.save_checkpoint(&ckpt, "tiny", true).unwrap();

    let err = |r: Result<Trainer, StepError>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("resume should have been refused"),
    };
    let mut other = cfg();
    other.adamw.lr = 1e-3;
    let e = err(Trainer::resume(
        &m,
        &spec(),
        examples(14, 1),
        vec![],
        other,
        0,
        &ckpt,
    ));
    assert!(e.contains("different training settings"), "{e}");
    let e = err(Trainer::resume(
        &m,
        &spec(),
        examples(14, 9),
        vec![],
        cfg(),
        0,
        &ckpt,
    ));
    assert!(e.contains("different training data"), "{e}");
    let mut s = spec();
    s.r = 8;
    let e = err(Trainer::resume(
        &m,
        &s,
        examples(14, 1),
        vec![],
        cfg(),
        0,
        &ckpt,
    ));
    assert!(e.contains("different LoRA shape"), "{e}");

    // Truncated optimizer state: a clear error naming the file, not a panic.
    let opt = ckpt.join(OPTIMIZER_FILE);
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = err(Trainer::resume(
        &m,
        &spec(),
        examples(14, 1),
        vec![],
        cfg(),
        0,
        &ckpt,
    ));
    assert!(e.contains(OPTIMIZER_FILE), "{e}");
    std::fs::remove_file(ckpt.join("trainer_state.json")).unwrap();
    let e = err(Trainer::resume(
        &m,
        &spec(),
        examples(14, 1),
        vec![],
        cfg(),
        0,
        &ckpt,
    ));
    assert!(e.starts_with("checkpoint "), "{e}");
}

#[test]
fn dropout_changes_training_but_not_evaluation() {
    let m = model();
    let mut with = fresh(&m);
    let mut s = spec();
    s.dropout = 0.0;
    let lora = TrainableLora::new(m.config(), &s, 7).unwrap();
    let mut without = Trainer::new(&m, lora, examples(14, 1), examples(4, 2), cfg(), 0).unwrap();
    // Same initial weights: evaluation (no dropout) agrees. B starts at zero, so the first loss is
    // the base's either way; the first update differs (dropout masks A's input), hence the second
    // loss does.
    assert_eq!(with.evaluate().unwrap(), without.evaluate().unwrap());
    let (a, b) = (
        with.step().unwrap().unwrap(),
        without.step().unwrap().unwrap(),
    );
    assert_eq!(a.loss, b.loss);
    let (a, b) = (
        with.step().unwrap().unwrap(),
        without.step().unwrap().unwrap(),
    );
    assert_ne!(a.loss, b.loss);
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_and_run() {
    use qlorad_trainer::step::{loss_and_grads, Batch};
    let m = model();
    let lora = TrainableLora::new(m.config(), &spec(), 7).unwrap();
    // Move B off zero so every gradient path is exercised.
    for (_, v) in lora.named_vars() {
        v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
            .unwrap();
    }
    let exs = examples(3, 5);
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::from_examples(&refs, 0).unwrap();
    let named = lora.named_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
    lora.set_dropout_seed(Some(99));
    let (l1, g1) = loss_and_grads(&m, &lora, &batch, &vars, 0.5, false, None).unwrap();
    let (l2, g2) = loss_and_grads(&m, &lora, &batch, &vars, 0.5, true, None).unwrap();
    lora.set_dropout_seed(None);
    assert_eq!(l1, l2);
    for ((name, _), (a, b)) in named.iter().zip(g1.iter().zip(&g2)) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = qlorad_tests::rel_err(&b, &a);
        assert!(err < 1e-5, "{name}: {err}");
    }
    // Whole runs agree to float rounding.
    let mut plain = fresh(&m);
    let mut cfg = cfg();
    cfg.gradient_checkpointing = true;
    let lora = TrainableLora::new(m.config(), &spec(), 7).unwrap();
    let mut ckpt = Trainer::new(&m, lora, examples(14, 1), examples(4, 2), cfg, 0).unwrap();
    for (a, b) in run_to_end(&mut plain)
        .iter()
        .zip(run_to_end(&mut ckpt).iter())
    {
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * a.loss.abs(),
            "{} vs {}",
            a.loss,
            b.loss
        );
    }
}

/// The paged optimizer (AdamW moments in host memory, paged in per tensor) changes where the
/// state lives, never the run: a paged run equals a resident one bit for bit, and a checkpoint of
/// one resumes in the other. (On the GPU, `qlorad-bench gpu-check` checks the same with the
/// moments really crossing to the host.)
#[test]
fn paged_optimizer_gives_the_same_run_and_resumes_across_the_switch() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let paged = || TrainConfig {
        paged_optimizer: true,
        ..cfg()
    };
    let mut resident = fresh(&m);
    let want: Vec<_> = run_to_end(&mut resident).iter().map(key).collect();

    let lora = TrainableLora::new(m.config(), &spec(), 7).unwrap();
    let mut first = Trainer::new(&m, lora, examples(14, 1), examples(4, 2), paged(), 0).unwrap();
    assert!(first.optimizer().is_paged());
    assert_eq!(
        first.optimizer().bytes_on(&candle_core::Device::Cpu),
        2 * 4
            * first
                .lora()
                .unwrap()
                .named_vars()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>()
    );
    let head: Vec<_> = (0..5).map(|_| first.step().unwrap().unwrap()).collect();
    let ckpt = dir.path().join("checkpoint-5");
    first.save_checkpoint(&ckpt, "tiny", false).unwrap();
    drop(first);
    // Resumed without paging.
    let mut resumed = resume(&m, &ckpt);
    assert!(!resumed.optimizer().is_paged());
    let tail = run_to_end(&mut resumed);
    let got: Vec<_> = head.iter().chain(&tail).map(key).collect();
    assert_eq!(got, want);
    save_peft(
        resident.lora().unwrap(),
        "tiny",
        &dir.path().join("a"),
        false,
    )
    .unwrap();
    save_peft(
        resumed.lora().unwrap(),
        "tiny",
        &dir.path().join("b"),
        false,
    )
    .unwrap();
    let bytes =
        |d: &str| std::fs::read(dir.path().join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes("a"), bytes("b"));
}

/// The plan a reference trains from: the first epoch's steps, every example exactly once, with the
/// learning rates the trainer then uses.
#[test]
fn plan_covers_the_epoch_with_the_trainers_learning_rates() {
    let m = model();
    let mut t = fresh(&m);
    let mut buf = Vec::new();
    let n = t.write_plan(&mut buf).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 14 examples in micro-batches of 3 → 5 micro-batches, 2 per step → 3 steps per epoch.
    assert_eq!((n, lines.len()), (3, 3));
    let mut seen: Vec<Vec<u64>> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i + 1);
        assert_eq!(line["pad_id"], 0);
        for mb in line["micro"].as_array().unwrap() {
            let ids = mb["input_ids"].as_array().unwrap();
            let masks = mb["loss_mask"].as_array().unwrap();
            assert_eq!(ids.len(), masks.len());
            for x in ids {
                seen.push(
                    x.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap())
                        .collect(),
                );
            }
        }
    }
    let mut want: Vec<Vec<u64>> = examples(14, 1)
        .iter()
        .map(|e| e.input_ids.iter().map(|&x| x as u64).collect())
        .collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want);
    for line in &lines {
        let log = t.step().unwrap().unwrap();
        assert_eq!(line["lr"].as_f64().unwrap(), log.lr);
    }
}
