// The grouped t4 GEMV as persistent blocks (`t4p`, base only, 1..4 input rows); included by nf4.cu
// after nf4_t4.cuh, whose arithmetic it keeps exactly (same lanes, same k order per warp, same
// cross-warp sum: the same bits as `nf4_gemv_t4g`).
//
// Why: the one-tile-per-block launch runs gate/up as 1,792 blocks, 4.5 waves of 3 resident blocks
// per multiprocessor, and each block (i) fills its 32 KB lookup table (256 warp-wide shared stores
// per block against ~1,100 lookups for k = 4096: ~20 % of the shared-memory traffic, ncu), (ii)
// waits one DRAM latency for its first weights with nothing else of its own in flight, and (iii)
// streams only 4 super-blocks per warp (k = 4096) before its reduction. Here the grid is the
// resident blocks (multiprocessors x 3); each fills its table once and walks the tiles
// blockIdx.x, + gridDim.x, ... with one flat load pipeline per warp: the loads of the next tile's
// first super-blocks are issued while the current tile's last ones are computed, so a block's
// weights stream without a gap at tile boundaries. At a tile's end each warp leaves its partial
// sums in one of two shared buffers, one barrier, and warp 0 writes the tile's outputs while the
// others go on (the buffer it reads is rewritten only after the next tile's barrier, which warp 0
// reaches after its sum).
// Needs what t4 needs (n % 16 == 0, k % 128 == 0, blocksize 64, n·k < 2^32, the tiled layout),
// k >= 1024 (every warp has at least one super-block per tile, so all reach each tile's barrier),
// and one absmax form (plain or double quant), code table and dynamic code for the group's weights
// (the host checks; the offset is per weight).
#pragma once

// The group weight holding global tile `tile` (as tc_group_weight, for any tile).
__device__ __forceinline__ const TcWeight& t4p_weight(const TcGroup& grp, u32 tile) {
    u32 i = 0;
#pragma unroll
    for (u32 j = 1; j < TC_GROUP_MAX; ++j) {
        if (j < grp.count && tile >= grp.w[j].tile0) {
            i = j;
        }
    }
    return grp.w[i];
}

// Declared once in the entry: its two instantiations (plain, double quant) share it.
struct T4PSmem {
    alignas(16) u32 lut[256 * TC_COPIES];
    float ncode[256];
    float red[2][TC_WARPS][32][2];
};

template <int M, int STAGES, bool PLAIN>
__device__ __forceinline__ void nf4_gemv_t4p(const u16* __restrict__ x, const TcGroup& grp,
                                             T4PSmem& sm) {
    static_assert(M >= 1 && M <= 4, "t4 keeps two k blocks per input row in B's 8 columns");
    pdl_trigger();
    u32* lut = sm.lut;
    float* s_ncode = sm.ncode;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 k = grp.k;
    const TcWeight& wl = grp.w[grp.count - 1];
    const u32 tiles = wl.tile0 + (wl.n >> 4);
    const u32 my_tiles = blockIdx.x < tiles ? (tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const u32 nsb = k >> 7;
    const u32 iters = (nsb - warp + TC_WARPS - 1) / TC_WARPS;  // >= 1: nsb >= TC_WARPS
    const u32 total = my_tiles * iters;

    // The loader: the tile and super-block of the next load, and its cursor in the tiled layout
    // (as t4's). Past the last tile `aim` computes pointers that are never loaded from.
    u32 l_tile = blockIdx.x, l_i = 0;
    const uint4* pa = nullptr;
    const float* absmax = nullptr;
    const u8* qabs = nullptr;
    const float* nested = nullptr;
    u32 qi = 0, ia = 0;
    const u32 istep = k >> 3;  // row b's row-major absmax blocks: 8 rows further
    auto aim = [&](u32 tile) {
        const TcWeight& w = t4p_weight(grp, tile);
        const u32 lt = tile - w.tile0;
        const TiledCursor c = tiled_cursor_of(w.packed, lt, warp, g, t, k);
        pa = c.p;
        qi = c.q;
        ia = (((lt * 16 + g) * k) >> 6) + 2 * warp;
        absmax = w.absmax;
        qabs = w.qabs;
        nested = w.nested;
    };
    aim(l_tile);
    auto load = [&](T4Stage<PLAIN>& s) {
        t4_load_stage<PLAIN>(s, pa, qi, ia, istep, absmax, qabs, nested);
        pa += 64 * TC_WARPS;
        qi += 32 * TC_WARPS;
        ia += 2 * TC_WARPS;
        if (++l_i == iters) {
            l_i = 0;
            l_tile += gridDim.x;
            aim(l_tile);
        }
    };
    T4Stage<PLAIN> st[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        if ((u32)s < total) {
            load(st[s]);
        }
    }
    tc_fill_tables(lut, s_ncode, grp.w[0].code16, grp.w[0].ncode, PLAIN ? 1u : 0u);
    pdl_wait();
    __syncthreads();

    const u32 lut_base = (u32)__cvta_generic_to_shared(lut) + 4 * lane;
    const u32 ncode_base = (u32)__cvta_generic_to_shared(s_ncode);
    // x as t4 reads it: B's column g = 2m + c holds input row m's x for the lanes of k block c.
    const bool xact = g < 2 * M && (t >> 1) == (g & 1u);
    const uint4* const x0p =
        reinterpret_cast<const uint4*>(x + (u64)(g >> 1) * k + 128 * warp + 32 * t);
    const uint4* xp = x0p;
    constexpr u32 xstep = 16 * TC_WARPS;
    float acc_a = 0.f, acc_b = 0.f;
    u32 c_i = 0, c_tile = blockIdx.x, buf = 0;
    // The offset of the computed tile's weight (double quant; loads may run a tile ahead).
    float off = t4p_weight(grp, c_tile).offset;
    for (u32 f0 = 0; f0 < total; f0 += STAGES) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            const u32 f = f0 + s;
            if (f >= total) {
                break;
            }
            t4_super_block<PLAIN>(st[s], xp, xact, lut_base, ncode_base, off, acc_a, acc_b,
                                  [&]() {
                                      if (f + STAGES < total) {
                                          load(st[s]);
                                      }
                                  });
            xp += xstep;
            if (++c_i == iters) {
                // The tile is done: partial sums to shared memory, one barrier, warp 0 sums the
                // warps in t4's order and writes the tile's outputs.
                sm.red[buf][warp][lane][0] = acc_a;
                sm.red[buf][warp][lane][1] = acc_b;
                acc_a = 0.f;
                acc_b = 0.f;
                __syncthreads();
                if (warp == 0 && t < M) {
                    float va = 0.f, vb = 0.f;
#pragma unroll
                    for (u32 w = 0; w < TC_WARPS; ++w) {
                        va += sm.red[buf][w][lane][0];
                        vb += sm.red[buf][w][lane][1];
                    }
                    const TcWeight& w = t4p_weight(grp, c_tile);
                    const u32 ra = (c_tile - w.tile0) * 16 + g;
                    w.y[(u64)t * w.n + ra] = f32_to_bf16(va);
                    w.y[(u64)t * w.n + ra + 8] = f32_to_bf16(vb);
                }
                buf ^= 1u;
                c_i = 0;
                c_tile += gridDim.x;
                off = t4p_weight(grp, c_tile).offset;
                xp = x0p;
            }
        }
    }
}

// Entries for every row count (the host loads all eight names of a prefix); 5..8 rows never take
// this kernel and stop it if launched.
#define NF4_GEMV_T4P_ENTRY(M)                                                                    \
    extern "C" __global__ void TC_BOUNDS(TC_CFG_tc3)                                             \
        nf4_gemv_t4p_bf16_m##M(const u16* __restrict__ x, const TcGroup grp) {                   \
        if constexpr (M <= 4) {                                                                  \
            __shared__ __align__(16) T4PSmem sm;                                                 \
            if (grp.w[0].plain) {                                                                \
                nf4_gemv_t4p<M <= 4 ? M : 1, T4_STAGES, true>(x, grp, sm);                       \
            } else {                                                                             \
                nf4_gemv_t4p<M <= 4 ? M : 1, T4_STAGES, false>(x, grp, sm);                      \
            }                                                                                    \
        } else {                                                                                 \
            __trap();                                                                            \
        }                                                                                        \
    }
NF4_GEMV_T4P_ENTRY(1)
NF4_GEMV_T4P_ENTRY(2)
NF4_GEMV_T4P_ENTRY(3)
NF4_GEMV_T4P_ENTRY(4)
NF4_GEMV_T4P_ENTRY(5)
NF4_GEMV_T4P_ENTRY(6)
NF4_GEMV_T4P_ENTRY(7)
NF4_GEMV_T4P_ENTRY(8)
