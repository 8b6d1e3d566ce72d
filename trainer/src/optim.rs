//! AdamW (Loshchilov & Hutter, 2019, as `torch.optim.AdamW`: decoupled weight decay applied first,
//! bias-corrected moments, `eps` added to the corrected second-moment root) with f32 state, on the
//! parameters' device or paged to the host.

use crate::step::Result;
#[cfg(feature = "cuda")]
use candle_core::Shape;
use candle_core::{DType, Device, Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW with f32 moments, one pair per parameter.
///
/// The moments are twice the trainable parameters in f32 (1.3 GB for r=64 on all projections of a
/// 7B model). With [`AdamW::paged`] they live in host memory (the idea of bitsandbytes' paged
/// optimizers, QLoRA §3):
/// - for a GPU, in page-locked host memory mapped into the GPU's address space, which the fused
///   update reads and writes in place over the host link (kernels/src/mapped_cuda.rs): no device
///   memory, no copies, one launch per tensor;
/// - otherwise (or if page-locked memory cannot be had, or `QLORAD_PAGED_MAPPED=0`) as host
///   tensors paged onto the parameter's device per tensor for its update and back.
///
/// The arithmetic is the same kernel on the same device either way, so paged and resident runs are
/// bit-identical.
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// The moments as tensors (resident, or host tensors paged per update); empty when mapped.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    mapped: Option<Mapped>,
    /// Moments in host memory streamed through device slots, updates deferred (staged_cuda.rs).
    #[cfg(feature = "cuda")]
    staged: Option<qlorad_kernels::staged_cuda::StagedAdamW>,
    pub step: u64,
    paged: bool,
}

/// Moments in mapped host memory, with their parameters' shapes.
#[cfg(feature = "cuda")]
struct Mapped {
    m: Vec<qlorad_kernels::mapped_cuda::MappedF32>,
    v: Vec<qlorad_kernels::mapped_cuda::MappedF32>,
    shapes: Vec<Shape>,
}

impl AdamW {
    pub fn new(vars: &[&Var], cfg: AdamWConfig) -> Result<Self> {
        let zeros = |v: &&Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        Ok(Self::from_state(
            cfg,
            vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            0,
        ))
    }

    /// Restores saved moments (a checkpoint's), in the order of the vars they were made for.
    pub fn from_state(cfg: AdamWConfig, m: Vec<Tensor>, v: Vec<Tensor>, step: u64) -> Self {
        Self {
            cfg,
            m,
            v,
            #[cfg(feature = "cuda")]
            mapped: None,
            #[cfg(feature = "cuda")]
            staged: None,
            step,
            paged: false,
        }
    }

    /// Keeps the moments in host memory (`true`), or on the parameters' device (`false`); moves
    /// them accordingly.
    pub fn paged(mut self, paged: bool, device: &Device) -> Result<Self> {
        let (m, v) = self.moments()?;
        #[cfg(feature = "cuda")]
        {
            self.mapped = None;
            self.staged = None;
            if let (true, Device::Cuda(d)) = (paged, device) {
                if std::env::var("QLORAD_PAGED_MAPPED").map_or(true, |v| v != "0") {
                    match map(d, &m, &v) {
                        Ok(mapped) => {
                            self.mapped = Some(mapped);
                            (self.m, self.v) = (Vec::new(), Vec::new());
                            self.paged = true;
                            return Ok(self);
                        }
                        Err(e) => tracing::warn!(
                            "paged optimizer: no mapped page-locked memory ({e}); paging per tensor"
                        ),
                    }
                }
            }
        }
        let home = if paged { Device::Cpu } else { device.clone() };
        self.m = m
            .iter()
            .map(|t| t.to_device(&home))
            .collect::<candle_core::Result<_>>()?;
        self.v = v
            .iter()
            .map(|t| t.to_device(&home))
            .collect::<candle_core::Result<_>>()?;
        self.paged = paged;
        Ok(self)
    }

    /// Keeps the moments in host memory like [`AdamW::paged`]; on a GPU, streamed through device
    /// slots in `groups` (var indices, in the order a forward pass reads them) by copy engines,
    /// each group's update applied just before its vars are next read ([`AdamW::clip_and_defer`],
    /// [`AdamW::apply_through`]). Elsewhere, or with `QLORAD_PAGED_STAGED=0`, as `paged(true)`.
    pub fn paged_in_groups(self, device: &Device, groups: Vec<Vec<usize>>) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            if std::env::var("QLORAD_PAGED_STAGED").map_or(true, |v| v != "0") {
                let (m, v) = self.moments()?;
                let host = |ts: &[Tensor]| -> Result<Vec<Vec<f32>>> {
                    Ok(ts
                        .iter()
                        .map(host_f32)
                        .collect::<candle_core::Result<_>>()?)
                };
                let shapes = m.iter().map(|t| t.shape().clone()).collect();
                match qlorad_kernels::staged_cuda::StagedAdamW::new(
                    d,
                    groups,
                    shapes,
                    &host(&m)?,
                    &host(&v)?,
                ) {
                    Ok(st) => {
                        let mut s = self;
                        s.staged = Some(st);
                        s.mapped = None;
                        (s.m, s.v) = (Vec::new(), Vec::new());
                        s.paged = true;
                        return Ok(s);
                    }
                    Err(e) => tracing::warn!("paged optimizer: no staged moments ({e}); mapped"),
                }
            }
        }
        let _ = groups;
        self.paged(true, device)
    }

    /// Applies a deferred update to the vars of every group up to `group` (an index into the
    /// groups of [`AdamW::paged_in_groups`]; `usize::MAX`: all). Call before those vars are read.
    pub fn apply_through(&self, group: usize) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(st) = &self.staged {
            st.apply_through(group)?;
        }
        let _ = group;
        Ok(())
    }

    /// Applies any deferred update: the vars and moments are current afterwards.
    pub fn flush(&self) -> Result<()> {
        self.apply_through(usize::MAX)
    }

    pub fn is_paged(&self) -> bool {
        self.paged
    }

    /// Bytes of optimizer state held on `device` (all of it, or none when paged to the host of a
    /// GPU run).
    pub fn bytes_on(&self, device: &Device) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(st) = &self.staged {
            return match device {
                Device::Cpu => st.host_bytes(),
                _ => st.device_bytes(),
            };
        }
        #[cfg(feature = "cuda")]
        if let Some(mp) = &self.mapped {
            return match device {
                Device::Cpu => mp.m.iter().chain(&mp.v).map(|b| b.len() * 4).sum(),
                _ => 0,
            };
        }
        self.m
            .iter()
            .chain(&self.v)
            .filter(|t| t.device().same_device(device))
            .map(|t| t.elem_count() * 4)
            .sum()
    }

    /// First and second moments, in var order (copies on the host when mapped).
    pub fn moments(&self) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        #[cfg(feature = "cuda")]
        if let Some(st) = &self.staged {
            let (m, v) = st.moments()?;
            return Ok((cpu_tensors(m, st.shapes())?, cpu_tensors(v, st.shapes())?));
        }
        #[cfg(feature = "cuda")]
        if let Some(mp) = &self.mapped {
            let vals = |bufs: &[qlorad_kernels::mapped_cuda::MappedF32]| {
                bufs.iter()
                    .map(|b| b.to_vec())
                    .collect::<candle_core::Result<Vec<_>>>()
            };
            return Ok((
                cpu_tensors(vals(&mp.m)?, &mp.shapes)?,
                cpu_tensors(vals(&mp.v)?, &mp.shapes)?,
            ));
        }
        Ok((self.m.clone(), self.v.clone()))
    }

    /// One update of every var from its gradient, at learning rate `lr`.
    pub fn update(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.update_scaled(vars, grads, lr, 1.0, &|| {})
    }

    /// Clips the gradients' global norm to `max_norm` (0: no clipping) and updates, as
    /// `torch.nn.utils.clip_grad_norm_` then `step()`; returns the norm before clipping (NaN
    /// without clipping). `between` is a preemption point: called after the norm and between the
    /// update's launches on a GPU.
    pub fn clip_and_update(
        &mut self,
        vars: &[&Var],
        grads: &[Tensor],
        lr: f64,
        max_norm: f64,
        between: &dyn Fn(),
    ) -> Result<f64> {
        let norm = self.clip_and_defer(vars, grads, lr, max_norm, between)?;
        self.flush()?;
        Ok(norm)
    }

    /// [`AdamW::clip_and_update`], except that with staged moments the update is only scheduled:
    /// each group is applied by [`AdamW::apply_through`] before its vars are next read (or by
    /// [`AdamW::flush`]), so the moments' transfers overlap the next forward pass.
    pub fn clip_and_defer(
        &mut self,
        vars: &[&Var],
        grads: &[Tensor],
        lr: f64,
        max_norm: f64,
        between: &dyn Fn(),
    ) -> Result<f64> {
        let (norm, coef) = clip(grads, max_norm)?;
        between();
        self.defer_scaled(vars, grads, lr, coef, between)?;
        Ok(norm)
    }

    /// Counts one more step; returns its bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    fn advance(&mut self) -> (f64, f64) {
        self.step += 1;
        let t = self.step as i32;
        (1.0 - self.cfg.beta1.powi(t), 1.0 - self.cfg.beta2.powi(t))
    }

    /// One update of every var from `grad_scale ·` its gradient (the clip coefficient, applied
    /// as `clip_grad_norm_` scales the gradients). On a GPU every tensor is updated by a few
    /// multi-tensor launches, with `between` called between them.
    pub fn update_scaled(
        &mut self,
        vars: &[&Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
        between: &dyn Fn(),
    ) -> Result<()> {
        self.defer_scaled(vars, grads, lr, grad_scale, between)?;
        self.flush()
    }

    /// [`AdamW::update_scaled`], left pending with staged moments (applied by
    /// [`AdamW::apply_through`] or [`AdamW::flush`]); done at once otherwise.
    fn defer_scaled(
        &mut self,
        vars: &[&Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
        between: &dyn Fn(),
    ) -> Result<()> {
        let c = self.cfg;
        let (bc1, bc2) = self.advance();
        #[cfg(feature = "cuda")]
        {
            use qlorad_kernels::multi_tensor_cuda::{adamw_update, Moments};
            let fused = fused_step(c, lr, bc1, bc2);
            let on_gpu = |t: &Tensor| t.device().is_cuda() && t.dtype() == DType::F32;
            let ps: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            if let Some(st) = &self.staged {
                st.defer(&ps, grads, fused, grad_scale as f32)?;
                return Ok(());
            }
            let moments = match &mut self.mapped {
                Some(mp) => Some(Moments::Mapped(&mut mp.m, &mut mp.v)),
                None if !self.paged && ps.iter().all(|p| on_gpu(p)) => {
                    Some(Moments::Device(&self.m, &self.v))
                }
                None => None,
            };
            if let Some(moments) = moments {
                adamw_update(
                    &ps,
                    grads,
                    moments,
                    fused,
                    grad_scale as f32,
                    GROUP_ELEMS,
                    between,
                )?;
                return Ok(());
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = between; // one pass per tensor on the CPU: nothing to preempt between
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = &if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            // Paged: this tensor's moments come in from the host for its update only.
            let (m0, v0) = (
                self.m[i].to_device(var.device())?,
                self.v[i].to_device(var.device())?,
            );
            #[cfg(feature = "cuda")]
            if var.device().is_cuda() && var.dtype() == DType::F32 {
                // One fused launch updating p, m and v in place (candle's ops: ~12 launches and
                // three new tensors per parameter).
                qlorad_kernels::train_cuda::adamw_update(
                    var.as_tensor(),
                    &g.contiguous()?,
                    &m0,
                    &v0,
                    fused_step(c, lr, bc1, bc2),
                )?;
                let home = self.m[i].device().clone();
                self.m[i] = m0.to_device(&home)?;
                self.v[i] = v0.to_device(&home)?;
                continue;
            }
            let m = ((&m0 * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&v0 * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut p = var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let p = (p - (m.div(&denom)? * (lr / bc1))?)?;
            var.set(&p)?;
            let home = self.m[i].device().clone();
            self.m[i] = m.to_device(&home)?;
            self.v[i] = v.to_device(&home)?;
        }
        Ok(())
    }
}

/// The gradients' global norm and the factor that clips it to `max_norm` (0: no clipping: NaN and
/// 1), as `torch.nn.utils.clip_grad_norm_`.
fn clip(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    if max_norm > 0.0 {
        let norm = crate::step::grad_norm(grads)?;
        Ok((norm, crate::step::clip_coef(norm, max_norm)))
    } else {
        Ok((f64::NAN, 1.0))
    }
}

/// Values per multi-tensor AdamW launch on a GPU (~20 launches for r = 64 on a 7B model): small
/// enough that a paged update, which streams its moments over the host link, leaves serving a
/// preemption point every few milliseconds.
#[cfg(feature = "cuda")]
const GROUP_ELEMS: usize = 1 << 23;

/// The fused kernels' form of one update's hyper-parameters (bias corrections folded in).
#[cfg(feature = "cuda")]
fn fused_step(
    c: AdamWConfig,
    lr: f64,
    bc1: f64,
    bc2: f64,
) -> qlorad_kernels::train_cuda::AdamWStep {
    qlorad_kernels::train_cuda::AdamWStep {
        beta1: c.beta1 as f32,
        beta2: c.beta2 as f32,
        eps: c.eps as f32,
        decay: (1.0 - lr * c.weight_decay) as f32,
        step_size: (lr / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
    }
}

/// Host tensors of `shapes` from their values.
#[cfg(feature = "cuda")]
fn cpu_tensors(vals: Vec<Vec<f32>>, shapes: &[Shape]) -> Result<Vec<Tensor>> {
    Ok(vals
        .into_iter()
        .zip(shapes)
        .map(|(x, s)| Tensor::from_vec(x, s.clone(), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?)
}

/// A tensor's values as f32 on the host, flattened.
#[cfg(feature = "cuda")]
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()
}

/// The moments copied into mapped page-locked host memory for GPU `d`.
#[cfg(feature = "cuda")]
fn map(d: &candle_core::CudaDevice, m: &[Tensor], v: &[Tensor]) -> candle_core::Result<Mapped> {
    use qlorad_kernels::mapped_cuda::MappedF32;
    let one =
        |t: &Tensor| -> candle_core::Result<MappedF32> { MappedF32::from_slice(d, &host_f32(t)?) };
    Ok(Mapped {
        m: m.iter().map(one).collect::<candle_core::Result<_>>()?,
        v: v.iter().map(one).collect::<candle_core::Result<_>>()?,
        shapes: m.iter().map(|t| t.shape().clone()).collect(),
    })
}
