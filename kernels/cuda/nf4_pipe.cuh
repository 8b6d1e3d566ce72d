// A software-pipelined NF4 GEMV, an experiment of gpu-check's sweep (nf4_sweep.cu); the model
// does not use it. Measured on the H200 (BENCHMARKS.md, session 8): no faster than nf4_gemv
// (31.9 vs 32.0 µs on 14336×4096), because the arithmetic, not the overlap of loads and
// arithmetic, bounds both. Kept as the evidence for that.
//
// Why: the one-row-per-warp GEMV (nf4_gemv in nf4.cu) loads a lane's chunks, then computes on
// them. A 4096-wide row is one such round per warp, and every warp of a wave starts at once, so
// the warps of an SM load together and then compute together: memory and arithmetic take turns
// instead of overlapping (gpu-check's sweep: the weight stream alone takes 10.5 µs on 14336×4096,
// the kernel 31.7 µs, 27.4 µs without its scales). Here each warp walks a list of (row, group of
// UNR chunks per lane) steps, rows strided by the number of warps in the grid, and issues the
// loads of step t + 1 before it computes step t (double buffering in registers, the scheme of
// CUTLASS's multistage mainloops and of llm.c's prefetching kernels, done by hand because a
// lane's data is only 16·UNR bytes). With a grid sized to the GPU's resident warps the loads of
// every warp are in flight while it computes.
//
// Two more latencies are taken off each step's critical path:
//  - double quantization's scale is code[qabs[b]] · nested[b / 256] + offset; nf4_gemv loads the
//    code entry from global memory after qabs arrives, so every chunk waited for two dependent
//    loads. Here the 256-entry code sits in shared memory and the step prefetches only qabs and
//    nested (independent loads); the scale is formed when the step computes, rounded as
//    block_scale rounds it;
//  - the 32 FMAs of a chunk go to two accumulators (first and second code of each byte) instead of
//    one chain, so fewer of them wait on the previous one and on their shared-memory lookup.
// The arithmetic per code is otherwise nf4_gemv's lut16 (16 codes in shared memory, f32 FMAs,
// the block scale applied once per chunk): results equal nf4_gemv_bf16's up to the order of sums.
#pragma once
#include "nf4_common.cuh"

// One step's loads: per chunk its 16 bytes and the scale's inputs (plain: the f32 absmax in `s`;
// double quantization: qabs in `q`, the nested absmax in `s`).
template <int UNR>
__device__ __forceinline__ void pipe_load(const u8* __restrict__ packed, u32 row, u32 g, u32 lane,
                                          u32 chunks, u32 k, u32 plain,
                                          const float* __restrict__ absmax,
                                          const u8* __restrict__ qabs,
                                          const float* __restrict__ nested, u32 log2_bs,
                                          uint4 (&w)[UNR], float (&s)[UNR], u32 (&q)[UNR]) {
    const uint4* wrow = reinterpret_cast<const uint4*>(packed + (u64)row * (k >> 1));
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
        const u32 c = g * 32 * UNR + 32 * u + lane;
        if (c < chunks) {
            w[u] = ld_stream(wrow + c);
            const u64 b = ((u64)row * k + (u64)c * 32) >> log2_bs;
            if (plain) {
                s[u] = __ldg(absmax + b);
                q[u] = 0;
            } else {
                q[u] = __ldg(qabs + b);
                s[u] = __ldg(nested + (b >> NESTED_LOG2));
            }
        } else {
            w[u] = make_uint4(0u, 0u, 0u, 0u);
            s[u] = 0.f;
            q[u] = 0;
        }
    }
}

// y (M, n) = x (M, k) · Wᵀ with W (n, k) in NF4; any grid size (rows are strided by the grid's
// warp count). Needs k % 32 == 0 and blocksize >= 32, as nf4_gemv.
template <int M, int UNR>
__device__ __forceinline__ void nf4_gemv_pipe(const u16* __restrict__ x,
                                              NF4_W_PARAMS, u32 n, u32 k, u16* __restrict__ y) {
    __shared__ float s_code[16];
    __shared__ float s_ncode[256];
    if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code16[threadIdx.x];
    }
    if (!plain) {
        for (u32 i = threadIdx.x; i < 256; i += blockDim.x) {
            s_ncode[i] = ncode[i];
        }
    }
    __syncthreads();
    const u32 lane = threadIdx.x & 31u;
    const u32 warps = blockDim.x >> 5;
    const u32 stride = gridDim.x * warps;
    u32 row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= n) {
        return;
    }
    const u32 chunks = k >> 5;  // 32 codes = 16 bytes each
    const u32 groups = (chunks + 32 * UNR - 1) / (32 * UNR);
    const u32 xrow = k >> 3;    // uint4s (8 bf16) per row of x
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    uint4 wn[UNR];
    float sn[UNR];
    u32 qn[UNR];
    u32 g = 0;
    pipe_load<UNR>(packed, row, 0, lane, chunks, k, plain, absmax, qabs, nested, log2_bs, wn, sn,
                   qn);
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        acc[m] = 0.f;
    }
    while (true) {
        uint4 w[UNR];
        float s[UNR];
        u32 q[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            w[u] = wn[u];
            s[u] = sn[u];
            q[u] = qn[u];
        }
        const u32 cur_row = row;
        const u32 cur_g = g;
        if (++g == groups) {
            g = 0;
            row += stride;
        }
        const bool more = row < n;
        if (more) {
            // The next step's loads are in flight during this step's arithmetic.
            pipe_load<UNR>(packed, row, g, lane, chunks, k, plain, absmax, qabs, nested, log2_bs,
                           wn, sn, qn);
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const u32 c = cur_g * 32 * UNR + 32 * u + lane;
            if (c >= chunks) {
                break;
            }
            // Double quantization, rounded as block_scale rounds it (no FMA contraction).
            const float scale = plain ? s[u] : __fadd_rn(__fmul_rn(s_ncode[q[u]], s[u]), offset);
            float part[M], part2[M];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                part[m] = 0.f;
                part2[m] = 0.f;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint4 xv[M];
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    xv[m] = __ldg(x4 + (u64)m * xrow + (u64)c * 4 + j);
                }
                const u32 wj = word_of(w[u], j);
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const u32 byte = (wj >> (8 * b)) & 0xffu;
                    const float c_first = s_code[byte >> 4];
                    const float c_second = s_code[byte & 15u];
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const u32 xw = word_of(xv[m], b);
                        part[m] = fmaf(c_first, bf16_lo(xw), part[m]);
                        part2[m] = fmaf(c_second, bf16_hi(xw), part2[m]);
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                acc[m] = fmaf(part[m] + part2[m], scale, acc[m]);
            }
        }
        if (cur_g == groups - 1) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float v = acc[m];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) {
                    v += __shfl_xor_sync(0xffffffffu, v, off);
                }
                if (lane == 0) {
                    y[(u64)m * n + cur_row] = f32_to_bf16(v);
                }
                acc[m] = 0.f;
            }
        }
        if (!more) {
            break;
        }
    }
}
