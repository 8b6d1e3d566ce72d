//! What a decode step captured as a CUDA graph needs from the kernels crate (behind the `cuda`
//! feature; model/src/llama_graph.rs does the capturing): the stream capture itself, the graph,
//! and inputs that stay at one device address from step to step (a graph bakes every kernel
//! argument in) while their contents change: the token ids and the KV table.
//!
//! Why a graph: the fused decode step is ~290 launches, and the host spends 4-9 µs issuing each
//! (an allocation, candle's tensor bookkeeping, the launch): 1.4-2.7 ms per token depending on
//! the machine the GPU comes with, against ~2.3 ms of GPU time for Mistral-7B shapes on the H200
//! (BENCHMARKS.md, session 17). A replayed graph costs the host one launch and two small copies.
//! vLLM and TGI capture their decode steps the same way, one graph per batch shape.
//!
//! CUDA cannot capture the legacy default stream, which is the stream candle's
//! `Device::new_cuda` uses: a capturing model has to be placed on a device with a stream of its
//! own (`CudaDevice::new_with_stream`, see `qlorad_model::device`).

use crate::decode_cuda::DecodeKernels;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaGraph, DriverError};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Storage, Tensor};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

fn driver(what: &str, e: DriverError) -> candle_core::Error {
    msg(format!("{what}: {e}"))
}

/// A captured decode step, ready to launch on the stream it was captured from.
pub struct StepGraph {
    graph: CudaGraph,
}

// SAFETY: CUDA graph objects are not internally synchronized (cudarc's CudaGraph is neither Send
// nor Sync for that reason); a StepGraph is only launched or dropped by whoever holds it, and the
// model keeps its graphs behind a mutex, so no two threads ever touch one at the same time.
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Queues the captured step on its stream.
    pub fn launch(&self) -> candle_core::Result<()> {
        self.graph.launch().map_err(|e| driver("graph launch", e))
    }
}

/// Whether work on `device` can be captured: a CUDA device whose stream is not the legacy default
/// stream (which CUDA refuses to capture).
pub fn capturable(device: &Device) -> bool {
    match device {
        Device::Cuda(d) => !d.cuda_stream().cu_stream().is_null(),
        _ => false,
    }
}

/// Starts capturing `dev`'s stream. Thread-local mode: a call on this thread that would not be
/// captured (a synchronous allocation, a synchronization) fails the capture instead of running,
/// while other threads keep their ordinary semantics.
pub fn begin_capture(dev: &CudaDevice) -> candle_core::Result<()> {
    dev.cuda_stream()
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver("begin capture", e))
}

/// Ends the capture begun by [`begin_capture`] (always: the stream is usable again afterwards)
/// and instantiates the graph. Allocations the step made and did not free (its logits) are freed
/// by the driver at the graph's next launch and made again at the same address
/// (`AUTO_FREE_ON_LAUNCH`), so a tensor kept from the capture reads each launch's result. When it
/// fails, the caller frees what the capture allocated and then calls [`clear_capture_errors`].
pub fn end_capture(dev: &CudaDevice) -> candle_core::Result<StepGraph> {
    let stream = dev.cuda_stream();
    let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    match stream.end_capture(flags) {
        Ok(Some(graph)) => Ok(StepGraph { graph }),
        Ok(None) => Err(msg("capture produced no graph".into())),
        Err(e) => Err(driver("end capture", e)),
    }
}

/// Clears an error a failed capture left recorded on `dev`'s context (frees of allocations the
/// capture made fail once it is abandoned).
pub fn clear_capture_errors(dev: &CudaDevice) {
    let _ = dev.cuda_stream().context().check_err();
}

/// Copies `src` into the contiguous u32 tensor `dst` on its device (stream-ordered: kernels queued
/// before read the old contents, kernels queued after the new).
pub fn write_u32(dst: &Tensor, src: &[u32]) -> candle_core::Result<()> {
    if dst.elem_count() != src.len() {
        return Err(msg(format!(
            "write_u32: {} values into a tensor of {}",
            src.len(),
            dst.elem_count()
        )));
    }
    let (storage, layout) = dst.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(msg("write_u32: the tensor is not on a GPU".into()));
    };
    let ptr = crate::train_cuda::storage_addr("write_u32", cs, layout, DType::U32)?;
    // SAFETY: `ptr` addresses src.len() contiguous u32 of `dst`'s storage (checked above and by
    // storage_addr); the copy is queued on the stream every use of the tensor is ordered on
    // (qlorad issues all work on one stream per device), and the driver stages pageable `src`
    // before this call returns.
    unsafe { result::memcpy_htod_async(ptr, src, cs.device().cuda_stream().cu_stream()) }
        .map_err(|e| driver("write_u32", e))
}

static CLUSTER_MERGE: crate::switch::EnvSwitch =
    crate::switch::EnvSwitch::new("QLORAD_ATT_CLUSTER");

/// Whether the decode attention merges its splits inside a thread-block cluster
/// (`QLORAD_ATT_CLUSTER=1`, or [`set_cluster_merge`]) instead of attention_combine's launch:
/// opt-in while new. A launch shape of its own (no combine), which a captured step records like
/// any other.
pub fn cluster_merge() -> bool {
    CLUSTER_MERGE.on()
}

/// Switches the cluster merge on or off for the process (gpu-check runs both).
pub fn set_cluster_merge(on: bool) {
    CLUSTER_MERGE.set(on);
}

impl DecodeKernels {
    /// Splits of each (row, KV head) block's context in the decode attention for `rows` rows
    /// whose largest new-token position is `max_position`: the attention's launch shape, which a
    /// captured step is captured for.
    pub fn attention_splits(rows: usize, kv_heads: usize, max_position: usize) -> usize {
        crate::decode_split::splits_for(
            max_position + 1,
            rows * kv_heads,
            crate::decode_split::min_split_positions(),
        )
    }
}
