//! Reading a step's logits back to the host through a kept page-locked buffer, waiting on an
//! event rather than inside the copy.
//!
//! candle's `to_vec*` copies into pageable memory: the driver then runs the copy synchronously,
//! waiting for everything queued before it on the stream, and during that wait (the whole GPU
//! step when the step is a replayed graph) work another thread queues on the same stream can be
//! held back, as a fine-tuning job's layers were in session 19's serving-during-training run.
//! Here the copy is queued asynchronously into pinned memory, an event recorded after it, and only
//! the event is waited for, as PyTorch's `non_blocking` copies to pinned memory do. Session 20
//! (same call, share 0.5): the job made 2 optimizer steps and 498 pieces while requests streamed,
//! against 0 and 63 with candle's copy (BENCHMARKS.md). The default (`QLORAD_PINNED_LOGITS=0`
//! turns it off; read by the model crate's `LogitsReader`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaEvent, PinnedHostSlice};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Storage, Tensor};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// A page-locked buffer (grown as needed) and an event, for one reading thread.
#[derive(Default)]
pub struct HostReadback {
    buf: Option<(PinnedHostSlice<f32>, CudaEvent)>,
}

impl HostReadback {
    pub fn new() -> Self {
        Self::default()
    }

    /// The values of the contiguous f32 tensor `t` on a GPU, in order, once every kernel queued
    /// before this call has finished with them.
    pub fn read_f32(&mut self, t: &Tensor) -> candle_core::Result<Vec<f32>> {
        Ok(self.copy_in(t)?.to_vec())
    }

    /// [`HostReadback::read_f32`] of a `(rows, cols)` tensor as its rows, copied out of the
    /// page-locked buffer once.
    pub fn read_f32_rows(&mut self, t: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        let (_, cols) = t.dims2()?;
        Ok(self
            .copy_in(t)?
            .chunks(cols.max(1))
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Copies `t` into the page-locked buffer (grown as needed) and waits for the copy: the
    /// buffer's first `t.elem_count()` values.
    fn copy_in(&mut self, t: &Tensor) -> candle_core::Result<&[f32]> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(msg("readback: the tensor is not on a GPU".into()));
        };
        // f32 and contiguous, or an error; the address of its first value.
        let src = crate::train_cuda::storage_addr("readback", cs, layout, DType::F32)?;
        let n = layout.shape().elem_count();
        if n == 0 {
            return Ok(&[]);
        }
        let stream = cs.device().cuda_stream();
        let ctx = stream.context();
        let fits = self
            .buf
            .as_ref()
            .is_some_and(|(b, _)| b.len() >= n && b.context().cu_ctx() == ctx.cu_ctx());
        if !fits {
            // Dropped first: a PinnedHostSlice waits for its last use when it goes.
            self.buf = None;
            // SAFETY: read only after a copy has written the elements read.
            let b = unsafe { ctx.alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0) }.w()?;
            let e = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .w()?;
            self.buf = Some((b, e));
        }
        let Some((buf, done)) = self.buf.as_mut() else {
            return Err(msg("readback: no buffer".into()));
        };
        // The slice's own event is never recorded (the copy below is queued by hand): this
        // returns at once. The previous read waited for its copy, so the buffer is free.
        let host = buf.as_mut_slice().w()?;
        // SAFETY: `host[..n]` is page-locked memory of this context that nothing else uses until
        // `done` says the copy finished; `src` holds n f32 (the tensor's contiguous range).
        unsafe { result::memcpy_dtoh_async(&mut host[..n], src, stream.cu_stream()) }.w()?;
        done.record(&stream).w()?;
        done.synchronize().w()?;
        Ok(&host[..n])
    }
}
