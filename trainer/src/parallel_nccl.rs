//! NCCL's all-reduce behind [`Collective`], for data-parallel training on the GPUs of one host
//! (one rank per GPU, each on its own thread of one process).
//!
//! NCCL is opened at run time (`libnccl.so.2`, as PyTorch's `nvidia-nccl` wheel or a system
//! package installs it): a binary built with the `cuda` feature starts and trains on one GPU
//! without it, and a multi-GPU run falls back to [`crate::parallel::ThreadGroup`] (host memory)
//! when it is missing. The handful of entry points used are NCCL's stable C API (nccl.h).
//!
//! Gradients are flattened into one buffer per step and reduced in one call (what DDP's buckets
//! do, minus the overlap with the backward): for r = 64 on a 7B model 671 MB of f32.
//!
//! Ranks are threads of one process ([`NcclGroup::new_local`], `ncclCommInitAll`) or processes,
//! on one host or several ([`NcclGroup::join`], `ncclCommInitRank` with an id one process made and
//! handed to all: README.md, "Multi-GPU", describes that rendezvous).

use crate::parallel::Collective;
use crate::step::{Result, StepError};
use candle_core::{DType, Device, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

type Comm = *mut c_void;
/// Bytes of an `ncclUniqueId` (NCCL_UNIQUE_ID_BYTES).
pub const ID_BYTES: usize = 128;

/// `ncclUniqueId`: a struct of 128 bytes, passed by value to ncclCommInitRank.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; ID_BYTES],
}
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;

/// The NCCL entry points this module calls.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    comm_init_all: unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    _lib: libloading::Library,
}

fn api() -> std::result::Result<&'static Api, String> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let mut last = String::new();
        for name in ["libnccl.so.2", "libnccl.so"] {
            // SAFETY: loading NCCL runs its (trusted) library initialisers only.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return load(lib),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("NCCL not found ({last})"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn load(lib: libloading::Library) -> std::result::Result<Api, String> {
    // SAFETY: the signatures are those of nccl.h (NCCL 2.x, stable C ABI).
    unsafe {
        let sym = |e: libloading::Error| format!("NCCL: {e}");
        Ok(Api {
            get_unique_id: *lib.get(b"ncclGetUniqueId\0").map_err(sym)?,
            comm_init_rank: *lib.get(b"ncclCommInitRank\0").map_err(sym)?,
            comm_init_all: *lib.get(b"ncclCommInitAll\0").map_err(sym)?,
            all_reduce: *lib.get(b"ncclAllReduce\0").map_err(sym)?,
            comm_destroy: *lib.get(b"ncclCommDestroy\0").map_err(sym)?,
            error_string: *lib.get(b"ncclGetErrorString\0").map_err(sym)?,
            _lib: lib,
        })
    }
}

/// Whether NCCL can be opened on this machine.
pub fn available() -> bool {
    api().is_ok()
}

fn check(api: &Api, what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { CStr::from_ptr((api.error_string)(code)) };
    Err(StepError::Invalid(format!(
        "NCCL {what}: {} ({code})",
        text.to_string_lossy()
    )))
}

/// One rank (GPU) of an NCCL group.
pub struct NcclGroup {
    comm: Comm,
    rank: usize,
    world: usize,
    device: candle_core::CudaDevice,
}

// SAFETY: a communicator is used by the thread that owns its rank, one call at a time (the
// trainer calls the collective sequentially); NCCL allows a communicator to move between threads.
unsafe impl Send for NcclGroup {}
// SAFETY: as above; `&self` methods are never called concurrently on one rank.
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// One communicator per GPU of this process (`ncclCommInitAll`), rank i on `devices[i]`.
    pub fn new_local(devices: &[Device]) -> Result<Vec<Self>> {
        let api = api().map_err(StepError::Invalid)?;
        let cuda: Vec<candle_core::CudaDevice> = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(c) => Ok(c.clone()),
                other => Err(StepError::Invalid(format!(
                    "NCCL needs CUDA devices, got {other:?}"
                ))),
            })
            .collect::<Result<_>>()?;
        let ordinals: Vec<c_int> = cuda
            .iter()
            .map(|d| d.cuda_stream().context().ordinal() as c_int)
            .collect();
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); cuda.len()];
        // SAFETY: comms has room for one communicator per listed device.
        check(api, "init", unsafe {
            (api.comm_init_all)(
                comms.as_mut_ptr(),
                ordinals.len() as c_int,
                ordinals.as_ptr(),
            )
        })?;
        let world = cuda.len();
        Ok(comms
            .into_iter()
            .zip(cuda)
            .enumerate()
            .map(|(rank, (comm, device))| Self {
                comm,
                rank,
                world,
                device,
            })
            .collect())
    }

    /// A new group's rendezvous id (`ncclGetUniqueId`), as hex: made by one process and handed to
    /// every rank's [`NcclGroup::join`] out of band (environment, a shared file).
    pub fn unique_id() -> Result<String> {
        let api = api().map_err(StepError::Invalid)?;
        let mut id = UniqueId {
            internal: [0; ID_BYTES],
        };
        // SAFETY: id is an ncclUniqueId for NCCL to fill.
        check(api, "unique id", unsafe { (api.get_unique_id)(&mut id) })?;
        Ok(id.internal.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Rank `rank` of `world` on `device` (one per process, or per host), joining the group whose
    /// id [`NcclGroup::unique_id`] made (`ncclCommInitRank`; returns once every rank has joined).
    pub fn join(device: &Device, id_hex: &str, rank: usize, world: usize) -> Result<Self> {
        let api = api().map_err(StepError::Invalid)?;
        let Device::Cuda(cuda) = device else {
            return Err(StepError::Invalid("NCCL needs a CUDA device".into()));
        };
        let bad = || StepError::Invalid(format!("NCCL id: want {} hex digits", 2 * ID_BYTES));
        if id_hex.len() != 2 * ID_BYTES || rank >= world {
            return Err(bad());
        }
        let mut id = UniqueId {
            internal: [0; ID_BYTES],
        };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = u8::from_str_radix(id_hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        // The communicator binds to the current device: this rank's (candle made its context
        // current on this thread when it opened the device; make sure).
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| StepError::Invalid(format!("NCCL: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: comm receives the new communicator; id is passed by value as nccl.h declares.
        check(api, "join", unsafe {
            (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int)
        })?;
        Ok(Self {
            comm,
            rank,
            world,
            device: cuda.clone(),
        })
    }

    /// In-place sum over the ranks of `t` (a contiguous tensor this call owns exclusively).
    fn reduce_in_place(&self, t: &Tensor, dtype: c_int) -> Result<()> {
        let api = api().map_err(StepError::Invalid)?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            return Err(StepError::Invalid("NCCL: a tensor is not on a GPU".into()));
        };
        let stream = self.device.cuda_stream();
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let (base, size) = match t.dtype() {
            DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
            DType::F64 => (cs.as_cuda_slice::<f64>()?.device_ptr(&stream).0, 8),
            other => return Err(StepError::Invalid(format!("NCCL: dtype {other:?}"))),
        };
        let ptr = (base + (layout.start_offset() * size) as u64) as *mut c_void;
        // SAFETY: ptr holds t.elem_count() values of `dtype` on this rank's GPU; the reduction is
        // queued on the stream every kernel of this device runs on, so it follows the writes
        // that produced t and precedes every later read.
        check(api, "all-reduce", unsafe {
            (api.all_reduce)(
                ptr,
                ptr,
                t.elem_count(),
                dtype,
                NCCL_SUM,
                self.comm,
                stream.cu_stream() as *mut c_void,
            )
        })
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: the communicator was made by ncclCommInitAll and is destroyed once.
            unsafe { (api.comm_destroy)(self.comm) };
        }
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, ts: &mut [Tensor]) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        // One buffer, one call: flatten, reduce, and hand back views of the reduced buffer.
        let flat: Vec<Tensor> = ts
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let buf = Tensor::cat(&flat, 0)?.contiguous()?;
        drop(flat);
        self.reduce_in_place(&buf, NCCL_FLOAT32)?;
        let mut at = 0;
        for t in ts.iter_mut() {
            let n = t.elem_count();
            *t = buf.narrow(0, at, n)?.reshape(t.shape())?;
            at += n;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, xs: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(xs, xs.len(), &Device::Cuda(self.device.clone()))?;
        self.reduce_in_place(&t, NCCL_FLOAT64)?;
        Ok(t.to_vec1::<f64>()?)
    }
}
