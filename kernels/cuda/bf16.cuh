// Shared by the kernels of qlorad (nf4.cu, lora.cu, decode.cu): integer shorthands and bf16
// handled as its 16 bits (no cuda_bf16.h), so the files build with nvcc or NVRTC alike.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// The two bf16 of a 32-bit word (first element in the low half), and one bf16, as f32.
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf16_f(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. Same as Rust's half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// 16 bytes global -> shared, asynchronously (cp.async; L2 only); completed by the issuing thread's
// cp.async.wait_* (the t4 LoRA epilogue's staging, the norm shrink's preload).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                     (u32)__cvta_generic_to_shared(smem)),
                 "l"(gmem)
                 : "memory");
}

// Sum over the 32 lanes of a warp (all lanes must be active).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// Programmatic dependent launch (sm_90): a kernel launched with the programmatic stream
// serialization attribute (kernels/src/pdl_cuda.rs) may start while the previous kernel of its
// stream still runs. pdl_wait blocks until that kernel has completed and its writes are visible:
// every block calls it, unconditionally, before it reads anything the previous kernels wrote or
// writes anything (so also before any early exit). pdl_trigger lets the next kernel launch once
// every block of this one has called it. Both are no-ops for an ordinary launch (and below sm_90).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Requests the 128-byte line at p into L2 (no register, no wait): adapter weights fetched before a
// programmatic-launch wait, read after it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// A 16-byte load of data an earlier kernel wrote, for code after pdl_wait: __ldg's non-coherent
// loads count as invariant, and the compiler moved one above griddepcontrol.wait (add_rms_norm's
// SASS with the shrink blocks' prefetch loop before the wait): a volatile load with a memory
// clobber stays after it.
__device__ __forceinline__ uint4 ld_after_wait(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}
// ld_after_wait for one 16-bit value.
__device__ __forceinline__ u16 ld_after_wait_u16(const u16* p) {
    u16 v;
    asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
    return v;
}

// Thread-block clusters (sm_90): a barrier over every thread of the cluster, whose release /
// acquire makes each block's shared-memory writes before it visible to the others after it; and
// loads of the value at `local`'s offset in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __syncwarp();  // .aligned: every lane of the warp executes the barrier together
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
#endif
}
// The cluster-shared address of `local`'s offset in block `rank`'s shared memory.
__device__ __forceinline__ u32 cluster_addr(const void* local, u32 rank) {
    u32 remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(remote)
                 : "r"((u32)__cvta_generic_to_shared(local)), "r"(rank));
#endif
    return remote;
}
__device__ __forceinline__ u32 ld_cluster_b32(const void* local, u32 rank) {
    u32 v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.b32 %0, [%1];"
                 : "=r"(v)
                 : "r"(cluster_addr(local, rank))
                 : "memory");
#endif
    return v;
}
__device__ __forceinline__ float ld_cluster_f32(const float* local, u32 rank) {
    return __uint_as_float(ld_cluster_b32(local, rank));
}
