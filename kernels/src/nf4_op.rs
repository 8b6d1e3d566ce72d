//! The NF4 linear layer as candle custom ops: `y = x·Wᵀ` with a backward that gives dL/dx by
//! re-dequantizing W.
//!
//! The weight lives inside the op (an `Arc`), not in the autograd graph: candle's `matmul` would keep
//! both inputs alive until backward, i.e. a dequantized copy of every frozen weight for the whole
//! step. Here backward applies [`Nf4MatmulGrad`] to `dL/dy`, which dequantizes tile by tile again —
//! the QLoRA recipe (Dettmers et al., 2023, §3: "we dequantize the storage data type to the
//! computation data type to perform the forward and backward pass, but we only compute weight
//! gradients for the LoRA parameters"). The frozen W gets no gradient.

use crate::nf4::Nf4Tensor;
use crate::nf4_matmul::{matmul_dyw, matmul_xwt, weight_dims};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Arc;

/// An NF4 weight ready for matmuls: the packed tensor plus its absmax expanded to f32 once (the
/// double-quantized scales are decoded at load, costing 4 bytes per block on the CPU path), and,
/// once moved with [`Nf4Weight::to_device`], a copy on a GPU (kept double-quantized there).
#[derive(Debug)]
pub struct Nf4Weight {
    pub tensor: Nf4Tensor,
    absmax: Vec<f32>,
    out_features: usize,
    in_features: usize,
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::Nf4Gpu>,
}

impl Nf4Weight {
    pub fn new(tensor: Nf4Tensor) -> Self {
        let absmax = tensor.absmax_f32();
        let (out_features, in_features) = weight_dims(&tensor);
        Self {
            tensor,
            absmax,
            out_features,
            in_features,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Places the weight for compute on `device`: a no-op for the CPU; for a CUDA device the packed
    /// codes and scales are copied there (the host copy stays, for merges and the CPU reference).
    pub fn to_device(self, device: &candle_core::Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            return self.to_device_with(device, crate::cuda::GemvKernel::from_env());
        }
        match device {
            candle_core::Device::Cpu => Ok(self),
            other => Err(candle_core::Error::Msg(format!(
                "NF4 weights cannot be placed on {other:?} (build with the cuda feature for GPUs)"
            ))),
        }
    }

    /// As [`Nf4Weight::to_device`], decoding with the given GEMV kernel on a GPU.
    #[cfg(feature = "cuda")]
    pub fn to_device_with(
        self,
        device: &candle_core::Device,
        kernel: crate::cuda::GemvKernel,
    ) -> candle_core::Result<Self> {
        match device {
            candle_core::Device::Cuda(d) => {
                let gpu = crate::cuda::Nf4Gpu::upload(
                    &self.tensor,
                    self.out_features,
                    self.in_features,
                    d,
                    kernel,
                )?;
                Ok(Self {
                    gpu: Some(gpu),
                    ..self
                })
            }
            _ => Ok(self),
        }
    }

    /// Bytes held on the GPU (0 when the weight is CPU-only).
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.bytes();
        }
        0
    }

    /// The GPU copy, if the weight was moved to a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&crate::cuda::Nf4Gpu> {
        self.gpu.as_ref()
    }

    /// The weight dequantized on its GPU to a dense (out, in) bf16 tensor there (the prefill path's
    /// first step; exposed for tests against the CPU dequantization).
    #[cfg(feature = "cuda")]
    pub fn dequantize_gpu(&self) -> candle_core::Result<Tensor> {
        let g = self
            .gpu
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the NF4 weight is not on a GPU".into()))?;
        let slice = g.dequantize_bf16()?;
        let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, g.device().clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            (self.out_features, self.in_features),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The expanded f32 block scales.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// Dequantized weight as a dense (out, in) f32 tensor — for merges and tests, not for matmuls.
    pub fn dequantize(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            self.tensor.dequantize(),
            (self.out_features, self.in_features),
            device,
        )
    }

    /// Host bytes held (packed codes, scales and the expanded absmax cache).
    pub fn storage_bytes(&self) -> usize {
        self.tensor.storage_bytes() + self.absmax.len() * 4
    }
}

/// Reads a contiguous f32 CPU storage slice, or says why it cannot.
fn f32_slice<'a>(
    op: &'static str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        other => {
            return Err(candle_core::Error::Msg(format!(
                "{op}: unsupported dtype {:?} (CPU path computes in f32)",
                other.dtype()
            )))
        }
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// Forward op: `x (..., in) → y (..., out)`.
#[derive(Debug, Clone)]
pub struct Nf4Matmul {
    pub weight: Arc<Nf4Weight>,
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != w.in_features {
            return Err(candle_core::Error::Msg(format!(
                "nf4-matmul: input has {k} features, weight expects {}",
                w.in_features
            )));
        }
        let x = f32_slice(self.name(), storage, layout)?;
        let m = x.len() / k.max(1);
        let y = matmul_xwt(x, m, &w.tensor, &w.absmax);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.out_features;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = &self.weight;
        crate::cuda::apply(
            self.name(),
            w.gpu.as_ref(),
            storage,
            layout,
            w.in_features,
            w.out_features,
            |g, x, m, x16| g.xwt(x, m, x16),
        )
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let dx = g.apply_op1_no_bwd(&Nf4MatmulGrad {
            weight: self.weight.clone(),
        })?;
        Ok(Some(dx))
    }
}

/// Backward op: `dy (..., out) → dx (..., in)`.
#[derive(Debug, Clone)]
pub struct Nf4MatmulGrad {
    pub weight: Arc<Nf4Weight>,
}

impl CustomOp1 for Nf4MatmulGrad {
    fn name(&self) -> &'static str {
        "nf4-matmul-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        let dims = layout.shape().dims();
        let n = *dims.last().unwrap_or(&0);
        if n != w.out_features {
            return Err(candle_core::Error::Msg(format!(
                "nf4-matmul-grad: gradient has {n} features, weight has {} outputs",
                w.out_features
            )));
        }
        let dy = f32_slice(self.name(), storage, layout)?;
        let m = dy.len() / n.max(1);
        let dx = matmul_dyw(dy, m, &w.tensor, &w.absmax);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.in_features;
        }
        Ok((CpuStorage::F32(dx), Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = &self.weight;
        crate::cuda::apply(
            self.name(),
            w.gpu.as_ref(),
            storage,
            layout,
            w.out_features,
            w.in_features,
            |g, dy, m, _| g.dyw(dy, m),
        )
    }
}

/// `x·Wᵀ` through the NF4 op (differentiable in x).
pub fn nf4_linear(x: &Tensor, weight: &Arc<Nf4Weight>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Nf4Matmul {
        weight: weight.clone(),
    })
}

/// Forward-only op: `x · Wᵀ` plus each row's LoRA delta through the GEMV's epilogue
/// ([`crate::cuda::Nf4Gpu::xwt_lora`]); CUDA only.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
struct Nf4MatmulLora {
    weight: Arc<Nf4Weight>,
    lora: crate::bgmv::GemvLora,
}

#[cfg(feature = "cuda")]
impl CustomOp1 for Nf4MatmulLora {
    fn name(&self) -> &'static str {
        "nf4-matmul-lora"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "nf4-matmul-lora runs on a GPU only".into(),
        ))
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = &self.weight;
        crate::cuda::apply(
            self.name(),
            w.gpu.as_ref(),
            storage,
            layout,
            w.in_features,
            w.out_features,
            |g, x, m, x16| g.xwt_lora(x, m, x16, &self.lora),
        )
    }
}

/// `x (m, k) · Wᵀ` plus each row's LoRA delta for the projection `lora` describes (after the BGMV
/// shrink of its group), in one GEMV launch; m ≤ 8 rows, bf16 on the weight's GPU.
#[cfg(feature = "cuda")]
pub fn nf4_linear_lora(
    x: &Tensor,
    weight: &Arc<Nf4Weight>,
    lora: &crate::bgmv::GemvLora,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Nf4MatmulLora {
        weight: weight.clone(),
        lora: *lora,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::Nf4Config;
    use candle_core::{Device, Var};

    fn weight(n: usize, k: usize) -> Arc<Nf4Weight> {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i as f32) * 0.731).sin() * 0.05)
            .collect();
        Arc::new(Nf4Weight::new(
            Nf4Tensor::quantize(&v, &[n, k], Nf4Config::default()).unwrap(),
        ))
    }

    #[test]
    fn gradient_equals_dense_autograd() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = weight(48, 64);
        let wd = w.dequantize(&dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 64), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (2, 3, 48), &dev)?;
        let loss = (nf4_linear(x.as_tensor(), &w)? * &up)?.sum_all()?;
        let g = loss.backward()?;
        let gx = g.get(x.as_tensor()).expect("x has a gradient");
        let loss_dense = (x.as_tensor().broadcast_matmul(&wd.t()?)? * &up)?.sum_all()?;
        let gd = loss_dense.backward()?;
        let gx_dense = gd.get(x.as_tensor()).expect("x has a gradient");
        let diff = (gx - gx_dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |dx - dx_dense| = {diff}");
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = weight(16, 32);
        let x0: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).cos()).collect();
        let up: Vec<f32> = (0..16).map(|i| (i as f32 * 0.11).sin()).collect();
        let up_t = Tensor::from_vec(up.clone(), (1, 16), &dev)?;
        let f = |xv: &[f32]| -> candle_core::Result<f64> {
            let x = Tensor::from_vec(xv.to_vec(), (1, 32), &dev)?;
            Ok((nf4_linear(&x, &w)? * &up_t)?
                .sum_all()?
                .to_scalar::<f32>()? as f64)
        };
        let x = Var::from_vec(x0.clone(), (1, 32), &dev)?;
        let loss = (nf4_linear(x.as_tensor(), &w)? * &up_t)?.sum_all()?;
        let g = loss.backward()?;
        let gx = g
            .get(x.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let eps = 1e-2f32; // the loss is linear in x, so a large step has no truncation error
        for i in 0..32 {
            let mut xp = x0.clone();
            xp[i] += eps;
            let mut xm = x0.clone();
            xm[i] -= eps;
            let fd = (f(&xp)? - f(&xm)?) / (2.0 * eps as f64);
            assert!(
                (fd - gx[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "i={i}: fd {fd} vs {}",
                gx[i]
            );
        }
        Ok(())
    }
}
