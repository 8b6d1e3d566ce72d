// gpu-check's GEMV sweep kernels, a module of their own so the model never loads them.
#include "nf4_common.cuh"
#include "nf4_pipe.cuh"

// Experiment kernels for gpu-check's GEMV sweep (not used by the model): the lut16 GEMV for one
// input row with variations in how the weight bytes are loaded (LD: 0 = nc + L1::no_allocate as
// above, 1 = nc, 2 = plain, 3 = cs / evict-first), where x is read from (XS: staged in shared
// memory once per block instead of __ldg per chunk) and how many 16-byte chunks a lane has in
// flight (UNR). They answer which of these bounds the kernel at ~1 TB/s on the H200.
template <int LD>
__device__ __forceinline__ uint4 ld_variant(const uint4* p) {
    uint4 r;
    if (LD == 0) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else if (LD == 1) {
        asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else if (LD == 2) {
        asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else {
        asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    }
    return r;
}

// MODE 0: the full GEMV; 1: without the block scales (s = 1: no absmax loads); 2: only the weight
// loads (each lane sums its words as integers: the memory stream alone, in the same geometry);
// 3: only the arithmetic (codes made up from the chunk index, no weight or scale loads: the
// instruction floor of the lookup-and-FMA loop); 4: as 3 without the shared-memory lookups (each
// code's value made from its bits by integer ops); 5: as 3 with x held in registers (no x loads).
// Modes 3-5 locate what bounds the arithmetic: the lookups, the loads of x, or the instructions.
template <int LD, bool XS, int UNR, int MODE>
__device__ __forceinline__ void gemv_sweep(const u16* __restrict__ x, NF4_W_PARAMS,
                                           u32 n, u32 k, u16* __restrict__ y) {
    extern __shared__ uint4 xs_dyn[];
    __shared__ float s_code[16];
    if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code16[threadIdx.x];
    }
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    if (XS) {
        for (u32 i = threadIdx.x; i < (k >> 3); i += blockDim.x) xs_dyn[i] = x4[i];
    }
    __syncthreads();
    const u32 lane = threadIdx.x & 31u;
    const u32 row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) {
        return;
    }
    const u32 chunks = k >> 5;
    const uint4* wrow = reinterpret_cast<const uint4*>(packed + (u64)row * (k >> 1));
    float acc = 0.f;
    for (u32 c0 = lane; c0 < chunks; c0 += 32 * UNR) {
        uint4 w[UNR];
        float s[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const u32 c = c0 + 32 * u;
            if (MODE >= 3 && c < chunks) {
                const u32 h = (c + row) * 2654435761u;
                w[u] = make_uint4(h, h ^ 0x5a5a5a5au, h * 3u, ~h);
                s[u] = 1.f;
            } else if (c < chunks) {
                w[u] = ld_variant<LD>(wrow + c);
                s[u] = MODE == 0 ? block_scale(((u64)row * k + (u64)c * 32) >> log2_bs, plain,
                                               absmax, qabs, nested, ncode, offset)
                                 : 1.f;
            } else {
                w[u] = make_uint4(0u, 0u, 0u, 0u);
                s[u] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) {
                break;
            }
            if (MODE == 2) {
                acc += (float)(w[u].x ^ w[u].y ^ w[u].z ^ w[u].w);
                continue;
            }
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint4 xv = MODE == 5 ? make_uint4(lane, lane ^ j, lane + j, u)
                                 : XS      ? xs_dyn[c * 4 + j]
                                           : __ldg(x4 + (u64)c * 4 + j);
                const u32 wj = word_of(w[u], j);
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const u32 byte = (wj >> (8 * b)) & 0xffu;
                    const u32 xw = word_of(xv, b);
                    if (MODE == 4) {
                        part = fmaf(__uint_as_float(0x3f000000u | ((byte >> 4) << 19)), bf16_lo(xw),
                                    part);
                        part = fmaf(__uint_as_float(0x3f000000u | ((byte & 15u) << 19)),
                                    bf16_hi(xw), part);
                    } else {
                        part = fmaf(s_code[byte >> 4], bf16_lo(xw), part);
                        part = fmaf(s_code[byte & 15u], bf16_hi(xw), part);
                    }
                }
            }
            acc = fmaf(part, s[u], acc);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        y[row] = f32_to_bf16(acc);
    }
}

#define GEMV_SWEEP_ENTRY(NAME, LD, XS, UNR, MODE)                                                \
    extern "C" __global__ void nf4_gemv_sweep_##NAME(                                            \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        gemv_sweep<LD, XS, UNR, MODE>(x, NF4_W_ARGS, n, k, y);                                   \
    }

GEMV_SWEEP_ENTRY(ld0_u4, 0, false, 4, 0)
GEMV_SWEEP_ENTRY(ld3_u4, 3, false, 4, 0)
GEMV_SWEEP_ENTRY(ld0_u2, 0, false, 2, 0)
GEMV_SWEEP_ENTRY(xs_u4, 0, true, 4, 0)
GEMV_SWEEP_ENTRY(noscale_u4, 0, false, 4, 1)
GEMV_SWEEP_ENTRY(read_u4, 0, false, 4, 2)
GEMV_SWEEP_ENTRY(read_u8, 0, false, 8, 2)
GEMV_SWEEP_ENTRY(read2_u4, 2, false, 4, 2)
GEMV_SWEEP_ENTRY(calc_u4, 0, false, 4, 3)
GEMV_SWEEP_ENTRY(calcnolds_u4, 0, false, 4, 4)
GEMV_SWEEP_ENTRY(calcnox_u4, 0, false, 4, 5)

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// The lookup without shared memory: the 16 codes as bf16 live in 8 registers (their low bytes in
// lo[0..3], high bytes in hi[0..3], four codes per register) and byte permutes (prmt) look up four
// 4-bit codes at once: one prmt over entries 0-7, one over 8-15 (its selector's bit 3 cleared),
// a byte mask from each code's bit 3 (itself a prmt of 0x00/0x80 bytes with sign replication)
// picks between them; two more prmts pair each code's bytes into bf16 pairs. All integer-pipe
// work, no shared-memory traffic. Codes are rounded to bf16 (as bitsandbytes' dequantize rounds
// code * absmax), so results agree with lut16 to bf16 rounding of the codes.
template <int UNR>
__device__ __forceinline__ void gemv_prmt(const u16* __restrict__ x, NF4_W_PARAMS,
                                          u32 n, u32 k, u16* __restrict__ y) {
    u32 lo[4], hi[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        lo[q] = 0;
        hi[q] = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 b = f32_to_bf16(__ldg(code16 + 4 * q + e));
            lo[q] |= (b & 0xffu) << (8 * e);
            hi[q] |= (b >> 8) << (8 * e);
        }
    }
    const u32 lane = threadIdx.x & 31u;
    const u32 row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) {
        return;
    }
    const u32 chunks = k >> 5;
    const uint4* wrow = reinterpret_cast<const uint4*>(packed + (u64)row * (k >> 1));
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    float acc = 0.f;
    for (u32 c0 = lane; c0 < chunks; c0 += 32 * UNR) {
        uint4 w[UNR];
        float s[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const u32 c = c0 + 32 * u;
            if (c < chunks) {
                w[u] = ld_stream(wrow + c);
                s[u] = block_scale(((u64)row * k + (u64)c * 32) >> log2_bs, plain, absmax, qabs,
                                   nested, ncode, offset);
            } else {
                w[u] = make_uint4(0u, 0u, 0u, 0u);
                s[u] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) {
                break;
            }
            float part = 0.f, part2 = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint4 xv = __ldg(x4 + (u64)c * 4 + j);
                const u32 wj = word_of(w[u], j);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // Selector nibbles (prmt reads the low 16 bits): byte 2h's low and high code,
                    // then byte 2h + 1's.
                    const u32 sel = h == 0 ? wj : wj >> 16;
                    const u32 m = sel & 0x8888u;
                    const u32 mask = prmt(0u, 0x80808080u, m | (m >> 1));
                    const u32 sel8 = sel ^ 0x8888u;
                    const u32 l = (prmt(lo[0], lo[1], sel) & ~mask) | (prmt(lo[2], lo[3], sel8) & mask);
                    const u32 t = (prmt(hi[0], hi[1], sel) & ~mask) | (prmt(hi[2], hi[3], sel8) & mask);
                    // bf16 pairs: low half the byte's second code, high half its first.
                    const u32 p0 = prmt(l, t, 0x5140u);
                    const u32 p1 = prmt(l, t, 0x7362u);
                    const u32 x0 = word_of(xv, 2 * h);
                    const u32 x1 = word_of(xv, 2 * h + 1);
                    part = fmaf(bf16_hi(p0), bf16_lo(x0), part);
                    part2 = fmaf(bf16_lo(p0), bf16_hi(x0), part2);
                    part = fmaf(bf16_hi(p1), bf16_lo(x1), part);
                    part2 = fmaf(bf16_lo(p1), bf16_hi(x1), part2);
                }
            }
            acc = fmaf(part + part2, s[u], acc);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        y[row] = f32_to_bf16(acc);
    }
}

extern "C" __global__ void nf4_gemv_sweep_prmt_u4(
    const u16* __restrict__ x, NF4_W_PARAMS,
    u32 n, u32 k, u16* __restrict__ y) {
    gemv_prmt<4>(x, NF4_W_ARGS, n, k, y);
}

extern "C" __global__ void nf4_gemv_sweep_prmt_u2(
    const u16* __restrict__ x, NF4_W_PARAMS,
    u32 n, u32 k, u16* __restrict__ y) {
    gemv_prmt<2>(x, NF4_W_ARGS, n, k, y);
}

// The pipelined GEMV (nf4_pipe.cuh) with 1 or 2 chunks per lane per step.
#define GEMV_PIPE_SWEEP_ENTRY(UNR)                                                               \
    extern "C" __global__ void nf4_gemv_sweep_pipe_u##UNR(                                       \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv_pipe<1, UNR>(x, NF4_W_ARGS, n, k, y);                                           \
    }
GEMV_PIPE_SWEEP_ENTRY(1)
GEMV_PIPE_SWEEP_ENTRY(2)
