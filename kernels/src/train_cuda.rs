//! The fused training ops of `cuda/train.cu` (behind the `cuda` feature) as candle custom ops with
//! their own backward: RMSNorm, RoPE, the causal attention softmax and SwiGLU, each one launch
//! forward and one backward instead of a chain of candle kernels with f32 copies (issue 6's
//! profile: `qlorad-bench gpu-train-profile`), and the causal-LM cross-entropy. Plus AdamW of one
//! tensor in place (the optimizer's per-tensor paging fallback; crate::multi_tensor_cuda updates
//! many tensors per launch).
//!
//! bf16 activations on one GPU, contiguous (the wrappers make them so); frozen weights and tables
//! (the norm weight, RoPE's cos/sin) live inside the op and get no gradient. CPU training keeps
//! candle's composite ops (the model picks), so the ops have no CPU implementation.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{
    CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};
use half::bf16;

const THREADS: u32 = 256;
// Must match SOFTMAX_WARPS in cuda/train.cu.
const SOFTMAX_WARPS: u64 = 8;
/// Threads per row of the cross-entropy kernels.
const CE_THREADS: u32 = 512;

pub(crate) fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

pub(crate) fn func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    crate::module_cuda::function(dev, &crate::module_cuda::TRAIN, name)
}

/// Device address of a contiguous `dtype` storage's first element under `layout`.
pub(crate) fn storage_addr(
    op: &str,
    s: &CudaStorage,
    l: &Layout,
    dtype: DType,
) -> candle_core::Result<u64> {
    if s.dtype() != dtype {
        return Err(msg(format!("{op}: want {dtype:?}, got {:?}", s.dtype())));
    }
    let (start, _) = l
        .contiguous_offsets()
        .ok_or_else(|| msg(format!("{op}: input must be contiguous")))?;
    let stream = s.device().cuda_stream();
    let base = match dtype {
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        other => return Err(msg(format!("{op}: unsupported dtype {other:?}"))),
    };
    Ok(base + (start * dtype.size_in_bytes()) as u64)
}

/// Device address of a tensor held by an op (a weight or table) on `dev`.
pub(crate) fn tensor_addr(
    op: &str,
    t: &Tensor,
    dev: &CudaDevice,
    dtype: DType,
) -> candle_core::Result<u64> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        return Err(msg(format!("{op}: a weight is not on a GPU")));
    };
    if cs.device().id() != dev.id() {
        return Err(msg(format!("{op}: a weight is on another GPU")));
    }
    storage_addr(op, cs, l, dtype)
}

pub(crate) fn grid(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as u64).clamp(1, 8192) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn wrap(out: CudaSlice<bf16>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

pub(crate) fn no_cpu(op: &str) -> candle_core::Error {
    msg(format!("{op}: CUDA only (CPU training runs candle's ops)"))
}

/// The `cpu_fwd` of a custom op that exists only on CUDA, one `storage layout` name pair per input
/// (`cuda_only!(s l)`, `cuda_only!(s1 l1, s2 l2)`, …): an error naming the op (the model never
/// sends CPU tensors here; candle's traits require the method).
macro_rules! cuda_only {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let _ = ($($s, $l),+);
            Err($crate::train_cuda::no_cpu(self.name()))
        }
    };
}
pub(crate) use cuda_only;

/// `y = rmsnorm(x) · w` over the last dimension (transformers' LlamaRMSNorm in bf16).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub w: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    fn rows(&self, op: &str, l: &Layout) -> candle_core::Result<(u32, u32)> {
        let n = l.dims().last().copied().unwrap_or(0);
        if self.w.dims() != [n] || n == 0 {
            return Err(msg(format!(
                "{op}: x {:?}, w {:?}",
                l.dims(),
                self.w.dims()
            )));
        }
        Ok(((l.shape().elem_count() / n) as u32, n as u32))
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "qlorad-rms-norm"
    }
    cuda_only!(s l);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let (rows, n) = self.rows(self.name(), l)?;
        let x = storage_addr(self.name(), s, l, DType::BF16)?;
        let w = tensor_addr(self.name(), &self.w, dev, DType::BF16)?;
        // SAFETY: one block per row writes all n values of it.
        let mut y = unsafe { dev.alloc::<bf16>(rows as usize * n as usize) }?;
        let f = func(dev, "rms_norm_fwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&self.eps).arg(&n).arg(&mut y);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match rms_norm_fwd_bf16; x holds rows·n, w n values.
        unsafe { b.launch(cfg) }.w()?;
        Ok((wrap(y, dev), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(x, dy)?))
    }
}

impl RmsNorm {
    /// dx from the forward's input x and dy (for a hand-written backward; `bwd` runs it too).
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        dy.contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &RmsNormGrad(self.clone()))
    }
}

/// dx of [`RmsNorm`] from (dy, x).
struct RmsNormGrad(RmsNorm);

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "qlorad-rms-norm-grad"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        ds: &CudaStorage,
        dl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (rows, n) = self.0.rows(self.name(), xl)?;
        if dl.dims() != xl.dims() {
            return Err(msg(format!(
                "{}: dy {:?} vs x {:?}",
                self.name(),
                dl.dims(),
                xl.dims()
            )));
        }
        let x = storage_addr(self.name(), xs, xl, DType::BF16)?;
        let dy = storage_addr(self.name(), ds, dl, DType::BF16)?;
        let w = tensor_addr(self.name(), &self.0.w, dev, DType::BF16)?;
        // SAFETY: one block per row writes all n values of it.
        let mut dx = unsafe { dev.alloc::<bf16>(rows as usize * n as usize) }?;
        let f = func(dev, "rms_norm_bwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&w)
            .arg(&dy)
            .arg(&self.0.eps)
            .arg(&n)
            .arg(&mut dx);
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match rms_norm_bwd_bf16; x, dy hold rows·n values.
        unsafe { b.launch(cfg) }.w()?;
        Ok((wrap(dx, dev), xl.shape().clone()))
    }
}

/// RoPE of a projection's output `(b, t, heads·hd)` into attention's layout `(b, heads, t, hd)`
/// (the transposition folded into the rotation: no separate copy); the backward rotates back into
/// the projection's layout.
#[derive(Debug, Clone)]
pub struct RopeHeads {
    pub cos: Tensor,
    pub sin: Tensor,
    pub heads: usize,
    /// 1: forward (to heads), −1: backward (from heads).
    pub sign: f32,
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "qlorad-rope-heads"
    }
    cuda_only!(s l);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let to_heads = self.sign > 0.0;
        let (t, hd, out) = match (to_heads, l.dims()) {
            (true, &[b, t, n]) if self.heads > 0 && n.is_multiple_of(self.heads) => {
                let hd = n / self.heads;
                (t, hd, Shape::from((b, self.heads, t, hd)))
            }
            (false, &[b, h, t, hd]) if h == self.heads => (t, hd, Shape::from((b, t, h * hd))),
            _ => {
                return Err(msg(format!(
                    "{}: x {:?} for {} heads",
                    self.name(),
                    l.dims(),
                    self.heads
                )))
            }
        };
        if self.cos.dims() != [t, hd / 2] || self.sin.dims() != [t, hd / 2] || !hd.is_multiple_of(2)
        {
            return Err(msg(format!(
                "{}: x {:?}, cos {:?}",
                self.name(),
                l.dims(),
                self.cos.dims()
            )));
        }
        let n = l.shape().elem_count();
        let x = storage_addr(self.name(), s, l, DType::BF16)?;
        let c = tensor_addr(self.name(), &self.cos, dev, DType::BF16)?;
        let sn = tensor_addr(self.name(), &self.sin, dev, DType::BF16)?;
        // SAFETY: every pair writes both of its values; pairs cover all n.
        let mut y = unsafe { dev.alloc::<bf16>(n) }?;
        // Eight pairs per thread with 16-byte accesses when the halves and tables allow it.
        let wide = hd.is_multiple_of(16) && [x, c, sn].iter().all(|a| a % 16 == 0);
        let f = func(
            dev,
            if wide {
                "rope_heads_v8_bf16"
            } else {
                "rope_heads_bf16"
            },
        )?;
        let stream = dev.cuda_stream();
        let (pairs, t32, h32, hd32) = ((n / 2) as u64, t as u32, self.heads as u32, hd as u32);
        let dir = u32::from(to_heads);
        let mut bl = stream.launch_builder(&f);
        bl.arg(&x)
            .arg(&c)
            .arg(&sn)
            .arg(&pairs)
            .arg(&t32)
            .arg(&h32)
            .arg(&hd32)
            .arg(&self.sign)
            .arg(&dir)
            .arg(&mut y);
        // SAFETY: argument order and types match rope_heads{,_v8}_bf16 (the same parameters);
        // shapes checked above, and the v8 kernel's alignment.
        unsafe { bl.launch(grid(if wide { pairs / 8 } else { pairs })) }.w()?;
        Ok((wrap(y, dev), out))
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = RopeHeads {
            sign: -self.sign,
            ..self.clone()
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// The attention softmax's parameters: `softmax(scale · scores)` over the last dimension `t` under
/// the causal mask (and a sliding window of `window` positions when non-zero); rows are queries,
/// `t` consecutive rows per head (`crate::attention_train_cuda::AttnProbs` runs it).
#[derive(Debug, Clone, Copy)]
pub struct CausalSoftmax {
    pub scale: f32,
    pub window: u32,
}

pub(crate) fn softmax_cfg(rows: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(SOFTMAX_WARPS) as u32, 1, 1),
        block_dim: (32 * SOFTMAX_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `silu(gate) · up` (same shapes).
#[derive(Debug, Clone, Copy)]
pub struct Swiglu;

fn same_shape(op: &str, a: &Layout, b: &Layout) -> candle_core::Result<u64> {
    if a.dims() != b.dims() {
        return Err(msg(format!("{op}: {:?} vs {:?}", a.dims(), b.dims())));
    }
    Ok(a.shape().elem_count() as u64)
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "qlorad-swiglu"
    }
    cuda_only!(s1 l1, s2 l2);
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = gs.device();
        let n = same_shape(self.name(), gl, ul)?;
        let g = storage_addr(self.name(), gs, gl, DType::BF16)?;
        let u = storage_addr(self.name(), us, ul, DType::BF16)?;
        // SAFETY: the grid-stride loop writes all n values.
        let mut y = unsafe { dev.alloc::<bf16>(n as usize) }?;
        let f = func(dev, "swiglu_fwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&g).arg(&u).arg(&n).arg(&mut y);
        // SAFETY: argument order and types match swiglu_fwd_bf16; g and u hold n values.
        unsafe { b.launch(grid(n)) }.w()?;
        Ok((wrap(y, dev), gl.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = Self::backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

impl Swiglu {
    /// (d gate, d up) from the forward's inputs and dy.
    pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let both =
            g.contiguous()?
                .apply_op3_no_bwd(&u.contiguous()?, &dy.contiguous()?, &SwigluGrad)?;
        Ok((both.get(0)?, both.get(1)?))
    }
}

/// `(d gate, d up)` stacked as (2, ...) from (gate, up, dy).
struct SwigluGrad;

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "qlorad-swiglu-grad"
    }
    cuda_only!(s1 l1, s2 l2, s3 l3);
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = gs.device();
        let n = same_shape(self.name(), gl, ul)?;
        same_shape(self.name(), gl, dl)?;
        let g = storage_addr(self.name(), gs, gl, DType::BF16)?;
        let u = storage_addr(self.name(), us, ul, DType::BF16)?;
        let dy = storage_addr(self.name(), ds, dl, DType::BF16)?;
        // SAFETY: the grid-stride loop writes both halves of all n values.
        let mut out = unsafe { dev.alloc::<bf16>(2 * n as usize) }?;
        let f = func(dev, "swiglu_bwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&g).arg(&u).arg(&dy).arg(&n).arg(&mut out);
        // SAFETY: argument order and types match swiglu_bwd_bf16; inputs hold n values, out 2n.
        unsafe { b.launch(grid(n)) }.w()?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((wrap(out, dev), Shape::from(dims)))
    }
}

/// Marks a row of [`cross_entropy`] that has no target.
pub const NO_TARGET: u32 = u32::MAX;

/// Mean cross-entropy of `logits (n, v)` (bf16) against `targets` (one per row, [`NO_TARGET`]
/// for rows without one), averaged over the rows with a target: a scalar f32 tensor. The
/// log-softmax is computed in f32 on the fly, never stored; the backward recomputes it from the
/// per-row logsumexp the forward keeps.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let op = CrossEntropy::new(logits, targets)?;
    logits.contiguous()?.apply_op1(op)?.get(0)
}

/// [`cross_entropy`] and its gradient at once, for a hand-written backward: the loss (a scalar
/// f32 tensor) and d logits for an upstream gradient `g` of the loss (bf16, logits' shape).
pub fn cross_entropy_with_grad(
    logits: &Tensor,
    targets: &[u32],
    g: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = CrossEntropy::new(logits, targets)?;
    let logits = logits.contiguous()?;
    let res = logits.apply_op1_no_bwd(&op)?;
    let g = Tensor::new(&[g], logits.device())?;
    let dx = logits.apply_op3_no_bwd(&res, &g, &CrossEntropyGrad(op))?;
    Ok((res.get(0)?, dx))
}

/// Output (n + 1) f32: the mean loss, then each row's logsumexp.
#[derive(Debug, Clone)]
struct CrossEntropy {
    targets: Tensor,
    count: usize,
}

impl CrossEntropy {
    /// The op for `logits (n, v)` and one target per row (at least one valid).
    fn new(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Self> {
        let (n, v) = logits.dims2()?;
        let count = targets.iter().filter(|&&t| (t as usize) < v).count();
        if targets.len() != n || count == 0 {
            return Err(msg(format!(
                "cross_entropy: {} targets ({count} valid) for {n} rows",
                targets.len()
            )));
        }
        Ok(Self {
            targets: Tensor::from_slice(targets, n, logits.device())?,
            count,
        })
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "qlorad-cross-entropy"
    }
    cuda_only!(s l);
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let &[n, v] = l.dims() else {
            return Err(msg(format!("{}: logits {:?}", self.name(), l.dims())));
        };
        let x = storage_addr(self.name(), s, l, DType::BF16)?;
        let t = tensor_addr(self.name(), &self.targets, dev, DType::U32)?;
        // SAFETY: ce_rows writes out[1..] and every loss; ce_mean writes out[0].
        let mut out = unsafe { dev.alloc::<f32>(n + 1) }?;
        let mut loss = unsafe { dev.alloc::<f32>(n) }?;
        let stream = dev.cuda_stream();
        let (v32, n32, inv) = (v as u32, n as u32, 1.0 / self.count as f32);
        let f = func(dev, "ce_rows_bf16")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&t).arg(&v32).arg(&mut out).arg(&mut loss);
        let rows = LaunchConfig {
            grid_dim: (n32, 1, 1),
            block_dim: (CE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match ce_rows_bf16; x holds n·v, t n values.
        unsafe { b.launch(rows) }.w()?;
        let f = func(dev, "ce_mean")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&loss).arg(&n32).arg(&inv).arg(&mut out);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match ce_mean; loss holds n values.
        unsafe { b.launch(one) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(n + 1),
        ))
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = CrossEntropyGrad(self.clone());
        Ok(Some(x.apply_op3_no_bwd(res, &g.contiguous()?, &grad)?))
    }
}

/// d logits from (logits, the forward's output, its upstream gradient).
struct CrossEntropyGrad(CrossEntropy);

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "qlorad-cross-entropy-grad"
    }
    cuda_only!(s1 l1, s2 l2, s3 l3);
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let &[n, v] = xl.dims() else {
            return Err(msg(format!("{}: logits {:?}", self.name(), xl.dims())));
        };
        let x = storage_addr(self.name(), xs, xl, DType::BF16)?;
        let r = storage_addr(self.name(), rs, rl, DType::F32)?;
        let g = storage_addr(self.name(), gs, gl, DType::F32)?;
        let t = tensor_addr(self.name(), &self.0.targets, dev, DType::U32)?;
        // SAFETY: one block per row writes all v values of it.
        let mut dx = unsafe { dev.alloc::<bf16>(n * v) }?;
        let stream = dev.cuda_stream();
        let (v32, inv) = (v as u32, 1.0 / self.0.count as f32);
        let f = func(dev, "ce_bwd_bf16")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&t)
            .arg(&r)
            .arg(&g)
            .arg(&v32)
            .arg(&inv)
            .arg(&mut dx);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (CE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match ce_bwd_bf16; res holds n + 1, grad ≥ 1 value.
        unsafe { b.launch(cfg) }.w()?;
        Ok((wrap(dx, dev), xl.shape().clone()))
    }
}

/// LoRA dropout of one (micro-batch, layer, projection): the seed of its mask and the drop
/// probability p (0 ≤ p < 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub seed: u64,
    pub p: f32,
}

impl Dropout {
    /// (threshold of the 32-bit hash, scale of kept values).
    fn params(&self) -> (u32, f32) {
        (
            (self.p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            1.0 / (1.0 - self.p),
        )
    }

    /// Launches `dropout_bf16` (`add` false: `y = dropout(x)`) or `dropout_add_bf16` (`y +=
    /// dropout(x)`) on n bf16 values at device addresses x and y.
    pub(crate) fn launch(
        &self,
        dev: &CudaDevice,
        x: u64,
        n: usize,
        y: u64,
        add: bool,
    ) -> candle_core::Result<()> {
        let (thr, keep) = self.params();
        let f = func(
            dev,
            if add {
                "dropout_add_bf16"
            } else {
                "dropout_bf16"
            },
        )?;
        let stream = dev.cuda_stream();
        let n64 = n as u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&x)
            .arg(&n64)
            .arg(&self.seed)
            .arg(&thr)
            .arg(&keep)
            .arg(&y);
        // SAFETY: argument order and types match the kernels; the caller's buffers hold n values.
        unsafe { b.launch(grid(n64)) }.w()?;
        Ok(())
    }
}

/// `dropout(x)` as [`crate::lora_train_cuda::LoraLinear`] applies it (no backward: for checks).
pub fn dropout(x: &Tensor, d: Dropout) -> candle_core::Result<Tensor> {
    let dev = cuda_of(x)?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let xa = tensor_addr("dropout", &x, &dev, DType::BF16)?;
    // SAFETY: the kernel writes all n values.
    let y = unsafe { dev.alloc::<bf16>(n) }?;
    let stream = dev.cuda_stream();
    let ya = y.device_ptr(&stream).0;
    d.launch(&dev, xa, n, ya, false)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(wrap(y, &dev)),
        x.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// AdamW hyper-parameters of one update (bias corrections already folded in).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    /// `lr / (1 − beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − beta2^t)`.
    pub bc2_sqrt: f32,
}

impl AdamWStep {
    /// The hyper-parameters as the AdamW kernels' trailing arguments, in their order.
    pub(crate) fn push_args<'a>(
        &'a self,
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    ) {
        b.arg(&self.beta1)
            .arg(&self.beta2)
            .arg(&self.eps)
            .arg(&self.decay)
            .arg(&self.step_size)
            .arg(&self.bc2_sqrt);
    }
}

pub(crate) fn cuda_of(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => Err(msg(format!("expected a CUDA tensor, got one on {other:?}"))),
    }
}

/// One AdamW update of `p` from gradient `g`, with moments `m`, `v`: `p`, `m` and `v` are
/// overwritten in place (f32, contiguous, same size, one GPU).
pub fn adamw_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: AdamWStep,
) -> candle_core::Result<()> {
    let dev = cuda_of(p)?;
    let n = p.elem_count();
    for t in [g, m, v] {
        if t.elem_count() != n {
            return Err(msg(format!("adamw: {:?} vs {:?}", t.dims(), p.dims())));
        }
    }
    let addr = |t: &Tensor| tensor_addr("adamw", t, &dev, DType::F32);
    let (pa, ga, ma, va) = (addr(p)?, addr(g)?, addr(m)?, addr(v)?);
    // SAFETY: all four hold n f32 (checked above).
    unsafe { adamw_launch(&dev, [pa, ga, ma, va], n, s) }
}

/// One AdamW launch over n values at device addresses (p, g, m, v).
///
/// # Safety
/// Each address must hold n f32 the device can reach (device memory, or mapped host memory).
unsafe fn adamw_launch(
    dev: &CudaDevice,
    [pa, ga, ma, va]: [u64; 4],
    n: usize,
    s: AdamWStep,
) -> candle_core::Result<()> {
    let f = func(dev, "adamw_f32")?;
    let stream = dev.cuda_stream();
    let n64 = n as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(&pa).arg(&ga).arg(&ma).arg(&va).arg(&n64);
    s.push_args(&mut b);
    // SAFETY: argument order and types match adamw_f32; the caller vouches for the addresses.
    // Writing p, m and v in place is what the optimizer means (as candle's Var::set does).
    unsafe { b.launch(grid(n64)) }.w()?;
    Ok(())
}
