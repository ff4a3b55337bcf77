// The recurrent models' fused ops (docs/kernels/rnn-ops.md): one GRU step and one LSTM step
// after their two GEMMs, and Bahdanau's additive attention, forward and backward. The GEMMs around them (x W_ih^T,
// h W_hh^T, the query and key projections) run on cuBLAS; these kernels fuse everything
// between. f32 arithmetic for every element type; every reduction has a fixed order, so
// repeated runs give the same bits. CPU twin: src/twin/rnn.rs (tests/rnn_twin.rs).
//
// gru_fwd — r = sigma(gi_r + gh_r), z = sigma(gi_z + gh_z), n = tanh(gi_n + r gh_n),
//   h' = n + z (h - n); the cache keeps (r, z, n, gh_n) for the backward. 1-D grid-stride loop,
//   one hidden unit (b, u) per thread per step: a warp reads 32 adjacent units of each gate
//   block. Bytes/unit: 7 reads + 5 writes of T. FLOPs ~30/unit (3 transcendentals).
// gru_bwd — from dh': dn^ = dh'(1 - z)(1 - n^2), dz^ = dh'(h - n) z(1 - z),
//   dr^ = dn^ gh_n r(1 - r); dgi = (dr^, dz^, dn^), dgh = (dr^, dz^, dn^ r), dh = dh' z (the direct
//   path; the caller adds dgh W_hh). Same loop. Bytes/unit: 6 reads + 7 writes of T.
//   An inactive row (a padded time step) copies h / dh' and writes zero gates and cache.
//
// lstm_fwd — PyTorch's gates (i, f, g, o) from a = gi + gh: i = sigma(a_i), f = sigma(a_f),
//   g = tanh(a_g), o = sigma(a_o); c' = f c + i g, h' = o tanh(c'); the cache keeps
//   (i, f, g, o, tanh c'). The GRU's loop, one unit (b, u) per thread per step.
//   Bytes/unit: 9 reads + 7 writes of T (h is read only by inactive rows). FLOPs ~35/unit
//   (5 transcendentals).
// lstm_bwd — from dh' and dc': with t = tanh c', dc^ = dc' + dh' o (1 - t^2);
//   da_i = dc^ g i(1 - i), da_f = dc^ c f(1 - f), da_g = dc^ i (1 - g^2), da_o = dh' t o(1 - o);
//   dgates = da (both GEMM inputs' gradient), dc = dc^ f, dh = 0 (the caller adds
//   dgates W_hh). Same loop. Bytes/unit: 8 reads + 6 writes of T.
//   An inactive row copies (h, c) / (dh', dc') and writes zero gates and cache.
//
// additive_fwd — block b (CUATTN_ADDITIVE_THREADS = 8 warps) owns sequence b, len valid keys:
//   1. scores: warp w owns keys j = w, w + 8, ...; its lanes stride over A, each adding
//      v_c tanh(q_c + k_jc), then a butterfly sum; e_j goes to shared memory (len_k floats).
//   2. max and sum of exp(e - max) by block reductions; thread t turns e_j into alpha_j for
//      j = t, t + 256, ... (the same j it read, so no barrier between) and stores alpha
//      (0 for padded j).
//   3. context: thread t owns columns d = t, t + 256, ... and adds alpha_j values_jd for
//      j = 0 .. len-1 in order (a warp reads 32 adjacent values of row j).
//   Bytes/sequence: len (A + D) + A reads, len_k + D writes of T. FLOPs ~len (4A + 2D).
// additive_bwd — block b again, with alpha (forward's) and de in shared memory (2 len_k floats):
//   1. dalpha_j = dctx . values_j, one warp per key as in the forward's scores; alpha_j loaded.
//   2. mean = sum_j alpha_j dalpha_j (block sum); de_j = alpha_j (dalpha_j - mean) in place
//      by the thread that owns j in the reduction's loop.
//   3. dvalues_jd = alpha_j dctx_d, grid-stride over the block's len_k x D (0 for padded j).
//   4. thread t owns columns c = t, t + 256, ... of A and walks j = 0 .. len_k-1 in order:
//      recomputes tanh(q_c + k_jc) once, writes dkeys_jc = de_j v_c (1 - t^2) (0 for padded j),
//      and adds it to dq_c and de_j t to dv_part[b]_c. The host sums dv_part over b in order.
//   Bytes/sequence: len (2A + 2D) + 2A + D reads, len_k (A + D) + 2A writes.

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T> __device__ void gru_fwd(const cuattn_gru_params& p) {
    const T* gi = reinterpret_cast<const T*>(p.gi);
    const T* gh = reinterpret_cast<const T*>(p.gh);
    const T* h = reinterpret_cast<const T*>(p.h);
    const uint8_t* active = reinterpret_cast<const uint8_t*>(p.active);
    T* out = reinterpret_cast<T*>(p.out);
    T* cache = reinterpret_cast<T*>(p.cache);
    const int64_t H = p.hidden, n = p.batch * H;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t b = i / H, u = i - b * H;
        const int64_t g = b * 3 * H + u, c = b * 4 * H + u;
        if (active && !active[b]) {
            out[i] = h[i];
            for (int k = 0; k < 4; ++k) cache[c + k * H] = from_f32<T>(0.0f);
            continue;
        }
        const float r = sigmoid(to_f32(gi[g]) + to_f32(gh[g]));
        const float z = sigmoid(to_f32(gi[g + H]) + to_f32(gh[g + H]));
        const float ghn = to_f32(gh[g + 2 * H]);
        const float nn = tanhf(to_f32(gi[g + 2 * H]) + r * ghn);
        out[i] = from_f32<T>(nn + z * (to_f32(h[i]) - nn));
        cache[c] = from_f32<T>(r);
        cache[c + H] = from_f32<T>(z);
        cache[c + 2 * H] = from_f32<T>(nn);
        cache[c + 3 * H] = from_f32<T>(ghn);
    }
}

template <typename T> __device__ void gru_bwd(const cuattn_gru_params& p) {
    const T* cache = reinterpret_cast<const T*>(p.cache);
    const T* h = reinterpret_cast<const T*>(p.h);
    const T* dout = reinterpret_cast<const T*>(p.dout);
    const uint8_t* active = reinterpret_cast<const uint8_t*>(p.active);
    T* dgi = reinterpret_cast<T*>(p.dgi);
    T* dgh = reinterpret_cast<T*>(p.dgh);
    T* dh = reinterpret_cast<T*>(p.dh);
    const int64_t H = p.hidden, n = p.batch * H;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t b = i / H, u = i - b * H;
        const int64_t g = b * 3 * H + u, c = b * 4 * H + u;
        if (active && !active[b]) {
            dh[i] = dout[i];
            for (int k = 0; k < 3; ++k) {
                dgi[g + k * H] = from_f32<T>(0.0f);
                dgh[g + k * H] = from_f32<T>(0.0f);
            }
            continue;
        }
        const float r = to_f32(cache[c]), z = to_f32(cache[c + H]);
        const float nn = to_f32(cache[c + 2 * H]), ghn = to_f32(cache[c + 3 * H]);
        const float d = to_f32(dout[i]);
        const float dn = d * (1.0f - z) * (1.0f - nn * nn);
        const float dz = d * (to_f32(h[i]) - nn) * z * (1.0f - z);
        const float dr = dn * ghn * r * (1.0f - r);
        dh[i] = from_f32<T>(d * z);
        dgi[g] = from_f32<T>(dr);
        dgi[g + H] = from_f32<T>(dz);
        dgi[g + 2 * H] = from_f32<T>(dn);
        dgh[g] = from_f32<T>(dr);
        dgh[g + H] = from_f32<T>(dz);
        dgh[g + 2 * H] = from_f32<T>(dn * r);
    }
}

template <typename T> __device__ void lstm_fwd(const cuattn_lstm_params& p) {
    const T* gi = reinterpret_cast<const T*>(p.gi);
    const T* gh = reinterpret_cast<const T*>(p.gh);
    const T* h = reinterpret_cast<const T*>(p.h);
    const T* c = reinterpret_cast<const T*>(p.c);
    const uint8_t* active = reinterpret_cast<const uint8_t*>(p.active);
    T* h_out = reinterpret_cast<T*>(p.h_out);
    T* c_out = reinterpret_cast<T*>(p.c_out);
    T* cache = reinterpret_cast<T*>(p.cache);
    const int64_t H = p.hidden, n = p.batch * H;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += stride) {
        const int64_t b = k / H, u = k - b * H;
        const int64_t g = b * 4 * H + u, q = b * 5 * H + u;
        if (active && !active[b]) {
            h_out[k] = h[k];
            c_out[k] = c[k];
            for (int j = 0; j < 5; ++j) cache[q + j * H] = from_f32<T>(0.0f);
            continue;
        }
        const float i = sigmoid(to_f32(gi[g]) + to_f32(gh[g]));
        const float f = sigmoid(to_f32(gi[g + H]) + to_f32(gh[g + H]));
        const float gg = tanhf(to_f32(gi[g + 2 * H]) + to_f32(gh[g + 2 * H]));
        const float o = sigmoid(to_f32(gi[g + 3 * H]) + to_f32(gh[g + 3 * H]));
        const float cn = f * to_f32(c[k]) + i * gg;
        const float t = tanhf(cn);
        c_out[k] = from_f32<T>(cn);
        h_out[k] = from_f32<T>(o * t);
        cache[q] = from_f32<T>(i);
        cache[q + H] = from_f32<T>(f);
        cache[q + 2 * H] = from_f32<T>(gg);
        cache[q + 3 * H] = from_f32<T>(o);
        cache[q + 4 * H] = from_f32<T>(t);
    }
}

template <typename T> __device__ void lstm_bwd(const cuattn_lstm_params& p) {
    const T* cache = reinterpret_cast<const T*>(p.cache);
    const T* c = reinterpret_cast<const T*>(p.c);
    const T* dh_out = reinterpret_cast<const T*>(p.dh_out);
    const T* dc_out = reinterpret_cast<const T*>(p.dc_out);
    const uint8_t* active = reinterpret_cast<const uint8_t*>(p.active);
    T* dgates = reinterpret_cast<T*>(p.dgates);
    T* dh = reinterpret_cast<T*>(p.dh);
    T* dc = reinterpret_cast<T*>(p.dc);
    const int64_t H = p.hidden, n = p.batch * H;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += stride) {
        const int64_t b = k / H, u = k - b * H;
        const int64_t g = b * 4 * H + u, q = b * 5 * H + u;
        if (active && !active[b]) {
            dh[k] = dh_out[k];
            dc[k] = dc_out[k];
            for (int j = 0; j < 4; ++j) dgates[g + j * H] = from_f32<T>(0.0f);
            continue;
        }
        const float i = to_f32(cache[q]), f = to_f32(cache[q + H]);
        const float gg = to_f32(cache[q + 2 * H]), o = to_f32(cache[q + 3 * H]);
        const float t = to_f32(cache[q + 4 * H]);
        const float dho = to_f32(dh_out[k]);
        const float dct = to_f32(dc_out[k]) + dho * o * (1.0f - t * t);
        dgates[g] = from_f32<T>(dct * gg * i * (1.0f - i));
        dgates[g + H] = from_f32<T>(dct * to_f32(c[k]) * f * (1.0f - f));
        dgates[g + 2 * H] = from_f32<T>(dct * i * (1.0f - gg * gg));
        dgates[g + 3 * H] = from_f32<T>(dho * t * o * (1.0f - o));
        dc[k] = from_f32<T>(dct * f);
        dh[k] = from_f32<T>(0.0f);
    }
}

// Valid keys of sequence b.
__device__ __forceinline__ int keys_of(const cuattn_additive_params& p, int64_t b) {
    if (!p.key_lens) return p.len_k;
    const int n = reinterpret_cast<const int32_t*>(p.key_lens)[b];
    return n < 0 ? 0 : (n > p.len_k ? p.len_k : n);
}

// x_j = dot(a, rows_j) over `width` for j < len, one warp per row (rows j = warp, warp + warps,
// ...), lanes striding over the width; `f` combines an a-element and a row element. Written to
// out[j] by lane 0.
template <typename T, typename F>
__device__ __forceinline__ void warp_per_row_dots(const T* a, const T* rows, int width, int len, float* out,
                                                  F f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < len; j += warps) {
        const T* row = rows + (int64_t)j * width;
        float s = 0.0f;
        for (int c = lane; c < width; c += 32) s += f(c, to_f32(a[c]), to_f32(row[c]));
        s = warp_sum(s);
        if (lane == 0) out[j] = s;
    }
}

template <typename T> __device__ void additive_fwd(const cuattn_additive_params& p) {
    extern __shared__ float e[];  // [len_k]: scores, then weights
    __shared__ float red[32];
    const int64_t b = blockIdx.x;
    const int A = p.dim_a, D = p.dim_v, L = p.len_k, len = keys_of(p, b);
    const T* q = reinterpret_cast<const T*>(p.q) + b * A;
    const T* keys = reinterpret_cast<const T*>(p.keys) + b * L * A;
    const T* v = reinterpret_cast<const T*>(p.v);
    const T* values = reinterpret_cast<const T*>(p.values) + b * L * D;
    T* alpha = reinterpret_cast<T*>(p.alpha) + b * L;
    T* ctx = reinterpret_cast<T*>(p.ctx) + b * D;

    warp_per_row_dots(q, keys, A, len, e, [&](int c, float qc, float kc) { return to_f32(v[c]) * tanhf(qc + kc); });
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, e[j]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) s += expf(e[j] - m);
    s = block_sum(s, red);
    const float inv = len > 0 ? 1.0f / s : 0.0f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        const float a = j < len ? expf(e[j] - m) * inv : 0.0f;
        if (j < len) e[j] = a;
        alpha[j] = from_f32<T>(a);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float c = 0.0f;
        for (int j = 0; j < len; ++j) c += e[j] * to_f32(values[(int64_t)j * D + d]);
        ctx[d] = from_f32<T>(c);
    }
}

template <typename T> __device__ void additive_bwd(const cuattn_additive_params& p) {
    extern __shared__ float sm[];  // [2 len_k]: alpha, then dalpha -> de
    __shared__ float red[32];
    const int64_t b = blockIdx.x;
    const int A = p.dim_a, D = p.dim_v, L = p.len_k, len = keys_of(p, b);
    float* al = sm;
    float* de = sm + L;
    const T* q = reinterpret_cast<const T*>(p.q) + b * A;
    const T* keys = reinterpret_cast<const T*>(p.keys) + b * L * A;
    const T* v = reinterpret_cast<const T*>(p.v);
    const T* values = reinterpret_cast<const T*>(p.values) + b * L * D;
    const T* alpha = reinterpret_cast<const T*>(p.alpha) + b * L;
    const T* dctx = reinterpret_cast<const T*>(p.dctx) + b * D;
    T* dq = reinterpret_cast<T*>(p.dq) + b * A;
    T* dkeys = reinterpret_cast<T*>(p.dkeys) + b * L * A;
    T* dvalues = reinterpret_cast<T*>(p.dvalues) + b * L * D;
    float* dv_part = reinterpret_cast<float*>(p.dv_part) + b * A;

    warp_per_row_dots(dctx, values, D, len, de, [](int, float g, float x) { return g * x; });
    for (int j = threadIdx.x; j < len; j += blockDim.x) al[j] = to_f32(alpha[j]);
    __syncthreads();
    float mean = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) mean += al[j] * de[j];
    mean = block_sum(mean, red);
    for (int j = threadIdx.x; j < len; j += blockDim.x) de[j] = al[j] * (de[j] - mean);
    __syncthreads();
    const int64_t nv = (int64_t)L * D;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        const int j = (int)(i / D);
        const int d = (int)(i - (int64_t)j * D);
        dvalues[i] = from_f32<T>(j < len ? al[j] * to_f32(dctx[d]) : 0.0f);
    }
    for (int c = threadIdx.x; c < A; c += blockDim.x) {
        const float qc = to_f32(q[c]), vc = to_f32(v[c]);
        float gq = 0.0f, gv = 0.0f;
        for (int j = 0; j < L; ++j) {
            float du = 0.0f;
            if (j < len) {
                const float t = tanhf(qc + to_f32(keys[(int64_t)j * A + c]));
                du = de[j] * vc * (1.0f - t * t);
                gq += du;
                gv += de[j] * t;
            }
            dkeys[(int64_t)j * A + c] = from_f32<T>(du);
        }
        dq[c] = from_f32<T>(gq);
        dv_part[c] = gv;
    }
}

}  // namespace

#define CUATTN_RNN_OPS(T, SUFFIX)                                                                  \
    extern "C" __global__ void gru_fwd_##SUFFIX(const cuattn_gru_params p) { gru_fwd<T>(p); }      \
    extern "C" __global__ void gru_bwd_##SUFFIX(const cuattn_gru_params p) { gru_bwd<T>(p); }      \
    extern "C" __global__ void lstm_fwd_##SUFFIX(const cuattn_lstm_params p) { lstm_fwd<T>(p); }   \
    extern "C" __global__ void lstm_bwd_##SUFFIX(const cuattn_lstm_params p) { lstm_bwd<T>(p); }   \
    extern "C" __global__ void __launch_bounds__(CUATTN_ADDITIVE_THREADS)                          \
        additive_fwd_##SUFFIX(const cuattn_additive_params p) {                                    \
        additive_fwd<T>(p);                                                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(CUATTN_ADDITIVE_THREADS)                          \
        additive_bwd_##SUFFIX(const cuattn_additive_params p) {                                    \
        additive_bwd<T>(p);                                                                        \
    }

CUATTN_RNN_OPS(float, f32)
CUATTN_RNN_OPS(__half, f16)
CUATTN_RNN_OPS(__nv_bfloat16, bf16)
