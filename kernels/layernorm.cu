// LayerNorm over the last dimension: forward (optionally fused with a residual add) and
// backward, for f32 / f16 / bf16 storage with f32 arithmetic. (v2; v1 and what it taught are in
// kernels/dev/layernorm_v1.cu.)
//
// Algorithm (forward, one row of n = hidden elements):
//   s    = residual ? round_T(x + residual) : x        (s is also written to residual_out)
//   mean = Σ s / n;  var = Σ (s − mean)² / n           (two passes: no E[s²]−E[s]² cancellation)
//   y    = (s − mean) · rstd · γ + β,  rstd = 1/√(var + eps)   (IEEE sqrt and divide)
// Backward, with x̂ = (x − mean)·rstd from the forward's saved mean/rstd and g = dy·γ:
//   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂));  dγ = Σ_rows dy·x̂;  dβ = Σ_rows dy.
//
// Ownership: a block holds `rows_per_block` row groups of `threads_per_row` threads (a power of
// two, 32..1024); a group owns one row at a time and walks the rows with a grid stride. Thread
// t of a group owns the packs t, t + threads_per_row, ... of its row, where a pack is 16 bytes
// (8 f16/bf16, 4 f32) when every row is 16-byte aligned and a single element otherwise.
//
// Two paths per direction:
// - register path (`*_regs<PACKS>`, ≤ 512 threads per row, rows up to threads_per_row·PACKS
//   packs: PACKS ≤ 4 forward, ≤ 2 backward, whose dγ/dβ partials take registers too): a thread's packs
//   stay in registers, all its loads are issued before the first use (bytes in flight are what a
//   memory-bound kernel lives on), x/dy are read with evict-first hints. The backward keeps
//   each thread's dγ/dβ partials in registers across all the rows its group visits, adds the
//   groups of a block in shared memory in group order, and writes one partial row per block.
// - generic path (any hidden up to 65536): a loop over packs; rows cached in dynamic shared
//   memory between passes when they fit, else re-read (L1/L2). Backward partials accumulate in
//   shared memory (hidden ≤ 4096) or, for wide rows, a separate column kernel computes dγ/dβ
//   (x and dy read twice: 5 passes instead of 3, but no per-element partial traffic).
// Stage 2 (`layernorm_bwd_reduce`) sums the partial rows column by column in block order, so dγ
// and dβ are bitwise deterministic for a given GPU and shape. Reductions inside a group use warp
// shuffles and one shared slot per warp, added in warp order by every thread.
//
// Bytes and FLOPs (n·r elements of b bytes): forward reads x (+ residual) and writes y
// (+ residual_out): 2·n·r·b (4·n·r·b fused), ~8 FLOPs per element. Backward reads x and dy and
// writes dx: 3·n·r·b, ~12 FLOPs per element. Memory-bound on every GPU: the target is the
// device-to-device copy bandwidth.

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

// Sum of v over a row group of `tpr` threads (tpr a power of two ≥ 32). Every thread of the
// block must call it (it holds barriers when tpr > 32). `red` has one slot per warp.
template <typename V> __device__ __forceinline__ V warp_sum_v(V v);
template <> __device__ __forceinline__ float warp_sum_v<float>(float v) { return warp_sum(v); }
template <> __device__ __forceinline__ float2 warp_sum_v<float2>(float2 v) {
    return make_float2(warp_sum(v.x), warp_sum(v.y));
}
__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float2 add(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }

template <typename V> __device__ __forceinline__ V group_sum(V v, V* red, int tpr) {
    v = warp_sum_v(v);
    if (tpr == 32) return v;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) red[warp] = v;
    __syncthreads();
    const int warps_per_group = tpr / 32;
    const int first = (threadIdx.x / tpr) * warps_per_group;
    V s = red[first];
    for (int w = 1; w < warps_per_group; ++w) s = add(s, red[first + w]);
    __syncthreads();  // `red` is reused by the next reduction
    return s;
}

template <typename T> __device__ __forceinline__ const T* row_ptr(uint64_t base, int64_t row, int64_t stride) {
    return reinterpret_cast<const T*>(base) + row * stride;
}
template <typename T> __device__ __forceinline__ T* row_ptr_mut(uint64_t base, int64_t row, int64_t stride) {
    return reinterpret_cast<T*>(base) + row * stride;
}

// ------------------------------------------------------------------ forward, register path

template <typename T, int VEC, int PACKS>
__device__ void layernorm_fwd_regs(const cuattn_layernorm_fwd_params& p) {
    using P = Pack<T, VEC>;
    __shared__ float red[32];
    const int tpr = p.threads_per_row;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x % tpr;
    const int nvec = p.hidden / VEC;
    const float inv_n = 1.f / (float)p.hidden;
    const bool fused = p.residual != 0;

    const int64_t stride = (int64_t)gridDim.x * p.rows_per_block;
    // x of the group's next row is loaded before this row's reductions, so its bytes are in
    // flight while the row is reduced and written (one row of prefetch in registers).
    auto fetch = [&](int64_t row, P (&v)[PACKS]) {
        if (row >= p.rows) return;
        const T* x = row_ptr<T>(p.x, row, p.x_row_stride);
#pragma unroll
        for (int k = 0; k < PACKS; ++k)
            if (t + k * tpr < nvec) v[k] = load_stream<P>(x, t + k * tpr);
    };
    P next[PACKS];
    fetch((int64_t)blockIdx.x * p.rows_per_block + group, next);

    for (int64_t row0 = (int64_t)blockIdx.x * p.rows_per_block; row0 < p.rows; row0 += stride) {
        const int64_t row = row0 + group;
        const bool active = row < p.rows;  // tail groups still join the barriers
        P v[PACKS];
#pragma unroll
        for (int k = 0; k < PACKS; ++k) v[k] = next[k];
        fetch(row + stride, next);
        float sum = 0.f;
        if (active) {
            if (fused) {
                const T* res = row_ptr<T>(p.residual, row, p.residual_row_stride);
                T* res_out = row_ptr_mut<T>(p.residual_out, row, p.residual_out_row_stride);
                P r[PACKS];
#pragma unroll
                for (int k = 0; k < PACKS; ++k)
                    if (t + k * tpr < nvec) r[k] = load_stream<P>(res, t + k * tpr);
#pragma unroll
                for (int k = 0; k < PACKS; ++k) {
                    if (t + k * tpr >= nvec) continue;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) v[k].v[e] = from_f32<T>(to_f32(v[k].v[e]) + to_f32(r[k].v[e]));
                    store<P>(res_out, t + k * tpr, v[k]);
                }
            }
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                if (t + k * tpr >= nvec) continue;
#pragma unroll
                for (int e = 0; e < VEC; ++e) sum += to_f32(v[k].v[e]);
            }
        }
        const float mean = group_sum(sum, red, tpr) * inv_n;
        float sq = 0.f;
        if (active) {
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                if (t + k * tpr >= nvec) continue;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float d = to_f32(v[k].v[e]) - mean;
                    sq += d * d;
                }
            }
        }
        const float rstd = 1.f / sqrtf(group_sum(sq, red, tpr) * inv_n + p.eps);
        if (active) {
            T* y = row_ptr_mut<T>(p.y, row, p.y_row_stride);
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                const int i = t + k * tpr;
                if (i >= nvec) continue;
                P g, b, out;
                if (p.gamma) g = load<P>(reinterpret_cast<const void*>(p.gamma), i);
                if (p.beta) b = load<P>(reinterpret_cast<const void*>(p.beta), i);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    float o = (to_f32(v[k].v[e]) - mean) * rstd;
                    if (p.gamma) o *= to_f32(g.v[e]);
                    if (p.beta) o += to_f32(b.v[e]);
                    out.v[e] = from_f32<T>(o);
                }
                store_stream<P>(y, i, out);
            }
            if (t == 0) {
                if (p.mean) reinterpret_cast<float*>(p.mean)[row] = mean;
                if (p.rstd) reinterpret_cast<float*>(p.rstd)[row] = rstd;
            }
        }
    }
}

// ------------------------------------------------------------------ forward, generic path

template <typename T, int VEC>
__device__ void layernorm_fwd_generic(const cuattn_layernorm_fwd_params& p, T* smem_rows) {
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
        const bool active = row < p.rows;
        const T* x = row_ptr<T>(p.x, row, p.x_row_stride);
        T* res_out = row_ptr_mut<T>(p.residual_out, row, p.residual_out_row_stride);

        float sum = 0.f;
        if (active) {
            const T* res = row_ptr<T>(p.residual, row, p.residual_row_stride);
            for (int i = t; i < nvec; i += tpr) {
                P v = load<P>(x, i);
                if (fused) {
                    const P r = load<P>(res, i);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) v.v[e] = from_f32<T>(to_f32(v.v[e]) + to_f32(r.v[e]));
                    store<P>(res_out, i, v);
                }
                if (cache) store<P>(cache, i, v);
#pragma unroll
                for (int e = 0; e < VEC; ++e) sum += to_f32(v.v[e]);
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
                for (int e = 0; e < VEC; ++e) {
                    const float d = to_f32(v.v[e]) - mean;
                    sq += d * d;
                }
            }
        }
        const float rstd = 1.f / sqrtf(group_sum(sq, red, tpr) * inv_n + p.eps);

        if (active) {
            T* y = row_ptr_mut<T>(p.y, row, p.y_row_stride);
            for (int i = t; i < nvec; i += tpr) {
                const P v = load<P>(s, i);
                P g, b, out;
                if (p.gamma) g = load<P>(reinterpret_cast<const void*>(p.gamma), i);
                if (p.beta) b = load<P>(reinterpret_cast<const void*>(p.beta), i);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    float o = (to_f32(v.v[e]) - mean) * rstd;
                    if (p.gamma) o *= to_f32(g.v[e]);
                    if (p.beta) o += to_f32(b.v[e]);
                    out.v[e] = from_f32<T>(o);
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

// ------------------------------------------------------------------ backward, register path

template <typename T, int VEC, int PACKS>
__device__ void layernorm_bwd_regs(const cuattn_layernorm_bwd_params& p, float* smem) {
    using P = Pack<T, VEC>;
    __shared__ float2 red[32];
    const int tpr = p.threads_per_row;
    const int group = threadIdx.x / tpr;
    const int t = threadIdx.x % tpr;
    const int n = p.hidden;
    const int nvec = n / VEC;
    const float inv_n = 1.f / (float)n;

    float dg[PACKS][VEC], db[PACKS][VEC];
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) dg[k][e] = db[k][e] = 0.f;

    // γ is the same for every row: load the thread's packs once.
    P gv[PACKS];
    if (p.gamma) {
#pragma unroll
        for (int k = 0; k < PACKS; ++k)
            if (t + k * tpr < nvec) gv[k] = load<P>(reinterpret_cast<const void*>(p.gamma), t + k * tpr);
    }
    // x, dy, mean and rstd of the group's next row load while this row is reduced and written.
    struct Row {
        P x[PACKS], dy[PACKS];
        float mean, rstd;
    };
    auto fetch = [&](int64_t row, Row& r) {
        if (row >= p.rows) return;
        const T* x = row_ptr<T>(p.x, row, p.x_row_stride);
        const T* dy = row_ptr<T>(p.dy, row, p.dy_row_stride);
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            if (t + k * tpr >= nvec) continue;
            r.x[k] = load_stream<P>(x, t + k * tpr);
            r.dy[k] = load_stream<P>(dy, t + k * tpr);
        }
        r.mean = reinterpret_cast<const float*>(p.mean)[row];
        r.rstd = reinterpret_cast<const float*>(p.rstd)[row];
    };
    const int64_t stride = (int64_t)gridDim.x * p.rows_per_block;
    Row next;
    fetch((int64_t)blockIdx.x * p.rows_per_block + group, next);

    for (int64_t row0 = (int64_t)blockIdx.x * p.rows_per_block; row0 < p.rows; row0 += stride) {
        const int64_t row = row0 + group;
        const bool active = row < p.rows;
        const Row cur = next;
        fetch(row + stride, next);
        const P* xv = cur.x;
        const P* dv = cur.dy;
        const float mean = cur.mean, rstd = cur.rstd;
        float2 sums = make_float2(0.f, 0.f);  // Σg, Σg·x̂
        if (active) {
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                if (t + k * tpr >= nvec) continue;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float xhat = (to_f32(xv[k].v[e]) - mean) * rstd;
                    const float d = to_f32(dv[k].v[e]);
                    const float g = p.gamma ? d * to_f32(gv[k].v[e]) : d;
                    sums.x += g;
                    sums.y += g * xhat;
                    dg[k][e] += d * xhat;
                    db[k][e] += d;
                }
            }
        }
        sums = group_sum(sums, red, tpr);
        const float mean_g = sums.x * inv_n, mean_gx = sums.y * inv_n;
        if (active) {
            T* dx = row_ptr_mut<T>(p.dx, row, p.dx_row_stride);
#pragma unroll
            for (int k = 0; k < PACKS; ++k) {
                const int i = t + k * tpr;
                if (i >= nvec) continue;
                P out;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float xhat = (to_f32(xv[k].v[e]) - mean) * rstd;
                    const float d = to_f32(dv[k].v[e]);
                    const float g = p.gamma ? d * to_f32(gv[k].v[e]) : d;
                    out.v[e] = from_f32<T>(rstd * (g - mean_g - xhat * mean_gx));
                }
                store_stream<P>(dx, i, out);
            }
        }
    }

    // Add the groups' partials (same columns in every group) in group order: shared memory
    // [group][2][VEC][nvec], pack-major so a warp's stores for one e hit consecutive banks.
    float* part = smem + (int64_t)group * 2 * n;
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
        const int i = t + k * tpr;
        if (i >= nvec) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            part[e * nvec + i] = dg[k][e];
            part[n + e * nvec + i] = db[k][e];
        }
    }
    __syncthreads();
    float* dst = reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.x * 2 * n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const int at = (c % VEC) * nvec + c / VEC;
        float sg = 0.f, sb = 0.f;
        for (int g = 0; g < p.rows_per_block; ++g) {
            sg += smem[(int64_t)g * 2 * n + at];
            sb += smem[(int64_t)g * 2 * n + n + at];
        }
        dst[c] = sg;
        dst[n + c] = sb;
    }
}

// ------------------------------------------------------------------ backward, generic path

template <typename T, int VEC>
__device__ void layernorm_bwd_generic(const cuattn_layernorm_bwd_params& p, float* smem) {
    using P = Pack<T, VEC>;
    __shared__ float2 red[32];
    const int tpr = p.threads_per_row;  // one group per block
    const int t = threadIdx.x;
    const int n = p.hidden;
    const int nvec = n / VEC;
    const float inv_n = 1.f / (float)n;

    // Partials: in shared memory as [2][VEC][nvec] (pack-major, so a warp's accesses for one e
    // hit consecutive banks), or in this block's global slice as [2][hidden] (column order).
    const bool acc_smem = p.partials_mode == CUATTN_LN_PARTIALS_SHARED;
    const bool acc = p.partials_mode != CUATTN_LN_PARTIALS_NONE;
    float* part = acc_smem ? smem : reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.x * 2 * n;
    auto at = [&](int i, int e) { return acc_smem ? e * nvec + i : i * VEC + e; };
    T* cache = p.cache_rows_in_smem ? reinterpret_cast<T*>(smem + (acc_smem ? 2 * n : 0)) : nullptr;

    if (acc) {
        for (int i = t; i < nvec; i += tpr) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) part[at(i, e)] = part[n + at(i, e)] = 0.f;
        }
    }

    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* x = row_ptr<T>(p.x, row, p.x_row_stride);
        const T* dy = row_ptr<T>(p.dy, row, p.dy_row_stride);
        const float mean = reinterpret_cast<const float*>(p.mean)[row];
        const float rstd = reinterpret_cast<const float*>(p.rstd)[row];

        float2 sums = make_float2(0.f, 0.f);
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
            for (int e = 0; e < VEC; ++e) {
                const float xhat = (to_f32(xv.v[e]) - mean) * rstd;
                const float d = to_f32(dv.v[e]);
                const float g = p.gamma ? d * to_f32(gv.v[e]) : d;
                sums.x += g;
                sums.y += g * xhat;
                if (acc) {
                    part[at(i, e)] += d * xhat;
                    part[n + at(i, e)] += d;
                }
            }
        }
        sums = group_sum(sums, red, tpr);
        const float mean_g = sums.x * inv_n, mean_gx = sums.y * inv_n;

        T* dx = row_ptr_mut<T>(p.dx, row, p.dx_row_stride);
        const T* xs = cache ? cache : x;
        const T* dys = cache ? cache + n : dy;
        for (int i = t; i < nvec; i += tpr) {
            const P xv = load<P>(xs, i);
            const P dv = load<P>(dys, i);
            P gv, out;
            if (p.gamma) gv = load<P>(reinterpret_cast<const void*>(p.gamma), i);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float xhat = (to_f32(xv.v[e]) - mean) * rstd;
                const float d = to_f32(dv.v[e]);
                const float g = p.gamma ? d * to_f32(gv.v[e]) : d;
                out.v[e] = from_f32<T>(rstd * (g - mean_g - xhat * mean_gx));
            }
            store<P>(dx, i, out);
        }
    }

    if (acc_smem) {
        float* dst = reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.x * 2 * n;
        for (int i = t; i < nvec; i += tpr) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                dst[i * VEC + e] = part[at(i, e)];
                dst[n + i * VEC + e] = part[n + at(i, e)];
            }
        }
    }
}

// ------------------------------------------------------------------ backward, dγ/dβ by columns

template <typename T, int VEC>
__device__ void layernorm_bwd_columns(const cuattn_layernorm_bwd_columns_params& p) {
    using P = Pack<T, VEC>;
    constexpr int COLS = 32, ROWS = 8;  // blockDim = (COLS, ROWS)
    __shared__ float part[2][ROWS][VEC * COLS];
    const int n = p.hidden;
    const int nvec = n / VEC;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int i = blockIdx.x * COLS + tx;
    const int64_t r0 = (int64_t)blockIdx.y * p.rows_per_chunk;
    const int64_t r1 = min(p.rows, r0 + p.rows_per_chunk);

    float dg[VEC], db[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) dg[e] = db[e] = 0.f;
    if (i < nvec) {
#pragma unroll 4
        for (int64_t r = r0 + ty; r < r1; r += ROWS) {
            const P xv = load<P>(row_ptr<T>(p.x, r, p.x_row_stride), i);
            const P dv = load<P>(row_ptr<T>(p.dy, r, p.dy_row_stride), i);
            const float mean = reinterpret_cast<const float*>(p.mean)[r];
            const float rstd = reinterpret_cast<const float*>(p.rstd)[r];
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float d = to_f32(dv.v[e]);
                dg[e] += d * (to_f32(xv.v[e]) - mean) * rstd;
                db[e] += d;
            }
        }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        part[0][ty][e * COLS + tx] = dg[e];
        part[1][ty][e * COLS + tx] = db[e];
    }
    __syncthreads();
    if (ty == 0 && i < nvec) {
        float* dst = reinterpret_cast<float*>(p.partials) + (int64_t)blockIdx.y * 2 * n;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            float sg = 0.f, sb = 0.f;
            for (int y = 0; y < ROWS; ++y) {  // fixed order: deterministic
                sg += part[0][y][e * COLS + tx];
                sb += part[1][y][e * COLS + tx];
            }
            dst[i * VEC + e] = sg;
            dst[n + i * VEC + e] = sb;
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

// Entry points: `p.vectorized` picks 16-byte packs or single elements inside each kernel.
// Register paths run at most 512 threads per block: 128 registers per thread hold the packs
// without spilling (at 1024 threads the cap of 64 spills the 4-pack f16/bf16 forward).
#define CUATTN_LN_FWD_REGS(T, SUFFIX, PACKS)                                                         \
    extern "C" __global__ void __launch_bounds__(512)                                                \
        layernorm_fwd_regs##PACKS##_##SUFFIX(const cuattn_layernorm_fwd_params p) {                  \
        if (p.vectorized) layernorm_fwd_regs<T, 16 / sizeof(T), PACKS>(p);                           \
        else layernorm_fwd_regs<T, 1, PACKS>(p);                                                     \
    }
#define CUATTN_LN_BWD_REGS(T, SUFFIX, PACKS)                                                         \
    extern "C" __global__ void __launch_bounds__(512)                                                \
        layernorm_bwd_regs##PACKS##_##SUFFIX(const cuattn_layernorm_bwd_params p) {                  \
        extern __shared__ __align__(16) unsigned char smem_bwd_regs##PACKS##_##SUFFIX[];             \
        float* smem = reinterpret_cast<float*>(smem_bwd_regs##PACKS##_##SUFFIX);                     \
        if (p.vectorized) layernorm_bwd_regs<T, 16 / sizeof(T), PACKS>(p, smem);                     \
        else layernorm_bwd_regs<T, 1, PACKS>(p, smem);                                               \
    }

#define CUATTN_LAYERNORM_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(1024)                                               \
        layernorm_fwd_##SUFFIX(const cuattn_layernorm_fwd_params p) {                                \
        extern __shared__ __align__(16) unsigned char smem_fwd_##SUFFIX[];                           \
        T* rows = reinterpret_cast<T*>(smem_fwd_##SUFFIX);                                           \
        if (p.vectorized) layernorm_fwd_generic<T, 16 / sizeof(T)>(p, rows);                         \
        else layernorm_fwd_generic<T, 1>(p, rows);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(1024)                                               \
        layernorm_bwd_##SUFFIX(const cuattn_layernorm_bwd_params p) {                                \
        extern __shared__ __align__(16) unsigned char smem_bwd_##SUFFIX[];                           \
        float* smem = reinterpret_cast<float*>(smem_bwd_##SUFFIX);                                   \
        if (p.vectorized) layernorm_bwd_generic<T, 16 / sizeof(T)>(p, smem);                         \
        else layernorm_bwd_generic<T, 1>(p, smem);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                                \
        layernorm_bwd_columns_##SUFFIX(const cuattn_layernorm_bwd_columns_params p) {                \
        if (p.vectorized) layernorm_bwd_columns<T, 16 / sizeof(T)>(p);                               \
        else layernorm_bwd_columns<T, 1>(p);                                                         \
    }                                                                                                \
    extern "C" __global__ void layernorm_bwd_reduce_##SUFFIX(const cuattn_layernorm_bwd_reduce_params p) { \
        layernorm_bwd_reduce<T>(p);                                                                  \
    }                                                                                                \
    CUATTN_LN_FWD_REGS(T, SUFFIX, 1)                                                                 \
    CUATTN_LN_FWD_REGS(T, SUFFIX, 2)                                                                 \
    CUATTN_LN_FWD_REGS(T, SUFFIX, 4)                                                                 \
    CUATTN_LN_BWD_REGS(T, SUFFIX, 1)                                                                 \
    CUATTN_LN_BWD_REGS(T, SUFFIX, 2)

CUATTN_LAYERNORM_KERNELS(float, f32)
CUATTN_LAYERNORM_KERNELS(__half, f16)
CUATTN_LAYERNORM_KERNELS(__nv_bfloat16, bf16)
