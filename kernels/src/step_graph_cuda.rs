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

    /// The graph's copies whose source is host memory. A copy from host memory made inside a
    /// capture (candle's ops upload their shapes from a temporary Vec at each call, e.g.
    /// `index_select`) becomes a node that reads that host address at every replay, long after
    /// the Vec is gone: garbage shapes, and kernels that fault. A step is only kept if it has
    /// none; its inputs come from device buffers rewritten before each replay instead.
    pub fn host_copies(&self) -> candle_core::Result<usize> {
        use sys::{CUgraphNodeType, CUmemorytype};
        let g = self.graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: `g` is this graph's; a null array asks for the node count.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }
            .result()
            .map_err(|e| driver("graph nodes", e))?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` has room for the n nodes the graph holds.
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }
            .result()
            .map_err(|e| driver("graph nodes", e))?;
        let mut host = 0;
        for &node in &nodes[..n] {
            let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` is a node of the live graph.
            unsafe { sys::cuGraphNodeGetType(node, &mut kind) }
                .result()
                .map_err(|e| driver("graph node type", e))?;
            if kind != CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY {
                continue;
            }
            // SAFETY: a zeroed CUDA_MEMCPY3D is valid (integers, null pointers, enums whose
            // zero the driver overwrites); `node` is a memcpy node.
            let mut p: sys::CUDA_MEMCPY3D = unsafe { std::mem::zeroed() };
            unsafe { sys::cuGraphMemcpyNodeGetParams(node, &mut p) }
                .result()
                .map_err(|e| driver("graph copy node", e))?;
            host += usize::from(match p.srcMemoryType {
                CUmemorytype::CU_MEMORYTYPE_HOST => true,
                // A unified address is host memory unless the driver knows it as device memory.
                CUmemorytype::CU_MEMORYTYPE_UNIFIED => !is_device_memory(p.srcDevice),
                _ => false,
            });
        }
        Ok(host)
    }
}

/// Whether the driver knows `ptr` as device memory (pageable host memory it does not know).
fn is_device_memory(ptr: sys::CUdeviceptr) -> bool {
    let mut kind = 0u32;
    // SAFETY: the attribute is an unsigned int; an unknown pointer is an error, not a fault.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    };
    r == sys::CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
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
        Ok(Some(graph)) => {
            let g = StepGraph { graph };
            match g.host_copies()? {
                0 => Ok(g),
                n => Err(msg(format!(
                    "the captured step copies from host memory ({n} copies): a replay would \
                     read host data the step has since freed"
                ))),
            }
        }
        Ok(None) => Err(msg("capture produced no graph".into())),
        Err(e) => Err(driver("end capture", e)),
    }
}

/// Bytes of device memory the driver holds for graph allocations on `dev`'s GPU: the captured
/// steps' activations and logits (each graph's own, kept between its launches), outside the
/// stream-ordered pool. A process-wide figure of the device.
pub fn graph_memory(dev: &CudaDevice) -> candle_core::Result<u64> {
    let device = dev.cuda_stream().context().cu_device();
    let mut v = 0u64;
    // SAFETY: the attribute's value is a cuuint64_t; `device` is the context's device.
    unsafe {
        sys::cuDeviceGetGraphMemAttribute(
            device,
            sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
            (&mut v as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| driver("graph memory", e))?;
    Ok(v)
}

/// Hands the graph allocations' memory that no graph holds now (dropped graphs', or graphs' that
/// are not running) back to the driver; a kept graph maps its memory again at its next launch.
pub fn trim_graph_memory(dev: &CudaDevice) -> candle_core::Result<()> {
    let device = dev.cuda_stream().context().cu_device();
    // SAFETY: `device` is the context's device; trimming frees only unused graph memory.
    unsafe { sys::cuDeviceGraphMemTrim(device) }
        .result()
        .map_err(|e| driver("graph memory trim", e))
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
    crate::switch::EnvSwitch::new_on("QLORAD_ATT_CLUSTER");

/// Whether the decode attention merges its splits inside a thread-block cluster (the default;
/// `QLORAD_ATT_CLUSTER=0` or [`set_cluster_merge`] turns it off) instead of attention_combine's
/// launch: bit for bit the same logits (gpu-check), 1-2 % faster at batch 1 on the H200
/// (BENCHMARKS.md, session 19). A launch shape of its own (no combine), which a captured step
/// records like any other.
pub fn cluster_merge() -> bool {
    CLUSTER_MERGE.on()
}

/// Switches the cluster merge on or off for the process (gpu-check runs both).
pub fn set_cluster_merge(on: bool) {
    CLUSTER_MERGE.set(on);
}

static CLUSTER_CAP: crate::switch::EnvSwitch =
    crate::switch::EnvSwitch::new_on("QLORAD_ATT_CLUSTER_CAP");

/// Whether a context that would take more splits than one cluster holds takes only as many as
/// it holds (8), so that the cluster merges them, instead of more splits merged by the combine
/// launch (the default; `QLORAD_ATT_CLUSTER_CAP=0`, or [`set_cluster_cap`], turns it off). At
/// batch 1 from 257 positions on, Mistral's 8 KV heads then run 64 blocks of longer splits
/// instead of up to 256 plus a combine launch (3.9 µs per layer): fewer blocks than SMs, against
/// one launch and the partials' round trip less. Session 20, after a 1,024-token prompt: 389.5 /
/// 390.6 tok/s against 348.7 / 347.8 (same call; BENCHMARKS.md). Only with the cluster merge on.
pub fn cluster_cap() -> bool {
    CLUSTER_CAP.on() && cluster_merge()
}

/// Switches [`cluster_cap`] on or off for the process (gpu-check runs both).
pub fn set_cluster_cap(on: bool) {
    CLUSTER_CAP.set(on);
}

impl DecodeKernels {
    /// Splits of each (row, KV head) block's context in the decode attention for `rows` rows
    /// whose largest new-token position is `max_position`: the attention's launch shape, which a
    /// captured step is captured for.
    pub fn attention_splits(rows: usize, kv_heads: usize, max_position: usize) -> usize {
        let splits = crate::decode_split::splits_for(
            max_position + 1,
            rows * kv_heads,
            crate::decode_split::min_split_positions(),
        );
        if cluster_cap() {
            splits.min(crate::decode_cuda::ATT_CLUSTER_MAX)
        } else {
            splits
        }
    }
}
