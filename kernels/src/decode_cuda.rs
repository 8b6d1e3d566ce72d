//! The fused decode-step kernels of `cuda/decode.cu` (behind the `cuda` feature): residual add +
//! RMSNorm, RoPE + KV-cache write, decode attention over the caches in place, and SwiGLU's
//! silu·mul. Tensors in, tensors out (bf16, contiguous, on one GPU); the functions are loaded once
//! per device into [`DecodeKernels`], so a call costs one launch and one allocation.
//!
//! The KV caches are reached through a [`KvTable`] built once per forward pass: per sequence its
//! new token's position and its buffers' capacity, and per layer the addresses of its K and V
//! buffers (`(kv_heads, capacity, head_dim)` bf16). `rope_kv` writes the new token's K and V into
//! them through those addresses; `attention` reads them in place (no copy of the history).

pub use crate::kv_table_cuda::{KvRow, KvTable, KvWords};
use crate::pdl_cuda::RawFunction;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Shape, Storage, Tensor};
use half::bf16;
use std::sync::Arc;

#[path = "decode_norm_cuda.rs"]
mod norm;

// Must match cuda/decode.cu.
const ATT_THREADS: u32 = 256;
/// Most query heads per KV head the attention kernel takes (one instantiation per group size).
pub const ATT_MAX_GROUP: usize = 8;

/// Whether the attention kernel takes these shapes: a group of at most [`ATT_MAX_GROUP`] query
/// heads per KV head, a head_dim whose 16-byte pieces (head_dim / 8 threads per position)
/// divide a warp (8, 16, 32, 64, 128 or 256), and at most 1024 values per block (group ·
/// head_dim: the merge's shared memory).
pub fn attention_supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && (1..=ATT_MAX_GROUP).contains(&(heads / kv_heads))
        && heads / kv_heads * head_dim <= 1024
        && head_dim.is_multiple_of(8)
        && head_dim / 8 > 0
        && 32usize.is_multiple_of(head_dim / 8)
}
/// Whether [`DecodeKernels::rope_attention`] takes these shapes: the attention's, with
/// head_dim % 16 == 0 (each thread's 8 dims and its partner's lie in opposite halves).
pub fn rope_attention_supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    attention_supports(heads, kv_heads, head_dim) && head_dim.is_multiple_of(16)
}
/// add_rms_norm's block (NORM_THREADS in decode.cu): at batch 1 one block per row, whose time is
/// each warp's instruction chain, so a 4096-wide row takes one 16-byte chunk per thread.
const NORM_THREADS: u32 = 512;
/// 16-byte chunks per thread of add_rms_norm's vectorized path (NORM_VEC in decode.cu).
const NORM_VEC: usize = 2;
/// rope_kv is one block per sequence that loops over (heads + kv heads) · head_dim / 2 pairs: at
/// batch 1 its time is its loop's chain of memory round trips (256 threads: ~10 µs per call on the
/// H200, ncu), so it takes the largest block.
const ROPE_THREADS: u32 = 1024;
const ELEMWISE_THREADS: u32 = 256;
/// Most splits the cluster-merged attention takes (one cluster per (KV head, row): the portable
/// cluster size); more splits take the combine launch.
pub(crate) const ATT_CLUSTER_MAX: usize = 8;

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// The decode kernels, loaded on one device.
pub struct DecodeKernels {
    pub(crate) device: CudaDevice,
    pub(crate) stream: Arc<CudaStream>,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    embed_rows: CudaFunction,
    rope_kv: CudaFunction,
    /// The attention for group sizes 1..=ATT_MAX_GROUP.
    attention: Vec<CudaFunction>,
    /// The attention that applies RoPE and writes the new K and V itself, same group sizes.
    attention_rope: Vec<CudaFunction>,
    combine: CudaFunction,
    /// The same kernels for programmatic dependent launch (`pdl_cuda`), when the device takes it.
    pdl: Option<PdlKernels>,
}

/// [`DecodeKernels`]' kernels of the default decode step, raw-loaded for `pdl_cuda::launch`.
struct PdlKernels {
    add_rms_norm: RawFunction,
    silu_mul: RawFunction,
    embed_rows: RawFunction,
    attention: Vec<RawFunction>,
    attention_rope: Vec<RawFunction>,
    /// The cluster-merged attention (decode.cu's CL; `QLORAD_ATT_CLUSTER=0` off), same group sizes.
    attention_cl: Vec<RawFunction>,
    attention_rope_cl: Vec<RawFunction>,
    combine: RawFunction,
}

/// One scalar kernel argument (a device address is a u64).
enum KArg {
    U64(u64),
    U32(u32),
    F32(f32),
}

impl KArg {
    /// The argument's slot for a raw launch (valid while `self` lives).
    fn ptr(&self) -> *mut std::ffi::c_void {
        match self {
            KArg::U64(v) => crate::pdl_cuda::arg(v),
            KArg::U32(v) => crate::pdl_cuda::arg(v),
            KArg::F32(v) => crate::pdl_cuda::arg(v),
        }
    }
}

impl std::fmt::Debug for DecodeKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeKernels({:?})", self.device)
    }
}

/// A contiguous bf16 tensor's storage on `dev`: its slice and the element range of the tensor.
fn bf16_view<'a>(
    storage: &'a Storage,
    t: &Tensor,
    dev: &CudaDevice,
    what: &str,
) -> candle_core::Result<(&'a CudaSlice<bf16>, usize, usize)> {
    let Storage::Cuda(cs) = storage else {
        return Err(msg(format!("decode: {what} is not on a GPU")));
    };
    if cs.device().id() != dev.id() || t.dtype() != DType::BF16 {
        return Err(msg(format!(
            "decode: {what} must be bf16 on {dev:?} (got {:?} on {:?})",
            t.dtype(),
            t.device()
        )));
    }
    let (a, b) = t
        .layout()
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "decode" })?;
    Ok((cs.as_cuda_slice::<bf16>()?, a, b))
}

/// `out` as a bf16 tensor of `shape` on `dev` (no autograd).
pub(crate) fn wrap(out: CudaSlice<bf16>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

impl DecodeKernels {
    /// Loads the kernels on `device` (a CUDA device).
    pub fn load(device: &Device) -> candle_core::Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(msg("decode kernels need a CUDA device".into()));
        };
        let load = |name: &str| -> candle_core::Result<CudaFunction> {
            crate::module_cuda::function(dev, &crate::module_cuda::DECODE, name)
        };
        Ok(Self {
            device: dev.clone(),
            stream: dev.cuda_stream(),
            add_rms_norm: load("add_rms_norm_bf16")?,
            silu_mul: load("silu_mul_bf16")?,
            embed_rows: load("embed_rows_bf16")?,
            rope_kv: load("rope_kv_bf16")?,
            attention: (1..=ATT_MAX_GROUP)
                .map(|g| load(&format!("decode_attention_g{g}_bf16")))
                .collect::<candle_core::Result<_>>()?,
            attention_rope: (1..=ATT_MAX_GROUP)
                .map(|g| load(&format!("decode_attention_rope_g{g}_bf16")))
                .collect::<candle_core::Result<_>>()?,
            combine: load("attention_combine_bf16")?,
            pdl: if crate::pdl_cuda::enabled(dev) {
                let raw = |name: &str| {
                    crate::pdl_cuda::raw_function(dev, &crate::module_cuda::DECODE, name)
                };
                let group = |prefix: &str| {
                    (1..=ATT_MAX_GROUP)
                        .map(|g| raw(&format!("{prefix}_g{g}_bf16")))
                        .collect::<candle_core::Result<Vec<_>>>()
                };
                Some(PdlKernels {
                    add_rms_norm: raw("add_rms_norm_bf16")?,
                    silu_mul: raw("silu_mul_bf16")?,
                    embed_rows: raw("embed_rows_bf16")?,
                    attention: group("decode_attention")?,
                    attention_rope: group("decode_attention_rope")?,
                    attention_cl: group("decode_attention_cl")?,
                    attention_rope_cl: group("decode_attention_rope_cl")?,
                    combine: raw("attention_combine_bf16")?,
                })
            } else {
                None
            },
        })
    }

    /// Launches `func` (or its raw twin `raw` as a programmatic dependent of the stream's previous
    /// kernel) with `args`.
    ///
    /// # Safety
    /// As `cuLaunchKernel`: `args` match the kernel's parameters in order and type, and the
    /// buffers they address are valid for what it does, in stream order. The kernel calls
    /// `pdl_wait` in every block before it touches memory earlier work uses (decode.cu does).
    unsafe fn launch(
        &self,
        func: &CudaFunction,
        raw: Option<RawFunction>,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> candle_core::Result<()> {
        self.launch_in(func, raw, cfg, args, None)
    }

    /// [`DecodeKernels::launch`], the grid in thread-block clusters of `clusters` blocks when
    /// given (then the raw twin must be: only programmatic launches take clusters here).
    ///
    /// # Safety
    /// As [`DecodeKernels::launch`]; the cluster shape divides the grid.
    unsafe fn launch_in(
        &self,
        func: &CudaFunction,
        raw: Option<RawFunction>,
        cfg: LaunchConfig,
        args: &[KArg],
        clusters: Option<(u32, u32, u32)>,
    ) -> candle_core::Result<()> {
        if let Some(f) = raw {
            let mut ptrs: Vec<*mut std::ffi::c_void> = args.iter().map(KArg::ptr).collect();
            return match clusters {
                Some(c) => crate::pdl_cuda::launch_cluster(f, cfg, &self.stream, &mut ptrs, c),
                None => crate::pdl_cuda::launch(f, cfg, &self.stream, &mut ptrs),
            };
        }
        if clusters.is_some() {
            return Err(msg(
                "decode: cluster launches need programmatic launch".into()
            ));
        }
        let mut b = self.stream.launch_builder(func);
        for a in args {
            match a {
                KArg::U64(v) => b.arg(v),
                KArg::U32(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
            };
        }
        b.launch(cfg).w()?;
        Ok(())
    }

    /// `silu(gate) · up`, elementwise (same shapes).
    pub fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        if gate.dims() != up.dims() {
            return Err(msg(format!(
                "silu_mul: gate {:?} vs up {:?}",
                gate.dims(),
                up.dims()
            )));
        }
        let n = gate.elem_count();
        let (gs, _) = gate.storage_and_layout();
        let (gv, ga, gb) = bf16_view(&gs, gate, &self.device, "gate")?;
        let (us, _) = up.storage_and_layout();
        let (uv, ua, ub) = bf16_view(&us, up, &self.device, "up")?;
        // SAFETY: the grid-stride loop writes all n elements.
        let mut out = unsafe { self.device.alloc::<bf16>(n) }?;
        let blocks = (n as u32).div_ceil(ELEMWISE_THREADS).clamp(1, 4096);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (ELEMWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n64 = n as u64;
        let (gview, uview) = (gv.slice(ga..gb), uv.slice(ua..ub));
        let st = &self.stream;
        let ((gp, _gg), (up, _ug)) = (gview.device_ptr(st), uview.device_ptr(st));
        let (op, og) = out.device_ptr_mut(st);
        let args = [KArg::U64(gp), KArg::U64(up), KArg::U64(n64), KArg::U64(op)];
        let raw = self.pdl.as_ref().map(|p| p.silu_mul);
        // SAFETY: argument types and order match silu_mul_bf16; all three hold n bf16.
        unsafe { self.launch(&self.silu_mul, raw, cfg, &args) }?;
        drop(og);
        Ok(wrap(out, &self.device, gate.shape().clone()))
    }

    /// The token embeddings of `ids` (rows, u32 on this device): rows of `table` (vocab, hidden)
    /// bf16, as `table.index_select(ids, 0)` gives them, gathered by ids read on the device (a
    /// captured step replays it on each step's ids; an id past the vocabulary gives zeros).
    pub fn embed_rows(&self, table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (vocab, hidden) = table.dims2()?;
        let rows = ids.elem_count();
        if ids.rank() != 1 || rows == 0 || vocab > u32::MAX as usize || hidden > u32::MAX as usize {
            return Err(msg(format!(
                "embed_rows: table {:?}, ids {:?}",
                table.dims(),
                ids.dims()
            )));
        }
        let (ts, _) = table.storage_and_layout();
        let (tv, ta, tb) = bf16_view(&ts, table, &self.device, "embedding table")?;
        let (is, il) = ids.storage_and_layout();
        let Storage::Cuda(ic) = &*is else {
            return Err(msg("embed_rows: ids are not on a GPU".into()));
        };
        if ic.device().id() != self.device.id() {
            return Err(msg("embed_rows: ids on another device".into()));
        }
        let ip = crate::train_cuda::storage_addr("embed_rows", ic, il, DType::U32)?;
        // SAFETY: one block per row writes all `hidden` values of its row.
        let mut out = unsafe { self.device.alloc::<bf16>(rows * hidden) }?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ELEMWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let tview = tv.slice(ta..tb);
        let (tp, _tg) = tview.device_ptr(&self.stream);
        let (op, og) = out.device_ptr_mut(&self.stream);
        let args = [
            KArg::U64(tp),
            KArg::U64(ip),
            KArg::U32(vocab as u32),
            KArg::U32(hidden as u32),
            KArg::U64(op),
        ];
        let raw = self.pdl.as_ref().map(|p| p.embed_rows);
        // SAFETY: argument types and order match embed_rows_bf16; the table holds vocab·hidden
        // bf16, ids `rows` u32 and out rows·hidden bf16; ids past the vocabulary are not read.
        unsafe { self.launch(&self.embed_rows, raw, cfg, &args) }?;
        drop(og);
        Ok(wrap(out, &self.device, (rows, hidden)))
    }

    /// RoPE on `q` (rows, heads·hd) and `k` (rows, kv_heads·hd) at each row's position (tables
    /// `cos`, `sin` (positions, hd/2)); writes the rotated k and `v` into the caches of `layer`
    /// and returns the rotated q (rows, heads·hd).
    #[allow(clippy::too_many_arguments)] // the shapes of one attention layer
    pub fn rope_kv(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        table: &KvTable,
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Tensor> {
        let rows = table.rows;
        let half = head_dim / 2;
        if q.dims() != [rows, heads * head_dim]
            || k.dims() != [rows, kv_heads * head_dim]
            || v.dims() != k.dims()
            || cos.dims().len() != 2
            || cos.dims()[1] != half
            || cos.dims() != sin.dims()
            || cos.dims()[0] <= table.max_position
            || layer >= table.layers
            || !head_dim.is_multiple_of(2)
        {
            return Err(msg(format!(
                "rope_kv: q {:?}, k {:?}, v {:?}, cos {:?} for {rows} rows, layer {layer}",
                q.dims(),
                k.dims(),
                v.dims(),
                cos.dims()
            )));
        }
        let guards = [q, k, v, cos, sin].map(|t| t.storage_and_layout());
        let names = ["q", "k", "v", "cos", "sin"];
        let mut views = Vec::with_capacity(5);
        for ((g, t), name) in guards.iter().zip([q, k, v, cos, sin]).zip(names) {
            let (s, a, b) = bf16_view(&g.0, t, &self.device, name)?;
            views.push(s.slice(a..b));
        }
        // SAFETY: fully written (every pair of every q head).
        let mut out = unsafe { self.device.alloc::<bf16>(rows * heads * head_dim) }?;
        let (layers, layer) = (table.layers as u32, layer as u32);
        let (nh, nkv, hd) = (heads as u32, kv_heads as u32, head_dim as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.rope_kv);
        for v in &views {
            b.arg(v);
        }
        b.arg(&table.table)
            .arg(&layers)
            .arg(&layer)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&mut out);
        // SAFETY: argument types and order match rope_kv_bf16; shapes checked above; the table's
        // buffers hold (kv_heads, capacity, head_dim) with position < capacity (KvTable checks).
        // The caches are written through addresses taken under read guards: only this forward
        // pass uses them, in stream order.
        unsafe { b.launch(cfg) }.w()?;
        Ok(wrap(out, &self.device, (rows, heads * head_dim)))
    }

    /// Attention of each row's rotated query `q` (rows, heads·hd) over its cached keys and values
    /// of `layer` at positions `0..=position` (the last `window` of them with a sliding window):
    /// (rows, heads·hd).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &Tensor,
        table: &KvTable,
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let shape = (layer, heads, kv_heads, head_dim, window);
        self.attention_with(q, None, table, shape)
    }

    /// [`Self::rope_kv`] then [`Self::attention`] in one launch (plus the split combine): `q`
    /// (rows, heads·hd) and `k`, `v` (rows, kv_heads·hd) are the projections' outputs before
    /// RoPE; the block holding each row's new position writes its rotated K and V into the caches
    /// of `layer` before attending. Same arithmetic, so the same bits as the two launches. Needs
    /// [`rope_attention_supports`].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        table: &KvTable,
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let rows = table.rows;
        if k.dims() != [rows, kv_heads * head_dim]
            || v.dims() != k.dims()
            || cos.dims().len() != 2
            || cos.dims()[1] != head_dim / 2
            || cos.dims() != sin.dims()
            || cos.dims()[0] <= table.max_position
            || !rope_attention_supports(heads, kv_heads, head_dim)
        {
            return Err(msg(format!(
                "rope attention: k {:?}, v {:?}, cos {:?} for {rows} rows, {heads}/{kv_heads} \
                 heads of {head_dim}",
                k.dims(),
                v.dims(),
                cos.dims()
            )));
        }
        let rope = RopeInputs { k, v, cos, sin };
        let shape = (layer, heads, kv_heads, head_dim, window);
        self.attention_with(q, Some(rope), table, shape)
    }

    /// `shape`: layer, heads, KV heads, head_dim, window.
    fn attention_with(
        &self,
        q: &Tensor,
        rope: Option<RopeInputs<'_>>,
        table: &KvTable,
        shape: (usize, usize, usize, usize, Option<usize>),
    ) -> candle_core::Result<Tensor> {
        let (layer, heads, kv_heads, head_dim, window) = shape;
        let rows = table.rows;
        if q.dims() != [rows, heads * head_dim]
            || !attention_supports(heads, kv_heads, head_dim)
            || layer >= table.layers
        {
            return Err(msg(format!(
                "decode attention: q {:?}, {heads} heads, {kv_heads} kv heads, head_dim {head_dim}",
                q.dims()
            )));
        }
        let group = heads / kv_heads;
        let (qs, _) = q.storage_and_layout();
        let (qv, qa, qb) = bf16_view(&qs, q, &self.device, "q")?;
        let qview = qv.slice(qa..qb);
        let rope_guards = rope
            .as_ref()
            .map(|r| [r.k, r.v, r.cos, r.sin].map(|t| t.storage_and_layout()));
        let mut rope_views = Vec::with_capacity(4);
        if let (Some(r), Some(guards)) = (&rope, &rope_guards) {
            for ((g, t), name) in guards
                .iter()
                .zip([r.k, r.v, r.cos, r.sin])
                .zip(["k", "v", "cos", "sin"])
            {
                let (s, a, b) = bf16_view(&g.0, t, &self.device, name)?;
                rope_views.push(s.slice(a..b));
            }
        }
        let splits = Self::attention_splits(rows, kv_heads, table.max_position);
        // Several splits merge in attention_combine's launch or, with the cluster merge (the
        // default; QLORAD_ATT_CLUSTER=0 off; programmatic launches only), the splits of a (KV
        // head, row) run as one thread-block cluster and merge in distributed shared memory (no
        // partials, no combine launch).
        let cluster = (2..=ATT_CLUSTER_MAX).contains(&splits)
            && crate::step_graph_cuda::cluster_merge()
            && self.pdl.is_some();
        // SAFETY: fully written, by the kernel (one split) or the combine (several).
        let mut out = unsafe { self.device.alloc::<bf16>(rows * heads * head_dim) }?;
        // The partial outputs, then the maxima and sums, of the splits in one allocation (each is
        // a driver call now and another when freed); one split writes `out` directly and the
        // kernel never touches the partials (null).
        let part_len = rows * splits * heads * head_dim;
        let parts = if splits > 1 && !cluster {
            let n = rows * splits * heads;
            // SAFETY: the partials are written by every split before the combine reads them.
            Some(unsafe { self.device.alloc::<f32>(part_len + n * 2)? })
        } else {
            None
        };
        let null = 0u64;
        let (layers, layer) = (table.layers as u32, layer as u32);
        let (nh, nkv, hd) = (heads as u32, kv_heads as u32, head_dim as u32);
        let window = window.unwrap_or(0).min(u32::MAX as usize) as u32;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (nkv, rows as u32, splits as u32),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = if rope.is_some() {
            &self.attention_rope[group - 1]
        } else {
            &self.attention[group - 1]
        };
        let raw = self.pdl.as_ref().map(|p| {
            let set = match (rope.is_some(), cluster) {
                (true, true) => &p.attention_rope_cl,
                (true, false) => &p.attention_rope,
                (false, true) => &p.attention_cl,
                (false, false) => &p.attention,
            };
            set[group - 1]
        });
        let st = &self.stream;
        let mut guards = Vec::new();
        let mut args = Vec::new();
        for v in std::iter::once(&qview).chain(&rope_views) {
            let (p, g) = v.device_ptr(st);
            guards.push(g);
            args.push(KArg::U64(p));
        }
        let (tp, _tg) = table.table.device_ptr(st);
        let (op, og) = out.device_ptr_mut(st);
        let part_ptrs = parts.as_ref().map(|p| p.device_ptr(st));
        // The maxima and sums follow the partial outputs (f32; part_len is a multiple of hd).
        let ml_off = (part_len * std::mem::size_of::<f32>()) as u64;
        let (po, pml) = part_ptrs
            .as_ref()
            .map_or((null, null), |(p, _)| (*p, *p + ml_off));
        args.extend([
            KArg::U64(tp),
            KArg::U32(layers),
            KArg::U32(layer),
            KArg::U32(nh),
            KArg::U32(nkv),
            KArg::U32(hd),
            KArg::U32(window),
            KArg::F32(scale),
            KArg::U64(op),
            KArg::U64(po),
            KArg::U64(pml),
        ]);
        // One cluster per (KV head, row) spans its splits, the z dimension.
        let clusters = cluster.then_some((1, 1, splits as u32));
        // SAFETY: argument types and order match decode_attention_g{group}_bf16 (no RoPE inputs)
        // and decode_attention_rope_g{group}_bf16 (k, v, cos, sin after q); q holds
        // rows·heads·hd, out the same, the partials rows·splits·heads·(hd | 2) f32 when splits > 1;
        // group and head_dim within the kernel's limits, and with RoPE k and v rows·kv_heads·hd,
        // cos and sin more than max_position rows of hd/2 (checked above / by rope_attention).
        // The caches are written through addresses taken under read guards: only this forward
        // pass uses them, in stream order.
        // The cluster form (`cluster`: 2..=8 splits, PDL on) has the same parameters and never
        // touches the null partials.
        unsafe { self.launch_in(func, raw, cfg, &args, clusters) }?;
        drop((og, part_ptrs, guards));
        if let Some(part) = &parts {
            let splits32 = splits as u32;
            let cfg = LaunchConfig {
                grid_dim: (nh, rows as u32, 1),
                block_dim: (hd, 1, 1),
                shared_mem_bytes: 0,
            };
            let (pp, _pg) = part.device_ptr(st);
            let mp = pp + ml_off;
            let (op, og) = out.device_ptr_mut(st);
            let args = [
                KArg::U64(pp),
                KArg::U64(mp),
                KArg::U32(splits32),
                KArg::U32(nh),
                KArg::U32(hd),
                KArg::U64(op),
            ];
            let raw = self.pdl.as_ref().map(|p| p.combine);
            // SAFETY: argument types and order match attention_combine_bf16 (shapes as above).
            unsafe { self.launch(&self.combine, raw, cfg, &args) }?;
            drop(og);
        }
        Ok(wrap(out, &self.device, (rows, heads * head_dim)))
    }
}

/// The RoPE inputs of [`DecodeKernels::rope_attention`].
struct RopeInputs<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
}
