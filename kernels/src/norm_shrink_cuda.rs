//! Settings of the add + RMSNorm launch's LoRA shrink blocks (cuda/decode.cu, NormShrink), read
//! by `BgmvPlan::norm_shrink` and the launch (`DecodeKernels::add_rms_norm_shrink`).

use crate::bgmv_cuda::SHRINK_CHUNKS;
use std::sync::atomic::{AtomicUsize, Ordering};

/// 0: not set, [`norm_shrink_parts`] reads `QLORAD_NORM_SHRINK_PARTS`.
static NORM_PARTS: AtomicUsize = AtomicUsize::new(0);
/// [`norm_shrink_parts`]'s default, from a same-call sweep on the H200 (BENCHMARKS.md, session 21).
const NORM_PARTS_DEFAULT: usize = 2;
/// The fewest values per chunk: below it a chunk is less than one 16-byte load per lane.
pub(crate) const NORM_PART_MIN: usize = 256;

/// The k-chunks each dot of the add + RMSNorm launch's shrink is split into, 1..=[`SHRINK_CHUNKS`]
/// (`QLORAD_NORM_SHRINK_PARTS`, or [`set_norm_shrink_parts`]): more chunks spread A's rows over
/// more blocks, so the launch the next GEMV waits on ends sooner.
pub fn norm_shrink_parts() -> usize {
    match NORM_PARTS.load(Ordering::Relaxed) {
        0 => {
            let p = crate::switch::env_number::<usize>("QLORAD_NORM_SHRINK_PARTS")
                .unwrap_or(NORM_PARTS_DEFAULT)
                .clamp(1, SHRINK_CHUNKS);
            NORM_PARTS.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// Sets [`norm_shrink_parts`] for the process (clamped to 1..=[`SHRINK_CHUNKS`]; gpu-check runs
/// more than one).
pub fn set_norm_shrink_parts(parts: usize) {
    let parts = parts.clamp(1, SHRINK_CHUNKS);
    let old = NORM_PARTS.swap(parts, Ordering::Relaxed);
    if old != 0 && old != parts {
        // Captured decode steps chose their launches under the old count.
        crate::switch::bump_epoch();
    }
}
