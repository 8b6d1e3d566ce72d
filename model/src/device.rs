//! Where a model lives and computes: the CPU in f32, or one CUDA GPU in bf16 (QLoRA's compute
//! dtype, Dettmers et al. 2023, §3; candle 0.10's CPU backend has no bf16 matmul, so the CPU stays
//! f32).

use crate::error::{ModelError, Result};
use candle_core::{DType, Device};

/// A device as named on the command line: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device {other:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device a model's weights, KV cache and activations live on, and the float dtype it
/// computes in there.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Placement {
    /// The CPU, computing in f32.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Opens the named device: the CPU in f32, a CUDA GPU in bf16. Without the `cuda` feature a
    /// CUDA device is an error that says so. The GPU's work goes to a stream of its own (what
    /// capturing decode steps as CUDA graphs needs: see [`Placement::open_own_stream`]), or with
    /// `QLORAD_DECODE_GRAPH=0` to candle's stream (the legacy default stream, no graphs).
    pub fn open(spec: DeviceSpec) -> Result<Self> {
        Self::open_with(spec, decode_graph_env())
    }

    /// [`Placement::open`] with the GPU's work on a stream of its own instead of the legacy
    /// default stream, which CUDA cannot capture into a graph: decode steps on this placement
    /// may be captured and replayed (model/src/llama_graph.rs). All of the device's work still
    /// goes to one stream, in order.
    pub fn open_own_stream(spec: DeviceSpec) -> Result<Self> {
        Self::open_with(spec, true)
    }

    fn open_with(spec: DeviceSpec, own_stream: bool) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu => Ok(Self::cpu()),
            DeviceSpec::Cuda(n) => {
                let device = cuda_device(n, own_stream).map_err(|e| {
                    ModelError::Invalid(format!("cannot open cuda:{n}: {}", first_line(&e)))
                })?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &device {
                    // SAFETY: qlorad issues all GPU work on candle's single stream of this device,
                    // so stream order alone keeps every use after its write and every free after
                    // its last use; cudarc's per-tensor events (meant for several streams) only
                    // add host overhead to each of the hundreds of launches of a decode step. Called
                    // before any tensor exists on the device.
                    unsafe { d.disable_event_tracking() };
                    if std::env::var("QLORAD_POOL_CACHE").map_or(true, |v| v != "0") {
                        keep_pool(d).map_err(|e| {
                            ModelError::Invalid(format!("cuda:{n}: memory pool: {e}"))
                        })?;
                    }
                }
                Ok(Self {
                    device,
                    dtype: DType::BF16,
                })
            }
        }
    }

    pub fn is_cuda(&self) -> bool {
        self.device.is_cuda()
    }

    /// Moves a float tensor here, converting it to the compute dtype.
    pub fn put(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// `(free, total)` bytes of device memory (driver's view: the CUDA context and the caching
    /// pool included, as nvidia-smi shows it); `None` on the CPU.
    pub fn memory_info(&self) -> Option<(usize, usize)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            return d.cuda_stream().context().mem_get_info().ok();
        }
        None
    }

    /// Bytes the driver holds for CUDA graphs' allocations on this GPU (the captured decode
    /// steps' activations and logits, outside the caching pool); `None` on the CPU.
    pub fn graph_memory(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            return qlorad_kernels::step_graph_cuda::graph_memory(d).ok();
        }
        None
    }

    /// Waits until the device has finished all queued work (timing; a no-op on the CPU). Under
    /// the GPU gate: a synchronization would break a decode-step capture on another thread.
    pub fn synchronize(&self) -> Result<()> {
        let _gpu = self.device.is_cuda().then(crate::gpu_gate::gpu_work);
        Ok(self.device.synchronize()?)
    }
}

/// Whether decode steps are captured as CUDA graphs (and the GPU gets a stream of its own): the
/// default, `QLORAD_DECODE_GRAPH=0` turns it off (the legacy default stream, eager steps).
pub(crate) fn decode_graph_env() -> bool {
    std::env::var("QLORAD_DECODE_GRAPH").map_or(true, |v| v != "0")
}

/// CUDA device `n`, on candle's default stream or (`own_stream`) on a new one.
fn cuda_device(n: usize, own_stream: bool) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    if own_stream {
        return Ok(Device::Cuda(candle_core::CudaDevice::new_with_stream(n)?));
    }
    let _ = own_stream;
    Device::new_cuda(n)
}

/// Makes the device's memory pool (the one cudarc's stream-ordered allocations come from) keep
/// freed memory for reuse instead of handing it back to the driver at every synchronization.
///
/// The pool's default release threshold is 0: at each synchronizing call (a loss read on the host,
/// a sampled token) the driver unmaps every free byte, and the next allocations map it again. A
/// training step frees and re-allocates GBs of activations around such points, and decode
/// allocates its temporaries again after every token. PyTorch's caching allocator keeps what it has
/// reserved for the same reason; [`trim_pool`] gives it back (after a fine-tuning job).
#[cfg(feature = "cuda")]
fn keep_pool(d: &candle_core::CudaDevice) -> std::result::Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(d)?;
    let mut keep = u64::MAX;
    // SAFETY: `pool` is the device's; the attribute is a cuuint64_t.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
        .result()
        .map_err(|e| e.to_string())
    }
}

/// The memory pool that cudarc's stream-ordered allocations on `d` come from (the device's default).
#[cfg(feature = "cuda")]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> std::result::Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool, String> {
    let dev = d.cuda_stream().context().cu_device();
    // SAFETY: `dev` is the device of a live context.
    unsafe { candle_core::cuda_backend::cudarc::driver::result::device::get_mem_pool(dev) }
        .map_err(|e| e.to_string())
}

/// Returns the free memory the device's pool keeps cached (see `keep_pool`) to the driver, e.g.
/// for other processes once a fine-tuning job's activations are gone; a no-op on the CPU.
pub fn trim_pool(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // A synchronization and a trim would break a decode-step capture on another thread.
        let _gpu = crate::gpu_gate::gpu_work();
        let fail = |e: String| ModelError::Invalid(format!("trimming the memory pool: {e}"));
        d.cuda_stream()
            .synchronize()
            .map_err(|e| fail(e.to_string()))?;
        let pool = default_pool(d).map_err(fail)?;
        // SAFETY: `pool` is the device's; trimming frees only unused memory.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(|e| fail(e.to_string()))?;
        // The captured decode steps' memory lives outside that pool.
        qlorad_kernels::step_graph_cuda::trim_graph_memory(d).map_err(|e| fail(e.to_string()))?;
    }
    let _ = device;
    Ok(())
}

/// Reads a step's logits `(rows, vocab)` f32 back to the host, for one thread (the engine's).
/// On a GPU through a kept page-locked buffer and an event (`qlorad_kernels::readback_cuda` says
/// why; `QLORAD_PINNED_LOGITS=0`: candle's synchronous copy); otherwise candle's copy.
#[derive(Default)]
pub struct LogitsReader {
    #[cfg(feature = "cuda")]
    pinned: Option<qlorad_kernels::readback_cuda::HostReadback>,
}

impl LogitsReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn rows(&mut self, logits: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() && pinned_logits() {
            let r = self.pinned.get_or_insert_with(Default::default);
            return Ok(r.read_f32_rows(&logits.contiguous()?)?);
        }
        Ok(logits.to_vec2::<f32>()?)
    }
}

/// `QLORAD_PINNED_LOGITS` not 0 (read once).
#[cfg(feature = "cuda")]
fn pinned_logits() -> bool {
    static ON: qlorad_kernels::switch::EnvSwitch =
        qlorad_kernels::switch::EnvSwitch::new_on("QLORAD_PINNED_LOGITS");
    ON.on()
}

fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = Placement::open(DeviceSpec::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:0"), "{e}");
    }
}
