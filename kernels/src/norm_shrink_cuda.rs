//! Settings of the add + RMSNorm launch's LoRA shrink blocks (cuda/decode.cu, NormShrink), read
//! by `BgmvPlan::norm_shrink` and the launch (`DecodeKernels::add_rms_norm_shrink`).

use crate::bgmv_cuda::{BgmvPlan, GemvLora, NormShrink, SHRINK_CHUNKS};
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::WrapErr;
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

impl NormShrink {
    /// Shrink blocks per row of the add + RMSNorm launch: one warp per (slot, rank, k chunk) unit.
    pub fn blocks_per_row(&self) -> u32 {
        (self.count * self.max_rank * self.parts.max(1))
            .div_ceil(crate::decode_cuda::NORM_THREADS / 32)
    }
}

impl BgmvPlan {
    /// Switches a norm launch's shrink `sh` and the GEMV descriptors `epis` that read it
    /// ([`BgmvPlan::norm_shrink`]'s) to the ready protocol: the launch counts its finished norm
    /// and shrink blocks in the plan's counters, and the grouped t4 GEMV polls them instead of
    /// waiting for the whole launch (its LoRA warp for the shrink blocks only). The GEMV resets
    /// the counters; a caller that does not launch it must [`BgmvPlan::reset_counters`].
    pub fn norm_ready(&self, sh: &mut NormShrink, epis: &mut [GemvLora]) {
        // Four words of the group's own (its first slot's): never the in-launch shrink's, which
        // the GEMV before this launch may still be using, nor another norm launch's. A launch's
        // blocks may start once the previous one's have all started, so a chain of launches can
        // reach this launch's GEMV while the GEMV that read the previous norm launch's counts is
        // still running and has not reset them: shared words would pass its poll early (what
        // session 22's graph replays showed). Each slot's words serve one launch per step, and
        // the host reads each step's logits before the next step starts.
        let counters = self.counters.device_ptr(&self.stream).0 + 16 * (1 + sh.slot0 as u64);
        sh.ready = counters;
        for e in epis {
            e.counters = counters;
            e.ready = sh.rows as u32 * sh.blocks_per_row();
        }
    }

    /// Zeroes the plan's counters (after a norm launch with the ready protocol whose GEMV did not
    /// run; every launch that uses them otherwise leaves them zeroed).
    pub fn reset_counters(&self) -> candle_core::Result<()> {
        let (ptr, _g) = self.counters.device_ptr(&self.stream);
        let bytes = self.counters.len() * 4;
        // SAFETY: the plan's live counters (`bytes` long), zeroed in this stream's order.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
                ptr,
                0,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .w()
    }
}
