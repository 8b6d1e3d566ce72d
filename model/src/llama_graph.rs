//! The fused decode step captured as CUDA graphs and replayed (`qlorad_kernels::step_graph_cuda`
//! says why: the host's ~290 launches per step cost as much as the GPU's work).
//!
//! One graph per batch shape: the rows, the attention's split count (a launch dimension, set by
//! the longest context) and whether RoPE runs in the attention launch. Everything else a step
//! changes reaches the kernels through device memory the graph reads at fixed addresses: the
//! token ids and the KV table (positions, capacities and the caches' addresses, so a cache that
//! grows into a new buffer needs no new graph), both rewritten before each replay. The weights,
//! RoPE tables and the attention's counters are the model's and never move. The step's
//! activations are the graph's own allocations, and its logits the one it keeps: each replay is
//! followed by a copy of them, so a caller's logits outlive the next step.
//!
//! A batch with adapters on the BGMV path is captured as well, keyed also by its plan's
//! fingerprint (rows, t's stride, each slot's largest rank and features): the graph keeps the
//! plan's buffers (row tables, shrink scratch and counters) but not its adapters, and each replay
//! rewrites the row tables with the replaying batch's adapter addresses, so any adapters of the
//! same ranks replay it. Batches on the gather path or of more than 8 rows (past the fused
//! GEMVs) run eagerly, as do a shape's first step (the first use of a kernel loads its module and
//! cuBLAS its workspace, neither of which may happen during a capture) and any step while other
//! threads issue GPU work (`crate::gpu_gate`). A failed capture turns graphs off for the model,
//! with a warning, and the step runs eagerly: graphs can cost speed, never a result. So does a
//! captured step that copies from host memory (`StepGraph::host_copies`: candle ops that upload
//! their shapes at each call, which a replay would read stale; the step's embedding gather is
//! ours for that reason). The process-wide kernel switches (`QLORAD_*`, some of which gpu-check
//! flips) are taken as fixed while graphs are kept; [`Llama::set_decode_graphs`] drops them.
//!
//! On by default (`Placement::open` gives the device the stream of its own a capture needs);
//! `QLORAD_DECODE_GRAPH=0` runs every step eagerly on the legacy default stream. Measured in
//! session 19 (BENCHMARKS.md): the host's time per token 1.6-2.3 ms -> 0.03 ms, batch-1 decode
//! the same on a host fast enough to keep up with the GPU, and serving's latency during a
//! fine-tuning job back to its idle figures.

use super::Llama;
use crate::device::Placement;
use crate::error::Result;
use crate::graph_cache::{DecodeGraphStats, GraphCache, StepAction};
use crate::host_profile::{timed, Phase};
use crate::lora::LoraBatch;
use candle_core::{DType, Device, Tensor};
use qlorad_kernels::bgmv::BgmvPlan;
use qlorad_kernels::decode_cuda::{DecodeKernels, KvTable, KvWords};
use qlorad_kernels::step_graph_cuda::{self as sg, StepGraph};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Most graphs a model keeps; past it the oldest capture goes. Batch 1 over a 1k context needs
/// 32 (one per split count); each holds its step's activations (~1 MB at batch 1) and keeps its
/// logits (at most 8 rows: 1 MB for a 32k vocabulary).
const MAX_GRAPHS: usize = 64;

/// A shape is captured the second time it runs (the first runs eagerly: see the module docs).
const CAPTURE_AT: u32 = 2;

/// What a captured step's launches depend on besides device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StepShape {
    rows: usize,
    splits: usize,
    rope_in_attention: bool,
    /// The batch's BGMV plan's fingerprint (`BgmvPlan::fingerprint`); 0 without adapters.
    lora: u64,
}

/// One captured step. Field order is drop order: the logits (the graph's allocation) are freed
/// before the graph is destroyed.
struct Captured {
    logits: Tensor,
    ids: Tensor,
    table: KvTable,
    /// The BGMV plan the step was captured with (its row tables, scratch and counters; no
    /// adapters), readdressed to each replay's adapters.
    plan: Option<BgmvPlan>,
    graph: StepGraph,
}

struct State {
    on: bool,
    cache: GraphCache<StepShape, Captured>,
    /// `qlorad_kernels::switch::epoch()` when the kept graphs were captured: a kernel switch
    /// flipped since (gpu-check flips them) makes them stale.
    epoch: u64,
}

/// A model's captured decode steps.
pub(super) struct DecodeGraphs {
    /// Whether the placement can capture at all (a GPU in bf16 on a stream of its own).
    capturable: bool,
    state: Mutex<State>,
}

impl DecodeGraphs {
    pub(super) fn for_placement(p: &Placement) -> Self {
        let capturable = p.dtype == DType::BF16 && sg::capturable(&p.device);
        Self {
            capturable,
            state: Mutex::new(State {
                on: capturable && crate::device::decode_graph_env(),
                cache: GraphCache::new(MAX_GRAPHS, CAPTURE_AT),
                epoch: qlorad_kernels::switch::epoch(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns capturing and replaying on (where the placement can) or off, dropping what was kept
    /// and zeroing the counts.
    pub(super) fn set(&self, on: bool) -> bool {
        let mut st = self.lock();
        st.on = on && self.capturable;
        st.cache.clear();
        st.on
    }

    pub(super) fn stats(&self) -> DecodeGraphStats {
        let st = self.lock();
        DecodeGraphStats {
            on: st.on,
            kept: st.cache.len(),
            captures: st.cache.captures,
            replays: st.cache.replays,
        }
    }
}

impl Llama {
    /// Turns captured decode steps on or off for this model; returns whether they are on (never
    /// on a placement that cannot capture: the CPU, or a GPU on the legacy default stream).
    pub fn set_decode_graphs(&self, on: bool) -> bool {
        self.graphs.set(on)
    }

    /// This model's decode graphs so far.
    pub fn decode_graph_stats(&self) -> DecodeGraphStats {
        self.graphs.stats()
    }

    /// The step of a batch (tokens `ids`, KV table `words`, adapters `lora`: none, or all on the
    /// BGMV path) from its captured graph: replayed if its shape has one, captured and launched
    /// if this is the shape's second step and no other thread is issuing GPU work; `None` when
    /// the step is to run eagerly (the caller then does, with the same inputs). A capture takes
    /// `lora`'s BGMV plan for the graph: the batch must not run again after `Some`.
    pub(super) fn graph_step(
        &self,
        kern: &DecodeKernels,
        ids: &[u32],
        words: &KvWords,
        lora: &mut LoraBatch,
    ) -> Result<Option<Tensor>> {
        // Batches of up to GEMV_MAX_ROWS rows, whose projections are the fused NF4 GEMVs: a
        // larger batch dequantizes each weight into a temporary (a graph would hold those
        // allocations), keeps more logits per graph, and spreads the host's launches over more
        // tokens anyway.
        if !self.graphs.capturable || ids.len() > qlorad_kernels::cuda::GEMV_MAX_ROWS {
            return Ok(None);
        }
        let mut st = self.graphs.lock();
        // Adapters only on the BGMV path: its plan's buffers can be kept and readdressed (the
        // gather path uploads host data inside the step).
        let plan_print = match lora.bgmv_plan() {
            Some(p) => p.fingerprint(),
            None if lora.is_empty() => 0,
            None => return Ok(None),
        };
        if !st.on {
            return Ok(None);
        }
        let epoch = qlorad_kernels::switch::epoch();
        if st.epoch != epoch {
            st.cache.drop_graphs();
            st.epoch = epoch;
        }
        let shape = StepShape {
            rows: ids.len(),
            splits: DecodeKernels::attention_splits(
                ids.len(),
                self.cfg.num_kv_heads,
                words.max_position,
            ),
            rope_in_attention: self.rope_in_attention(),
            // A fingerprint of 0 would stand for "no adapters".
            lora: if lora.is_empty() {
                0
            } else {
                plan_print.max(1)
            },
        };
        match st.cache.step(shape) {
            StepAction::Eager => return Ok(None),
            StepAction::Capture => {}
            StepAction::Replay => {
                let Some(g) = st.cache.get_mut(&shape) else {
                    return Ok(None);
                };
                return timed(Phase::Replay, || -> Result<_> {
                    sg::write_u32(&g.ids, ids)?;
                    kern.rewrite_kv_table(&mut g.table, words)?;
                    if let (Some(kept), Some(now)) = (g.plan.as_mut(), lora.bgmv_plan()) {
                        kept.readdress(now)?;
                    }
                    debug_sync(&self.device, "replay inputs written")?;
                    g.graph.launch()?;
                    debug_sync(&self.device, "replay")?;
                    Ok(Some(g.logits.copy()?))
                });
            }
        }
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        let Some(_gate) = crate::gpu_gate::try_capture() else {
            return Ok(None);
        };
        // The graph's inputs live outside it, at addresses it keeps.
        let ids_dev = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let table = kern.kv_table_of(words)?;
        debug_sync(&self.device, "before the capture")?;
        if let Err(e) = sg::begin_capture(dev) {
            tracing::warn!("decode graphs are off for this model: {e}");
            st.on = false;
            return Ok(None);
        }
        // Everything the body allocates and drops becomes the graph's; only the logits survive.
        let body = self.fused_body(kern, &table, &ids_dev, &*lora);
        let graph = sg::end_capture(dev);
        // A projection that fell back to the gather path uploaded its row index inside the
        // capture: such a graph would replay stale host data, so it counts as a failure.
        let failure = match (&body, &graph) {
            (Err(e), _) => Some(e.to_string()),
            (_, Err(e)) => Some(e.to_string()),
            _ if lora.gathered() => Some("a projection took the LoRA gather path".to_string()),
            _ => None,
        };
        if let Some(why) = failure {
            // The capture's allocations were never real: free them, then clear the errors
            // those frees leave, and let the next gather build its row index again.
            drop((body, graph));
            lora.forget_gather();
            sg::clear_capture_errors(dev);
            tracing::warn!(
                rows = shape.rows,
                splits = shape.splits,
                "capturing a decode step failed, decode graphs are off for this model: {why}"
            );
            st.on = false;
            return Ok(None);
        }
        let (Ok(logits), Ok(graph)) = (body, graph) else {
            return Ok(None);
        };
        if let Err(e) = graph.launch() {
            tracing::warn!("decode graphs are off for this model: launching a capture: {e}");
            st.on = false;
            // The logits were never allocated (the graph never ran): their free fails.
            drop((logits, graph));
            sg::clear_capture_errors(dev);
            return Ok(None);
        }
        debug_sync(&self.device, "the capture's first launch")?;
        let out = logits.copy()?;
        debug_sync(&self.device, "copying the capture's logits")?;
        // The plan's buffers now belong to the graph; this step's adapters stay with the batch.
        let plan = lora.take_bgmv().map(|mut p| {
            p.detach();
            p
        });
        let gone = st.cache.insert(
            shape,
            Captured {
                logits,
                ids: ids_dev,
                table,
                plan,
                graph,
            },
        );
        drop(gone);
        Ok(Some(out))
    }
}

/// With `QLORAD_GRAPH_DEBUG=1`, waits for the device after each stage of a capture or replay and
/// names the stage whose work failed (device errors are otherwise reported by a later call).
pub(super) fn debug_sync(device: &Device, stage: &str) -> Result<()> {
    static ON: qlorad_kernels::switch::EnvSwitch =
        qlorad_kernels::switch::EnvSwitch::new("QLORAD_GRAPH_DEBUG");
    if !ON.on() {
        return Ok(());
    }
    device.synchronize().map_err(|e| {
        crate::error::ModelError::Invalid(format!("decode graph debug: after {stage}: {e}"))
    })
}
