//! Issue 8: the batched CPU attention (`QLORAD_CPU_ATTENTION=batched`, the default) against the
//! per-sequence candle path (`reference`) on SmolLM2 NF4: a continuous-batching schedule where
//! sequences at different cache lengths decode while others prefill, one joining mid-way, gives the
//! same logits (≤ 1e-5 relative, 9e-7 seen: the two paths sum in different orders) and the same greedy tokens.

use qlorad_model::sampling::argmax;
use qlorad_model::{CpuAttention, Llama, Logits, Quant, SeqInput};
use qlorad_tests::{rel_err, smollm2};

/// Runs the schedule and returns each step's logits rows (one per sequence in the step).
fn schedule(model: &Llama) -> Vec<Vec<Vec<f32>>> {
    let prompts: Vec<Vec<u32>> = vec![
        (0..37).map(|i| 100 + 13 * i).collect(),
        (0..5).map(|i| 2000 + 7 * i).collect(),
        (0..150).map(|i| 300 + 31 * i).collect(), // prefill across the cache's 128 → 256 doubling
        (0..9).map(|i| 900 + 3 * i).collect(),    // joins at step 3
    ];
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut steps = Vec::new();
    for step in 0..8 {
        let active: Vec<usize> = (0..prompts.len())
            .filter(|&i| i != 3 || step >= 3)
            .collect();
        let mut inputs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(i, c)| SeqInput::new(&next[i], c))
            .collect();
        let rows = model
            .forward(&mut inputs, Logits::Last)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        drop(inputs);
        for (&i, row) in active.iter().zip(&rows) {
            next[i] = vec![argmax(row)];
        }
        steps.push(rows);
    }
    steps
}

#[test]
fn batched_cpu_attention_equals_the_per_sequence_path_on_smollm2() {
    let Some(dir) = smollm2() else { return };
    let (mut model, _) = qlorad_model::load_model(&dir, Quant::Nf4(Default::default())).unwrap();
    model.set_cpu_attention(CpuAttention::Reference);
    let want = schedule(&model);
    model.set_cpu_attention(CpuAttention::Batched);
    let got = schedule(&model);
    for (step, (w, g)) in want.iter().zip(&got).enumerate() {
        for (seq, (wr, gr)) in w.iter().zip(g).enumerate() {
            let err = rel_err(gr, wr);
            assert!(
                err < 1e-5,
                "step {step}, sequence {seq}: logits differ by {err}"
            );
            assert_eq!(argmax(gr), argmax(wr), "step {step}, sequence {seq}");
        }
    }
}
