//! How the fused decode attention (`decode_cuda`, behind the `cuda` feature) splits each
//! sequence's context over thread blocks (flash-decoding): plain arithmetic, so CPU builds test it.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Fewest positions one split of the attention takes: below this, splitting a short context costs
/// more in the merge than it gains in parallelism. On the H200, batch-1 Mistral decode over
/// 128-192 positions, same call, with the 256-thread attention (session 16): 387.8 / 383.0 tok/s
/// at 32 against 379.2 / 379.5 at 64 and 374.0 / 382.1 at 16 (the 128-thread one of session 11:
/// 280.1 at 64 against 269.7 at 16). `QLORAD_ATT_MIN_SPLIT` overrides it (comparisons).
pub(crate) const MIN_SPLIT_POSITIONS: usize = 32;
const MAX_SPLITS: usize = 32;
/// Blocks that keep the H200's 132 SMs busy about twice over.
const TARGET_BLOCKS: usize = 264;

/// [`MIN_SPLIT_POSITIONS`], or `QLORAD_ATT_MIN_SPLIT` (read once).
pub(crate) fn min_split_positions() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("QLORAD_ATT_MIN_SPLIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(MIN_SPLIT_POSITIONS)
    })
}

/// Splits of the context per (row, KV head) block: enough blocks to fill the GPU, each split at
/// least `min_len` positions long.
pub(crate) fn splits_for(positions: usize, blocks: usize, min_len: usize) -> usize {
    let by_length = positions.div_ceil(min_len.max(1));
    let by_occupancy = TARGET_BLOCKS.div_ceil(blocks.max(1));
    by_length.min(by_occupancy).clamp(1, MAX_SPLITS)
}

#[cfg(test)]
mod tests {
    use super::{splits_for, MIN_SPLIT_POSITIONS};

    #[test]
    fn splits_fill_the_gpu_but_stay_long() {
        assert_eq!(splits_for(10, 8, 16), 1); // a short context is one split
        assert_eq!(splits_for(200, 8, 16), 13); // batch 1, Mistral: 33 wanted, 13 by length
        assert_eq!(splits_for(200, 8, MIN_SPLIT_POSITIONS), 7); // the default: 7 by length
        assert_eq!(splits_for(1024, 8, 64), 16); // longer splits: 16 by length
        assert_eq!(splits_for(1024, 8, 16), 32); // capped
        assert_eq!(splits_for(4096, 64 * 8, 16), 1); // a big batch fills the GPU already
        assert_eq!(splits_for(0, 0, 0), 1); // degenerate inputs still give one split
    }
}
