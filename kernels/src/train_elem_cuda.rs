//! Two data-movement ops of the hand-written training layer (`cuda/train.cu`): the bf16 sum of two
//! tensors and the swap of a 4-D tensor's middle dimensions (attention's head transposes), each one
//! launch moving 16 bytes per thread. candle's own binary add and strided copy ran at ~0.9 and
//! ~0.34 TB/s on the H200 (gpu-train-profile's pieces: 7 sums and 4 transposes per layer, ~0.7 ms
//! of a 5.3 ms layer). Forward-only ops (the hand-written backward never differentiates them); on
//! other devices, dtypes or layouts they fall back to candle's ops, with the same results.

use crate::train_cuda::{cuda_only, func, grid, msg, storage_addr, wrap};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

/// `a + b` (same shape, bf16 on a GPU: one launch; otherwise candle's add).
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cuda() && a.dtype() == DType::BF16 && b.dtype() == DType::BF16 {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddBf16)
    } else {
        a + b
    }
}

/// `x (b, a, c, d)` → `(b, c, a, d)`, contiguous: `x.transpose(1, 2)?.contiguous()` in one launch
/// when x is bf16 on a GPU and d a multiple of 8 (candle's copy otherwise).
pub fn swap12(x: &Tensor) -> candle_core::Result<Tensor> {
    let fast = x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.rank() == 4
        && x.dim(3)? % 8 == 0
        && x.elem_count() / 8 < u32::MAX as usize;
    if fast {
        let xc = x.contiguous()?;
        // Allocations are 256-byte aligned; a view into one may start anywhere.
        if xc.layout().start_offset() % 8 == 0 {
            return xc.apply_op1_no_bwd(&Swap12);
        }
    }
    x.transpose(1, 2)?.contiguous()
}

struct AddBf16;

impl CustomOp2 for AddBf16 {
    fn name(&self) -> &'static str {
        "qlorad-add"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        if al.dims() != bl.dims() {
            return Err(msg(format!("{op}: {:?} + {:?}", al.dims(), bl.dims())));
        }
        let n = al.shape().elem_count() as u64;
        let dev = as_.device();
        let (a, b) = (
            storage_addr(op, as_, al, DType::BF16)?,
            storage_addr(op, bs, bl, DType::BF16)?,
        );
        // SAFETY: the kernel writes all n values.
        let mut y = unsafe { dev.alloc::<bf16>(n as usize) }?;
        let f = func(dev, "add_bf16")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&a).arg(&b).arg(&n).arg(&mut y);
        // SAFETY: argument order and types match add_bf16; a and b hold n values.
        unsafe { l.launch(grid(n.div_ceil(8))) }.w()?;
        Ok((wrap(y, dev), al.shape().clone()))
    }
}

struct Swap12;

impl CustomOp1 for Swap12 {
    fn name(&self) -> &'static str {
        "qlorad-swap12"
    }
    cuda_only!(s l);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let &[b, a, c, d] = l.dims() else {
            return Err(msg(format!("{op}: want 4 dims, got {:?}", l.dims())));
        };
        let x = storage_addr(op, s, l, DType::BF16)?;
        let n = b * a * c * d;
        if d % 8 != 0 || x % 16 != 0 || n / 8 >= u32::MAX as usize {
            return Err(msg(format!(
                "{op}: {:?} at address {x:#x}: needs d % 8 == 0 and 16-byte alignment",
                l.dims()
            )));
        }
        let dev = s.device();
        // SAFETY: the kernel writes every 16-byte piece of the n values.
        let mut y = unsafe { dev.alloc::<bf16>(n) }?;
        let f = func(dev, "swap12_bf16")?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        let (b32, a32, c32, d32) = (b as u32, a as u32, c as u32, d as u32);
        lb.arg(&x)
            .arg(&b32)
            .arg(&a32)
            .arg(&c32)
            .arg(&d32)
            .arg(&mut y);
        // SAFETY: argument order and types match swap12_bf16; x holds n values, y n.
        unsafe { lb.launch(grid((n / 8) as u64)) }.w()?;
        Ok((wrap(y, dev), Shape::from((b, c, a, d))))
    }
}
