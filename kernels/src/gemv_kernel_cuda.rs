//! [`GemvKernel`]: which fused NF4 GEMV a weight decodes with, the kernel names per row count and
//! the shapes each takes (a child of [`crate::cuda`]).

/// Which fused NF4 GEMV kernel decode uses (all compute the same function; they differ in how
/// they spend instructions, see cuda/nf4.cu). Chosen per process with `QLORAD_NF4_GEMV`
/// (`lut16`, `pair`, `pair2`, `mma`, `tc`, `tcr`, `tc3`, `t4`, `r2`, `r4`); gpu-check measures all of
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// One 16-entry shared-memory lookup per 4-bit code, one row per warp.
    Lut16,
    /// One lookup per byte in a replicated 256-entry table of code pairs, one row per warp.
    Pair,
    /// As `Pair` with two rows per warp (x loaded and converted once for both) up to 4 input
    /// rows; `Pair` beyond (register pressure).
    PairTwoRows,
    /// Tensor cores: codes dequantized into mma.m16n8k16 fragments through a byte → bf16 pair
    /// table, 16 features per block of 8 warps (needs out % 16 == 0, in % 64 == 0 and a
    /// blocksize that is a multiple of 64; other weights keep `Lut16`).
    Mma,
    /// Tensor cores, second form (cuda/nf4_tc.cuh): `Mma`'s fragments with a software pipeline of
    /// 2 k blocks per warp, ≤ 64 registers, cheaper table addressing; also has the LoRA epilogue.
    /// Same shape limits as `Mma`, and n·k < 2^32.
    Tc,
    /// `Tc` with up to 85 registers (3 resident blocks per multiprocessor instead of 4).
    TcRegs,
    /// `Tc` with 3 k blocks in flight per warp and up to 85 registers.
    Tc3,
    /// Tensor cores, third form (cuda/nf4_t4.cuh): two k blocks per iteration and 16-byte loads,
    /// the blocks kept apart in the mma's B columns, ~90 instructions per k block instead of
    /// `Tc3`'s 132; up to 4 input rows (5..8 run `Tc3`). Needs `Tc3`'s shapes with in % 128 == 0
    /// and blocksize 64, else the weight decodes with `Tc3`. Its weights are uploaded in the tiled
    /// layout of [`crate::tiled`] (whole 128-byte lines per warp load), which its `Tc3` rows and
    /// the dequantize read too.
    T4,
    /// `Lut16` with two rows per warp: x is loaded and converted once for both.
    Rows2,
    /// `Lut16` with four rows per warp up to 2 input rows, two up to 8 (register pressure).
    Rows4,
}

impl GemvKernel {
    pub const ALL: [GemvKernel; 10] = [
        GemvKernel::Lut16,
        GemvKernel::Pair,
        GemvKernel::PairTwoRows,
        GemvKernel::Mma,
        GemvKernel::Tc,
        GemvKernel::TcRegs,
        GemvKernel::Tc3,
        GemvKernel::T4,
        GemvKernel::Rows2,
        GemvKernel::Rows4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemvKernel::Lut16 => "lut16",
            GemvKernel::Pair => "pair",
            GemvKernel::PairTwoRows => "pair2",
            GemvKernel::Mma => "mma",
            GemvKernel::Tc => "tc",
            GemvKernel::TcRegs => "tcr",
            GemvKernel::Tc3 => "tc3",
            GemvKernel::T4 => "t4",
            GemvKernel::Rows2 => "r2",
            GemvKernel::Rows4 => "r4",
        }
    }

    /// The tensor-core kernels (16 features per block of [`super::GEMV_WARPS`] warps).
    pub(super) fn tensor_cores(self) -> bool {
        matches!(
            self,
            GemvKernel::Mma
                | GemvKernel::Tc
                | GemvKernel::TcRegs
                | GemvKernel::Tc3
                | GemvKernel::T4
        )
    }

    /// Whether this kernel computes an (n, k) weight of `blocksize`; the others fall back to
    /// `Lut16`.
    pub(super) fn fits(self, n: usize, k: usize, blocksize: usize) -> bool {
        if !self.tensor_cores() {
            return true;
        }
        let shape = n.is_multiple_of(16) && k.is_multiple_of(64) && blocksize.is_multiple_of(64);
        // The second form indexes elements in 32 bits; the third takes two 64-element k blocks
        // (one per absmax) per iteration.
        let third = self != GemvKernel::T4 || (k.is_multiple_of(128) && blocksize == 64);
        shape && third && (self == GemvKernel::Mma || (n as u64) * (k as u64) < (1u64 << 32))
    }

    /// The kernel a weight that does not fit this one decodes with.
    pub(super) fn fallback(self) -> Self {
        match self {
            GemvKernel::T4 => GemvKernel::Tc3,
            _ => GemvKernel::Lut16,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// `QLORAD_NF4_GEMV` if set to a known name, else the default `t4` (the fastest in gpu-check's
    /// per-layer timing on the H200 at 1..4 rows, `tc3` for 5..8; see BENCHMARKS.md).
    pub fn from_env() -> Self {
        std::env::var("QLORAD_NF4_GEMV")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or(GemvKernel::T4)
    }

    /// (kernel entry point, output rows per warp) for `m` input rows.
    pub(super) fn entry(self, m: usize) -> (String, u32) {
        match self {
            GemvKernel::Lut16 => (format!("nf4_gemv_bf16_m{m}"), 1),
            GemvKernel::Rows4 if m <= 2 => (format!("nf4_gemv_r4_bf16_m{m}"), 4),
            GemvKernel::Rows2 | GemvKernel::Rows4 => (format!("nf4_gemv_r2_bf16_m{m}"), 2),
            // 16 features per block of GEMV_WARPS = 8 warps.
            GemvKernel::Mma => (format!("nf4_gemv_mma_bf16_m{m}"), 2),
            GemvKernel::Tc | GemvKernel::TcRegs | GemvKernel::Tc3 | GemvKernel::T4 => {
                (format!("nf4_gemv_{}_bf16_m{m}", self.name()), 2)
            }
            GemvKernel::PairTwoRows if m <= 4 => (format!("nf4_gemv3_bf16_m{m}"), 2),
            GemvKernel::Pair | GemvKernel::PairTwoRows => (format!("nf4_gemv2_bf16_m{m}"), 1),
        }
    }
}
