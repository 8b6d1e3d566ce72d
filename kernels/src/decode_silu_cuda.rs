//! SwiGLU's `silu(gate) · up` for the fused decode step (cuda/decode_silu.cuh), optionally with the
//! down projection's LoRA shrink computed by extra blocks of the same launch.

use super::{bf16_view, msg, wrap, DecodeKernels, KArg, ELEMWISE_THREADS};
use crate::bgmv_cuda::AttShrink;
use crate::switch::EnvSwitch;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use candle_core::Tensor;
use half::bf16;

/// The partial dots (k chunks) the silu launch's shrink blocks leave per (row, rank): decode_silu.cuh
/// SILU_SHRINK_PARTS; the down GEMV's expand sums them (at most `bgmv_cuda::SHRINK_CHUNKS`).
pub const SILU_SHRINK_PARTS: usize = 8;
/// Values per chunk a shrink block's shared copy holds (SILU_SHRINK_CHUNK_MAX).
const SILU_SHRINK_CHUNK_MAX: usize = 2048;
/// Ranks per shrink block: one per warp (SILU_THREADS / 32).
const RANKS_PER_BLOCK: usize = ELEMWISE_THREADS as usize / 32;

const _: () = assert!(SILU_SHRINK_PARTS <= crate::bgmv_cuda::SHRINK_CHUNKS);
const _: () = assert!(
    ELEMWISE_THREADS == 256,
    "SILU_THREADS in cuda/decode_silu.cuh"
);

static SILU_SHRINK: EnvSwitch = EnvSwitch::new("QLORAD_SILU_SHRINK");

/// Whether the fused decode step computes the down projection's LoRA shrink in the silu launch
/// (`QLORAD_SILU_SHRINK=1`, or [`set_silu_shrink`]; opt-in until measured on a GPU) instead of
/// inside the down GEMV's launch.
pub fn silu_shrink() -> bool {
    SILU_SHRINK.on()
}

/// Switches [`silu_shrink`] on or off for the process (gpu-check runs both).
pub fn set_silu_shrink(on: bool) {
    SILU_SHRINK.set(on);
}

impl DecodeKernels {
    /// `silu(gate) · up`, elementwise (same shapes).
    pub fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        self.silu_mul_shrink(gate, up, None)?
            .ok_or_else(|| msg("silu_mul: no result without a shrink".into()))
    }

    /// [`DecodeKernels::silu_mul`], and with `shrink` the down projection's LoRA shrink of the
    /// product in the same launch: `shrink` from `BgmvPlan::attention_shrink(slot, SILU_SHRINK_PARTS,
    /// k)`, whose epilogue descriptor sums the launch's SILU_SHRINK_PARTS partials (see
    /// decode_silu.cuh). `None` when a shrink was asked for but these shapes do not take it (then
    /// nothing was launched).
    pub fn silu_mul_shrink(
        &self,
        gate: &Tensor,
        up: &Tensor,
        shrink: Option<&AttShrink>,
    ) -> candle_core::Result<Option<Tensor>> {
        if gate.dims() != up.dims() {
            return Err(msg(format!(
                "silu_mul: gate {:?} vs up {:?}",
                gate.dims(),
                up.dims()
            )));
        }
        let n = gate.elem_count();
        let eb = (n as u32).div_ceil(ELEMWISE_THREADS).clamp(1, 4096);
        let mut sh = (0u64, 0u64, 0u32, 0u32, 0u32, 0u32, 0u32);
        let mut blocks = eb;
        if let Some(s) = shrink {
            let (rows, k) = gate.dims2()?;
            let chunk = k.div_ceil(SILU_SHRINK_PARTS).next_multiple_of(8);
            if s.kv_heads != SILU_SHRINK_PARTS
                || s.in_f != k
                || s.rows != rows
                || !k.is_multiple_of(8)
                || chunk > SILU_SHRINK_CHUNK_MAX
                || s.t_stride == 0
            {
                return Ok(None);
            }
            // Ranks up to the plan's t stride (every row's rank fits in it).
            let jgroups = (s.t_stride as usize).div_ceil(RANKS_PER_BLOCK);
            let extra = rows * SILU_SHRINK_PARTS * jgroups;
            blocks += u32::try_from(extra).map_err(|_| msg("silu shrink: grid".into()))?;
            sh = (
                s.row_tables,
                s.t,
                s.slot,
                s.t_stride,
                s.part_stride,
                k as u32,
                jgroups as u32,
            );
        }
        let (gs, _) = gate.storage_and_layout();
        let (gv, ga, gb) = bf16_view(&gs, gate, &self.device, "gate")?;
        let (us, _) = up.storage_and_layout();
        let (uv, ua, ub) = bf16_view(&us, up, &self.device, "up")?;
        let (gview, uview) = (gv.slice(ga..gb), uv.slice(ua..ub));
        let st = &self.stream;
        let ((gp, _gg), (upp, _ug)) = (gview.device_ptr(st), uview.device_ptr(st));
        // 16-byte pieces of the rows for the shrink's shared copy and A's dot.
        if shrink.is_some() && (gp | upp) % 16 != 0 {
            return Ok(None);
        }
        // SAFETY: the grid-stride loop of the eb elementwise blocks writes all n elements.
        let mut out = unsafe { self.device.alloc::<bf16>(n) }?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (ELEMWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (op, og) = out.device_ptr_mut(st);
        let args = [
            KArg::U64(gp),
            KArg::U64(upp),
            KArg::U64(n as u64),
            KArg::U64(op),
            KArg::U32(eb),
            KArg::U64(sh.0),
            KArg::U64(sh.1),
            KArg::U32(sh.2),
            KArg::U32(sh.3),
            KArg::U32(sh.4),
            KArg::U32(sh.5),
            KArg::U32(sh.6),
        ];
        let raw = self.pdl.as_ref().map(|p| p.silu_mul);
        // SAFETY: argument types and order match silu_mul_bf16; gate, up and out hold n bf16.
        // With a shrink: the row tables, slot and scratch come from a live BgmvPlan whose modules
        // at the slot read k features and whose scratch holds SILU_SHRINK_PARTS partials of
        // rows · t_stride f32 at part_stride (BgmvPlan::attention_shrink with that many parts);
        // without one the extra arguments are unused (no shrink blocks).
        unsafe { self.launch(&self.silu_mul, raw, cfg, &args) }?;
        drop(og);
        Ok(Some(wrap(out, &self.device, gate.shape().clone())))
    }
}
