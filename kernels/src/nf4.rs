//! NF4 quantization, byte-compatible with `bitsandbytes.functional.quantize_4bit(quant_type="nf4")`.
//!
//! NormalFloat4 is the 4-bit data type of QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning
//! of Quantized LLMs", §3): 16 quantiles of N(0, 1) rescaled to [-1, 1], applied per block of
//! `blocksize` values scaled by the block's absolute maximum. With double quantization (§3, "Double
//! Quantization") the f32 absmax vector is itself quantized: its mean is subtracted (`offset`) and the
//! centred values are quantized blockwise (256) with bitsandbytes' 8-bit signed dynamic code
//! ([`crate::dynamic`]).
//!
//! Layout follows bitsandbytes exactly: elements are taken in row-major order, blocks run across row
//! boundaries, two codes per byte with the **first element in the high nibble**, and a partial last
//! block is scaled by the absmax of the elements it has.

use crate::dynamic;
use crate::error::{KernelError, Result};
use rayon::prelude::*;

/// The 16 NF4 code values, as bitsandbytes' `get_4bit_type("nf4")` (f32).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Blocksize of the second-level (absmax) quantization, fixed at 256 in bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;

/// How to quantize: the first-level blocksize and whether to double-quantize the absmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Config {
    /// Elements per absmax block: a power of two in 32..=4096 (bitsandbytes' default is 64).
    pub blocksize: usize,
    /// Quantize the absmax vector too (bitsandbytes' `compress_statistics=True`).
    pub double_quant: bool,
}

impl Default for Nf4Config {
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl Nf4Config {
    /// Checks the blocksize against what bitsandbytes accepts.
    pub fn validate(&self) -> Result<()> {
        let b = self.blocksize;
        if !(32..=4096).contains(&b) || !b.is_power_of_two() {
            return Err(KernelError::InvalidBlocksize(b));
        }
        Ok(())
    }
}

/// The per-block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized: `absmax[i] = nested_code[q[i]] * nested_absmax[i / 256] + offset`.
    Double(DoubleQuant),
}

/// Second-level quantization state of the absmax vector.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// 8-bit code index per first-level block.
    pub quantized: Vec<u8>,
    /// f32 absmax per 256 first-level blocks.
    pub nested_absmax: Vec<f32>,
    /// Mean of the original absmax vector, subtracted before quantizing.
    pub offset: f32,
    /// The 256-entry code used (bitsandbytes' signed dynamic map).
    pub nested_code: Box<[f32; 256]>,
}

/// A tensor quantized to NF4. `shape` is the logical (unquantized) shape, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes, high nibble first.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The 16-entry code (always [`NF4_CODE`] for tensors we quantize; kept for loaded checkpoints).
    pub code: [f32; 16],
}

/// Decision thresholds between adjacent NF4 codes: `(code[i] + code[i + 1]) / 2` in f32.
fn nf4_bounds() -> [f32; 15] {
    let mut b = [0f32; 15];
    for (i, v) in b.iter_mut().enumerate() {
        *v = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    b
}

/// Code index of a scaled value: the number of thresholds strictly below it, so a value exactly on
/// a threshold takes the lower code (bitsandbytes' CPU kernel, `searchsorted(side="left")`).
#[inline]
fn nf4_index(bounds: &[f32; 15], x: f32) -> u8 {
    bounds.partition_point(|&b| b < x) as u8
}

/// Packs the NF4 codes of `values` and returns them with the per-block absmax, replicating
/// bitsandbytes 0.50's CPU `quantize_4bit` bit for bit (scripts/fixtures/BNB_NOTES.md):
/// full blocks scale by the f32 reciprocal `x * (1 / max(absmax, 1e-38))`, the partial last block
/// divides `x / max(absmax, 1e-38)` (and stores that clamped absmax); scaled values are clipped to
/// [-1, 1]; an odd element count pads the last low nibble with the code of 0.0.
fn quantize_codes(values: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    const TINY: f32 = 1e-38;
    let bounds = nf4_bounds();
    let n = values.len();
    let full = n - n % bs;
    let mut absmax = block_absmax(values, bs);
    if full < n {
        if let Some(last) = absmax.last_mut() {
            *last = last.max(TINY);
        }
    }
    let mut packed = vec![0u8; n.div_ceil(2)];
    // A block of `bs` (even) values fills `bs / 2` bytes, so blocks own disjoint byte ranges.
    packed
        .par_chunks_mut(bs / 2)
        .zip(values.par_chunks(bs))
        .zip(absmax.par_iter())
        .for_each(|((out, block), &amax)| {
            let full_block = block.len() == bs;
            let recip = 1.0 / amax.max(TINY);
            let q = |v: f32| {
                let x = if full_block { v * recip } else { v / amax };
                nf4_index(&bounds, x.clamp(-1.0, 1.0))
            };
            for (o, pair) in out.iter_mut().zip(block.chunks(2)) {
                let lo = if pair.len() > 1 { q(pair[1]) } else { q(0.0) };
                *o = (q(pair[0]) << 4) | lo;
            }
        });
    (packed, absmax)
}

/// Absolute maximum of each block of `blocksize` consecutive values (the last block may be short).
pub(crate) fn block_absmax(values: &[f32], blocksize: usize) -> Vec<f32> {
    values
        .par_chunks(blocksize)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect()
}

impl Nf4Tensor {
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of first-level blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Quantizes row-major f32 values of `shape` to NF4, as bitsandbytes does for an f32 input.
    pub fn quantize(values: &[f32], shape: &[usize], cfg: Nf4Config) -> Result<Self> {
        cfg.validate()?;
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(KernelError::Shape(format!(
                "{} values for shape {shape:?}",
                values.len()
            )));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(KernelError::NonFinite("NF4 quantize input"));
        }
        let bs = cfg.blocksize;
        let (packed, absmax) = quantize_codes(values, bs);
        let absmax = if cfg.double_quant {
            Absmax::Double(double_quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            shape: shape.to_vec(),
            blocksize: bs,
            packed,
            absmax,
            code: NF4_CODE,
        })
    }

    /// The f32 absmax of every block (recovered from the double quantization if used).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => dequantize_absmax(d, self.num_blocks()),
        }
    }

    /// Dequantizes to row-major f32: `code[nibble] * absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        let mut out = vec![0f32; self.numel()];
        dequantize_into(
            &self.packed,
            &absmax,
            &self.code,
            self.blocksize,
            0,
            &mut out,
        );
        out
    }

    /// Dequantizes rows `[row0, row0 + out.len() / cols)` of a 2-D tensor into `out`, with the absmax
    /// already expanded. Used by the matmul kernels to materialise one tile at a time.
    pub fn dequantize_rows_into(&self, absmax: &[f32], row0: usize, out: &mut [f32]) {
        let cols = self.shape.last().copied().unwrap_or(1);
        dequantize_into(
            &self.packed,
            absmax,
            &self.code,
            self.blocksize,
            row0 * cols,
            out,
        );
    }

    /// Bytes this tensor occupies (packed codes + scales), for memory accounting.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => a.len() * 4,
                Absmax::Double(d) => d.quantized.len() + d.nested_absmax.len() * 4 + 4 + 256 * 4,
            }
            + 16 * 4
    }
}

/// Dequantizes elements `[start, start + out.len())` into `out`.
fn dequantize_into(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    const PAR_MIN: usize = 1 << 16;
    // Walk block by block with a 16-entry table of `code * absmax` (the same f32 products as
    // bitsandbytes' `code[q] * absmax[block]`), two elements per packed byte.
    let work = |chunk_start: usize, chunk: &mut [f32]| {
        let end = chunk_start + chunk.len();
        let (mut i, mut o) = (chunk_start, 0usize);
        while i < end {
            let b = i / blocksize;
            let seg_end = ((b + 1) * blocksize).min(end);
            let scale = absmax[b];
            let lut = code.map(|c| c * scale);
            if !i.is_multiple_of(2) {
                chunk[o] = lut[(packed[i / 2] & 0x0f) as usize];
                i += 1;
                o += 1;
            }
            let pairs = (seg_end - i) / 2;
            for (dst, &byte) in chunk[o..o + 2 * pairs]
                .chunks_exact_mut(2)
                .zip(&packed[i / 2..i / 2 + pairs])
            {
                dst[0] = lut[(byte >> 4) as usize];
                dst[1] = lut[(byte & 0x0f) as usize];
            }
            i += 2 * pairs;
            o += 2 * pairs;
            if i < seg_end {
                chunk[o] = lut[(packed[i / 2] >> 4) as usize];
                i += 1;
                o += 1;
            }
        }
    };
    if out.len() < PAR_MIN {
        work(start, out);
    } else {
        out.par_chunks_mut(PAR_MIN)
            .enumerate()
            .for_each(|(c, chunk)| work(start + c * PAR_MIN, chunk));
    }
}

/// Double quantization of the absmax vector (QLoRA §3): subtract the mean, quantize blockwise (256)
/// with the signed 8-bit dynamic code.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    // bitsandbytes takes torch's f32 mean, whose summation order depends on the CPU's vector width
    // (so even torch is not bit-reproducible across machines); summing in f64 and rounding once gives
    // the correctly rounded mean, within an ulp of torch's.
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64;
    double_quantize_with_offset(absmax, mean as f32)
}

/// Double quantization with a given offset (to reproduce a reference's bytes exactly).
pub fn double_quantize_with_offset(absmax: &[f32], offset: f32) -> DoubleQuant {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (quantized, nested_absmax) = dynamic::quantize_blockwise(&centred, NESTED_BLOCKSIZE);
    DoubleQuant {
        quantized,
        nested_absmax,
        offset,
        nested_code: Box::new(dynamic::dynamic_signed_code()),
    }
}

/// Recovers the f32 absmax vector: `nested_code[q] * nested_absmax[i / 256] + offset`.
pub fn dequantize_absmax(d: &DoubleQuant, n: usize) -> Vec<f32> {
    let mut out = dynamic::dequantize_blockwise(
        &d.quantized[..n],
        &d.nested_absmax,
        &d.nested_code,
        NESTED_BLOCKSIZE,
    );
    for v in &mut out {
        *v += d.offset;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_index_matches_argmin_off_the_midpoints() {
        let bounds = nf4_bounds();
        let mut x = -1.2f32;
        while x < 1.2 {
            let argmin = NF4_CODE
                .iter()
                .enumerate()
                .fold((0usize, f32::INFINITY), |(bi, bd), (i, &c)| {
                    let d = (x - c).abs();
                    if d < bd {
                        (i, d)
                    } else {
                        (bi, bd)
                    }
                })
                .0;
            assert_eq!(nf4_index(&bounds, x) as usize, argmin, "x = {x}");
            x += 1e-4;
        }
    }

    #[test]
    fn roundtrip_error_is_bounded_by_half_the_largest_code_gap() {
        let vals: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        for dq in [false, true] {
            let t = Nf4Tensor::quantize(
                &vals,
                &[10, 100],
                Nf4Config {
                    blocksize: 64,
                    double_quant: dq,
                },
            )
            .unwrap();
            let back = t.dequantize();
            for (a, b) in vals.iter().zip(&back) {
                // largest gap between adjacent NF4 codes is 1 - 0.7229 ≈ 0.277, scaled by absmax ≤ 1
                assert!((a - b).abs() <= 0.16, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_bad_blocksize_and_non_finite() {
        let bad = Nf4Config {
            blocksize: 48,
            double_quant: false,
        };
        assert!(matches!(
            Nf4Tensor::quantize(&[0.0; 48], &[48], bad),
            Err(KernelError::InvalidBlocksize(48))
        ));
        assert!(matches!(
            Nf4Tensor::quantize(&[f32::NAN; 64], &[64], Nf4Config::default()),
            Err(KernelError::NonFinite(_))
        ));
    }
}
