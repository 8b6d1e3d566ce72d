//! The frozen base linear layers of the transformer: full precision or NF4.
//!
//! One small trait, [`BaseLinear`], is the seam between the model and the kernels: the transformer
//! never knows how its projection weights are stored. LoRA adapters wrap a base linear and receive
//! their per-batch routing explicitly (never through global state).

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
    /// Bytes of weight storage held by this layer.
    fn storage_bytes(&self) -> usize;
    /// The NF4 tensor if this layer is quantized.
    fn nf4(&self) -> Option<&Nf4Tensor> {
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

impl BaseLinear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.weight.t()?)?)
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
        self.weight.storage_bytes()
    }
    fn nf4(&self) -> Option<&Nf4Tensor> {
        Some(&self.weight.tensor)
    }
}
