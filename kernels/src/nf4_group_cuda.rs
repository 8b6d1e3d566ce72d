//! Decode projections that read the same input (q/k/v, gate/up) in one tensor-core GEMV launch
//! (`nf4_gemv_tcg*` of cuda/nf4_tc.cuh): the grid is the concatenation of the weights' 16-feature
//! tiles. On their own the k and v projections of Mistral-7B (1024 × 4096) fill 64 blocks, half the
//! H200's multiprocessors, and each launch pays its own ramp-up and tail.

use crate::bgmv::GemvLora;
use crate::cuda::{GemvKernel, GroupKernel, Nf4Gpu, GEMV_MAX_ROWS};
use crate::nf4_op::Nf4Weight;
use crate::switch::EnvSwitch;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Storage, Tensor};
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
}

// SAFETY: plain data with the C layout of the kernel's parameter (repr(C), no padding the kernel
// reads, no host pointers).
unsafe impl DeviceRepr for TcGroup {}

/// Mirrors `T4Norm` of cuda/nf4_t4.cuh (passed by value after the group).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct T4Norm {
    y: u64,
    w: u64,
    sum: u64,
    eps: f32,
    _pad: u32,
}

// SAFETY: as TcGroup's.
unsafe impl DeviceRepr for T4Norm {}

/// Values (rows · k) the norm-in-the-GEMV kernel's shared copy holds (T4N_MAX_VALUES).
const T4N_MAX_VALUES: usize = 4096;
/// The 16-byte chunks per row decode.cu's vectorized add_rms_norm takes (NORM_VEC ·
/// NORM_THREADS), whose order of summation the kernel repeats.
const T4N_MAX_CHUNKS: usize = 1024;

static NORM_GEMV: EnvSwitch = EnvSwitch::new("QLORAD_NORM_GEMV");

/// Whether decode's base q/k/v and gate/up GEMVs compute the residual add + RMSNorm of their input
/// in their own launch ([`nf4_linear_group_norm`]; `QLORAD_NORM_GEMV=1`, opt-in until measured).
pub fn norm_gemv() -> bool {
    NORM_GEMV.on()
}

/// Switches [`norm_gemv`] on or off for the process (gpu-check runs both).
pub fn set_norm_gemv(on: bool) {
    NORM_GEMV.set(on);
}

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
    let ys = launch(&gpus, &xv, m, loras, None)?;
    drop(storage);
    Ok(Some(wrap_outputs(ys, &gpus, m)))
}

fn wrap_outputs(ys: Vec<CudaSlice<bf16>>, gpus: &[&Nf4Gpu], m: usize) -> Vec<Tensor> {
    ys.into_iter()
        .zip(gpus)
        .map(|(y, g)| wrap(y, g, (m, g.shape().0)))
        .collect()
}

fn wrap(y: CudaSlice<bf16>, g: &Nf4Gpu, shape: (usize, usize)) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(y, g.device().clone())),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// A bf16 tensor's contiguous view on `dev`'s device, 16-byte aligned, with `len` values: its
/// storage guard and (start, end) element offsets; `None` otherwise.
fn aligned_bf16<'a>(
    t: &'a Tensor,
    len: usize,
    dev: &Nf4Gpu,
) -> Option<(std::sync::RwLockReadGuard<'a, Storage>, usize, usize)> {
    if t.dtype() != candle_core::DType::BF16 || t.elem_count() != len {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets()?;
    match &*storage {
        // Allocations are 256-byte aligned: the element offset decides the 16-byte alignment.
        Storage::Cuda(cs) if cs.device.id() == dev.device().id() && a % 8 == 0 => {}
        _ => return None,
    }
    Some((storage, a, b))
}

/// Elements `a..b` of a bf16 GPU storage.
fn view(s: &Storage, a: usize, b: usize) -> candle_core::Result<CudaView<'_, bf16>> {
    match s {
        Storage::Cuda(cs) => Ok(cs.as_cuda_slice::<bf16>()?.slice(a..b)),
        _ => Err(msg("grouped gemv with norm: not on a GPU".into())),
    }
}

/// `(x + y, [rmsnorm(x + y) · w · W_iᵀ])`: the residual add and RMSNorm of decode.cu's
/// add_rms_norm (bit for bit, its vectorized path) computed by every block of the grouped base
/// GEMV of the weights (`nf4_gemv_t4gn`, cuda/nf4_t4.cuh) instead of a launch of its own, so the
/// normed rows never leave the blocks. `y` None: the norm of x, and x itself as the sum. `None`
/// when the launch does not take these (t4 weights only, 1..=4 rows, rows · k within the kernel's
/// shared copy, contiguous 16-byte-aligned bf16 on the weights' device): then the caller runs the
/// norm and the GEMV as two launches.
pub fn nf4_linear_group_norm(
    x: &Tensor,
    y: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    weights: &[&Arc<Nf4Weight>],
) -> candle_core::Result<Option<(Tensor, Vec<Tensor>)>> {
    let Some(gpus) = weights
        .iter()
        .map(|w| w.gpu().filter(|g| g.gemv_kernel() == GemvKernel::T4))
        .collect::<Option<Vec<&Nf4Gpu>>>()
    else {
        return Ok(None);
    };
    if gpus.is_empty() || gpus.len() > GROUP_MAX {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let g0 = gpus[0];
    if !(1..=4).contains(&m)
        || m * k > T4N_MAX_VALUES
        || !k.is_multiple_of(8)
        || k / 8 > T4N_MAX_CHUNKS
        || w.dims() != [k]
        || y.is_some_and(|y| y.dims() != [m, k])
        || gpus
            .iter()
            .any(|g| g.shape().1 != k || g.device().id() != g0.device().id())
    {
        return Ok(None);
    }
    let Some((xs, xa, xb)) = aligned_bf16(x, m * k, g0) else {
        return Ok(None);
    };
    let Some((ws, wa, wb)) = aligned_bf16(w, k, g0) else {
        return Ok(None);
    };
    let ys = match y {
        Some(y) => match aligned_bf16(y, m * k, g0) {
            Some(v) => Some(v),
            None => return Ok(None),
        },
        None => None,
    };
    let stream = g0.stream();
    let xv = view(&xs, xa, xb)?;
    let wv = view(&ws, wa, wb)?;
    let yv = match &ys {
        Some((s, a, b)) => Some(view(s, *a, *b)?),
        None => None,
    };
    // SAFETY: block 0 of the launch writes every element (all m rows of k).
    let mut sum = unsafe { g0.device().alloc::<bf16>(m * k) }?;
    let (wp, _wg) = wv.device_ptr(stream);
    let yg = yv.as_ref().map(|v| v.device_ptr(stream));
    let (sp, sg) = sum.device_ptr_mut(stream);
    let norm = T4Norm {
        y: yg.as_ref().map_or(0, |(p, _)| *p),
        w: wp,
        sum: sp,
        eps,
        _pad: 0,
    };
    let outs = launch(&gpus, &xv, m, None, Some(&norm))?;
    drop((sg, yg, _wg));
    drop((xs, ws, ys));
    Ok(Some((wrap(sum, g0, (m, k)), wrap_outputs(outs, &gpus, m))))
}

fn launch(
    gpus: &[&Nf4Gpu],
    x: &CudaView<'_, bf16>,
    m: usize,
    loras: Option<&[GemvLora]>,
    norm: Option<&T4Norm>,
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
        grp.counters = ls[0].counters;
        grp.max_rank = ls[0].max_rank;
        grp.part_stride = ls[0].part_stride;
        grp.parts = ls[0].parts.max(1);
    }
    let kind = match loras {
        None if norm.is_some() => GroupKernel::BaseNorm,
        None if persistent(gpus, m, k) => GroupKernel::BasePersistent,
        None => GroupKernel::Base,
        Some(ls) if all_warps_epilogue(g0, m, &ls[0]) => GroupKernel::LoraAllWarps,
        Some(_) => GroupKernel::Lora,
    };
    let func = g0.group_function(m, kind)?;
    let warps = g0.group_warps(kind);
    let grid = match kind {
        GroupKernel::BasePersistent => tiles.min(g0.persistent_grid()?),
        _ => tiles,
    };
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    };
    let nm = norm.copied().unwrap_or_default();
    if let Some(f) = g0.group_function_pdl(m, kind)? {
        let (xp, xg) = x.device_ptr(stream);
        let mut args = [
            crate::pdl_cuda::arg(&xp),
            crate::pdl_cuda::arg(&grp),
            crate::pdl_cuda::arg(&nm),
        ];
        let n = if norm.is_some() { 3 } else { 2 };
        // SAFETY: as the launch below (same kernel, same arguments: x's address, TcGroup by value
        // and, for the norm kernel only, T4Norm by value); every block of the kernel calls
        // pdl_wait before it reads x, y, the LoRA tables or the counters and before it writes y,
        // t or the sum.
        unsafe { crate::pdl_cuda::launch(f, cfg, stream, &mut args[..n]) }?;
        drop(xg);
        drop(guards);
        return Ok(ys);
    }
    let mut b = stream.launch_builder(func);
    b.arg(x).arg(&grp);
    if norm.is_some() {
        b.arg(&nm);
    }
    // SAFETY: the kernel takes (x, TcGroup by value); x holds m·k bf16 (checked), each y_i m·n_i;
    // every weight passed `fits` for the tensor-core kernels (n % 16 == 0, k % 64 == 0, blocksize
    // a multiple of 64, n·k < 2^32) and lives on this stream's device; with a norm (t4
    // weights, 1..=4 rows, m·k within T4N_MAX_VALUES: nf4_linear_group_norm checked), y holds
    // m·k and w k bf16 (or y is null) and the sum m·k; the LoRA tables were
    // written earlier on this stream for m rows (checked against the plan), and the shrink output
    // too unless the counters are set, in which case the launch writes it (each plan's counters
    // are used by one launch at a time: its launches are ordered on this stream).
    unsafe { b.launch(cfg) }.w()?;
    drop(guards);
    Ok(ys)
}

/// Whether a grouped base launch takes the persistent kernel (`GroupKernel::BasePersistent`,
/// cuda/nf4_t4p.cuh): t4 weights, 1..=4 rows, k >= 1024 (every warp streams at least one
/// super-block per tile), one set of code tables for the group (a block fills one), and the
/// kernel switched on ([`set_persistent`], or `QLORAD_T4_PERSIST=1` for a process). Off by
/// default: on the H200 it decoded ~3 % slower than one tile per block (BENCHMARKS.md, session 15).
fn persistent(gpus: &[&Nf4Gpu], m: usize, k: usize) -> bool {
    persistent_on()
        && gpus[0].gemv_kernel() == GemvKernel::T4
        && (1..=4).contains(&m)
        && k >= 1024
        && gpus.iter().all(|g| g.tables_id() == gpus[0].tables_id())
}

static PERSIST: EnvSwitch = EnvSwitch::new("QLORAD_T4_PERSIST");

fn persistent_on() -> bool {
    PERSIST.on()
}

/// Switches the persistent grouped base GEMV on or off for the process (gpu-check runs both).
pub fn set_persistent(on: bool) {
    PERSIST.set(on);
}

/// The ranks, summed over the input rows, that the all-warps epilogue stages (T4E_RANKS in
/// cuda/nf4_t4.cuh).
const T4E_RANKS: u32 = 256;

static ALL_WARPS: crate::switch::EnvSwitch = crate::switch::EnvSwitch::new("QLORAD_LORA_ALL_WARPS");

/// Whether the all-warps epilogue is on for the process (see [`all_warps_epilogue`]).
pub fn all_warps() -> bool {
    ALL_WARPS.on()
}

/// Switches the all-warps epilogue on or off for the process (gpu-check runs both).
pub fn set_all_warps(on: bool) {
    ALL_WARPS.set(on);
}

/// Whether a grouped LoRA launch takes the all-warps epilogue (`GroupKernel::LoraAllWarps`): t4
/// weights, 1..=4 rows, the shrink finished before the launch (no counters), every row's rank
/// within the staging, and `QLORAD_LORA_ALL_WARPS=1` (or [`set_all_warps`]). Opt-in since session
/// 20: with decode steps replayed as graphs, the LoRA-warp epilogue decodes one r=64 adapter
/// ~3.5 % faster (same call: 341.7 / 339.7 against 325.5 / 330.3 tok/s; BENCHMARKS.md).
fn all_warps_epilogue(g: &Nf4Gpu, m: usize, l: &GemvLora) -> bool {
    ALL_WARPS.on()
        && g.gemv_kernel() == GemvKernel::T4
        && (1..=4).contains(&m)
        && l.counters == 0
        && (m as u32) * l.max_rank <= T4E_RANKS
}

// The C layouts of cuda/nf4_tc.cuh.
const _: () = assert!(std::mem::size_of::<TcWeight>() == 88);
const _: () = assert!(std::mem::size_of::<TcGroup>() == 312);
