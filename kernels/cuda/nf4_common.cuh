// Shared by nf4.cu and nf4_sweep.cu: NF4 block-scale decoding and load helpers.
#pragma once
#include "bf16.cuh"

// Entries of the second-level (absmax) quantization block, fixed in bitsandbytes.
#define NESTED_LOG2 8
// An NF4 weight as kernel parameters, in the order the host pushes them (Nf4Gpu::weight_args in
// src/cuda.rs): packed codes, code table, plain flag, f32 absmax, or the double quantization's
// 8-bit absmax, second-level absmax, dynamic code and offset, then log2 of the blocksize. Every
// NF4 kernel takes it, and passes NF4_W_ARGS on to its body.
#define NF4_W_PARAMS                                                                             \
    const u8 *__restrict__ packed, const float *__restrict__ code16, u32 plain,                  \
        const float *__restrict__ absmax, const u8 *__restrict__ qabs,                           \
        const float *__restrict__ nested, const float *__restrict__ ncode, float offset,         \
        u32 log2_bs
#define NF4_W_ARGS packed, code16, plain, absmax, qabs, nested, ncode, offset, log2_bs

// Chunks each lane loads before it computes (memory-level parallelism).
#define UNROLL 4

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

// Entry `byte` of the tensor-core GEMVs' byte -> bf16-pair code table (the low nibble's code in the
// high half): COPIES equal copies, one per lane so a warp's lookups never share a bank. Written as
// COPIES / 4 16-byte stores in an order rotated by `byte`: a 16-byte store is served a quarter
// warp (8 lanes, 8 consecutive entries) at a time, and the rotation puts those 8 stores on 8
// different groups of 4 banks. ncu (session 17) put the scalar form's 32 stores and their
// addressing at 15 % of a gate/up launch's instructions (every block fills its own table); the
// fill overlaps the weights' first loads, though, and decode measured the same either way
// (BENCHMARKS.md, session 17). Needs `lut` 16-byte aligned.
template <u32 COPIES>
__device__ __forceinline__ void fill_pair_lut_entry(u32* lut, const float* __restrict__ code16,
                                                    u32 byte) {
    static_assert(COPIES % 4 == 0 && (COPIES & (COPIES - 1)) == 0, "whole 16-byte chunks");
    constexpr u32 CHUNKS = COPIES / 4;
    const u32 v =
        (u32)f32_to_bf16(code16[byte >> 4]) | ((u32)f32_to_bf16(code16[byte & 15u]) << 16);
    const uint4 q = make_uint4(v, v, v, v);
    uint4* row = reinterpret_cast<uint4*>(lut + byte * COPIES);
#pragma unroll
    for (u32 c = 0; c < CHUNKS; ++c) {
        row[(c + byte) & (CHUNKS - 1)] = q;
    }
}
