//! The frozen base linear layers of the transformer: full precision or NF4.
//!
//! One small trait, [`BaseLinear`], is the seam between the model and the kernels: the transformer
//! never knows how its projection weights are stored. LoRA adapters wrap a base linear and receive
//! their per-batch routing explicitly (never through global state).

use crate::device::Placement;
use crate::error::Result;
use candle_core::{Device, Tensor};
use qlorad_kernels::{nf4_linear, Nf4Config, Nf4Tensor, Nf4Weight};
use std::sync::Arc;

/// A frozen `y = x·Wᵀ` layer (no bias: Llama/Mistral projections have none).
pub trait BaseLinear: Send + Sync + std::fmt::Debug {
    /// `x (..., in) → (..., out)`; differentiable in `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// The weight as a dense (out, in) f32 tensor (dequantized if quantized) — for merges/exports.
    fn dense_weight(&self) -> Result<Tensor>;
    /// Bytes of weight storage held by this layer where it computes (the GPU's copy once placed there).
    fn storage_bytes(&self) -> usize;
    /// The layer placed for compute on `p` (weights moved there, dense ones in its dtype).
    fn to_placement(self: Box<Self>, p: &Placement) -> Result<Box<dyn BaseLinear>>;
    /// The NF4 tensor if this layer is quantized.
    fn nf4(&self) -> Option<&Nf4Tensor> {
        None
    }
    /// The NF4 weight as the matmul ops take it, if this layer is quantized.
    fn nf4_weight(&self) -> Option<&Arc<Nf4Weight>> {
        None
    }
}

/// Full-precision weight, (out, in).
#[derive(Debug)]
pub struct DenseLinear {
    weight: Tensor,
}

impl DenseLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }
}

/// `x·Wᵀ` for a dense (out, in) f32 weight: decode-sized inputs take the bandwidth-bound GEMV (no
/// autograd: inference only), everything else candle's matmul.
pub fn dense_xwt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    if rows <= qlorad_kernels::gemv::GEMV_MAX_ROWS && !x.track_op() && x.device().is_cpu() {
        let (n, _) = w.dims2()?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.contiguous()?;
        let wv = wv.flatten_all()?;
        let (storage, layout) = wv.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(x.broadcast_matmul(&w.t()?)?);
        };
        let slice = cpu.as_slice::<f32>()?;
        let wslice = match layout.contiguous_offsets() {
            Some((a, b)) => &slice[a..b],
            None => return Ok(x.broadcast_matmul(&w.t()?)?),
        };
        let y = qlorad_kernels::gemv::gemv_xwt(&xv, rows, wslice, n, k);
        let mut out = dims.to_vec();
        if let Some(l) = out.last_mut() {
            *l = n;
        }
        return Ok(Tensor::from_vec(y, out, x.device())?);
    }
    Ok(x.broadcast_matmul(&w.t()?)?)
}

impl BaseLinear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        dense_xwt(x, &self.weight)
    }
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn dense_weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn storage_bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }
    fn to_placement(self: Box<Self>, p: &Placement) -> Result<Box<dyn BaseLinear>> {
        Ok(Box::new(DenseLinear::new(p.put(&self.weight)?)))
    }
}

/// NF4 weight; forward and input-gradient go through the NF4 custom op.
#[derive(Debug)]
pub struct Nf4Linear {
    weight: Arc<Nf4Weight>,
}

impl Nf4Linear {
    pub fn new(tensor: Nf4Tensor) -> Self {
        Self {
            weight: Arc::new(Nf4Weight::new(tensor)),
        }
    }

    /// Quantizes a dense (out, in) f32 weight.
    pub fn quantize(weight: &Tensor, cfg: Nf4Config) -> Result<Self> {
        let dims = weight.dims().to_vec();
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::new(Nf4Tensor::quantize(&values, &dims, cfg)?))
    }
}

impl BaseLinear for Nf4Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nf4_linear(x, &self.weight)?)
    }
    fn in_features(&self) -> usize {
        self.weight.in_features()
    }
    fn out_features(&self) -> usize {
        self.weight.out_features()
    }
    fn dense_weight(&self) -> Result<Tensor> {
        Ok(self.weight.dequantize(&Device::Cpu)?)
    }
    fn storage_bytes(&self) -> usize {
        match self.weight.device_bytes() {
            0 => self.weight.storage_bytes(),
            on_gpu => on_gpu,
        }
    }
    fn to_placement(self: Box<Self>, p: &Placement) -> Result<Box<dyn BaseLinear>> {
        // Layers are placed once, at load, when nothing else holds the weight; should something,
        // place a copy rather than fail.
        let w = Arc::try_unwrap(self.weight).unwrap_or_else(|w| Nf4Weight::new(w.tensor.clone()));
        Ok(Box::new(Nf4Linear {
            weight: Arc::new(w.to_device(&p.device)?),
        }))
    }
    fn nf4(&self) -> Option<&Nf4Tensor> {
        Some(&self.weight.tensor)
    }
    fn nf4_weight(&self) -> Option<&Arc<Nf4Weight>> {
        Some(&self.weight)
    }
}
