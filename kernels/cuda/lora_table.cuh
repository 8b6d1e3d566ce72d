// The per-row adapter tables of the BGMV kernels (lora.cu), shared with the GEMV whose epilogue
// applies the LoRA expand (nf4.cu). Row `row` finds its adapter through `row_tables[row]`: 0 for
// "no adapter", else the address of a table of TABLE_WORDS u64 per (layer, projection) slot:
// [address of A, address of B, rank | f32 bits of scale << 32] (rank 0: no module there).
#pragma once
#include "bf16.cuh"

// u64 words per slot in an adapter table.
#define TABLE_WORDS 3

struct RowLora {
    const u16* a;  // (r, in)
    const u16* b;  // (out, r)
    u32 r;         // 0: nothing to do for this row
    float scale;
};

// Row `row`'s adapter module for `slot`.
__device__ __forceinline__ RowLora lookup(const u64* __restrict__ row_tables, u32 row, u32 slot) {
    RowLora l;
    l.a = 0;
    l.b = 0;
    l.r = 0;
    l.scale = 0.f;
    const u64 table = row_tables[row];
    if (table == 0) {
        return l;
    }
    const u64* e = reinterpret_cast<const u64*>(table) + (u64)slot * TABLE_WORDS;
    const u64 meta = e[2];
    l.r = (u32)(meta & 0xffffffffull);
    l.scale = __uint_as_float((u32)(meta >> 32));
    l.a = reinterpret_cast<const u16*>(e[0]);
    l.b = reinterpret_cast<const u16*>(e[1]);
    return l;
}

// acc plus the dot product of two 16-byte chunks of 8 bf16 each, in element order (the shrinks'
// inner step: nf4_tc.cuh's in-launch shrink and decode.cu's shrink in the norm launch).
__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& x, float acc) {
    acc = fmaf(bf16_lo(a.x), bf16_lo(x.x), acc);
    acc = fmaf(bf16_hi(a.x), bf16_hi(x.x), acc);
    acc = fmaf(bf16_lo(a.y), bf16_lo(x.y), acc);
    acc = fmaf(bf16_hi(a.y), bf16_hi(x.y), acc);
    acc = fmaf(bf16_lo(a.z), bf16_lo(x.z), acc);
    acc = fmaf(bf16_hi(a.z), bf16_hi(x.z), acc);
    acc = fmaf(bf16_lo(a.w), bf16_lo(x.w), acc);
    return fmaf(bf16_hi(a.w), bf16_hi(x.w), acc);
}

// One warp's dot product of A's row `a` with x over `len` values, summed over the warp (every
// lane returns it): 16-byte pieces when `a` is 16-byte aligned (x then too), else one value at a
// time, lane by lane in the same order. `x8(q)` loads x's q-th 16-byte piece and `x1(q)` its q-th
// value: the shrinks read x from global memory (nf4_tc.cuh's in-launch shrink) or from shared
// memory (decode.cu's shrink blocks).
template <class X8, class X1>
__device__ __forceinline__ float warp_dot_a(const u16* a, u32 len, u32 lane, X8 x8, X1 x1) {
    float acc = 0.f;
    if ((reinterpret_cast<u64>(a) & 15ull) == 0) {
        const uint4* av = reinterpret_cast<const uint4*>(a);
#pragma unroll 8
        for (u32 q = lane; q < (len >> 3); q += 32) {
            const uint4 aw = __ldg(av + q), xw = x8(q);
            acc = dot8_bf16(aw, xw, acc);
        }
    } else {
        for (u32 q = lane; q < len; q += 32) {
            acc = fmaf(bf16_f(a[q]), x1(q), acc);
        }
    }
    return warp_sum(acc);
}
