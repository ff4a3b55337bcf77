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
    s.row0_q = packed ? cu_q[b] : 0;
    s.row0_k = packed ? cu_k[b] : 0;
    s.len_q = packed ? cu_q[b + 1] - cu_q[b] : p.len_q;
    s.key_len = packed ? cu_k[b + 1] - cu_k[b] : p.len_k;
    if (p.key_lens) s.key_len = min(s.key_len, (int64_t) reinterpret_cast<const int*>(p.key_lens)[b]);
    return s;
}

}  // namespace cuattn
