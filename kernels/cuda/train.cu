// Fused kernels of the QLoRA training step (issue 6), forward and backward of the ops candle runs as
// chains of elementwise/reduction kernels with an f32 copy at each step:
//  - rms_norm_fwd/bwd: LlamaRMSNorm (f32 statistics, bf16(x * rstd) * w) and its input gradient
//    dx = rstd * (dh - xhat * mean(dh * xhat)), dh = dy * w (w is frozen: no weight gradient);
//  - rope_heads: non-interleaved RoPE of a projection's (b, t, heads*hd) output into attention's
//    (b, heads, t, hd) layout; `sign` -1 rotates back into the projection's layout, which is the
//    backward (the rotation is orthogonal);
//  - causal_softmax_fwd/bwd: scale, causal (+ sliding window) mask and softmax of attention scores
//    in f32, probabilities stored bf16; backward ds = scale * p * (dp - sum(p * dp)) — the masked
//    eager attention of transformers with `softmax(..., dtype=float32)`;
//  - swiglu_fwd/bwd: silu(g) * u and its gradients (dg = dy * u * s * (1 + g * (1 - s)), du = dy *
//    silu(g), s = sigmoid(g));
//  - add_bf16 and swap12_bf16: the hand-written layer's sums and attention's head transposes;
//  - adamw_f32: one AdamW update (Loshchilov & Hutter 2019, torch.optim.AdamW's formula) of a
//    parameter and its moments in place, and adamw_multi_f32 / sumsq_multi_f32: the update and
//    the squared L2 norm for gradient clipping over many tensors in one launch.
// Reductions and every intermediate are f32; only stored activations are bf16.

#include "bf16.cuh"

__device__ __forceinline__ float block_sum(float v, float* part) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float s = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        s = warp_sum(s);
        if (threadIdx.x == 0) part[0] = s;
    }
    __syncthreads();
    const float r = part[0];
    __syncthreads();  // part is reused by the caller's next reduction
    return r;
}

// One block per row of x (rows, n). y = bf16(bf16(x * rstd) * w), as transformers' LlamaRMSNorm
// (hidden_states.to(input_dtype) before the weight).
extern "C" __global__ void rms_norm_fwd_bf16(const u16* __restrict__ x, const u16* __restrict__ w,
                                             float eps, u32 n, u16* __restrict__ y) {
    __shared__ float part[32];
    const u16* xr = x + (u64)blockIdx.x * n;
    u16* yr = y + (u64)blockIdx.x * n;
    float acc = 0.f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = bf16_f(xr[i]);
        acc = fmaf(v, v, acc);
    }
    const float rstd = rsqrtf(block_sum(acc, part) / (float)n + eps);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float h = bf16_f(f32_to_bf16(bf16_f(xr[i]) * rstd));
        yr[i] = f32_to_bf16(h * bf16_f(w[i]));
    }
}

// One block per row: dx from dy, recomputing rstd from x (cheaper than keeping it).
extern "C" __global__ void rms_norm_bwd_bf16(const u16* __restrict__ x, const u16* __restrict__ w,
                                             const u16* __restrict__ dy, float eps, u32 n,
                                             u16* __restrict__ dx) {
    __shared__ float part[32];
    const u64 off = (u64)blockIdx.x * n;
    float ss = 0.f, dot = 0.f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = bf16_f(x[off + i]);
        ss = fmaf(v, v, ss);
        dot = fmaf(bf16_f(dy[off + i]) * bf16_f(w[i]), v, dot);
    }
    const float rstd = rsqrtf(block_sum(ss, part) / (float)n + eps);
    // mean(dh * xhat) = rstd * mean(dh * x)
    const float c = block_sum(dot, part) * rstd / (float)n;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float xhat = bf16_f(x[off + i]) * rstd;
        const float dh = bf16_f(dy[off + i]) * bf16_f(w[i]);
        dx[off + i] = f32_to_bf16(rstd * (dh - xhat * c));
    }
}

// Key j is visible from query i: causal, and within the sliding window when window > 0.
__device__ __forceinline__ bool visible(u32 i, u32 j, u32 window) {
    return j <= i && (window == 0 || i < window || j > i - window);
}

#define SOFTMAX_WARPS 8

// Scores (rows, t): row r is query position r % t (rows = batch * heads * t, queries of one head
// consecutive). One warp per row.
extern "C" __global__ void causal_softmax_fwd_bf16(const u16* __restrict__ s, u64 rows, u32 t,
                                                   u32 window, float scale,
                                                   u16* __restrict__ p) {
    const u64 row = (u64)blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u32 lane = threadIdx.x & 31, i = (u32)(row % t);
    const u16* sr = s + row * t;
    u16* pr = p + row * t;
    float mx = -INFINITY;
    for (u32 j = lane; j < t; j += 32)
        if (visible(i, j, window)) mx = fmaxf(mx, bf16_f(sr[j]) * scale);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (u32 j = lane; j < t; j += 32)
        if (visible(i, j, window)) sum += __expf(bf16_f(sr[j]) * scale - mx);
    const float inv = 1.f / warp_sum(sum);
    for (u32 j = lane; j < t; j += 32)
        pr[j] = visible(i, j, window) ? f32_to_bf16(__expf(bf16_f(sr[j]) * scale - mx) * inv) : 0;
}

// ds = scale * p * (dp - sum_j p_j dp_j); masked entries have p = 0 and get 0.
extern "C" __global__ void causal_softmax_bwd_bf16(const u16* __restrict__ p,
                                                   const u16* __restrict__ dp, u64 rows, u32 t,
                                                   float scale, u16* __restrict__ ds) {
    const u64 row = (u64)blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u32 lane = threadIdx.x & 31;
    const u64 off = row * t;
    float dot = 0.f;
    for (u32 j = lane; j < t; j += 32) dot = fmaf(bf16_f(p[off + j]), bf16_f(dp[off + j]), dot);
    dot = warp_sum(dot);
    for (u32 j = lane; j < t; j += 32) {
        const float pj = bf16_f(p[off + j]);
        ds[off + j] = f32_to_bf16(scale * pj * (bf16_f(dp[off + j]) - dot));
    }
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// Elementwise kernels move 8 bf16 (16 bytes) per thread and iteration when every pointer is
// 16-byte aligned (candle's allocations are; a view at an odd offset takes the scalar loop), the
// rest one value at a time: the scalar loop of 2-byte loads streamed at ~1.4 TB/s (swiglu over a
// layer's (4·512, 14336) at 0.129 ms, gpu-train-profile's pieces), which is under half of HBM's.
__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c) {
    return (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) & 15u) == 0;
}
__device__ __forceinline__ u32 bf16_pair(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ u64 grid_tid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_stride() { return (u64)gridDim.x * blockDim.x; }

__device__ __forceinline__ float swiglu_val(float gv, float uv) { return gv * sigmoid(gv) * uv; }

// y = op(a, b) over n bf16 values, in f32 with one rounding: 8 values per thread and iteration
// through 16-byte accesses when the pointers allow, the rest one at a time.
template <class Op>
__device__ __forceinline__ void map2_bf16(const u16* __restrict__ a, const u16* __restrict__ b,
                                          u64 n, u16* __restrict__ y, Op op) {
    const u64 n8 = aligned16(a, b, y) ? n / 8 : 0;
    for (u64 i = grid_tid(); i < n8; i += grid_stride()) {
        const uint4 av = reinterpret_cast<const uint4*>(a)[i];
        const uint4 bv = reinterpret_cast<const uint4*>(b)[i];
        const u32 aw[4] = {av.x, av.y, av.z, av.w}, bw[4] = {bv.x, bv.y, bv.z, bv.w};
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            o[j] = bf16_pair(op(bf16_lo(aw[j]), bf16_lo(bw[j])),
                             op(bf16_hi(aw[j]), bf16_hi(bw[j])));
        }
        reinterpret_cast<uint4*>(y)[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
    for (u64 i = 8 * n8 + grid_tid(); i < n; i += grid_stride()) {
        y[i] = f32_to_bf16(op(bf16_f(a[i]), bf16_f(b[i])));
    }
}

extern "C" __global__ void swiglu_fwd_bf16(const u16* __restrict__ g, const u16* __restrict__ u,
                                           u64 n, u16* __restrict__ y) {
    map2_bf16(g, u, n, y, swiglu_val);
}

// d gate and d up of one value.
__device__ __forceinline__ void swiglu_grad(float gv, float uv, float d, float& dg, float& du) {
    const float s = sigmoid(gv);
    dg = d * uv * s * (1.f + gv * (1.f - s));
    du = d * gv * s;
}

// out (2, n): out[0] = d gate, out[1] = d up.
extern "C" __global__ void swiglu_bwd_bf16(const u16* __restrict__ g, const u16* __restrict__ u,
                                           const u16* __restrict__ dy, u64 n,
                                           u16* __restrict__ out) {
    const u64 n8 = aligned16(g, u, dy) && aligned16(out, out + n, out) ? n / 8 : 0;
    for (u64 i = grid_tid(); i < n8; i += grid_stride()) {
        const uint4 gv = reinterpret_cast<const uint4*>(g)[i];
        const uint4 uv = reinterpret_cast<const uint4*>(u)[i];
        const uint4 dv = reinterpret_cast<const uint4*>(dy)[i];
        const u32 gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
        const u32 dw[4] = {dv.x, dv.y, dv.z, dv.w};
        u32 og[4], ou[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float g0, u0, g1, u1;
            swiglu_grad(bf16_lo(gw[j]), bf16_lo(uw[j]), bf16_lo(dw[j]), g0, u0);
            swiglu_grad(bf16_hi(gw[j]), bf16_hi(uw[j]), bf16_hi(dw[j]), g1, u1);
            og[j] = bf16_pair(g0, g1);
            ou[j] = bf16_pair(u0, u1);
        }
        reinterpret_cast<uint4*>(out)[i] = make_uint4(og[0], og[1], og[2], og[3]);
        reinterpret_cast<uint4*>(out + n)[i] = make_uint4(ou[0], ou[1], ou[2], ou[3]);
    }
    for (u64 i = 8 * n8 + grid_tid(); i < n; i += grid_stride()) {
        float dg, du;
        swiglu_grad(bf16_f(g[i]), bf16_f(u[i]), bf16_f(dy[i]), dg, du);
        out[i] = f32_to_bf16(dg);
        out[n + i] = f32_to_bf16(du);
    }
}

// y = a + b, each sum in f32 rounded once to bf16 (the correctly rounded bf16 sum, as candle's
// bf16 addition): the residual stream and the gradient sums of the hand-written layer, where
// candle's binary kernel ran at ~0.9 TB/s (0.057 ms per (4·512, 4096) sum, 7 per layer).
extern "C" __global__ void add_bf16(const u16* __restrict__ a, const u16* __restrict__ b, u64 n,
                                    u16* __restrict__ y) {
    map2_bf16(a, b, n, y, [](float p, float q) { return p + q; });
}

// y (b, c, a, d) = x (b, a, c, d) with dims 1 and 2 swapped, in 16-byte pieces (d % 8 == 0, both
// 16-byte aligned, fewer than 2^32 pieces: the host checks): attention's head transposes, which
// candle's strided copy ran at ~0.34 TB/s (0.095 ms per (4, 512, 32, 128)). Consecutive threads
// write consecutive pieces of y and read d-long runs of x.
extern "C" __global__ void swap12_bf16(const u16* __restrict__ x, u32 b, u32 a, u32 c, u32 d,
                                       u16* __restrict__ y) {
    const u32 dc = d / 8;
    const u32 pieces = b * a * c * dc;
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    uint4* ys = reinterpret_cast<uint4*>(y);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < pieces; i += gridDim.x * blockDim.x) {
        const u32 p = i % dc;
        u32 r = i / dc;
        const u32 ia = r % a;
        r /= a;
        const u32 ic = r % c;
        const u32 ib = r / c;
        ys[i] = xs[((ib * a + ia) * c + ic) * dc + p];
    }
}

// The causal softmax and its backward with each lane holding V 16-byte pieces of its warp's row in
// registers (t % 8 == 0, t <= 256 V, rows 16-byte aligned: the host checks, else the scalar
// kernels above): one read and one write of the row instead of three reads of 2-byte values, and
// the pieces wholly above the diagonal are neither read nor computed, only zeroed (half of a
// causal row on average). The scalar kernels moved ~1.3 TB/s (0.11 ms forward and 0.156 ms
// backward over a layer's (4·32·512, 512) probabilities: gpu-train-profile's pieces).
template <int V>
__device__ __forceinline__ void causal_softmax_fwd_vec(const u16* __restrict__ s, u64 rows, u32 t,
                                                       u32 window, float scale,
                                                       u16* __restrict__ p) {
    const u64 row = (u64)blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u32 lane = threadIdx.x & 31, i = (u32)(row % t), nvec = t / 8;
    const uint4* sr = reinterpret_cast<const uint4*>(s + row * t);
    uint4* pr = reinterpret_cast<uint4*>(p + row * t);
    float v[V][8];
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const u32 j = lane + 32 * q;
        const bool live = j < nvec && 8 * j <= i;
        const uint4 w = live ? sr[j] : make_uint4(0u, 0u, 0u, 0u);
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float x = (e & 1) ? bf16_hi(ws[e >> 1]) : bf16_lo(ws[e >> 1]);
            v[q][e] = live && visible(i, 8 * j + e, window) ? x * scale : -INFINITY;
            mx = fmaxf(mx, v[q][e]);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < V; ++q)
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (v[q][e] != -INFINITY) sum += __expf(v[q][e] - mx);
    const float inv = 1.f / warp_sum(sum);
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const u32 j = lane + 32 * q;
        if (j >= nvec) break;
        u32 o[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
            const float a = v[q][e] != -INFINITY ? __expf(v[q][e] - mx) * inv : 0.f;
            const float b = v[q][e + 1] != -INFINITY ? __expf(v[q][e + 1] - mx) * inv : 0.f;
            o[e >> 1] = bf16_pair(a, b);
        }
        pr[j] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

template <int V>
__device__ __forceinline__ void causal_softmax_bwd_vec(const u16* __restrict__ p,
                                                       const u16* __restrict__ dp, u64 rows, u32 t,
                                                       float scale, u16* __restrict__ ds) {
    const u64 row = (u64)blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u32 lane = threadIdx.x & 31, i = (u32)(row % t), nvec = t / 8;
    const uint4* prow = reinterpret_cast<const uint4*>(p + row * t);
    const uint4* dprow = reinterpret_cast<const uint4*>(dp + row * t);
    uint4* dsrow = reinterpret_cast<uint4*>(ds + row * t);
    uint4 pv[V], dv[V];
    float dot = 0.f;
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const u32 j = lane + 32 * q;
        // Above the diagonal p is 0 (the forward's mask): nothing to read.
        const bool live = j < nvec && 8 * j <= i;
        pv[q] = live ? prow[j] : make_uint4(0u, 0u, 0u, 0u);
        dv[q] = live ? dprow[j] : make_uint4(0u, 0u, 0u, 0u);
        const u32 pw[4] = {pv[q].x, pv[q].y, pv[q].z, pv[q].w};
        const u32 dw[4] = {dv[q].x, dv[q].y, dv[q].z, dv[q].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            dot = fmaf(bf16_lo(pw[h]), bf16_lo(dw[h]), dot);
            dot = fmaf(bf16_hi(pw[h]), bf16_hi(dw[h]), dot);
        }
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const u32 j = lane + 32 * q;
        if (j >= nvec) break;
        const u32 pw[4] = {pv[q].x, pv[q].y, pv[q].z, pv[q].w};
        const u32 dw[4] = {dv[q].x, dv[q].y, dv[q].z, dv[q].w};
        u32 o[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            o[h] = bf16_pair(scale * bf16_lo(pw[h]) * (bf16_lo(dw[h]) - dot),
                             scale * bf16_hi(pw[h]) * (bf16_hi(dw[h]) - dot));
        }
        dsrow[j] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

#define CAUSAL_SOFTMAX_VEC(V)                                                                    \
    extern "C" __global__ void causal_softmax_fwd_v##V##_bf16(                                   \
        const u16* __restrict__ s, u64 rows, u32 t, u32 window, float scale,                     \
        u16* __restrict__ p) {                                                                   \
        causal_softmax_fwd_vec<V>(s, rows, t, window, scale, p);                                 \
    }                                                                                            \
    extern "C" __global__ void causal_softmax_bwd_v##V##_bf16(                                   \
        const u16* __restrict__ p, const u16* __restrict__ dp, u64 rows, u32 t, float scale,     \
        u16* __restrict__ ds) {                                                                  \
        causal_softmax_bwd_vec<V>(p, dp, rows, t, scale, ds);                                    \
    }
CAUSAL_SOFTMAX_VEC(1)
CAUSAL_SOFTMAX_VEC(2)
CAUSAL_SOFTMAX_VEC(4)
CAUSAL_SOFTMAX_VEC(8)

// In place: m, v, p of one parameter. step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, u64 n,
                                     float beta1, float beta2, float eps, float decay,
                                     float step_size, float bc2_sqrt) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// Multi-tensor launches (the scheme of apex's multi_tensor_apply / torch's _foreach ops): one grid
// over many tensors, each cut into MT_CHUNK-value chunks, one block per chunk. A segment table in
// device memory gives each tensor's addresses, length and first block; a block finds its tensor by
// binary search over the (ascending) first blocks.
#define MT_CHUNK 8192
struct MtSeg {
    u64 ptr[4];
    u64 n;
    u64 block0;
};

__device__ __forceinline__ const MtSeg& mt_seg(const MtSeg* __restrict__ segs, u32 count) {
    u32 lo = 0, hi = count - 1;
    while (lo < hi) {
        const u32 mid = (lo + hi + 1) >> 1;
        if (segs[mid].block0 <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    return segs[lo];
}

// partial[block] = sum of squares of the block's chunk of the f32 tensor at ptr[0]; the host adds
// the partials in f64, in block order (deterministic, unlike atomics).
extern "C" __global__ void sumsq_multi_f32(const MtSeg* __restrict__ segs, u32 count,
                                           float* __restrict__ partial) {
    __shared__ float part[32];
    const MtSeg& sg = mt_seg(segs, count);
    const float* __restrict__ x = (const float*)sg.ptr[0];
    const u64 start = (u64)(blockIdx.x - sg.block0) * MT_CHUNK;
    const u64 end = min(start + MT_CHUNK, sg.n);
    float s = 0.f;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) s = fmaf(x[i], x[i], s);
    s = block_sum(s, part);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// adamw_f32 over many parameters: ptr = (p, g, m, v); the gradient is first multiplied by gscale
// (the clip coefficient of torch.nn.utils.clip_grad_norm_, folded in instead of a pass per tensor).
extern "C" __global__ void adamw_multi_f32(const MtSeg* __restrict__ segs, u32 count, float gscale,
                                           float beta1, float beta2, float eps, float decay,
                                           float step_size, float bc2_sqrt) {
    const MtSeg& sg = mt_seg(segs, count);
    float* __restrict__ p = (float*)sg.ptr[0];
    const float* __restrict__ g = (const float*)sg.ptr[1];
    float* __restrict__ m = (float*)sg.ptr[2];
    float* __restrict__ v = (float*)sg.ptr[3];
    const u64 start = (u64)(blockIdx.x - sg.block0) * MT_CHUNK;
    const u64 end = min(start + MT_CHUNK, sg.n);
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = g[i] * gscale;
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// Cross-entropy of rows of logits (n, v) bf16 against targets (u32; 0xffffffff: no target), the
// loss of transformers' causal LM (log-softmax in f32, mean over the rows with a target).
// out (n + 1) f32: out[1 + i] = logsumexp of row i (kept for the backward), loss[i] its loss.
// Merges two (max, sum of exp) pairs; a pair with max -inf is empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float mo, float so) {
    const float mn = fmaxf(m, mo);
    if (mn == -INFINITY) return;
    s = (m == -INFINITY ? 0.f : s * __expf(m - mn)) + (mo == -INFINITY ? 0.f : so * __expf(mo - mn));
    m = mn;
}

extern "C" __global__ void ce_rows_bf16(const u16* __restrict__ logits, const u32* __restrict__ tgt,
                                        u32 v, float* __restrict__ out, float* __restrict__ loss) {
    __shared__ float sm[32], ss[32];
    const u16* x = logits + (u64)blockIdx.x * v;
    // Online max / sum of exp per thread (Milakov & Gimelshein 2018), then across the block.
    float m = -INFINITY, s = 0.f;
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
        const float xj = bf16_f(x[j]);
        if (xj > m) {
            s = s * __expf(m - xj) + 1.f;
            m = xj;
        } else {
            s += __expf(xj - m);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m, o), so = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, mo, so);
    }
    const u32 w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sm[w] = m; ss[w] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = sm[0], S = ss[0];
        for (u32 i = 1; i < (blockDim.x >> 5); i++) lse_merge(M, S, sm[i], ss[i]);
        const float lse = M + logf(S);
        out[1 + blockIdx.x] = lse;
        const u32 t = tgt[blockIdx.x];
        loss[blockIdx.x] = t < v ? lse - bf16_f(x[t]) : 0.f;
    }
}

// out[0] = sum(loss) * inv_count, one block (a fixed order: deterministic).
extern "C" __global__ void ce_mean(const float* __restrict__ loss, u32 n, float inv_count,
                                   float* __restrict__ out) {
    __shared__ float part[32];
    float s = 0.f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) s += loss[i];
    s = block_sum(s, part);
    if (threadIdx.x == 0) out[0] = s * inv_count;
}

// d logits = g * inv_count * (softmax - onehot(target)) for rows with a target, 0 otherwise;
// g = grad[0] (the upstream gradient of the mean, read on the device: no host sync).
extern "C" __global__ void ce_bwd_bf16(const u16* __restrict__ logits, const u32* __restrict__ tgt,
                                       const float* __restrict__ res, const float* __restrict__ grad,
                                       u32 v, float inv_count, u16* __restrict__ dx) {
    const u64 off = (u64)blockIdx.x * v;
    const u32 t = tgt[blockIdx.x];
    const float g = grad[0] * inv_count, lse = res[1 + blockIdx.x];
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = t < v ? __expf(bf16_f(logits[off + j]) - lse) : 0.f;
        dx[off + j] = f32_to_bf16(t < v ? g * (p - (j == t ? 1.f : 0.f)) : 0.f);
    }
}

// LoRA dropout on the device: element i of a micro-batch's (layer, projection) input is dropped
// when a counter-based hash of (seed, i) falls below p·2^32 (splitmix64's finalizer; Steele et al.
// 2014) and kept scaled by 1/(1-p) otherwise — the same mask wherever and however often it is
// recomputed (gradient checkpointing, the backward), with no RNG state.
__device__ __forceinline__ bool dropped(u64 seed, u64 i, u32 thr) {
    u64 z = seed + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (u32)((z ^ (z >> 31)) >> 32) < thr;
}

// y = dropout(x).
extern "C" __global__ void dropout_bf16(const u16* __restrict__ x, u64 n, u64 seed, u32 thr,
                                        float keep, u16* __restrict__ y) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        y[i] = dropped(seed, i, thr) ? 0 : f32_to_bf16(bf16_f(x[i]) * keep);
}

// acc += dropout(t) with the mask of dropout_bf16 (the LoRA branch's share of dx).
extern "C" __global__ void dropout_add_bf16(const u16* __restrict__ t, u64 n, u64 seed, u32 thr,
                                            float keep, u16* __restrict__ acc) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        if (!dropped(seed, i, thr)) acc[i] = f32_to_bf16(bf16_f(acc[i]) + bf16_f(t[i]) * keep);
}

// Row r of a RoPE launch, in (b, heads, t) order: its position and the offsets of its hd values in
// the projection's layout (b, t, h, hd) and attention's (b, h, t, hd), as source and destination
// for the direction.
__device__ __forceinline__ void rope_row(u64 r, u32 t, u32 heads, u32 hd, u32 to_heads, u32& pos,
                                         u64& src, u64& dst) {
    pos = (u32)(r % t);
    r /= t;
    const u32 h = (u32)(r % heads);
    const u64 b = r / heads;
    const u64 hidx = ((b * heads + h) * t + pos) * hd;  // (b, h, t, hd)
    const u64 tidx = ((b * t + pos) * heads + h) * hd;  // (b, t, h, hd)
    src = to_heads ? tidx : hidx;
    dst = to_heads ? hidx : tidx;
}

// RoPE with the head transposition of attention folded in. to_heads = 1: x is a projection's
// output (b, t, heads*hd), y the rotated (b, heads, t, hd); to_heads = 0 (the backward, sign -1):
// x is (b, heads, t, hd), y (b, t, heads*hd). One thread per rotated pair.
extern "C" __global__ void rope_heads_bf16(const u16* __restrict__ x, const u16* __restrict__ cosb,
                                           const u16* __restrict__ sinb, u64 pairs, u32 t,
                                           u32 heads, u32 hd, float sign, u32 to_heads,
                                           u16* __restrict__ y) {
    const u32 half = hd / 2;
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
         p += (u64)gridDim.x * blockDim.x) {
        const u32 j = (u32)(p % half);
        u32 pos;
        u64 src, dst;
        rope_row(p / half, t, heads, hd, to_heads, pos, src, dst);
        const float c = bf16_f(cosb[(u64)pos * half + j]);
        const float s = sign * bf16_f(sinb[(u64)pos * half + j]);
        const float x1 = bf16_f(x[src + j]), x2 = bf16_f(x[src + j + half]);
        y[dst + j] = f32_to_bf16(x1 * c - x2 * s);
        y[dst + j + half] = f32_to_bf16(x2 * c + x1 * s);
    }
}

// rope_heads_bf16 with 8 consecutive pairs per thread (16-byte loads of x's two halves and of the
// tables; hd % 16 == 0 and every address 16-byte aligned: the host checks). The scalar kernel's
// 2-byte accesses moved ~1 TB/s (0.032 ms for a layer's q at batch 4 × 512).
extern "C" __global__ void rope_heads_v8_bf16(const u16* __restrict__ x,
                                              const u16* __restrict__ cosb,
                                              const u16* __restrict__ sinb, u64 pairs, u32 t,
                                              u32 heads, u32 hd, float sign, u32 to_heads,
                                              u16* __restrict__ y) {
    const u32 half = hd / 2, hc = half / 8;
    const u64 chunks = pairs / 8;
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < chunks;
         p += (u64)gridDim.x * blockDim.x) {
        const u32 j = (u32)(p % hc) * 8;
        u32 pos;
        u64 src, dst;
        rope_row(p / hc, t, heads, hd, to_heads, pos, src, dst);
        const uint4 cv = *reinterpret_cast<const uint4*>(cosb + (u64)pos * half + j);
        const uint4 sv = *reinterpret_cast<const uint4*>(sinb + (u64)pos * half + j);
        const uint4 av = *reinterpret_cast<const uint4*>(x + src + j);
        const uint4 bv = *reinterpret_cast<const uint4*>(x + src + j + half);
        const u32 cw[4] = {cv.x, cv.y, cv.z, cv.w}, sw[4] = {sv.x, sv.y, sv.z, sv.w};
        const u32 aw[4] = {av.x, av.y, av.z, av.w}, bw[4] = {bv.x, bv.y, bv.z, bv.w};
        u32 o1[4], o2[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float r1[2], r2[2];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const float c = k ? bf16_hi(cw[e]) : bf16_lo(cw[e]);
                const float sn = sign * (k ? bf16_hi(sw[e]) : bf16_lo(sw[e]));
                const float x1 = k ? bf16_hi(aw[e]) : bf16_lo(aw[e]);
                const float x2 = k ? bf16_hi(bw[e]) : bf16_lo(bw[e]);
                r1[k] = x1 * c - x2 * sn;
                r2[k] = x2 * c + x1 * sn;
            }
            o1[e] = bf16_pair(r1[0], r1[1]);
            o2[e] = bf16_pair(r2[0], r2[1]);
        }
        *reinterpret_cast<uint4*>(y + dst + j) = make_uint4(o1[0], o1[1], o1[2], o1[3]);
        *reinterpret_cast<uint4*>(y + dst + j + half) = make_uint4(o2[0], o2[1], o2[2], o2[3]);
    }
}
