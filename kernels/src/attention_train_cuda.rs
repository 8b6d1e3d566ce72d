//! Attention probabilities of a training step as one op: `P = softmax_causal(scale · Q·Kᵀ)` for
//! grouped-query heads, from Q `(b, kv, group·t, hd)` (the query heads of each KV head folded into
//! rows) and K `(b, kv, t, hd)`. The scores live only inside the forward (one batched cuBLAS GEMM,
//! then the softmax kernel of `cuda/train.cu` in place), so the graph keeps P alone rather than
//! scores and P (67 MB per layer at batch 4 × 512 on Mistral-7B's shapes); the backward computes
//! dS from P and dP and returns dQ = dS·K and dK = dSᵀ·Q in one buffer.

use crate::lora_train_cuda::{addr, gemm_batched, tensor_addr, Strided};
use crate::train_cuda::{cuda_only, func, msg, softmax_cfg, wrap, CausalSoftmax};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, CustomOp2, Layout, Shape, Tensor};
use half::bf16;

/// (batch = b·kv, rows = group·t, t, hd) of a call.
fn dims(op: &str, q: &[usize], k: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
    match (q, k) {
        (&[b, kv, rows, hd], &[b2, kv2, t, hd2])
            if b == b2 && kv == kv2 && hd == hd2 && t > 0 && rows.is_multiple_of(t) =>
        {
            Ok((b * kv, rows, t, hd))
        }
        _ => Err(msg(format!("{op}: q {q:?}, k {k:?}"))),
    }
}

/// The op: (Q, K) → P, with [`CausalSoftmax`]'s scale and window.
#[derive(Debug, Clone, Copy)]
pub struct AttnProbs(pub CausalSoftmax);

impl CustomOp2 for AttnProbs {
    fn name(&self) -> &'static str {
        "qlorad-attn-probs"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (batch, rows, t, hd) = dims(op, ql.dims(), kl.dims())?;
        let dev = qs.device();
        let (qa, ka) = (addr(op, qs, ql)?, addr(op, ks, kl)?);
        let n = batch * rows * t;
        // SAFETY: the GEMM writes every score, the softmax every probability (in place).
        let p = unsafe { dev.alloc::<bf16>(n) }?;
        let pa = p.device_ptr(&dev.cuda_stream()).0;
        let st = Strided {
            a: rows * hd,
            b: t * hd,
            c: rows * t,
            batch,
        };
        gemm_batched(
            dev,
            (rows, t, hd),
            1.0,
            (qa, false),
            (ka, true),
            0.0,
            pa,
            st,
        )?;
        softmax(dev, pa, (batch * rows) as u64, t, self.0, pa)?;
        let mut out = ql.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = t;
        }
        Ok((wrap(p, dev), Shape::from(out)))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = self.backward(q, k, p, dp)?;
        Ok((Some(dq), Some(dk)))
    }
}

impl AttnProbs {
    /// (dQ, dK) from the forward's inputs (contiguous), its probabilities P and dP.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let grad = AttnProbsGrad {
            soft: self.0,
            q: q.clone(),
            k: k.clone(),
        };
        let both = p.apply_op2_no_bwd(&dp.contiguous()?, &grad)?;
        let nq = q.elem_count();
        let dq = both.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = both.narrow(0, nq, k.elem_count())?.reshape(k.shape())?;
        Ok((dq, dk))
    }
}

/// The softmax kernel (`"fwd"` or `"bwd"`) for rows of `t` values at these addresses: the
/// register-held form of `cuda/train.cu` for t % 8 == 0 up to 2048 with 16-byte aligned rows (V
/// pieces of 8 per lane, the smallest power of two with 256·V ≥ t), else the scalar one.
fn softmax_kernel(dir: &str, t: usize, addrs: &[u64]) -> String {
    let aligned = addrs.iter().all(|a| a % 16 == 0);
    if t.is_multiple_of(8) && t <= 2048 && aligned {
        let v = t.div_ceil(256).next_power_of_two();
        format!("causal_softmax_{dir}_v{v}_bf16")
    } else {
        format!("causal_softmax_{dir}_bf16")
    }
}

/// The in-place softmax of `rows` rows of `t` scores at `s` into `p` (which may equal `s`: each
/// thread reads its values before writing them).
fn softmax(
    dev: &CudaDevice,
    s: u64,
    rows: u64,
    t: usize,
    c: CausalSoftmax,
    p: u64,
) -> candle_core::Result<()> {
    let f = func(dev, &softmax_kernel("fwd", t, &[s, p]))?;
    let stream = dev.cuda_stream();
    let t32 = t as u32;
    let mut b = stream.launch_builder(&f);
    b.arg(&s)
        .arg(&rows)
        .arg(&t32)
        .arg(&c.window)
        .arg(&c.scale)
        .arg(&p);
    // SAFETY: argument order and types match causal_softmax_fwd{,_vN}_bf16; s and p hold rows·t
    // values.
    unsafe { b.launch(softmax_cfg(rows)) }.w()?;
    Ok(())
}

/// (P, dP) → dQ and dK flattened into one buffer; Q and K held by the op.
struct AttnProbsGrad {
    soft: CausalSoftmax,
    q: Tensor,
    k: Tensor,
}

impl CustomOp2 for AttnProbsGrad {
    fn name(&self) -> &'static str {
        "qlorad-attn-probs-grad"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (batch, rows, t, hd) = dims(op, self.q.dims(), self.k.dims())?;
        if pl.shape().elem_count() != batch * rows * t || dl.dims() != pl.dims() {
            return Err(msg(format!("{op}: p {:?}, dp {:?}", pl.dims(), dl.dims())));
        }
        let dev = ps.device();
        let stream = dev.cuda_stream();
        let (pa, dpa) = (addr(op, ps, pl)?, addr(op, ds, dl)?);
        let (qa, ka) = (
            tensor_addr(op, &self.q, dev)?,
            tensor_addr(op, &self.k, dev)?,
        );
        let total_rows = (batch * rows) as u64;
        // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)).
        // SAFETY: one warp per row writes all t values of it.
        let dsb = unsafe { dev.alloc::<bf16>(batch * rows * t) }?;
        let dsa = dsb.device_ptr(&stream).0;
        let f = func(dev, &softmax_kernel("bwd", t, &[pa, dpa, dsa]))?;
        let t32 = t as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&pa)
            .arg(&dpa)
            .arg(&total_rows)
            .arg(&t32)
            .arg(&self.soft.scale)
            .arg(&dsa);
        // SAFETY: argument order and types match causal_softmax_bwd{,_vN}_bf16.
        unsafe { b.launch(softmax_cfg(total_rows)) }.w()?;
        let (nq, nk) = (batch * rows * hd, batch * t * hd);
        // SAFETY: both parts are fully written by the GEMMs (beta 0).
        let out = unsafe { dev.alloc::<bf16>(nq + nk) }?;
        let dq = out.device_ptr(&stream).0;
        let dk = dq + (nq * 2) as u64;
        let sq = Strided {
            a: rows * t,
            b: t * hd,
            c: rows * hd,
            batch,
        };
        // dQ (rows, hd) = dS (rows, t) · K (t, hd)
        gemm_batched(
            dev,
            (rows, hd, t),
            1.0,
            (dsa, false),
            (ka, false),
            0.0,
            dq,
            sq,
        )?;
        let sk = Strided {
            a: rows * t,
            b: rows * hd,
            c: t * hd,
            batch,
        };
        // dK (t, hd) = dSᵀ (t, rows) · Q (rows, hd)
        gemm_batched(
            dev,
            (t, hd, rows),
            1.0,
            (dsa, true),
            (qa, false),
            0.0,
            dk,
            sk,
        )?;
        Ok((wrap(out, dev), Shape::from(nq + nk)))
    }
}
