//! Dense f32 `x·Wᵀ` for few rows (decode): each task streams a contiguous band of W's rows once and
//! dots them with every input row using 16 independent FMA lanes. The general GEMM (the `gemm` crate)
//! packs both operands first, which for 1–8 rows costs more than the product itself; decode is bound
//! by reading W, so reading it exactly once at full bandwidth is what matters.

use rayon::prelude::*;

/// Rows of x for which [`gemv_xwt`] beats the packed GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
const ROWS_PER_TASK: usize = 32;

/// `x (m×k) · Wᵀ` with W `(n×k)` row-major → `(m×n)`.
pub fn gemv_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x must be m×k");
    assert_eq!(w.len(), n * k, "W must be n×k");
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(m * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, acc)| {
            let row0 = t * ROWS_PER_TASK;
            for (r, out) in acc.chunks_mut(m).enumerate() {
                let wr = &w[(row0 + r) * k..(row0 + r + 1) * k];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = dot(wr, &x[i * k..(i + 1) * k]);
                }
            }
        });
    transpose(out_t, n, m)
}

/// `(n×m) → (m×n)`: the kernels accumulate per output feature (contiguous per task) and hand the
/// result back row-major.
pub(crate) fn transpose(t: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 || n == 1 {
        return t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_fma(a, b) };
    }
    dot_lanes::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (pa, pb) in ca.zip(cb) {
        for j in 0..16 {
            lanes[j] = if FMA {
                pa[j].mul_add(pb[j], lanes[j])
            } else {
                lanes[j] + pa[j] * pb[j]
            };
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        for (m, n, k) in [(1, 70, 37), (3, 65, 64), (8, 33, 100)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let y = gemv_xwt(&x, m, &w, n, k);
            for i in 0..m {
                for j in 0..n {
                    let r: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                    assert!((y[i * n + j] - r).abs() < 1e-4 * (1.0 + r.abs()));
                }
            }
        }
    }
}
