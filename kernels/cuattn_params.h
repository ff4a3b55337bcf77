/* Launch parameters of every cuattn kernel: one definition, read by the kernels (nvcc) and
 * turned into Rust by bindgen (build.rs). Each kernel takes its struct by value.
 *
 * Conventions: device pointers are uint64_t (0 = absent where a field says it may be);
 * counts and strides are in ELEMENTS, never bytes; strides and row counts are 64-bit so that
 * offsets past 2^31 elements stay exact. Keep this header to <stdint.h>. */
#ifndef CUATTN_PARAMS_H
#define CUATTN_PARAMS_H

#include <stdint.h>

/* Largest hidden size the LayerNorm kernels accept. */
#define CUATTN_LAYERNORM_MAX_HIDDEN 65536

/* LayerNorm forward over the last dim, optionally fused with a residual add:
 *   s = residual ? round_T(x + residual) : x;  y = (s - mean(s)) * rstd(s) * gamma + beta.
 * Element type T (f32/f16/bf16) is given by the kernel's name suffix. */
typedef struct cuattn_layernorm_fwd_params {
    uint64_t x;            /* [rows, hidden] T */
    uint64_t residual;     /* [rows, hidden] T, or 0: plain LayerNorm */
    uint64_t residual_out; /* [rows, hidden] T: s as stored; required when residual != 0 */
    uint64_t gamma;        /* [hidden] T, or 0 for gamma = 1 */
    uint64_t beta;         /* [hidden] T, or 0 for beta = 0 */
    uint64_t y;            /* [rows, hidden] T */
    uint64_t mean;         /* [rows] f32, or 0: not written */
    uint64_t rstd;         /* [rows] f32, or 0: not written */
    int64_t rows;
    int64_t x_row_stride;
    int64_t residual_row_stride;
    int64_t residual_out_row_stride;
    int64_t y_row_stride;
    int32_t hidden;
    int32_t threads_per_row;   /* power of two in [32, 1024]; one row group per row */
    int32_t rows_per_block;    /* row groups per block: blockDim.x = threads_per_row * rows_per_block */
    int32_t vectorized;        /* 1: every row base is 16-byte aligned and hidden % (16/sizeof T) == 0 */
    int32_t cache_rows_in_smem; /* 1: dynamic smem holds rows_per_block rows of T */
    float eps;
} cuattn_layernorm_fwd_params;

/* Where the backward accumulates its per-block dgamma/dbeta partials. */
#define CUATTN_LN_PARTIALS_REGISTERS 0 /* register path: each thread's columns, combined per block */
#define CUATTN_LN_PARTIALS_SHARED 1    /* generic path: 2*hidden floats of dynamic smem per block */
#define CUATTN_LN_PARTIALS_GLOBAL 2    /* generic path: the block's slice of the workspace */
#define CUATTN_LN_PARTIALS_NONE 3      /* generic path: dx only; layernorm_bwd_columns does dgamma/dbeta */

/* LayerNorm backward, stage 1: dx per row, and (unless partials_mode == NONE) per-block partial
 * sums of dgamma and dbeta, left in partials[b][0][:] (dgamma) and partials[b][1][:] (dbeta),
 * f32, for block b. A block holds rows_per_block groups of threads_per_row threads; group g
 * of block b handles rows (b * rows_per_block + g) + k * gridDim.x * rows_per_block. */
typedef struct cuattn_layernorm_bwd_params {
    uint64_t dy;       /* [rows, hidden] T */
    uint64_t x;        /* [rows, hidden] T: the forward's input (s for the fused residual form) */
    uint64_t gamma;    /* [hidden] T, or 0 for gamma = 1 */
    uint64_t mean;     /* [rows] f32 from the forward */
    uint64_t rstd;     /* [rows] f32 from the forward */
    uint64_t dx;       /* [rows, hidden] T */
    uint64_t partials; /* [gridDim.x, 2, hidden] f32 workspace */
    int64_t rows;
    int64_t dy_row_stride;
    int64_t x_row_stride;
    int64_t dx_row_stride;
    int32_t hidden;
    int32_t threads_per_row;    /* power of two in [32, 1024] */
    int32_t rows_per_block;     /* register path only; the generic path has one group per block */
    int32_t vectorized;         /* as in the forward, for dy, x and dx */
    int32_t partials_mode;      /* CUATTN_LN_PARTIALS_* */
    int32_t cache_rows_in_smem; /* generic path: dynamic smem (after any partials) caches x and dy */
} cuattn_layernorm_bwd_params;

/* LayerNorm backward, dgamma/dbeta by columns (for rows too wide for per-block partials):
 * block (bx, by) sums rows [by * rows_per_chunk, (by + 1) * rows_per_chunk) of the column
 * packs [bx * 32, bx * 32 + 32) into partials[by][0..2][:]. blockDim = (32, 8). */
typedef struct cuattn_layernorm_bwd_columns_params {
    uint64_t dy;       /* [rows, hidden] T */
    uint64_t x;        /* [rows, hidden] T */
    uint64_t mean;     /* [rows] f32 */
    uint64_t rstd;     /* [rows] f32 */
    uint64_t partials; /* [gridDim.y, 2, hidden] f32 */
    int64_t rows;
    int64_t dy_row_stride;
    int64_t x_row_stride;
    int64_t rows_per_chunk;
    int32_t hidden;
    int32_t vectorized;
} cuattn_layernorm_bwd_columns_params;

/* LayerNorm backward, stage 2: dgamma[j] = sum_b partials[b][0][j], dbeta likewise, summed in
 * block order so the result is bitwise deterministic. */
typedef struct cuattn_layernorm_bwd_reduce_params {
    uint64_t partials; /* [num_partials, 2, hidden] f32 */
    uint64_t dgamma;   /* [hidden] T, or 0: not written */
    uint64_t dbeta;    /* [hidden] T, or 0: not written */
    int32_t num_partials;
    int32_t hidden;
} cuattn_layernorm_bwd_reduce_params;

/* Scaled dot-product attention forward. Element (b, h, i, d) of Q lives at
 *   q + b*q_batch_stride + h*q_head_stride + (row0_q(b) + i)*q_row_stride + d
 * (likewise K, V, O), where row0_q(b) is 0 for dense batches and cu_seqlens_q[b] for packed
 * variable-length ones (whose batch strides are then 0). LSE (f32) of (b, h, i) lives at
 *   lse + b*lse_batch_stride + h*lse_head_stride + row0_q(b) + i. */
#define CUATTN_CAUSAL_NONE 0
#define CUATTN_CAUSAL_TOP_LEFT 1     /* key j visible to query i iff j <= i */
#define CUATTN_CAUSAL_BOTTOM_RIGHT 2 /* iff j <= i + key_len - len_q (KV-cache convention) */
#define CUATTN_ATTENTION_MAX_HEAD_DIM 256

/* Tensor-core kernel tiles (kernels/attention_tc.cu), by head dim padded to 64, 128 or 256:
 * query rows per CTA (BM) and keys per tile (BN); CUATTN_ATTN_TC_THREADS threads per CTA.
 * Shared memory: (BM + 2*BN) * (HD + 8) * 2 bytes. */
#define CUATTN_ATTN_TC_THREADS 128
#define CUATTN_ATTN_TC_BM_HD64 128
#define CUATTN_ATTN_TC_BN_HD64 128
#define CUATTN_ATTN_TC_BM_HD128 128
#define CUATTN_ATTN_TC_BN_HD128 64
#define CUATTN_ATTN_TC_BM_HD256 64
#define CUATTN_ATTN_TC_BN_HD256 32

/* Hopper kernel (kernels/attention_hopper.cu, sm_90a only): one producer warpgroup issuing TMA
 * loads and two consumer warpgroups of 64 query rows each; key tiles of BN rows in a ring of
 * STAGES buffers. Head dims 64 and 128 (D = Dv). Named barrier ids: 0 is __syncthreads, 1 and 2
 * the consumers' turn-taking (ping-pong), 3 the consumers' V-padding fence. Register budget
 * after setmaxnreg: producer REGS_PRODUCER, consumers REGS_CONSUMER
 * (128*REGS_PRODUCER + 256*REGS_CONSUMER <= 65536). */
#define CUATTN_ATTN_HOPPER_THREADS 384
#define CUATTN_ATTN_HOPPER_BM 128
#define CUATTN_ATTN_HOPPER_BN 128
#define CUATTN_ATTN_HOPPER_STAGES 2
#define CUATTN_ATTN_HOPPER_REGS_PRODUCER 24
#define CUATTN_ATTN_HOPPER_REGS_CONSUMER 240
#define CUATTN_ATTN_HOPPER_BAR_TURN0 1
#define CUATTN_ATTN_HOPPER_BAR_VPAD 3
/* Dynamic shared memory per block: Q, STAGES K and V tiles and the mbarriers, plus 1 KiB the
 * kernel may skip to put its tiles on a 1024-byte boundary (the 128-byte swizzle's period). */
#define CUATTN_ATTN_HOPPER_SMEM_HD64 83968  /* 82944 + 1024 */
#define CUATTN_ATTN_HOPPER_SMEM_HD128 165888 /* 164864 + 1024 */
/* One TMA box: 64 columns (128 bytes of a 16-bit type, the 128-byte swizzle span) by BM or BN rows. */
#define CUATTN_ATTN_HOPPER_BOX_COLS 64

/* Block-sparse entries (attention_sparse_bs{BS}_hd{HD}_{f16,bf16}): query blocks of the layout's
 * block size BS ∈ {64, 128} (128 only for HD ≤ 128), key tiles of CUATTN_SPARSE_BN_BS{BS}_HD{HD}.
 * Per kept block, the element-mask kind (src/sparse/layout.rs DeviceLayout): */
#define CUATTN_SPARSE_FULL 0
#define CUATTN_SPARSE_KEY_TAIL 1
#define CUATTN_SPARSE_BAND 2 /* keep i + band_lo <= j <= i + band_hi */
#define CUATTN_SPARSE_BITS 3 /* keep iff bit (i, j) of the block's bitmask is set */
#define CUATTN_SPARSE_BN_BS64_HD64 64
#define CUATTN_SPARSE_BN_BS64_HD128 64
#define CUATTN_SPARSE_BN_BS64_HD256 32
#define CUATTN_SPARSE_BN_BS128_HD64 128
#define CUATTN_SPARSE_BN_BS128_HD128 64

typedef struct cuattn_attention_fwd_params {
    uint64_t q, k, v; /* T */
    uint64_t o;       /* T */
    uint64_t lse;     /* f32, or 0: not written */
    uint64_t key_lens;      /* int32 [batch]: valid keys per sequence, or 0 (all) */
    uint64_t cu_seqlens_q;  /* int32 [batch + 1] for packed variable-length batches, or 0 */
    uint64_t cu_seqlens_k;  /* int32 [batch + 1], with cu_seqlens_q */
    int64_t q_batch_stride, q_head_stride, q_row_stride;
    int64_t k_batch_stride, k_head_stride, k_row_stride;
    int64_t v_batch_stride, v_head_stride, v_row_stride;
    int64_t o_batch_stride, o_head_stride, o_row_stride;
    int64_t lse_batch_stride, lse_head_stride;
    int32_t batch, heads_q, heads_kv;
    int32_t len_q, len_k; /* dense: the lengths; packed: the longest sequence's */
    int32_t dim_qk, dim_v;
    int32_t causal;       /* CUATTN_CAUSAL_* */
    float scale;          /* multiplies q.k */
    int32_t rows_per_block; /* exact kernel: one warp per query row */
    int32_t vectorized;     /* tensor-core kernel: every Q/K/V row starts 16-byte aligned and
                               D, Dv are multiples of 8, so tiles load as 16-byte chunks */
    /* Sliding window (tensor-core kernel): query i sees keys i + o - left ..= i + o + right, o the
     * diagonal offset of window_align (CUATTN_CAUSAL_TOP_LEFT/_BOTTOM_RIGHT); -1: that side open.
     * Combined with `causal` the band is the intersection. */
    int32_t window_left, window_right, window_align;
    /* Block-sparse layout (attention_sparse_* entries; 0 otherwise). Row (head, q_block) at
     * r = (sp_stored_heads == 1 ? 0 : head) * sp_q_blocks + q_block keeps key blocks
     * sp_col_indices[sp_row_offsets[r] .. sp_row_offsets[r + 1]]; per kept block: sp_mask_kind
     * (CUATTN_SPARSE_*), sp_band_lo/hi, sp_bits_index (int32). sp_bits: u64 bitmasks, block
     * index x, row i, key column c at sp_bits[(x*BS + i)*sp_words_per_row + c/64] bit c%64;
     * sp_bits_union: per bitmask, the OR of its rows (sp_words_per_row words). */
    uint64_t sp_row_offsets, sp_col_indices, sp_mask_kind, sp_band_lo, sp_band_hi, sp_bits_index;
    uint64_t sp_bits, sp_bits_union;
    int32_t sp_block_size, sp_stored_heads, sp_q_blocks, sp_words_per_row;
    /* Packed batches: rows of Q and of K/V. Offsets read from the device are clamped to these
     * (and each sequence to len_q/len_k), so bad offsets give wrong rows, never reads outside. */
    int64_t total_q, total_k;
} cuattn_attention_fwd_params;

/* ---- Attention backward (kernels/attention_bwd.cu) -------------------------------------------
 * dQ, dK, dV of the forward above, for output gradient dO. `fwd` describes the forward call
 * exactly as it ran (Q, K, V, its O and LSE, masks, layout; its rows_per_block is the exact
 * kernels' warps per block). dO and dQ are laid out like O and Q by their own strides, dK and dV
 * like K and V. delta (f32, D_i = rowsum(dO∘O)) is laid out like LSE. dq_accum (f32, fast mode
 * only) holds row r of the LSE layout at r·dim_qk: element (b, h, i, d) at
 *   (b*lse_batch_stride + h*lse_head_stride + row0_q(b) + i) * dim_qk + d.
 * Every element of dQ, dK, dV is written (zeros where no admissible pair reaches it). */
#define CUATTN_ATTN_BWD_THREADS 128
/* Tensor-core tiles, head dims padded to 64, 128 or 256: keys per CTA of the dK/dV kernel (16 per
 * warp) and query rows per tile it walks; the dQ kernel swaps the roles (query rows per CTA,
 * keys per tile). Shared memory: see attention_bwd.cu. */
#define CUATTN_ATTN_BWD_BN 64
#define CUATTN_ATTN_BWD_BM 64
/* Head-dim tile 256 (D or Dv in 129..=256): gradient columns per CTA. The dK/dV grid has
 * ceil(max(D, Dv) / COLS) column blocks per key block, the deterministic dQ grid ceil(D / COLS)
 * per query block; block c accumulates and writes columns [c*COLS, c*COLS + COLS) and
 * recomputes S^T, dP^T (S, dP) over all columns. Flattened grid index, fastest first:
 * key (query) block, column block, K/V (query) head, batch. */
#define CUATTN_ATTN_BWD_COLS 128
/* Query rows per block of the delta and dQ-convert kernels (one warp each). */
#define CUATTN_ATTN_BWD_ROWS_PER_BLOCK 4
/* Block-sparse backward (attention_bwd_sparse_*): the one layout block size the tensor-core
 * entries take, a layout block being one tile of each pass (= BM = BN). The exact kernels
 * take any block size the layout type supports. */
#define CUATTN_ATTN_BWD_SPARSE_BS 64

typedef struct cuattn_attention_bwd_params {
    cuattn_attention_fwd_params fwd;
    uint64_t d_o;      /* T, strides do_* */
    uint64_t dq;       /* T, strides dq_* */
    uint64_t dk, dv;   /* T, strides dk_*, dv_* */
    uint64_t delta;    /* f32, LSE layout */
    uint64_t dq_accum; /* f32, see above; 0 in deterministic mode */
    int64_t do_batch_stride, do_head_stride, do_row_stride;
    int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
    int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
    int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
    int32_t atomic_dq; /* 1: the dK/dV kernel adds dQ into dq_accum (f32 atomics) */
    /* Block-sparse layouts (with fwd.sp_*; 0 otherwise): the layout's compressed columns
     * (src/sparse/columns.rs), which the dK/dV pass walks. Column
     *   c = (fwd.sp_stored_heads == 1 ? 0 : head) * sp_k_blocks + key_block
     * holds entries sp_col_offsets[c] .. sp_col_offsets[c + 1] (int32, stored heads * k_blocks
     * + 1 of them); entry e is query block sp_col_q_blocks[e] (ascending in a column), whose
     * kept block is entry sp_col_blocks[e] of the rows (fwd.sp_col_indices, sp_mask_kind, ...). */
    uint64_t sp_col_offsets, sp_col_q_blocks, sp_col_blocks;
    int32_t sp_k_blocks;
} cuattn_attention_bwd_params;

/* Row softmax of the unfused attention baseline (kernels/attention_unfused.cu): scores S (f32)
 * [rows, len_k], row = bh*len_q + i for head-batch bh and query i; writes probabilities P (T,
 * same shape, 0 for masked keys) and, if lse != 0, LSE (f32 [rows]). */
typedef struct cuattn_attention_softmax_params {
    uint64_t scores; /* f32 */
    uint64_t probs;  /* T */
    uint64_t lse;    /* f32, or 0 */
    int32_t len_q, len_k;
    int32_t causal; /* CUATTN_CAUSAL_* */
    float scale;
} cuattn_attention_softmax_params;
/* ---- Single-token decode attention over a KV cache (kernels/decode.cu) ----------------------
 * Query (b, h) [one token] at q + b*q_batch_stride + h*q_head_stride + d; cache row j of
 * kv-head hk at k + b*k_batch_stride + hk*k_head_stride + j*k_row_stride + d (likewise V).
 * Sequence b attends to cache rows [0, clamp(cache_lens[b], 0, capacity)).
 * Split s of `splits` covers key tiles of CUATTN_DECODE_SPLIT_TILE rows:
 *   per = ceil(ceil(len/TILE)/splits); keys [s*per*TILE, (s+1)*per*TILE) ∩ [0, len).
 * Phase 1 (decode_split_*): one block per (batch, kv-head, head chunk, split), flattened in x;
 * writes workspace O_s (f32, normalised) and LSE_s, or, when splits == 1, O and LSE directly.
 * Phase 2 (decode_merge_*): one warp per (batch, q-head) row merges the splits. */
#define CUATTN_DECODE_SPLIT_TILE 64
#define CUATTN_DECODE_MAX_HEAD_DIM 256
#define CUATTN_DECODE_THREADS 128 /* threads of a split block */

typedef struct cuattn_decode_params {
    uint64_t q;          /* [B, Hq, D] T */
    uint64_t k, v;       /* [B, Hkv, capacity, D] T */
    uint64_t o;          /* [B, Hq, D] T */
    uint64_t lse;        /* [B, Hq] f32 (contiguous), or 0: not written */
    uint64_t cache_lens; /* int32 [B] on the device */
    uint64_t ws_o;       /* f32 [B, Hq, splits, D]: split outputs (splits > 1) */
    uint64_t ws_lse;     /* f32 [B, Hq, splits] */
    int64_t q_batch_stride, q_head_stride;
    int64_t k_batch_stride, k_head_stride, k_row_stride;
    int64_t v_batch_stride, v_head_stride, v_row_stride;
    int64_t o_batch_stride, o_head_stride;
    int32_t batch, heads_q, heads_kv;
    int32_t capacity;     /* cache rows allocated per sequence */
    int32_t dim;          /* head dim of q, K, V and O */
    int32_t splits;
    int32_t head_chunks;  /* ceil((Hq/Hkv) / heads per block) */
    int32_t vectorized;   /* 1: K/V base, strides and dim allow 16-byte loads */
    float scale;          /* multiplies q.k; positive */
} cuattn_decode_params;

/* ------------------------------------------------------------------------------------------
 * Transformer runtime's small elementwise ops (kernels/runtime_ops.cu). Element type T
 * (f32/f16/bf16) is given by the kernel's name suffix; arithmetic is f32.
 * ------------------------------------------------------------------------------------------ */
#define CUATTN_ACT_NONE 0
#define CUATTN_ACT_GELU_ERF 1  /* x * Phi(x), exact erf */
#define CUATTN_ACT_GELU_TANH 2 /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
#define CUATTN_ACT_RELU 3
#define CUATTN_ACT_TANH 4

/* In place: x[r, c] = act(x[r, c] + bias[c]) over a contiguous [rows, cols] tensor. */
typedef struct cuattn_bias_act_params {
    uint64_t x;    /* [rows, cols] T */
    uint64_t bias; /* [cols] T, or 0: no bias */
    int64_t rows;
    int64_t cols;
    int32_t act;   /* CUATTN_ACT_* */
} cuattn_bias_act_params;

/* out[i] = a[i] + b[i] over n contiguous elements (out may alias a or b). */
typedef struct cuattn_add_params {
    uint64_t a, b, out; /* [n] T */
    int64_t n;
} cuattn_add_params;

/* out[r, :] = table[ids[r], :] (embedding lookup). Ids that stay on the device cannot be
 * checked on the host: an id >= table_rows (a negative i32 read as uint32 included) gives a
 * row of NaN instead of a read outside the table. */
typedef struct cuattn_gather_rows_params {
    uint64_t table; /* [table_rows, width] T */
    uint64_t ids;   /* [rows] uint32 */
    uint64_t out;   /* [rows, width] T */
    int64_t rows;
    int64_t width;
    int64_t table_rows;
} cuattn_gather_rows_params;

/* KV-cache append: for each sequence b and t < count[b], row b·len_new + t of the step's keys
   and values (a `width`-column block of rows `src_row_stride` apart: a fused projection's
   output) is copied to cache row b·capacity + start[b] + t. Rows past the capacity are never
   written (the host checks start + count ≤ capacity; the kernel guards it too). Bit copies:
   the kernel's suffix is the element size (b32: f32, b16: f16/bf16). */
typedef struct cuattn_append_kv_params {
    uint64_t src_k, src_v;     /* first element of the key / value block, T */
    uint64_t dst_k, dst_v;     /* caches [batch, capacity, width] T, contiguous */
    uint64_t start_count;      /* [2·batch] int32: start[b] for all b, then count[b] */
    int64_t src_row_stride;    /* elements between consecutive source rows */
    int64_t batch;
    int64_t len_new;           /* source rows per sequence */
    int64_t capacity;          /* cache rows per sequence */
    int64_t width;             /* elements per row (heads·dim) */
} cuattn_append_kv_params;

/* ---------------------------------------------------------------------------------------------
 * Training ops (kernels/training_ops.cu; docs/kernels/training-ops.md). Element type T of the
 * activations and gradients is the kernel's name suffix; optimizer state and master weights
 * are f32. Every reduction runs in a fixed order, so results are bitwise repeatable.
 * ------------------------------------------------------------------------------------------- */

/* Column-sum tiles: a block of (CUATTN_COLSUM_COLS, CUATTN_COLSUM_ROWS) threads owns 32 columns
 * of one chunk of rows. */
#define CUATTN_COLSUM_COLS 32
#define CUATTN_COLSUM_ROWS 8

/* Fused bias + GELU forward: y = gelu(x + bias), computed in f32 and rounded once to T.
 * act is CUATTN_ACT_GELU_ERF or CUATTN_ACT_GELU_TANH. */
typedef struct cuattn_bias_gelu_fwd_params {
    uint64_t x;    /* [rows, cols] T */
    uint64_t bias; /* [cols] T, or 0 */
    uint64_t y;    /* [rows, cols] T; may equal x */
    int64_t rows;
    int64_t cols;
    int32_t act;
    int32_t vectorized; /* 1: x, y, bias 16-byte aligned and cols % (16 / sizeof T) == 0 */
} cuattn_bias_gelu_fwd_params;

/* Column partial sums, stage 1 of both the bias gradient (plain column sum of dy) and the fused
 * bias + GELU backward (x != 0: g = dy * gelu'(x + bias), written to dx, and summed).
 * Block (bx, by) owns columns [32 bx, 32 bx + 32) of rows [by rows_per_chunk, (by + 1)
 * rows_per_chunk) and writes partials[by][col] (f32). */
typedef struct cuattn_colsum_params {
    uint64_t dy;       /* [rows, cols] T */
    uint64_t x;        /* [rows, cols] T: the GELU's input before the bias, or 0 */
    uint64_t bias;     /* [cols] T, or 0 (only read when x != 0) */
    uint64_t dx;       /* [rows, cols] T, written iff x != 0; may equal dy */
    uint64_t partials; /* [gridDim.y, cols] f32 */
    int64_t rows;
    int64_t cols;
    int64_t rows_per_chunk; /* multiple of CUATTN_COLSUM_ROWS */
    int32_t act;
} cuattn_colsum_params;

/* Column sums, stage 2: out[c] = (accumulate ? out[c] : 0) + sum over chunks of partials[.][c],
 * chunks added in ascending order. Output type O is the name suffix. */
typedef struct cuattn_colsum_reduce_params {
    uint64_t partials; /* [chunks, cols] f32 */
    uint64_t out;      /* [cols] O */
    int64_t chunks;
    int64_t cols;
    int32_t accumulate;
} cuattn_colsum_reduce_params;

/* Softmax cross-entropy over the last dim, one block per row (grid-stride over rows):
 * with t = (1 - smoothing) onehot(label) + smoothing / classes,
 *   row_loss[r] = logsumexp(x_r) - sum_j t_j x_rj      (0 for a row whose label is ignore_index)
 *   dlogits[r]  = (softmax(x_r) - t) * grad_scale       (0 for an ignored row)
 * where grad_scale = upstream gradient / (number of non-ignored rows), computed by the caller.
 * dlogits may equal logits: each element is read (twice) before its own write, by one thread. */
typedef struct cuattn_xent_params {
    uint64_t logits;   /* [rows, classes] T */
    uint64_t labels;   /* [rows] int32, each in [0, classes) or ignore_index */
    uint64_t dlogits;  /* [rows, classes] T, or 0: loss only */
    uint64_t row_loss; /* [rows] f32 */
    int64_t rows;
    int64_t classes;
    int64_t logits_row_stride;
    int64_t dlogits_row_stride;
    int32_t ignore_index;
    float smoothing;
    float grad_scale;
} cuattn_xent_params;

/* Sum of n f32 values in a fixed order by one block, times scale: out[0] = scale * sum(values).
 * With finish_norm: out[0] = sqrt(sum), out[1] = min(1, max_norm / (out[0] + 1e-6)). */
typedef struct cuattn_sum_params {
    uint64_t values; /* [n] f32 */
    uint64_t out;    /* [1] f32, or [2] with finish_norm */
    int64_t n;
    float scale;
    float max_norm;
    int32_t finish_norm;
} cuattn_sum_params;

/* Embedding backward as a deterministic scatter-add: the tokens are grouped by table row on the
 * host (group g = row group_rows[g], tokens positions[group_start[g] .. group_start[g + 1]) in
 * ascending order); block (g, bc) owns row group_rows[g], columns [bc blockDim, (bc + 1)
 * blockDim) and adds that group's dy rows in order: dtable[row] += sum. No two blocks share an
 * element, so no atomics. Names: embedding_bwd_{T of dy}_{G of dtable}. */
typedef struct cuattn_embedding_bwd_params {
    uint64_t dy;          /* [tokens, width] T */
    uint64_t positions;   /* [tokens] int32 */
    uint64_t group_rows;  /* [groups] int32 */
    uint64_t group_start; /* [groups + 1] int32 */
    uint64_t dtable;      /* [vocab, width] G */
    int64_t groups;
    int64_t width;
    int64_t dy_row_stride;
} cuattn_embedding_bwd_params;

/* Multi-tensor apply: a device table of tensors and one of chunks; block b processes chunk
 * chunks[b] = (tensor, index): elements [index * CUATTN_MT_CHUNK, min(numel, (index + 1) *
 * CUATTN_MT_CHUNK)) of that tensor. */
#define CUATTN_MT_CHUNK 65536
#define CUATTN_MT_THREADS 512

typedef struct cuattn_mt_tensor {
    uint64_t param;      /* [numel] f32 master weights (AdamW) */
    uint64_t grad;       /* [numel] G */
    uint64_t exp_avg;    /* [numel] f32 (AdamW) */
    uint64_t exp_avg_sq; /* [numel] f32 (AdamW) */
    uint64_t model;      /* [numel] M: the model's copy written by AdamW, or 0 */
    int64_t numel;
    int32_t weight_decay; /* 1: AdamW decays this tensor */
    int32_t vectorized;   /* 1: every pointer above aligned to 4 of its elements */
} cuattn_mt_tensor;

typedef struct cuattn_mt_chunk {
    int32_t tensor;
    int32_t index;
} cuattn_mt_chunk;

/* AdamW, PyTorch's formula (torch.optim.AdamW, amsgrad off):
 *   g = grad * (grad_scale ? *grad_scale : 1)
 *   p *= 1 - lr * weight_decay           (tensors with weight_decay = 1)
 *   m += (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
 *   p -= (lr / bias_correction1) * m / (sqrt(v) / bias_correction2_sqrt + eps)
 *   model = round_M(p)                    (when the tensor has a model copy)
 * Names: adamw_{G}_{M}. */
typedef struct cuattn_adamw_params {
    uint64_t tensors;    /* [num_tensors] cuattn_mt_tensor */
    uint64_t chunks;     /* [num_chunks] cuattn_mt_chunk */
    uint64_t grad_scale; /* [1] f32 on the device (e.g. the clip coefficient), or 0 */
    int32_t num_chunks;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bias_correction1;      /* 1 - beta1^step */
    float bias_correction2_sqrt; /* sqrt(1 - beta2^step) */
} cuattn_adamw_params;

/* Gradient L2 norm, stage 1: partials[b] = sum of grad^2 over chunk b (f32, fixed order).
 * Stage 2 is cuattn_sum_params with finish_norm. Scaling (mt_scale_{G}): grad *= *coef for every
 * tensor when *coef < 1. */
typedef struct cuattn_mt_reduce_params {
    uint64_t tensors;  /* [num_tensors] cuattn_mt_tensor (grad, numel, vectorized read) */
    uint64_t chunks;   /* [num_chunks] cuattn_mt_chunk */
    uint64_t partials; /* [num_chunks] f32 (grad_norm_partials) */
    uint64_t coef;     /* [1] f32 (mt_scale) */
    int32_t num_chunks;
} cuattn_mt_reduce_params;

/* Dropout (forward x -> y and backward dy -> dx alike): element i (logical row-major index) is
 * kept iff word_i >= threshold, where word_i is word i % 4 of Philox4x32-10 with key = seed and
 * counter = (i / 4, offset) (kernels/philox.cuh, src/rng.rs); kept elements are multiplied by
 * scale = 1 / (1 - p) in f32, dropped ones are 0. No mask is stored. */
typedef struct cuattn_dropout_params {
    uint64_t x;         /* [n] T */
    uint64_t y;         /* [n] T; may equal x */
    int64_t n;
    uint64_t seed;
    uint64_t offset;
    uint64_t threshold; /* round(p * 2^32), 0 ..= 2^32 */
    float scale;
    int32_t vectorized; /* 1: x and y aligned to 4 elements */
} cuattn_dropout_params;

/* ---- The training runtime's glue kernels (kernels/training_ops.cu, src/runtime/cuda_train.rs) */

/* dst[i] = round_D(src[i]) over n contiguous elements; kernel cast_{S}_to_{D}. */
typedef struct cuattn_cast_params {
    uint64_t src; /* [n] S */
    uint64_t dst; /* [n] D, disjoint from src */
    int64_t n;
} cuattn_cast_params;

/* A 2-D block copy (column slices and concatenation; kernel copy2d_b32 / copy2d_b16 by element
 * size): dst[r * dst_stride + c] = src[r * src_stride + c] for r < rows, c < width. src and
 * dst point at the block's first element and do not overlap. */
typedef struct cuattn_copy2d_params {
    uint64_t src;
    uint64_t dst;
    int64_t rows;
    int64_t width;
    int64_t src_stride;
    int64_t dst_stride;
} cuattn_copy2d_params;

/* Elementwise ops (kernel ew_{T}): out[i] = f(a[i], b[i]) over n contiguous elements in f32,
 * rounded once to T. out may be a or b exactly (each element is read, then written, by one
 * thread). */
#define CUATTN_EW_MUL 0         /* a * b */
#define CUATTN_EW_SIGMOID 1     /* 1 / (1 + exp(-a)); b unused */
#define CUATTN_EW_SIGMOID_BWD 2 /* b * a * (1 - a), a the sigmoid's output */
#define CUATTN_EW_TANH_BWD 3    /* b * (1 - a * a), a the tanh's output */
#define CUATTN_EW_ACT_BWD 4     /* b * act'(a), a the activation's input, act a CUATTN_ACT_* */
#define CUATTN_EW_AXPY 5        /* a + alpha * b */
#define CUATTN_EW_SCALE 6       /* alpha * a; b unused */
typedef struct cuattn_ew_params {
    uint64_t a;   /* [n] T */
    uint64_t b;   /* [n] T, or 0 where the op has no second operand */
    uint64_t out; /* [n] T */
    int64_t n;
    int32_t op;   /* CUATTN_EW_* */
    int32_t act;  /* CUATTN_ACT_*, for CUATTN_EW_ACT_BWD */
    float alpha;
} cuattn_ew_params;

/* Row softmax of the unfused attention with dropout (kernel attn_softmax_fwd_{T}). Row r of the
 * [batch, heads_q, len_q, len_k] f32 scores is query i = r % len_q of head-batch r / len_q,
 * sequence b = r / (heads_q * len_q). Its admissible keys are [0, end): end = key_len(b)
 * (key_lens[b] clamped to [0, len_k], or len_k), cut at i + off + 1 by a causal mask (off = 0
 * top-left, key_len(b) - len_q bottom-right). P = exp(scale * s - lse) for j < end, 0 for
 * end <= j < len_k. lse_in = 0: lse = log sum_j exp(scale * s_j) is computed and written (-inf
 * when end = 0); lse_in = 1: lse is read (the backward recomputing the forward's P). */
typedef struct cuattn_attn_softmax_fwd_params {
    uint64_t scores;   /* [rows, len_k] f32 */
    uint64_t probs;    /* [rows, len_k] T */
    uint64_t lse;      /* [rows] f32 */
    uint64_t key_lens; /* [batch] int32, or 0: every sequence has len_k keys */
    int64_t rows;
    int32_t heads_q;
    int32_t len_q;
    int32_t len_k;
    int32_t causal; /* CUATTN_CAUSAL_* */
    int32_t lse_in;
    float scale;
} cuattn_attn_softmax_fwd_params;

/* Softmax backward of the same rows (kernel attn_softmax_bwd_{T}):
 * dS[r, j] = scale * P[r, j] * (dP[r, j] - sum_k P[r, k] dP[r, k]), P the undropped
 * probabilities and dP = dL/dP (through the dropout mask). Masked keys have P = 0, so dS = 0. */
typedef struct cuattn_attn_softmax_bwd_params {
    uint64_t probs;   /* [rows, len_k] T */
    uint64_t dprobs;  /* [rows, len_k] f32 */
    uint64_t dscores; /* [rows, len_k] T */
    int64_t rows;
    int32_t len_k;
    float scale;
} cuattn_attn_softmax_bwd_params;

/* ---- The recurrent models' fused ops (kernels/rnn_ops.cu) ---------------------------------- */

/* One GRU step after its two GEMMs (kernels gru_fwd_{T}, gru_bwd_{T}). gi = x W_ih^T + b_ih and
 * gh = h W_hh^T + b_hh are [batch, 3H] in the blocks (r, z, n); h, out, dout, dh are [batch, H];
 * cache is [batch, 4H] holding (r, z, n, gh_n) per row. active is [batch] uint8 or 0 (every row
 * active): an inactive row keeps its state (out = h, dh = dout) and gets zero gate gradients and
 * a zero cache row. The forward reads gi, gh, h, active and writes out, cache; the backward
 * reads cache, h, dout, active and writes dgi, dgh, dh. All T. */
typedef struct cuattn_gru_params {
    uint64_t gi;     /* [batch, 3H] T (forward) */
    uint64_t gh;     /* [batch, 3H] T (forward) */
    uint64_t h;      /* [batch, H] T */
    uint64_t active; /* [batch] uint8, or 0 */
    uint64_t out;    /* [batch, H] T (forward) */
    uint64_t cache;  /* [batch, 4H] T: written by the forward, read by the backward */
    uint64_t dout;   /* [batch, H] T (backward) */
    uint64_t dgi;    /* [batch, 3H] T (backward) */
    uint64_t dgh;    /* [batch, 3H] T (backward) */
    uint64_t dh;     /* [batch, H] T (backward) */
    int64_t batch;
    int64_t hidden;
} cuattn_gru_params;

/* One LSTM step after its two GEMMs (kernels lstm_fwd_{T}, lstm_bwd_{T}), PyTorch's nn.LSTM
 * gates. gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh are [batch, 4H] in the blocks
 * (i, f, g, o); h, c, h_out, c_out, dh_out, dc_out, dh, dc are [batch, H]; cache is [batch, 5H]
 * holding (i, f, g, o, tanh c') per row. active is [batch] uint8 or 0 (every row active): an
 * inactive row keeps its state (h_out = h, c_out = c; dh = dh_out, dc = dc_out) and gets zero
 * gate gradients and a zero cache row; an active row's dh is 0 (h reaches the step only
 * through gh: the caller adds dgates W_hh). The forward reads gi, gh, h, c, active and writes
 * h_out, c_out, cache; the backward reads cache, c, dh_out, dc_out, active and writes dgates
 * (= dL/dgi = dL/dgh), dh, dc. All T. */
typedef struct cuattn_lstm_params {
    uint64_t gi;     /* [batch, 4H] T (forward) */
    uint64_t gh;     /* [batch, 4H] T (forward) */
    uint64_t h;      /* [batch, H] T (forward) */
    uint64_t c;      /* [batch, H] T: the step's input memory */
    uint64_t active; /* [batch] uint8, or 0 */
    uint64_t h_out;  /* [batch, H] T (forward) */
    uint64_t c_out;  /* [batch, H] T (forward) */
    uint64_t cache;  /* [batch, 5H] T: written by the forward, read by the backward */
    uint64_t dh_out; /* [batch, H] T (backward) */
    uint64_t dc_out; /* [batch, H] T (backward) */
    uint64_t dgates; /* [batch, 4H] T (backward) */
    uint64_t dh;     /* [batch, H] T (backward) */
    uint64_t dc;     /* [batch, H] T (backward) */
    int64_t batch;
    int64_t hidden;
} cuattn_lstm_params;

/* Threads of an additive-attention block, and the most keys per sequence (its dynamic shared
 * memory holds len_k floats forward, 2 len_k backward: under the 48 KiB a block gets without
 * opting in, with the 128 bytes of its static reduction buffer). */
#define CUATTN_ADDITIVE_THREADS 256
#define CUATTN_ADDITIVE_MAX_KEYS 6000

/* Bahdanau's additive attention (kernels additive_fwd_{T}, additive_bwd_{T}); block b owns
 * sequence b. Its valid keys are j < len = key_lens[b] clamped to [0, len_k] (or len_k):
 * e_j = v . tanh(q_b + k_bj), alpha = softmax(e) over them (0 at padded keys),
 * ctx_b = sum_j alpha_j values_bj (0 when len = 0). The backward takes dctx and the forward's
 * alpha and writes dq, dkeys and dvalues (0 rows at padded keys) and this sequence's share of
 * dv, dv_part[b] = sum_j de_j tanh(q_b + k_bj) in f32, which the host sums over b. */
typedef struct cuattn_additive_params {
    uint64_t q;        /* [batch, A] T */
    uint64_t keys;     /* [batch * len_k, A] T */
    uint64_t v;        /* [A] T */
    uint64_t values;   /* [batch * len_k, D] T */
    uint64_t key_lens; /* [batch] int32, or 0: every sequence has len_k keys */
    uint64_t ctx;      /* [batch, D] T (forward) */
    uint64_t alpha;    /* [batch, len_k] T: written forward, read backward */
    uint64_t dctx;     /* [batch, D] T (backward) */
    uint64_t dq;       /* [batch, A] T (backward) */
    uint64_t dkeys;    /* [batch * len_k, A] T (backward) */
    uint64_t dvalues;  /* [batch * len_k, D] T (backward) */
    uint64_t dv_part;  /* [batch, A] f32 (backward) */
    int64_t batch;
    int32_t len_k;     /* 1 .. CUATTN_ADDITIVE_MAX_KEYS */
    int32_t dim_a;
    int32_t dim_v;
    int32_t pad_;
} cuattn_additive_params;

#endif /* CUATTN_PARAMS_H */
