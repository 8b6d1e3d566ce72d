//! The CUDA side of BGMV (behind the `cuda` feature): per-adapter device tables of module
//! addresses, the per-forward plan that maps rows to tables, and the launches of the shrink and
//! expand kernels of `cuda/lora.cu` (Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023).
//!
//! Each placed adapter uploads, once, a table with one entry per (layer, projection) slot: the
//! device addresses of its bf16 A (r, in) and B (out, r), its rank and its scale. A forward pass
//! uploads one address per row (that row's adapter table, or 0); each projection then costs two
//! launches for all rows, whatever mix of adapters and ranks they use, and so does each group of
//! up to [`MAX_GROUP`] projections that read the same input (grid z picks the projection).
//!
//! Addresses are raw: the table keeps the A and B tensors alive (clones of the `Tensor`s), and the
//! plan keeps the tables alive. All work runs on candle's one stream of the device, so stream order
//! alone orders the kernels after the writes of A, B, x and y (see `Placement::open`).

use crate::bgmv::BgmvModule;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use std::sync::Arc;

/// u64 words per slot of an adapter table: A's address, B's address, rank | scale bits << 32.
const TABLE_WORDS: usize = 3;
// Launch geometry; must match the #defines of cuda/lora.cu.
const SHRINK_THREADS: u32 = 256;
const SHRINK_RANKS: u32 = 4;

/// The shrink kernel and its rank outputs per block: `lora_bgmv_shrink_r1` (1), or with
/// `QLORAD_SHRINK_RANKS=4` `lora_bgmv_shrink` (4: a quarter of the blocks, each reusing its x
/// chunks for four ranks). One rank per block measured faster at batch 1 on the H200 (decode with
/// an r=64 adapter 210.3 vs 200.6 tok/s, same machine; the shrink is latency-bound there).
fn shrink_kernel() -> (&'static str, u32) {
    static FOUR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *FOUR.get_or_init(|| std::env::var("QLORAD_SHRINK_RANKS").is_ok_and(|v| v == "4")) {
        ("lora_bgmv_shrink", SHRINK_RANKS)
    } else {
        ("lora_bgmv_shrink_r1", 1)
    }
}

const EXPAND_THREADS: u32 = 128;
/// Most projections one launch pair serves (q, k and v); `MAX_GROUP` in cuda/lora.cu.
pub const MAX_GROUP: usize = 3;
/// Most rows one plan takes (the grid's y dimension).
const MAX_GRID_ROWS: usize = 65_535;

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// The device address of the first element of a contiguous bf16 tensor on `dev`; `None` if the
/// tensor is elsewhere, of another dtype or not contiguous.
pub(crate) fn bf16_addr(t: &Tensor, dev: &CudaDevice, stream: &CudaStream) -> Option<u64> {
    if t.dtype() != DType::BF16 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return None;
    };
    if cs.device().id() != dev.id() {
        return None;
    }
    let (start, _) = layout.contiguous_offsets()?;
    let slice = cs.as_cuda_slice::<bf16>().ok()?;
    let (ptr, _record) = slice.device_ptr(stream);
    Some(ptr + (start * 2) as u64)
}

/// Per slot: rank (0: no module), in and out features.
#[derive(Debug, Clone, Copy, Default)]
struct SlotInfo {
    rank: u32,
    in_f: usize,
    out_f: usize,
}

/// One adapter's module table on its GPU.
pub struct AdapterTable {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    table: CudaSlice<u64>,
    addr: u64,
    slots: Vec<SlotInfo>,
    shrink: CudaFunction,
    expand: CudaFunction,
    /// The A and B tensors whose addresses the table holds, kept alive with it.
    _keep: Vec<Tensor>,
}

impl std::fmt::Debug for AdapterTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.iter().filter(|s| s.rank > 0).count();
        write!(
            f,
            "AdapterTable({:?}, {n}/{} slots)",
            self.device,
            self.slots.len()
        )
    }
}

impl AdapterTable {
    /// The table of `modules` (indexed by slot). `None` when BGMV cannot serve them: no module, a
    /// module not on a CUDA device, not bf16, not contiguous, shapes that do not agree, or modules
    /// on different GPUs (the caller keeps the gather path for such an adapter).
    pub fn build(modules: &[Option<BgmvModule<'_>>]) -> candle_core::Result<Option<Self>> {
        let Some(first) = modules.iter().flatten().next() else {
            return Ok(None);
        };
        let Device::Cuda(device) = first.a.device() else {
            return Ok(None);
        };
        let device = device.clone();
        let stream = device.cuda_stream();
        let mut words = Vec::with_capacity(modules.len() * TABLE_WORDS);
        let mut slots = Vec::with_capacity(modules.len());
        let mut keep = Vec::new();
        for m in modules {
            let Some(m) = m else {
                words.extend_from_slice(&[0; TABLE_WORDS]);
                slots.push(SlotInfo::default());
                continue;
            };
            let (Ok((r, in_f)), Ok((out_f, rb))) = (m.a.dims2(), m.b.dims2()) else {
                return Ok(None);
            };
            if r == 0 || r != rb || r > u32::MAX as usize || !m.scale.is_finite() {
                return Ok(None);
            }
            let (Some(a), Some(b)) = (
                bf16_addr(m.a, &device, &stream),
                bf16_addr(m.b, &device, &stream),
            ) else {
                return Ok(None);
            };
            let scale_bits = (m.scale as f32).to_bits() as u64;
            words.extend_from_slice(&[a, b, r as u64 | (scale_bits << 32)]);
            slots.push(SlotInfo {
                rank: r as u32,
                in_f,
                out_f,
            });
            keep.push(m.a.clone());
            keep.push(m.b.clone());
        }
        let table = device.clone_htod(&words[..])?;
        let addr = table.device_ptr(&stream).0;
        let load = |name: &str| -> candle_core::Result<CudaFunction> {
            crate::module_cuda::function(&device, &crate::module_cuda::LORA, name)
        };
        Ok(Some(Self {
            shrink: load(shrink_kernel().0)?,
            expand: load("lora_bgmv_expand")?,
            device,
            stream,
            table,
            addr,
            slots,
            _keep: keep,
        }))
    }

    /// Slots in the table (layers × 7 for a model's adapter).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Device bytes of the table itself (the modules are counted by their adapter).
    pub fn bytes(&self) -> usize {
        self.table.len() * 8
    }
}

/// What one slot needs from the batch: the largest rank among its rows (0: nothing to do) and
/// the (in, out) features every adapter there has.
#[derive(Debug, Clone, Copy, Default)]
struct SlotPlan {
    max_rank: u32,
    in_f: usize,
    out_f: usize,
}

/// The epilogue arguments of a GEMV that adds a projection's LoRA expand
/// ([`BgmvPlan::shrink_for_gemv`]): device addresses of the plan's row tables and of this
/// projection's shrink output, t (rows, t_stride) f32.
#[derive(Debug, Clone, Copy)]
pub struct GemvLora {
    pub row_tables: u64,
    pub slot: u32,
    pub t: u64,
    pub t_stride: u32,
    /// Rows of the plan (the GEMV's input rows must be these).
    pub rows: usize,
    /// Output features of the adapters' modules at this slot (checked against the weight).
    pub out_f: usize,
    /// Whether any row has a module at this slot (else the plain GEMV suffices).
    pub active: bool,
    /// Device address of the plan's shrink counters when the grouped GEMV runs the shrink itself
    /// ([`BgmvPlan::gemv_loras_fused`]); 0 when the shrink was launched before it.
    pub counters: u64,
    /// The largest rank at the group's slots over the plan's rows.
    pub max_rank: u32,
    /// Floats between the partials of t: the in-launch shrink's k chunks (`counters` set), or
    /// `parts` of them left by the shrink before the launch.
    pub part_stride: u32,
    /// Without counters: the partials of t the expand sums (1: whole dots; the norm launch's
    /// shrink leaves [`NormShrink::parts`]). Only the grouped tensor-core GEMV
    /// (`nf4_group_cuda`) sums them; the one-weight kernels take 1.
    pub parts: u32,
}

/// The largest rank over a group's slots (0: no row has a module there).
fn max_rank(group: &[SlotPlan]) -> u32 {
    group.iter().map(|s| s.max_rank).max().unwrap_or(0)
}

/// A group's shrink for the decode step's add + RMSNorm launch to compute from the rows it normalizes
/// ([`crate::decode_cuda::DecodeKernels::add_rms_norm_shrink`]): t_z[m, j] = normed[m] ·
/// A_{m, slot0 + z}[j] into the plan's scratch, where [`BgmvPlan::norm_shrink`]'s epilogue
/// descriptors read it.
#[derive(Debug, Clone, Copy)]
pub struct NormShrink {
    pub row_tables: u64,
    pub t: u64,
    pub slot0: u32,
    pub count: u32,
    pub max_rank: u32,
    pub t_stride: u32,
    /// Floats between consecutive slots' t.
    pub t_zstride: u32,
    /// k-chunk partials each dot is split into ([`crate::bgmv::norm_shrink_parts`]), `part_stride` floats
    /// apart; the epilogue descriptors sum them.
    pub parts: u32,
    pub part_stride: u32,
    /// Input features of the group's modules (the normed rows' length).
    pub in_f: usize,
    pub rows: usize,
}

/// k-chunk partials of t the in-launch shrink, or the norm launch's shrink, may write
/// (TC_SHRINK_CHUNKS in cuda/nf4_tc.cuh).
pub const SHRINK_CHUNKS: usize = 8;

/// A projection group's input as [`BgmvPlan::group_input`] checked it.
struct GroupInput {
    /// x made contiguous: held until the group's launches are queued (a copy's memory must not be
    /// freed, in stream order, before the kernels that read it).
    _x: Tensor,
    /// x's (address, bytes) on the device.
    span: (u64, u64),
    in_f: usize,
    /// The group's largest rank (> 0).
    max_rank: u32,
}

/// One forward pass's row → adapter mapping on the GPU, with the shrink's f32 scratch.
pub struct BgmvPlan {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    rows: usize,
    /// (rows,): each row's adapter table address, 0 for none.
    row_tables: CudaSlice<u64>,
    /// (SHRINK_CHUNKS, MAX_GROUP, rows, t_stride) f32, reused by every launch in stream order:
    /// the separately launched shrink writes chunk 0, the in-launch shrink k-chunk partials.
    scratch: CudaSlice<f32>,
    /// The grouped GEMV's in-launch shrink counters (4 u32, zero between launches).
    counters: CudaSlice<u32>,
    t_stride: usize,
    slots: Vec<SlotPlan>,
    shrink: CudaFunction,
    expand: CudaFunction,
    /// The row addresses on the host (what `row_tables` holds).
    row_addrs: Vec<u64>,
    /// [`BgmvPlan::fingerprint`], hashed on first use (a replayed decode step asks for it up to
    /// three times; the shape it hashes never changes).
    print: std::sync::OnceLock<u64>,
    /// The tables the row addresses point into, kept alive with the plan.
    _tables: Vec<Arc<AdapterTable>>,
}

impl std::fmt::Debug for BgmvPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BgmvPlan({:?}, {} rows, {} adapters, t_stride {})",
            self.device,
            self.rows,
            self._tables.len(),
            self.t_stride
        )
    }
}

impl BgmvPlan {
    /// The plan of a batch whose row i uses `per_row[i]`'s adapter (`None`: the base alone).
    /// `None` when no row has an adapter, or the adapters' tables disagree (different GPUs, slot
    /// counts or shapes) or there are too many rows: the caller keeps the gather path.
    pub fn new(per_row: &[Option<Arc<AdapterTable>>]) -> candle_core::Result<Option<Self>> {
        let mut tables: Vec<Arc<AdapterTable>> = Vec::new();
        for t in per_row.iter().flatten() {
            if !tables.iter().any(|u| Arc::ptr_eq(u, t)) {
                tables.push(t.clone());
            }
        }
        let Some(first) = tables.first() else {
            return Ok(None);
        };
        let n_slots = first.slots.len();
        if per_row.len() > MAX_GRID_ROWS
            || tables
                .iter()
                .any(|t| t.device.id() != first.device.id() || t.slots.len() != n_slots)
        {
            return Ok(None);
        }
        let mut slots = vec![SlotPlan::default(); n_slots];
        for t in &tables {
            for (p, s) in slots.iter_mut().zip(&t.slots) {
                if s.rank == 0 {
                    continue;
                }
                if p.max_rank > 0 && (p.in_f, p.out_f) != (s.in_f, s.out_f) {
                    return Ok(None);
                }
                p.max_rank = p.max_rank.max(s.rank);
                p.in_f = s.in_f;
                p.out_f = s.out_f;
            }
        }
        // A multiple of 4: the expand reads t rows 16 bytes at a time.
        let max_rank = max_rank(&slots) as usize;
        let t_stride = max_rank.max(1).next_multiple_of(4);
        let device = first.device.clone();
        let addrs: Vec<u64> = per_row
            .iter()
            .map(|t| t.as_ref().map_or(0, |t| t.addr))
            .collect();
        let row_tables = device.clone_htod(&addrs[..])?;
        let row_addrs = addrs;
        // SAFETY: the expand reads only the entries t_z[row, j < r_row] that the shrink of the same
        // slots wrote before it in stream order; nothing else reads the scratch.
        let scratch =
            unsafe { device.alloc::<f32>(SHRINK_CHUNKS * MAX_GROUP * per_row.len() * t_stride) }?;
        let counters = device.clone_htod(&[0u32; 4][..])?;
        Ok(Some(Self {
            stream: first.stream.clone(),
            shrink: first.shrink.clone(),
            expand: first.expand.clone(),
            device,
            rows: per_row.len(),
            row_tables,
            scratch,
            counters,
            t_stride,
            slots,
            row_addrs,
            print: std::sync::OnceLock::new(),
            _tables: tables,
        }))
    }

    /// The BGMV shrink alone for the projections of slots `slot0 .. slot0 + n` reading `x`
    /// (rows, in), for GEMVs that apply the expand in their epilogue
    /// ([`crate::cuda::Nf4Gpu::xwt_lora`]): one launch, and each projection's epilogue arguments.
    /// Those stay valid until the next launch of this plan (they point into its scratch, which
    /// the next shrink overwrites in stream order). `None` when no row has a module at these
    /// slots (nothing to launch or add).
    pub fn shrink_for_gemv(
        &self,
        slot0: usize,
        n: usize,
        x: &Tensor,
    ) -> candle_core::Result<Option<Vec<GemvLora>>> {
        self.gemv_descriptors(slot0, n, x, true)
    }

    /// [`BgmvPlan::shrink_for_gemv`] without the shrink launch: the descriptors for the grouped
    /// tensor-core GEMV, which runs the shrink inside its own launch
    /// (`qlorad_kernels::nf4_group_cuda`). The caller must pass them to that kernel, or launch the
    /// shrink with [`BgmvPlan::shrink_for_gemv`] instead.
    pub fn gemv_loras_fused(
        &self,
        slot0: usize,
        n: usize,
        x: &Tensor,
    ) -> candle_core::Result<Option<Vec<GemvLora>>> {
        self.gemv_descriptors(slot0, n, x, false)
    }

    /// The shrink of slots `slot0 .. slot0 + n` for the add + RMSNorm launch that produces their
    /// input (rows, `in_f`) to run, each dot in up to `parts` k-chunk partials (1..=
    /// [`SHRINK_CHUNKS`]; only the grouped GEMV sums more than one), and the GEMV epilogue
    /// descriptors that read its result (valid until the plan's next launch, as
    /// [`BgmvPlan::shrink_for_gemv`]'s). `None` when no row has a module at these slots.
    pub fn norm_shrink(
        &self,
        slot0: usize,
        n: usize,
        in_f: usize,
        parts: usize,
    ) -> candle_core::Result<Option<(NormShrink, Vec<GemvLora>)>> {
        let group = self.group(slot0, n)?;
        let max_rank = max_rank(group);
        if max_rank == 0 {
            return Ok(None);
        }
        if group.iter().any(|s| s.max_rank > 0 && s.in_f != in_f) {
            return Err(msg(format!(
                "bgmv: the adapters' input features at slots {slot0}..{} are not {in_f}",
                slot0 + n
            )));
        }
        let (row_tables, _g) = self.row_tables.device_ptr(&self.stream);
        let (t, _g2) = self.scratch.device_ptr(&self.stream);
        let parts = parts
            .min(SHRINK_CHUNKS)
            .min(in_f / crate::norm_shrink_cuda::NORM_PART_MIN)
            .max(1);
        let mut epis = self.gemv_loras(slot0, n, max_rank, 0);
        for e in &mut epis {
            e.parts = parts as u32;
        }
        let shrink = NormShrink {
            row_tables,
            t,
            slot0: slot0 as u32,
            count: n as u32,
            max_rank,
            t_stride: self.t_stride as u32,
            t_zstride: (self.rows * self.t_stride) as u32,
            parts: parts as u32,
            part_stride: epis[0].part_stride,
            in_f,
            rows: self.rows,
        };
        Ok(Some((shrink, epis)))
    }

    /// The plan's slots `slot0 .. slot0 + n`, a group of 1..=MAX_GROUP inside the tables.
    fn group(&self, slot0: usize, n: usize) -> candle_core::Result<&[SlotPlan]> {
        if n == 0 || n > MAX_GROUP || slot0 + n > self.slots.len() {
            return Err(msg(format!(
                "bgmv: slots {slot0}..{} for a plan of {} (groups of 1..={MAX_GROUP})",
                slot0 + n,
                self.slots.len()
            )));
        }
        Ok(&self.slots[slot0..slot0 + n])
    }

    /// The epilogue descriptors of slots `slot0 .. slot0 + n` for input `x`, after launching the
    /// shrink (`launch`) or for a GEMV that runs it (the plan's counters in the descriptors).
    fn gemv_descriptors(
        &self,
        slot0: usize,
        n: usize,
        x: &Tensor,
        launch: bool,
    ) -> candle_core::Result<Option<Vec<GemvLora>>> {
        self.group(slot0, n)?;
        let Some(input) = self.group_input(slot0, n, x)? else {
            return Ok(None);
        };
        let counters = if launch {
            self.launch_shrink(input.span.0, input.in_f, slot0, n, input.max_rank)?;
            0
        } else {
            self.counters.device_ptr(&self.stream).0
        };
        Ok(Some(self.gemv_loras(slot0, n, input.max_rank, counters)))
    }

    fn gemv_loras(&self, slot0: usize, n: usize, max_rank: u32, counters: u64) -> Vec<GemvLora> {
        let group = &self.slots[slot0..slot0 + n];
        let t_stride = self.t_stride as u32;
        let (tables, _g) = self.row_tables.device_ptr(&self.stream);
        let (scratch, _g2) = self.scratch.device_ptr(&self.stream);
        (0..n)
            .map(|z| GemvLora {
                row_tables: tables,
                slot: (slot0 + z) as u32,
                t: scratch + (z * self.rows * self.t_stride * 4) as u64,
                t_stride,
                rows: self.rows,
                out_f: group[z].out_f,
                active: group[z].max_rank > 0,
                counters,
                max_rank,
                part_stride: (MAX_GROUP * self.rows * self.t_stride) as u32,
                parts: 1,
            })
            .collect()
    }

    /// The input `x` (rows, in) of the projections at slots `slot0 .. slot0 + n` (inside the
    /// tables), checked against the plan; `None` when no row has a module there.
    fn group_input(
        &self,
        slot0: usize,
        n: usize,
        x: &Tensor,
    ) -> candle_core::Result<Option<GroupInput>> {
        let group = &self.slots[slot0..slot0 + n];
        let max_rank = max_rank(group);
        if max_rank == 0 {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (rows, in_f) = x.dims2()?;
        if rows != self.rows || group.iter().any(|s| s.max_rank > 0 && s.in_f != in_f) {
            return Err(msg(format!(
                "bgmv: input ({rows}, {in_f}) does not fit the plan ({} rows) and the adapters' \
                 input features at slots {slot0}..{}",
                self.rows,
                slot0 + n
            )));
        }
        let span = self.span(&x, "the input")?;
        Ok(Some(GroupInput {
            _x: x,
            span,
            in_f,
            max_rank,
        }))
    }

    /// The shrink for slots `slot0 .. slot0 + groups` of the input at device address `x` (rows,
    /// in_f) into the scratch. The callers have checked that x holds rows·in_f bf16 and that
    /// every module at these slots reads in_f features; `max_rank` is the largest rank there.
    fn launch_shrink(
        &self,
        x: u64,
        in_f: usize,
        slot0: usize,
        groups: usize,
        max_rank: u32,
    ) -> candle_core::Result<()> {
        let (rows, in_f) = (self.rows as u32, in_f as u32);
        let (t_stride, slot0, groups) = (self.t_stride as u32, slot0 as u32, groups as u32);
        let cfg = LaunchConfig {
            grid_dim: (max_rank.div_ceil(shrink_kernel().1), rows, groups),
            block_dim: (SHRINK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&self.shrink);
        l.arg(&x)
            .arg(&in_f)
            .arg(&self.row_tables)
            .arg(&slot0)
            .arg(&self.scratch)
            .arg(&t_stride);
        // SAFETY: argument types and order match lora_bgmv_shrink. x holds rows·in bf16; the
        // scratch MAX_GROUP·rows·t_stride f32 with t_stride >= every rank (plan construction); the
        // slots exist in every table and their modules read `in` features (checked by the
        // callers). The scratch is written through a shared reference: only these kernels use
        // it, in stream order.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }

    /// Rows of the batch this plan was built for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// What the plan's launches depend on besides the contents of its buffers: its rows, t's
    /// stride and each slot's largest rank and features, hashed. Two plans with the same
    /// fingerprint launch the same kernels with the same shapes for the same input, whichever
    /// adapters their rows use (a captured decode step keys on it, model/src/llama_graph.rs).
    pub fn fingerprint(&self) -> u64 {
        *self.print.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (self.rows, self.t_stride).hash(&mut h);
            for s in &self.slots {
                (s.max_rank, s.in_f, s.out_f).hash(&mut h);
            }
            h.finish()
        })
    }

    /// Makes `self` (a plan a captured step keeps) address the adapters of `current`, a plan of
    /// the same fingerprint: its row tables are rewritten in place (stream-ordered, same device
    /// address), and it holds no adapter of its own (`current`'s caller keeps them alive).
    pub fn readdress(&mut self, current: &BgmvPlan) -> candle_core::Result<()> {
        if current.fingerprint() != self.fingerprint() || current.row_addrs.len() != self.rows {
            return Err(msg(
                "bgmv: readdressing a plan from one of another shape".to_string()
            ));
        }
        if current.row_addrs != self.row_addrs {
            self.stream
                .memcpy_htod(&current.row_addrs[..], &mut self.row_tables)
                .w()?;
            self.row_addrs.clone_from(&current.row_addrs);
        }
        self._tables.clear();
        Ok(())
    }

    /// Lets go of the adapters the plan was made for (a captured step keeps the plan's buffers,
    /// not its adapters; every replay [`BgmvPlan::readdress`]es it first).
    pub fn detach(&mut self) {
        self._tables.clear();
    }

    /// Adds every row's LoRA delta of `slot` to `y` (rows, out) in place, given the projection's
    /// input `x` (rows, in): [`BgmvPlan::apply_group`] with one output.
    pub fn apply(&self, slot: usize, x: &Tensor, y: &Tensor) -> candle_core::Result<()> {
        self.apply_group(slot, x, &[y])
    }

    /// The address and byte length of a contiguous bf16 tensor on the plan's GPU.
    fn span(&self, t: &Tensor, what: &str) -> candle_core::Result<(u64, u64)> {
        let addr = bf16_addr(t, &self.device, &self.stream).ok_or_else(|| {
            msg(format!(
                "bgmv: {what} must be a contiguous bf16 tensor on {:?} (got {:?} on {:?})",
                self.device,
                t.dtype(),
                t.device()
            ))
        })?;
        Ok((addr, (t.elem_count() * 2) as u64))
    }

    /// For the projections of slots `slot0 .. slot0 + ys.len()` that all read `x` (rows, in)
    /// (q/k/v, or gate/up), adds every row's LoRA delta to their outputs `ys[i]` (rows, out_i) in
    /// place: one shrink and one expand launch for all of them, none when no row has a module
    /// there. x and the outputs are contiguous bf16 on the plan's GPU; the outputs must be fresh
    /// tensors the caller alone holds (base projection outputs) and may not overlap x or each
    /// other (checked).
    pub fn apply_group(&self, slot0: usize, x: &Tensor, ys: &[&Tensor]) -> candle_core::Result<()> {
        let n = ys.len();
        if n == 0 || n > MAX_GROUP {
            return Err(msg(format!(
                "bgmv: {n} outputs in one group (1..={MAX_GROUP})"
            )));
        }
        if slot0 + n > self.slots.len() {
            // Slots past the tables have no module: serve the others one at a time.
            for (i, y) in ys.iter().enumerate() {
                if slot0 + i < self.slots.len() {
                    self.apply_group(slot0 + i, x, &[y])?;
                }
            }
            return Ok(());
        }
        let Some(input) = self.group_input(slot0, n, x)? else {
            return Ok(());
        };
        let (x_span, in_f, max_rank) = (input.span, input.in_f, input.max_rank);
        let group = &self.slots[slot0..slot0 + n];
        let mut spans = vec![x_span];
        let mut y_addr = [0u64; MAX_GROUP];
        let mut outs = [0u32; MAX_GROUP];
        for (i, (y, sp)) in ys.iter().zip(group).enumerate() {
            let (r, out_f) = y.dims2()?;
            if r != self.rows || (sp.max_rank > 0 && out_f != sp.out_f) || out_f > u32::MAX as usize
            {
                return Err(msg(format!(
                    "bgmv: output ({r}, {out_f}) at slot {} does not fit the plan ({} rows, {} \
                     features)",
                    slot0 + i,
                    self.rows,
                    sp.out_f
                )));
            }
            let s = self.span(y, "an output")?;
            if spans.iter().any(|&o| s.0 < o.0 + o.1 && o.0 < s.0 + s.1) {
                return Err(msg(
                    "bgmv: an output overlaps the input or another output".into()
                ));
            }
            spans.push(s);
            y_addr[i] = s.0;
            outs[i] = out_f as u32;
        }
        self.launch_shrink(x_span.0, in_f, slot0, n, max_rank)?;
        let rows = self.rows as u32;
        let (t_stride, slot0, groups) = (self.t_stride as u32, slot0 as u32, n as u32);
        let max_out = outs.iter().copied().max().unwrap_or(0).max(1);
        let cfg = LaunchConfig {
            grid_dim: (max_out.div_ceil(EXPAND_THREADS), rows, groups),
            block_dim: (EXPAND_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&self.expand);
        l.arg(&y_addr[0])
            .arg(&y_addr[1])
            .arg(&y_addr[2])
            .arg(&outs[0])
            .arg(&outs[1])
            .arg(&outs[2])
            .arg(&self.row_tables)
            .arg(&slot0)
            .arg(&self.scratch)
            .arg(&t_stride);
        // SAFETY: argument types and order match lora_bgmv_expand; output z < groups holds
        // rows·outs[z] bf16 (checked above; z >= groups is never launched) and every module of its
        // slot has outs[z] output features. The outputs are written through addresses taken under
        // read guards: they are fresh tensors only the caller holds, and all work on them is
        // ordered on this one stream.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}
