//! Batched LoRA for decode: BGMV ("batched gather matrix-vector"), after Punica (Chen et al. 2023,
//! "Punica: Multi-Tenant LoRA Serving", §4) and S-LoRA (Sheng et al. 2023).
//!
//! Every row of a batch applies its own adapter to a projection, `y[row] += s·(x[row]·Aᵀ)·Bᵀ` with
//! the row's A (r, in), B (out, r) and scale s, or nothing for a row on the base model. On CUDA
//! this is two kernel launches per projection for the whole batch (shrink to the rows' ranks,
//! expand back into y in place), whatever mix of adapters and ranks the rows use, and two for a
//! group of projections reading the same input (q/k/v, gate/up); see
//! `cuda/lora.cu` and [`AdapterTable`] / [`BgmvPlan`]. [`bgmv_reference`] is the CPU reference of
//! the same semantics. Without the `cuda` feature the table and plan types exist but are never
//! built (their constructors return `None`), so callers need no feature gates.

use crate::error::{KernelError, Result};
use candle_core::Tensor;

/// Up to this many rows a batch's LoRA runs through BGMV on CUDA; larger (prefill) batches gather
/// each adapter's rows and run cuBLAS GEMMs, which beat a matrix-vector kernel there.
pub const BGMV_MAX_ROWS: usize = 64;

/// One adapter module as BGMV reads it: A (r, in), B (out, r), `delta = scale·(x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone, Copy)]
pub struct BgmvModule<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// One row's module for [`bgmv_reference`]: row-major f32 A (rank, in) and B (out, rank).
#[derive(Debug, Clone, Copy)]
pub struct RowLora<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// CPU reference of the BGMV kernels: for each row with a module, `y[row] += scale·(x[row]·Aᵀ)·Bᵀ`
/// in f32, the shrink kept in f32 (as the kernels keep it). x is (rows, in), y (rows, out), both
/// row-major; `rows[i]` is row i's module.
pub fn bgmv_reference(
    x: &[f32],
    in_f: usize,
    y: &mut [f32],
    out_f: usize,
    rows: &[Option<RowLora<'_>>],
) -> Result<()> {
    let n = rows.len();
    if x.len() != n * in_f || y.len() != n * out_f {
        return Err(KernelError::Shape(format!(
            "bgmv: x has {} and y {} elements for {n} rows of {in_f} -> {out_f}",
            x.len(),
            y.len()
        )));
    }
    for (i, m) in rows.iter().enumerate() {
        let Some(m) = m else { continue };
        if m.a.len() != m.rank * in_f || m.b.len() != out_f * m.rank {
            return Err(KernelError::Shape(format!(
                "bgmv: row {i}: A has {} and B {} elements for rank {} ({in_f} -> {out_f})",
                m.a.len(),
                m.b.len(),
                m.rank
            )));
        }
        let xr = &x[i * in_f..(i + 1) * in_f];
        let t: Vec<f32> =
            m.a.chunks_exact(in_f.max(1))
                .map(|ar| ar.iter().zip(xr).map(|(a, x)| a * x).sum())
                .collect();
        let yr = &mut y[i * out_f..(i + 1) * out_f];
        for (yo, br) in yr.iter_mut().zip(m.b.chunks_exact(m.rank.max(1))) {
            let d: f32 = br.iter().zip(&t).map(|(b, t)| b * t).sum();
            *yo += m.scale * d;
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub use crate::bgmv_cuda::{AdapterTable, BgmvPlan, GemvLora, NormShrink, MAX_GROUP};
#[cfg(feature = "cuda")]
pub use crate::norm_shrink_cuda::{norm_shrink_parts, set_norm_shrink_parts};

/// Most projections one launch pair serves (q, k and v, which read the same input).
#[cfg(not(feature = "cuda"))]
pub const MAX_GROUP: usize = 3;

#[cfg(not(feature = "cuda"))]
pub use no_cuda::{AdapterTable, BgmvPlan};

/// Stand-ins without the `cuda` feature: never constructed (uninhabited), so every method is
/// unreachable and callers compile unchanged.
#[cfg(not(feature = "cuda"))]
mod no_cuda {
    use super::BgmvModule;
    use candle_core::Tensor;
    use std::convert::Infallible;
    use std::sync::Arc;

    /// An adapter's module table on a GPU (CUDA builds only).
    #[derive(Debug)]
    pub struct AdapterTable(Infallible);

    impl AdapterTable {
        /// Always `None`: there is no GPU without the `cuda` feature.
        pub fn build(_: &[Option<BgmvModule<'_>>]) -> candle_core::Result<Option<Self>> {
            Ok(None)
        }
        pub fn slots(&self) -> usize {
            match self.0 {}
        }
        pub fn bytes(&self) -> usize {
            match self.0 {}
        }
    }

    /// A forward pass's row → adapter mapping on a GPU (CUDA builds only).
    #[derive(Debug)]
    pub struct BgmvPlan(Infallible);

    impl BgmvPlan {
        /// Always `None`: no [`AdapterTable`] exists without the `cuda` feature.
        pub fn new(_: &[Option<Arc<AdapterTable>>]) -> candle_core::Result<Option<Self>> {
            Ok(None)
        }
        pub fn rows(&self) -> usize {
            match self.0 {}
        }
        pub fn apply(&self, _: usize, _: &Tensor, _: &Tensor) -> candle_core::Result<()> {
            match self.0 {}
        }
        pub fn apply_group(&self, _: usize, _: &Tensor, _: &[&Tensor]) -> candle_core::Result<()> {
            match self.0 {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reference_matches_matmuls_and_skips_rows_without_a_module() -> Result<()> {
        let (in_f, out_f) = (5, 3);
        let x: Vec<f32> = (0..3 * in_f).map(|i| (i as f32 * 0.37).sin()).collect();
        let y0: Vec<f32> = (0..3 * out_f).map(|i| i as f32 * 0.1).collect();
        let a2: Vec<f32> = (0..2 * in_f).map(|i| (i as f32 * 0.11).cos()).collect();
        let b2: Vec<f32> = (0..out_f * 2).map(|i| i as f32 - 2.5).collect();
        let a1: Vec<f32> = (0..in_f).map(|i| i as f32 * 0.2).collect();
        let b1: Vec<f32> = (0..out_f).map(|i| 1.0 - i as f32).collect();
        let m2 = RowLora {
            a: &a2,
            b: &b2,
            rank: 2,
            scale: 0.5,
        };
        let m1 = RowLora {
            a: &a1,
            b: &b1,
            rank: 1,
            scale: 2.0,
        };
        let mut y = y0.clone();
        bgmv_reference(&x, in_f, &mut y, out_f, &[Some(m2), None, Some(m1)])?;
        let dev = Device::Cpu;
        let delta = |row: usize, a: &[f32], b: &[f32], r: usize, s: f64| -> Result<Vec<f32>> {
            let xr = Tensor::from_slice(&x[row * in_f..(row + 1) * in_f], (1, in_f), &dev)?;
            let a = Tensor::from_slice(a, (r, in_f), &dev)?;
            let b = Tensor::from_slice(b, (out_f, r), &dev)?;
            let d = (xr.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?;
            Ok(d.flatten_all()?.to_vec1::<f32>()?)
        };
        let d0 = delta(0, &a2, &b2, 2, 0.5)?;
        let d2 = delta(2, &a1, &b1, 1, 2.0)?;
        for o in 0..out_f {
            assert!((y[o] - (y0[o] + d0[o])).abs() < 1e-5);
            assert_eq!(y[out_f + o], y0[out_f + o]);
            assert!((y[2 * out_f + o] - (y0[2 * out_f + o] + d2[o])).abs() < 1e-5);
        }
        let bad = bgmv_reference(&x, in_f, &mut y, out_f + 1, &[None, None, None]);
        assert!(bad.is_err());
        Ok(())
    }
}
