// The NF4 GEMV on tensor cores, third form (`t4`), for decode's 1..4 input rows (5..8 rows run
// `tc3`); included by nf4.cu after nf4_tc.cuh, whose table, LoRA warp and grouped launch it
// shares. Why a third form: `tc3` spends 132 SASS instructions per lane per 64-element k block,
// and at the copy ceiling (3.3 TB/s, ~14 bytes per clock per multiprocessor) that many
// instructions would need ~90 % of the schedulers' issue slots, so it streams at ~1.2 TB/s. Of the
// 132 only 48 are the table lookups and 4 the mma; the rest is per-iteration overhead: the plain /
// double-quant branch, 64-bit pointer steps, loop tests, scale loads and decode for one k block at
// a time. This form halves the overhead per code:
//  - each lane loads 16 contiguous bytes (32 codes) of each of its two rows per iteration, so one
//    iteration covers two 64-element k blocks (a "super-block" of 128); the loads for the first
//    STAGES iterations are issued before the table is filled;
//  - an mma then mixes codes of two absmax blocks, which must be scaled separately. The B operand
//    keeps them apart: B's column 2m holds input row m's x for the lanes whose codes lie in the
//    first k block (t = 0, 1) and zero elsewhere, column 2m + 1 the second block (t = 2, 3), so
//    D's column 2m is the first block's partial dot and 2m + 1 the second's, both in lane t = m.
//    8 columns, so at most 4 input rows;
//  - the two blocks' quantized absmax are adjacent bytes (one 16-bit load) and share their
//    second-level absmax (the first block's index is even); plain (f32) absmax is a template
//    argument instead of a branch per iteration.
// Same precision as `tc`: codes rounded to bf16, products and sums in f32, y rounded once.
// Needs n % 16 == 0, k % 128 == 0, blocksize 64 and n·k < 2^32, and the weight in the tiled layout
// (src/tiled.rs: each warp load of 8 rows' 64 bytes is 4 whole 128-byte lines, not 8 half lines).
#pragma once

#ifndef T4_STAGES
#define T4_STAGES 2
#endif

// Where lane (g, t) of warp `warp` starts in tile `tile` of a tiled weight (src/tiled.rs): its
// 16-byte piece of row g in the warp's first super-block, and the tiled index of that row's first
// block scale. Warp w takes super-blocks w, w + TC_WARPS, ..: 64 · TC_WARPS pieces and 32 ·
// TC_WARPS scales further each time.
struct TiledCursor {
    const uint4* p;
    u32 q;
};
__device__ __forceinline__ TiledCursor tiled_cursor_of(const u8* packed, u32 tile, u32 warp, u32 g,
                                                       u32 t, u32 k) {
    const u64 ts = (u64)tile * (k >> 7) + warp;
    TiledCursor c;
    c.p = reinterpret_cast<const uint4*>(packed + ts * 1024) + 4 * g + t;
    c.q = (u32)(ts * 32 + 2 * g);
    return c;
}

template <bool PLAIN>
struct T4Stage;
template <>
struct T4Stage<false> {
    uint4 a, b;    // 16 bytes (32 codes) of the lane's two rows in this super-block
    u32 qa, qb;    // the rows' two 8-bit absmax codes (16 bits)
    float na, nb;  // the rows' second-level absmax
};
template <>
struct T4Stage<true> {
    uint4 a, b;
    float2 sa, sb;  // the rows' two f32 absmax
};

// One super-block's stage for this lane, from a tiled weight: rows a's and b's 16 bytes (b 512
// bytes on), their two block scales each (tiled index qi, row b 16 on) and, with double quant,
// their second-level absmax (row-major block ia, row b ib_off blocks on).
template <bool PLAIN>
__device__ __forceinline__ void t4_load_stage(T4Stage<PLAIN>& s, const uint4* pa, u32 qi, u32 ia,
                                              u32 ib_off, const float* __restrict__ absmax,
                                              const u8* __restrict__ qabs,
                                              const float* __restrict__ nested) {
    s.a = ld_stream(pa);
    s.b = ld_stream(pa + 32);
    if constexpr (PLAIN) {
        s.sa = __ldg(reinterpret_cast<const float2*>(absmax + qi));
        s.sb = __ldg(reinterpret_cast<const float2*>(absmax + qi + 16));
    } else {
        s.qa = __ldg(reinterpret_cast<const unsigned short*>(qabs + qi));
        s.qb = __ldg(reinterpret_cast<const unsigned short*>(qabs + qi + 16));
        s.na = __ldg(nested + (ia >> NESTED_LOG2));
        s.nb = __ldg(nested + ((ia + ib_off) >> NESTED_LOG2));
    }
}

// One super-block of the t4 stream for this lane: its stage's 32 codes of rows a and b through the
// lookup table (at shared address `lut_base`, this lane's column) into mma A fragments, against x's
// B fragments (loaded here, by the `xact` lanes only: see nf4_gemv_t4_stream), the stage's block
// scales decoded (double quant: dynamic code at `ncode_base`, then `offset`), `refill()` called
// once the stage's registers are consumed (it loads the stage's next super-block), and the two
// k blocks' partial dots scaled into acc_a (row a) and acc_b (row b).
template <bool PLAIN, class Refill>
__device__ __forceinline__ void t4_super_block(T4Stage<PLAIN>& st, const uint4* xp, bool xact,
                                               u32 lut_base, u32 ncode_base, float offset,
                                               float& acc_a, float& acc_b, Refill refill) {
    auto look = [&](u32 w, int pos) -> u32 { return tc_look(lut_base, w, pos); };
    auto ncode_at = [&](u32 q, int pos) -> float {
        float v;
        asm("ld.shared.f32 %0, [%1];"
            : "=f"(v)
            : "r"(ncode_base + (__byte_perm(q, 0u, 0x4440u + pos) << 2)));
        return v;
    };
    const uint4 xz = make_uint4(0u, 0u, 0u, 0u);
    float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const uint4 x0 = xact ? __ldg(xp + 2 * h) : xz;
        const uint4 x1 = xact ? __ldg(xp + 2 * h + 1) : xz;
        const u32 xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        // mma u (0..3 of this half) takes bytes 2u, 2u + 1 of the half's two words.
        const u32 a0 = h == 0 ? st.a.x : st.a.z, a1 = h == 0 ? st.a.y : st.a.w;
        const u32 b0 = h == 0 ? st.b.x : st.b.z, b1 = h == 0 ? st.b.y : st.b.w;
        u32 f[4][4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 wa = u < 2 ? a0 : a1, wb = u < 2 ? b0 : b1;
            const int p = (u & 1) * 2;
            f[u][0] = look(wa, p);
            f[u][1] = look(wb, p);
            f[u][2] = look(wa, p + 1);
            f[u][3] = look(wb, p + 1);
        }
        float sa0 = 0.f, sa1 = 0.f, sb0 = 0.f, sb1 = 0.f;
        if (h == 1) {
            // The stage's registers are consumed: decode its scales, refill it.
            if constexpr (PLAIN) {
                sa0 = st.sa.x;
                sa1 = st.sa.y;
                sb0 = st.sb.x;
                sb1 = st.sb.y;
            } else {
                const float na = st.na, nb = st.nb;
                sa0 = __fadd_rn(__fmul_rn(ncode_at(st.qa, 0), na), offset);
                sa1 = __fadd_rn(__fmul_rn(ncode_at(st.qa, 1), na), offset);
                sb0 = __fadd_rn(__fmul_rn(ncode_at(st.qb, 0), nb), offset);
                sb1 = __fadd_rn(__fmul_rn(ncode_at(st.qb, 1), nb), offset);
            }
            refill();
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            mma_bf16_16816(h == 0 ? d : e, f[u][0], f[u][1], f[u][2], f[u][3], xs[2 * u],
                           xs[2 * u + 1]);
        }
        if (h == 1) {
            // D columns 2t (first k block) and 2t + 1 (second) of input row m = t.
            acc_a = fmaf(d[0] + e[0], sa0, acc_a);
            acc_a = fmaf(d[1] + e[1], sa1, acc_a);
            acc_b = fmaf(d[2] + e[2], sb0, acc_b);
            acc_b = fmaf(d[3] + e[3], sb1, acc_b);
        }
    }
}

// This lane's share of tile `tile`'s dot products (acc_a: row a, acc_b: row b) over the super-blocks
// of its warp, after filling the block's tables and waiting for the previous kernel.
template <int M, int STAGES, bool PLAIN>
__device__ __forceinline__ void nf4_gemv_t4_stream(
    const u16* __restrict__ x, const u8* __restrict__ packed, const float* __restrict__ code16,
    const float* __restrict__ absmax, const u8* __restrict__ qabs,
    const float* __restrict__ nested, const float* __restrict__ ncode, float offset, u32 k,
    u32 tile, u32* lut, float* s_ncode, float& acc_a, float& acc_b) {
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 ra = tile * 16 + g;
    const u32 nsb = k >> 7;
    const u32 iters =
        warp < TC_WARPS && warp < nsb ? (nsb - warp + TC_WARPS - 1) / TC_WARPS : 0;
    // The next super-block to load, in the tiled layout (src/tiled.rs): a pointer to row a's 16
    // bytes (row b's are 512 bytes on: one warp load is 4 whole lines), the tiled index of row a's
    // two block scales (row b's 16 on) and the row-major index of its first absmax block, which the
    // second level of the double quantization is indexed by (blocksize 64; n·k < 2^32).
    const TiledCursor c = tiled_cursor_of(packed, tile, warp, g, t, k);
    const uint4* pa = c.p;
    u32 qi = c.q, ia = ((ra * k) >> 6) + 2 * warp;
    const u32 ib_off = k >> 3;  // row b: 8 rows of k / 64 blocks further, row-major
    auto load = [&](T4Stage<PLAIN>& s) {
        t4_load_stage<PLAIN>(s, pa, qi, ia, ib_off, absmax, qabs, nested);
        pa += 64 * TC_WARPS;
        qi += 32 * TC_WARPS;
        ia += 2 * TC_WARPS;
    };
    T4Stage<PLAIN> st[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        if ((u32)s < iters) {
            load(st[s]);
        }
    }
    // Weights in flight: now the tables (their loads are L2 hits), then wait for the previous
    // kernel (programmatic dependent launch) before x is read.
    tc_fill_tables(lut, s_ncode, code16, ncode, PLAIN ? 1u : 0u);
    pdl_wait();
    __syncthreads();

    const u32 lut_base = (u32)__cvta_generic_to_shared(lut) + 4 * lane;
    const u32 ncode_base = (u32)__cvta_generic_to_shared(s_ncode);
    // B's column g = 2m + c carries input row m's x for the lanes of k block c (t >> 1 == c);
    // the other lanes (28 of 32 for one input row) load nothing and hold zeros. They used to read
    // a 64-byte zero buffer instead (no predicated loads): warp-wide 16-byte loads on the L1,
    // which ncu showed as the busiest unit of the gate/up launch; predicated, that launch took
    // 39.4 us instead of 43.1 and decode ran 10 % faster (BENCHMARKS.md, session 13).
    const bool xact = g < 2 * M && (t >> 1) == (g & 1u);
    const uint4* xp = reinterpret_cast<const uint4*>(x + (u64)(g >> 1) * k + 128 * warp + 32 * t);
    constexpr u32 xstep = 16 * TC_WARPS;  // 128 values per super-block, in uint4
    for (u32 i0 = 0; i0 < iters; i0 += STAGES) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            const u32 i = i0 + s;
            if (i >= iters) {
                break;
            }
            t4_super_block<PLAIN>(st[s], xp, xact, lut_base, ncode_base, offset, acc_a, acc_b,
                                  [&]() {
                                      if (i + STAGES < iters) {
                                          load(st[s]);
                                      }
                                  });
            xp += xstep;
        }
    }
}

template <int M, bool LORA, int STAGES>
__device__ __forceinline__ void nf4_gemv_t4(const u16* __restrict__ x,
                                            NF4_W_PARAMS, u32 n, u32 k, u16* __restrict__ y,
                                            const u64* __restrict__ row_tables, u32 slot,
                                            const float* __restrict__ t_lora, u32 t_stride,
                                            u32 tile, const TcGroup* grp = nullptr) {
    static_assert(M >= 1 && M <= 4, "t4 keeps two k blocks per input row in B's 8 columns");
    pdl_trigger();
    __shared__ __align__(16) u32 lut[256 * TC_COPIES];
    __shared__ float s_ncode[256];
    __shared__ float red[TC_WARPS][32][2];
    __shared__ float lora_out[LORA ? 16 * M : 1];
    __shared__ TcLoraRefs<M> lrefs;  // unused (and dropped) without LORA
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    if (LORA && warp == TC_WARPS) {
        // Before the stream's programmatic-launch wait: the lookups and B need nothing from it.
        tc_lora_prologue<M>(row_tables, slot, k, tile, grp, lrefs);
    }
    float acc_a = 0.f, acc_b = 0.f;
    if (plain) {
        nf4_gemv_t4_stream<M, STAGES, true>(x, packed, code16, absmax, qabs, nested, ncode, offset,
                                            k, tile, lut, s_ncode, acc_a, acc_b);
    } else {
        nf4_gemv_t4_stream<M, STAGES, false>(x, packed, code16, absmax, qabs, nested, ncode,
                                             offset, k, tile, lut, s_ncode, acc_a, acc_b);
    }
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 ra = tile * 16 + g, rb = ra + 8;
    if (LORA && warp == TC_WARPS) {
        tc_lora_warp<M>(x, k, t_lora, t_stride, tile, grp, lrefs, lora_out);
    }
    if (warp < TC_WARPS) {
        red[warp][lane][0] = acc_a;
        red[warp][lane][1] = acc_b;
    }
    __syncthreads();
    if (warp == 0 && t < M) {
        float va = 0.f, vb = 0.f;
#pragma unroll
        for (u32 w = 0; w < TC_WARPS; ++w) {
            va += red[w][lane][0];
            vb += red[w][lane][1];
        }
        if (LORA) {
            va += lora_out[g * M + t];
            vb += lora_out[(g + 8) * M + t];
        }
        y[(u64)t * n + ra] = f32_to_bf16(va);
        y[(u64)t * n + rb] = f32_to_bf16(vb);
    }
    if (LORA) {
        tc_group_finish(grp);
    }
}

// 1..4 rows run t4, 5..8 rows tc3 (one name per row count, as the other kernels).
template <int M, bool LORA>
__device__ __forceinline__ void nf4_gemv_t4_or_tc3(
    const u16* __restrict__ x, NF4_W_PARAMS,
    u32 n, u32 k, u16* __restrict__ y, const u64* __restrict__ row_tables, u32 slot,
    const float* __restrict__ t_lora, u32 t_stride, u32 tile, const TcGroup* grp) {
    if constexpr (M <= 4) {
        nf4_gemv_t4<M, LORA, T4_STAGES>(x, NF4_W_ARGS, n, k, y, row_tables, slot, t_lora,
                                        t_stride, tile, grp);
    } else {
        nf4_gemv_tc<M, LORA, 3, true>(x, NF4_W_ARGS,
                                n, k, y, row_tables, slot, t_lora, t_stride, tile, grp);
    }
}

template <int M, bool LORA>
__device__ __forceinline__ void nf4_gemv_t4_group(const u16* __restrict__ x, const TcGroup& grp) {
    const TcWeight& w = tc_group_weight(grp);
    nf4_gemv_t4_or_tc3<M, LORA>(x, w.packed, w.code16, w.plain, w.absmax, w.qabs, w.nested,
                                w.ncode, w.offset, w.log2_bs, w.n, grp.k, w.y, grp.row_tables,
                                w.slot, w.t, grp.t_stride, blockIdx.x - w.tile0, &grp);
}

#define NF4_GEMV_T4_ENTRIES(M)                                                                   \
    extern "C" __global__ void TC_BOUNDS(TC_CFG_tc3) nf4_gemv_t4_bf16_m##M(                      \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv_t4_or_tc3<M, false>(x, NF4_W_ARGS, n, k, y, nullptr, 0, nullptr, 0,             \
                                     blockIdx.x, nullptr);                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__((TC_WARPS + 1) * 32, 3)                         \
        nf4_gemv_t4_lora_bf16_m##M(                                                              \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y, const u64* __restrict__ row_tables, u32 slot,                       \
        const float* __restrict__ t, u32 t_stride) {                                             \
        nf4_gemv_t4_or_tc3<M, true>(x, NF4_W_ARGS, n, k, y, row_tables, slot, t, t_stride,       \
                                    blockIdx.x, nullptr);                                        \
    }                                                                                            \
    extern "C" __global__ void TC_BOUNDS(TC_CFG_tc3)                                             \
        nf4_gemv_t4g_bf16_m##M(const u16* __restrict__ x, const TcGroup grp) {                   \
        nf4_gemv_t4_group<M, false>(x, grp);                                                     \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__((TC_WARPS + 1) * 32, 3)                         \
        nf4_gemv_t4g_lora_bf16_m##M(const u16* __restrict__ x, const TcGroup grp) {              \
        nf4_gemv_t4_group<M, true>(x, grp);                                                      \
    }


NF4_GEMV_T4_ENTRIES(1)
NF4_GEMV_T4_ENTRIES(2)
NF4_GEMV_T4_ENTRIES(3)
NF4_GEMV_T4_ENTRIES(4)
NF4_GEMV_T4_ENTRIES(5)
NF4_GEMV_T4_ENTRIES(6)
NF4_GEMV_T4_ENTRIES(7)
NF4_GEMV_T4_ENTRIES(8)
