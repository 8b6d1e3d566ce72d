// Fused decode-step kernels of qlorad (CUDA, sm_90, bf16 in and out, f32 arithmetic).
//
// A decode step of a Llama/Mistral layer ran ~25 candle ops per layer, each a host round of
// allocation, dispatch and launch (≈ 8 µs), so batch-1 decode on the H200 was bound by the host
// issuing kernels, not by the GPU. These kernels fold the small ops between the projections into
// four launches per layer (the projections themselves stay the NF4 GEMV and the BGMV LoRA kernels):
//  - add_rms_norm: the residual add and the next RMSNorm in one pass over the row;
//  - rope_kv: RoPE on q and k, and the new k and v written into every sequence's KV cache in place;
//  - decode_attention: one query token per sequence against its cached keys, grouped-query heads
//    sharing each K/V load, the softmax online in chunks (Milakov & Gimelshein 2018; the
//    FlashAttention recurrence, Dao et al. 2022), split over the context for long sequences
//    (flash-decoding) and merged by attention_combine;
//  - silu_mul: SwiGLU's silu(gate) * up;
//  - embed_rows: the rows' token embeddings, gathered by ids read on the device.
// Rounding follows candle's kernels where the general path uses them (rmsnorm: bf16(scale*x*w);
// rope: every bf16 product and sum rounded; silu then the product each rounded), so the fused and
// general paths differ only inside attention, which here accumulates in f32 throughout.
//
// The KV table (one per forward pass, built on the host) holds per sequence: its new token's
// position and its caches' capacity in one word, then per layer the K and V buffer addresses.
// Buffers are (kv_heads, capacity, head_dim) bf16, as model/src/kv_cache.rs lays them out.

#include "bf16.cuh"
#include "lora_table.cuh"

__device__ __forceinline__ float rbf(float f) { return bf16_f(f32_to_bf16(f)); }

// RoPE of one (i, i + hd/2) pair (a, b) of a head row with cos c and sin s, transformers' Llama
// rotate-half form with every bf16 product rounded: (a·c − b·s, a·s + b·c), each sum unrounded.
// rope_kv and the attention's in-launch RoPE both use it, which keeps their results bit for bit
// equal (gpu-check compares them).
__device__ __forceinline__ float2 rope_pair(float a, float b, float c, float s) {
    return make_float2(__fsub_rn(rbf(__fmul_rn(a, c)), rbf(__fmul_rn(b, s))),
                       __fadd_rn(rbf(__fmul_rn(a, s)), rbf(__fmul_rn(b, c))));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 16-byte chunks (8 bf16) each thread of add_rms_norm keeps in registers: rows of up to
// NORM_VEC * 8 * blockDim values (8192 with NORM_THREADS) take the register path. At batch 1 the
// norm is one block whose time is each warp's chain of instructions: 512 threads with one chunk
// each (a 4096-wide row) instead of 256 with two, of NORM_VEC = 4 unrolled (half on zeros).
#define NORM_VEC 2
#define NORM_THREADS 512

__device__ __forceinline__ float word_half(const uint4& v, int e) {
    const u32 w = e < 2 ? v.x : (e < 4 ? v.y : (e < 6 ? v.z : v.w));
    return (e & 1) ? bf16_hi(w) : bf16_lo(w);
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// The block's sum of `acc` (every thread must call it).
__device__ __forceinline__ float block_sum(float acc) {
    __shared__ float part[32];
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    return part[0];
}

// The vectorized add + RMSNorm of one row (n % 8 == 0, n <= NORM_VEC * 8 * blockDim, 16-byte
// aligned): x, y and w loaded in 16-byte chunks, all issued before any arithmetic, the sums kept in
// registers for the second pass. Writes the sum (unless `sum` is null) and the normed row (global
// or shared memory).
__device__ __forceinline__ void add_rms_norm_vec(const u16* __restrict__ xr,
                                                 const u16* __restrict__ yr,
                                                 const u16* __restrict__ w, float eps, u32 n,
                                                 u16* sum, u16* normed) {
    const u32 nv = n >> 3;
    const uint4* x4 = reinterpret_cast<const uint4*>(xr);
    const uint4* y4 = reinterpret_cast<const uint4*>(yr);
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    // Chunks per thread that hold any of the row (uniform): the unrolled steps past it are
    // branched over, not computed on zeros.
    const u32 nch = (nv + blockDim.x - 1) / blockDim.x;
    uint4 xv[NORM_VEC], yv[NORM_VEC], wv[NORM_VEC];
#pragma unroll
    for (int j = 0; j < NORM_VEC; ++j) {
        if ((u32)j >= nch) break;
        const u32 c = threadIdx.x + j * blockDim.x;
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        // x and y come from earlier kernels (ld_after_wait), w is a weight.
        xv[j] = c < nv ? ld_after_wait(x4 + c) : z;
        yv[j] = (c < nv && y4) ? ld_after_wait(y4 + c) : z;
        wv[j] = c < nv ? __ldg(w4 + c) : z;
    }
    float sv[NORM_VEC][8];
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VEC; ++j) {
        if ((u32)j >= nch) break;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float xe = word_half(xv[j], e);
            const float s = y4 ? rbf(__fadd_rn(xe, word_half(yv[j], e))) : xe;
            sv[j][e] = s;
            acc = fmaf(s, s, acc);
        }
        const u32 c = threadIdx.x + j * blockDim.x;
        if (sum != nullptr && c < nv) {
            reinterpret_cast<uint4*>(sum)[c] =
                make_uint4(pack2(sv[j][0], sv[j][1]), pack2(sv[j][2], sv[j][3]),
                           pack2(sv[j][4], sv[j][5]), pack2(sv[j][6], sv[j][7]));
        }
    }
    const float scale = rsqrtf(block_sum(acc) / (float)n + eps);
#pragma unroll
    for (int j = 0; j < NORM_VEC; ++j) {
        const u32 c = threadIdx.x + j * blockDim.x;
        if (c < nv) {
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                o[e] = __fmul_rn(__fmul_rn(scale, sv[j][e]), word_half(wv[j], e));
            }
            reinterpret_cast<uint4*>(normed)[c] = make_uint4(
                pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
        }
    }
}

// The LoRA shrink of the projections that read the normed rows (q/k/v, or gate/up), computed by
// extra blocks of the add + RMSNorm launch instead of a launch of its own or inside the GEMV:
// t_z[m, j] = normed[m, :] · A_{m, slot0 + z}[j, :] for z < count, j < r (the rows' ranks at that
// slot), each dot split over k into `parts` chunks written as partials t + c * part_stride +
// z * t_zstride + m * t_stride + j (BgmvPlan's scratch layout), which the GEMV's epilogue expand
// sums in order. `bpr` blocks per row, each warp one (z, j, chunk) unit at a time. Its module
// lookups and A's DRAM reads (into L2) happen before the programmatic-launch wait, during the
// previous kernel; after it, the block recomputes its row's norm (bit for bit what the norm blocks
// write, same code) into shared memory and reads A from L2. The split is for the critical path:
// the GEMV after this launch waits for its slowest block, and on the H200 (session 21) the whole
// dots (8 KB of A per warp, 128 KB per block at q/k/v's 12 blocks) cost 5.3 us per layer of
// batch-1 decode with an adapter over the norm alone; chunks spread A over `parts` times the
// blocks and shorten each warp's chain of loads, but every block also recomputes the norm and
// needs room beside the previous GEMV's: 2 parts ran 347 tok/s against 340 for 1, 335 for 3, 337
// for 4 and 310 for 8 (the host's default, BgmvPlan::norm_shrink).
struct NormShrink {
    const u64* row_tables;
    float* t;
    u32 slot0, count, max_rank, t_stride, t_zstride, bpr, parts, part_stride;
};

__device__ __forceinline__ void norm_shrink_block(const u16* __restrict__ x,
                                                  const u16* __restrict__ y,
                                                  const u16* __restrict__ w, float eps, u32 n,
                                                  const NormShrink& sh, u32 m, u32 part) {
    __shared__ __align__(16) u16 s_normed[NORM_VEC * 8 * NORM_THREADS];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, nw = blockDim.x >> 5;
    // Unit u: (slot z, rank j) = u / parts, chunk c = u % parts of `len` values (a multiple of 8,
    // so every chunk starts on a 16-byte boundary of A's row and of the normed row).
    const u32 units = sh.count * sh.max_rank * sh.parts;
    const u32 len = ((n + sh.parts - 1) / sh.parts + 7u) & ~7u;
    for (u32 u = part * nw + warp; u < units; u += sh.bpr * nw) {
        const u32 zj = u / sh.parts, c = u % sh.parts;
        const RowLora l = lookup(sh.row_tables, m, sh.slot0 + zj / sh.max_rank);
        const u32 j = zj % sh.max_rank, k0 = min(n, c * len), k1 = min(n, k0 + len);
        if (j < l.r) {
            const u8* a = reinterpret_cast<const u8*>(l.a + (u64)j * n + k0);
            for (u32 off = 128 * lane; off < 2 * (k1 - k0); off += 32 * 128) {
                prefetch_l2(a + off);
            }
        }
    }
    pdl_wait();
    add_rms_norm_vec(x + (u64)m * n, y ? y + (u64)m * n : nullptr, w, eps, n, nullptr, s_normed);
    __syncthreads();
    const uint4* xv = reinterpret_cast<const uint4*>(s_normed);
    for (u32 u = part * nw + warp; u < units; u += sh.bpr * nw) {
        const u32 zj = u / sh.parts, c = u % sh.parts;
        const u32 z = zj / sh.max_rank, j = zj % sh.max_rank;
        const RowLora l = lookup(sh.row_tables, m, sh.slot0 + z);
        if (j >= l.r || l.r > sh.t_stride) {
            continue;
        }
        const u32 k0 = min(n, c * len), k1 = min(n, k0 + len);
        const float acc = warp_dot_a(
            l.a + (u64)j * n + k0, k1 - k0, lane, [&](u32 q) { return xv[(k0 >> 3) + q]; },
            [&](u32 q) { return bf16_f(s_normed[k0 + q]); });
        if (lane == 0) {
            sh.t[(u64)c * sh.part_stride + (u64)z * sh.t_zstride + (u64)m * sh.t_stride + j] = acc;
        }
    }
}

// Blocks 0 .. rows: one per row. out (2, rows, n): out[0] = x + y (bf16, as candle's add), out[1]
// = rmsnorm(out[0]) * w. y may be null (then out[0] = x). With sh_bpr > 0 the grid has rows ·
// sh_bpr more blocks, which compute the LoRA shrink of the normed rows (norm_shrink_block; the
// host launches them only for rows the vectorized path takes).
// Rows of n % 8 == 0 values (up to NORM_VEC chunks per thread) on 16-byte boundaries take the
// vectorized path: at batch 1 this kernel's norm is one block, whose time is its chain of memory
// round trips (the element-by-element loop took ~17 µs per call on the H200, ncu; two calls per
// layer).
extern "C" __global__ void add_rms_norm_bf16(const u16* __restrict__ x, const u16* __restrict__ y,
                                             const u16* __restrict__ w, float eps, u32 rows, u32 n,
                                             u16* __restrict__ out,
                                             const u64* __restrict__ sh_tables, float* sh_t,
                                             u32 sh_slot0, u32 sh_count, u32 sh_max_rank,
                                             u32 sh_t_stride, u32 sh_t_zstride, u32 sh_bpr,
                                             u32 sh_parts, u32 sh_part_stride) {
    pdl_trigger();
    if (blockIdx.x >= rows) {
        const NormShrink sh = {sh_tables,    sh_t,   sh_slot0,      sh_count, sh_max_rank,
                               sh_t_stride, sh_t_zstride, sh_bpr, sh_parts, sh_part_stride};
        const u32 b = blockIdx.x - rows;
        norm_shrink_block(x, y, w, eps, n, sh, b / sh.bpr, b % sh.bpr);
        return;
    }
    pdl_wait();
    const u32 row = blockIdx.x;
    const u16* xr = x + (u64)row * n;
    const u16* yr = y ? y + (u64)row * n : nullptr;
    u16* sum = out + (u64)row * n;
    u16* normed = out + (u64)rows * n + (u64)row * n;
    const u32 nv = n >> 3;
    const bool vec = (n & 7u) == 0 && nv <= NORM_VEC * blockDim.x &&
                     ((reinterpret_cast<u64>(xr) | reinterpret_cast<u64>(yr) |
                       reinterpret_cast<u64>(w) | reinterpret_cast<u64>(sum) |
                       reinterpret_cast<u64>(normed)) & 15ull) == 0;
    if (vec) {
        add_rms_norm_vec(xr, yr, w, eps, n, sum, normed);
        return;
    }
    float acc = 0.f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float s = yr ? rbf(__fadd_rn(bf16_f(xr[i]), bf16_f(yr[i]))) : bf16_f(xr[i]);
        sum[i] = f32_to_bf16(s);
        acc = fmaf(s, s, acc);
    }
    const float scale = rsqrtf(block_sum(acc) / (float)n + eps);
    // Each thread re-reads only the sums it wrote itself: no barrier needed for them.
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        normed[i] = f32_to_bf16(__fmul_rn(__fmul_rn(scale, bf16_f(sum[i])), bf16_f(w[i])));
    }
}

// out[r] = table[ids[r]]: the token embeddings of a decode step's rows, one block per row. The
// ids are read on the device, so a captured step (step_graph_cuda) gathers each replay's tokens
// from the buffer the host rewrites (candle's index_select uploads its shape from host memory at
// every call, which a graph would replay stale). An id past the vocabulary gives a zero row
// instead of a read outside the table (the host validates ids before a step).
extern "C" __global__ void embed_rows_bf16(const u16* __restrict__ table, const u32* __restrict__ ids,
                                           u32 vocab, u32 hidden, u16* __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    const u32 id = ids[blockIdx.x];
    u16* o = out + (u64)blockIdx.x * hidden;
    if (id >= vocab) {
        for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0;
        return;
    }
    const u16* src = table + (u64)id * hidden;
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = src[i];
}

// out = silu(gate) * up, elementwise over n values.
extern "C" __global__ void silu_mul_bf16(const u16* __restrict__ gate, const u16* __restrict__ up,
                                         u64 n, u16* __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const float g = bf16_f(gate[i]);
        const float s = rbf(__fdiv_rn(g, __fadd_rn(1.f, __expf(-g))));
        out[i] = f32_to_bf16(__fmul_rn(s, bf16_f(up[i])));
    }
}

// The KV table's words per sequence: position | capacity << 32, then K and V per layer.
__device__ __forceinline__ const u64* kv_row(const u64* table, u32 layers, u32 row) {
    return table + (u64)row * (1 + 2 * (u64)layers);
}

// One block per sequence (row). q (rows, nh*hd), k and v (rows, nkv*hd), cos/sin (positions,
// hd/2). Writes RoPE(q) to q_out (rows, nh*hd) and RoPE(k), v into the caches of `layer` at the
// row's position. RoPE is the non-interleaved (rotate-half) form of transformers' Llama.
extern "C" __global__ void rope_kv_bf16(const u16* __restrict__ q, const u16* __restrict__ k,
                                        const u16* __restrict__ v, const u16* __restrict__ cosb,
                                        const u16* __restrict__ sinb,
                                        const u64* __restrict__ table, u32 layers, u32 layer,
                                        u32 nh, u32 nkv, u32 hd, u16* __restrict__ q_out) {
    const u32 row = blockIdx.x;
    const u64* t = kv_row(table, layers, row);
    const u32 pos = (u32)(t[0] & 0xffffffffu);
    const u64 cap = t[0] >> 32;
    u16* kc = reinterpret_cast<u16*>(t[1 + 2 * layer]);
    u16* vc = reinterpret_cast<u16*>(t[2 + 2 * layer]);
    const u32 half = hd / 2;
    const u16* cs = cosb + (u64)pos * half;
    const u16* sn = sinb + (u64)pos * half;
    // Pairs (i, i + hd/2) of every q head, then every k head.
    const u32 pairs = (nh + nkv) * half;
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        const u32 head = p / half, i = p % half;
        const float c = bf16_f(cs[i]), s = bf16_f(sn[i]);
        const bool is_q = head < nh;
        const u16* src = is_q ? q + ((u64)row * nh + head) * hd
                              : k + ((u64)row * nkv + (head - nh)) * hd;
        const float2 r = rope_pair(bf16_f(src[i]), bf16_f(src[i + half]), c, s);
        const u16 lo = f32_to_bf16(r.x);
        const u16 hi = f32_to_bf16(r.y);
        u16* dst = is_q ? q_out + ((u64)row * nh + head) * hd
                        : kc + ((u64)(head - nh) * cap + pos) * hd;
        dst[i] = lo;
        dst[i + half] = hi;
    }
    for (u32 e = threadIdx.x; e < nkv * hd; e += blockDim.x) {
        const u32 head = e / hd, d = e % hd;
        vc[((u64)head * cap + pos) * hd + d] = v[(u64)row * nkv * hd + e];
    }
}

// The merge of one (row, head, dim) over the splits' partial outputs (log-sum-exp weights; an
// empty split has max -inf and weight 0). L2 loads: other blocks of the launch may have written
// them.
__device__ __forceinline__ u16 combine_splits(const float* part_o, const float* part_ml,
                                              u32 splits, u32 nh, u32 hd, u32 row, u32 head,
                                              u32 d) {
    float m = -INFINITY;
    for (u32 s = 0; s < splits; ++s) {
        m = fmaxf(m, __ldcg(part_ml + (((u64)row * splits + s) * nh + head) * 2));
    }
    float l = 0.f, o = 0.f;
    for (u32 s = 0; s < splits; ++s) {
        const u64 base = ((u64)row * splits + s) * nh + head;
        const float ms = __ldcg(part_ml + base * 2);
        if (ms == -INFINITY) continue;
        const float w = __expf(ms - m);
        l = fmaf(__ldcg(part_ml + base * 2 + 1), w, l);
        o = fmaf(__ldcg(part_o + base * hd + d), w, o);
    }
    return f32_to_bf16(o / l);
}

// Decode attention geometry: threads per block, and the largest group (query heads per KV head).
// A K or V row of head_dim bf16 is read by DV = head_dim / 8 threads, 16 bytes each (coalesced);
// the block's ATT_THREADS / DV position slots walk the positions independently, ATT_PREFETCH
// positions per slot loaded together.
#define ATT_THREADS 256
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_MAX_GROUP 8
#define ATT_PREFETCH 8
// Shared memory of the merge over the warps (each warp first merges its own slots with
// shuffles): ATT_WARPS * group * head_dim f32, at most 32 KB (group * head_dim <= 1024, which
// the host checks), plus the maxima and sums of every (warp, head).
#define ATT_MERGE_VALUES (ATT_WARPS * 1024)
#define ATT_MERGE_ML (2 * ATT_WARPS * ATT_MAX_GROUP)

// Grid (nkv, rows, splits). Block (kvh, row, split) attends the `group` query heads of KV head kvh
// over the split's share of the row's visible positions [first, pos]. Thread t is position slot
// t / DV and owns dims [8 (t % DV), +8) of every head of the group: per position it loads 16
// bytes of K and of V (ATT_PREFETCH positions' loads issued together, so a slot waits for memory
// once per ATT_PREFETCH positions, not per position: at batch 1 the launch is a few blocks whose
// time is each warp's chain of instructions and memory round trips), finishes the group's scores
// with shuffles across the slot's DV threads, and updates its own running max, sum and output
// (the online softmax of Milakov & Gimelshein 2018, as in FlashAttention). The slots are merged at the end with
// log-sum-exp weights, first within each warp (shuffles), then across the warps (shared memory).
// With one split the block writes the normalized bf16 output; with several, the unnormalized f32
// output with its max and sum, for attention_combine.
//
// CL (decode_attention_cl_*, decode_attention_rope_cl_*; launched with the splits of a (kvh,
// row) as one thread-block cluster, at most 8): the splits merge through distributed shared
// memory instead of global partials and attention_combine's launch. Each block leaves its
// unnormalized output and (max, sum) per head in its shared memory, one cluster barrier, then
// block `split` merges outputs split·256 + t, + splits·256, .. reading every block's partials in
// split order with combine_splits' arithmetic (so the same bits as the combine launch for the
// same splits), and a second barrier keeps each block's shared memory alive until the others
// have read it. Saves the combine launch (3.9 µs per layer at batch 1, ncu, session 16) and the
// partials' allocation.
//
// ROPE (decode_attention_rope_*): q is the projection's output before RoPE, and the block applies
// rope_kv's arithmetic itself (same roundings, so the same bits), once per block into shared
// memory, one (i, i + hd/2) pair per thread; the block whose split holds the new position first
// writes RoPE(k) and v there (its own loads then see them after the barrier; no other block reads
// that position). One launch instead of two: at batch 1 rope_kv was a one-block kernel of ~6.5 µs
// per layer (ncu).
template <int G, bool ROPE, bool CL = false>
__device__ __forceinline__ void decode_attention(
    const u16* __restrict__ q, const u64* __restrict__ table, u32 layers, u32 layer, u32 nh,
    u32 nkv, u32 hd, u32 window, float scale, u16* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_ml,
    const u16* __restrict__ knew = nullptr,
    const u16* __restrict__ vnew = nullptr, const u16* __restrict__ cosb = nullptr,
    const u16* __restrict__ sinb = nullptr) {
    pdl_trigger();
    const u32 kvh = blockIdx.x, row = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    pdl_wait();
    const u64* t = kv_row(table, layers, row);
    const u32 pos = (u32)(t[0] & 0xffffffffu);
    const u64 cap = t[0] >> 32;
    u16* kc = reinterpret_cast<u16*>(t[1 + 2 * layer]) + (u64)kvh * cap * hd;
    u16* vc = reinterpret_cast<u16*>(t[2 + 2 * layer]) + (u64)kvh * cap * hd;
    const u32 first = (window > 0 && pos >= window) ? pos - window + 1 : 0;
    const u32 total = pos + 1 - first;
    const u32 per = (total + splits - 1) / splits;
    const u32 lo = first + min(total, split * per);
    const u32 hi = first + min(total, (split + 1) * per);

    const u32 dv = hd / 8;                 // threads per position (divides 32)
    const u32 slots = ATT_THREADS / dv;
    const u32 slot = threadIdx.x / dv, part = threadIdx.x % dv;
    const u16* qrow = q + ((u64)row * nh + (u64)kvh * G) * hd + part * 8;
    // q, k and v come from the previous kernel: loads that stay after the wait (ld_after_wait).
    float qr[G][8];
    if (ROPE) {
        // RoPE once per block with rope_kv's rope_pair (so the same bits), one (dim c, dim
        // c + hd/2) pair of a head row per thread at a time. Every slot used to rotate its own
        // copy of the group's q (32 values per thread with 4 heads): at batch 1 the launch is
        // latency-bound on each warp's instruction stream, so per-block work that every warp
        // repeats is time.
        __shared__ __align__(16) float s_q[1024];  // the group's rotated q · scale
        const u32 half = hd >> 1;
        const u16* cp = cosb + (u64)pos * half;
        const u16* sp = sinb + (u64)pos * half;
        // The pair at column c of the head row at `src` (written by the previous kernel).
        auto rotate = [&](const u16* src, u32 c) {
            return rope_pair(bf16_f(ld_after_wait_u16(src + c)),
                             bf16_f(ld_after_wait_u16(src + c + half)), bf16_f(cp[c]),
                             bf16_f(sp[c]));
        };
        const u16* qg = q + ((u64)row * nh + (u64)kvh * G) * hd;
        for (u32 i = threadIdx.x; i < G * half; i += ATT_THREADS) {
            const u32 g = i / half, c = i % half;
            const float2 r = rotate(qg + (u64)g * hd, c);
            s_q[g * hd + c] = rbf(r.x) * scale;
            s_q[g * hd + c + half] = rbf(r.y) * scale;
        }
        if (lo <= pos && pos < hi) {
            // This split holds the new position: its K (rotated) and V go into the caches first
            // (the block's loads below see them after the barrier).
            const u64 src = ((u64)row * nkv + kvh) * hd;
            for (u32 c = threadIdx.x; c < half; c += ATT_THREADS) {
                const float2 r = rotate(knew + src, c);
                kc[(u64)pos * hd + c] = f32_to_bf16(r.x);
                kc[(u64)pos * hd + c + half] = f32_to_bf16(r.y);
            }
            for (u32 c = threadIdx.x; c < hd; c += ATT_THREADS) {
                vc[(u64)pos * hd + c] = ld_after_wait_u16(vnew + src + c);
            }
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[g][e] = s_q[g * hd + part * 8 + e];
        }
    } else {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const uint4 v = ld_after_wait(reinterpret_cast<const uint4*>(qrow + (u64)g * hd));
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                qr[g][2 * b] = __uint_as_float(w[b] << 16) * scale;
                qr[g][2 * b + 1] = __uint_as_float(w[b] & 0xffff0000u) * scale;
            }
        }
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
    }
    // Slot s takes positions lo + s, lo + s + slots, .. in order; j0 is uniform across the block,
    // so every lane of a warp reaches the shuffles below.
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (u32 j0 = lo; j0 < hi; j0 += slots * ATT_PREFETCH) {
        uint4 kb[ATT_PREFETCH], vb[ATT_PREFETCH];
#pragma unroll
        for (int p = 0; p < ATT_PREFETCH; ++p) {
            const u32 j = j0 + p * slots + slot;
            kb[p] = j < hi ? *reinterpret_cast<const uint4*>(kc + (u64)j * hd + part * 8) : zero;
            vb[p] = j < hi ? *reinterpret_cast<const uint4*>(vc + (u64)j * hd + part * 8) : zero;
        }
#pragma unroll
        for (int p = 0; p < ATT_PREFETCH; ++p) {
            if (j0 + p * slots >= hi) {
                break;  // uniform: no slot has a position from here on
            }
            const bool valid = j0 + p * slots + slot < hi;
            const u32 kw[4] = {kb[p].x, kb[p].y, kb[p].z, kb[p].w};
            const u32 vw[4] = {vb[p].x, vb[p].y, vb[p].z, vb[p].w};
            float kf[8], vf[8];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                kf[2 * b] = __uint_as_float(kw[b] << 16);
                kf[2 * b + 1] = __uint_as_float(kw[b] & 0xffff0000u);
                vf[2 * b] = __uint_as_float(vw[b] << 16);
                vf[2 * b + 1] = __uint_as_float(vw[b] & 0xffff0000u);
            }
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s = fmaf(qr[g][e], kf[e], s);
                // The slot's dv threads are consecutive lanes of one warp (dv divides 32).
                for (u32 o = dv >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, dv);
                if (!valid) continue;
                const float m_new = fmaxf(m[g], s);
                const float corr = __expf(m[g] - m_new);  // 0 while m is -inf
                const float p_ = __expf(s - m_new);
                l[g] = fmaf(l[g], corr, p_);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(acc[g][e], corr, p_ * vf[e]);
                m[g] = m_new;
            }
        }
    }
    // Merge the warp's slots (lanes dv, 2 dv, .. apart hold the same dims): the warp's max, each
    // slot's weight exp(m - max) (0 for a slot that saw no position), the weighted sums.
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float mw = m[g];
        for (u32 o = dv; o < 32; o <<= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, o));
        const float w = m[g] == -INFINITY ? 0.f : __expf(m[g] - mw);
        float lw = l[g] * w;
        for (u32 o = dv; o < 32; o <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, o);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float v = acc[g][e] * w;
            for (u32 o = dv; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[g][e] = v;
        }
        m[g] = mw;
        l[g] = lw;
    }
    // Then the warps: warp w's (m, l) per head and its output values go to shared memory.
    __shared__ float s_o[ATT_MERGE_VALUES];
    __shared__ float s_ml[ATT_MERGE_ML];
    // CL: the block's merged partials (unnormalized output, then (max, sum) per head).
    __shared__ float s_po[CL ? 1024 : 1];
    __shared__ float s_pml[CL ? 2 * ATT_MAX_GROUP : 1];
    if (lane < dv) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int e = 0; e < 8; ++e) s_o[((u64)warp * G + g) * hd + part * 8 + e] = acc[g][e];
            if (part == 0) {
                s_ml[(warp * G + g) * 2] = m[g];
                s_ml[(warp * G + g) * 2 + 1] = l[g];
            }
        }
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < G * hd; e += ATT_THREADS) {
        const u32 g = e / hd, d = e % hd;
        float mx = -INFINITY;
        for (u32 s = 0; s < ATT_WARPS; ++s) mx = fmaxf(mx, s_ml[(s * G + g) * 2]);
        float lsum = 0.f, o = 0.f;
        if (mx != -INFINITY) {
            for (u32 s = 0; s < ATT_WARPS; ++s) {
                const float w = __expf(s_ml[(s * G + g) * 2] - mx);
                lsum = fmaf(s_ml[(s * G + g) * 2 + 1], w, lsum);
                o = fmaf(s_o[((u64)s * G + g) * hd + d], w, o);
            }
        }
        const u32 head = kvh * G + g;
        if (splits == 1) {
            out[((u64)row * nh + head) * hd + d] = f32_to_bf16(o / lsum);
        } else if (CL) {
            s_po[e] = o;
            if (d == 0) {
                s_pml[g * 2] = mx;
                s_pml[g * 2 + 1] = lsum;
            }
        } else {
            part_o[(((u64)row * splits + split) * nh + head) * hd + d] = o;
            if (d == 0) {
                float* ml = part_ml + (((u64)row * splits + split) * nh + head) * 2;
                ml[0] = mx;
                ml[1] = lsum;
            }
        }
    }
    if (CL && splits > 1) {
        cluster_sync_all();
        for (u32 e = split * ATT_THREADS + threadIdx.x; e < G * hd; e += splits * ATT_THREADS) {
            const u32 g = e / hd, d = e % hd;
            float mc = -INFINITY;
            for (u32 s = 0; s < splits; ++s) mc = fmaxf(mc, ld_cluster_f32(s_pml + g * 2, s));
            float lc = 0.f, oc = 0.f;
            for (u32 s = 0; s < splits; ++s) {
                const float ms = ld_cluster_f32(s_pml + g * 2, s);
                if (ms == -INFINITY) continue;
                const float w = __expf(ms - mc);
                lc = fmaf(ld_cluster_f32(s_pml + g * 2 + 1, s), w, lc);
                oc = fmaf(ld_cluster_f32(s_po + e, s), w, oc);
            }
            out[((u64)row * nh + kvh * G + g) * hd + d] = f32_to_bf16(oc / lc);
        }
        cluster_sync_all();
    }
}

// Entries of group size G: decode_attention{NAME}_g{G}_bf16 and decode_attention_rope{NAME}_g{G}_bf16,
// with NAME empty (splits merged by attention_combine) or _cl (CL: merged in the cluster; part_o
// and part_ml unused).
#define DECODE_ATTENTION_ENTRY(G, NAME, CL)                                                      \
    extern "C" __global__ void decode_attention##NAME##_g##G##_bf16(                            \
        const u16* __restrict__ q, const u64* __restrict__ table, u32 layers, u32 layer, u32 nh, \
        u32 nkv, u32 hd, u32 window, float scale, u16* __restrict__ out,                         \
        float* __restrict__ part_o, float* __restrict__ part_ml) {                               \
        decode_attention<G, false, CL>(q, table, layers, layer, nh, nkv, hd, window, scale, out, \
                                       part_o, part_ml);                                         \
    }                                                                                            \
    extern "C" __global__ void decode_attention_rope##NAME##_g##G##_bf16(                       \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,         \
        const u16* __restrict__ cosb, const u16* __restrict__ sinb,                              \
        const u64* __restrict__ table, u32 layers, u32 layer, u32 nh, u32 nkv, u32 hd,           \
        u32 window, float scale, u16* __restrict__ out, float* __restrict__ part_o,              \
        float* __restrict__ part_ml) {                                                           \
        decode_attention<G, true, CL>(q, table, layers, layer, nh, nkv, hd, window, scale, out,  \
                                      part_o, part_ml, k, v, cosb, sinb);                        \
    }
#define DECODE_ATTENTION_ENTRIES(G)      \
    DECODE_ATTENTION_ENTRY(G, , false)   \
    DECODE_ATTENTION_ENTRY(G, _cl, true)

DECODE_ATTENTION_ENTRIES(1)
DECODE_ATTENTION_ENTRIES(2)
DECODE_ATTENTION_ENTRIES(3)
DECODE_ATTENTION_ENTRIES(4)
DECODE_ATTENTION_ENTRIES(5)
DECODE_ATTENTION_ENTRIES(6)
DECODE_ATTENTION_ENTRIES(7)
DECODE_ATTENTION_ENTRIES(8)

// Grid (nh, rows), hd threads: merges the splits' partial outputs of one head (log-sum-exp
// weights; an empty split has max -inf and weight 0).
extern "C" __global__ void attention_combine_bf16(const float* __restrict__ part_o,
                                                  const float* __restrict__ part_ml, u32 splits,
                                                  u32 nh, u32 hd, u16* __restrict__ out) {
    pdl_trigger();
    pdl_wait();
    const u32 head = blockIdx.x, row = blockIdx.y, d = threadIdx.x;
    if (d >= hd) return;
    out[((u64)row * nh + head) * hd + d] =
        combine_splits(part_o, part_ml, splits, nh, hd, row, head, d);
}
