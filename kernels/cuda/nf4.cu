// NF4 kernels of qlorad (CUDA, sm_90): dequantize to bf16, and a fused GEMV for decode.
//
// The format is bitsandbytes' 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, §3): elements in
// row-major order, two per byte with the first in the high nibble, one absmax per `blocksize`
// consecutive elements (blocks run across row boundaries); with double quantization the absmax
// vector is itself 8-bit: absmax[b] = nested_code[q[b]] * nested_absmax[b / 256] + offset.
// The arithmetic follows bitsandbytes' csrc/kernels.cu (kDequantizeBlockwise for the dequantize,
// kgemm_4bit_inference_naive for the GEMV), written anew for this layout:
//  - dequantize: each thread turns one 16-byte chunk (32 codes, one block since blocksize >= 32)
//    into four 16-byte stores of bf16; products are rounded exactly as the CPU reference does
//    (code * absmax in f32, no FMA contraction), so the result equals the CPU's bit for bit;
//  - GEMV: one warp per output feature; each lane streams 16-byte chunks of the packed row
//    (L1::no_allocate, several loads in flight), dots the 32 codes of a chunk with x in f32 and
//    applies the block scale once per chunk. The 4-bit weights are read once; no dequantized copy.
//
// Header-free: bf16 is handled as its 16 bits (no cuda_bf16.h), so the file builds with nvcc or
// NVRTC alike.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Entries of the second-level (absmax) quantization block, fixed in bitsandbytes.
#define NESTED_LOG2 8
// Chunks each lane loads before it computes (memory-level parallelism).
#define UNROLL 4

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. Same as Rust's half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u32 word_of(const uint4& v, int j) {
    return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// A 16-byte load that bypasses L1 allocation: each weight byte is used once, x is what L1 keeps.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// The scale of first-level block `b`. Double quantization: the dynamic-code product, then the
// offset, as two separately rounded f32 operations (bitsandbytes' dequantize_blockwise followed by
// `+= offset`; no FMA, so the CPU reference is reproduced exactly).
__device__ __forceinline__ float block_scale(u64 b, u32 plain, const float* __restrict__ absmax,
                                             const u8* __restrict__ qabs,
                                             const float* __restrict__ nested,
                                             const float* __restrict__ ncode, float offset) {
    if (plain) {
        return __ldg(absmax + b);
    }
    const float c = __ldg(ncode + __ldg(qabs + b));
    return __fadd_rn(__fmul_rn(c, __ldg(nested + (b >> NESTED_LOG2))), offset);
}

// out[e] = bf16(code[nibble(e)] * absmax[e / blocksize]) for e < numel. Needs blocksize >= 32.
extern "C" __global__ void nf4_dequantize_bf16(const u8* __restrict__ packed,
                                               const float* __restrict__ code16, u32 plain,
                                               const float* __restrict__ absmax,
                                               const u8* __restrict__ qabs,
                                               const float* __restrict__ nested,
                                               const float* __restrict__ ncode, float offset,
                                               u32 log2_bs, u64 numel, u16* __restrict__ out) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code16[threadIdx.x];
    }
    __syncthreads();
    const u64 nchunks = (numel + 31) / 32;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < nchunks; c += stride) {
        const u64 e0 = c * 32;
        if (e0 + 32 <= numel) {
            const uint4 w = ld_stream(reinterpret_cast<const uint4*>(packed) + c);
            const float s = block_scale(e0 >> log2_bs, plain, absmax, qabs, nested, ncode, offset);
            uint4* dst = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 wj = word_of(w, j);
                u32 p[4];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const u32 byte = (wj >> (8 * b)) & 0xffu;
                    const u32 first = f32_to_bf16(__fmul_rn(s_code[byte >> 4], s));
                    const u32 second = f32_to_bf16(__fmul_rn(s_code[byte & 15u], s));
                    p[b] = first | (second << 16);  // little endian: first element, low half
                }
                dst[j] = make_uint4(p[0], p[1], p[2], p[3]);
            }
        } else {
            // The partial last chunk of a tensor whose size is not a multiple of 32.
            for (u64 e = e0; e < numel; ++e) {
                const u32 byte = packed[e >> 1];
                const u32 nib = (e & 1) ? (byte & 15u) : (byte >> 4);
                const float s = block_scale(e >> log2_bs, plain, absmax, qabs, nested, ncode, offset);
                out[e] = f32_to_bf16(__fmul_rn(s_code[nib], s));
            }
        }
    }
}

// Entries per half-warp copy of the byte-pair table: one copy per lane of a half-warp, so the
// 64-bit loads of a half-warp (one shared-memory wavefront) never share a bank.
#define PAIR_COPIES 16

// y (M, n) = x (M, k) · Wᵀ with W (n, k) in NF4. Needs k % 32 == 0 (rows start on 16-byte chunks)
// and blocksize >= 32 (a chunk lies in one block). Each warp computes R consecutive output
// features; lane l takes 16-byte chunks l, l + 32, ... of each of its rows.
//
// PAIR = false: the 16 codes in shared memory, one lookup per 4-bit code.
// PAIR = true: a 256-entry table of code pairs indexed by the whole byte (both codes of a byte in
// one 64-bit load), replicated PAIR_COPIES times so a half-warp's loads are conflict-free (32 KB):
// half the lookups and index arithmetic per element.
// R = 2: two rows per warp share each load and conversion of x, and double the weight bytes each
// lane has in flight.
template <int M, bool PAIR, int R>
__device__ __forceinline__ void nf4_gemv(const u16* __restrict__ x, const u8* __restrict__ packed,
                                         const float* __restrict__ code16, u32 plain,
                                         const float* __restrict__ absmax,
                                         const u8* __restrict__ qabs,
                                         const float* __restrict__ nested,
                                         const float* __restrict__ ncode, float offset,
                                         u32 log2_bs, u32 n, u32 k, u16* __restrict__ y) {
    __shared__ float s_code[PAIR ? 1 : 16];
    __shared__ float2 s_pair[PAIR ? 256 * PAIR_COPIES : 1];
    if (PAIR) {
        for (u32 i = threadIdx.x; i < 256 * PAIR_COPIES; i += blockDim.x) {
            const u32 byte = i / PAIR_COPIES;
            s_pair[i] = make_float2(code16[byte >> 4], code16[byte & 15u]);
        }
    } else if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code16[threadIdx.x];
    }
    __syncthreads();
    const u32 lane = threadIdx.x & 31u;
    const float2* pair_lane = s_pair + (lane % PAIR_COPIES);
    const u32 row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (row0 >= n) {
        return;
    }
    const u32 chunks = k >> 5;                // 32 codes = 16 bytes each
    const u32 xrow = k >> 3;                  // uint4s (8 bf16) per row of x
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            acc[r][m] = 0.f;
        }
    }
    for (u32 c0 = lane; c0 < chunks; c0 += 32 * UNROLL) {
        uint4 w[R][UNROLL];
        float s[R][UNROLL];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const u32 row = row0 + r;
            const uint4* wrow = reinterpret_cast<const uint4*>(packed + (u64)row * (k >> 1));
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const u32 c = c0 + 32 * u;
                if (c < chunks && row < n) {
                    w[r][u] = ld_stream(wrow + c);
                    s[r][u] = block_scale(((u64)row * k + (u64)c * 32) >> log2_bs, plain, absmax,
                                          qabs, nested, ncode, offset);
                } else {
                    w[r][u] = make_uint4(0u, 0u, 0u, 0u);
                    s[r][u] = 0.f;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) {
                break;
            }
            float part[R][M];
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    part[r][m] = 0.f;
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint4 xv[M];
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    xv[m] = __ldg(x4 + (u64)m * xrow + (u64)c * 4 + j);
                }
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    float x_first[M], x_second[M];
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const u32 xw = word_of(xv[m], b);
                        x_first[m] = bf16_lo(xw);
                        x_second[m] = bf16_hi(xw);
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const u32 byte = (word_of(w[r][u], j) >> (8 * b)) & 0xffu;
                        float c_first, c_second;
                        if (PAIR) {
                            const float2 cp = pair_lane[byte * PAIR_COPIES];
                            c_first = cp.x;
                            c_second = cp.y;
                        } else {
                            c_first = s_code[byte >> 4];
                            c_second = s_code[byte & 15u];
                        }
#pragma unroll
                        for (int m = 0; m < M; ++m) {
                            part[r][m] = fmaf(c_first, x_first[m], part[r][m]);
                            part[r][m] = fmaf(c_second, x_second[m], part[r][m]);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    acc[r][m] = fmaf(part[r][m], s[r][u], acc[r][m]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                v += __shfl_xor_sync(0xffffffffu, v, off);
            }
            acc[r][m] = v;
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (row0 + r < n) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    y[(u64)m * n + row0 + r] = f32_to_bf16(acc[r][m]);
                }
            }
        }
    }
}

#define NF4_GEMV_ENTRY(NAME, M, PAIR, R)                                                            \
    extern "C" __global__ void NAME##_m##M(                                                      \
        const u16* __restrict__ x, const u8* __restrict__ packed,                                \
        const float* __restrict__ code16, u32 plain, const float* __restrict__ absmax,           \
        const u8* __restrict__ qabs, const float* __restrict__ nested,                           \
        const float* __restrict__ ncode, float offset, u32 log2_bs, u32 n, u32 k,                \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv<M, PAIR, R>(x, packed, code16, plain, absmax, qabs, nested, ncode, offset, log2_bs, \
                          n, k, y);                                                              \
    }

NF4_GEMV_ENTRY(nf4_gemv_bf16, 1, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 2, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 3, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 4, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 5, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 6, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 7, false, 1)
NF4_GEMV_ENTRY(nf4_gemv_bf16, 8, false, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 1, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 2, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 3, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 4, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 5, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 6, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 7, true, 1)
NF4_GEMV_ENTRY(nf4_gemv2_bf16, 8, true, 1)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 1, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 2, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 3, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 4, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 5, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 6, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 7, true, 2)
NF4_GEMV_ENTRY(nf4_gemv3_bf16, 8, true, 2)
