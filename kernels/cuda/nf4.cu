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
// bf16 is handled as its 16 bits (bf16.cuh; no cuda_bf16.h).

#include "nf4_common.cuh"
#include "lora_table.cuh"

// The 32 codes of a 16-byte piece `w` (first element in the high nibble of the first byte) times
// their block's scale `s`, each product rounded to bf16, as four 16-byte stores at `dst`.
__device__ __forceinline__ void dequant_piece(const uint4& w, float s, const float* s_code,
                                              uint4* dst) {
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
}

// out[e] = bf16(code[nibble(e)] * absmax[e / blocksize]) for e < numel. Needs blocksize >= 32.
extern "C" __global__ void nf4_dequantize_bf16(NF4_W_PARAMS, u64 numel, u16* __restrict__ out) {
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
            dequant_piece(w, s, s_code, reinterpret_cast<uint4*>(out + e0));
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

// nf4_dequantize_bf16 for a weight in the tiled layout of the t4 GEMV (src/tiled.rs: 16-row tiles,
// 128-column super-blocks of 1,024 contiguous bytes, the block scales in the same order; n % 16 ==
// 0, k % 128 == 0, blocksize 64): piece c (16 bytes, 32 codes) of the tiled bytes holds row-major
// elements [e0, e0 + 32) of row 16·tile + r from column 128·s + 32·(c % 4), with its scale at tiled
// block index piece_block(c) and the second level at the row-major block. Same products and
// roundings as the row-major kernel (bit for bit the CPU's dequantize).
extern "C" __global__ void nf4_dequantize_tiled_bf16(NF4_W_PARAMS, u32 k, u64 numel,
                                                     u16* __restrict__ out) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code16[threadIdx.x];
    }
    __syncthreads();
    const u64 nchunks = numel / 32;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 nsb = k >> 7;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < nchunks; c += stride) {
        const u64 ts = c >> 6, r = (c & 63u) >> 2, piece = c & 3u;
        const u64 row = (ts / nsb) * 16 + r, col = (ts % nsb) * 128 + piece * 32;
        const u64 e0 = row * k + col;
        const u64 tb = ts * 32 + r * 2 + (piece >> 1);
        const uint4 w = ld_stream(reinterpret_cast<const uint4*>(packed) + c);
        float s;
        if (plain) {
            s = __ldg(absmax + tb);
        } else {
            const float cq = __ldg(ncode + __ldg(qabs + tb));
            s = __fadd_rn(__fmul_rn(cq, __ldg(nested + ((e0 >> 6) >> NESTED_LOG2))), offset);
        }
        dequant_piece(w, s, s_code, reinterpret_cast<uint4*>(out + e0));
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
// LORA = true: the epilogue adds each input row's LoRA expand for this projection before the
// warp's reduction, y[m, o] += scale_m · t_m · B_m[o, :r_m] (the BGMV expand of lora.cu, in the
// same f32 accumulator, so y is rounded to bf16 once), with t (rows, t_stride) f32 written by the
// BGMV shrink launched before this kernel and `slot` the projection's slot in the row tables.
template <int M, bool PAIR, int R, bool LORA = false>
__device__ __forceinline__ void nf4_gemv(const u16* __restrict__ x, NF4_W_PARAMS,
                                         u32 n, u32 k, u16* __restrict__ y,
                                         const u64* __restrict__ row_tables = nullptr,
                                         u32 slot = 0, const float* __restrict__ t = nullptr,
                                         u32 t_stride = 0) {
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
    if (LORA) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const RowLora l = lookup(row_tables, m, slot);
            if (l.r == 0 || l.r > t_stride) {
                continue;
            }
            const float* tm = t + (u64)m * t_stride;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const u32 o = row0 + r;
                if (o >= n) {
                    continue;
                }
                const u16* br = l.b + (u64)o * l.r;
                float d = 0.f;
                for (u32 j = lane; j < l.r; j += 32) {
                    d = fmaf(bf16_f(br[j]), __ldg(tm + j), d);
                }
                acc[r][m] = fmaf(l.scale, d, acc[r][m]);
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

#define NF4_GEMV_ENTRY(NAME, M, PAIR, R)                                                         \
    extern "C" __global__ void NAME##_m##M(                                                      \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv<M, PAIR, R>(x, NF4_W_ARGS,                                                      \
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

// lut16 with the LoRA expand in its epilogue (see nf4_gemv's LORA): decode's projections whose rows
// use adapters, after the BGMV shrink of their group.
#define NF4_GEMV_LORA_ENTRY(M)                                                                   \
    extern "C" __global__ void nf4_gemv_lora_bf16_m##M(                                          \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y, const u64* __restrict__ row_tables, u32 slot,                       \
        const float* __restrict__ t, u32 t_stride) {                                             \
        nf4_gemv<M, false, 1, true>(x, NF4_W_ARGS, n, k, y, row_tables, slot, t, t_stride);      \
    }

NF4_GEMV_LORA_ENTRY(1)
NF4_GEMV_LORA_ENTRY(2)
NF4_GEMV_LORA_ENTRY(3)
NF4_GEMV_LORA_ENTRY(4)
NF4_GEMV_LORA_ENTRY(5)
NF4_GEMV_LORA_ENTRY(6)
NF4_GEMV_LORA_ENTRY(7)
NF4_GEMV_LORA_ENTRY(8)

// lut16 with several rows per warp: x is loaded and converted once per chunk for all of them.
// gpu-check's sweep found the arithmetic, not the weight stream, bounds the one-row kernel
// (26.6 of its 32 µs on 14336×4096 remain with no weight or scale loads), and of that the loads
// of x cost the most (15.3 µs without them): each lane reads 64 bytes of x per 16 bytes of
// weights. Two or four rows per warp divide that by two or four.
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 1, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 2, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 3, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 4, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 5, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 6, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 7, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r2_bf16, 8, false, 2)
NF4_GEMV_ENTRY(nf4_gemv_r4_bf16, 1, false, 4)
NF4_GEMV_ENTRY(nf4_gemv_r4_bf16, 2, false, 4)
NF4_GEMV_ENTRY(nf4_gemv_r4_bf16, 3, false, 4)
NF4_GEMV_ENTRY(nf4_gemv_r4_bf16, 4, false, 4)

// The GEMV on tensor cores, for decode's 1..8 input rows (Marlin, Frantar et al. 2024, does the
// same for int4 GEMM): a block of MMA_WARPS warps computes 16 output features; each warp takes
// every MMA_WARPS-th 64-element k block, dequantizes its codes straight into mma.m16n8k16 A
// fragments through a table of bf16 code pairs indexed by the packed byte (one shared-memory load
// per two codes, replicated per lane so a warp's loads never share a bank), multiplies them with
// x as the B operand (column m = input row m, zero beyond M) and applies the block's absmax to the
// f32 result of each 64-element block. The lookup-and-FMA loop of the kernels above spends ~5
// instructions per code; this one ~2, and the tensor core does the multiply-adds.
//
// The k order inside a block is permuted (dot products do not care): thread t of a quad holds
// bytes [8t, 8t + 8) of each of its two rows' 32-byte block, i.e. k = 16t .. 16t + 16, and MMA
// step u uses its bytes 2u (A columns 2t, 2t + 1) and 2u + 1 (columns 2t + 8, 2t + 9); the B
// fragment takes x at the same k, which are the thread's x words 2u and 2u + 1.
// Needs n % 16 == 0, k % 64 == 0 and a blocksize that is a multiple of 64 (checked by the host).
// Codes are rounded to bf16 (as bitsandbytes' dequantize rounds code * absmax), so results agree
// with the other kernels to bf16 rounding, not bit for bit.
#define MMA_WARPS 8
#define LUT_COPIES 32
#define MMA_UNROLL 4

__device__ __forceinline__ uint2 ld_stream8(const void* p) {
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

__device__ __forceinline__ void mma_bf16_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                               u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int M>
__device__ __forceinline__ void nf4_gemv_mma(const u16* __restrict__ x,
                                             NF4_W_PARAMS, u32 n, u32 k, u16* __restrict__ y) {
    __shared__ __align__(16) u32 lut[256 * LUT_COPIES];
    __shared__ float red[MMA_WARPS][32][4];
    // Thread `byte` (the block has 256 threads) fills its entry.
    fill_pair_lut_entry<LUT_COPIES>(lut, code16, threadIdx.x);
    __syncthreads();
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 ra = blockIdx.x * 16 + g, rb = ra + 8;
    const u32 nblk = k >> 6;
    const u32* lut_lane = lut + lane;
    const u8* wa = packed + (u64)ra * (k >> 1) + 8 * t;
    const u8* wb = packed + (u64)rb * (k >> 1) + 8 * t;
    const u16* xg = x + (u64)g * k + 16 * t;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (u32 b0 = warp; b0 < nblk; b0 += MMA_WARPS * MMA_UNROLL) {
        uint2 qa[MMA_UNROLL], qb[MMA_UNROLL];
        uint4 xl[MMA_UNROLL], xh[MMA_UNROLL];
        float sa[MMA_UNROLL], sb[MMA_UNROLL];
#pragma unroll
        for (int s = 0; s < MMA_UNROLL; ++s) {
            const u32 b = b0 + s * MMA_WARPS;
            const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
            if (b < nblk) {
                qa[s] = ld_stream8(wa + (u64)b * 32);
                qb[s] = ld_stream8(wb + (u64)b * 32);
                const uint4* xp = reinterpret_cast<const uint4*>(xg + (u64)b * 64);
                xl[s] = g < M ? __ldg(xp) : zero;
                xh[s] = g < M ? __ldg(xp + 1) : zero;
                sa[s] = block_scale(((u64)ra * k + (u64)b * 64) >> log2_bs, plain, absmax, qabs,
                                    nested, ncode, offset);
                sb[s] = block_scale(((u64)rb * k + (u64)b * 64) >> log2_bs, plain, absmax, qabs,
                                    nested, ncode, offset);
            } else {
                qa[s] = make_uint2(0u, 0u);
                qb[s] = make_uint2(0u, 0u);
                xl[s] = zero;
                xh[s] = zero;
                sa[s] = 0.f;
                sb[s] = 0.f;
            }
        }
#pragma unroll
        for (int s = 0; s < MMA_UNROLL; ++s) {
            const u32 xs[8] = {xl[s].x, xl[s].y, xl[s].z, xl[s].w,
                               xh[s].x, xh[s].y, xh[s].z, xh[s].w};
            float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const u32 wA = u < 2 ? qa[s].x : qa[s].y;
                const u32 wB = u < 2 ? qb[s].x : qb[s].y;
                const u32 sh = (u & 1) * 16;
                const u32 a0 = lut_lane[((wA >> sh) & 0xffu) * LUT_COPIES];
                const u32 a2 = lut_lane[((wA >> (sh + 8)) & 0xffu) * LUT_COPIES];
                const u32 a1 = lut_lane[((wB >> sh) & 0xffu) * LUT_COPIES];
                const u32 a3 = lut_lane[((wB >> (sh + 8)) & 0xffu) * LUT_COPIES];
                mma_bf16_16816(d, a0, a1, a2, a3, xs[2 * u], xs[2 * u + 1]);
            }
            acc[0] = fmaf(d[0], sa[s], acc[0]);
            acc[1] = fmaf(d[1], sa[s], acc[1]);
            acc[2] = fmaf(d[2], sb[s], acc[2]);
            acc[3] = fmaf(d[3], sb[s], acc[3]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float o[4] = {0.f, 0.f, 0.f, 0.f};
        for (u32 w = 0; w < MMA_WARPS; ++w) {
#pragma unroll
            for (int i = 0; i < 4; ++i) o[i] += red[w][lane][i];
        }
        // D fragment: o[0] (feature ra, m = 2t), o[1] (ra, 2t + 1), o[2] (rb, 2t), o[3] (rb, 2t + 1).
        const u32 m0 = 2 * t, m1 = 2 * t + 1;
        if (m0 < M) {
            y[(u64)m0 * n + ra] = f32_to_bf16(o[0]);
            y[(u64)m0 * n + rb] = f32_to_bf16(o[2]);
        }
        if (m1 < M) {
            y[(u64)m1 * n + ra] = f32_to_bf16(o[1]);
            y[(u64)m1 * n + rb] = f32_to_bf16(o[3]);
        }
    }
}

#define NF4_GEMV_MMA_ENTRY(M)                                                                    \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) nf4_gemv_mma_bf16_m##M(         \
        const u16* __restrict__ x, NF4_W_PARAMS, u32 n, u32 k,                                   \
        u16* __restrict__ y) {                                                                   \
        nf4_gemv_mma<M>(x, NF4_W_ARGS,                                                           \
                        n, k, y);                                                                \
    }

NF4_GEMV_MMA_ENTRY(1)
NF4_GEMV_MMA_ENTRY(2)
NF4_GEMV_MMA_ENTRY(3)
NF4_GEMV_MMA_ENTRY(4)
NF4_GEMV_MMA_ENTRY(5)
NF4_GEMV_MMA_ENTRY(6)
NF4_GEMV_MMA_ENTRY(7)
NF4_GEMV_MMA_ENTRY(8)
#include "nf4_tc.cuh"
#include "nf4_t4.cuh"
