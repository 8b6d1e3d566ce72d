//! Data-parallel training (trainer/src/parallel.rs): two ranks, each with grad_accum 2, on threads
//! of one process, produce the same run as one rank accumulating 4 micro-batches (the same global
//! batch): the same learning rates and token counts, and losses, gradient norms and adapter weights
//! equal within rounding (the ranks' partial sums add the same gradients in another order),
//! through an epoch boundary and a short last step, with LoRA dropout on.

mod common;
use common::model;
use qlorad_model::Llama;
use qlorad_trainer::parallel::{Collective, ThreadGroup};
use qlorad_trainer::step::{AdamWConfig, LoraSpec, TrainableLora};
use qlorad_trainer::train::{StepLog, TrainConfig, Trainer};
use qlorad_trainer::Example;
use std::sync::Arc;

fn examples(n: usize, seed: u64) -> Vec<Example> {
    common::examples(n, seed, 16)
}

fn spec() -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        rslora: false,
        targets: ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
    }
}

fn cfg(grad_accum: usize) -> TrainConfig {
    TrainConfig {
        // 9 examples in batches of 2: 5 micro-batches per epoch, so each epoch's second step is
        // short (one micro-batch: rank 1 contributes zeros).
        epochs: 2,
        batch_size: 2,
        grad_accum,
        adamw: AdamWConfig {
            lr: 5e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn trainer(m: &Llama, grad_accum: usize) -> Trainer<'_> {
    let lora = TrainableLora::new(m.config(), &spec(), 7).unwrap();
    Trainer::new(m, lora, examples(9, 1), Vec::new(), cfg(grad_accum), 0).unwrap()
}

fn run(t: &mut Trainer) -> Vec<StepLog> {
    std::iter::from_fn(|| t.step().unwrap()).collect()
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.lora()
        .unwrap()
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn two_ranks_equal_one_rank_with_the_same_global_batch() {
    let m = model();
    let mut single = trainer(&m, 4);
    let one = run(&mut single);
    assert_eq!(one.len(), 4, "2 epochs × ceil(5 micro-batches / 4)");

    let ranks = ThreadGroup::new(2);
    let results: Vec<(Vec<StepLog>, Vec<Vec<f32>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let m = &m;
                s.spawn(move || {
                    let mut t = trainer(m, 2);
                    let c: Arc<dyn Collective> = Arc::new(rank);
                    t.set_collective(c);
                    let logs = run(&mut t);
                    (logs, weights(&t))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want = weights(&single);
    // The ranks sum in the same order, so they hold the very same adapter.
    assert_eq!(results[0].1, results[1].1, "rank 0 and rank 1 diverged");
    for (rank, (logs, w)) in results.iter().enumerate() {
        assert_eq!(logs.len(), one.len(), "rank {rank}: steps");
        for (a, b) in logs.iter().zip(&one) {
            let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
            let step = a.step;
            assert!(rel(a.loss, b.loss) < 1e-6, "rank {rank} step {step}: loss");
            assert!(
                rel(a.grad_norm, b.grad_norm) < 1e-4,
                "rank {rank} step {step}: grad norm"
            );
            assert_eq!(a.lr.to_bits(), b.lr.to_bits());
            assert_eq!(a.trained_tokens, b.trained_tokens);
        }
        let diff = w
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "rank {rank}: adapter weights differ by {diff}");
    }
}
