//! Host → GPU uploads of large buffers (adapter hot-load) through a pinned staging ring on a copy
//! stream of its own (behind the `cuda` feature).
//!
//! A copy from pageable memory is staged by the driver through its own small pinned buffers and
//! holds the calling stream: 336 MB (a rank-64 adapter of a 7B model in bf16) took ~100 ms that way,
//! and every decode step queued behind it. Here the buffer goes in chunks through two pinned slots
//! per device: while the DMA engine copies one slot, the host threads fill the other (a parallel
//! memcpy), so the upload runs near the PCIe rate, and the copies run on a separate non-blocking
//! stream, so serving kernels on the device's stream keep running during a hot-load (the same
//! double-buffered staging as PyTorch's pinned-memory loaders and vLLM's LoRA CPU→GPU swaps).
//!
//! The destination is allocated on the device's stream (where every later use and the free happen:
//! qlorad keeps all compute on that one stream with cudarc's event tracking off); the copy stream
//! waits for the allocation, and the host waits for the last copy before the buffer is handed out,
//! so the device's stream never needs to wait for the copy stream.

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Shape, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::sync::{Arc, Mutex, OnceLock};

/// Elements (bf16) per staging slot: 16 MB, large enough that each DMA runs at full rate, small
/// enough that the first copy starts early.
const SLOT: usize = 8 << 20;
/// Elements each host thread copies into a slot at a time.
const PIECE: usize = 256 << 10;

struct Ring {
    copy: Arc<CudaStream>,
    slots: Vec<(PinnedHostSlice<bf16>, CudaEvent)>,
}

/// The rings by device ordinal.
type Rings = Mutex<Vec<(usize, Arc<Mutex<Ring>>)>>;

/// One ring per device ordinal, made on the first upload to it (32 MB of pinned memory, ~11 ms).
fn ring(dev: &CudaDevice) -> candle_core::Result<Arc<Mutex<Ring>>> {
    static RINGS: OnceLock<Rings> = OnceLock::new();
    let rings = RINGS.get_or_init(|| Mutex::new(Vec::new()));
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let ordinal = ctx.ordinal();
    let mut rings = rings
        .lock()
        .map_err(|_| candle_core::Error::Msg("upload: ring registry poisoned".into()))?;
    if let Some((_, r)) = rings.iter().find(|(o, _)| *o == ordinal) {
        return Ok(r.clone());
    }
    let copy = ctx.new_stream().w()?;
    let mut slots = Vec::with_capacity(2);
    for _ in 0..2 {
        // Cached, not write-combined: fills may write a slot in pieces, out of order (the DMA
        // rate from either kind was the same, 55 GB/s on the H200's host: hot-load-probe).
        // SAFETY: the slot is written before any of it is copied (only its filled prefix is).
        let buf = unsafe { ctx.alloc_pinned_with_flags::<bf16>(SLOT, 0) }.w()?;
        let done = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?;
        slots.push((buf, done));
    }
    let r = Arc::new(Mutex::new(Ring { copy, slots }));
    rings.push((ordinal, r.clone()));
    Ok(r)
}

/// `host` as a 1-D bf16 tensor on `dev`, copied through the pinned ring. Returns once the data is
/// on the device (the calling thread blocks; the device's stream does not).
pub fn upload_bf16(dev: &CudaDevice, host: &[bf16]) -> candle_core::Result<Tensor> {
    upload_with(dev, host.len(), |at, dst| {
        dst.copy_from_slice(&host[at..at + dst.len()]);
        true
    })?
    .ok_or_else(|| candle_core::Error::Msg("upload: a copy into the staging ring failed".into()))
}

/// A 1-D bf16 tensor of `len` elements on `dev` whose contents `fill` writes straight into the
/// pinned ring: `fill(at, dst)` writes elements `at .. at + dst.len()` and says whether it could.
/// It is called in parallel on pieces of each chunk, the chunk's DMA overlapping the filling of the
/// next, so a producer that converts as it fills (the adapter hot-load: file → bf16) runs at the
/// pace of its conversion with the copy hidden. `Ok(None)` when a fill failed.
pub fn upload_with<F>(dev: &CudaDevice, len: usize, fill: F) -> candle_core::Result<Option<Tensor>>
where
    F: Fn(usize, &mut [bf16]) -> bool + Sync,
{
    let main = dev.cuda_stream();
    // SAFETY: every element is written by the copies below before the tensor is returned.
    let dst: CudaSlice<bf16> = unsafe { main.alloc::<bf16>(len) }.w()?;
    if len > 0 {
        let allocated = main
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?;
        let ring = ring(dev)?;
        let mut ring = ring
            .lock()
            .map_err(|_| candle_core::Error::Msg("upload: staging ring poisoned".into()))?;
        let Ring { copy, slots } = &mut *ring;
        copy.wait(&allocated).w()?;
        let (base, _unused_record) = dst.device_ptr(&main);
        let mut ok = true;
        for (i, start) in (0..len).step_by(SLOT).enumerate() {
            let n = SLOT.min(len - start);
            let (buf, done) = &mut slots[i % 2];
            // The copy that last read this slot (two chunks ago) must be over.
            done.synchronize().w()?;
            let buf = &mut buf.as_mut_slice().w()?[..n];
            ok &= buf
                .par_chunks_mut(PIECE)
                .enumerate()
                .all(|(j, d)| fill(start + j * PIECE, d));
            if !ok {
                break;
            }
            let at = base + (start * std::mem::size_of::<bf16>()) as sys::CUdeviceptr;
            // SAFETY: `at .. at + n` lies inside `dst` (allocated above, ordered before the copy
            // by `allocated`); the pinned slot outlives the copy (the ring is never freed, and the
            // slot is not written again before `done` says the copy finished).
            unsafe { result::memcpy_htod_async(at, buf, copy.cu_stream()) }.w()?;
            done.record(copy).w()?;
        }
        copy.synchronize().w()?;
        if !ok {
            return Ok(None);
        }
    }
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, dev.clone())),
        Shape::from(len),
        candle_core::op::BackpropOp::none(),
        false,
    )))
}
