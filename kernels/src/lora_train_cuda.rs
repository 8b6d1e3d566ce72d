//! The QLoRA projection of a training step as one candle op on a GPU: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`
//! with W frozen NF4 and A (r, in), B (out, r) the adapter, and a backward that returns dx, dA and
//! dB together (issue 6: "fused LoRA forward/backward in few launches").
//!
//! Through candle's autograd the same math is ~8 nodes, each backward step allocating a zeroed
//! gradient and adding into it, plus separate scale and add kernels over the (rows, out) output.
//! Here the forward is two small cuBLAS calls writing `s·h·Bᵀ` into y and the NF4 matmul
//! (dequantize + cuBLAS) accumulating onto it through GEMM's beta; the backward is one dequantize
//! and five GEMMs writing into one buffer: dB = s·dyᵀ·h, dh = s·dy·B, dA = dhᵀ·x,
//! dx = dy·W + dh·A (h = x·Aᵀ is recomputed: 2·rows·in·r FLOPs, cheaper than keeping it). The
//! arithmetic is the one HF peft runs under bf16 autocast (bf16 operands, f32 accumulation, h, dh
//! and the branch's output rounded to bf16), except that the base's product is added to the
//! rounded branch before its one rounding, where peft rounds both and adds in bf16.

use crate::nf4_op::Nf4Weight;
use crate::train_cuda::{cuda_only, msg, storage_addr, Dropout};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;
use std::ffi::c_void;
use std::sync::Arc;

/// Row-major `C (m, n) = alpha · op(A) · op(B) + beta · C` on bf16 device addresses, with f32
/// accumulation and f32 alpha/beta (exact LoRA scales). `a_t`: A is stored (k, m) and transposed;
/// `b_t`: B is stored (n, k) and transposed.
#[allow(clippy::too_many_arguments)] // a GEMM's operands
pub(crate) fn gemm(
    dev: &CudaDevice,
    mnk: (usize, usize, usize),
    alpha: f32,
    a: u64,
    a_t: bool,
    b: u64,
    b_t: bool,
    beta: f32,
    c: u64,
) -> candle_core::Result<()> {
    let one = Strided {
        a: 0,
        b: 0,
        c: 0,
        batch: 1,
    };
    gemm_batched(dev, mnk, alpha, (a, a_t), (b, b_t), beta, c, one)
}

/// Element strides between the matrices of a batched [`gemm`], and their count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    pub batch: usize,
}

/// [`gemm`] over `s.batch` matrices at the given element strides (one cuBLAS call).
#[allow(clippy::too_many_arguments)] // a GEMM's operands
pub(crate) fn gemm_batched(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, a_t): (u64, bool),
    (b, b_t): (u64, bool),
    beta: f32,
    c: u64,
    s: Strided,
) -> candle_core::Result<()> {
    use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS gets B first.
    let (lda, ldb) = (if a_t { m } else { k }, if b_t { k } else { n });
    let blas = dev.cublas_handle();
    // SAFETY: the caller passes device addresses of buffers holding `batch` matrices of m·k (A),
    // k·n (B) and m·n (C) bf16 values at the given strides, on candle's stream (the handle is
    // bound to it), alive until the GEMM has run (stream-ordered frees).
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            if b_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
            if a_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const c_void,
            b as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            ldb as i32,
            s.b as i64,
            a as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            lda as i32,
            s.a as i64,
            (&beta) as *const f32 as *const c_void,
            c as *mut c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            n as i32,
            s.c as i64,
            s.batch as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| msg(format!("cuBLAS GEMM ({m}, {n}, {k}) x {}: {e:?}", s.batch)))
}

/// Address of a contiguous bf16 CUDA storage under `l`.
pub(crate) fn addr(op: &str, s: &CudaStorage, l: &Layout) -> candle_core::Result<u64> {
    storage_addr(op, s, l, DType::BF16)
}

/// Address of a contiguous bf16 tensor on `dev` (an adapter matrix, or Q/K held by an op).
pub(crate) fn tensor_addr(op: &str, t: &Tensor, dev: &CudaDevice) -> candle_core::Result<u64> {
    crate::train_cuda::tensor_addr(op, t, dev, DType::BF16)
}

/// `y = x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ` over (x, A, B), bf16 on one GPU; W is the NF4 weight.
/// With `dropout`, the branch's input is masked on the device (the mask recomputed from its seed
/// in the backward, where it also masks the branch's share of dx).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub weight: Arc<Nf4Weight>,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// The branch input: x itself, or a fresh dropout(x) (kept alive by the returned buffer).
fn branch_input(
    dev: &CudaDevice,
    x: u64,
    n: usize,
    d: Option<Dropout>,
) -> candle_core::Result<(u64, Option<CudaSlice<bf16>>)> {
    let Some(d) = d else {
        return Ok((x, None));
    };
    // SAFETY: fully written by the dropout kernel.
    let buf = unsafe { dev.alloc::<bf16>(n) }?;
    let a = buf.device_ptr(&dev.cuda_stream()).0;
    d.launch(dev, x, n, a, false)?;
    Ok((a, Some(buf)))
}

/// (rows, in, out, r) of a call, checked against the weight.
fn dims(
    op: &str,
    w: &Nf4Weight,
    x: &Layout,
    a: &[usize],
    b: &[usize],
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (n, k) = (w.out_features(), w.in_features());
    let kin = x.dims().last().copied().unwrap_or(0);
    let r = a.first().copied().unwrap_or(0);
    if kin != k || a != [r, k] || b != [n, r] || r == 0 {
        return Err(msg(format!(
            "{op}: x {:?}, A {a:?}, B {b:?} for a ({n}, {k}) weight",
            x.dims()
        )));
    }
    Ok((x.shape().elem_count() / k, k, n, r))
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "qlorad-lora-linear"
    }
    cuda_only!(s1 l1, s2 l2, s3 l3);
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (m, k, n, r) = dims(op, &self.weight, xl, al.dims(), bl.dims())?;
        let g = self
            .weight
            .gpu()
            .ok_or_else(|| msg(format!("{op}: the NF4 weight is not on the GPU")))?;
        let dev = xs.device();
        let (xa, aa, ba) = (addr(op, xs, xl)?, addr(op, as_, al)?, addr(op, bs, bl)?);
        // SAFETY: fully written by the GEMMs below (beta 0 first).
        let h = unsafe { dev.alloc::<bf16>(m * r) }?;
        let y = unsafe { dev.alloc::<bf16>(m * n) }?;
        let stream = dev.cuda_stream();
        let (ha, ya) = (h.device_ptr(&stream).0, y.device_ptr(&stream).0);
        let (xd, _keep) = branch_input(dev, xa, m * k, self.dropout)?;
        // The adapter's branch first, then the base GEMM accumulates onto it (beta 1): the base
        // GEMM is compute-bound and reads y in its epilogue nearly for free, where adding the
        // branch after it was a memory-bound pass reading and writing all of y (~40 us of the
        // 0.49 ms of a gate projection at batch 4 × 512; gpu-train-profile's pieces).
        gemm(dev, (m, r, k), 1.0, xd, false, aa, true, 0.0, ha)?; // h = dropout(x)·Aᵀ
        gemm(dev, (m, n, r), self.scale, ha, false, ba, true, 0.0, ya)?; // y = s·h·Bᵀ
        let wd = g.dequantize_bf16()?;
        let wa = wd.device_ptr(&stream).0;
        gemm(dev, (m, n, k), 1.0, xa, false, wa, true, 1.0, ya)?; // y += x·Wᵀ
        let mut out = xl.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from(out),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = self.backward(x, a, b, dy)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

impl LoraLinear {
    /// (dx, dA, dB) in bf16 from the forward's inputs (x contiguous; A, B bf16) and dy.
    pub fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (k, r, n) = (
            self.weight.in_features(),
            a.dim(0)?,
            self.weight.out_features(),
        );
        let m = x.elem_count() / k;
        let grad = dy.contiguous()?.apply_op2_no_bwd(
            &x.contiguous()?,
            &LoraLinearGrad {
                fwd: self.clone(),
                a: a.clone(),
                b: b.clone(),
            },
        )?;
        // One buffer: dx (m·k), then dA (r·k), then dB (n·r).
        let dx = grad.narrow(0, 0, m * k)?.reshape(x.shape())?;
        let da = grad.narrow(0, m * k, r * k)?.reshape((r, k))?;
        let db = grad.narrow(0, m * k + r * k, n * r)?.reshape((n, r))?;
        Ok((dx, da, db))
    }
}

/// The backward of [`LoraLinear`] over (dy, x): dx, dA and dB flattened into one buffer.
struct LoraLinearGrad {
    fwd: LoraLinear,
    a: Tensor,
    b: Tensor,
}

impl CustomOp2 for LoraLinearGrad {
    fn name(&self) -> &'static str {
        "qlorad-lora-linear-grad"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        ds: &CudaStorage,
        dl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let w = &self.fwd.weight;
        let (m, k, n, r) = dims(op, w, xl, self.a.dims(), self.b.dims())?;
        if dl.shape().elem_count() != m * n || self.a.dtype() != DType::BF16 {
            return Err(msg(format!("{op}: dy {:?} for {m} rows of {n}", dl.dims())));
        }
        let g = w
            .gpu()
            .ok_or_else(|| msg(format!("{op}: the NF4 weight is not on the GPU")))?;
        let dev = xs.device();
        let stream = dev.cuda_stream();
        let (dya, xa) = (addr(op, ds, dl)?, addr(op, xs, xl)?);
        let (aa, ba) = (
            tensor_addr(op, &self.a, dev)?,
            tensor_addr(op, &self.b, dev)?,
        );
        let s = self.fwd.scale;
        let total = m * k + r * k + n * r;
        // SAFETY: every part is fully written by the GEMMs below (beta 0 first writes).
        let out = unsafe { dev.alloc::<bf16>(total) }?;
        let o = out.device_ptr(&stream).0;
        let (dx, da, db) = (o, o + (m * k * 2) as u64, o + ((m * k + r * k) * 2) as u64);
        // SAFETY: fully written by the GEMMs below.
        let h = unsafe { dev.alloc::<bf16>(m * r) }?;
        let dh = unsafe { dev.alloc::<bf16>(m * r) }?;
        let (ha, dha) = (h.device_ptr(&stream).0, dh.device_ptr(&stream).0);
        let drop = self.fwd.dropout;
        let (xd, _keep) = branch_input(dev, xa, m * k, drop)?;
        gemm(dev, (m, r, k), 1.0, xd, false, aa, true, 0.0, ha)?; // h = xd·Aᵀ
        gemm(dev, (n, r, m), s, dya, true, ha, false, 0.0, db)?; // dB = s·dyᵀ·h
        gemm(dev, (m, r, n), s, dya, false, ba, false, 0.0, dha)?; // dh = s·dy·B
        gemm(dev, (r, k, m), 1.0, dha, true, xd, false, 0.0, da)?; // dA = dhᵀ·xd
        let wd = g.dequantize_bf16()?;
        let wa = wd.device_ptr(&stream).0;
        gemm(dev, (m, k, n), 1.0, dya, false, wa, false, 0.0, dx)?; // dx = dy·W
        match drop {
            None => gemm(dev, (m, k, r), 1.0, dha, false, aa, false, 1.0, dx)?, // dx += dh·A
            Some(d) => {
                // dx += dropout(dh·A): the mask's derivative.
                // SAFETY: fully written by the GEMM.
                let t = unsafe { dev.alloc::<bf16>(m * k) }?;
                let ta = t.device_ptr(&stream).0;
                gemm(dev, (m, k, r), 1.0, dha, false, aa, false, 0.0, ta)?;
                d.launch(dev, ta, m * k, dx, true)?;
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(total),
        ))
    }
}
