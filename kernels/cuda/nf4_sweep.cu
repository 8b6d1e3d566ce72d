// gpu-check's GEMV sweep kernels, a module of their own so the model never loads them.
#include "nf4_common.cuh"

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
// loads (each lane sums its words as integers: the memory stream alone, in the same geometry).
template <int LD, bool XS, int UNR, int MODE>
__device__ __forceinline__ void gemv_sweep(const u16* __restrict__ x, const u8* __restrict__ packed,
                                           const float* __restrict__ code16, u32 plain,
                                           const float* __restrict__ absmax,
                                           const u8* __restrict__ qabs,
                                           const float* __restrict__ nested,
                                           const float* __restrict__ ncode, float offset,
                                           u32 log2_bs, u32 n, u32 k, u16* __restrict__ y) {
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
            if (c < chunks) {
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
                const uint4 xv = XS ? xs_dyn[c * 4 + j] : __ldg(x4 + (u64)c * 4 + j);
                const u32 wj = word_of(w[u], j);
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const u32 byte = (wj >> (8 * b)) & 0xffu;
                    const u32 xw = word_of(xv, b);
                    part = fmaf(s_code[byte >> 4], bf16_lo(xw), part);
                    part = fmaf(s_code[byte & 15u], bf16_hi(xw), part);
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

#define GEMV_SWEEP_ENTRY(NAME, LD, XS, UNR, MODE)                                                      \
    extern "C" __global__ void nf4_gemv_sweep_##NAME(                                            \
        const u16* __restrict__ x, const u8* __restrict__ packed,                                \
        const float* __restrict__ code16, u32 plain, const float* __restrict__ absmax,           \
        const u8* __restrict__ qabs, const float* __restrict__ nested,                           \
        const float* __restrict__ ncode, float offset, u32 log2_bs, u32 n, u32 k,                \
        u16* __restrict__ y) {                                                                   \
        gemv_sweep<LD, XS, UNR, MODE>(x, packed, code16, plain, absmax, qabs, nested, ncode, offset,   \
                                log2_bs, n, k, y);                                               \
    }

GEMV_SWEEP_ENTRY(ld0_u4, 0, false, 4, 0)
GEMV_SWEEP_ENTRY(ld3_u4, 3, false, 4, 0)
GEMV_SWEEP_ENTRY(ld0_u2, 0, false, 2, 0)
GEMV_SWEEP_ENTRY(xs_u4, 0, true, 4, 0)
GEMV_SWEEP_ENTRY(noscale_u4, 0, false, 4, 1)
GEMV_SWEEP_ENTRY(read_u4, 0, false, 4, 2)
GEMV_SWEEP_ENTRY(read_u8, 0, false, 8, 2)
GEMV_SWEEP_ENTRY(read2_u4, 2, false, 4, 2)
