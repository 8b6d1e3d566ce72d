//! The tiled layout of an NF4 weight that decodes with the `t4` GEMV on a GPU (host-side
//! permutation at upload; the kernels of cuda/nf4_t4.cuh and nf4_tc.cuh's `tc3` for
//! 5..8 rows read it, and nf4_dequantize_tiled_bf16 turns it back into row-major bf16).
//!
//! Why: the t4 GEMV's warp loads the 64 bytes (128 codes) of one super-block of 8 rows at a time,
//! 8 half-used 128-byte lines per load instruction; L1's wavefronts, not DRAM, bound the kernel
//! (ncu, BENCHMARKS.md session 13). In the tiled layout those 8 rows' 64 bytes are contiguous, so a
//! warp's load is 4 whole lines, and the 8 rows' two block scales per super-block one 16-byte
//! piece instead of 8 lines' 2 bytes each.
//!
//! Layout (n % 16 == 0, k % 128 == 0, blocksize 64): the codes of tile `i` (rows 16i..16i+16) and
//! super-block `s` (columns 128s..128s+128) form 1,024 contiguous bytes at `(i · k/128 + s) · 1024`,
//! row by row (64 bytes each, the row-major bytes of those columns). The per-block scales (8-bit
//! codes or f32, one per 64 columns) follow the same order: 32 per (tile, super-block), two per row.
//! The double quantization's second level (one f32 per 256 row-major blocks) and offset stay as
//! they are: kernels index them by the row-major block.

/// Rows per tile and columns per super-block.
pub const TILE_ROWS: usize = 16;
pub const SUPER_COLS: usize = 128;
/// Columns per scale block the layout takes.
pub const BLOCK: usize = 64;

/// Whether an (n, k) weight with `blocksize` can take the tiled layout.
pub fn fits(n: usize, k: usize, blocksize: usize) -> bool {
    n.is_multiple_of(TILE_ROWS) && k.is_multiple_of(SUPER_COLS) && blocksize == BLOCK && k > 0
}

/// Row-major packed codes of an (n, k) weight (k / 2 bytes per row) in the tiled order.
pub fn tile_packed(packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    tile_units(packed, n, k, SUPER_COLS / 2)
}

/// Row-major per-block values (k / 64 per row) in the tiled order.
pub fn tile_blocks<T: Copy + Default>(blocks: &[T], n: usize, k: usize) -> Vec<T> {
    tile_units(blocks, n, k, SUPER_COLS / BLOCK)
}

/// `per` consecutive items of each row per super-block, regrouped (tile, super-block, row).
fn tile_units<T: Copy + Default>(v: &[T], n: usize, k: usize, per: usize) -> Vec<T> {
    let nsb = k / SUPER_COLS;
    let row_len = nsb * per;
    assert_eq!(
        v.len(),
        n * row_len,
        "tiled layout: {n}x{k} weight, {} items",
        v.len()
    );
    let mut out = vec![T::default(); v.len()];
    for (tile, rows) in v.chunks_exact(TILE_ROWS * row_len).enumerate() {
        let dst_tile = &mut out[tile * TILE_ROWS * row_len..][..TILE_ROWS * row_len];
        for (r, row) in rows.chunks_exact(row_len).enumerate() {
            for (s, unit) in row.chunks_exact(per).enumerate() {
                dst_tile[(s * TILE_ROWS + r) * per..][..per].copy_from_slice(unit);
            }
        }
    }
    out
}

/// The row-major position of the tiled layout's 16-byte piece `c` (32 codes): (row, first
/// column). cuda/nf4.cu's nf4_dequantize_tiled_bf16 does the same arithmetic.
pub fn piece_origin(c: usize, k: usize) -> (usize, usize) {
    let nsb = k / SUPER_COLS;
    let ts = c / 64; // 1,024 bytes = 64 pieces per (tile, super-block)
    let r = (c % 64) / 4;
    let piece = c % 4;
    let (tile, s) = (ts / nsb, ts % nsb);
    (tile * TILE_ROWS + r, s * SUPER_COLS + piece * 32)
}

/// The tiled index of the scale of piece `c` (two pieces per 64-column block).
pub fn piece_block(c: usize) -> usize {
    (c / 64) * 32 + ((c % 64) / 4) * 2 + (c % 4) / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::{Absmax, Nf4Config, Nf4Tensor};

    /// Reads a tiled weight back the way the tiled dequantize kernel does (piece by piece, scale by
    /// tiled block index, second level by row-major block) and checks every code and scale
    /// against the row-major tensor.
    fn check(n: usize, k: usize, double_quant: bool) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i as f32 * 0.37).sin() * 0.05) + (i % 7) as f32 * 1e-3)
            .collect();
        let cfg = Nf4Config {
            blocksize: 64,
            double_quant,
        };
        let t = Nf4Tensor::quantize(&w, &[n, k], cfg).unwrap();
        assert!(fits(n, k, t.blocksize));
        let packed = tile_packed(&t.packed, n, k);
        let want_scales = t.absmax_f32();
        let scale_of = |tiled_block: usize, row_major_block: usize| -> f32 {
            match &t.absmax {
                Absmax::Plain(a) => tile_blocks(a, n, k)[tiled_block],
                Absmax::Double(d) => {
                    let q = tile_blocks(&d.quantized, n, k)[tiled_block];
                    d.nested_code[q as usize] * d.nested_absmax[row_major_block / 256] + d.offset
                }
            }
        };
        for c in 0..packed.len() / 16 {
            let (row, col) = piece_origin(c, k);
            let e0 = row * k + col;
            assert_eq!(
                &packed[16 * c..16 * c + 16],
                &t.packed[e0 / 2..e0 / 2 + 16],
                "piece {c} of {n}x{k}"
            );
            let b = e0 / 64;
            assert_eq!(
                scale_of(piece_block(c), b).to_bits(),
                want_scales[b].to_bits(),
                "scale of piece {c} of {n}x{k}"
            );
        }
    }

    #[test]
    fn tiled_pieces_and_scales_match_row_major() {
        check(16, 128, true);
        check(48, 384, true);
        check(32, 256, false);
        check(64, 1024, true); // several nested (256-block) groups
    }

    #[test]
    fn fits_needs_whole_tiles_and_64_blocks() {
        assert!(fits(4096, 4096, 64));
        assert!(!fits(4096, 4096, 128));
        assert!(!fits(4100, 4096, 64));
        assert!(!fits(4096, 4160, 64));
    }
}
