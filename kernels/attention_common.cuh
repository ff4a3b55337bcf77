// Helpers shared by the attention kernels. Included by kernels/attention_*.cu.
#pragma once

#include "cuattn_params.h"
#include <stdint.h>

namespace cuattn {

// Where sequence b's rows start and how long it is, for dense and packed batches.
struct SequenceBounds {
    int64_t row0_q;   // first query row of the sequence in Q/O (0 for dense batches)
    int64_t row0_k;   // first key row in K/V
    int64_t len_q;    // query rows
    int64_t key_len;  // admissible-by-length keys (after key padding)
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
    if (p.key_lens)
        s.key_len = min(s.key_len, max((int64_t) reinterpret_cast<const int*>(p.key_lens)[b], (int64_t) 0));
    return s;
}

}  // namespace cuattn
