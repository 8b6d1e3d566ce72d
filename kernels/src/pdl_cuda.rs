//! Programmatic dependent launch (Hopper and later) for the decode step's kernels.
//!
//! A decode step is ~300 short kernels in one stream, each of which would otherwise start only
//! after the previous one has fully drained, then ramp up from nothing: the NF4 GEMVs' first weight
//! loads and the small kernels' launch latency sit on the critical path of every layer. Launched
//! with the programmatic stream serialization attribute (`cuLaunchKernelEx`), a kernel may start
//! once every block of the previous kernel has called `pdl_trigger` (cuda/bf16.cuh); its blocks
//! then do what does not depend on the previous kernel (the GEMV issues its first weight loads and
//! fills its code table) and call `pdl_wait`, which returns when the previous kernel has completed
//! and its writes are visible. The kernels launched here all call `pdl_wait` in every block before
//! they read or write activations, so the step computes exactly what ordinary launches compute.
//!
//! cudarc's launch builder takes no launch attributes and does not expose a loaded function's
//! handle, so the kernels launched this way come from a second, raw load of their module
//! (`cuModuleLoadData`; a few MB of device memory, once per context). `QLORAD_PDL=0` turns it off
//! (ordinary launches of the same kernels, through cudarc).

use crate::module_cuda::Image;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

fn check(r: sys::CUresult, what: &str) -> candle_core::Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(msg(format!("{what}: {r:?}")))
    }
}

/// A kernel of a raw-loaded module (the module stays loaded for the life of the process).
#[derive(Clone, Copy, Debug)]
pub struct RawFunction(sys::CUfunction);

// SAFETY: a CUfunction is a handle the driver API accepts from any thread.
unsafe impl Send for RawFunction {}
unsafe impl Sync for RawFunction {}

struct RawModule(sys::CUmodule);
// SAFETY: as RawFunction; the registry's mutex serializes the lookups.
unsafe impl Send for RawModule {}

type Registry = Mutex<HashMap<(usize, &'static str), (RawModule, HashMap<String, RawFunction>)>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Whether decode launches its kernels as programmatic dependents: on unless `QLORAD_PDL=0`, and
/// only on compute capability 9.0 or newer (checked per device by [`Pdl::new`]).
fn wanted() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !std::env::var("QLORAD_PDL").is_ok_and(|v| v == "0"))
}

/// Kernel `name` of `image` on `dev`'s context, from the raw load of the module.
pub fn raw_function(
    dev: &CudaDevice,
    image: &Image,
    name: &str,
) -> candle_core::Result<RawFunction> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(|e| msg(format!("binding the CUDA context: {e:?}")))?;
    let key = (ctx.cu_ctx() as usize, image.name);
    let mut reg = registry()
        .lock()
        .map_err(|_| msg("raw module registry poisoned".into()))?;
    let entry = match reg.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            // The driver reads the fat binary's header as 8-byte words: copy it aligned.
            let mut words = vec![0u64; image.bytes.len().div_ceil(8)];
            // SAFETY: words has at least image.bytes.len() bytes; the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    image.bytes.as_ptr(),
                    words.as_mut_ptr().cast::<u8>(),
                    image.bytes.len(),
                )
            };
            let mut module = std::ptr::null_mut();
            // SAFETY: a fat binary image built by build.rs; the context is current on this thread.
            check(
                unsafe { sys::cuModuleLoadData(&mut module, words.as_ptr().cast::<c_void>()) },
                &format!("loading the {} module", image.name),
            )?;
            e.insert((RawModule(module), HashMap::new()))
        }
    };
    if let Some(f) = entry.1.get(name) {
        return Ok(*f);
    }
    let cname = std::ffi::CString::new(name).map_err(|_| msg(format!("kernel name {name:?}")))?;
    let mut f = std::ptr::null_mut();
    // SAFETY: the module is loaded in this context and never unloaded.
    check(
        unsafe { sys::cuModuleGetFunction(&mut f, entry.0 .0, cname.as_ptr()) },
        &format!("kernel {name} of {}", image.name),
    )?;
    entry.1.insert(name.to_string(), RawFunction(f));
    Ok(RawFunction(f))
}

/// Whether `dev` launches decode kernels as programmatic dependents (compute capability ≥ 9.0
/// and not turned off).
pub fn enabled(dev: &CudaDevice) -> bool {
    if !wanted() {
        return false;
    }
    let major = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    major.is_ok_and(|m| m >= 9)
}

/// Launches `f` on `stream` as a programmatic dependent of the stream's previous kernel.
///
/// # Safety
/// As `cuLaunchKernel`: `args` point to values of the kernel's parameter types, in order, that
/// live until this call returns, and every buffer they name is valid for what the kernel does
/// with it, in stream order. The kernel calls `pdl_wait` in every block before it touches memory
/// that earlier work in the stream writes or reads.
pub unsafe fn launch(
    f: RawFunction,
    cfg: LaunchConfig,
    stream: &CudaStream,
    args: &mut [*mut c_void],
) -> candle_core::Result<()> {
    launch_with(f, cfg, stream, args, None)
}

/// [`launch`] with the grid's blocks in thread-block clusters of `cluster` (x, y, z) blocks, each
/// dimension dividing the grid's; at most 8 blocks per cluster (the portable size).
///
/// # Safety
/// As [`launch`]; the kernel may use cluster barriers and distributed shared memory.
pub unsafe fn launch_cluster(
    f: RawFunction,
    cfg: LaunchConfig,
    stream: &CudaStream,
    args: &mut [*mut c_void],
    cluster: (u32, u32, u32),
) -> candle_core::Result<()> {
    let (x, y, z) = cluster;
    let g = cfg.grid_dim;
    if x == 0
        || y == 0
        || z == 0
        || x * y * z > 8
        || !g.0.is_multiple_of(x)
        || !g.1.is_multiple_of(y)
        || !g.2.is_multiple_of(z)
    {
        return Err(msg(format!("cluster {cluster:?} for grid {g:?}")));
    }
    launch_with(f, cfg, stream, args, Some(cluster))
}

unsafe fn launch_with(
    f: RawFunction,
    cfg: LaunchConfig,
    stream: &CudaStream,
    args: &mut [*mut c_void],
    cluster: Option<(u32, u32, u32)>,
) -> candle_core::Result<()> {
    // SAFETY: a zeroed attribute value is a valid union; the field set is the one the id names.
    let mut value: sys::CUlaunchAttributeValue = std::mem::zeroed();
    value.programmaticStreamSerializationAllowed = 1;
    let mut attrs = [
        sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        },
        sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
            pad: [0; 4],
            value: std::mem::zeroed(),
        },
    ];
    let mut num_attrs = 1;
    if let Some((x, y, z)) = cluster {
        attrs[1].value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z };
        num_attrs = 2;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: num_attrs,
    };
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| msg(format!("binding the CUDA context: {e:?}")))?;
    check(
        sys::cuLaunchKernelEx(&config, f.0, args.as_mut_ptr(), std::ptr::null_mut()),
        "cuLaunchKernelEx",
    )
}

/// A device value's address as a kernel argument slot.
pub fn arg<T>(v: &T) -> *mut c_void {
    (v as *const T).cast_mut().cast::<c_void>()
}
