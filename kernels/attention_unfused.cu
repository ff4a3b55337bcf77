// Row softmax of the unfused attention baseline (src/ops/attention_unfused.rs): the middle step
// between S = Q·Kᵀ and O = P·V, both run by cuBLAS. Not a fast path: it exists to benchmark the
// fused kernels against the textbook three-step computation and to cross-check them on the GPU
// at sizes the CPU reference cannot reach.
//
// Algorithm: one CTA of 256 threads per score row (head-batch bh, query i = row mod len_q).
// The admissible keys are [0, end) with end = len_k, or min(len_k, i + off + 1) under a causal
// mask (off = 0 top-left, len_k − len_q bottom-right). Three passes over the f32 row, in the
// exp2 domain with c = scale·log2 e: max of c·s; Σ 2^(c·s − max); P = 2^(c·s − max)/Σ written in
// T (0 past end), LSE = (max + log2 Σ)·ln 2, or −inf and P = 0 when end = 0.
// Bytes: reads S three times (4·len_k bytes each, L2-resident for short rows), writes P.

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int THREADS = 256;

template <typename Op> __device__ float block_reduce(float v, Op op, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch free from the previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) v = op(v, scratch[w]);
    return v;
}

template <typename T> __device__ void softmax_row(const cuattn_attention_softmax_params& p) {
    __shared__ float scratch[THREADS / 32];
    const int64_t row = blockIdx.x;
    const int i = (int)(row % p.len_q);
    int end = p.len_k;
    if (p.causal != CUATTN_CAUSAL_NONE) {
        const int off = p.causal == CUATTN_CAUSAL_BOTTOM_RIGHT ? p.len_k - p.len_q : 0;
        end = max(0, min(p.len_k, i + off + 1));
    }
    const float* s = reinterpret_cast<const float*>(p.scores) + row * p.len_k;
    T* out = reinterpret_cast<T*>(p.probs) + row * p.len_k;
    const float c = p.scale * 1.4426950408889634f;

    float mx = -INFINITY;
    for (int j = threadIdx.x; j < end; j += THREADS) mx = fmaxf(mx, c * s[j]);
    mx = block_reduce(mx, [](float a, float b) { return fmaxf(a, b); }, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < end; j += THREADS) sum += exp2f(c * s[j] - mx);
    sum = block_reduce(sum, [](float a, float b) { return a + b; }, scratch);
    const float inv = end > 0 ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < p.len_k; j += THREADS) out[j] = from_f32<T>(j < end ? exp2f(c * s[j] - mx) * inv : 0.f);
    if (p.lse && threadIdx.x == 0)
        reinterpret_cast<float*>(p.lse)[row] = end > 0 ? (mx + log2f(sum)) * 0.6931471805599453f : -INFINITY;
}

}  // namespace

#define CUATTN_SOFTMAX(T, SUFFIX)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_softmax_##SUFFIX(                 \
        const cuattn_attention_softmax_params p) {                                                     \
        softmax_row<T>(p);                                                                             \
    }

CUATTN_SOFTMAX(float, f32)
CUATTN_SOFTMAX(__half, f16)
CUATTN_SOFTMAX(__nv_bfloat16, bf16)
