//! silu·mul with the down projection's LoRA shrink in the same launch (`silu_mul_shrink_bf16`,
//! cuda/decode.cu): each block dots the values it computes with its share of every row's A, the
//! row's last block sums the partials into the BGMV scratch, and the down GEMV's all-warps
//! epilogue reads it as it reads the shrink of the norm launch. Without it the down projection's
//! grouped GEMV ran the shrink inside its own launch (a ninth warp per block, every block's
//! expand waiting for the last unit: 22.4 µs per launch against the base's 21, ncu, session 13).

use super::{bf16_view, msg, wrap, DecodeKernels, KArg, ELEMWISE_THREADS};
use crate::bgmv_cuda::NormShrink;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Tensor;
use half::bf16;

/// Values per block (SS_CHUNK in cuda/decode.cu: one per thread).
const CHUNK: usize = ELEMWISE_THREADS as usize;
/// What the partials' scratch holds: rows (the all-warps epilogue's 1..=4), blocks per row (n up
/// to 32,768) and ranks.
const MAX_ROWS: usize = 4;
const MAX_BLOCKS: usize = 128;
const MAX_RANK: usize = 256;

/// The kernel and its scratch on one device.
pub(super) struct SiluShrink {
    func: CudaFunction,
    /// Per (row, block, rank) partial dots, written and read within one launch.
    part: CudaSlice<f32>,
    /// Per row, the blocks done; zero between launches (the last block resets its row's).
    counters: CudaSlice<u32>,
}

impl SiluShrink {
    pub(super) fn load(dev: &CudaDevice) -> candle_core::Result<Self> {
        Ok(Self {
            func: crate::module_cuda::function(
                dev,
                &crate::module_cuda::DECODE,
                "silu_mul_shrink_bf16",
            )?,
            part: dev.alloc_zeros::<f32>(MAX_ROWS * MAX_BLOCKS * MAX_RANK)?,
            counters: dev.alloc_zeros::<u32>(MAX_ROWS)?,
        })
    }
}

impl DecodeKernels {
    /// `silu(gate) · up` (rows, n), and the LoRA shrink `sh` of the one projection that reads it
    /// (the down projection: `sh.count == 1`) into the plan's scratch, in one launch. `Ok(None)`
    /// (nothing launched) when the shapes do not fit the kernel: 1..=4 rows, n a multiple of 256
    /// up to 32,768, ranks up to 256; the caller then launches [`DecodeKernels::silu_mul`] and
    /// the shrink its own way.
    pub fn silu_mul_shrink(
        &self,
        gate: &Tensor,
        up: &Tensor,
        sh: &NormShrink,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, n) = gate.dims2()?;
        if up.dims() != [rows, n] {
            return Err(msg(format!(
                "silu_mul_shrink: gate {:?} vs up {:?}",
                gate.dims(),
                up.dims()
            )));
        }
        let max_rank = sh.max_rank as usize;
        if sh.count != 1
            || sh.in_f != n
            || sh.rows != rows
            || !(1..=MAX_ROWS).contains(&rows)
            || !n.is_multiple_of(CHUNK)
            || n / CHUNK > MAX_BLOCKS
            || !(1..=MAX_RANK).contains(&max_rank)
        {
            return Ok(None);
        }
        let (gs, _) = gate.storage_and_layout();
        let (gv, ga, gb) = bf16_view(&gs, gate, &self.device, "gate")?;
        let (us, _) = up.storage_and_layout();
        let (uv, ua, ub) = bf16_view(&us, up, &self.device, "up")?;
        // SAFETY: one thread per element writes all rows·n.
        let mut out = unsafe { self.device.alloc::<bf16>(rows * n) }?;
        let cfg = LaunchConfig {
            grid_dim: ((n / CHUNK) as u32, rows as u32, 1),
            block_dim: (ELEMWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let st = &self.stream;
        let (gview, uview) = (gv.slice(ga..gb), uv.slice(ua..ub));
        let ((gp, _gg), (upp, _ug)) = (gview.device_ptr(st), uview.device_ptr(st));
        let (op, og) = out.device_ptr_mut(st);
        let s = &self.silu_shrink;
        let (pp, _pg) = s.part.device_ptr(st);
        let (cp, _cg) = s.counters.device_ptr(st);
        let args = [
            KArg::U64(gp),
            KArg::U64(upp),
            KArg::U32(n as u32),
            KArg::U64(op),
            KArg::U64(sh.row_tables),
            KArg::U32(sh.slot0),
            KArg::U64(sh.t),
            KArg::U32(sh.t_stride),
            KArg::U32(sh.max_rank),
            KArg::U64(pp),
            KArg::U64(cp),
        ];
        let raw = self.pdl.as_ref().map(|p| p.silu_mul_shrink);
        // SAFETY: argument types and order match silu_mul_shrink_bf16; gate, up and out hold
        // rows·n bf16 (checked); the row tables, slot and scratch come from a live BgmvPlan whose
        // modules at that slot read n features and whose scratch holds rows · t_stride f32 from
        // `t` (BgmvPlan::norm_shrink); the partials hold rows · blocks · max_rank f32 and the
        // counters `rows` u32, zero between launches (each launch's last block per row resets its
        // count; launches are ordered on this stream).
        unsafe { self.launch(&s.func, raw, cfg, &args) }?;
        drop(og);
        Ok(Some(wrap(out, &self.device, (rows, n))))
    }
}
