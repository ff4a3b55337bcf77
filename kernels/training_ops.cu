// Training ops: the elementwise, row and reduction kernels a training step needs besides the
// GEMMs and attention (docs/kernels/training-ops.md). All memory-bound; every reduction has a
// fixed order, so repeated runs give the same bits.
//
// bias_gelu_fwd — y = gelu(x + b). 1-D grid-stride loop, one 16-byte pack (or one element) per
//   thread per step. Bytes: 2·rows·cols·sizeof T (+ cols for b, cached). FLOPs ~20/element.
// colsum_partials / colsum_reduce — column sums (bias gradients) and the fused bias + GELU
//   backward. Block (32, 8) owns 32 columns × one chunk of rows; thread (tx, ty) walks rows
//   ty, ty + 8, ... of the chunk for column tx (a warp reads 32 adjacent elements of one row),
//   the 8 row-partials are summed in order through shared memory, and the chunk's sums go to
//   partials[chunk][col]. Stage 2: one thread per column adds the chunks in ascending order.
//   Bytes: rows·cols·sizeof T read (+ the same again for x and for dx in the GELU form) +
//   8·chunks·cols partials. CPU twin: src/twin/training.rs (colsum).
// xent — softmax cross-entropy, one block per row. Pass 1: each thread keeps an online (max,
//   sum of exp) pair and a plain sum over its strided elements; pairs merge by butterfly in
//   each warp and again across warps (the merge is symmetric, so every lane gets the same
//   bits). Pass 2 writes (softmax − target) · grad_scale. Bytes: 2 reads + 1 write of the row
//   (dlogits may be the logits). Row losses are summed by `sum_f32` (one block, fixed order).
// embedding_bwd — deterministic scatter-add: the host groups token positions by table row;
//   block (group, column tile) owns its row's columns and adds the group's dy rows in
//   ascending position order. No atomics. Bytes: tokens·width·sizeof T read, groups·width·G
//   read + written.
// adamw / grad_norm_partials / mt_scale — multi-tensor apply: one launch over a device table
//   of tensors, one block per chunk of CUATTN_MT_CHUNK elements, 4-element vectors where the
//   tensor's pointers allow. AdamW bytes/element: 12 + sizeof G read, 12 (+ sizeof M) written.
//   The norm's per-chunk sums of squares are added by `sum_f32` in chunk order.
// dropout — one Philox4x32-10 block (4 words) per 4 consecutive elements; no mask stored, the
//   backward regenerates it from (seed, offset). Bytes: 2·n·sizeof T. CPU twin: src/rng.rs.
//
// The training runtime's glue (src/runtime/cuda_train.rs), all grid-stride loops or one block
// per row:
// cast — dst = round_D(src), one element per thread per step. Bytes: n·(sizeof S + sizeof D).
// copy2d — a [rows, width] block between row strides (column slices, concatenation), one
//   element per thread per step. Bytes: 2·rows·width·sizeof E.
// ew — the elementwise products and derivatives of the runtime (a·b, sigmoid, its and tanh's
//   backward from the saved output, an activation's backward from its input, a + α·b, α·a),
//   one element per thread per step, f32 arithmetic. Bytes: 2 or 3 · n · sizeof T.
// attn_softmax_fwd / attn_softmax_bwd — the row softmax of attention with dropout on the
//   probabilities, which runs unfused (S = Q·Kᵀ and the products by cuBLAS): one block per
//   score row; the forward takes the row's max and Σ exp by block reductions (fixed order)
//   and writes P (or, given the forward's LSE, recomputes the same P); the backward forms
//   dS = scale·P∘(dP − Σ P∘dP). Bytes per row: len_k·(4 + sizeof T) (+ 4 more for the
//   backward's dP), S re-read from L1/L2 by the later passes.

#include "common.cuh"
#include "cuattn_params.h"
#include "philox.cuh"

using namespace cuattn;

namespace {

__device__ __forceinline__ float gelu(float u, int act) {
    if (act == CUATTN_ACT_GELU_TANH) {
        const float k = 0.7978845608028654f;  // sqrt(2/pi)
        return 0.5f * u * (1.0f + tanhf(k * (u + 0.044715f * u * u * u)));
    }
    return 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
}

// d gelu / du.  erf form: Phi(u) + u·phi(u).  tanh form: with t = tanh(k (u + c u^3)),
// 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 c u^2).
__device__ __forceinline__ float gelu_grad(float u, int act) {
    if (act == CUATTN_ACT_GELU_TANH) {
        const float k = 0.7978845608028654f, c = 0.044715f;
        const float t = tanhf(k * (u + c * u * u * u));
        return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * k * (1.0f + 3.0f * c * u * u);
    }
    const float cdf = 0.5f * (1.0f + erff(u * 0.70710678118654752f));
    const float pdf = 0.3989422804014327f * expf(-0.5f * u * u);  // 1/sqrt(2 pi)
    return cdf + u * pdf;
}

template <typename T> __device__ void bias_gelu_fwd(const cuattn_bias_gelu_fwd_params& p) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (p.vectorized) {
        constexpr int N = 16 / sizeof(T);
        using P = Pack<T, N>;
        const int64_t col_packs = p.cols / N, packs = p.rows * col_packs;
        for (int64_t i = tid; i < packs; i += stride) {
            P v = load_stream<P>(reinterpret_cast<const void*>(p.x), i);
            P b{};
            if (p.bias) b = load<P>(reinterpret_cast<const void*>(p.bias), i % col_packs);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float u = to_f32(v.v[k]) + (p.bias ? to_f32(b.v[k]) : 0.0f);
                v.v[k] = from_f32<T>(gelu(u, p.act));
            }
            store_stream<P>(reinterpret_cast<void*>(p.y), i, v);
        }
        return;
    }
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* bias = reinterpret_cast<const T*>(p.bias);
    T* y = reinterpret_cast<T*>(p.y);
    for (int64_t i = tid; i < p.rows * p.cols; i += stride) {
        const float u = to_f32(x[i]) + (bias ? to_f32(bias[i % p.cols]) : 0.0f);
        y[i] = from_f32<T>(gelu(u, p.act));
    }
}

template <typename T> __device__ void colsum_partials(const cuattn_colsum_params& p) {
    __shared__ float tile[CUATTN_COLSUM_ROWS][CUATTN_COLSUM_COLS + 1];
    const T* dy = reinterpret_cast<const T*>(p.dy);
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* bias = reinterpret_cast<const T*>(p.bias);
    T* dx = reinterpret_cast<T*>(p.dx);
    const int64_t c = (int64_t)blockIdx.x * CUATTN_COLSUM_COLS + threadIdx.x;
    const int64_t r0 = (int64_t)blockIdx.y * p.rows_per_chunk;
    const int64_t r1 = min(p.rows, r0 + p.rows_per_chunk);
    float acc = 0.0f;
    if (c < p.cols) {
        const float b = (x && bias) ? to_f32(bias[c]) : 0.0f;
        for (int64_t r = r0 + threadIdx.y; r < r1; r += CUATTN_COLSUM_ROWS) {
            const int64_t i = r * p.cols + c;
            float g = to_f32(dy[i]);
            if (x) {
                g *= gelu_grad(to_f32(x[i]) + b, p.act);
                dx[i] = from_f32<T>(g);
            }
            acc += g;
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.cols) {
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < CUATTN_COLSUM_ROWS; ++k) s += tile[k][threadIdx.x];
        reinterpret_cast<float*>(p.partials)[blockIdx.y * p.cols + c] = s;
    }
}

template <typename O> __device__ void colsum_reduce(const cuattn_colsum_reduce_params& p) {
    const float* partials = reinterpret_cast<const float*>(p.partials);
    O* out = reinterpret_cast<O*>(p.out);
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < p.cols;
         c += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int64_t k = 0; k < p.chunks; ++k) s += partials[k * p.cols + c];
        if (p.accumulate) s = to_f32(out[c]) + s;
        out[c] = from_f32<O>(s);
    }
}

// Online softmax statistics: running max m and sum of exp(x - m).
struct MaxSum {
    float m, s;
};

// Symmetric in its arguments (fmaxf and one commutative add), so a butterfly leaves the same
// bits in every lane.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return MaxSum{m, 0.0f};
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset),
                       __shfl_xor_sync(0xffffffffu, v.s, offset)};
        v = merge(v, o);
    }
    return v;
}

template <typename T> __device__ void xent(const cuattn_xent_params& p) {
    __shared__ float sm_m[32], sm_s[32], sm_x[32];
    const int32_t* labels = reinterpret_cast<const int32_t*>(p.labels);
    float* row_loss = reinterpret_cast<float*>(p.row_loss);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* x = reinterpret_cast<const T*>(p.logits) + r * p.logits_row_stride;
        const int32_t label = labels[r];
        const bool ignored = label == p.ignore_index;
        // The label's logit is read before any thread of the block writes dlogits (which may
        // be the logits): the barriers below come first.
        const float x_label = (threadIdx.x == 0 && !ignored) ? to_f32(x[label]) : 0.0f;
        MaxSum ms{-INFINITY, 0.0f};
        float sx = 0.0f;
        for (int64_t j = threadIdx.x; j < p.classes; j += blockDim.x) {
            const float v = to_f32(x[j]);
            ms = merge(ms, MaxSum{v, 1.0f});
            sx += v;
        }
        ms = warp_merge(ms);
        sx = warp_sum(sx);
        __syncthreads();  // the previous row's readers of sm_* are done
        if (lane == 0) {
            sm_m[warp] = ms.m;
            sm_s[warp] = ms.s;
            sm_x[warp] = sx;
        }
        __syncthreads();
        ms = lane < warps ? MaxSum{sm_m[lane], sm_s[lane]} : MaxSum{-INFINITY, 0.0f};
        ms = warp_merge(ms);
        sx = warp_sum(lane < warps ? sm_x[lane] : 0.0f);
        const float lse = ms.m + logf(ms.s);
        const float on = 1.0f - p.smoothing, off = p.smoothing / (float)p.classes;
        if (threadIdx.x == 0) row_loss[r] = ignored ? 0.0f : lse - on * x_label - off * sx;
        if (p.dlogits) {
            T* d = reinterpret_cast<T*>(p.dlogits) + r * p.dlogits_row_stride;
            for (int64_t j = threadIdx.x; j < p.classes; j += blockDim.x) {
                float g = 0.0f;
                if (!ignored) {
                    const float target = off + (j == label ? on : 0.0f);
                    g = (expf(to_f32(x[j]) - lse) - target) * p.grad_scale;
                }
                d[j] = from_f32<T>(g);
            }
        }
    }
}

__device__ void sum_values(const cuattn_sum_params& p) {
    __shared__ float smem[32];
    const float* values = reinterpret_cast<const float*>(p.values);
    float* out = reinterpret_cast<float*>(p.out);
    float v = 0.0f;
    for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) v += values[i];
    v = block_sum(v, smem);
    if (threadIdx.x != 0) return;
    if (p.finish_norm) {
        const float norm = sqrtf(v);
        float coef = p.max_norm / (norm + 1e-6f);
        if (coef > 1.0f) coef = 1.0f;  // NaN stays NaN, as torch.clamp leaves it
        out[0] = norm;
        out[1] = coef;
    } else {
        out[0] = v * p.scale;
    }
}

template <typename T, typename G> __device__ void embedding_bwd(const cuattn_embedding_bwd_params& p) {
    const int64_t g = blockIdx.x;
    const int64_t c = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= p.width) return;
    const int32_t* positions = reinterpret_cast<const int32_t*>(p.positions);
    const int32_t* group_start = reinterpret_cast<const int32_t*>(p.group_start);
    const int64_t row = reinterpret_cast<const int32_t*>(p.group_rows)[g];
    const T* dy = reinterpret_cast<const T*>(p.dy);
    float s = 0.0f;
    for (int32_t k = group_start[g]; k < group_start[g + 1]; ++k)
        s += to_f32(dy[(int64_t)positions[k] * p.dy_row_stride + c]);
    G* out = reinterpret_cast<G*>(p.dtable) + row * p.width + c;
    *out = from_f32<G>(to_f32(*out) + s);
}

// The element range [begin, end) of this block's chunk.
__device__ __forceinline__ cuattn_mt_tensor chunk_of(uint64_t tensors, uint64_t chunks,
                                                     int64_t& begin, int64_t& end) {
    const cuattn_mt_chunk ch = reinterpret_cast<const cuattn_mt_chunk*>(chunks)[blockIdx.x];
    const cuattn_mt_tensor t = reinterpret_cast<const cuattn_mt_tensor*>(tensors)[ch.tensor];
    begin = (int64_t)ch.index * CUATTN_MT_CHUNK;
    end = min(t.numel, begin + CUATTN_MT_CHUNK);
    return t;
}

struct AdamScalars {
    float grad_scale, decay, beta1, beta2, eps, step_size, bc2_sqrt;
};

// One element of torch.optim.AdamW (single-tensor path), operation for operation.
__device__ __forceinline__ void adamw_update(const AdamScalars& s, float& w, float g, float& m,
                                             float& v) {
    g *= s.grad_scale;
    w *= s.decay;
    m += (1.0f - s.beta1) * (g - m);
    v = v * s.beta2 + (1.0f - s.beta2) * g * g;
    const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
    w += -s.step_size * (m / denom);
}

template <typename G, typename M> __device__ void adamw(const cuattn_adamw_params& p) {
    int64_t begin, end;
    const cuattn_mt_tensor t = chunk_of(p.tensors, p.chunks, begin, end);
    const AdamScalars s{p.grad_scale ? *reinterpret_cast<const float*>(p.grad_scale) : 1.0f,
                        t.weight_decay ? 1.0f - p.lr * p.weight_decay : 1.0f,
                        p.beta1,
                        p.beta2,
                        p.eps,
                        p.lr / p.bias_correction1,
                        p.bias_correction2_sqrt};
    float* w = reinterpret_cast<float*>(t.param);
    float* m = reinterpret_cast<float*>(t.exp_avg);
    float* v = reinterpret_cast<float*>(t.exp_avg_sq);
    const G* g = reinterpret_cast<const G*>(t.grad);
    M* model = reinterpret_cast<M*>(t.model);
    int64_t tail = begin;
    if (t.vectorized) {
        using P4 = Pack<float, 4>;
        const int64_t packs = (end - begin) / 4;
        for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
            const int64_t q = begin / 4 + k;  // pack index in the tensor
            P4 wp = load<P4>(w, q), mp = load<P4>(m, q), vp = load<P4>(v, q);
            const Pack<G, 4> gp = load_stream<Pack<G, 4>>(g, q);
            Pack<M, 4> out;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                adamw_update(s, wp.v[e], to_f32(gp.v[e]), mp.v[e], vp.v[e]);
                out.v[e] = from_f32<M>(wp.v[e]);
            }
            store<P4>(w, q, wp);
            store<P4>(m, q, mp);
            store<P4>(v, q, vp);
            if (model) store<Pack<M, 4>>(model, q, out);
        }
        tail = begin + packs * 4;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
        float wi = w[i], mi = m[i], vi = v[i];
        adamw_update(s, wi, to_f32(g[i]), mi, vi);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
        if (model) model[i] = from_f32<M>(wi);
    }
}

template <typename G> __device__ void grad_norm_partials(const cuattn_mt_reduce_params& p) {
    __shared__ float smem[32];
    int64_t begin, end;
    const cuattn_mt_tensor t = chunk_of(p.tensors, p.chunks, begin, end);
    const G* g = reinterpret_cast<const G*>(t.grad);
    float acc = 0.0f;
    int64_t tail = begin;
    if (t.vectorized) {
        const int64_t packs = (end - begin) / 4;
        for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
            const Pack<G, 4> gp = load<Pack<G, 4>>(g, begin / 4 + k);
#pragma unroll
            for (int e = 0; e < 4; ++e) acc += to_f32(gp.v[e]) * to_f32(gp.v[e]);
        }
        tail = begin + packs * 4;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) acc += to_f32(g[i]) * to_f32(g[i]);
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.partials)[blockIdx.x] = acc;
}

template <typename G> __device__ void mt_scale(const cuattn_mt_reduce_params& p) {
    const float c = *reinterpret_cast<const float*>(p.coef);
    if (c == 1.0f) return;  // x·1 = x: nothing to write
    int64_t begin, end;
    const cuattn_mt_tensor t = chunk_of(p.tensors, p.chunks, begin, end);
    G* g = reinterpret_cast<G*>(t.grad);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) g[i] = from_f32<G>(to_f32(g[i]) * c);
}

template <typename T> __device__ void dropout(const cuattn_dropout_params& p) {
    const int64_t blocks = (p.n + 3) / 4;
    const T* x = reinterpret_cast<const T*>(p.x);
    T* y = reinterpret_cast<T*>(p.y);
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < blocks;
         q += (int64_t)gridDim.x * blockDim.x) {
        const Philox4 r = philox_block(p.seed, p.offset, (uint64_t)q);
        const uint32_t word[4] = {r.x, r.y, r.z, r.w};
        if (p.vectorized && q * 4 + 4 <= p.n) {
            Pack<T, 4> v = load_stream<Pack<T, 4>>(x, q);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                v.v[e] = from_f32<T>((uint64_t)word[e] >= p.threshold ? to_f32(v.v[e]) * p.scale : 0.0f);
            store_stream<Pack<T, 4>>(y, q, v);
        } else {
            for (int e = 0; e < 4 && q * 4 + e < p.n; ++e) {
                const int64_t i = q * 4 + e;
                y[i] = from_f32<T>((uint64_t)word[e] >= p.threshold ? to_f32(x[i]) * p.scale : 0.0f);
            }
        }
    }
}


// d act / dx at x (the forms of activate() in runtime_ops.cu; GELU as gelu_grad above).
__device__ __forceinline__ float act_grad(float x, int act) {
    switch (act) {
        case CUATTN_ACT_GELU_ERF:
        case CUATTN_ACT_GELU_TANH: return gelu_grad(x, act);
        case CUATTN_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case CUATTN_ACT_TANH: {
            const float t = tanhf(x);
            return 1.0f - t * t;
        }
        default: return 1.0f;
    }
}

template <typename S, typename D> __device__ void convert_dtype(const cuattn_cast_params& p) {
    const S* src = reinterpret_cast<const S*>(p.src);
    D* dst = reinterpret_cast<D*>(p.dst);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<D>(to_f32(src[i]));
}

template <typename E> __device__ void copy2d(const cuattn_copy2d_params& p) {
    const E* src = reinterpret_cast<const E*>(p.src);
    E* dst = reinterpret_cast<E*>(p.dst);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.rows * p.width;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / p.width, c = i % p.width;
        dst[r * p.dst_stride + c] = src[r * p.src_stride + c];
    }
}

template <typename T> __device__ void elementwise(const cuattn_ew_params& p) {
    const T* a = reinterpret_cast<const T*>(p.a);
    const T* b = reinterpret_cast<const T*>(p.b);
    T* out = reinterpret_cast<T*>(p.out);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float x = to_f32(a[i]);
        const float y = b ? to_f32(b[i]) : 0.0f;
        float r;
        switch (p.op) {
            case CUATTN_EW_MUL: r = x * y; break;
            case CUATTN_EW_SIGMOID: r = 1.0f / (1.0f + expf(-x)); break;
            case CUATTN_EW_SIGMOID_BWD: r = y * x * (1.0f - x); break;
            case CUATTN_EW_TANH_BWD: r = y * (1.0f - x * x); break;
            case CUATTN_EW_ACT_BWD: r = y * act_grad(x, p.act); break;
            case CUATTN_EW_AXPY: r = x + p.alpha * y; break;
            default: r = p.alpha * x; break;  // CUATTN_EW_SCALE
        }
        out[i] = from_f32<T>(r);
    }
}

template <typename T> __device__ void attn_softmax_fwd(const cuattn_attn_softmax_fwd_params& p) {
    __shared__ float smem[32];
    const int32_t* key_lens = reinterpret_cast<const int32_t*>(p.key_lens);
    float* lse_out = reinterpret_cast<float*>(p.lse);
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int i = (int)(r % p.len_q);
        const int64_t b = r / ((int64_t)p.heads_q * p.len_q);
        const int kl = key_lens ? min(max(key_lens[b], 0), p.len_k) : p.len_k;
        int end = kl;
        if (p.causal != CUATTN_CAUSAL_NONE) {
            const int off = p.causal == CUATTN_CAUSAL_BOTTOM_RIGHT ? kl - p.len_q : 0;
            end = max(0, min(kl, i + off + 1));
        }
        const float* s = reinterpret_cast<const float*>(p.scores) + r * p.len_k;
        T* out = reinterpret_cast<T*>(p.probs) + r * p.len_k;
        float lse;
        if (p.lse_in) {
            lse = lse_out[r];
        } else {
            float mx = -INFINITY;
            for (int j = threadIdx.x; j < end; j += blockDim.x) mx = fmaxf(mx, p.scale * s[j]);
            mx = block_max(mx, smem);
            float sum = 0.0f;
            for (int j = threadIdx.x; j < end; j += blockDim.x) sum += expf(p.scale * s[j] - mx);
            sum = block_sum(sum, smem);
            lse = end > 0 ? mx + logf(sum) : -INFINITY;
            if (threadIdx.x == 0) lse_out[r] = lse;
        }
        for (int j = threadIdx.x; j < p.len_k; j += blockDim.x)
            out[j] = from_f32<T>(j < end ? expf(p.scale * s[j] - lse) : 0.0f);
    }
}

template <typename T> __device__ void attn_softmax_bwd(const cuattn_attn_softmax_bwd_params& p) {
    __shared__ float smem[32];
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* prob = reinterpret_cast<const T*>(p.probs) + r * p.len_k;
        const float* dp = reinterpret_cast<const float*>(p.dprobs) + r * p.len_k;
        T* ds = reinterpret_cast<T*>(p.dscores) + r * p.len_k;
        float d = 0.0f;
        for (int j = threadIdx.x; j < p.len_k; j += blockDim.x) {
            const float pj = to_f32(prob[j]);
            if (pj != 0.0f) d += pj * dp[j];  // masked keys (P = 0) add nothing, whatever dP is
        }
        d = block_sum(d, smem);
        for (int j = threadIdx.x; j < p.len_k; j += blockDim.x) {
            const float pj = to_f32(prob[j]);
            ds[j] = from_f32<T>(pj != 0.0f ? p.scale * pj * (dp[j] - d) : 0.0f);
        }
    }
}

}  // namespace

extern "C" __global__ void sum_f32(const cuattn_sum_params p) { sum_values(p); }

#define CUATTN_TRAINING_OPS(T, SUFFIX)                                                             \
    extern "C" __global__ void bias_gelu_fwd_##SUFFIX(const cuattn_bias_gelu_fwd_params p) {       \
        bias_gelu_fwd<T>(p);                                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CUATTN_COLSUM_COLS* CUATTN_COLSUM_ROWS)           \
        colsum_partials_##SUFFIX(const cuattn_colsum_params p) {                                   \
        colsum_partials<T>(p);                                                                     \
    }                                                                                              \
    extern "C" __global__ void colsum_reduce_##SUFFIX(const cuattn_colsum_reduce_params p) {       \
        colsum_reduce<T>(p);                                                                       \
    }                                                                                              \
    extern "C" __global__ void xent_##SUFFIX(const cuattn_xent_params p) { xent<T>(p); }           \
    extern "C" __global__ void dropout_##SUFFIX(const cuattn_dropout_params p) { dropout<T>(p); }  \
    extern "C" __global__ void __launch_bounds__(CUATTN_MT_THREADS)                                \
        grad_norm_partials_##SUFFIX(const cuattn_mt_reduce_params p) {                             \
        grad_norm_partials<T>(p);                                                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CUATTN_MT_THREADS)                                \
        mt_scale_##SUFFIX(const cuattn_mt_reduce_params p) {                                       \
        mt_scale<T>(p);                                                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CUATTN_MT_THREADS)                                \
        adamw_##SUFFIX##_f16(const cuattn_adamw_params p) {                                        \
        adamw<T, __half>(p);                                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CUATTN_MT_THREADS)                                \
        adamw_##SUFFIX##_bf16(const cuattn_adamw_params p) {                                       \
        adamw<T, __nv_bfloat16>(p);                                                                \
    }                                                                                              \
    extern "C" __global__ void embedding_bwd_##SUFFIX##_f32(const cuattn_embedding_bwd_params p) { \
        embedding_bwd<T, float>(p);                                                                \
    }                                                                                              \
    extern "C" __global__ void embedding_bwd_##SUFFIX##_same(const cuattn_embedding_bwd_params p) { \
        embedding_bwd<T, T>(p);                                                                    \
    }                                                                                              \
    extern "C" __global__ void ew_##SUFFIX(const cuattn_ew_params p) { elementwise<T>(p); }        \
    extern "C" __global__ void attn_softmax_fwd_##SUFFIX(const cuattn_attn_softmax_fwd_params p) { \
        attn_softmax_fwd<T>(p);                                                                    \
    }                                                                                              \
    extern "C" __global__ void attn_softmax_bwd_##SUFFIX(const cuattn_attn_softmax_bwd_params p) { \
        attn_softmax_bwd<T>(p);                                                                    \
    }

CUATTN_TRAINING_OPS(float, f32)
CUATTN_TRAINING_OPS(__half, f16)
CUATTN_TRAINING_OPS(__nv_bfloat16, bf16)

#define CUATTN_CAST(S, SN, D, DN)                                                                  \
    extern "C" __global__ void cast_##SN##_to_##DN(const cuattn_cast_params p) { convert_dtype<S, D>(p); }

CUATTN_CAST(float, f32, __half, f16)
CUATTN_CAST(float, f32, __nv_bfloat16, bf16)
CUATTN_CAST(__half, f16, float, f32)
CUATTN_CAST(__half, f16, __nv_bfloat16, bf16)
CUATTN_CAST(__nv_bfloat16, bf16, float, f32)
CUATTN_CAST(__nv_bfloat16, bf16, __half, f16)

extern "C" __global__ void copy2d_b32(const cuattn_copy2d_params p) { copy2d<uint32_t>(p); }
extern "C" __global__ void copy2d_b16(const cuattn_copy2d_params p) { copy2d<uint16_t>(p); }
