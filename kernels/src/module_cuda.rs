//! The kernels' CUDA modules, loaded once per GPU context from fat binaries that build.rs compiles
//! with machine code (SASS) for the build's compute capability next to the PTX.
//!
//! Loading PTX makes the driver compile it on first use in every fresh process environment: ~20 s
//! on the H200 before the first training step or decode of a freshly started machine (the
//! nf4 module alone is 3 MB of PTX), unless the driver's JIT cache already holds it. A GPU of the
//! build's architecture now runs the SASS directly; newer ones still JIT the embedded PTX.

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One module's fat binary, embedded at build time.
pub struct Image {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! image {
    ($name:literal) => {
        Image {
            name: $name,
            bytes: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".fatbin")),
        }
    };
}

/// cuda/nf4.cu: NF4 dequantize and the decode GEMVs.
pub const NF4: Image = image!("nf4");
/// cuda/nf4_sweep.cu: gpu-check's GEMV experiments (never loaded by the model).
pub const NF4_SWEEP: Image = image!("nf4_sweep");
/// cuda/lora.cu: BGMV LoRA kernels.
pub const LORA: Image = image!("lora");
/// cuda/decode.cu: the fused decode step's kernels.
pub const DECODE: Image = image!("decode");
/// cuda/train.cu: the fused training ops and the optimizer.
pub const TRAIN: Image = image!("train");

/// A loaded module and the functions taken from it so far.
struct Loaded {
    module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
}

// SAFETY: the module is only used to look functions up (cuModuleGetFunction), which the driver
// API allows from any thread; every access goes through the registry's mutex.
unsafe impl Send for Loaded {}

/// Modules by (context, module name).
type Registry = Mutex<HashMap<(usize, &'static str), Loaded>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Kernel `name` of module `image` on `dev`'s context (the module is loaded on first use).
pub fn function(dev: &CudaDevice, image: &Image, name: &str) -> candle_core::Result<CudaFunction> {
    let ctx = dev.cuda_stream().context().clone();
    let key = (ctx.cu_ctx() as usize, image.name);
    let mut reg = registry()
        .lock()
        .map_err(|_| candle_core::Error::Msg("kernel module registry poisoned".into()))?;
    let loaded = match reg.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Loaded {
            module: load(&ctx, image)?,
            funcs: HashMap::new(),
        }),
    };
    if let Some(f) = loaded.funcs.get(name) {
        return Ok(f.clone());
    }
    let f = loaded.module.load_function(name).w()?;
    loaded.funcs.insert(name.to_string(), f.clone());
    Ok(f)
}

/// Loads a fat binary. cudarc takes binary images only from a file (`cuModuleLoad`), so the
/// embedded bytes go through a private temporary file.
fn load(ctx: &Arc<CudaContext>, image: &Image) -> candle_core::Result<Arc<CudaModule>> {
    let path = std::env::temp_dir().join(format!(
        "qlorad-{}-{}-{:x}.fatbin",
        image.name,
        std::process::id(),
        ctx.cu_ctx() as usize
    ));
    std::fs::write(&path, image.bytes)
        .map_err(|e| candle_core::Error::Msg(format!("writing {}: {e}", path.display())))?;
    let module = ctx.load_module(Ptx::from_file(&path));
    let _ = std::fs::remove_file(&path);
    module.w()
}
