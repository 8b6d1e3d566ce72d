//! f32 optimizer state in page-locked host memory mapped into the GPU's address space, which the
//! AdamW kernel reads and writes in place over the host link: the paged optimizer without copies.
//!
//! bitsandbytes' paged optimizers keep their state in CUDA unified memory and let the driver
//! migrate pages on demand (Dettmers et al., 2023, QLoRA §3 "Paged Optimizers"); copying each
//! tensor's moments in and out with pageable memcpys cost issue 6's checkpointed step 0.29 s. Here
//! the state never moves: the update streams it across the link once per step (2 × 4 bytes read
//! and written per trainable parameter), with no device memory and no extra launches.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{sys, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

/// n f32 in mapped page-locked host memory, tied to one GPU.
pub struct MappedF32 {
    buf: PinnedHostSlice<f32>,
    /// The buffer's address as the GPU sees it.
    dptr: u64,
    len: usize,
    dev: CudaDevice,
}

impl MappedF32 {
    /// A mapped copy of `data` for `dev`.
    pub fn from_slice(dev: &CudaDevice, data: &[f32]) -> candle_core::Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: every value is written below before any use.
        let mut buf = unsafe {
            ctx.alloc_pinned_with_flags::<f32>(
                data.len().max(1),
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        }
        .w()?;
        buf.as_mut_slice().w()?[..data.len()].copy_from_slice(data);
        let host = buf.as_mut_ptr().w()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: host is a live DEVICEMAP allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host.cast(), 0) }
            .result()
            .w()?;
        Ok(Self {
            buf,
            dptr,
            len: data.len(),
            dev: dev.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's address as its GPU sees it.
    pub(crate) fn dptr(&self) -> u64 {
        self.dptr
    }

    /// Whether the buffer is mapped for `dev`.
    pub(crate) fn is_for(&self, dev: &CudaDevice) -> bool {
        self.dev.same_device(dev)
    }

    /// The values, after every queued kernel has finished with them.
    pub fn to_vec(&self) -> candle_core::Result<Vec<f32>> {
        self.dev.cuda_stream().synchronize().w()?;
        Ok(self.buf.as_slice().w()?[..self.len].to_vec())
    }
}

impl Drop for MappedF32 {
    fn drop(&mut self) {
        // A queued update may still be writing the buffer; cuMemFreeHost does not wait for it.
        let _ = self.dev.cuda_stream().synchronize();
    }
}
