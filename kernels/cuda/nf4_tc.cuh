// The NF4 GEMV on tensor cores, second form (`tc`), for decode's 1..8 input rows; included by
// nf4.cu after the first form (`mma`), whose fragment layout it keeps: a block of TC_WARPS warps
// computes 16 output features, each warp takes every TC_WARPS-th 64-element k block, codes become
// mma.m16n8k16 A fragments through a per-lane table of bf16 code pairs indexed by the packed byte,
// x is the B operand (column m = input row m) and each block's absmax scales the f32 result of its
// 64 elements. What changed, from ncu on the H200 (the `mma` form ran at 25 % theoretical
// occupancy, 114 registers, warps stalled ~50 % of their cycles on global loads, and
// 6.4 instructions per code):
//  - a software pipeline: each warp keeps STAGES k blocks of weights (and their quantized
//    absmax bytes) in flight and issues the loads for block i + STAGES as soon as block i's
//    registers are consumed, instead of loading four, computing four (`tc`: 2 stages, <= 64
//    registers; gpu-check's candidates `tcr`: 2 stages, <= 85 registers, `tc3`: 3 stages, <= 85);
//  - registers: only the weight words and the scales' operands are carried across iterations; x
//    (a few KB, L1-resident) is read where it is used; the launch bounds ask for 3 or 4 resident
//    blocks (<= 85 or <= 64 registers);
//  - fewer instructions per code: a byte's entry for lane l sits at byte offset byte·128 + 4·l,
//    so its address is one byte permute and one shift-add; the dynamic code of the absmax is in
//    shared memory; pointers and indices advance instead of being recomputed, in 32 bits where
//    they can (the host checks n·k < 2^32). 132 SASS instructions per lane per k block of 32
//    codes, against ~210 in `mma`.
// Precision as `mma`: codes are rounded to bf16 (bitsandbytes' own dequantize rounds code·absmax
// to bf16), products and sums in f32, y rounded once.
// LORA: the epilogue adds each input row's LoRA expand (as nf4_gemv's LORA in nf4.cu), computed
// by a ninth warp of the block while the eight stream the weights (blocks of 288 threads), and
// added by warp 0 in the cross-warp reduction; in the grouped launch that warp may first run a
// share of the group's shrink (tc_shrink below).
// Needs n % 16 == 0, k % 64 == 0, a blocksize that is a multiple of 64 and n·k < 2^32.
#pragma once

#define TC_WARPS 8
#define TC_COPIES 32

// (STAGES, minimum resident blocks for the launch bounds) of the variants.
#define TC_CFG_tc 2, 4
#define TC_CFG_tcr 2, 3
#define TC_CFG_tc3 3, 3

#define TC_GROUP_MAX 3

struct TcWeight {
    const u8* packed;
    const float* code16;
    const float* absmax;
    const u8* qabs;
    const float* nested;
    const float* ncode;
    u16* y;
    float* t;  // LORA: the shrink output of this weight's slot
    float offset;
    u32 plain;
    u32 log2_bs;
    u32 n;
    u32 tile0;  // the group's first tile of this weight
    u32 slot;   // LORA: the weight's slot in the row tables
};

struct TcGroup {
    TcWeight w[TC_GROUP_MAX];
    u32 count;
    u32 k;
    u32 t_stride;
    const u64* row_tables;
    // The shrink inside the launch (0: launched before it): [units claimed, units done, blocks
    // finished, unused], zero between launches (the last block to finish resets them).
    u32* counters;
    u32 max_rank;  // the group's largest rank over its rows
    // With counters: floats between the shrink's k-chunk partials (partial c of weight i's t at
    // w[i].t + c * part_stride; the expand sums them).
    u32 part_stride;
    // Without counters: how many partials of t at part_stride the finished shrink left (1: whole
    // dots; the decode attention writes one per KV head for the o projection). The expand sums
    // them in order, as it sums the in-launch shrink's.
    u32 parts;
    // With counters: the in-launch shrink's values per k chunk (0: TC_SHRINK_CHUNK).
    u32 shrink_chunk;
};

// The in-launch shrink splits each dot product over k into up to TC_SHRINK_CHUNKS chunks of at
// least TC_SHRINK_CHUNK values (the host's TcGroup.shrink_chunk), one unit each: every block's
// expand waits for the last unit. Shorter units shorten a warp's chain of loads but cost claims
// (atomics on one counter) and partials to sum: on the H200 with decode steps replayed as graphs
// (session 21), batch-1 decode with an r=64 adapter ran 316 / 327 / 346 / 351 / 352 tok/s at 512 /
// 1024 / 2048 / 4096 / 8192 values per chunk (o: 1 chunk at 8192, down: 2). The host sizes the
// partials for TC_SHRINK_CHUNKS.
#define TC_SHRINK_CHUNKS 8
#define TC_SHRINK_CHUNK 8192

// (chunks, values per chunk, a multiple of 8) of a k-long dot product in chunks of about `chunk`
// values (0: TC_SHRINK_CHUNK).
__device__ __forceinline__ uint2 tc_shrink_chunks(u32 k, u32 chunk) {
    chunk = chunk != 0 ? chunk : TC_SHRINK_CHUNK;
    const u32 nch = min((u32)TC_SHRINK_CHUNKS, (k + chunk - 1) / chunk);
    const u32 len = ((k + nch - 1) / nch + 7u) & ~7u;
    return make_uint2(nch, len);
}

// The LoRA warp's adapter modules, looked up once per block by its lanes in parallel (a lookup is
// two dependent loads) before anything waits: own[m] is input row m's module at this weight's slot
// (the expand), pair[i * M + m] row m's module at group weight i's slot (the in-launch shrink's
// units; unused without it).
template <int M>
struct TcLoraRefs {
    RowLora own[M];
    RowLora pair[TC_GROUP_MAX * M];
};

// The in-launch shrink's claim and done counts as one 64-bit word (counters[0] claimed, [1] done):
// a claim also returns how many units are done, so a block that arrives after every unit has
// finished proceeds on that one atomic.
__device__ __forceinline__ u64 tc_claim(u32* c) {
    u64 v;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], 1;"
                 : "=l"(v)
                 : "l"(c)
                 : "memory");
    return v;
}
__device__ __forceinline__ void tc_unit_done(u32* c) {
    asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(c), "l"(1ull << 32)
                 : "memory");
}
__device__ __forceinline__ u32 tc_done_count(u32* c) {
    u64 v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(c) : "memory");
    return (u32)(v >> 32);
}

// The LoRA warp's prologue: the module lookups, its tile's B rows requested into L2 for the expand
// and, with the in-launch shrink, this block's share (1/grid) of every A the shrink reads. Needs
// nothing this launch or the previous kernel writes (row tables and adapter weights are written
// before the decode step's first launch), so the t4 GEMV runs it before its programmatic-launch
// wait: the chains of dependent loads and the A and B reads from DRAM overlap the previous
// kernel's tail, and the shrink's and expand's loads that follow the wait are L2 hits.
template <int M>
__device__ __forceinline__ void tc_lora_prologue(const u64* __restrict__ row_tables, u32 slot,
                                                 u32 k, u32 tile, const TcGroup* grp,
                                                 TcLoraRefs<M>& refs) {
    const u32 lane = threadIdx.x & 31u;
    const bool fused = grp != nullptr && grp->counters != nullptr;
    if (lane < (u32)M) {
        refs.own[lane] = lookup(row_tables, lane, slot);
    } else if (fused && lane - M < grp->count * M) {
        const u32 j = lane - M;
        refs.pair[j] = lookup(row_tables, j % M, grp->w[j / M].slot);
    }
    __syncwarp();
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const RowLora l = refs.own[m];
        // The tile's 16 rows of B are 32·r contiguous bytes.
        const u8* b = reinterpret_cast<const u8*>(l.b + (u64)tile * 16 * l.r);
        for (u32 off = 128 * lane; off < 32 * l.r; off += 32 * 128) {
            prefetch_l2(b + off);
        }
    }
    if (fused) {
        for (u32 p = 0; p < grp->count * M; ++p) {
            const RowLora l = refs.pair[p];
            const u64 lines = ((u64)l.r * k * 2 + 127) / 128;
            const u64 per = (lines + gridDim.x - 1) / gridDim.x;
            const u64 end = min(lines, (blockIdx.x + 1) * per);
            const u8* a = reinterpret_cast<const u8*>(l.a);
            for (u64 q = blockIdx.x * per + lane; q < end; q += 32) {
                prefetch_l2(a + 128 * q);
            }
        }
    }
}

// The group's BGMV shrink inside the grouped launch, run by the blocks' LoRA warps while the other
// warps stream the weights: t_i[m, j] = x[m, :] · A_{m,i}[j, :] for every weight i, row m and rank
// j < r_{m,i}, one (i, m, j, k chunk) unit per claim. Units are claimed from a counter, never owned
// in advance, so a warp waits only once every unit has been claimed by a running warp that
// finishes it without waiting: no block can wait on one that has not started (the grid may be
// larger than what is resident, and other work may share the GPU). Then it waits until all are
// done (release/acquire on the done count) and the expand reads t from L2. Needs k % 8 == 0 (the
// host's k % 64).
template <int M>
__device__ __forceinline__ void tc_shrink(const u16* __restrict__ x, u32 k, const TcGroup& grp,
                                          const TcLoraRefs<M>& refs) {
    const u32 lane = threadIdx.x & 31u;
    const uint2 ch = tc_shrink_chunks(k, grp.shrink_chunk);
    const u32 per_w = (u32)M * grp.max_rank * ch.x;
    const u32 units = grp.count * per_w;
    u32* c = grp.counters;
    u32 done;
    for (;;) {
        u64 v = 0;
        if (lane == 0) {
            v = tc_claim(c);
        }
        v = __shfl_sync(0xffffffffu, v, 0);
        const u32 u = (u32)v;
        done = (u32)(v >> 32);
        if (u >= units) {
            break;
        }
        // Unit (weight i, row m, rank j, chunk `part`): the dot over k values [part·len, +len).
        const u32 i = u / per_w, rest = u % per_w;
        const u32 part = rest % ch.x, mj = rest / ch.x;
        const u32 m = mj / grp.max_rank, j = mj % grp.max_rank;
        const u32 k0 = part * ch.y, k1 = min(k, k0 + ch.y);
        const RowLora l = refs.pair[i * M + m];
        if (j < l.r && l.r <= grp.t_stride) {
            const u16* xm = x + (u64)m * k + k0;
            const uint4* xv = reinterpret_cast<const uint4*>(xm);
            const float acc = warp_dot_a(
                l.a + (u64)j * k + k0, k1 > k0 ? k1 - k0 : 0u, lane,
                [&](u32 q) { return __ldg(xv + q); }, [&](u32 q) { return bf16_f(xm[q]); });
            if (lane == 0) {
                grp.w[i].t[(u64)part * grp.part_stride + (u64)m * grp.t_stride + j] = acc;
            }
        }
        if (lane == 0) {
            tc_unit_done(c);  // release: the store above before the count
        }
    }
    if (lane == 0 && done < units) {
        while (tc_done_count(c) < units) {
            __nanosleep(100);
        }
    }
    // Lane 0's acquire, then the warp barrier, orders every lane's reads of t after the units.
    __syncwarp();
}

// The LoRA warp of a tensor-core GEMV block: scale_m · t_m · B_m[o, :r_m] for the tile's 16
// features o and every input row m into lora_out[o * M + m] (first, in the grouped launch with
// counters, its share of the group's shrink). Runs after tc_lora_prologue (the modules in refs, B
// on its way to L2) while the block's other warps stream the weights.
template <int M>
__device__ __forceinline__ void tc_lora_warp(const u16* __restrict__ x, u32 k,
                                             const float* __restrict__ t_lora, u32 t_stride,
                                             u32 tile, const TcGroup* grp,
                                             const TcLoraRefs<M>& refs, float* lora_out) {
    const u32 lane = threadIdx.x & 31u;
    const bool fused = grp != nullptr && grp->counters != nullptr;
    // t's partials to sum (the separately launched shrink writes whole dots).
    u32 nparts = 1, pstride = 0;
    if (fused) {
        tc_shrink<M>(x, k, *grp, refs);
        nparts = tc_shrink_chunks(k, grp->shrink_chunk).x;
        pstride = grp->part_stride;
    } else if (grp != nullptr && grp->parts > 1) {
        nparts = grp->parts;
        pstride = grp->part_stride;
    }
    const u32 o = lane >> 1, h = lane & 1u;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const RowLora l = refs.own[m];
        float d = 0.f;
        if (l.r != 0 && l.r <= t_stride) {
            const u16* br = l.b + (u64)(tile * 16 + o) * l.r;
            const float* tm = t_lora + (u64)m * t_stride;
            const u32 half = l.r >> 1;
            // Each lane's half row as 16-byte loads issued together (one memory round trip,
            // not one per element): needs r % 16 == 0 and 16-byte aligned B and t rows.
            const bool vec = (l.r & 15u) == 0 && (t_stride & 3u) == 0 &&
                             ((reinterpret_cast<u64>(l.b) | reinterpret_cast<u64>(tm)) & 15ull) == 0;
            if (vec) {
                const uint4* bv = reinterpret_cast<const uint4*>(br + h * half);
                const float4* tv = reinterpret_cast<const float4*>(tm + h * half);
#pragma unroll 4
                for (u32 c = 0; c < (half >> 3); ++c) {
                    const uint4 w = __ldg(bv + c);
                    // t: L2 loads (written during this launch by other blocks when fused), the
                    // sum of its k-chunk partials.
                    float4 t0 = __ldcg(tv + 2 * c), t1 = __ldcg(tv + 2 * c + 1);
                    for (u32 p = 1; p < nparts; ++p) {
                        const float4* tp = reinterpret_cast<const float4*>(
                            reinterpret_cast<const float*>(tv) + (u64)p * pstride);
                        const float4 u0 = __ldcg(tp + 2 * c), u1 = __ldcg(tp + 2 * c + 1);
                        t0 = make_float4(t0.x + u0.x, t0.y + u0.y, t0.z + u0.z, t0.w + u0.w);
                        t1 = make_float4(t1.x + u1.x, t1.y + u1.y, t1.z + u1.z, t1.w + u1.w);
                    }
                    d = fmaf(bf16_lo(w.x), t0.x, d);
                    d = fmaf(bf16_hi(w.x), t0.y, d);
                    d = fmaf(bf16_lo(w.y), t0.z, d);
                    d = fmaf(bf16_hi(w.y), t0.w, d);
                    d = fmaf(bf16_lo(w.z), t1.x, d);
                    d = fmaf(bf16_hi(w.z), t1.y, d);
                    d = fmaf(bf16_lo(w.w), t1.z, d);
                    d = fmaf(bf16_hi(w.w), t1.w, d);
                }
            } else {
#pragma unroll 8
                for (u32 j = h; j < l.r; j += 2) {
                    float tj = __ldcg(tm + j);
                    for (u32 p = 1; p < nparts; ++p) tj += __ldcg(tm + (u64)p * pstride + j);
                    d = fmaf(bf16_f(br[j]), tj, d);
                }
            }
            d = (d + __shfl_xor_sync(0xffffffffu, d, 1)) * l.scale;
        }
        if (h == 0) {
            lora_out[o * M + m] = d;
        }
    }
}

// After a grouped LoRA launch's block is done: every block has passed its LoRA warp's wait once it
// gets here; the last one leaves the counters zeroed for the next launch (which runs after this
// one, in stream order).
__device__ __forceinline__ void tc_group_finish(const TcGroup* grp) {
    if (grp != nullptr && grp->counters != nullptr && threadIdx.x == 0) {
        u32* c = grp->counters;
        if (atomicAdd(c + 2, 1u) == gridDim.x - 1) {
            c[0] = 0u;
            c[1] = 0u;
            c[2] = 0u;
            __threadfence();
        }
    }
}

// The per-lane byte -> bf16 pair table and the absmax code table: thread `byte` fills its
// entry's TC_COPIES copies (all equal, one per lane, so a warp's lookups never share a bank),
// rotating the copy order by its index so a warp's stores go to 32 different banks.
__device__ __forceinline__ void tc_fill_tables(u32* lut, float* s_ncode,
                                               const float* __restrict__ code16,
                                               const float* __restrict__ ncode, u32 plain) {
    if (threadIdx.x < 256) {
        const u32 byte = threadIdx.x;
        fill_pair_lut_entry<TC_COPIES>(lut, code16, byte);
        s_ncode[byte] = plain ? 0.f : ncode[byte];
    }
}

// The code pair of byte `pos` (0..3) of `w` for this lane, from the table tc_fill_tables fills:
// entry byte·32 + lane, at shared address lut_base (the table's, plus 4·lane) + byte·128: one
// byte permute and one shift-add (the table's base is not a compile-time constant on sm_90, so a
// mask-or cannot replace the add). The tc and t4 GEMVs' lookup.
__device__ __forceinline__ u32 tc_look(u32 lut_base, u32 w, int pos) {
    const u32 byte = __byte_perm(w, 0u, 0x4440u + pos);
    u32 v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(lut_base + (byte << 7)));
    return v;
}

struct TcStage {
    uint2 a, b;  // 8 bytes (16 codes) of the lane's two rows in this k block
    u32 qa, qb;  // the rows' first-level absmax: its 8-bit code (double quant) or its f32 bits
    float na, nb;  // double quant: the rows' second-level absmax
};

template <int M, bool LORA, int STAGES, bool TILED = false>
__device__ __forceinline__ void nf4_gemv_tc(const u16* __restrict__ x,
                                            NF4_W_PARAMS, u32 n, u32 k, u16* __restrict__ y,
                                            const u64* __restrict__ row_tables, u32 slot,
                                            const float* __restrict__ t_lora, u32 t_stride,
                                            u32 tile, const TcGroup* grp = nullptr) {
    __shared__ __align__(16) u32 lut[256 * TC_COPIES];
    __shared__ float s_ncode[256];
    __shared__ float red[TC_WARPS][32][4];
    __shared__ float lora_out[LORA ? 16 * M : 1];
    __shared__ TcLoraRefs<M> lrefs;  // unused (and dropped) without LORA
    // Programmatic dependent launch (grouped decode launches): nothing here overlaps yet.
    pdl_trigger();
    pdl_wait();
    tc_fill_tables(lut, s_ncode, code16, ncode, plain);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 ra = tile * 16 + g, rb = ra + 8;
    __syncthreads();
    if (LORA && warp == TC_WARPS) {
        tc_lora_prologue<M>(row_tables, slot, k, tile, grp, lrefs);
        tc_lora_warp<M>(x, k, t_lora, t_stride, tile, grp, lrefs, lora_out);
    }
    const u32 lut_base = (u32)__cvta_generic_to_shared(lut) + 4 * lane;
    const u32 nkb = k >> 6;
    const u32 iters =
        warp < TC_WARPS && warp < nkb ? (nkb - warp + TC_WARPS - 1) / TC_WARPS : 0;
    // The next k block to load, as pointers into the two rows and element indices for the scales.
    // TILED (a t4 weight, src/tiled.rs; blocksize 64): k block kb of row g is the (kb % 2) half of
    // row g's 64 bytes in (tile, super-block kb / 2), row b 512 bytes on; warp w's blocks keep w's
    // parity, so each step is TC_WARPS / 2 super-blocks. Its scales: tiled index `qi` (row b 16
    // on); the second level stays row-major (ea, eb).
    const u8* pa = packed + (u64)ra * (k >> 1) + 8 * t + 32 * warp;
    const u8* pb = packed + (u64)rb * (k >> 1) + 8 * t + 32 * warp;
    u32 qi = 0;
    if constexpr (TILED) {
        const u64 ts = (u64)tile * (k >> 7) + (warp >> 1);
        pa = packed + ts * 1024 + g * 64 + (warp & 1u) * 32 + 8 * t;
        pb = pa + 512;
        qi = (u32)(ts * 32 + 2 * g + (warp & 1u));
    }
    constexpr u32 pstep = TILED ? 512 * TC_WARPS : 32 * TC_WARPS;
    u32 ea = ra * k + 64 * warp, eb = rb * k + 64 * warp;  // n·k < 2^32
    const u16* xg = x + (u64)(g < M ? g : 0) * k + 16 * t + 64 * warp;

    auto load = [&](TcStage& s) {
        s.a = ld_stream8(pa);
        s.b = ld_stream8(pb);
        const u32 ba = TILED ? qi : ea >> log2_bs, bb = TILED ? qi + 16 : eb >> log2_bs;
        if (TILED && !plain) {
            s.qa = __ldg(qabs + ba);
            s.qb = __ldg(qabs + bb);
            s.na = __ldg(nested + ((ea >> 6) >> NESTED_LOG2));
            s.nb = __ldg(nested + ((eb >> 6) >> NESTED_LOG2));
        } else if (plain) {
            s.qa = __float_as_uint(__ldg(absmax + ba));
            s.qb = __float_as_uint(__ldg(absmax + bb));
        } else {
            s.qa = __ldg(qabs + ba);
            s.qb = __ldg(qabs + bb);
            s.na = __ldg(nested + (ba >> NESTED_LOG2));
            s.nb = __ldg(nested + (bb >> NESTED_LOG2));
        }
        pa += pstep;
        pb += pstep;
        qi += 16 * TC_WARPS;
        ea += 64 * TC_WARPS;
        eb += 64 * TC_WARPS;
    };
    auto look = [&](u32 w, int pos) -> u32 { return tc_look(lut_base, w, pos); };
    auto scale = [&](u32 q, float nv) -> float {
        if (plain) {
            return __uint_as_float(q);
        }
        return __fadd_rn(__fmul_rn(s_ncode[q], nv), offset);
    };

    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    TcStage st[STAGES];
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        if ((u32)s < iters) {
            load(st[s]);
        }
    }
    for (u32 i0 = 0; i0 < iters; i0 += STAGES) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            const u32 i = i0 + s;
            if (i >= iters) {
                break;
            }
            uint4 xl = make_uint4(0u, 0u, 0u, 0u), xh = xl;
            if (g < M) {
                const uint4* xp = reinterpret_cast<const uint4*>(xg);
                xl = __ldg(xp);
                xh = __ldg(xp + 1);
            }
            xg += 64 * TC_WARPS;
            const u32 xs[8] = {xl.x, xl.y, xl.z, xl.w, xh.x, xh.y, xh.z, xh.w};
            // All 16 lookups first: the stage's weight registers are free for the next load.
            u32 f[4][4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const u32 wA = u < 2 ? st[s].a.x : st[s].a.y;
                const u32 wB = u < 2 ? st[s].b.x : st[s].b.y;
                const int p = (u & 1) * 2;
                f[u][0] = look(wA, p);
                f[u][1] = look(wB, p);
                f[u][2] = look(wA, p + 1);
                f[u][3] = look(wB, p + 1);
            }
            const float sa = scale(st[s].qa, st[s].na), sb = scale(st[s].qb, st[s].nb);
            if (i + STAGES < iters) {
                load(st[s]);
            }
            float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                mma_bf16_16816(d, f[u][0], f[u][1], f[u][2], f[u][3], xs[2 * u], xs[2 * u + 1]);
            }
            acc[0] = fmaf(d[0], sa, acc[0]);
            acc[1] = fmaf(d[1], sa, acc[1]);
            acc[2] = fmaf(d[2], sb, acc[2]);
            acc[3] = fmaf(d[3], sb, acc[3]);
        }
    }
    if (warp < TC_WARPS) {
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
    }
    __syncthreads();
    if (warp == 0) {
        float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (u32 w = 0; w < TC_WARPS; ++w) {
#pragma unroll
            for (int i = 0; i < 4; ++i) o[i] += red[w][lane][i];
        }
        // D fragment: o[0] (feature ra, m = 2t), o[1] (ra, 2t + 1), o[2] (rb, 2t), o[3] (rb, 2t + 1).
#pragma unroll
        for (u32 c = 0; c < 2; ++c) {
            const u32 m = 2 * t + c;
            if (m < M) {
                float va = o[c], vb = o[2 + c];
                if (LORA) {
                    va += lora_out[g * M + m];
                    vb += lora_out[(g + 8) * M + m];
                }
                y[(u64)m * n + ra] = f32_to_bf16(va);
                y[(u64)m * n + rb] = f32_to_bf16(vb);
            }
        }
    }
    if (LORA) {
        tc_group_finish(grp);
    }
}

#define TC_BOUNDS_(S, B) __launch_bounds__(TC_WARPS * 32, B)
#define TC_BOUNDS(CFG) TC_BOUNDS_(CFG)
#define TC_STAGES_(S, B) S
#define TC_STAGES_OF(CFG) TC_STAGES_(CFG)

#define NF4_GEMV_TC_ENTRY(NAME, M)                                                               \
    extern "C" __global__ void TC_BOUNDS(TC_CFG_##NAME) nf4_gemv_##NAME##_bf16_m##M(             \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv_tc<M, false, TC_STAGES_OF(TC_CFG_##NAME)>(x, NF4_W_ARGS, n, k, y,               \
                                                      nullptr, 0, nullptr, 0, blockIdx.x);       \
    }
#define NF4_GEMV_TC_LORA_ENTRY(M)                                                                \
    extern "C" __global__ void __launch_bounds__((TC_WARPS + 1) * 32, 3)                         \
        nf4_gemv_tc_lora_bf16_m##M(                                                              \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y, const u64* __restrict__ row_tables, u32 slot,                       \
        const float* __restrict__ t, u32 t_stride) {                                             \
        nf4_gemv_tc<M, true, 3>(x, NF4_W_ARGS, n, k, y, row_tables, slot, t, t_stride,          \
                                blockIdx.x);                                                     \
    }
#define NF4_GEMV_TC_ALL(M)                                                                       \
    NF4_GEMV_TC_ENTRY(tc, M)                                                                     \
    NF4_GEMV_TC_ENTRY(tcr, M)                                                                    \
    NF4_GEMV_TC_ENTRY(tc3, M)                                                                    \
    NF4_GEMV_TC_LORA_ENTRY(M)

NF4_GEMV_TC_ALL(1)
NF4_GEMV_TC_ALL(2)
NF4_GEMV_TC_ALL(3)
NF4_GEMV_TC_ALL(4)
NF4_GEMV_TC_ALL(5)
NF4_GEMV_TC_ALL(6)
NF4_GEMV_TC_ALL(7)
NF4_GEMV_TC_ALL(8)

// Several weights that read the same x (q/k/v, gate/up) in one launch: the grid is the
// concatenation of their 16-feature tiles, and each block computes a tile of its weight exactly as
// the one-weight kernels do. Small weights (k/v: 64 tiles) no longer leave most of the GPU idle
// for a launch of their own. Passed by value (kernel parameters); mirrored by TcGroup in
// src/cuda.rs.
// The weight whose tiles hold this block (the grid is the weights' tiles concatenated).
__device__ __forceinline__ const TcWeight& tc_group_weight(const TcGroup& grp) {
    u32 i = 0;
#pragma unroll
    for (u32 j = 1; j < TC_GROUP_MAX; ++j) {
        if (j < grp.count && blockIdx.x >= grp.w[j].tile0) {
            i = j;
        }
    }
    return grp.w[i];
}

template <int M, bool LORA, int STAGES>
__device__ __forceinline__ void nf4_gemv_tc_group(const u16* __restrict__ x, const TcGroup& grp) {
    const TcWeight& w = tc_group_weight(grp);
    nf4_gemv_tc<M, LORA, STAGES>(x, w.packed, w.code16, w.plain, w.absmax, w.qabs, w.nested,
                                 w.ncode, w.offset, w.log2_bs, w.n, grp.k, w.y, grp.row_tables,
                                 w.slot, w.t, grp.t_stride, blockIdx.x - w.tile0, &grp);
}

#define NF4_GEMV_TC_GROUP_ENTRY(M)                                                               \
    extern "C" __global__ void TC_BOUNDS(TC_CFG_tc3)                                             \
        nf4_gemv_tcg_bf16_m##M(const u16* __restrict__ x, const TcGroup grp) {                   \
        nf4_gemv_tc_group<M, false, TC_STAGES_OF(TC_CFG_tc3)>(x, grp);                           \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__((TC_WARPS + 1) * 32, 3)                         \
        nf4_gemv_tcg_lora_bf16_m##M(const u16* __restrict__ x, const TcGroup grp) {              \
        nf4_gemv_tc_group<M, true, 3>(x, grp);                                                   \
    }

NF4_GEMV_TC_GROUP_ENTRY(1)
NF4_GEMV_TC_GROUP_ENTRY(2)
NF4_GEMV_TC_GROUP_ENTRY(3)
NF4_GEMV_TC_GROUP_ENTRY(4)
NF4_GEMV_TC_GROUP_ENTRY(5)
NF4_GEMV_TC_GROUP_ENTRY(6)
NF4_GEMV_TC_GROUP_ENTRY(7)
NF4_GEMV_TC_GROUP_ENTRY(8)
