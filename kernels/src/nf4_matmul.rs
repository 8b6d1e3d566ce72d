//! CPU NF4 matrix products: `y = x·Wᵀ` (forward) and `dx = dy·W` (input gradient), W stored in NF4.
//!
//! Neither keeps a dequantized copy of W: decode-sized inputs (few rows) use a fused GEMV that reads
//! the 4-bit codes through a per-block 16-entry lookup table (the CPU analogue of bitsandbytes'
//! `kgemm_4bit_inference`); larger inputs dequantize one tile of rows of W at a time into a scratch
//! buffer and hand it to the `gemm` crate (what candle's CPU matmul uses), as QLoRA's reference does
//! per layer with `dequantize_4bit` + matmul, but bounded to a tile.

use crate::gemv::transpose;
use crate::nf4::Nf4Tensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Inputs with at most this many rows use the fused GEMV path.
const GEMV_MAX_ROWS: usize = 8;
/// Up to this many rows (a decode batch), groups of [`GEMV_MAX_ROWS`] rows use the fused kernel.
const GEMV_BATCH_ROWS: usize = 32;
/// Rows of W dequantized per tile on the tiled path.
const TILE_ROWS: usize = 64;

/// The (rows, cols) of a 2-D NF4 weight.
pub fn weight_dims(w: &Nf4Tensor) -> (usize, usize) {
    match w.shape.as_slice() {
        [n, k] => (*n, *k),
        [k] => (1, *k),
        s => (s[..s.len() - 1].iter().product(), s[s.len() - 1]),
    }
}

/// `x (m×k) · Wᵀ (k×n) → (m×n)`, with `absmax` the expanded f32 scales of `w`.
pub fn matmul_xwt(x: &[f32], m: usize, w: &Nf4Tensor, absmax: &[f32]) -> Vec<f32> {
    let (n, k) = weight_dims(w);
    assert_eq!(x.len(), m * k, "x must be m×k");
    if m <= GEMV_MAX_ROWS {
        return gemv_xwt(x, m, w, absmax, n, k);
    }
    if m <= GEMV_BATCH_ROWS {
        // A decode batch: reading the 4-bit weights once per group of rows is far cheaper than
        // dequantizing the whole matrix for a GEMM of so few rows.
        let mut out = vec![0f32; m * n];
        for (g, rows) in x.chunks(GEMV_MAX_ROWS * k).enumerate() {
            let r = rows.len() / k;
            let y = gemv_xwt(rows, r, w, absmax, n, k);
            out[g * GEMV_MAX_ROWS * n..g * GEMV_MAX_ROWS * n + r * n].copy_from_slice(&y);
        }
        return out;
    }
    // outᵀ (n×m) is computed tile by tile so that each task owns contiguous rows, then transposed.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TILE_ROWS * m)
        .enumerate()
        .for_each(|(t, out_tile)| {
            let row0 = t * TILE_ROWS;
            let rows = out_tile.len() / m;
            let mut tile = vec![0f32; rows * k];
            w.dequantize_rows_into(absmax, row0, &mut tile);
            // SAFETY: tile is rows×k row-major, x is m×k row-major, out_tile is rows×m row-major;
            // all pointers are valid for the strides and extents given.
            unsafe {
                gemm(
                    rows,
                    m,
                    k,
                    out_tile.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    tile.as_ptr(),
                    1,
                    k as isize,
                    x.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    transpose(out_t, n, m)
}

/// Output rows handled per rayon task on the GEMV path.
const GEMV_ROWS_PER_TASK: usize = 16;

/// Fused decode path: each output feature j reads row j of W once, 4 bits per weight. Per block the
/// codes are expanded into unscaled NF4 values and dotted with x (16 independent lanes, FMA where the
/// CPU has it), then scaled by the block's absmax once.
fn gemv_xwt(x: &[f32], m: usize, w: &Nf4Tensor, absmax: &[f32], n: usize, k: usize) -> Vec<f32> {
    let bs = w.blocksize;
    let mut out_t = vec![0f32; n * m];
    // Rows of whole blocks (k a multiple of the blocksize: every real model) take the fast kernels.
    let whole_blocks = k.is_multiple_of(bs);
    out_t
        .par_chunks_mut(m * GEMV_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, acc)| {
            let row0 = t * GEMV_ROWS_PER_TASK;
            if whole_blocks {
                gemv_rows(x, m, w, absmax, k, row0, acc);
            } else {
                gemv_rows_unaligned(x, m, w, absmax, k, row0, acc);
            }
        });
    transpose(out_t, n, m)
}

fn gemv_rows(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    absmax: &[f32],
    k: usize,
    row0: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { gemv_rows_avx2(x, m, w, absmax, k, row0, acc) };
        return;
    }
    gemv_rows_impl(x, m, w, absmax, k, row0, acc);
}

/// AVX2 kernel: 16 weights per step. The 16 nibbles of 8 packed bytes are widened to i32 indices
/// and looked up in the block's scaled 16-entry table with two 8-lane permutes and a blend on bit 3
/// (the vector form of a 16-entry LUT), then fused-multiply-added with x into running accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_rows_avx2(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    absmax: &[f32],
    k: usize,
    row0: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    const MAX_M: usize = GEMV_MAX_ROWS;
    debug_assert!(m <= MAX_M && w.blocksize.is_multiple_of(16));
    let bs = w.blocksize;
    let mask_lo = _mm_set1_epi8(0x0f);
    for (r, out) in acc.chunks_mut(m).enumerate() {
        let base = (row0 + r) * k;
        let mut lanes = [_mm256_setzero_ps(); 2 * MAX_M];
        for (bi, c) in (0..k).step_by(bs).enumerate() {
            let scale = absmax[base / bs + bi];
            let lut = w.code.map(|v| v * scale);
            let lut_lo = _mm256_loadu_ps(lut.as_ptr());
            let lut_hi = _mm256_loadu_ps(lut.as_ptr().add(8));
            let bytes = w.packed.as_ptr().add((base + c) / 2);
            for s in (0..bs).step_by(16) {
                // 8 bytes → 16 nibbles in element order (high nibble first).
                let v = _mm_loadl_epi64(bytes.add(s / 2) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask_lo);
                let lo = _mm_and_si128(v, mask_lo);
                let nib = _mm_unpacklo_epi8(hi, lo);
                let i0 = _mm256_cvtepu8_epi32(nib);
                let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8));
                let pick = |idx: __m256i| {
                    let a = _mm256_permutevar8x32_ps(lut_lo, idx);
                    let b = _mm256_permutevar8x32_ps(lut_hi, idx);
                    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
                };
                let (w0, w1) = (pick(i0), pick(i1));
                for i in 0..m {
                    let xp = x.as_ptr().add(i * k + c + s);
                    lanes[2 * i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), lanes[2 * i]);
                    lanes[2 * i + 1] =
                        _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), lanes[2 * i + 1]);
                }
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            let mut buf = [0f32; 8];
            _mm256_storeu_ps(
                buf.as_mut_ptr(),
                _mm256_add_ps(lanes[2 * i], lanes[2 * i + 1]),
            );
            *o += buf.iter().sum::<f32>();
        }
    }
}

/// Portable version: per block a scaled table, 16 running lanes per row.
fn gemv_rows_impl(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    absmax: &[f32],
    k: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let bs = w.blocksize;
    let mut vals = vec![0f32; bs];
    for (r, out) in acc.chunks_mut(m).enumerate() {
        let base = (row0 + r) * k;
        let mut lanes = vec![[0f32; 16]; m];
        for (bi, c) in (0..k).step_by(bs).enumerate() {
            let lut = w.code.map(|v| v * absmax[base / bs + bi]);
            let bytes = &w.packed[(base + c) / 2..(base + c + bs) / 2];
            for (v, &byte) in vals.chunks_exact_mut(2).zip(bytes) {
                v[0] = lut[(byte >> 4) as usize];
                v[1] = lut[(byte & 0x0f) as usize];
            }
            for (i, l) in lanes.iter_mut().enumerate() {
                let xs = &x[i * k + c..i * k + c + bs];
                for (cv, cx) in vals.chunks_exact(16).zip(xs.chunks_exact(16)) {
                    for j in 0..16 {
                        l[j] += cv[j] * cx[j];
                    }
                }
            }
        }
        for (o, l) in out.iter_mut().zip(&lanes) {
            *o += l.iter().sum::<f32>();
        }
    }
}

/// General rows (blocks straddle rows, odd k): element-wise with a per-block scaled table.
fn gemv_rows_unaligned(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    absmax: &[f32],
    k: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let bs = w.blocksize;
    for (r, out) in acc.chunks_mut(m).enumerate() {
        let base = (row0 + r) * k;
        for c in 0..k {
            let e = base + c;
            let byte = w.packed[e / 2];
            let nib = if e.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            };
            let wv = w.code[nib as usize] * absmax[e / bs];
            for (i, o) in out.iter_mut().enumerate() {
                *o += wv * x[i * k + c];
            }
        }
    }
}

/// `dy (m×n) · W (n×k) → dx (m×k)`: the input gradient of `y = x·Wᵀ`, re-dequantizing W one tile
/// at a time (no dequantized weight survives the call).
pub fn matmul_dyw(dy: &[f32], m: usize, w: &Nf4Tensor, absmax: &[f32]) -> Vec<f32> {
    let (n, k) = weight_dims(w);
    assert_eq!(dy.len(), m * n, "dy must be m×n");
    let mut dx = vec![0f32; m * k];
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut row0 = 0;
    while row0 < n {
        let rows = TILE_ROWS.min(n - row0);
        let tile = &mut tile[..rows * k];
        w.dequantize_rows_into(absmax, row0, tile);
        // SAFETY: dy[:, row0..row0+rows] is m×rows with row stride n; tile is rows×k row-major;
        // dx is m×k row-major. gemm accumulates (read_dst) into dx after the first tile.
        unsafe {
            gemm(
                m,
                k,
                rows,
                dx.as_mut_ptr(),
                1,
                k as isize,
                row0 > 0,
                dy.as_ptr().add(row0),
                1,
                n as isize,
                tile.as_ptr(),
                1,
                k as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(0),
            );
        }
        row0 += rows;
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::Nf4Config;

    fn dense_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                    - 0.5
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize, bs: usize) {
        let wv = pseudo(n * k, 7);
        let w = Nf4Tensor::quantize(
            &wv,
            &[n, k],
            Nf4Config {
                blocksize: bs,
                double_quant: true,
            },
        )
        .unwrap();
        let wd = w.dequantize();
        let absmax = w.absmax_f32();
        let x = pseudo(m * k, 3);
        let y = matmul_xwt(&x, m, &w, &absmax);
        let yr = dense_xwt(&x, m, &wd, n, k);
        for (a, b) in y.iter().zip(&yr) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "fwd m={m} n={n} k={k}: {a} vs {b}"
            );
        }
        let dy = pseudo(m * n, 11);
        let dx = matmul_dyw(&dy, m, &w, &absmax);
        for i in 0..m {
            for c in 0..k {
                let r: f32 = (0..n).map(|j| dy[i * n + j] * wd[j * k + c]).sum();
                let a = dx[i * k + c];
                assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "bwd {a} vs {r}");
            }
        }
    }

    #[test]
    fn gemv_and_tiled_paths_match_dense_reference() {
        check(1, 70, 128, 64);
        check(3, 33, 96, 32);
        check(9, 130, 64, 64);
        check(17, 65, 100, 64); // rows not block-aligned, odd tile tail
        check(40, 70, 128, 64); // tiled path
        check(20, 33, 128, 64); // grouped GEMV (decode batch)
        check(2, 5, 7, 32); // odd k: unaligned nibbles
    }
}
