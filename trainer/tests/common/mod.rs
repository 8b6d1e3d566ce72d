//! Helpers shared by the trainer's integration tests: the tiny NF4 Llama fixture and random
//! examples with a prompt/completion loss mask.

use qlorad_model::loader::{self, Quant};
use qlorad_model::Llama;
use qlorad_tests::fixture;
use qlorad_trainer::Example;
use rand::{Rng, SeedableRng};

/// The tiny Llama fixture, quantized to NF4 on load.
pub fn model() -> Llama {
    let (cfg, w) =
        loader::load(&fixture("tiny-llama/fp32"), Quant::Nf4(Default::default())).unwrap();
    Llama::new(cfg, w).unwrap()
}

/// `n` random examples of 4..`max_len` tokens (ids 3..64); the loss covers the tokens after a
/// random prompt.
pub fn examples(n: usize, seed: u64, max_len: usize) -> Vec<Example> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(4..max_len);
            let input_ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..64)).collect();
            let prompt = rng.random_range(1..len - 1);
            Example {
                loss_mask: (0..len).map(|i| i >= prompt).collect(),
                input_ids,
            }
        })
        .collect()
}
