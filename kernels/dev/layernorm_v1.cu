// LayerNorm v1 (kept for the record; not built). Measured on NVIDIA H200, 2026-11-26, commit
// 53c89c7, 256 MiB tensors, copy bandwidth 4232 GB/s (docs/gpu-runs/2026-11-26-h200-run1.md):
//   forward          f16 174762x768 164 us (77% of copy)   f16 2048x65536 258 us (49%)
//   residual forward f16 174762x768 288 us (88%)           f16 2048x65536 401 us (63%)
//   backward         f16 174762x768 476 us (40%)           f16 2048x65536 2742 us (7%)
// What it taught: (1) a loop over packs with a run-time trip count issues one 16-byte load at
// a time per thread; the forward stalls on latency at small hidden. (2) The backward's
// per-element read-modify-write of dγ/dβ partials through a generic pointer (shared or global
// chosen at run time) is the bottleneck; at hidden 65536 the partials (512 KiB per block) do not
// fit in shared memory and their global traffic exceeds the useful bytes. (3) One warp per
// block at hidden 768 (backward) leaves the SM short of warps.
// LayerNorm over the last dimension: forward (optionally fused with a residual add) and
// backward, for f32 / f16 / bf16 storage with f32 arithmetic.
//
// Algorithm (forward, one row of n = hidden elements):
//   s    = residual ? round_T(x + residual) : x        (s is also written to residual_out)
//   mean = Σ s / n;  var = Σ (s − mean)² / n           (two passes: no E[s²]−E[s]² cancellation)
//   y    = (s − mean) · rstd · γ + β,  rstd = 1/√(var + eps)   (IEEE sqrt and divide)
// Backward, with x̂ = (x − mean)·rstd from the forward's saved mean/rstd and g = dy·γ:
//   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂));  dγ = Σ_rows dy·x̂;  dβ = Σ_rows dy.
//
// Tiling and ownership:
// - Forward: a block holds `rows_per_block` row groups of `threads_per_row` (32..1024, a power
//   of two) threads; each group owns one row at a time and walks the rows with a grid stride.
//   Thread t of a group owns the 16-byte packs t, t + threads_per_row, ... of its row (scalar
//   elements when rows are not 16-byte aligned). The row is read from global memory once: it
//   stays in dynamic shared memory (`cache_rows_in_smem`, the host's choice when it fits) for
//   the variance and output passes; otherwise those passes re-read it (from L1/L2).
// - Backward stage 1: one block per row at a time (grid stride, grid = what fits on the GPU).
//   Each thread owns the same columns in every row, so it accumulates its columns' dγ/dβ
//   partials without atomics, in shared memory when 2·hidden floats fit, else in its block's
//   slice of the global workspace. Stage 2 sums the per-block partials column by column in
//   block order: dγ and dβ are bitwise deterministic for a given GPU and shape.
// - Reductions: warp shuffles, then one shared slot per warp summed in warp order by every
//   thread of the group (the same order everywhere, so no run-to-run variation).
//
// Bytes and FLOPs (n·r elements of b bytes): forward reads x (+ residual) and writes y
// (+ residual_out): 2·n·r·b (4·n·r·b fused), about 8 FLOPs per element. Backward reads x and dy
// and writes dx: 3·n·r·b, about 12 FLOPs per element. Both are memory-bound on every GPU: the
// target is the device-to-device copy bandwidth.

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

// Sum of v over a row group of `tpr` threads (tpr a power of two ≥ 32). Every thread of the
// block must call it (it holds barriers when tpr > 32). `red` has one slot per warp.
__device__ __forceinline__ float group_sum(float v, float* red, int tpr) {
    v = warp_sum(v);
    if (tpr == 32) return v;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) red[warp] = v;
    __syncthreads();
    const int warps_per_group = tpr / 32;
    const int first = (threadIdx.x / tpr) * warps_per_group;
    float s = 0.f;
    for (int w = 0; w < warps_per_group; ++w) s += red[first + w];
    __syncthreads();  // `red` is reused by the next reduction
    return s;
}

template <typename T, int VEC>
__device__ void layernorm_fwd_rows(const cuattn_layernorm_fwd_params& p, T* smem_rows) {
    using P = Pack<T, VEC>;
    __shared__ float red[32];
    const int tpr = p.threads_per_row;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x % tpr;
    const int nvec = p.hidden / VEC;
    const float inv_n = 1.f / (float)p.hidden;
    T* cache = p.cache_rows_in_smem ? smem_rows + (int64_t)group * p.hidden : nullptr;
    const bool fused = p.residual != 0;

    for (int64_t row0 = (int64_t)blockIdx.x * p.rows_per_block; row0 < p.rows;
         row0 += (int64_t)gridDim.x * p.rows_per_block) {
        const int64_t row = row0 + group;
        const bool active = row < p.rows;  // tail groups still join the barriers
        const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_row_stride;
        const T* res = reinterpret_cast<const T*>(p.residual) + row * p.residual_row_stride;
        T* res_out = reinterpret_cast<T*>(p.residual_out) + row * p.residual_out_row_stride;

        float sum = 0.f;
        if (active) {
            for (int i = t; i < nvec; i += tpr) {
                P v = load<P>(x, i);
                if (fused) {
                    const P r = load<P>(res, i);
#pragma unroll
                    for (int k = 0; k < VEC; ++k) v.v[k] = from_f32<T>(to_f32(v.v[k]) + to_f32(r.v[k]));
                    store<P>(res_out, i, v);
                }
                if (cache) store<P>(cache, i, v);
#pragma unroll
                for (int k = 0; k < VEC; ++k) sum += to_f32(v.v[k]);
            }
        }
        const float mean = group_sum(sum, red, tpr) * inv_n;

        // Later passes read s from the cache, else from where the first pass left it. Each
        // thread re-reads only its own packs, so no barrier is needed between the passes.
        const T* s = cache ? cache : (fused ? res_out : x);
        float sq = 0.f;
        if (active) {
            for (int i = t; i < nvec; i += tpr) {
                const P v = load<P>(s, i);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    const float d = to_f32(v.v[k]) - mean;
                    sq += d * d;
                }
            }
        }
        const float var = group_sum(sq, red, tpr) * inv_n;
        const float rstd = 1.f / sqrtf(var + p.eps);

        if (active) {
            T* y = reinterpret_cast<T*>(p.y) + row * p.y_row_stride;
            for (int i = t; i < nvec; i += tpr) {
                const P v = load<P>(s, i);
                P g, b, out;
                if (p.gamma) g = load<P>(reinterpret_cast<const void*>(p.gamma), i);
                if (p.beta) b = load<P>(reinterpret_cast<const void*>(p.beta), i);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float o = (to_f32(v.v[k]) - mean) * rstd;
                    if (p.gamma) o *= to_f32(g.v[k]);
                    if (p.beta) o += to_f32(b.v[k]);
                    out.v[k] = from_f32<T>(o);
                }
                store<P>(y, i, out);
            }
            if (t == 0) {
                if (p.mean) reinterpret_cast<float*>(p.mean)[row] = mean;
                if (p.rstd) reinterpret_cast<float*>(p.rstd)[row] = rstd;
            }
        }
    }
}

template <typename T, int VEC>
__device__ void layernorm_bwd_rows(const cuattn_layernorm_bwd_params& p, float* smem) {
    using P = Pack<T, VEC>;
    __shared__ float red[32];
    const int tpr = blockDim.x;
    const int t = threadIdx.x;
    const int n = p.hidden;
    const int nvec = n / VEC;
    const float inv_n = 1.f / (float)n;

    // Partials: in shared memory as [2][VEC][nvec] (pack-major, so a warp's accesses for one k
    // hit consecutive banks), or in this block's global slice as [2][hidden] (column order).
    const bool acc_smem = p.partials_in_smem;
    float* acc = acc_smem ? smem : reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.x * 2 * n;
    auto acc_index = [&](int i, int k) { return acc_smem ? k * nvec + i : i * VEC + k; };
    T* cache = p.cache_rows_in_smem ? reinterpret_cast<T*>(smem + (acc_smem ? 2 * n : 0)) : nullptr;

    for (int i = t; i < nvec; i += tpr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[acc_index(i, k)] = acc[n + acc_index(i, k)] = 0.f;
    }

    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_row_stride;
        const T* dy = reinterpret_cast<const T*>(p.dy) + row * p.dy_row_stride;
        const float mean = reinterpret_cast<const float*>(p.mean)[row];
        const float rstd = reinterpret_cast<const float*>(p.rstd)[row];

        float sum_g = 0.f, sum_gx = 0.f;
        for (int i = t; i < nvec; i += tpr) {
            const P xv = load<P>(x, i);
            const P dv = load<P>(dy, i);
            P gv;
            if (p.gamma) gv = load<P>(reinterpret_cast<const void*>(p.gamma), i);
            if (cache) {
                store<P>(cache, i, xv);
                store<P>(cache + n, i, dv);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float xhat = (to_f32(xv.v[k]) - mean) * rstd;
                const float d = to_f32(dv.v[k]);
                const float g = p.gamma ? d * to_f32(gv.v[k]) : d;
                sum_g += g;
                sum_gx += g * xhat;
                acc[acc_index(i, k)] += d * xhat;
                acc[n + acc_index(i, k)] += d;
            }
        }
        const float mean_g = group_sum(sum_g, red, tpr) * inv_n;
        const float mean_gx = group_sum(sum_gx, red, tpr) * inv_n;

        T* dx = reinterpret_cast<T*>(p.dx) + row * p.dx_row_stride;
        const T* xs = cache ? cache : x;
        const T* dys = cache ? cache + n : dy;
        for (int i = t; i < nvec; i += tpr) {
            const P xv = load<P>(xs, i);
            const P dv = load<P>(dys, i);
            P gv, out;
            if (p.gamma) gv = load<P>(reinterpret_cast<const void*>(p.gamma), i);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float xhat = (to_f32(xv.v[k]) - mean) * rstd;
                const float d = to_f32(dv.v[k]);
                const float g = p.gamma ? d * to_f32(gv.v[k]) : d;
                out.v[k] = from_f32<T>(rstd * (g - mean_g - xhat * mean_gx));
            }
            store<P>(dx, i, out);
        }
    }

    if (acc_smem) {
        float* dst = reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.x * 2 * n;
        for (int i = t; i < nvec; i += tpr) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                dst[i * VEC + k] = acc[acc_index(i, k)];
                dst[n + i * VEC + k] = acc[n + acc_index(i, k)];
            }
        }
    }
}

template <typename T>
__device__ void layernorm_bwd_reduce(const cuattn_layernorm_bwd_reduce_params& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.hidden) return;
    const float* part = reinterpret_cast<const float*>(p.partials);
    float dg = 0.f, db = 0.f;
    for (int b = 0; b < p.num_partials; ++b) {  // fixed order: deterministic
        dg += part[(int64_t)b * 2 * p.hidden + j];
        db += part[(int64_t)b * 2 * p.hidden + p.hidden + j];
    }
    if (p.dgamma) reinterpret_cast<T*>(p.dgamma)[j] = from_f32<T>(dg);
    if (p.dbeta) reinterpret_cast<T*>(p.dbeta)[j] = from_f32<T>(db);
}

}  // namespace

#define CUATTN_LAYERNORM_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(1024)                                               \
        layernorm_fwd_##SUFFIX(const cuattn_layernorm_fwd_params p) {                                \
        extern __shared__ __align__(16) unsigned char smem_fwd_##SUFFIX[];                           \
        T* rows = reinterpret_cast<T*>(smem_fwd_##SUFFIX);                                           \
        if (p.vectorized) layernorm_fwd_rows<T, 16 / sizeof(T)>(p, rows);                            \
        else layernorm_fwd_rows<T, 1>(p, rows);                                                      \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(1024)                                               \
        layernorm_bwd_##SUFFIX(const cuattn_layernorm_bwd_params p) {                                \
        extern __shared__ __align__(16) unsigned char smem_bwd_##SUFFIX[];                           \
        float* smem = reinterpret_cast<float*>(smem_bwd_##SUFFIX);                                   \
        if (p.vectorized) layernorm_bwd_rows<T, 16 / sizeof(T)>(p, smem);                            \
        else layernorm_bwd_rows<T, 1>(p, smem);                                                      \
    }                                                                                                \
    extern "C" __global__ void layernorm_bwd_reduce_##SUFFIX(const cuattn_layernorm_bwd_reduce_params p) { \
        layernorm_bwd_reduce<T>(p);                                                                  \
    }

CUATTN_LAYERNORM_KERNELS(float, f32)
CUATTN_LAYERNORM_KERNELS(__half, f16)
CUATTN_LAYERNORM_KERNELS(__nv_bfloat16, bf16)
