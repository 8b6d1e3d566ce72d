//! Settings of the add + RMSNorm launch's LoRA shrink blocks (cuda/decode.cu, NormShrink), read
//! by `BgmvPlan::norm_shrink` and the launch (`DecodeKernels::add_rms_norm_shrink`).

use crate::bgmv_cuda::SHRINK_CHUNKS;
use crate::switch::EnvSwitch;
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

static PRELOAD: EnvSwitch = EnvSwitch::new("QLORAD_NORM_SHRINK_PRELOAD");

/// Whether the shrink blocks copy their A chunk into shared memory before the programmatic-launch
/// wait (`QLORAD_NORM_SHRINK_PRELOAD=1`, or [`set_norm_shrink_preload`]; opt-in until measured),
/// so that after it only the norm and a dot from shared memory remain; the same dot order, so the
/// same t bit for bit.
pub fn norm_shrink_preload() -> bool {
    PRELOAD.on()
}

/// Switches [`norm_shrink_preload`] for the process (gpu-check runs both).
pub fn set_norm_shrink_preload(on: bool) {
    PRELOAD.set(on);
}

/// The most dynamic shared memory a norm launch's preloading blocks take: 16 warps of 4 KB (a
/// 4,096-wide row in 2 chunks); larger chunks skip the preload.
pub(crate) const PRELOAD_MAX_BYTES: usize = 64 * 1024;

/// The 16-byte pieces of A each warp of a norm launch's shrink blocks preloads (the launch takes
/// that many times 16 warps times 16 bytes of dynamic shared memory), for rows of `n` values in
/// `parts` chunks: 0 when the preload is off or a chunk would not fit.
pub(crate) fn preload_pieces(n: usize, parts: usize) -> u32 {
    let len = n.div_ceil(parts.max(1)).next_multiple_of(8);
    let pieces = len / 8;
    if norm_shrink_preload() && 16 * 16 * pieces <= PRELOAD_MAX_BYTES {
        pieces as u32
    } else {
        0
    }
}
