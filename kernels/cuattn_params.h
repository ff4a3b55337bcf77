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

/* LayerNorm backward, stage 1: dx per row, and per-block partial sums of dgamma and dbeta.
 * Block b handles rows b, b + gridDim.x, ... and leaves its partials in
 * partials[b][0][:] (dgamma) and partials[b][1][:] (dbeta), f32. */
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
    int32_t vectorized;         /* as in the forward, for dy, x and dx */
    int32_t partials_in_smem;   /* 1: accumulate partials in dynamic smem, write them once at the end */
    int32_t cache_rows_in_smem; /* 1: dynamic smem (after the partials) caches the row of x and dy */
} cuattn_layernorm_bwd_params;

/* LayerNorm backward, stage 2: dgamma[j] = sum_b partials[b][0][j], dbeta likewise, summed in
 * block order so the result is bitwise deterministic. */
typedef struct cuattn_layernorm_bwd_reduce_params {
    uint64_t partials; /* [num_partials, 2, hidden] f32 */
    uint64_t dgamma;   /* [hidden] T, or 0: not written */
    uint64_t dbeta;    /* [hidden] T, or 0: not written */
    int32_t num_partials;
    int32_t hidden;
} cuattn_layernorm_bwd_reduce_params;

#endif /* CUATTN_PARAMS_H */
