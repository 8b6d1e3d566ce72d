// SwiGLU's silu(gate) * up for the fused decode step, and optionally the down projection's LoRA
// shrink of that product in the same launch; included by decode.cu.
#pragma once

// silu(g) * u with candle's roundings (silu rounded to bf16, then the product): the elementwise
// blocks and the shrink blocks compute it the same way, so the shrink reads the exact values the
// down GEMV reads.
__device__ __forceinline__ float silu_mul_value(u16 g16, u16 u16v) {
    const float g = bf16_f(g16);
    const float s = rbf(__fdiv_rn(g, __fadd_rn(1.f, __expf(-g))));
    return __fmul_rn(s, bf16_f(u16v));
}

// The down projection's shrink computed by extra blocks of the silu launch (QLORAD_SILU_SHRINK=1)
// instead of inside the down GEMV's launch, where every block's expand waited on a chain of
// shrink units that the blocks' LoRA warps claimed (BENCHMARKS.md, session 17: +3.8 us per layer).
// As the add + RMSNorm launch's shrink blocks do for q/k/v and gate/up: the blocks look up the
// row's module and fetch their share of A into L2 before the programmatic-launch wait, and after it
// recompute the product they need into shared memory. Each dot over k is split into
// SILU_SHRINK_PARTS chunks (one memory round trip per lane instead of ~7 for k = 14336), written
// as partials t_c[m, j] at t + c * part_stride + m * t_stride + j, which the down GEMV's expand
// sums in order (TcGroup.parts, as it sums the attention's o-shrink partials). Block (m, c, jg):
// row m, chunk c, ranks 8·jg .. 8·jg + 7 (one per warp).
#define SILU_SHRINK_PARTS 8
#define SILU_SHRINK_CHUNK_MAX 2048  // values per chunk the block's copy holds (k <= 16384)
#define SILU_THREADS 256

struct SiluShrink {
    const u64* row_tables;
    float* t;
    u32 slot, t_stride, part_stride, k, jgroups;
};

// (start, length) of chunk c of a k-long row: SILU_SHRINK_PARTS chunks of a multiple of 8 values
// (16-byte pieces), the last ones possibly short or empty.
__device__ __forceinline__ uint2 silu_chunk(u32 k, u32 c) {
    const u32 len = ((k + SILU_SHRINK_PARTS - 1) / SILU_SHRINK_PARTS + 7u) & ~7u;
    const u32 lo = min(k, c * len);
    return make_uint2(lo, min(k, lo + len) - lo);
}

__device__ __forceinline__ void silu_shrink_block(const u16* __restrict__ gate,
                                                  const u16* __restrict__ up,
                                                  const SiluShrink& sh, u32 b) {
    __shared__ __align__(16) u16 s_mix[SILU_SHRINK_CHUNK_MAX];
    const u32 per_row = SILU_SHRINK_PARTS * sh.jgroups;
    const u32 m = b / per_row, c = (b % per_row) / sh.jgroups, jg = b % sh.jgroups;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 j = jg * (SILU_THREADS / 32) + warp;
    const uint2 ch = silu_chunk(sh.k, c);
    // Adapter tables and weights are written before the decode step: looked up and fetched into
    // L2 during the previous kernel.
    const RowLora l = lookup(sh.row_tables, m, sh.slot);
    const bool mine = j < l.r && l.r <= sh.t_stride;
    const u16* arow = l.a + (u64)j * sh.k + ch.x;
    if (mine) {
        const u8* a8 = reinterpret_cast<const u8*>(arow);
        for (u32 off = 128 * lane; off < 2 * ch.y; off += 32 * 128) {
            prefetch_l2(a8 + off);
        }
    }
    pdl_wait();
    const u16* g = gate + (u64)m * sh.k + ch.x;
    const u16* u = up + (u64)m * sh.k + ch.x;
    for (u32 i = threadIdx.x; i < ch.y; i += blockDim.x) {
        s_mix[i] = f32_to_bf16(silu_mul_value(ld_after_wait_u16(g + i), ld_after_wait_u16(u + i)));
    }
    __syncthreads();
    if (!mine) {
        return;
    }
    const uint4* xv = reinterpret_cast<const uint4*>(s_mix);
    const float acc = warp_dot_a(
        arow, ch.y, lane, [&](u32 q) { return xv[q]; }, [&](u32 q) { return bf16_f(s_mix[q]); });
    if (lane == 0) {
        sh.t[(u64)c * sh.part_stride + (u64)m * sh.t_stride + j] = acc;
    }
}

// Blocks 0 .. eb: out = silu(gate) * up, elementwise over n values (grid-stride over those eb
// blocks). With sh_jgroups > 0, rows · SILU_SHRINK_PARTS · sh_jgroups more blocks compute the down
// projection's shrink of the rows (silu_shrink_block); each row holds sh_k values.
extern "C" __global__ void silu_mul_bf16(const u16* __restrict__ gate, const u16* __restrict__ up,
                                         u64 n, u16* __restrict__ out, u32 eb,
                                         const u64* __restrict__ sh_tables, float* sh_t,
                                         u32 sh_slot, u32 sh_t_stride, u32 sh_part_stride,
                                         u32 sh_k, u32 sh_jgroups) {
    pdl_trigger();
    if (blockIdx.x >= eb) {
        const SiluShrink sh = {sh_tables,      sh_t, sh_slot, sh_t_stride,
                               sh_part_stride, sh_k, sh_jgroups};
        silu_shrink_block(gate, up, sh, blockIdx.x - eb);
        return;
    }
    pdl_wait();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)eb * blockDim.x) {
        out[i] = f32_to_bf16(silu_mul_value(gate[i], up[i]));
    }
}
