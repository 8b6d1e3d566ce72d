//! Decode projections that read the same input (q/k/v, gate/up) in one tensor-core GEMV launch
//! (`nf4_gemv_tcg*` of cuda/nf4_tc.cuh): the grid is the concatenation of the weights' 16-feature
//! tiles. On their own the k and v projections of Mistral-7B (1024 × 4096) fill 64 blocks, half the
//! H200's multiprocessors, and each launch pays its own ramp-up and tail.

use crate::bgmv::GemvLora;
use crate::cuda::{GroupKernel, Nf4Gpu, GEMV_MAX_ROWS};
use crate::nf4_op::Nf4Weight;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Storage, Tensor};
use half::bf16;
use std::sync::Arc;

/// Weights one grouped launch takes (`TC_GROUP_MAX` in cuda/nf4_tc.cuh).
pub const GROUP_MAX: usize = 3;

/// Mirrors `TcWeight` of cuda/nf4_tc.cuh (device addresses as u64; 88 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TcWeight {
    packed: u64,
    code16: u64,
    absmax: u64,
    qabs: u64,
    nested: u64,
    ncode: u64,
    y: u64,
    t: u64,
    offset: f32,
    plain: u32,
    log2_bs: u32,
    n: u32,
    tile0: u32,
    slot: u32,
}

/// Mirrors `TcGroup` of cuda/nf4_tc.cuh (312 bytes, passed by value).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TcGroup {
    w: [TcWeight; GROUP_MAX],
    count: u32,
    k: u32,
    t_stride: u32,
    row_tables: u64,
    /// 0, or the plan's shrink counters: the launch runs the group's shrink itself.
    counters: u64,
    max_rank: u32,
    part_stride: u32,
    /// Without counters: the partials of t the expand sums (1: whole dots).
    parts: u32,
    /// With counters: the in-launch shrink's values per k chunk ([`shrink_chunk`]).
    shrink_chunk: u32,
}

// SAFETY: plain data with the C layout of the kernel's parameter (repr(C), no padding the kernel
// reads, no host pointers).
unsafe impl DeviceRepr for TcGroup {}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// `y_i (m, n_i) = x (m, k) · W_iᵀ` (+ each row's LoRA delta for W_i when `loras` is given: after
/// the group's BGMV shrink, or with descriptors from `BgmvPlan::gemv_loras_fused` the shrink in the
/// same launch) for up to [`GROUP_MAX`] weights on one GPU in one launch. `Ok(None)`
/// when the group does not fit the grouped kernel (a weight off the GPU or decoding with a
/// non-tensor-core kernel, different k, devices or kernels, more than 8 rows, an unaligned or
/// non-bf16 x): the caller then launches the weights one by one.
pub fn nf4_linear_group(
    x: &Tensor,
    weights: &[&Arc<Nf4Weight>],
    loras: Option<&[GemvLora]>,
) -> candle_core::Result<Option<Vec<Tensor>>> {
    // A diagnostic build may leave every grouped GEMV's LoRA work out.
    let loras = if crate::switch::whatif("noexpand") {
        None
    } else {
        loras
    };
    let Some(gpus) = weights
        .iter()
        .map(|w| w.gpu().filter(|g| g.tensor_cores()))
        .collect::<Option<Vec<&Nf4Gpu>>>()
    else {
        return Ok(None);
    };
    if gpus.is_empty() || gpus.len() > GROUP_MAX || loras.is_some_and(|l| l.len() != gpus.len()) {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let k0 = gpus[0].shape().1;
    if m == 0 || m > GEMV_MAX_ROWS || k != k0 || x.dtype() != candle_core::DType::BF16 {
        return Ok(None);
    }
    let dev0 = gpus[0].device();
    // One kernel for the whole grid: every weight must decode with the first one's.
    if gpus.iter().any(|g| {
        g.shape().1 != k || g.device().id() != dev0.id() || g.gemv_kernel() != gpus[0].gemv_kernel()
    }) {
        return Ok(None);
    }
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Ok(None);
    };
    if cs.device.id() != dev0.id() {
        return Ok(None);
    }
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    // Allocations are 256-byte aligned: the element offset decides the 16-byte alignment.
    if a % 8 != 0 {
        return Ok(None);
    }
    let slice = cs.as_cuda_slice::<bf16>()?;
    let xv = slice.slice(a..b);
    let ys = launch(&gpus, &xv, m, loras)?;
    drop(storage);
    Ok(Some(
        ys.into_iter()
            .zip(&gpus)
            .map(|(y, g)| crate::decode_cuda::wrap(y, g.device(), (m, g.shape().0)))
            .collect(),
    ))
}

fn launch(
    gpus: &[&Nf4Gpu],
    x: &CudaView<'_, bf16>,
    m: usize,
    loras: Option<&[GemvLora]>,
) -> candle_core::Result<Vec<CudaSlice<bf16>>> {
    let g0 = gpus[0];
    let (device, stream) = (g0.device(), g0.stream());
    let k = g0.shape().1;
    if x.len() != m * k {
        return Err(msg(format!(
            "grouped gemv: x has {} values, expected {m}x{k}",
            x.len()
        )));
    }
    if let Some(ls) = loras {
        for (l, g) in ls.iter().zip(gpus) {
            if l.rows != m
                || l.out_f != g.shape().0
                || l.row_tables != ls[0].row_tables
                || l.t_stride != ls[0].t_stride
                || l.counters != ls[0].counters
                || l.max_rank != ls[0].max_rank
                || l.part_stride != ls[0].part_stride
                || l.parts != ls[0].parts
                || (l.parts > 1 && l.counters != 0)
            {
                return Err(msg(format!(
                    "grouped gemv with LoRA: plan of {} rows, {} outputs, does not fit {m} rows of \
                     a {}x{k} weight",
                    l.rows,
                    l.out_f,
                    g.shape().0
                )));
            }
        }
    }
    let mut ys = gpus
        .iter()
        // SAFETY: every element is written by warp 0 of the block that computes its tile.
        .map(|g| unsafe { device.alloc::<bf16>(m * g.shape().0) })
        .collect::<Result<Vec<_>, _>>()?;
    let mut grp = TcGroup {
        count: gpus.len() as u32,
        k: k as u32,
        ..Default::default()
    };
    let mut guards = Vec::new();
    let mut tiles = 0u32;
    for (i, (g, y)) in gpus.iter().zip(ys.iter_mut()).enumerate() {
        let (n, _) = g.shape();
        let w = &mut grp.w[i];
        let p = g.pointers(stream, &mut guards);
        (w.packed, w.code16, w.absmax, w.qabs, w.nested, w.ncode) = p;
        let (yp, yg) = y.device_ptr_mut(stream);
        guards.push(yg);
        w.y = yp;
        (w.offset, w.plain, w.log2_bs) = g.scalars();
        w.n = n as u32;
        w.tile0 = tiles;
        if let Some(ls) = loras {
            w.t = ls[i].t;
            w.slot = ls[i].slot;
        }
        tiles += (n / 16) as u32;
    }
    if let Some(ls) = loras {
        grp.row_tables = ls[0].row_tables;
        grp.t_stride = ls[0].t_stride;
        // A diagnostic build may leave the in-launch shrink out (the expands read stale t).
        grp.counters = if crate::switch::whatif("inshrink") {
            0
        } else {
            ls[0].counters
        };
        grp.max_rank = ls[0].max_rank;
        grp.part_stride = ls[0].part_stride;
        grp.parts = ls[0].parts.max(1);
        grp.shrink_chunk = shrink_chunk();
    }
    let kind = match loras {
        None => GroupKernel::Base,
        Some(_) => GroupKernel::Lora,
    };
    let func = g0.group_function(m, kind)?;
    let warps = g0.group_warps(kind);
    let cfg = LaunchConfig {
        grid_dim: (tiles, 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    };
    if let Some(f) = g0.group_function_pdl(m, kind)? {
        let (xp, xg) = x.device_ptr(stream);
        let mut args = [crate::pdl_cuda::arg(&xp), crate::pdl_cuda::arg(&grp)];
        // SAFETY: as the launch below (same kernel, same arguments: x's address and TcGroup by
        // value); every block of the kernel calls pdl_wait before it reads x, the LoRA tables or
        // the counters and before it writes y or t.
        unsafe { crate::pdl_cuda::launch(f, cfg, stream, &mut args) }?;
        drop(xg);
        drop(guards);
        return Ok(ys);
    }
    let mut b = stream.launch_builder(func);
    b.arg(x).arg(&grp);
    // SAFETY: the kernel takes (x, TcGroup by value); x holds m·k bf16 (checked), each y_i m·n_i;
    // every weight passed `fits` for the tensor-core kernels (n % 16 == 0, k % 64 == 0, blocksize
    // a multiple of 64, n·k < 2^32) and lives on this stream's device; the LoRA tables were
    // written earlier on this stream for m rows (checked against the plan), and the shrink output
    // too unless the counters are set, in which case the launch writes it (each plan's counters
    // are used by one launch at a time: its launches are ordered on this stream).
    unsafe { b.launch(cfg) }.w()?;
    drop(guards);
    Ok(ys)
}

/// The in-launch shrink's values per k chunk (`QLORAD_SHRINK_CHUNK`, a multiple of 8 from 256 to
/// 8192; read once per process): each chunk is one claimable unit of a LoRA warp; at most
/// TC_SHRINK_CHUNKS chunks per dot (cuda/nf4_tc.cuh, with the H200 sweep behind the default).
fn shrink_chunk() -> u32 {
    static CHUNK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        crate::switch::env_number::<u32>("QLORAD_SHRINK_CHUNK")
            .map_or(SHRINK_CHUNK_DEFAULT, |c| c.clamp(256, 8192) & !7)
    })
}

/// TC_SHRINK_CHUNK of cuda/nf4_tc.cuh.
const SHRINK_CHUNK_DEFAULT: u32 = 8192;

// The C layouts of cuda/nf4_tc.cuh.
const _: () = assert!(std::mem::size_of::<TcWeight>() == 88);
const _: () = assert!(std::mem::size_of::<TcGroup>() == 312);
