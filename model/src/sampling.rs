//! Next-token sampling: greedy, temperature, top-k, top-p (nucleus, Holtzman et al. 2020), seeded.
//! The order of the filters follows transformers' logits warpers: temperature → top-k → top-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 disables).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    /// Seed of the sampler's RNG; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges; the message names the rule broken.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return Err(format!(
                "temperature must be between 0 and 2, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// A sampler with its own RNG stream (one per request).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from one row of logits.
    ///
    /// A token's chance is its softmax weight over the candidates left by the filters, whatever
    /// order they are drawn in, so candidates are sorted only as far as a filter needs: top-k selects
    /// its k in O(vocab), top-p sorts the most likely tokens until they hold the nucleus's mass (all
    /// of them only for a flat distribution), and plain temperature sorts nothing. Sorting the whole
    /// vocabulary (49k tokens for SmolLM2) cost 3 ms per token, a third of a 64-sequence CPU decode
    /// step on the engine thread (issue 8).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 || logits.len() <= 1 {
            return argmax(logits);
        }
        let t = p.temperature;
        if p.top_k == 0 && p.top_p >= 1.0 {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
            return self.draw(&weights) as u32;
        }
        let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, desc);
            idx.truncate(p.top_k);
        }
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: u32| ((logits[i as usize] - max) / t).exp();
        if p.top_p < 1.0 {
            let keep = nucleus(&mut idx, p.top_p, desc, weight);
            idx.truncate(keep);
        }
        let weights: Vec<f32> = idx.iter().map(|&i| weight(i)).collect();
        idx[self.draw(&weights)]
    }

    /// An index drawn with probability proportional to `weights` (non-negative, not all zero).
    fn draw(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if r < w {
                return i;
            }
            r -= w;
            if w > 0.0 {
                last = i;
            }
        }
        // Rounding left r at or above the last weight: the last token that had any chance.
        last
    }
}

/// Tokens sorted first when looking for the nucleus; ×16 each time they hold too little mass.
const NUCLEUS_FIRST: usize = 256;

/// Top-p (Holtzman et al. 2020, as transformers' `TopPLogitsWarper`): sorts the front of `idx` by
/// descending logit and returns how many tokens to keep: while the probability mass before a token
/// is below `top_p` (the top token always stays). Only as many tokens are sorted as the nucleus
/// needs.
fn nucleus(
    idx: &mut [u32],
    top_p: f32,
    desc: impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy,
    weight: impl Fn(u32) -> f32,
) -> usize {
    let total: f32 = idx.iter().map(|&i| weight(i)).sum();
    let mut m = NUCLEUS_FIRST;
    loop {
        let m_now = m.min(idx.len());
        if m_now < idx.len() {
            idx.select_nth_unstable_by(m_now - 1, desc);
        }
        idx[..m_now].sort_unstable_by(desc);
        let mut cum = 0f32;
        for (i, &tok) in idx[..m_now].iter().enumerate() {
            if cum >= top_p {
                return i.max(1);
            }
            cum += weight(tok) / total;
        }
        if cum >= top_p || m_now == idx.len() {
            return m_now.max(1);
        }
        m *= 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut top3: Vec<u32> = (0..50).collect();
        top3.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(a.iter().all(|t| top3[..3].contains(t)));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [1.0, 5.0, 2.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
    }

    /// Plain temperature sampling (no sort) draws each token with its softmax probability.
    #[test]
    fn temperature_draws_follow_the_softmax() {
        let logits = [1.0f32, 2.5, -0.5, 2.0, 0.0, 1.5];
        let t = 0.7f32;
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            seed: Some(5),
            ..Default::default()
        });
        let n = 60_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (l as f64 / t as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        for (c, wi) in counts.iter().zip(&w) {
            let (got, want) = (*c as f64 / n as f64, wi / z);
            assert!((got - want).abs() < 0.01, "{got} vs {want}");
        }
    }

    /// The partial sort keeps exactly the tokens a full sort keeps, for peaked distributions (the
    /// nucleus within the first 256 tokens) and flat ones (the sort widens).
    #[test]
    fn nucleus_equals_a_full_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for spread in [0.5f32, 8.0, 30.0] {
            let logits: Vec<f32> = (0..5000)
                .map(|_| rng.random_range(-1.0f32..1.0) * spread)
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weight = |i: u32| (logits[i as usize] - max).exp();
            let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
            for top_p in [0.3f32, 0.9, 0.99] {
                // the total in index order, as `nucleus` sums it (a sorted-order sum can differ in
                // its last bit and move the cut by one token at the boundary)
                let total: f32 = (0..5000).map(weight).sum();
                let mut full: Vec<u32> = (0..5000).collect();
                full.sort_unstable_by(desc);
                let (mut cum, mut want) = (0f32, full.len());
                for (i, &tok) in full.iter().enumerate() {
                    if cum >= top_p {
                        want = i;
                        break;
                    }
                    cum += weight(tok) / total;
                }
                let mut idx: Vec<u32> = (0..5000).collect();
                let keep = nucleus(&mut idx, top_p, desc, weight);
                assert_eq!(keep, want.max(1), "spread {spread}, top_p {top_p}");
                let mut got = idx[..keep].to_vec();
                got.sort_unstable();
                full.truncate(want.max(1));
                full.sort_unstable();
                assert_eq!(got, full);
            }
        }
    }

    #[test]
    fn validation_names_the_rule() {
        let e = SamplingParams {
            temperature: 3.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("temperature"));
    }
}
