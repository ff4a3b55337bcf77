// Scaled dot-product attention forward, exact path: f32 arithmetic on every element (no tensor
// cores), for f32 inputs and as a cross-check of the tensor-core kernels for f16/bf16.
//
// Algorithm: for query row i, over its admissible keys j (j < key_len, and j ≤ i + offset when
// causal, offset = 0 top-left, key_len − len_q bottom-right; within the sliding window when one is set;
// with a block-sparse layout, the keys of the kept blocks that the block's element mask admits), online softmax in the exp2
// domain: running max m of raw scores, running sum l, unnormalised O; O /= l at the end and
// LSE = scale·m + ln l. Keys outside the admissible range are never read, so NaN there cannot
// reach the output; a row with no admissible key writes O = 0 and LSE = −inf.
//
// Ownership: one warp per query row, `rows_per_block` warps per block; the grid is flattened
// over (query-row blocks, heads, batch) in x, so B·H is not limited by gridDim.y/z. Lane l owns
// head-dim elements l, l+32, ... (up to 8 each: D ≤ 256) of q and of the output row; a score
// is a warp-shuffle sum of the lanes' partial dot products. K and V rows are read from global
// memory by every warp that needs them (the warps of a block share them through L1).
//
// Bytes and FLOPs: 4·B·Hq·Lq·Lk·D FLOPs (half when causal); K and V are read once per query
// row through L1/L2, so this path is bound by cache bandwidth and shuffles, not by HBM.

#include "common.cuh"
#include "attention_common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int MAX_PER_LANE = CUATTN_ATTENTION_MAX_HEAD_DIM / 32;

template <typename T>
__device__ void attention_exact(const cuattn_attention_fwd_params& p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t row_blocks = (p.len_q + p.rows_per_block - 1) / p.rows_per_block;
    const int64_t flat = blockIdx.x;
    const int64_t rb = flat % row_blocks;
    const int h = (int)((flat / row_blocks) % p.heads_q);
    const int b = (int)(flat / (row_blocks * p.heads_q));
    const int64_t i = rb * p.rows_per_block + warp;

    const SequenceBounds seq = sequence_bounds(p, b);
    const int64_t row0_q = seq.row0_q, row0_k = seq.row0_k, len_q = seq.len_q, key_len = seq.key_len;
    if (i >= len_q) return;  // warp-uniform: no barriers in this kernel

    int64_t begin = 0, end = key_len;  // admissible keys: [begin, end)
    if (p.causal == CUATTN_CAUSAL_TOP_LEFT) end = min(end, i + 1);
    if (p.causal == CUATTN_CAUSAL_BOTTOM_RIGHT) end = min(end, max((int64_t)0, i + key_len - len_q + 1));
    if (p.window_left >= 0 || p.window_right >= 0) {  // sliding window around the window's diagonal
        const int64_t ow = p.window_align == CUATTN_CAUSAL_BOTTOM_RIGHT ? key_len - len_q : 0;
        if (p.window_left >= 0) begin = max(begin, i + ow - p.window_left);
        if (p.window_right >= 0) end = min(end, max((int64_t)0, i + ow + p.window_right + 1));
    }

    const int hk = h / (p.heads_q / p.heads_kv);
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                 (row0_q + i) * p.q_row_stride;
    const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                 row0_k * p.k_row_stride;
    const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                 row0_k * p.v_row_stride;
    T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + (row0_q + i) * p.o_row_stride;

    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e) {
        const int d = lane + 32 * e;
        qr[e] = d < p.dim_qk ? to_f32(q[d]) : 0.f;
        acc[e] = 0.f;
    }
    const float c = p.scale * 1.4426950408889634f;  // exp(scale·s) = 2^(c·s)
    float m = -INFINITY, l = 0.f;
    // One key: score, online-softmax update, O update. Warp-uniform (i and j are the warp's).
    const auto visit = [&](int64_t j) {
        const T* kj = k + j * p.k_row_stride;
        float partial = 0.f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; ++e) {
            const int d = lane + 32 * e;
            if (d < p.dim_qk) partial += qr[e] * to_f32(kj[d]);
        }
        const float s = warp_sum(partial);  // every lane holds the score
        const float m_new = fmaxf(m, s);
        const float alpha = exp2f(c * (m - m_new));  // m = −inf at the first key: exp2(−inf) = 0
        const float pj = exp2f(c * (s - m_new));
        l = l * alpha + pj;
        const T* vj = v + j * p.v_row_stride;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; ++e) {
            const int d = lane + 32 * e;
            if (d < p.dim_v) acc[e] = acc[e] * alpha + pj * to_f32(vj[d]);
        }
        m = m_new;
    };
    if (p.sp_row_offsets) {
        // Block-sparse: the kept key blocks of row i's query block, each key tested against the
        // block's element mask (CUATTN_SPARSE_*); keys past key_len are never visited.
        const int bs = p.sp_block_size;
        const int64_t qb = i / bs;
        const int r = (p.sp_stored_heads == 1 ? 0 : h) * p.sp_q_blocks + (int)qb;
        const int* ro = reinterpret_cast<const int*>(p.sp_row_offsets);
        for (int x = ro[r]; x < ro[r + 1]; ++x) {
            const int kind = reinterpret_cast<const int*>(p.sp_mask_kind)[x];
            const int64_t j0 = (int64_t)reinterpret_cast<const int*>(p.sp_col_indices)[x] * bs;
            const int64_t j1 = min(j0 + bs, key_len);
            const int lo = kind == CUATTN_SPARSE_BAND ? reinterpret_cast<const int*>(p.sp_band_lo)[x] : 0;
            const int hi = kind == CUATTN_SPARSE_BAND ? reinterpret_cast<const int*>(p.sp_band_hi)[x] : 0;
            const uint64_t* bits = kind == CUATTN_SPARSE_BITS
                                       ? reinterpret_cast<const uint64_t*>(p.sp_bits) +
                                             ((int64_t)reinterpret_cast<const int*>(p.sp_bits_index)[x] * bs + (i - qb * bs)) *
                                                 p.sp_words_per_row
                                       : nullptr;
            for (int64_t j = j0; j < j1; ++j) {
                bool keep = true;
                if (kind == CUATTN_SPARSE_BAND) keep = j >= i + lo && j <= i + hi;
                if (bits) keep = (bits[(j - j0) / 64] >> ((j - j0) % 64)) & 1;
                if (keep) visit(j);
            }
        }
    } else {
        for (int64_t j = begin; j < end; ++j) visit(j);
    }
    const bool any = l > 0.f;
    const float inv_l = any ? 1.f / l : 0.f;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e) {
        const int d = lane + 32 * e;
        if (d < p.dim_v) o[d] = from_f32<T>(any ? acc[e] * inv_l : 0.f);
    }
    if (p.lse && lane == 0) {
        float* lse = reinterpret_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + row0_q + i;
        *lse = any ? p.scale * m + logf(l) : -INFINITY;
    }
}

}  // namespace

extern "C" __global__ void attention_exact_f32(const cuattn_attention_fwd_params p) { attention_exact<float>(p); }
extern "C" __global__ void attention_exact_f16(const cuattn_attention_fwd_params p) { attention_exact<__half>(p); }
extern "C" __global__ void attention_exact_bf16(const cuattn_attention_fwd_params p) { attention_exact<__nv_bfloat16>(p); }
