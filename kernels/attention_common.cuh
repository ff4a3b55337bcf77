// Helpers shared by the attention kernels (forward and backward): where a sequence's rows are,
// shared-memory tile loads, and the diagonal band that causal masks and sliding windows leave
// each query row. Included by kernels/attention_*.cu.
#pragma once

#include "common.cuh"
#include "cuattn_params.h"
#include <stdint.h>

namespace cuattn {

// Where sequence b's rows start and how long it is, for dense and packed batches.
struct SequenceBounds {
    int64_t row0_q;   // first query row of the sequence in Q/O (0 for dense batches)
    int64_t row0_k;   // first key row in K/V
    int64_t len_q;    // query rows
    int64_t key_len;  // admissible-by-length keys (after key padding)
    int64_t len_k;    // key rows of the sequence (before key padding)
};

__device__ __forceinline__ SequenceBounds sequence_bounds(const cuattn_attention_fwd_params& p, int b) {
    const bool packed = p.cu_seqlens_q != 0;
    const int* cu_q = reinterpret_cast<const int*>(p.cu_seqlens_q);
    const int* cu_k = reinterpret_cast<const int*>(p.cu_seqlens_k);
    SequenceBounds s;
    s.row0_q = 0;
    s.row0_k = 0;
    s.len_q = p.len_q;
    s.key_len = p.len_k;
    if (packed) {
        // Offsets may come from the device unchecked: clamp each sequence into the tensors'
        // rows and to the longest lengths the grid was sized for.
        const int64_t q0 = min(max((int64_t) cu_q[b], (int64_t) 0), p.total_q);
        const int64_t q1 = min(max((int64_t) cu_q[b + 1], q0), p.total_q);
        const int64_t k0 = min(max((int64_t) cu_k[b], (int64_t) 0), p.total_k);
        const int64_t k1 = min(max((int64_t) cu_k[b + 1], k0), p.total_k);
        s.row0_q = q0;
        s.row0_k = k0;
        s.len_q = min(q1 - q0, (int64_t) p.len_q);
        s.key_len = min(k1 - k0, (int64_t) p.len_k);
    }
    s.len_k = s.key_len;
    if (p.key_lens)
        s.key_len = min(s.key_len, max((int64_t) reinterpret_cast<const int*>(p.key_lens)[b], (int64_t) 0));
    return s;
}

// Starts copying rows [0, ROWS) × cols [0, HD) of a global matrix (row stride in elements) into
// shared memory with pitch HD + 8. Row r is copied iff row_lo ≤ r < row_hi and bit r of the
// 128-bit keep mask (KEEP_MASK only; keep_lo: rows 0–63, keep_hi: 64–127) is set; other rows, and cols ≥
// cols_valid, become 0. With `vec` the copy is asynchronous (complete after cp_async_wait_all);
// without it, synchronous. `fallback` is any valid address: zero-fill copies name it instead
// of the (possibly out-of-range) row they skip.
template <typename T, int HD, int ROWS, int THREADS, bool KEEP_MASK = false>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int row_lo, int row_hi, int cols_valid,
                                          bool vec, const T* fallback, uint64_t keep_lo = ~0ull, uint64_t keep_hi = ~0ull) {
    constexpr int PITCH = HD + 8;
    static_assert(ROWS <= 128, "the keep mask covers 128 rows");
    const auto keep = [&](int r) {
        if constexpr (KEEP_MASK) {  // only sparse bitmask tiles have one; dense loads skip the test
            if (!(((r < 64 ? keep_lo : keep_hi) >> (r & 63)) & 1)) return false;
        }
        return r >= row_lo && r < row_hi;
    };
    if (vec) {
        constexpr int CHUNKS = HD / 8;
        static_assert(ROWS * CHUNKS % THREADS == 0, "tile copies split evenly over the CTA");
#pragma unroll
        for (int i = 0; i < ROWS * CHUNKS / THREADS; ++i) {
            const int idx = threadIdx.x + i * THREADS;
            const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
            const bool ok = keep(r) && c < cols_valid;
            cp_async16(dst + r * PITCH + c, ok ? src + r * row_stride + c : fallback, ok);
        }
        cp_async_commit();
    } else {
        for (int idx = threadIdx.x; idx < ROWS * HD; idx += THREADS) {
            const int r = idx / HD, c = idx % HD;
            dst[r * PITCH + c] = (keep(r) && c < cols_valid) ? src[r * row_stride + c] : from_f32<T>(0.f);
        }
    }
}

// Keys per query row: keep j iff row + lo ≤ j ≤ row + hi and j < key_len (causal masks and
// sliding windows are bands; unbounded sides are clamped so the sums stay in int32).
struct Band {
    int lo, hi;
};

__device__ __forceinline__ int diagonal_offset(int align, int len_q, int key_len) {
    return align == CUATTN_CAUSAL_BOTTOM_RIGHT ? key_len - len_q : 0;
}

// The dense band of one sequence from the causal mask and the sliding window.
__device__ __forceinline__ Band dense_band(const cuattn_attention_fwd_params& p, int len_q, int key_len) {
    Band band{-len_q - 1, key_len};
    if (p.causal != CUATTN_CAUSAL_NONE) band.hi = min(band.hi, diagonal_offset(p.causal, len_q, key_len));
    if (p.window_left >= 0 || p.window_right >= 0) {
        const int ow = diagonal_offset(p.window_align, len_q, key_len);
        if (p.window_left >= 0) band.lo = max(band.lo, ow - min(p.window_left, len_q + key_len + 1));
        if (p.window_right >= 0) band.hi = min(band.hi, ow + min(p.window_right, len_q + key_len + 1));
    }
    return band;
}

}  // namespace cuattn
