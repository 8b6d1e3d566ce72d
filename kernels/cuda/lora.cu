// LoRA BGMV kernels of qlorad (CUDA, sm_90): the batched "gather matrix-vector" of Punica
// (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", §4) and S-LoRA (Sheng et al. 2023):
// every row of a decode batch applies its own adapter (or none, or one of another rank) to one
// projection in two launches, whatever the mix of adapters:
//  - shrink:  t[row, j]  = x[row, :] · A_row[j, :]                      (j < r_row; f32 out)
//  - expand:  y[row, o] += scale_row · Σ_j t[row, j] · B_row[o, j]       (in place on bf16 y)
// A (r, in) and B (out, r) are row-major bf16; accumulation is f32 and t stays f32, so the only
// rounding is the final one of y to bf16.
//
// Projections that read the same x (q/k/v, gate/up) share one launch pair: grid z picks the slot
// (slot0 + z), t holds one (rows, t_stride) region per z, and the expand takes up to MAX_GROUP
// outputs.
//
// Each row finds its adapter through `row_tables[row]`: 0 for "no adapter", else the device
// address of that adapter's table, which holds TABLE_WORDS u64 per (layer, projection) slot:
// [address of A, address of B, rank | f32 bits of scale << 32] (rank 0: no module there). The
// host builds one table per adapter when it is placed, and uploads the `rows` row addresses once
// per forward pass (qlorad-kernels' bgmv_cuda.rs).
//
// Layout and vectorisation:
//  - shrink: a block per (row, SHRINK_RANKS consecutive rank outputs); its 8 warps stride over `in`
//    with 16-byte loads (8 bf16), each x chunk reused for the block's rank outputs; warp shuffles,
//    then shared memory, reduce the partial sums. 16-byte loads need in % 8 == 0 and x, A on
//    16-byte boundaries; otherwise the block takes the element-by-element loop;
//  - expand: a thread per output feature o, reading B's row o (r contiguous bf16, 16 bytes at a
//    time when r % 8 == 0 and B is aligned) against the row's t, held in L1 (every thread of the
//    block reads the same t row).
//
// bf16 is handled as its 16 bits (bf16.cuh; no cuda_bf16.h), like nf4.cu.

#include "lora_table.cuh"

#define SHRINK_THREADS 256
#define SHRINK_WARPS (SHRINK_THREADS / 32)
// Rank outputs per shrink block.
#define SHRINK_RANKS 4
#define EXPAND_THREADS 128
// Most projections one launch pair serves (q, k and v).
#define MAX_GROUP 3

// Dot product of 8 bf16 (one 16-byte chunk, first element in the low half) with 8 floats.
__device__ __forceinline__ float dot8(const uint4& w, const float* f, float acc) {
    acc = fmaf(bf16_lo(w.x), f[0], acc);
    acc = fmaf(bf16_hi(w.x), f[1], acc);
    acc = fmaf(bf16_lo(w.y), f[2], acc);
    acc = fmaf(bf16_hi(w.y), f[3], acc);
    acc = fmaf(bf16_lo(w.z), f[4], acc);
    acc = fmaf(bf16_hi(w.z), f[5], acc);
    acc = fmaf(bf16_lo(w.w), f[6], acc);
    acc = fmaf(bf16_hi(w.w), f[7], acc);
    return acc;
}

// For slot = slot0 + z: t_z (rows, t_stride) f32, t_z[row, j] = x[row, :] · A_row[j, :] for
// j < r_row; other entries are left as they are. x (rows, in) bf16; t holds gridDim.z regions of
// rows · t_stride. Grid (ceil(max_r / SHRINK_RANKS), rows, slots), SHRINK_THREADS threads. Needs
// r_row <= t_stride (rows that break it are skipped, as the host never asks that).
// RANKS rank outputs per block: `lora_bgmv_shrink` takes SHRINK_RANKS (4), and
// `lora_bgmv_shrink_r1` (the host's default) one: four times the blocks, each with a quarter of
// the work (the decode shrink at batch 1 fills 48 blocks with the former, and its time is the
// latency of one block).
template <int RANKS>
__device__ __forceinline__ void bgmv_shrink(const u16* __restrict__ x, u32 in_f,
                                            const u64* __restrict__ row_tables, u32 slot0,
                                            float* __restrict__ t_all, u32 t_stride) {
    const u32 row = blockIdx.y;
    const RowLora l = lookup(row_tables, row, slot0 + blockIdx.z);
    float* t = t_all + (u64)blockIdx.z * gridDim.y * t_stride;
    const u32 j0 = blockIdx.x * RANKS;
    // Block-uniform exits, before the barrier below.
    if (l.r == 0 || l.r > t_stride || j0 >= l.r || blockDim.x != SHRINK_THREADS) {
        return;
    }
    const u32 nj = min((u32)RANKS, l.r - j0);
    const u16* xr = x + (u64)row * in_f;
    const u16* a0 = l.a + (u64)j0 * in_f;
    float acc[RANKS];
#pragma unroll
    for (int k = 0; k < RANKS; ++k) {
        acc[k] = 0.f;
    }
    const bool vec = (in_f & 7u) == 0 &&
                     ((reinterpret_cast<u64>(xr) | reinterpret_cast<u64>(l.a)) & 15ull) == 0;
    if (vec) {
        // Row j of A starts at j * in elements: 16-byte aligned since in % 8 == 0.
        const u32 nv = in_f >> 3;
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
#pragma unroll 2
        for (u32 v = threadIdx.x; v < nv; v += SHRINK_THREADS) {
            const uint4 xw = __ldg(xv + v);
            float xf[8];
            xf[0] = bf16_lo(xw.x);
            xf[1] = bf16_hi(xw.x);
            xf[2] = bf16_lo(xw.y);
            xf[3] = bf16_hi(xw.y);
            xf[4] = bf16_lo(xw.z);
            xf[5] = bf16_hi(xw.z);
            xf[6] = bf16_lo(xw.w);
            xf[7] = bf16_hi(xw.w);
#pragma unroll
            for (int k = 0; k < RANKS; ++k) {
                if ((u32)k < nj) {
                    const uint4 aw = __ldg(reinterpret_cast<const uint4*>(a0 + (u64)k * in_f) + v);
                    acc[k] = dot8(aw, xf, acc[k]);
                }
            }
        }
    } else {
        for (u32 i = threadIdx.x; i < in_f; i += SHRINK_THREADS) {
            const float xf = bf16_f(xr[i]);
#pragma unroll
            for (int k = 0; k < RANKS; ++k) {
                if ((u32)k < nj) {
                    acc[k] = fmaf(bf16_f(a0[(u64)k * in_f + i]), xf, acc[k]);
                }
            }
        }
    }
    __shared__ float part[SHRINK_WARPS][RANKS];
    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
#pragma unroll
    for (int k = 0; k < RANKS; ++k) {
        const float s = warp_sum(acc[k]);
        if (lane == 0) {
            part[warp][k] = s;
        }
    }
    __syncthreads();
    if (threadIdx.x < nj) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < SHRINK_WARPS; ++w) {
            s += part[w][threadIdx.x];
        }
        t[(u64)row * t_stride + j0 + threadIdx.x] = s;
    }
}

extern "C" __global__ void __launch_bounds__(SHRINK_THREADS)
    lora_bgmv_shrink(const u16* __restrict__ x, u32 in_f, const u64* __restrict__ row_tables,
                     u32 slot0, float* __restrict__ t_all, u32 t_stride) {
    bgmv_shrink<SHRINK_RANKS>(x, in_f, row_tables, slot0, t_all, t_stride);
}

extern "C" __global__ void __launch_bounds__(SHRINK_THREADS)
    lora_bgmv_shrink_r1(const u16* __restrict__ x, u32 in_f, const u64* __restrict__ row_tables,
                        u32 slot0, float* __restrict__ t_all, u32 t_stride) {
    bgmv_shrink<1>(x, in_f, row_tables, slot0, t_all, t_stride);
}

// For slot = slot0 + z, y_z (rows, out_z) bf16 in place:
// y_z[row, o] += scale_row · t_z[row, :r_row] · B_row[o, :r_row]. Grid
// (ceil(max_z out_z / EXPAND_THREADS), rows, slots <= MAX_GROUP), EXPAND_THREADS threads. Reads
// only the t entries the shrink of the same slots wrote.
extern "C" __global__ void __launch_bounds__(EXPAND_THREADS)
    lora_bgmv_expand(u16* y0, u16* y1, u16* y2, u32 out0, u32 out1, u32 out2,
                     const u64* __restrict__ row_tables, u32 slot0,
                     const float* __restrict__ t_all, u32 t_stride) {
    const u32 z = blockIdx.z;
    if (z >= MAX_GROUP) {
        return;
    }
    u16* y = z == 0 ? y0 : (z == 1 ? y1 : y2);
    const u32 out_f = z == 0 ? out0 : (z == 1 ? out1 : out2);
    const float* t = t_all + (u64)z * gridDim.y * t_stride;
    const u32 row = blockIdx.y;
    const RowLora l = lookup(row_tables, row, slot0 + z);
    if (l.r == 0 || l.r > t_stride) {
        return;
    }
    const u32 o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out_f) {
        return;
    }
    const float* tr = t + (u64)row * t_stride;
    const u16* br = l.b + (u64)o * l.r;
    float acc = 0.f;
    // Row o of B starts at o * r elements: 16-byte aligned when r % 8 == 0 and B is; the t row
    // is when t_stride % 4 == 0 and t is.
    const bool vec = (l.r & 7u) == 0 && (t_stride & 3u) == 0 &&
                     ((reinterpret_cast<u64>(l.b) | reinterpret_cast<u64>(t)) & 15ull) == 0;
    if (vec) {
#pragma unroll 4
        for (u32 j = 0; j < l.r; j += 8) {
            const uint4 bw = __ldg(reinterpret_cast<const uint4*>(br + j));
            const float4 t0 = __ldg(reinterpret_cast<const float4*>(tr + j));
            const float4 t1 = __ldg(reinterpret_cast<const float4*>(tr + j + 4));
            const float tf[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
            acc = dot8(bw, tf, acc);
        }
    } else {
        for (u32 j = 0; j < l.r; ++j) {
            acc = fmaf(bf16_f(br[j]), __ldg(tr + j), acc);
        }
    }
    u16* yp = y + (u64)row * out_f + o;
    *yp = f32_to_bf16(fmaf(l.scale, acc, bf16_f(*yp)));
}
