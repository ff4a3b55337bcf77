// The transformer runtime's small elementwise ops (wrapped in src/ops/elementwise.rs; the runtime calls them from src/runtime/cuda.rs): bias + activation
// after a cuBLAS GEMM, elementwise add, the embedding gather, and the KV-cache append of text
// generation (src/runtime/kv_cache.rs). All memory-bound, no reuse.
//
// Algorithm and ownership: a 1-D grid-stride loop, one thread per element (gather: per element
// of the output row, the row index read once per element from the ids array, which stays in
// L1). f32 arithmetic, results rounded once to T on store.
// Bytes: bias_act reads and writes rows·cols·sizeof(T) (bias from L1/L2); add reads 2n and
// writes n elements; gather reads and writes rows·width elements; append_kv reads and writes
// 2·Σ_b count[b]·width elements (a decode step: 2·batch·width, a few KB per layer). FLOPs: a few per element
// (GELU: one erff or tanhf).

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
        case CUATTN_ACT_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case CUATTN_ACT_GELU_TANH: {
            const float c = 0.7978845608028654f;  // sqrt(2/pi)
            return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
        }
        case CUATTN_ACT_RELU: return fmaxf(x, 0.0f);
        case CUATTN_ACT_TANH: return tanhf(x);
        default: return x;
    }
}

template <typename T> __device__ void bias_act(const cuattn_bias_act_params& p) {
    T* x = reinterpret_cast<T*>(p.x);
    const T* bias = reinterpret_cast<const T*>(p.bias);
    const int64_t n = p.rows * p.cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = to_f32(x[i]);
        if (bias) v += to_f32(bias[i % p.cols]);
        x[i] = from_f32<T>(activate(v, p.act));
    }
}

template <typename T> __device__ void add(const cuattn_add_params& p) {
    const T* a = reinterpret_cast<const T*>(p.a);
    const T* b = reinterpret_cast<const T*>(p.b);
    T* out = reinterpret_cast<T*>(p.out);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
    }
}

template <typename T> __device__ void gather_rows(const cuattn_gather_rows_params& p) {
    const T* table = reinterpret_cast<const T*>(p.table);
    const uint32_t* ids = reinterpret_cast<const uint32_t*>(p.ids);
    T* out = reinterpret_cast<T*>(p.out);
    const int64_t n = p.rows * p.width;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / p.width, c = i % p.width;
        const uint32_t id = ids[r];
        out[i] = (int64_t)id < p.table_rows ? table[(int64_t)id * p.width + c]
                                             : from_f32<T>(__int_as_float(0x7fc00000));
    }
}

// One thread per element of the step's [batch, len_new, width] block; rows a sequence does not
// append (t ≥ count[b]: padding, or a finished sequence) are skipped. Bit copies of element
// type E (uint32_t for f32, uint16_t for f16/bf16). CPU twin: src/twin/kv_append.rs.
template <typename E> __device__ void append_kv(const cuattn_append_kv_params& p) {
    const int32_t* start = reinterpret_cast<const int32_t*>(p.start_count);
    const int32_t* count = start + p.batch;
    const E* src_k = reinterpret_cast<const E*>(p.src_k);
    const E* src_v = reinterpret_cast<const E*>(p.src_v);
    E* dst_k = reinterpret_cast<E*>(p.dst_k);
    E* dst_v = reinterpret_cast<E*>(p.dst_v);
    const int64_t n = p.batch * p.len_new * p.width;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = i % p.width, row = i / p.width;  // row = b·len_new + t
        const int64_t b = row / p.len_new, t = row % p.len_new;
        const int64_t to = (int64_t)start[b] + t;
        if (t >= count[b] || to < 0 || to >= p.capacity) continue;
        const int64_t from = row * p.src_row_stride + c;
        const int64_t dst = (b * p.capacity + to) * p.width + c;
        dst_k[dst] = src_k[from];
        dst_v[dst] = src_v[from];
    }
}

}  // namespace

#define CUATTN_RUNTIME_OPS(T, SUFFIX)                                                              \
    extern "C" __global__ void rt_bias_act_##SUFFIX(const cuattn_bias_act_params p) {              \
        bias_act<T>(p);                                                                            \
    }                                                                                              \
    extern "C" __global__ void rt_add_##SUFFIX(const cuattn_add_params p) { add<T>(p); }           \
    extern "C" __global__ void rt_gather_rows_##SUFFIX(const cuattn_gather_rows_params p) {        \
        gather_rows<T>(p);                                                                         \
    }

CUATTN_RUNTIME_OPS(float, f32)
CUATTN_RUNTIME_OPS(__half, f16)
CUATTN_RUNTIME_OPS(__nv_bfloat16, bf16)

extern "C" __global__ void rt_append_kv_b32(const cuattn_append_kv_params p) {
    append_kv<uint32_t>(p);
}
extern "C" __global__ void rt_append_kv_b16(const cuattn_append_kv_params p) {
    append_kv<uint16_t>(p);
}
