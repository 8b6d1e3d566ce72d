//! bitsandbytes' 8-bit signed dynamic quantization code and blockwise 8-bit quantization.
//!
//! The code is `bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7,
//! total_bits=8)` (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization", §2.2): for
//! each decimal exponent e in -6..=0, the midpoints of `linspace(0.1, 1, 2^(e+6) + 1)` scaled by
//! 10^e, with both signs, plus 0 and 1, sorted. The 8-bit quantizer replicates bitsandbytes' CPU
//! kernel (a 65,536-entry lookup table, not an exact nearest-code search) so its bytes are identical.

use crate::nf4::block_absmax;
use rayon::prelude::*;

/// torch.linspace(start, end, steps, dtype=float32) on CPU: the first half counts up from `start`,
/// the second half down from `end`, with `step` computed in f32
/// (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Builds bitsandbytes' signed 8-bit dynamic map (256 sorted f32 values in [-1, 1]).
pub fn create_dynamic_map_signed() -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, fraction_items);
        // torch multiplies an f32 tensor by a Python float in f32 (the scalar is cast first).
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i) as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale * m));
        data.extend(means.iter().map(|&m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// bitsandbytes' signed dynamic code as `create_dynamic_map()` returned it (bitsandbytes 0.50.2,
/// torch 2.15, x86-64 with AVX-512; bits recorded in tests/fixtures/nf4/index.json). torch's
/// vectorized `linspace` adds `step` to a base once per SIMD lane, so the last bit of some entries
/// depends on the CPU's vector width; checkpoints carry the table they used (`nested_quant_map`), and
/// for the tables we write we pin this one. [`create_dynamic_map_signed`] rebuilds it to within a few ulp.
const DYNAMIC_SIGNED_CODE_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic code used for double quantization.
pub fn dynamic_signed_code() -> [f32; 256] {
    DYNAMIC_SIGNED_CODE_BITS.map(f32::from_bits)
}

/// bitsandbytes' CPU lookup table for 8-bit quantization: entry j is the code index for the value
/// `v_j = 2j/65535 - 1`, i.e. the number of code midpoints strictly below `v_j` (f32 throughout).
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    // v_j increases with j, so the count of midpoints below it only grows: one merge pass.
    let mut below = 0usize;
    (0..65536u32)
        .map(|j| {
            let jf = j as f32;
            let v = (jf + jf) / 65535.0 - 1.0;
            while below < mids.len() && mids[below] < v {
                below += 1;
            }
            below as u8
        })
        .collect()
}

/// Blockwise 8-bit quantization with the signed dynamic code, bit-identical to bitsandbytes 0.50's
/// CPU `quantize_blockwise` (scripts/fixtures/BNB_NOTES.md): per block `absmax = max |x|` (an all-zero
/// block stores code 0), `s = clip(x * (1/absmax), -1, 1)`, `t = (s + 1) * 0.5`, then
/// `j = trunc(fma(t, 65535, 0.5))` indexes a 65,536-entry table of nearest codes.
/// Returns (codes, absmax per block).
pub fn quantize_blockwise(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let code = dynamic_signed_code();
    let lut = quantize_lut(&code);
    let absmax = block_absmax(values, blocksize);
    let mut q = vec![0u8; values.len()];
    q.par_chunks_mut(blocksize)
        .zip(values.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .for_each(|((out, block), &amax)| {
            if amax == 0.0 {
                return;
            }
            let inv = 1.0 / amax;
            for (o, &v) in out.iter_mut().zip(block) {
                let s = (v * inv).clamp(-1.0, 1.0);
                let t = (s + 1.0) * 0.5;
                let f = t.mul_add(65535.0, 0.5);
                *o = lut[(f as u32 & 0xFFFF) as usize];
            }
        });
    (q, absmax)
}

/// Inverse of [`quantize_blockwise`]: `code[q] * absmax[i / blocksize]`.
pub fn dequantize_blockwise(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| code[c as usize] * absmax[i / blocksize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_sorted_symmetric_and_spans_unit_interval() {
        let c = dynamic_signed_code();
        let rebuilt = create_dynamic_map_signed();
        for (a, b) in c.iter().zip(&rebuilt) {
            assert!(
                (a.to_bits() as i64 - b.to_bits() as i64).abs() <= 4,
                "{a} vs {b}"
            );
        }
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(c[255], 1.0);
        assert_eq!(c.iter().filter(|&&v| v == 0.0).count(), 1);
        assert!(c[0] > -1.0 && c[0] < -0.99);
    }

    #[test]
    fn blockwise_roundtrip_is_close() {
        let v: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let (q, a) = quantize_blockwise(&v, 256);
        let back = dequantize_blockwise(&q, &a, &dynamic_signed_code(), 256);
        for (x, y) in v.iter().zip(&back) {
            assert!((x - y).abs() < 0.05 * 3.0, "{x} {y}");
        }
    }
}
