//! The CUDA side of the NF4 ops (behind the `cuda` feature): a weight's device copy and the
//! launches of the kernels in `cuda/nf4.cu` (compiled by build.rs, loaded by [`crate::module_cuda`]).
//!
//! `y = x·Wᵀ` takes one of two paths, the split bitsandbytes makes too (its `gemv_4bit` for
//! single-token inference, `dequantize_4bit` + matmul otherwise):
//! - decode-sized inputs (≤ [`GEMV_BATCH_ROWS`] rows) use the fused NF4 GEMV in groups of up to
//!   [`GEMV_MAX_ROWS`] rows: the 4-bit codes are streamed once per group, never dequantized to memory;
//! - larger inputs (prefill) dequantize W to a bf16 scratch buffer and run one cuBLAS GEMM
//!   (tensor cores, f32 accumulation); the scratch lives only for the call.
//!
//! The input gradient `dx = dy·W` always dequantizes and runs a GEMM (training-sized inputs).
//! Compute is bf16 in and out with f32 accumulation.

use crate::nf4::{Absmax, Nf4Tensor};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchArgs, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Shape};
use half::bf16;
use std::sync::Arc;

/// Rows one GEMV launch handles (the kernel is instantiated for 1..=8 rows).
pub const GEMV_MAX_ROWS: usize = 8;
/// Up to this many rows the GEMV runs once per group of [`GEMV_MAX_ROWS`]: reading the 4-bit
/// weights a few times still moves fewer bytes than writing and reading a bf16 copy of them.
pub const GEMV_BATCH_ROWS: usize = 32;
/// Warps per GEMV thread block.
pub(crate) const GEMV_WARPS: u32 = 8;

#[path = "gemv_kernel_cuda.rs"]
mod gemv_kernel;
pub use gemv_kernel::GemvKernel;

const DEQUANT_THREADS: u32 = 256;

/// Thread blocks of `threads` threads running `func` that fit on `device` at once (multiprocessors
/// × resident blocks per multiprocessor): the grid of a kernel that strides over its work.
fn resident_blocks(
    device: &CudaDevice,
    func: &CudaFunction,
    threads: u32,
) -> candle_core::Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let sms = device
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
        .w()?;
    Ok((sms.max(1) as u32) * per_sm.max(1))
}

/// An NF4 weight resident on one GPU: packed codes, the (double-quantized) scales and the code
/// tables, plus the kernels loaded for that device.
pub struct Nf4Gpu {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    packed: CudaSlice<u8>,
    code: CudaSlice<f32>,
    /// 1: `absmax` holds f32 scales; 0: double quantization (`qabs`, `nested`, `ncode`, `offset`).
    plain: u32,
    absmax: CudaSlice<f32>,
    qabs: CudaSlice<u8>,
    nested: CudaSlice<f32>,
    ncode: CudaSlice<f32>,
    offset: f32,
    log2_bs: u32,
    numel: usize,
    n: usize,
    k: usize,
    bytes: usize,
    dequant: CudaFunction,
    /// The codes and block scales are in the t4 kernels' tiled layout (crate::tiled), which
    /// `dequant` (nf4_dequantize_tiled_bf16) reads too.
    tiled: bool,
    kernel: GemvKernel,
    /// The GEMV for 1..=8 input rows, with its output rows per warp.
    gemv: Vec<(CudaFunction, u32)>,
    /// The GEMV with the LoRA expand epilogue for 1..=8 input rows, loaded on first use.
    gemv_lora: std::sync::OnceLock<Vec<CudaFunction>>,
    /// The grouped tensor-core GEMV for 1..=8 input rows, per [`GroupKernel`]
    /// (`nf4_group_cuda`), loaded on first use.
    gemv_group: [std::sync::OnceLock<Vec<CudaFunction>>; 2],
    /// The same kernels for programmatic dependent launch (`pdl_cuda`), settled on first use:
    /// `None` when the device or `QLORAD_PDL=0` rules it out.
    gemv_group_pdl: [std::sync::OnceLock<Option<Vec<crate::pdl_cuda::RawFunction>>>; 2],
}

/// Which grouped GEMV a launch takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupKernel {
    /// The base alone.
    Base,
    /// With the LoRA epilogue computed by a ninth warp per block (which also runs the group's
    /// shrink when the launch carries its counters).
    Lora,
}

impl GroupKernel {
    fn index(self) -> usize {
        match self {
            GroupKernel::Base => 0,
            GroupKernel::Lora => 1,
        }
    }
}

impl std::fmt::Debug for Nf4Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nf4Gpu({:?}, {}x{}, {} bytes, gemv {})",
            self.device,
            self.n,
            self.k,
            self.bytes,
            self.kernel.name()
        )
    }
}

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

impl Nf4Gpu {
    /// Copies `t` (2-D, (n, k)) to `device` and loads the kernels there (`kernel` for decode).
    pub fn upload(
        t: &Nf4Tensor,
        n: usize,
        k: usize,
        device: &CudaDevice,
        kernel: GemvKernel,
    ) -> candle_core::Result<Self> {
        let bs = t.blocksize;
        if !bs.is_power_of_two() || bs < 32 {
            return Err(msg(format!(
                "NF4 on CUDA needs a power-of-two blocksize >= 32, got {bs}"
            )));
        }
        let kernel = if kernel.fits(n, k, bs) {
            kernel
        } else if kernel.fallback().fits(n, k, bs) {
            kernel.fallback()
        } else {
            GemvKernel::Lut16
        };
        // t4 weights go up in the tiled layout its kernels read (crate::tiled; T4's `fits` implies
        // the layout's, and a weight that fitted one but not the other would decode with tc3),
        // everything else row-major.
        let kernel = if kernel == GemvKernel::T4 && !crate::tiled::fits(n, k, bs) {
            GemvKernel::Tc3
        } else {
            kernel
        };
        let tiled = kernel == GemvKernel::T4;
        let dummy_f = device.clone_htod(&[0f32][..])?;
        let dummy_u = device.clone_htod(&[0u8][..])?;
        let (plain, absmax, qabs, nested, ncode, offset) = match &t.absmax {
            Absmax::Plain(a) => (
                1u32,
                if tiled {
                    device.clone_htod(&crate::tiled::tile_blocks(a, n, k))?
                } else {
                    device.clone_htod(&a[..])?
                },
                dummy_u,
                dummy_f.clone(),
                dummy_f,
                0f32,
            ),
            Absmax::Double(d) => (
                0u32,
                dummy_f,
                if tiled {
                    device.clone_htod(&crate::tiled::tile_blocks(&d.quantized, n, k))?
                } else {
                    device.clone_htod(&d.quantized[..])?
                },
                device.clone_htod(&d.nested_absmax[..])?,
                device.clone_htod(&d.nested_code[..])?,
                d.offset,
            ),
        };
        let packed = if tiled {
            device.clone_htod(&crate::tiled::tile_packed(&t.packed, n, k))?
        } else {
            device.clone_htod(&t.packed[..])?
        };
        let code = device.clone_htod(&t.code[..])?;
        let bytes = packed.len()
            + code.len() * 4
            + absmax.len() * 4
            + qabs.len()
            + nested.len() * 4
            + ncode.len() * 4;
        let load = |name: &str| -> candle_core::Result<CudaFunction> {
            crate::module_cuda::function(device, &crate::module_cuda::NF4, name)
        };
        let gemv = (1..=GEMV_MAX_ROWS)
            .map(|m| {
                let (name, rows) = kernel.entry(m);
                Ok((load(&name)?, rows))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            device: device.clone(),
            stream: device.cuda_stream(),
            packed,
            code,
            plain,
            absmax,
            qabs,
            nested,
            ncode,
            offset,
            log2_bs: bs.trailing_zeros(),
            numel: t.numel(),
            n,
            k,
            bytes,
            dequant: load(if tiled {
                "nf4_dequantize_tiled_bf16"
            } else {
                "nf4_dequantize_bf16"
            })?,
            tiled,
            gemv_lora: std::sync::OnceLock::new(),
            gemv_group: Default::default(),
            gemv_group_pdl: Default::default(),
            kernel,
            gemv,
        })
    }

    /// Device bytes held by this weight.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The GEMV kernel this weight decodes with.
    pub fn gemv_kernel(&self) -> GemvKernel {
        self.kernel
    }

    /// (out, in) features.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Whether this weight decodes with a tensor-core kernel (and so fits the grouped one).
    pub(crate) fn tensor_cores(&self) -> bool {
        self.kernel.tensor_cores()
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device addresses of (packed codes, code table, absmax, quantized absmax, nested absmax,
    /// nested code), with the guards that order their use on `stream` (kept until the launch is
    /// queued).
    pub(crate) fn pointers<'a>(
        &'a self,
        stream: &'a CudaStream,
        guards: &mut Vec<SyncOnDrop<'a>>,
    ) -> (u64, u64, u64, u64, u64, u64) {
        let mut p = |s: u64, g: SyncOnDrop<'a>| {
            guards.push(g);
            s
        };
        let (a, g) = self.packed.device_ptr(stream);
        let packed = p(a, g);
        let (a, g) = self.code.device_ptr(stream);
        let code = p(a, g);
        let (a, g) = self.absmax.device_ptr(stream);
        let absmax = p(a, g);
        let (a, g) = self.qabs.device_ptr(stream);
        let qabs = p(a, g);
        let (a, g) = self.nested.device_ptr(stream);
        let nested = p(a, g);
        let (a, g) = self.ncode.device_ptr(stream);
        let ncode = p(a, g);
        (packed, code, absmax, qabs, nested, ncode)
    }

    /// The kernels `{prefix}_bf16_m1 ..= _m8` of cuda/nf4.cu, loaded into `cell` on first use (the
    /// decode path then launches them without a name lookup).
    fn row_functions<'a>(
        &self,
        cell: &'a std::sync::OnceLock<Vec<CudaFunction>>,
        prefix: &str,
    ) -> candle_core::Result<&'a [CudaFunction]> {
        if let Some(f) = cell.get() {
            return Ok(f);
        }
        let loaded = (1..=GEMV_MAX_ROWS)
            .map(|r| {
                crate::module_cuda::function(
                    &self.device,
                    &crate::module_cuda::NF4,
                    &format!("{prefix}_bf16_m{r}"),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(cell.get_or_init(|| loaded))
    }

    /// The grouped tensor-core GEMV this weight decodes with for `kind`: its name prefix
    /// (`{prefix}_bf16_m{rows}`) and warps per block, one mapping so the two always agree (the LoRA
    /// kernels have a ninth warp, which computes the epilogue and its share of an in-launch
    /// shrink).
    fn group_kernel(&self, kind: GroupKernel) -> (&'static str, u32) {
        let lora_warp = GEMV_WARPS + 1;
        match (kind, self.kernel == GemvKernel::T4) {
            (GroupKernel::Lora, true) => ("nf4_gemv_t4g_lora", lora_warp),
            (GroupKernel::Lora, false) => ("nf4_gemv_tcg_lora", lora_warp),
            (GroupKernel::Base, true) => ("nf4_gemv_t4g", GEMV_WARPS),
            (GroupKernel::Base, false) => ("nf4_gemv_tcg", GEMV_WARPS),
        }
    }

    fn group_prefix(&self, kind: GroupKernel) -> &'static str {
        self.group_kernel(kind).0
    }

    /// Warps per block of [`Self::group_function`]`(_, kind)`.
    pub(crate) fn group_warps(&self, kind: GroupKernel) -> u32 {
        self.group_kernel(kind).1
    }

    /// The grouped tensor-core GEMV of `kind` for `m` (1..=8) input rows.
    pub(crate) fn group_function(
        &self,
        m: usize,
        kind: GroupKernel,
    ) -> candle_core::Result<&CudaFunction> {
        let cell = &self.gemv_group[kind.index()];
        self.row_functions(cell, self.group_prefix(kind))?
            .get(m.wrapping_sub(1))
            .ok_or_else(|| msg(format!("grouped gemv: {m} rows (1..={GEMV_MAX_ROWS})")))
    }

    /// [`Self::group_function`] for a programmatic dependent launch; `None` when the device or
    /// `QLORAD_PDL=0` rules it out.
    pub(crate) fn group_function_pdl(
        &self,
        m: usize,
        kind: GroupKernel,
    ) -> candle_core::Result<Option<crate::pdl_cuda::RawFunction>> {
        if m == 0 || m > GEMV_MAX_ROWS {
            return Ok(None);
        }
        // Settled once per weight: the device query stays off the per-launch path.
        let cell = &self.gemv_group_pdl[kind.index()];
        if let Some(funcs) = cell.get() {
            return Ok(funcs.as_ref().and_then(|f| f.get(m - 1)).copied());
        }
        let loaded = if crate::pdl_cuda::enabled(&self.device) {
            let prefix = self.group_prefix(kind);
            Some(
                (1..=GEMV_MAX_ROWS)
                    .map(|r| {
                        crate::pdl_cuda::raw_function(
                            &self.device,
                            &crate::module_cuda::NF4,
                            &format!("{prefix}_bf16_m{r}"),
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let funcs = cell.get_or_init(|| loaded);
        Ok(funcs.as_ref().and_then(|f| f.get(m - 1)).copied())
    }

    /// (offset, plain flag, log2 of the blocksize): the weight's scalar kernel arguments.
    pub(crate) fn scalars(&self) -> (f32, u32, u32) {
        (self.offset, self.plain, self.log2_bs)
    }

    /// Pushes the weight's arguments, in the order every kernel of cuda/nf4.cu takes them after
    /// its input: packed codes, code table, plain flag, absmax, quantized absmax, nested absmax,
    /// nested code, offset, log2 of the blocksize.
    fn weight_args<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.packed)
            .arg(&self.code)
            .arg(&self.plain)
            .arg(&self.absmax)
            .arg(&self.qabs)
            .arg(&self.nested)
            .arg(&self.ncode)
            .arg(&self.offset)
            .arg(&self.log2_bs);
    }

    /// Dequantizes the whole weight to a fresh row-major (n, k) bf16 buffer.
    pub fn dequantize_bf16(&self) -> candle_core::Result<CudaSlice<bf16>> {
        // SAFETY: every element is written by the kernel below (one thread per 32-element chunk,
        // the partial last chunk element by element).
        let mut out = unsafe { self.device.alloc::<bf16>(self.numel) }?;
        let chunks = self.numel.div_ceil(32) as u32;
        let cfg = LaunchConfig {
            grid_dim: (chunks.div_ceil(DEQUANT_THREADS).max(1), 1, 1),
            block_dim: (DEQUANT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let numel = self.numel as u64;
        let k = self.k as u32;
        let mut b = self.stream.launch_builder(&self.dequant);
        self.weight_args(&mut b);
        if self.tiled {
            b.arg(&k);
        }
        b.arg(&numel).arg(&mut out);
        // SAFETY: argument types and order match nf4_dequantize_bf16, or with a tiled weight
        // nf4_dequantize_tiled_bf16 (k before numel; numel = n·k with n % 16 == 0 and k % 128 ==
        // 0, whole pieces); buffers hold numel elements.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    /// The fused GEMV for `m` ≤ [`GEMV_MAX_ROWS`] rows of `x` (m, k) into `y` (m, n).
    fn gemv_into(
        &self,
        x: &CudaView<'_, bf16>,
        m: usize,
        y: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, bf16>,
    ) -> candle_core::Result<()> {
        let (func, rows_per_warp) = &self.gemv[m - 1];
        let cfg = LaunchConfig {
            grid_dim: ((self.n as u32).div_ceil(GEMV_WARPS * rows_per_warp), 1, 1),
            block_dim: (32 * GEMV_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, k) = (self.n as u32, self.k as u32);
        let mut b = self.stream.launch_builder(func);
        b.arg(x);
        self.weight_args(&mut b);
        b.arg(&n).arg(&k).arg(y);
        // SAFETY: argument types and order match nf4_gemv_bf16_m{m}; x has m·k and y m·n elements,
        // k % 32 == 0 was checked by the caller.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// Kernel experiments (gpu-check's GEMV sweep): launches the sweep kernel
    /// `nf4_gemv_sweep_{name}` of cuda/nf4.cu on this weight for one row `x` (1, k) bf16 with
    /// `warps` warps per block; `x_shared`: the kernel stages x in dynamic shared memory;
    /// `resident`: the grid holds only the blocks that fit on the GPU at once (for the kernels
    /// that stride over rows), else one warp per row.
    pub fn gemv_sweep(
        &self,
        name: &str,
        warps: u32,
        x_shared: bool,
        resident: bool,
        x: &CudaView<'_, bf16>,
    ) -> candle_core::Result<CudaSlice<bf16>> {
        if self.tiled {
            return Err(msg(
                "gemv sweep: the sweep kernels read row-major weights, this one is tiled (t4)"
                    .into(),
            ));
        }
        if !self.k.is_multiple_of(32) || x.len() != self.k {
            return Err(msg(format!(
                "gemv sweep: x has {} values, the weight is {}x{}",
                x.len(),
                self.n,
                self.k
            )));
        }
        let func = crate::module_cuda::function(
            &self.device,
            &crate::module_cuda::NF4_SWEEP,
            &format!("nf4_gemv_sweep_{name}"),
        )?;
        // SAFETY: one output per row, written by lane 0 of its warp.
        let mut y = unsafe { self.device.alloc::<bf16>(self.n) }?;
        let mut blocks = (self.n as u32).div_ceil(warps);
        if resident {
            blocks = blocks.min(resident_blocks(&self.device, &func, 32 * warps)?);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: if x_shared { (self.k * 2) as u32 } else { 0 },
        };
        let (n, k) = (self.n as u32, self.k as u32);
        let mut b = self.stream.launch_builder(&func);
        b.arg(x);
        self.weight_args(&mut b);
        b.arg(&n).arg(&k).arg(&mut y);
        // SAFETY: the sweep kernels take the GEMV's arguments for one input row; x holds k and y
        // n bf16; the dynamic shared memory holds x when the kernel stages it (k·2 bytes <= 48 KB
        // for the shapes gpu-check sweeps).
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    /// `y (m, n) = x (m, k) · Wᵀ + each row's LoRA delta`, bf16, for m ≤ [`GEMV_MAX_ROWS`]: the
    /// GEMV (`tc` when this weight decodes with a tensor-core kernel, else lut16) with the BGMV
    /// expand in its epilogue, after [`crate::bgmv::BgmvPlan::shrink_for_gemv`]
    /// (one rounding of y instead of the GEMV's and the expand's). Errors when the shape does not
    /// fit the kernel (the caller checks first and otherwise keeps the two-step path).
    pub fn xwt_lora(
        &self,
        x: &CudaView<'_, bf16>,
        m: usize,
        x16: bool,
        lora: &crate::bgmv::GemvLora,
    ) -> candle_core::Result<CudaSlice<bf16>> {
        let (n, k) = (self.n, self.k);
        if m == 0
            || m > GEMV_MAX_ROWS
            || !k.is_multiple_of(32)
            || !x16
            || m != lora.rows
            || lora.out_f != n
            || lora.parts > 1
        {
            return Err(msg(format!(
                "gemv with LoRA epilogue: {m} rows of {k} -> {n} (x aligned: {x16}) do not fit \
                 (plan: {} rows, {} outputs, t in {} partials)",
                lora.rows, lora.out_f, lora.parts
            )));
        }
        let tc = self.kernel.tensor_cores();
        let prefix = match self.kernel {
            GemvKernel::T4 => "nf4_gemv_t4_lora",
            _ if tc => "nf4_gemv_tc_lora",
            _ => "nf4_gemv_lora",
        };
        let funcs = self.row_functions(&self.gemv_lora, prefix)?;
        // SAFETY: written by lane 0 of each row's warp below (lut16), or by warp 0 of each
        // 16-feature block (tc).
        let mut y = unsafe { self.device.alloc::<bf16>(m * n) }?;
        // tc: 16 features per block, and a ninth warp computing their LoRA expand.
        let (rows_per_block, warps) = if tc {
            (2 * GEMV_WARPS, GEMV_WARPS + 1)
        } else {
            (GEMV_WARPS, GEMV_WARPS)
        };
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n32, k32) = (n as u32, k as u32);
        let mut b = self.stream.launch_builder(&funcs[m - 1]);
        b.arg(x);
        self.weight_args(&mut b);
        b.arg(&n32)
            .arg(&k32)
            .arg(&mut y)
            .arg(&lora.row_tables)
            .arg(&lora.slot)
            .arg(&lora.t)
            .arg(&lora.t_stride);
        // SAFETY: argument types and order match nf4_gemv_lora_bf16_m{m},
        // nf4_gemv_tc_lora_bf16_m{m} and nf4_gemv_t4_lora_bf16_m{m} (tc, t4: the weight passed
        // `fits` for its kernel); x has m·k and y m·n
        // elements, k % 32 == 0; the row tables hold m rows (m == the plan's rows) whose modules at
        // `slot` have n outputs, and t holds the plan's shrink output for this slot, written
        // earlier on this stream.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    /// `y (m, n) = x (m, k) · Wᵀ`, bf16. `x16`: x starts on a 16-byte boundary (the GEMV loads it
    /// 16 bytes at a time).
    pub fn xwt(
        &self,
        x: &CudaView<'_, bf16>,
        m: usize,
        x16: bool,
    ) -> candle_core::Result<CudaSlice<bf16>> {
        let (n, k) = (self.n, self.k);
        // SAFETY: fully written by the GEMV groups or the GEMM below.
        let mut y = unsafe { self.device.alloc::<bf16>(m * n) }?;
        if m <= GEMV_BATCH_ROWS && k % 32 == 0 && x16 {
            let mut r0 = 0;
            while r0 < m {
                let r = (m - r0).min(GEMV_MAX_ROWS);
                let xv = x.slice(r0 * k..(r0 + r) * k);
                let mut yv = y.slice_mut(r0 * n..(r0 + r) * n);
                self.gemv_into(&xv, r, &mut yv)?;
                r0 += r;
            }
            return Ok(y);
        }
        let w = self.dequantize_bf16()?;
        // Row-major y (m, n) is column-major yᵀ (n, m) = op(W)·xᵀ with W column-major (k, n).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: the buffers hold n·k, m·k and m·n elements as the leading dimensions state.
        unsafe { self.device.cublas_handle().gemm(cfg, &w, x, &mut y) }.w()?;
        Ok(y)
    }

    /// `dx (m, k) = dy (m, n) · W`, bf16.
    pub fn dyw(&self, dy: &CudaView<'_, bf16>, m: usize) -> candle_core::Result<CudaSlice<bf16>> {
        let (n, k) = (self.n, self.k);
        let w = self.dequantize_bf16()?;
        // SAFETY: fully written by the GEMM.
        let mut dx = unsafe { self.device.alloc::<bf16>(m * k) }?;
        // Column-major dxᵀ (k, m) = W (column-major (k, n)) · dyᵀ (column-major (n, m)).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: k as i32,
            n: m as i32,
            k: n as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: n as i32,
            beta: bf16::ZERO,
            ldc: k as i32,
        };
        // SAFETY: the buffers hold n·k, m·n and m·k elements as the leading dimensions state.
        unsafe { self.device.cublas_handle().gemm(cfg, &w, dy, &mut dx) }.w()?;
        Ok(dx)
    }
}

/// Shared body of the forward and gradient ops: checks the input, runs `f` on its rows, and
/// returns `(..., out_features)`.
pub(crate) fn apply(
    op: &'static str,
    gpu: Option<&Nf4Gpu>,
    storage: &CudaStorage,
    layout: &Layout,
    in_features: usize,
    out_features: usize,
    f: impl FnOnce(&Nf4Gpu, &CudaView<'_, bf16>, usize, bool) -> candle_core::Result<CudaSlice<bf16>>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let gpu = gpu.ok_or_else(|| {
        msg(format!(
            "{op}: the NF4 weight is not on the GPU (move the model with Nf4Weight::to_device)"
        ))
    })?;
    let dev = storage.device();
    if dev.id() != gpu.device.id() {
        return Err(msg(format!(
            "{op}: input on {:?}, weight on {:?}",
            dev, gpu.device
        )));
    }
    let dims = layout.shape().dims();
    let kin = *dims.last().unwrap_or(&0);
    if kin != in_features {
        return Err(msg(format!(
            "{op}: input has {kin} features, the weight expects {in_features}"
        )));
    }
    let slice = storage.as_cuda_slice::<bf16>().map_err(|_| {
        msg(format!(
            "{op}: unsupported dtype {:?} on CUDA (compute is bf16)",
            storage.dtype()
        ))
    })?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op })?;
    let x = slice.slice(a..b);
    let m = (b - a) / kin.max(1);
    // Allocations are 256-byte aligned, so the view's element offset decides the alignment.
    let y = f(gpu, &x, m, a % 8 == 0)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from(out_dims),
    ))
}
