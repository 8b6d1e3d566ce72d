//! silu·mul with the gate and up projections' LoRA expands (cuda/lora.cu silu_mul_lora_bf16):
//! the decode step's gate/up GEMV then runs as the base kernel, and this launch, which reads
//! gate and up anyway, adds the expands from the shrink the norm launch left.

use super::{bf16_view, msg, DecodeKernels, KArg};
use crate::bgmv_cuda::GemvLora;
use crate::switch::EnvSwitch;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use candle_core::Tensor;
use half::bf16;

// Must match cuda/lora.cu.
const SILU_LORA_THREADS: u32 = 256;
const SILU_LORA_MAX_RANK: u32 = 256;

static SILU_EXPAND: EnvSwitch = EnvSwitch::new("QLORAD_SILU_EXPAND");

/// Whether decode adds the gate and up projections' LoRA expands in the silu·mul launch instead
/// of the gate/up GEMV's epilogue (`QLORAD_SILU_EXPAND=1`, or [`set_silu_expand`]; opt-in until
/// measured).
pub fn silu_expand() -> bool {
    SILU_EXPAND.on()
}

/// Switches [`silu_expand`] for the process (gpu-check runs both).
pub fn set_silu_expand(on: bool) {
    SILU_EXPAND.set(on);
}

/// Whether [`DecodeKernels::silu_mul_lora`] takes `epis` (gate's, then up's, as
/// `BgmvPlan::norm_shrink` gives them: the shrink already ran) for outputs of `n` features:
/// adjacent slots of one plan, t without in-launch counters, ranks the kernel stages.
pub fn silu_lora_supports(epis: &[GemvLora], n: usize) -> bool {
    let [g, u] = epis else {
        return false;
    };
    g.slot + 1 == u.slot
        && g.row_tables == u.row_tables
        && g.counters == 0
        && u.counters == 0
        && (g.t_stride, g.parts, g.part_stride) == (u.t_stride, u.parts, u.part_stride)
        && g.rows == u.rows
        && g.out_f == n
        && u.out_f == n
        && g.t_stride <= SILU_LORA_MAX_RANK
        && n <= u32::MAX as usize
}

impl DecodeKernels {
    /// `silu(gate + Δgate) · (up + Δup)` for base outputs `gate` and `up` (rows, n), Δ the LoRA
    /// expands of `epis` (see [`silu_lora_supports`], which the caller checks; an error here
    /// otherwise), rounded as the general path's expand launch then silu·mul.
    pub fn silu_mul_lora(
        &self,
        gate: &Tensor,
        up: &Tensor,
        epis: &[GemvLora],
    ) -> candle_core::Result<Tensor> {
        let (rows, n) = gate.dims2()?;
        if up.dims() != [rows, n] || !silu_lora_supports(epis, n) || epis[0].rows != rows {
            return Err(msg(format!(
                "silu_mul_lora: gate {:?}, up {:?} and these LoRA descriptors do not fit",
                gate.dims(),
                up.dims()
            )));
        }
        let (g, u) = (&epis[0], &epis[1]);
        let (gs, _) = gate.storage_and_layout();
        let (gv, ga, gb) = bf16_view(&gs, gate, &self.device, "gate")?;
        let (us, _) = up.storage_and_layout();
        let (uv, ua, ub) = bf16_view(&us, up, &self.device, "up")?;
        // SAFETY: the grid covers all rows · n outputs, each written once.
        let mut out = unsafe { self.device.alloc::<bf16>(rows * n) }?;
        let cfg = LaunchConfig {
            grid_dim: (
                (n as u32).div_ceil(SILU_LORA_THREADS / 8),
                rows.max(1) as u32,
                1,
            ),
            block_dim: (SILU_LORA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (gview, uview) = (gv.slice(ga..gb), uv.slice(ua..ub));
        let st = &self.stream;
        let ((gp, _gg), (upp, _ug)) = (gview.device_ptr(st), uview.device_ptr(st));
        let (op, og) = out.device_ptr_mut(st);
        let args = [
            KArg::U64(gp),
            KArg::U64(upp),
            KArg::U32(n as u32),
            KArg::U64(op),
            KArg::U64(g.row_tables),
            KArg::U32(g.slot),
            KArg::U64(g.t),
            KArg::U64(u.t),
            KArg::U32(g.t_stride),
            KArg::U32(g.parts.max(1)),
            KArg::U32(g.part_stride),
        ];
        let raw = self.pdl.as_ref().map(|p| p.silu_mul_lora);
        // SAFETY: argument types and order match silu_mul_lora_bf16; gate, up and out hold
        // rows · n bf16 (checked); the row tables, slots and t (rows · t_stride f32 per part,
        // `parts` of them part_stride apart) come from a live BgmvPlan whose modules at these
        // slots have n output features (silu_lora_supports), the shrink launched before this.
        unsafe { self.launch(&self.silu_mul_lora, raw, cfg, &args) }?;
        drop(og);
        Ok(super::wrap(out, &self.device, (rows, n)))
    }
}
