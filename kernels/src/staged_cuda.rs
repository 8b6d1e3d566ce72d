//! Paged AdamW moments streamed through the GPU by its copy engines, with each group's update
//! deferred to just before its parameters are next read.
//!
//! The moments (2 × f32 per trainable value: 1.3 GB for r = 64 on a 7B model) live in page-locked
//! host memory. The mapped variant (mapped_cuda.rs) lets the update kernel read and write them
//! across the host link in place: ~33 ms of a ~230 ms checkpointed step on the H200 during which
//! the GPU does nothing else. Here a group's moments (one decoder layer's LoRA tensors) are copied
//! into a device slot by one DMA, updated there at memory speed, and copied back by another DMA
//! on a second copy stream, with K slots in flight. The update of step n is applied in step n+1's
//! forward, just before the layer that reads the group ([`StagedAdamW::apply_through`]), so the
//! transfers run under the forward's compute: the idea of ZeRO-Offload's overlapped CPU optimizer
//! (Ren et al., 2021) and of the prefetching in bitsandbytes' paged optimizers, with the update
//! itself kept on the GPU. The arithmetic is the multi-tensor `adamw_multi_f32` on the
//! compute stream, so results are bit-identical to resident moments.
//!
//! Streams: the two copy streams are created non-blocking with the driver directly (not through
//! cudarc's `new_stream`, which would switch the whole context to per-launch event tracking);
//! ordering between them and the compute stream is by explicit events, per slot: `loaded`
//! (host→slot done), `updated` (kernel done), `stored` (slot→host done, slot free).

use crate::multi_tensor_cuda::{launch_adamw, table_of_groups, Seg};
use crate::train_cuda::{msg, tensor_addr, AdamWStep};
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaSlice, DevicePtr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Shape, Tensor};
use std::sync::{Mutex, PoisonError};

/// Device slots (groups in flight).
const SLOTS: usize = 3;

const WAIT: sys::CUevent_wait_flags = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;

/// First and second moments, one vector per parameter.
pub type HostMoments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// AdamW moments of parameter groups in page-locked host memory, staged through device slots.
pub struct StagedAdamW {
    dev: CudaDevice,
    /// Parameter indices per group, in the order groups are applied.
    groups: Vec<Vec<usize>>,
    /// Values per parameter, and its shape.
    lens: Vec<usize>,
    shapes: Vec<Shape>,
    /// Per group: m of its parameters back to back, then v likewise (the slot's layout).
    host: Vec<PinnedHostSlice<f32>>,
    /// Offset of each parameter inside its group's m (and v) half.
    offsets: Vec<usize>,
    slots: Vec<CudaSlice<f32>>,
    /// f32 per half-slot (the largest group).
    slot_half: usize,
    h2d: RawStream,
    d2h: RawStream,
    /// Per slot: [loaded, updated, stored].
    events: Vec<[RawEvent; 3]>,
    pending: Mutex<Option<Pending>>,
}

/// An update scheduled by [`StagedAdamW::defer`] and not yet applied to every group.
struct Pending {
    /// Parameters and gradients (contiguous), kept alive until their group's kernel has run.
    _params: Vec<Tensor>,
    _grads: Vec<Tensor>,
    /// Segment table, one launch group per staged group (its m and v addresses in the slot).
    table: CudaSlice<u64>,
    launches: Vec<(usize, u32, u32)>,
    step: AdamWStep,
    grad_scale: f32,
    /// Next group to apply.
    next: usize,
}

impl StagedAdamW {
    /// Moments for parameters of `shapes` on `dev`, initialised from `m` and `v` (one vector per
    /// parameter), applied in `groups` (parameter indices; every parameter in exactly one).
    pub fn new(
        dev: &CudaDevice,
        groups: Vec<Vec<usize>>,
        shapes: Vec<Shape>,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
    ) -> candle_core::Result<Self> {
        let lens: Vec<usize> = shapes.iter().map(|s| s.elem_count()).collect();
        let mut seen = vec![false; lens.len()];
        for &i in groups.iter().flatten() {
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(msg(format!(
                        "staged adamw: parameter {i} grouped twice or unknown"
                    )))
                }
            }
        }
        if seen.iter().any(|s| !s) || m.len() != lens.len() || v.len() != lens.len() {
            return Err(msg(
                "staged adamw: every parameter needs a group and moments".into(),
            ));
        }
        let ctx = dev.cuda_stream().context().clone();
        let mut offsets = vec![0usize; lens.len()];
        let mut host = Vec::with_capacity(groups.len());
        let mut slot_half = 1usize;
        for g in &groups {
            let half: usize = g.iter().map(|&i| lens[i]).sum();
            slot_half = slot_half.max(half);
            // SAFETY: every value is written below before any use.
            let mut buf = unsafe {
                ctx.alloc_pinned_with_flags::<f32>((2 * half).max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
            }
            .w()?;
            let vals = buf.as_mut_slice().w()?;
            let mut off = 0;
            for &i in g {
                if m[i].len() != lens[i] || v[i].len() != lens[i] {
                    return Err(msg(format!("staged adamw: moments of parameter {i}")));
                }
                vals[off..off + lens[i]].copy_from_slice(&m[i]);
                vals[half + off..half + off + lens[i]].copy_from_slice(&v[i]);
                offsets[i] = off;
                off += lens[i];
            }
            host.push(buf);
        }
        let stream = dev.cuda_stream();
        let slots = (0..SLOTS)
            .map(|_| stream.alloc_zeros::<f32>(2 * slot_half))
            .collect::<Result<Vec<_>, _>>()
            .w()?;
        // The slots' zero fill runs on the compute stream; the copy streams must not race it.
        stream.synchronize().w()?;
        ctx.bind_to_thread().w()?;
        let events = (0..SLOTS)
            .map(|_| Ok([RawEvent::new()?, RawEvent::new()?, RawEvent::new()?]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            dev: dev.clone(),
            groups,
            lens,
            shapes,
            host,
            offsets,
            slots,
            slot_half,
            h2d: RawStream::new()?,
            d2h: RawStream::new()?,
            events,
            pending: Mutex::new(None),
        })
    }

    /// Parameter shapes, in parameter order.
    pub fn shapes(&self) -> &[Shape] {
        &self.shapes
    }

    /// Device memory held (the slots).
    pub fn device_bytes(&self) -> usize {
        SLOTS * 2 * self.slot_half * 4
    }

    /// Page-locked host memory held (the moments).
    pub fn host_bytes(&self) -> usize {
        self.lens.iter().sum::<usize>() * 2 * 4
    }

    fn half(&self, g: usize) -> usize {
        self.groups[g].iter().map(|&i| self.lens[i]).sum()
    }

    /// Schedules one update of every parameter `ps[i]` (f32, contiguous, on this GPU) from
    /// `grad_scale · gs[i]`; it is applied group by group by [`Self::apply_through`] (or all at
    /// once by [`Self::flush`]). An update still pending is applied first. The first groups'
    /// moments start moving in now.
    pub fn defer(
        &self,
        ps: &[&Tensor],
        gs: &[Tensor],
        step: AdamWStep,
        grad_scale: f32,
    ) -> candle_core::Result<()> {
        self.flush()?;
        self.dev.cuda_stream().context().bind_to_thread().w()?;
        if ps.len() != self.lens.len() || gs.len() != ps.len() {
            return Err(msg(format!(
                "staged adamw: {} parameters, {} gradients, {} moments",
                ps.len(),
                gs.len(),
                self.lens.len()
            )));
        }
        let grads: Vec<Tensor> = gs
            .iter()
            .map(|t| t.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let mut segs: Vec<Vec<Seg>> = Vec::with_capacity(self.groups.len());
        for (gi, g) in self.groups.iter().enumerate() {
            let slot = self.slots[gi % SLOTS]
                .device_ptr(self.dev.cuda_stream().as_ref())
                .0;
            let half = self.half(gi) as u64;
            let mut gsegs = Vec::with_capacity(g.len());
            for &i in g {
                let (p, gr) = (ps[i], &grads[i]);
                if p.elem_count() != self.lens[i] || gr.elem_count() != self.lens[i] {
                    return Err(msg(format!(
                        "staged adamw: parameter {i} {:?}, gradient {:?}, moments {}",
                        p.dims(),
                        gr.dims(),
                        self.lens[i]
                    )));
                }
                let at = |t: &Tensor| tensor_addr("staged adamw", t, &self.dev, DType::F32);
                let off = self.offsets[i] as u64;
                gsegs.push((
                    [at(p)?, at(gr)?, slot + 4 * off, slot + 4 * (half + off)],
                    self.lens[i] as u64,
                ));
            }
            segs.push(gsegs);
        }
        let tab = table_of_groups(&segs)?;
        if tab.groups.len() != self.groups.len() {
            return Err(msg("staged adamw: an empty parameter group".into()));
        }
        let table = self.dev.cuda_stream().clone_htod(&tab.words).w()?;
        for gi in 0..SLOTS.min(self.groups.len()) {
            self.load(gi)?;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        *pending = Some(Pending {
            _params: ps.iter().map(|&p| p.clone()).collect(),
            _grads: grads,
            table,
            launches: tab.groups,
            step,
            grad_scale,
            next: 0,
        });
        Ok(())
    }

    /// Queues group `gi`'s moments into its slot once the slot's previous group is stored.
    fn load(&self, gi: usize) -> candle_core::Result<()> {
        let s = gi % SLOTS;
        let [loaded, _, stored] = &self.events[s];
        let bytes = 2 * self.half(gi);
        let dst = self.slots[s].device_ptr(self.dev.cuda_stream().as_ref()).0;
        let src = self.host[gi].as_ptr().w()?;
        // SAFETY: streams and events are live (owned by self); the slot holds 2·slot_half ≥ bytes
        // f32 and the host buffer at least `bytes`; both outlive the copy (Drop synchronizes the
        // copy streams before freeing either). The host values are final: the copy stream waits
        // for the slot's last store, and stores run in order on one stream.
        unsafe {
            result::stream::wait_event(self.h2d.0, stored.0, WAIT).w()?;
            sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), bytes * 4, self.h2d.0)
                .result()
                .w()?;
            result::event::record(loaded.0, self.h2d.0).w()?;
        }
        Ok(())
    }

    /// Applies the pending update to every group up to and including `last` (an index into
    /// [`Self::groups`]; past the end: all of them) on the compute stream, in order.
    pub fn apply_through(&self, last: usize) -> candle_core::Result<()> {
        let mut guard = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = guard.as_mut() else {
            return Ok(());
        };
        self.dev.cuda_stream().context().bind_to_thread().w()?;
        let main = self.dev.cuda_stream().cu_stream();
        let table = p.table.device_ptr(self.dev.cuda_stream().as_ref()).0;
        let n = self.groups.len();
        while p.next < n && p.next <= last {
            let gi = p.next;
            let s = gi % SLOTS;
            let [loaded, updated, stored] = &self.events[s];
            let bytes = 2 * self.half(gi);
            let src = self.slots[s].device_ptr(self.dev.cuda_stream().as_ref()).0;
            // SAFETY: as in `load`; the kernel's segments address the slot (filled once
            // `loaded` fires), the pending gradients and the live parameters; the table and
            // gradients stay alive in `p` until every group has run (frees are stream-ordered on
            // the compute stream after the kernels).
            let dst = self.host[gi].as_ptr().w()?.cast_mut();
            unsafe {
                result::stream::wait_event(main, loaded.0, WAIT).w()?;
                launch_adamw(&self.dev, table, p.launches[gi], p.step, p.grad_scale)?;
                result::event::record(updated.0, main).w()?;
                result::stream::wait_event(self.d2h.0, updated.0, WAIT).w()?;
                sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, bytes * 4, self.d2h.0)
                    .result()
                    .w()?;
                result::event::record(stored.0, self.d2h.0).w()?;
            }
            p.next += 1;
            if gi + SLOTS < n {
                self.load(gi + SLOTS)?;
            }
        }
        if p.next >= n {
            // Gradients and table are freed on the compute stream, after the kernels.
            *guard = None;
        }
        Ok(())
    }

    /// Applies whatever is pending.
    pub fn flush(&self) -> candle_core::Result<()> {
        self.apply_through(usize::MAX)
    }

    /// The moments (m, v) per parameter, after applying what is pending and waiting for the
    /// copies home.
    pub fn moments(&self) -> candle_core::Result<HostMoments> {
        self.flush()?;
        self.sync()?;
        let mut m = vec![Vec::new(); self.lens.len()];
        let mut v = vec![Vec::new(); self.lens.len()];
        for (gi, g) in self.groups.iter().enumerate() {
            let half = self.half(gi);
            let vals = self.host[gi].as_slice().w()?;
            for &i in g {
                let (o, n) = (self.offsets[i], self.lens[i]);
                m[i] = vals[o..o + n].to_vec();
                v[i] = vals[half + o..half + o + n].to_vec();
            }
        }
        Ok((m, v))
    }

    /// Waits for both copy streams.
    fn sync(&self) -> candle_core::Result<()> {
        self.dev.cuda_stream().context().bind_to_thread().w()?;
        // SAFETY: the streams are live (owned by self).
        unsafe {
            result::stream::synchronize(self.h2d.0).w()?;
            result::stream::synchronize(self.d2h.0).w()?;
        }
        Ok(())
    }
}

impl Drop for StagedAdamW {
    fn drop(&mut self) {
        // The copy streams may still read or write the slots and host buffers freed next.
        let _ = self.sync();
    }
}

/// A non-blocking stream of the current context, destroyed on drop.
struct RawStream(sys::CUstream);

impl RawStream {
    fn new() -> candle_core::Result<Self> {
        Ok(Self(
            result::stream::create(result::stream::StreamKind::NonBlocking).w()?,
        ))
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once; pending work still completes (CUDA's rule).
        let _ = unsafe { result::stream::destroy(self.0) };
    }
}

/// An event without timing, destroyed on drop.
struct RawEvent(sys::CUevent);

impl RawEvent {
    fn new() -> candle_core::Result<Self> {
        Ok(Self(
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).w()?,
        ))
    }
}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

// SAFETY: CUDA streams and events are usable from any thread of the process once their context
// is current (every use above goes through the device's context, bound by the caller's candle
// ops or by `sync`); the pending state is behind a mutex.
unsafe impl Send for RawStream {}
unsafe impl Sync for RawStream {}
unsafe impl Send for RawEvent {}
unsafe impl Sync for RawEvent {}
