// Helpers shared by the attention kernels (forward and backward): where a sequence's rows are,
// shared-memory tile loads, and the diagonal band that causal masks and sliding windows leave
// each query row, and the kept blocks of block-sparse layouts. Included by kernels/attention_*.cu.
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
// ROW_STEP (vec copies only) picks how a thread finds its copies, not which: thread x always
// copies 16-byte chunk x % (HD/8) of rows x / (HD/8) + i·THREADS/(HD/8). The default divides
// each copy's flat index; ROW_STEP keeps one row base and one column per thread and steps the
// row by a constant. At the 255-register limit the two allocate differently (ptxas numbers in
// docs/kernels/attention-backward.md): ROW_STEP is what ends the backward dK/dV kernels' sm_80
// spills, while the forward's dense HD 128 tile spills more when its K load takes it (its V
// load does take it: KvLoadForm in attention_tc.cu), so callers opt in per load.
template <typename T, int HD, int ROWS, int THREADS, bool KEEP_MASK = false, bool ROW_STEP = false>
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
        if constexpr (ROW_STEP) {
            static_assert(THREADS % CHUNKS == 0, "a thread's copies share one column chunk");
            constexpr int STEP = THREADS / CHUNKS;  // rows between a thread's copies
            const int r0 = (int)threadIdx.x / CHUNKS, c = ((int)threadIdx.x % CHUNKS) * 8;
            const bool col_ok = c < cols_valid;
#pragma unroll
            for (int i = 0; i < ROWS / STEP; ++i) {
                const int r = r0 + i * STEP;
                const bool ok = col_ok && keep(r);
                cp_async16(dst + r * PITCH + c, ok ? src + r * row_stride + c : fallback, ok);
            }
        } else {
#pragma unroll
            for (int i = 0; i < ROWS * CHUNKS / THREADS; ++i) {
                const int idx = threadIdx.x + i * THREADS;
                const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
                const bool ok = keep(r) && c < cols_valid;
                cp_async16(dst + r * PITCH + c, ok ? src + r * row_stride + c : fallback, ok);
            }
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

// ---- Block-sparse layouts (cuattn_params.h sp_*; src/sparse/) ---------------------------------
// Bits [lo, hi) of a 64-bit mask (empty when hi <= lo; lo, hi clamped to [0, 64]).
__device__ __forceinline__ uint64_t bit_range(int lo, int hi) {
    lo = max(lo, 0), hi = min(hi, 64);
    if (hi <= lo) return 0;
    const uint64_t upto = hi == 64 ? ~0ull : (1ull << hi) - 1;
    return upto & ~((1ull << lo) - 1);
}

// Kept block `x` of a layout as one tile of BN keys, BN = the layout's block size <= 64 (the
// backward's tiles), for the query rows [q0, q_last] of its query block: where the keys start, how the tile is masked, and which K/V rows some row
// of the block may keep (the others load as zeros, so NaN there cannot reach a result through
// 0·NaN). Keep (i, j) iff i < len_q, j < key_len, i + lo <= j <= i + hi and, with a bitmask,
// its bit (bits(i, j) below); a FULL tile inside the key length needs none of these tests.
struct SparseTile {
    int key0, kind;         // CUATTN_SPARSE_*; FULL only when the tile ends inside key_len
    int lo, hi;             // the band (open: -(len_q + 1), key_len) for other kinds
    int kv_lo, kv_hi;       // tile rows [kv_lo, kv_hi) may be kept ...
    uint64_t keep;          // ... and of those, the bits set here (a bitmask's union of rows)
    const uint64_t* bits;   // row 0 of the block's bitmask, or null
};

template <int BN>
__device__ __forceinline__ SparseTile sparse_tile(const cuattn_attention_fwd_params& p, int x, int q0, int q_last,
                                                  int len_q, int key_len) {
    static_assert(BN <= 64, "the keep mask is one word");
    const int bs = p.sp_block_size;
    SparseTile ti;
    ti.key0 = reinterpret_cast<const int*>(p.sp_col_indices)[x] * bs;
    ti.kind = reinterpret_cast<const int*>(p.sp_mask_kind)[x];
    ti.lo = -len_q - 1, ti.hi = key_len;
    ti.keep = ~0ull;
    ti.bits = nullptr;
    int lo_key = 0, hi_key = key_len;
    if (ti.kind == CUATTN_SPARSE_BAND) {
        ti.lo = reinterpret_cast<const int*>(p.sp_band_lo)[x];
        ti.hi = reinterpret_cast<const int*>(p.sp_band_hi)[x];
        lo_key = max(0, q0 + ti.lo), hi_key = min(key_len, q_last + ti.hi + 1);
    } else if (ti.kind == CUATTN_SPARSE_BITS) {
        const int64_t bx = reinterpret_cast<const int*>(p.sp_bits_index)[x];
        ti.bits = reinterpret_cast<const uint64_t*>(p.sp_bits) + bx * bs * p.sp_words_per_row;
        const uint64_t u = reinterpret_cast<const uint64_t*>(p.sp_bits_union)[bx * p.sp_words_per_row];
        ti.keep = BN == 64 ? u : u & ((1ull << BN) - 1);
    }
    ti.kv_lo = max(0, lo_key - ti.key0);
    ti.kv_hi = min(BN, hi_key - ti.key0);
    if (ti.kind == CUATTN_SPARSE_FULL && ti.key0 + BN > key_len) ti.kind = CUATTN_SPARSE_KEY_TAIL;
    return ti;
}

// Bit (i, j) of a bitmask tile (positions in the sequence; the block starts at q0, key0).
__device__ __forceinline__ bool sparse_bit(const cuattn_attention_fwd_params& p, const uint64_t* bits, int q0, int key0,
                                           int i, int j) {
    const int c = j - key0;
    return (bits[(int64_t)(i - q0) * p.sp_words_per_row + c / 64] >> (c % 64)) & 1;
}

// Whether kept block x's element mask admits query i, key j (j < key_len is the caller's test).
__device__ __forceinline__ bool sparse_admits(const cuattn_attention_fwd_params& p, int x, int64_t i, int64_t j) {
    const int bs = p.sp_block_size;
    const int kind = reinterpret_cast<const int*>(p.sp_mask_kind)[x];
    if (kind == CUATTN_SPARSE_BAND)
        return j >= i + reinterpret_cast<const int*>(p.sp_band_lo)[x] && j <= i + reinterpret_cast<const int*>(p.sp_band_hi)[x];
    if (kind == CUATTN_SPARSE_BITS) {
        const int64_t bx = reinterpret_cast<const int*>(p.sp_bits_index)[x];
        const int r = (int)(i % bs), c = (int)(j % bs);
        return (reinterpret_cast<const uint64_t*>(p.sp_bits)[(bx * bs + r) * p.sp_words_per_row + c / 64] >> (c % 64)) & 1;
    }
    return true;
}

}  // namespace cuattn
