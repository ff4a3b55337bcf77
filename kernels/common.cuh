// Device helpers shared by every cuattn kernel: dtype conversions, packed vector access, warp
// reductions, and the sm_80 tensor-core primitives (mma.sync m16n8k16, ldmatrix, cp.async)
// that the attention forward and backward both build on. Included by kernels/*.cu; not
// compiled on its own.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace cuattn {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one access: 16 bytes when N = 16 / sizeof(T).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename P> __device__ __forceinline__ P load(const void* base, int64_t index) {
    return reinterpret_cast<const P*>(base)[index];
}
template <typename P> __device__ __forceinline__ void store(void* base, int64_t index, const P& v) {
    reinterpret_cast<P*>(base)[index] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

}  // namespace cuattn

namespace cuattn {

// Streaming (evict-first) access for data touched once, as 16-byte packs where possible.
template <typename P> __device__ __forceinline__ P load_stream(const void* base, int64_t index) {
    if constexpr (sizeof(P) == 16) {
        const uint4 u = __ldcs(reinterpret_cast<const uint4*>(base) + index);
        P out;
        memcpy(&out, &u, 16);
        return out;
    } else {
        return reinterpret_cast<const P*>(base)[index];
    }
}
template <typename P> __device__ __forceinline__ void store_stream(void* base, int64_t index, const P& v) {
    if constexpr (sizeof(P) == 16) {
        uint4 u;
        memcpy(&u, &v, 16);
        __stcs(reinterpret_cast<uint4*>(base) + index, u);
    } else {
        reinterpret_cast<P*>(base)[index] = v;
    }
}

}  // namespace cuattn

// ---- Block reductions (added with the training ops) ---------------------------------------
// Deterministic: the order of every addition depends only on blockDim, never on timing.
namespace cuattn {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32); every thread gets the same result.
// smem: 32 floats. Each warp sums by butterfly, then every warp sums the warp totals in the
// same butterfly order. Starts with a barrier, so smem may be reused between calls.
__device__ __forceinline__ float block_sum(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? smem[lane] : 0.0f);
}

// Maximum over a 1-D block, as block_sum (smem: 32 floats; every thread gets the result).
__device__ __forceinline__ float block_max(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? smem[lane] : -INFINITY);
}

}  // namespace cuattn

// Tensor-core and asynchronous-copy primitives (sm_80+), shared by the attention kernels.
namespace cuattn {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// D(16×8, f32) += A(16×16) · B(16×8); A and B of the element type T.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one .b32 of T pairs, x in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
    const __half2 h = __floats2half2_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

// 2^x by the SFU alone: exp2f adds a denormal-range fix-up around it (three more instructions
// per element); flushing results below 2^-126 to zero changes P by less than f16/bf16 can hold.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    // src-size 0 reads nothing and zero-fills the 16 bytes; src is then any valid address.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

}  // namespace cuattn
