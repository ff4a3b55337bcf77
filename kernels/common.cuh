// Device helpers shared by every cuattn kernel: dtype conversions, packed vector access and
// warp reductions. Included by kernels/*.cu; not compiled on its own.
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

}  // namespace cuattn
