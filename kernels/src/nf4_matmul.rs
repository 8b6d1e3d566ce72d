//! CPU NF4 matrix products: `y = x·Wᵀ` (forward) and `dx = dy·W` (input gradient), W stored in NF4.
//!
//! Neither keeps a dequantized copy of W: decode-sized inputs (few rows) use a fused GEMV that reads
//! the 4-bit codes through a per-block 16-entry lookup table (the CPU analogue of bitsandbytes'
//! `kgemm_4bit_inference`); larger inputs dequantize one tile of rows of W at a time into a scratch
//! buffer and hand it to the `gemm` crate (what candle's CPU matmul uses), as QLoRA's reference does
//! per layer with `dequantize_4bit` + matmul, but bounded to a tile.

use crate::nf4::Nf4Tensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Inputs with at most this many rows use the fused GEMV path.
const GEMV_MAX_ROWS: usize = 4;
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
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// Fused decode path: each output feature j reads row j of W once, 4 bits per weight.
fn gemv_xwt(x: &[f32], m: usize, w: &Nf4Tensor, absmax: &[f32], n: usize, k: usize) -> Vec<f32> {
    let bs = w.blocksize;
    let mut out_t = vec![0f32; n * m];
    out_t.par_chunks_mut(m).enumerate().for_each(|(j, acc)| {
        let base = j * k;
        let mut c = 0;
        while c < k {
            let i = base + c;
            let block = i / bs;
            let seg_end = ((block + 1) * bs - base).min(k);
            let scale = absmax[block];
            let mut lut = [0f32; 16];
            for (l, code) in lut.iter_mut().zip(w.code.iter()) {
                *l = code * scale;
            }
            if i.is_multiple_of(2) && (seg_end - c).is_multiple_of(2) {
                // aligned: one byte holds columns (c, c+1)
                let bytes = &w.packed[i / 2..(base + seg_end) / 2];
                for (r, a) in acc.iter_mut().enumerate() {
                    let xr = &x[r * k + c..r * k + seg_end];
                    let mut s0 = 0f32;
                    let mut s1 = 0f32;
                    for (b, xx) in bytes.iter().zip(xr.chunks_exact(2)) {
                        s0 += lut[(b >> 4) as usize] * xx[0];
                        s1 += lut[(b & 0x0f) as usize] * xx[1];
                    }
                    *a += s0 + s1;
                }
            } else {
                for cc in c..seg_end {
                    let e = base + cc;
                    let byte = w.packed[e / 2];
                    let nib = if e.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0x0f
                    };
                    let wv = lut[nib as usize];
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a += wv * x[r * k + cc];
                    }
                }
            }
            c = seg_end;
        }
    });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
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
        check(2, 5, 7, 32); // odd k: unaligned nibbles
    }
}
