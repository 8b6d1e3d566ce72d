//! The optimizer's per-step work over all trainable tensors in few launches: the squared gradient
//! norm (for clipping) and AdamW with the clip coefficient folded in.
//!
//! r = 64 on the 7 projections of a 7B model is 448 tensors; one launch each, plus a scaling pass
//! per tensor for the clip, cost ~7.5 ms of a step (issue 6's profile) where the bytes take ~1 ms.
//! As apex's `multi_tensor_apply` (and torch's `_foreach` optimizers), one grid covers many
//! tensors: each is cut into chunks, one block per chunk, and a segment table in device memory
//! tells a block its tensor (kernels `sumsq_multi_f32`, `adamw_multi_f32` in `cuda/train.cu`).

use crate::mapped_cuda::MappedF32;
use crate::train_cuda::{cuda_of, func, msg, tensor_addr, AdamWStep};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Tensor};

/// Values per block; must match MT_CHUNK in cuda/train.cu.
const CHUNK: u64 = 8192;
const THREADS: u32 = 256;
/// u64 words per segment (struct MtSeg: four addresses, length, first block).
pub(crate) const SEG_WORDS: usize = 6;

/// One tensor of a multi-tensor launch: up to four device addresses and its length.
pub(crate) type Seg = ([u64; 4], u64);

/// Segment table of `segs` (empty ones skipped), cut into groups of at least `group_elems` values
/// (the last may be smaller); each group's first blocks count from 0.
pub(crate) struct Table {
    pub(crate) words: Vec<u64>,
    /// (first segment, segments, blocks) per group.
    pub(crate) groups: Vec<(usize, u32, u32)>,
}

fn table(segs: &[Seg], group_elems: u64) -> candle_core::Result<Table> {
    let mut groups: Vec<Vec<Seg>> = vec![Vec::new()];
    let mut elems = 0u64;
    for &(ptrs, n) in segs.iter().filter(|(_, n)| *n > 0) {
        if elems >= group_elems {
            groups.push(Vec::new());
            elems = 0;
        }
        if let Some(g) = groups.last_mut() {
            g.push((ptrs, n));
        }
        elems += n;
    }
    table_of_groups(&groups)
}

/// Segment table with one launch group per non-empty entry of `groups` (empty segments skipped),
/// in order; each group's first blocks count from 0.
pub(crate) fn table_of_groups(groups: &[Vec<Seg>]) -> candle_core::Result<Table> {
    let mut words = Vec::new();
    let mut out = Vec::with_capacity(groups.len());
    let mut first = 0usize;
    for g in groups {
        let (mut count, mut blocks) = (0u32, 0u64);
        for (ptrs, n) in g.iter().filter(|(_, n)| *n > 0) {
            words.extend_from_slice(ptrs);
            words.extend_from_slice(&[*n, blocks]);
            blocks += n.div_ceil(CHUNK);
            count += 1;
            if blocks > i32::MAX as u64 {
                return Err(msg(format!("multi-tensor launch: {blocks} blocks")));
            }
        }
        if count > 0 {
            out.push((first, count, blocks as u32));
            first += count as usize;
        }
    }
    Ok(Table { words, groups: out })
}

fn launch_config(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Σ x² over every value of `ts` (f32 tensors on one GPU): one launch, block partial sums in f32
/// added in f64 on the host in a fixed order, so the result is deterministic.
pub fn sum_squares(ts: &[Tensor]) -> candle_core::Result<f64> {
    let Some(first) = ts.first() else {
        return Ok(0.0);
    };
    let dev = cuda_of(first)?;
    let ts: Vec<Tensor> = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let segs = ts
        .iter()
        .map(|t| {
            let a = tensor_addr("sumsq", t, &dev, DType::F32)?;
            Ok(([a, 0, 0, 0], t.elem_count() as u64))
        })
        .collect::<candle_core::Result<Vec<Seg>>>()?;
    let tab = table(&segs, u64::MAX)?;
    let Some(&(_, count, blocks)) = tab.groups.first() else {
        return Ok(0.0);
    };
    let stream = dev.cuda_stream();
    let seg_buf = stream.clone_htod(&tab.words).w()?;
    // SAFETY: the kernel writes every one of the `blocks` partials.
    let mut partial = unsafe { stream.alloc::<f32>(blocks as usize) }.w()?;
    let f = func(&dev, "sumsq_multi_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&seg_buf).arg(&count).arg(&mut partial);
    // SAFETY: argument order and types match sumsq_multi_f32; each segment addresses n f32 of a
    // live contiguous tensor (`ts` outlives the launch: frees are stream-ordered).
    unsafe { b.launch(launch_config(blocks)) }.w()?;
    let host = stream.clone_dtoh(&partial).w()?;
    Ok(host.iter().map(|&s| s as f64).sum())
}

/// Where AdamW's moments live for [`adamw_update`].
pub enum Moments<'a> {
    /// f32 tensors on the parameters' GPU, one pair per parameter, updated in place.
    Device(&'a [Tensor], &'a [Tensor]),
    /// Mapped page-locked host memory ([`MappedF32`]), read and written over the host link.
    Mapped(&'a mut [MappedF32], &'a mut [MappedF32]),
}

/// One AdamW update of every parameter `ps[i]` (f32, contiguous) from `grad_scale · gs[i]`, in
/// place, in launches of at least `group_elems` values each with `between` called between two
/// launches (a preemption point for serving: a paged update streams its moments over the host link
/// for tens of milliseconds).
pub fn adamw_update(
    ps: &[&Tensor],
    gs: &[Tensor],
    moments: Moments<'_>,
    s: AdamWStep,
    grad_scale: f32,
    group_elems: usize,
    between: &dyn Fn(),
) -> candle_core::Result<()> {
    let Some(first) = ps.first() else {
        return Ok(());
    };
    let dev = cuda_of(first)?;
    if gs.len() != ps.len() {
        return Err(msg(format!(
            "adamw: {} parameters, {} gradients",
            ps.len(),
            gs.len()
        )));
    }
    let gs: Vec<Tensor> = gs
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let addr = |t: &Tensor| tensor_addr("adamw", t, &dev, DType::F32);
    let mut segs = Vec::with_capacity(ps.len());
    for (i, (p, g)) in ps.iter().zip(&gs).enumerate() {
        let n = p.elem_count();
        let (ma, va, mn, vn) = match &moments {
            Moments::Device(m, v) => {
                let (Some(mt), Some(vt)) = (m.get(i), v.get(i)) else {
                    return Err(msg("adamw: fewer moments than parameters".into()));
                };
                (addr(mt)?, addr(vt)?, mt.elem_count(), vt.elem_count())
            }
            Moments::Mapped(m, v) => {
                let (Some(mt), Some(vt)) = (m.get(i), v.get(i)) else {
                    return Err(msg("adamw: fewer moments than parameters".into()));
                };
                if !mt.is_for(&dev) || !vt.is_for(&dev) {
                    return Err(msg("adamw (mapped): state mapped for another GPU".into()));
                }
                (mt.dptr(), vt.dptr(), mt.len(), vt.len())
            }
        };
        if g.elem_count() != n || mn != n || vn != n {
            return Err(msg(format!(
                "adamw: parameter {i} {:?}, gradient {:?}, moments {mn} / {vn}",
                p.dims(),
                g.dims()
            )));
        }
        segs.push(([addr(p)?, addr(g)?, ma, va], n as u64));
    }
    let tab = table(&segs, group_elems.max(1) as u64)?;
    let stream = dev.cuda_stream();
    let seg_buf = stream.clone_htod(&tab.words).w()?;
    let base = seg_buf.device_ptr(&stream).0;
    for (gi, &group) in tab.groups.iter().enumerate() {
        if gi > 0 {
            between();
        }
        // SAFETY: seg_buf holds the table (alive until after the launches: frees are
        // stream-ordered); each segment addresses n f32 of p, g, m and v on (or mapped for) this
        // device, checked above.
        unsafe { launch_adamw(&dev, base, group, s, grad_scale) }?;
    }
    drop(seg_buf);
    Ok(())
}

/// Launches `adamw_multi_f32` on `dev`'s stream over one group of a segment table uploaded at
/// device address `table`.
///
/// # Safety
/// `table` must hold the group's segments until the launch has run, each addressing n f32 of
/// p, g, m and v that the device can read and write. Writing p, m and v in place is what the
/// optimizer means (as candle's Var::set does).
pub(crate) unsafe fn launch_adamw(
    dev: &CudaDevice,
    table: u64,
    (first_seg, count, blocks): (usize, u32, u32),
    s: AdamWStep,
    grad_scale: f32,
) -> candle_core::Result<()> {
    let f = func(dev, "adamw_multi_f32")?;
    let segs_ptr = table + (first_seg * SEG_WORDS * 8) as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&segs_ptr).arg(&count).arg(&grad_scale);
    s.push_args(&mut b);
    // SAFETY: argument order and types match adamw_multi_f32; the rest is the caller's.
    unsafe { b.launch(launch_config(blocks)) }.w()?;
    Ok(())
}
