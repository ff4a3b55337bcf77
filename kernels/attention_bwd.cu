// Scaled dot-product attention BACKWARD: dQ, dK, dV from Q, K, V, the forward's O and LSE, and
// dO. FlashAttention-2's algorithm (docs/kernels/attention-backward.md; CPU twin:
// src/twin/attention_backward.rs; f64 reference: src/reference/attention_backward.rs).
//
// With P = exp(scale·Q·Kᵀ − LSE) recomputed tile by tile (never stored: memory is O(L)):
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P∘(dP − D) with D_i = rowsum(dO∘O)_i,  dQ = scale·dS·K,
//   dK = scale·dSᵀ·Q.
//
// Kernels (T = f16/bf16 on tensor cores; HD = head dim tile: max(D, Dv) padded to 64, 128 or
// 256 with zeros; CW = gradient columns per CTA: HD, or CUATTN_ATTN_BWD_COLS = 128 at HD 256):
//   attention_bwd_delta_{T}: D_i (f32, LSE layout), one warp per query row; in fast mode it
//       also zeroes the f32 dQ accumulator rows.
//   attention_bwd_dkdv_hd{HD}_{T}: one CTA per (key block of BN = 64 keys, K/V head, batch).
//       Four warps; warp w owns keys 16w..16w+15 of the block and their dK, dV rows (f32
//       registers, 2·HD/2 per thread), so dK/dV need no reduction across warps. It walks the
//       query heads of its GQA group and, for each, the query tiles (BM = 64 rows) whose band
//       reaches its keys; dK/dV of the whole group are summed in registers and written once:
//       no atomics, so the result is bitwise reproducible. Per query tile, in the transposed
//       form (keys are the mma M dimension):
//         Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (A = the warp's K/V rows by ldmatrix, B = Q/dO rows);
//         Pᵀ = exp2(c·Sᵀ − LSE·log2 e), dSᵀ = Pᵀ∘(dPᵀ − D), masked pairs assigned 0;
//         dV += Pᵀ·dO and dK += dSᵀ·Q with Pᵀ/dSᵀ re-used from the accumulators as A fragments
//         (rounded to T) and B = dO/Q by ldmatrix.trans.
//   attention_bwd_dkdv_dq_hd{HD}_{T} (fast mode): the same, plus dQ of the tile: dSᵀ goes to
//       shared memory, warp w computes rows 16w..16w+15 of dS·K (A by ldmatrix.trans of dSᵀ,
//       B = K by ldmatrix.trans) and adds them to the f32 accumulator with atomicAdd; the
//       order of those additions varies from run to run.
//   attention_bwd_dq_convert_{T}: dQ = scale·accumulator, rounded to T (fast mode).
//   HD 256 (D or Dv in 129..=256): the accumulators of 16 keys' dK and dV rows would need
//       2·(256/8)·4 = 256 f32 registers per thread, so the columns are split across CTAs: the
//       dK/dV grid has ceil(max(D, Dv)/CW) column blocks per key block (flattened index: key
//       block fastest, then column block, K/V head, batch) and block c accumulates only
//       dV[:, c0 .. c0 + CW] += Pᵀ·dO[:, c0 ..] and dK[:, c0 ..] += dSᵀ·Q[:, c0 ..], c0 = c·CW
//       (the B operands' ldmatrix.trans addresses and the writes are offset by c0; Sᵀ and dPᵀ
//       run over all HD columns in every block, so they are computed once per block). A side
//       with no columns in block c (D ≤ 128 < Dv or the other way round) skips its GEMM; the
//       fast mode's dS·K adds dQ[:, c0 ..] only, in two passes of 64 columns (a 128-column dQ
//       accumulator beside dK's and dV's spilled ~0.5-0.9 KB). The dQ kernel splits the same way into
//       ceil(D/CW) column blocks (S and dP recomputed per block). Cost: 1.5× the dK/dV pass's
//       MMAs of an unsplit tile (6 GEMMs of 64×64×256 per query tile instead of 4), and Q, dO
//       (K, V) tiles read once per column block.
//   attention_bwd_dq_hd{HD}_{T} (deterministic mode): one CTA per (query block of BM rows,
//       head, batch), warp w owning rows 16w..16w+15 as in the forward; per key tile of the
//       row band (BN keys): S = Q·Kᵀ, dP = dO·Vᵀ, dS, dQ += dS·K (dS from the accumulators,
//       K by ldmatrix.trans). Recomputing S and dP here costs two more GEMMs than the fast
//       mode, and buys a fixed summation order.
//   attention_bwd_exact_{dq,dkdv}_{T} (f32, or any dtype on request, any head dim ≤ 256):
//       one warp per query row (dQ) or per key row (dK/dV over the group's query heads), f32
//       arithmetic on every element, scores by warp shuffles; deterministic.
//
// Block-sparse layouts (attention_bwd_sparse_{dkdv,dkdv_dq,dq}_hd{HD}_{T}, HD 64, 128 and 256
// with the same column split as dense; the same bodies with SPARSE = true). The kernels read a
// layout of block size 64 = BM = BN, so a layout block is one tile of each pass. Layouts of
// other block sizes are re-blocked to 64 on the host once per layout (src/sparse/reblock.rs),
// with the same element mask: a kept block of 128 becomes its 2×2 tiles of 64 (each classified
// again: a band's corner tile may be full or empty), and blocks of 16 or 32 are gathered into
// the 64-tiles that hold at least one kept block, masked by a bitmask of the kept sub-blocks'
// elements (full when every element is kept) -- the BITS tiles below, so no new kernel code.
// Work follows the kept 64-tiles: a tile with no kept sub-block is never visited; one with a
// single kept 16-block costs a whole tile. (The exact kernels walk the original layout, key by
// key.) Over the 64-block layout, each CTA and warp owns what it owns in the dense kernels:
//   dQ:    the CTA of query block m walks row m of the layout's compressed rows (the forward's
//          walk), skipping kept blocks wholly in the key padding; each kept block is one key
//          tile, masked by its kind (FULL: none inside the key length; KEY_TAIL: j < key_len;
//          BAND: its lo/hi; BITS: its bitmask), and K/V rows no row of the block may keep load
//          as zeros (sparse_tile in attention_common.cuh: the band's key range, the bitmask's
//          union of rows).
//   dK/dV: the CTA of key block n walks, for each query head of the GQA group, column n of the
//          layout's transposed index (src/sparse/columns.rs: compressed columns built once per
//          layout on the host and uploaded with it; 4·(heads·k_blocks + 1) + 8·kept bytes),
//          i.e. exactly the query blocks that keep it, ascending. K/V rows load only for keys
//          some visited block may keep (a 64-bit mask, OR-ed over the column first); a key
//          block wholly in the key padding visits nothing and writes zeros.
//   Both modes are as dense: deterministic (dQ by its own pass, fixed order) and fast (dQ by
//   atomics from the dK/dV pass). Causal masks and windows are in the layout, not in `causal`/
//   `window` (as in the forward); key padding combines with the layout. Work and bytes follow
//   the kept 64-tiles: per kept tile and query head, the dK/dV pass runs 4 GEMMs of 64×64×HD
//   (fast mode 5) and reads a Q and a dO tile (2·64·HD·2 bytes) plus 64 LSE and D values; the
//   dQ pass 3 GEMMs, reading a K and a V tile (2·64·HD·2 bytes). At HD 256 each column block
//   does this with its own CW columns in the accumulating GEMMs (as dense: Sᵀ/dPᵀ over all
//   columns, Q and dO tiles read once per column block).
//   Registers: the fast-mode HD 64 entry adds dQ in two passes of 32 columns (as HD 256 does
//   in two of 64): the sparse tile state (band, bitmask pointer, kind) beside a 64-column dQ
//   accumulator and dK's and dV's left it 255 registers with 52/60 (sm_80) and 96/128 (sm_90)
//   bytes spilled; the halves need one more ldmatrix of dSᵀ per 16 keys and spill nothing. The
//   HD 128 entry keeps one pass (halving it there spilled more on sm_80: 68/52 instead of
//   12/24 bytes, measured before the Q/dO load and Pᵀ/dSᵀ packing forms below, with which one
//   pass spills nothing).
//
// Masks are those of the forward (attention_common.cuh: key padding, causal top-left and
// bottom-right, sliding window, packed sequences): the query tiles a key block visits are those
// whose rows' band reaches it, the key tiles a query block visits those of its band; tiles
// that cross a band edge, the key length or the sequence end are masked element by element by
// assignment (P = dS = 0). K/V rows no query of the sequence may see, and Q/dO rows past the
// sequence, are zero-filled, so NaN there cannot reach a gradient through 0·NaN. A fully masked
// row has LSE = −inf, which is read as +inf (P = 0): it gets dQ = 0 and adds nothing.
//
// Shared memory (2-byte T, rows padded by 8 elements so ldmatrix is conflict-free):
//   dK/dV: (2·BN + 2·BM)·(HD + 8)·2 + 2·BM·4 bytes (+ BN·(BM + 8)·2 for dSᵀ in fast mode);
//   dQ:    (2·BM + 2·BN)·(HD + 8)·2 bytes. HD 128: 70 144 / 79 360 and 69 632 bytes; HD 256:
//   135 680 / 144 896 and 135 168 bytes (above 48 KB: the host raises each function's dynamic
//   shared-memory limit to the device's opt-in maximum when it loads it; one CTA per SM on
//   sm_80 and sm_90).
// Loads are cp.async (16-byte, zero-fill) when every row is 16-byte aligned, element loads
// otherwise; each tile is loaded and waited for before use (no double buffering yet).
//
// FLOPs: the forward's 4·B·Hq·Lq·Lk·D times 2.5 (five GEMMs of its two; the deterministic dQ
// pass adds two more that the TFLOP/s count does not credit). Bytes: K, V, dK, dV once; Q, dO,
// LSE, D once per key block (fast mode: plus dQ atomics, 4 bytes per element per key block).

#include "common.cuh"
#include "attention_common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int THREADS = CUATTN_ATTN_BWD_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int BN = CUATTN_ATTN_BWD_BN;  // keys per dK/dV CTA (16 per warp), keys per dQ tile
constexpr int BM = CUATTN_ATTN_BWD_BM;  // query rows per dK/dV tile, per dQ CTA (16 per warp)
constexpr int ROWS = CUATTN_ATTN_BWD_ROWS_PER_BLOCK;
constexpr float LOG2E = 1.4426950408889634f;
static_assert(BN == 16 * WARPS && BM == 16 * WARPS, "one 16-row slab per warp");
// Per dK/dV entry and architecture, two ways of writing the same computation that ptxas
// allocates differently at the 255-register limit (numbers: docs/kernels/attention-backward.md,
// register report). Each entry takes the pair with which it does not spill; the others keep
// the forms they had, so their code is unchanged.
//   qdo_row_step: how the per-tile Q and dO loads find their copies (load_tile's ROW_STEP; the
//   same copies either way). With the flat index, sm_80's ptxas keeps each copy's row and
//   column offsets (16 per tile and thread at HD 256) live across the query-tile loop and
//   spills them (92-140 bytes stored, 148-172 loaded at HD 256; 12-44 / 20-28 at HD 128); with
//   ROW_STEP a thread keeps one row base and one column. sm_90 keeps the flat index except in
//   the deterministic HD 128 entries (with pack_early): elsewhere ROW_STEP makes sm_90 spill
//   (8-16 bytes at HD 64 and 256, 200-240 in the fast HD 128 ones).
//   pack_early: whether each Pᵀ and dSᵀ pair is rounded to a T pair as soon as it is computed
//   (16 + 16 registers for the tile's 32 + 32 floats) rather than where the dV/dK MMAs (and fast
//   mode's dSᵀ store) take it: the same roundings of the same values, so the same bits. Where the
//   late form spilled (sm_90 deterministic HD 128, dense 136 / 144 bytes and sparse 48 / 24;
//   sm_80 sparse fast HD 128, 4 / 4), the registers this frees are enough: on sm_90 ptxas had
//   stored 6 Pᵀ floats per tile across the masking (and, dense, per-CTA scalars), on sm_80 the
//   column walk's end, reloaded every tile. On sm_90 with ROW_STEP as well: alone, pack_early
//   leaves the dense entry at 32 / 36 bytes, and the sparse one spill-free but 290 instructions
//   longer than with both.
// compute_80 PTX, JIT-compiled on newer GPUs, takes the sm_80 forms.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool SM90_FORMS = true;
#else
constexpr bool SM90_FORMS = false;
#endif
template <int HD, bool ATOMIC_DQ, bool SPARSE> constexpr bool qdo_row_step() {
    return SM90_FORMS ? HD == 128 && !ATOMIC_DQ : true;
}
template <int HD, bool ATOMIC_DQ, bool SPARSE> constexpr bool pack_early() {
    return HD == 128 && (SM90_FORMS ? !ATOMIC_DQ : ATOMIC_DQ && SPARSE);
}

// Row r of the LSE layout for (b, h) at the sequence's first row (also D's and, times dim_qk,
// the dQ accumulator's).
__device__ __forceinline__ int64_t lse_row0(const cuattn_attention_fwd_params& p, int b, int h, int64_t row0_q) {
    return b * p.lse_batch_stride + h * p.lse_head_stride + row0_q;
}

// LSE in the exp2 domain for P = exp2(c·s − lse2); a fully masked row's −inf (and rows past
// the sequence) become +inf, so every P of theirs is 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * LOG2E; }

// Flattened (row block, head, batch) of the one-warp-per-row kernels.
struct RowTask {
    int64_t i;  // row within the sequence
    int h, b;
};
__device__ __forceinline__ RowTask row_task(int64_t len, int heads) {
    const int64_t blocks = (len + ROWS - 1) / ROWS;
    const int64_t flat = blockIdx.x;
    RowTask r;
    r.i = (flat % blocks) * ROWS + threadIdx.x / 32;
    r.h = (int)((flat / blocks) % heads);
    r.b = (int)(flat / (blocks * heads));
    return r;
}

// D_i = Σ_d dO_id·O_id (f32), and in fast mode a zeroed dQ accumulator row.
template <typename T> __device__ void bwd_delta(const cuattn_attention_bwd_params& bp) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    const int lane = threadIdx.x % 32;
    const RowTask task = row_task(p.len_q, p.heads_q);
    const SequenceBounds seq = sequence_bounds(p, task.b);
    if (task.i >= seq.len_q) return;  // warp-uniform; no barriers here
    const int64_t row = seq.row0_q + task.i;
    const T* o = reinterpret_cast<const T*>(p.o) + task.b * p.o_batch_stride + task.h * p.o_head_stride + row * p.o_row_stride;
    const T* d_o = reinterpret_cast<const T*>(bp.d_o) + task.b * bp.do_batch_stride + task.h * bp.do_head_stride +
                   row * bp.do_row_stride;
    float acc = 0.f;
    for (int d = lane; d < p.dim_v; d += 32) acc = fmaf(to_f32(o[d]), to_f32(d_o[d]), acc);
    acc = warp_sum(acc);
    const int64_t r = lse_row0(p, task.b, task.h, seq.row0_q) + task.i;
    if (lane == 0) reinterpret_cast<float*>(bp.delta)[r] = acc;
    if (bp.dq_accum) {
        float* dq = reinterpret_cast<float*>(bp.dq_accum) + r * p.dim_qk;
        for (int d = lane; d < p.dim_qk; d += 32) dq[d] = 0.f;
    }
}

// dQ = scale · accumulator, rounded to T (fast mode's last step).
template <typename T> __device__ void bwd_dq_convert(const cuattn_attention_bwd_params& bp) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    const int lane = threadIdx.x % 32;
    const RowTask task = row_task(p.len_q, p.heads_q);
    const SequenceBounds seq = sequence_bounds(p, task.b);
    if (task.i >= seq.len_q) return;
    const int64_t r = lse_row0(p, task.b, task.h, seq.row0_q) + task.i;
    const float* acc = reinterpret_cast<const float*>(bp.dq_accum) + r * p.dim_qk;
    T* dq = reinterpret_cast<T*>(bp.dq) + task.b * bp.dq_batch_stride + task.h * bp.dq_head_stride +
            (seq.row0_q + task.i) * bp.dq_row_stride;
    for (int d = lane; d < p.dim_qk; d += 32) dq[d] = from_f32<T>(acc[d] * p.scale);
}

// Column of the layout's transposed index for key block kb and query head h: entries
// [*begin, *end) of sp_col_q_blocks / sp_col_blocks.
__device__ __forceinline__ void sparse_column(const cuattn_attention_bwd_params& bp, int h, int kb, int* begin, int* end) {
    const int c = (bp.fwd.sp_stored_heads == 1 ? 0 : h) * bp.sp_k_blocks + kb;
    const int* co = reinterpret_cast<const int*>(bp.sp_col_offsets);
    *begin = co[c], *end = co[c + 1];
}

// ---- Tensor-core dK/dV (and, with ATOMIC_DQ, dQ by atomics) -------------------------------------
// SPARSE: the query tiles are the query blocks that keep this key block (the layout's columns),
// each masked by its kept block's kind; otherwise the tiles of the dense band.
// HD 256: column block c of the split (see the header); CW = HD below that (one block).
template <typename T, int HD, bool ATOMIC_DQ, bool SPARSE>
__device__ void attention_bwd_dkdv(const cuattn_attention_bwd_params& bp, T* smem) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    constexpr int CW = HD < CUATTN_ATTN_BWD_COLS ? HD : CUATTN_ATTN_BWD_COLS;
    constexpr bool SPLIT = CW < HD;
    constexpr int PITCH = HD + 8;
    constexpr int PITCH_S = BM + 8;  // dSᵀ tile: [BN keys][BM queries]
    constexpr bool QDO_ROW_STEP = qdo_row_step<HD, ATOMIC_DQ, SPARSE>();
    constexpr bool PACK_EARLY = pack_early<HD, ATOMIC_DQ, SPARSE>();
    T* sK = smem;
    T* sV = sK + BN * PITCH;
    T* sQ = sV + BN * PITCH;
    T* sdO = sQ + BM * PITCH;
    T* sdS = sdO + BM * PITCH;  // fast mode only
    float* sLse = reinterpret_cast<float*>(sdS + (ATOMIC_DQ ? BN * PITCH_S : 0));
    float* sDelta = sLse + BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;

    const int64_t k_blocks = (p.len_k + BN - 1) / BN;
    const int col_blocks = SPLIT ? (max(p.dim_qk, p.dim_v) + CW - 1) / CW : 1;
    const int64_t flat = blockIdx.x;
    const int key0 = (int)(flat % k_blocks) * BN;
    const int c0 = SPLIT ? (int)((flat / k_blocks) % col_blocks) * CW : 0;  // the block's first column
    const int hk = (int)((flat / (k_blocks * col_blocks)) % p.heads_kv);
    const int b = (int)(flat / (k_blocks * col_blocks * p.heads_kv));
    // CTA-uniform: whether this column block holds columns of dK (and dQ) and of dV.
    const bool has_dk = !SPLIT || c0 < p.dim_qk, has_dv = !SPLIT || c0 < p.dim_v;
    const SequenceBounds seq = sequence_bounds(p, b);
    const int len_q = (int)seq.len_q, key_len = (int)seq.key_len, len_k = (int)seq.len_k;
    if (key0 >= len_k) return;  // CTA-uniform, before any barrier

    const Band band = dense_band(p, len_q, key_len);
    const int group = p.heads_q / p.heads_kv;
    // Keys some query of the sequence sees: [kv_lo, kv_hi); other K/V rows load as zeros.
    int kv_lo = max(0, band.lo), kv_hi = min(key_len, len_q + band.hi);
    // Query rows whose band reaches this block's keys: [q_begin, q_end), as tiles of BM.
    int m_begin = 0, m_end = 0;
    uint64_t kv_keep = ~0ull;  // sparse: of those, the keys some visited block may keep
    if constexpr (SPARSE) {
        static_assert(BM == BN, "a layout block is one tile of each pass");
        // A block wholly in the key padding visits nothing (zero dK/dV); otherwise the union
        // over the group's heads and the column's blocks of the keys each may keep.
        kv_lo = 0, kv_hi = key_len, kv_keep = 0;
        if (key0 < key_len) {
            for (int gi = 0; gi < group; ++gi) {
                int e0, e1;
                sparse_column(bp, hk * group + gi, key0 / BN, &e0, &e1);
                for (int e = e0; e < e1; ++e) {
                    const int q0 = reinterpret_cast<const int*>(bp.sp_col_q_blocks)[e] * BM;
                    const SparseTile ti = sparse_tile<BN>(p, reinterpret_cast<const int*>(bp.sp_col_blocks)[e], q0,
                                                          min(len_q, q0 + BM) - 1, len_q, key_len);
                    kv_keep |= bit_range(ti.kv_lo, ti.kv_hi) & ti.keep;
                }
            }
        }
    } else {
        const int k_last = min(key0 + BN, kv_hi) - 1;
        if (k_last >= max(key0, kv_lo)) {
            const int q_begin = max(0, max(key0, kv_lo) - band.hi), q_end = min(len_q, k_last - band.lo + 1);
            if (q_end > q_begin) m_begin = q_begin / BM, m_end = (q_end + BM - 1) / BM;
        }
    }

    const bool vec = p.vectorized != 0;
    const T* gk = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + seq.row0_k * p.k_row_stride;
    const T* gv = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + seq.row0_k * p.v_row_stride;
    load_tile<T, HD, BN, THREADS, SPARSE>(sK, gk + (int64_t)key0 * p.k_row_stride, p.k_row_stride, kv_lo - key0,
                                          kv_hi - key0, p.dim_qk, vec, gk, kv_keep, 0);
    load_tile<T, HD, BN, THREADS, SPARSE>(sV, gv + (int64_t)key0 * p.v_row_stride, p.v_row_stride, kv_lo - key0,
                                          kv_hi - key0, p.dim_v, vec, gv, kv_keep, 0);

    float dk[CW / 8][4], dv[CW / 8][4];  // columns c0 .. c0 + CW of the warp's 16 keys
#pragma unroll
    for (int nd = 0; nd < CW / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
    const float c = p.scale * LOG2E;
    const int wrow = warp * 16;  // the warp's first key in the block

    for (int gi = 0; gi < group; ++gi) {
        const int h = hk * group + gi;
        const T* gq = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + seq.row0_q * p.q_row_stride;
        const T* gdo = reinterpret_cast<const T*>(bp.d_o) + b * bp.do_batch_stride + h * bp.do_head_stride +
                       seq.row0_q * bp.do_row_stride;
        const int64_t r0 = lse_row0(p, b, h, seq.row0_q);
        const float* lse = reinterpret_cast<const float*>(p.lse) + r0;
        const float* delta = reinterpret_cast<const float*>(bp.delta) + r0;
        if constexpr (SPARSE) {
            m_begin = m_end = 0;
            if (key0 < key_len) sparse_column(bp, h, key0 / BN, &m_begin, &m_end);
        }
        for (int m = m_begin; m < m_end; ++m) {
            // Sparse: m walks the column; the tile's kept block says how it is masked.
            int q0 = m * BM, lo = band.lo, hi = band.hi;
            const uint64_t* bits = nullptr;
            bool full_kind = true;
            if constexpr (SPARSE) {
                q0 = reinterpret_cast<const int*>(bp.sp_col_q_blocks)[m] * BM;
                const SparseTile ti = sparse_tile<BN>(p, reinterpret_cast<const int*>(bp.sp_col_blocks)[m], q0,
                                                      min(len_q, q0 + BM) - 1, len_q, key_len);
                lo = ti.lo, hi = ti.hi, bits = ti.bits, full_kind = ti.kind == CUATTN_SPARSE_FULL;
            }
            __syncthreads();  // every warp is done with the previous tile's Q, dO, dSᵀ, LSE, D
            load_tile<T, HD, BM, THREADS, false, QDO_ROW_STEP>(sQ, gq + (int64_t)q0 * p.q_row_stride, p.q_row_stride, 0,
                                                               len_q - q0, p.dim_qk, vec, gq);
            load_tile<T, HD, BM, THREADS, false, QDO_ROW_STEP>(sdO, gdo + (int64_t)q0 * bp.do_row_stride, bp.do_row_stride, 0,
                                                               len_q - q0, p.dim_v, vec, gdo);
            for (int r = threadIdx.x; r < BM; r += THREADS) {
                const bool in = q0 + r < len_q;
                sLse[r] = in ? lse_log2(lse[q0 + r]) : INFINITY;
                sDelta[r] = in ? delta[q0 + r] : 0.f;
            }
            if (vec) cp_async_wait_all();
            __syncthreads();

            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warp's 16 keys × BM queries.
            float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                uint32_t ka[4], va[4];
                ldmatrix_x4(ka, sK + (wrow + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                ldmatrix_x4(va, sV + (wrow + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
#pragma unroll
                for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
                    uint32_t qb[4], ob[4];
                    ldmatrix_x4(qb, sQ + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                    ldmatrix_x4(ob, sdO + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                    mma16816<T>(s[2 * nb2], ka, qb[0], qb[2]);
                    mma16816<T>(s[2 * nb2 + 1], ka, qb[1], qb[3]);
                    mma16816<T>(dp[2 * nb2], va, ob[0], ob[2]);
                    mma16816<T>(dp[2 * nb2 + 1], va, ob[1], ob[3]);
                }
            }

            // Pᵀ into s, dSᵀ into dp; pairs outside the band, past the keys or past the
            // sequence are assigned 0 (CTA-uniform test: whole tiles inside skip it).
            const bool full = full_kind && key0 + BN <= key_len && q0 + BM <= len_q && key0 >= q0 + BM - 1 + lo &&
                              key0 + BN - 1 <= q0 + hi;
            uint32_t p_t[PACK_EARLY ? BM / 16 : 1][4], ds_t[PACK_EARLY ? BM / 16 : 1][4];  // PACK_EARLY only
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = key0 + wrow + g + 8 * (e >> 1);
                    const int col = nb * 8 + 2 * t + (e & 1);
                    const int i = q0 + col;
                    bool keep = full || (key < key_len && i < len_q && key >= i + lo && key <= i + hi);
                    if (SPARSE && !full && bits && keep) keep = sparse_bit(p, bits, q0, key0, i, key);
                    const float pv = keep ? exp2_ftz(fmaf(s[nb][e], c, -sLse[col])) : 0.f;
                    dp[nb][e] = keep ? pv * (dp[nb][e] - sDelta[col]) : 0.f;
                    s[nb][e] = pv;
                    if constexpr (PACK_EARLY) {
                        if (e & 1) {  // a pair, where the MMAs' A fragments hold it
                            p_t[nb / 2][2 * (nb & 1) + e / 2] = pack2<T>(s[nb][e - 1], s[nb][e]);
                            ds_t[nb / 2][2 * (nb & 1) + e / 2] = pack2<T>(dp[nb][e - 1], dp[nb][e]);
                        }
                    }
                }

            // dV += Pᵀ·dO, dK += dSᵀ·Q (queries are the K dimension), the B operands from
            // the column block's columns c0 ...
#pragma unroll
            for (int j = 0; j < BM / 16; ++j) {
                uint32_t pa[4], da[4];
                if constexpr (PACK_EARLY) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) pa[x] = p_t[j][x], da[x] = ds_t[j][x];
                } else {
                    pa[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
                    pa[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
                    pa[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
                    pa[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
                    da[0] = pack2<T>(dp[2 * j][0], dp[2 * j][1]);
                    da[1] = pack2<T>(dp[2 * j][2], dp[2 * j][3]);
                    da[2] = pack2<T>(dp[2 * j + 1][0], dp[2 * j + 1][1]);
                    da[3] = pack2<T>(dp[2 * j + 1][2], dp[2 * j + 1][3]);
                }
#pragma unroll
                for (int nd2 = 0; nd2 < CW / 16; ++nd2) {
                    uint32_t ob[4], qb[4];
                    const int off = (j * 16 + (lane & 15)) * PITCH + c0 + nd2 * 16 + 8 * (lane >> 4);
                    if (has_dv) ldmatrix_x4_trans(ob, sdO + off);
                    if (has_dk) ldmatrix_x4_trans(qb, sQ + off);
                    if (has_dv) {
                        mma16816<T>(dv[2 * nd2], pa, ob[0], ob[1]);
                        mma16816<T>(dv[2 * nd2 + 1], pa, ob[2], ob[3]);
                    }
                    if (has_dk) {
                        mma16816<T>(dk[2 * nd2], da, qb[0], qb[1]);
                        mma16816<T>(dk[2 * nd2 + 1], da, qb[2], qb[3]);
                    }
                }
            }

            if (ATOMIC_DQ && has_dk) {  // CTA-uniform, so its barrier is safe
                // dSᵀ (rounded to T, as the mma takes it) to shared memory, [key][query].
#pragma unroll
                for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                    for (int r2 = 0; r2 < 2; ++r2) {
                        uint32_t v2;
                        if constexpr (PACK_EARLY) v2 = ds_t[nb / 2][2 * (nb & 1) + r2];
                        else v2 = pack2<T>(dp[nb][2 * r2], dp[nb][2 * r2 + 1]);
                        memcpy(sdS + (wrow + g + 8 * r2) * PITCH_S + nb * 8 + 2 * t, &v2, 4);
                    }
                __syncthreads();
                // Warp w: dQ rows 16w..16w+15 of the tile, columns c0 .. c0 + CW,
                // += dS[rows, BN keys]·K[BN keys, c0 ..]. HD 256, and the block-sparse HD 64
                // entry: in two passes of CW/2 columns, so that dQ's accumulators beside dK's
                // and dV's fit the registers (see the header).
                constexpr int DQW = (SPLIT || (SPARSE && HD == 64)) ? CW / 2 : CW;
                float* acc = reinterpret_cast<float*>(bp.dq_accum) + r0 * p.dim_qk;
#pragma unroll 1
                for (int d0 = c0; d0 < c0 + CW && (!SPLIT || d0 < p.dim_qk); d0 += DQW) {
                    float dq[DQW / 8][4];
#pragma unroll
                    for (int nd = 0; nd < DQW / 8; ++nd)
#pragma unroll
                        for (int e = 0; e < 4; ++e) dq[nd][e] = 0.f;
#pragma unroll
                    for (int ks = 0; ks < BN / 16; ++ks) {
                        uint32_t a[4];  // the transpose of dSᵀ's 16×16 block: A = dS rows, keys as K
                        ldmatrix_x4_trans(a, sdS + (ks * 16 + (lane & 7) + 8 * (lane >> 4)) * PITCH_S + wrow + 8 * ((lane >> 3) & 1));
#pragma unroll
                        for (int nd2 = 0; nd2 < DQW / 16; ++nd2) {
                            uint32_t kb[4];
                            ldmatrix_x4_trans(kb, sK + (ks * 16 + (lane & 15)) * PITCH + d0 + nd2 * 16 + 8 * (lane >> 4));
                            mma16816<T>(dq[2 * nd2], a, kb[0], kb[1]);
                            mma16816<T>(dq[2 * nd2 + 1], a, kb[2], kb[3]);
                        }
                    }
#pragma unroll
                    for (int r2 = 0; r2 < 2; ++r2) {
                        const int i = q0 + wrow + g + 8 * r2;
                        if (i < len_q) {
#pragma unroll
                            for (int nd = 0; nd < DQW / 8; ++nd)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const int col = d0 + nd * 8 + 2 * t + e;
                                    if (col < p.dim_qk) atomicAdd(acc + (int64_t)i * p.dim_qk + col, dq[nd][2 * r2 + e]);
                                }
                        }
                    }
                }
            }
        }
    }
    if (vec) cp_async_wait_all();  // no query tiles: nothing may stay in flight past the CTA's end

    T* gdk = reinterpret_cast<T*>(bp.dk) + b * bp.dk_batch_stride + hk * bp.dk_head_stride + seq.row0_k * bp.dk_row_stride;
    T* gdv = reinterpret_cast<T*>(bp.dv) + b * bp.dv_batch_stride + hk * bp.dv_head_stride + seq.row0_k * bp.dv_row_stride;
#pragma unroll
    for (int r2 = 0; r2 < 2; ++r2) {
        const int key = key0 + wrow + g + 8 * r2;
        if (key >= len_k) continue;
#pragma unroll
        for (int nd = 0; nd < CW / 8; ++nd)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = c0 + nd * 8 + 2 * t + e;
                if (col < p.dim_qk) gdk[(int64_t)key * bp.dk_row_stride + col] = from_f32<T>(dk[nd][2 * r2 + e] * p.scale);
                if (col < p.dim_v) gdv[(int64_t)key * bp.dv_row_stride + col] = from_f32<T>(dv[nd][2 * r2 + e]);
            }
    }
}

// ---- Tensor-core dQ, deterministic mode ---------------------------------------------------------
// SPARSE: the key tiles are the kept blocks of this query block's row of the layout (the
// forward's walk), blocks wholly in the key padding skipped; otherwise the dense band's tiles.
// HD 256: column block c of dQ (see the header).
template <typename T, int HD, bool SPARSE> __device__ void attention_bwd_dq(const cuattn_attention_bwd_params& bp, T* smem) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    constexpr int CW = HD < CUATTN_ATTN_BWD_COLS ? HD : CUATTN_ATTN_BWD_COLS;
    constexpr bool SPLIT = CW < HD;
    constexpr int PITCH = HD + 8;
    T* sQ = smem;
    T* sdO = sQ + BM * PITCH;
    T* sK = sdO + BM * PITCH;
    T* sV = sK + BN * PITCH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;

    const int64_t q_blocks = (p.len_q + BM - 1) / BM;
    const int col_blocks = SPLIT ? (p.dim_qk + CW - 1) / CW : 1;
    const int64_t flat = blockIdx.x;
    const int64_t mb = q_blocks - 1 - flat % q_blocks;  // heaviest (causal) blocks first
    const int c0 = SPLIT ? (int)((flat / q_blocks) % col_blocks) * CW : 0;  // the block's first dQ column
    const int h = (int)((flat / (q_blocks * col_blocks)) % p.heads_q);
    const int b = (int)(flat / (q_blocks * col_blocks * p.heads_q));
    const SequenceBounds seq = sequence_bounds(p, b);
    const int len_q = (int)seq.len_q, key_len = (int)seq.key_len;
    const int q0 = (int)mb * BM;
    if (q0 >= len_q) return;  // CTA-uniform
    const int q_last = min(len_q, q0 + BM) - 1;

    // The block's keys [kb, ke) as whole tiles from n_begin (as in the forward).
    const Band band = dense_band(p, len_q, key_len);
    const int kb = max(0, q0 + band.lo), ke = min(key_len, q_last + band.hi + 1);
    int n_begin = 0, n_tiles = 0;
    if constexpr (SPARSE) {
        static_assert(BM == BN, "a layout block is one tile of each pass");
        const int r = (p.sp_stored_heads == 1 ? 0 : h) * p.sp_q_blocks + (int)mb;
        n_begin = reinterpret_cast<const int*>(p.sp_row_offsets)[r];
        n_tiles = reinterpret_cast<const int*>(p.sp_row_offsets)[r + 1] - n_begin;
    } else if (ke > kb) {
        n_begin = kb / BN, n_tiles = (ke + BN - 1) / BN - n_begin;
    }

    const int hk = h / (p.heads_q / p.heads_kv);
    const bool vec = p.vectorized != 0;
    const T* gq = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + (seq.row0_q + q0) * p.q_row_stride;
    const T* gdo = reinterpret_cast<const T*>(bp.d_o) + b * bp.do_batch_stride + h * bp.do_head_stride +
                   (seq.row0_q + q0) * bp.do_row_stride;
    const T* gk = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + seq.row0_k * p.k_row_stride;
    const T* gv = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + seq.row0_k * p.v_row_stride;
    load_tile<T, HD, BM, THREADS>(sQ, gq, p.q_row_stride, 0, len_q - q0, p.dim_qk, vec, gq);
    load_tile<T, HD, BM, THREADS>(sdO, gdo, bp.do_row_stride, 0, len_q - q0, p.dim_v, vec, gdo);

    const int wrow = warp * 16;
    const int64_t r0 = lse_row0(p, b, h, seq.row0_q);
    float lse2[2], dlt[2];
#pragma unroll
    for (int r2 = 0; r2 < 2; ++r2) {
        const int i = q0 + wrow + g + 8 * r2;
        lse2[r2] = i < len_q ? lse_log2(reinterpret_cast<const float*>(p.lse)[r0 + i]) : INFINITY;
        dlt[r2] = i < len_q ? reinterpret_cast<const float*>(bp.delta)[r0 + i] : 0.f;
    }
    float dq[CW / 8][4];  // columns c0 .. c0 + CW of the warp's 16 rows
#pragma unroll
    for (int nd = 0; nd < CW / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[nd][e] = 0.f;
    const float c = p.scale * LOG2E;

    for (int n = 0; n < n_tiles; ++n) {
        // Sparse: tile n is kept block n_begin + n, masked by its kind.
        int key0 = (n_begin + n) * BN, kv_lo = kb - key0, kv_hi = ke - key0, lo = band.lo, hi = band.hi;
        uint64_t kv_keep = ~0ull;
        const uint64_t* bits = nullptr;
        bool full_kind = true;
        if constexpr (SPARSE) {
            const SparseTile ti = sparse_tile<BN>(p, n_begin + n, q0, q_last, len_q, key_len);
            if (ti.key0 >= key_len) continue;  // CTA-uniform, before this tile's barriers
            key0 = ti.key0, kv_lo = ti.kv_lo, kv_hi = ti.kv_hi, kv_keep = ti.keep;
            lo = ti.lo, hi = ti.hi, bits = ti.bits, full_kind = ti.kind == CUATTN_SPARSE_FULL;
        }
        __syncthreads();  // every warp is done with the previous K/V tile
        load_tile<T, HD, BN, THREADS, SPARSE>(sK, gk + (int64_t)key0 * p.k_row_stride, p.k_row_stride, kv_lo, kv_hi,
                                              p.dim_qk, vec, gk, kv_keep, 0);
        load_tile<T, HD, BN, THREADS, SPARSE>(sV, gv + (int64_t)key0 * p.v_row_stride, p.v_row_stride, kv_lo, kv_hi,
                                              p.dim_v, vec, gv, kv_keep, 0);
        if (vec) cp_async_wait_all();  // (Q and dO too, the first time)
        __syncthreads();

        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            uint32_t qa[4], oa[4];
            ldmatrix_x4(qa, sQ + (wrow + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
            ldmatrix_x4(oa, sdO + (wrow + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
                uint32_t kb4[4], vb4[4];
                ldmatrix_x4(kb4, sK + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                ldmatrix_x4(vb4, sV + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                mma16816<T>(s[2 * nb2], qa, kb4[0], kb4[2]);
                mma16816<T>(s[2 * nb2 + 1], qa, kb4[1], kb4[3]);
                mma16816<T>(dp[2 * nb2], oa, vb4[0], vb4[2]);
                mma16816<T>(dp[2 * nb2 + 1], oa, vb4[1], vb4[3]);
            }
        }

        const bool full = full_kind && q_last + lo <= key0 && key0 + BN - 1 <= q0 + hi && key0 + BN <= key_len;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = q0 + wrow + g + 8 * (e >> 1);
                const int j = key0 + nb * 8 + 2 * t + (e & 1);
                bool keep = full || (j < key_len && i < len_q && j >= i + lo && j <= i + hi);
                if (SPARSE && !full && bits && keep) keep = sparse_bit(p, bits, q0, key0, i, j);
                const float pv = keep ? exp2_ftz(fmaf(s[nb][e], c, -lse2[e >> 1])) : 0.f;
                dp[nb][e] = keep ? pv * (dp[nb][e] - dlt[e >> 1]) : 0.f;
            }

        // dQ += dS·K (keys are the K dimension; K by ldmatrix.trans from column c0).
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            uint32_t da[4];
            da[0] = pack2<T>(dp[2 * j][0], dp[2 * j][1]);
            da[1] = pack2<T>(dp[2 * j][2], dp[2 * j][3]);
            da[2] = pack2<T>(dp[2 * j + 1][0], dp[2 * j + 1][1]);
            da[3] = pack2<T>(dp[2 * j + 1][2], dp[2 * j + 1][3]);
#pragma unroll
            for (int nd2 = 0; nd2 < CW / 16; ++nd2) {
                uint32_t kb4[4];
                ldmatrix_x4_trans(kb4, sK + (j * 16 + (lane & 15)) * PITCH + c0 + nd2 * 16 + 8 * (lane >> 4));
                mma16816<T>(dq[2 * nd2], da, kb4[0], kb4[1]);
                mma16816<T>(dq[2 * nd2 + 1], da, kb4[2], kb4[3]);
            }
        }
    }
    if (vec) cp_async_wait_all();  // no key tiles: Q and dO must land before the CTA ends

    T* gdq = reinterpret_cast<T*>(bp.dq) + b * bp.dq_batch_stride + h * bp.dq_head_stride + seq.row0_q * bp.dq_row_stride;
#pragma unroll
    for (int r2 = 0; r2 < 2; ++r2) {
        const int i = q0 + wrow + g + 8 * r2;
        if (i >= len_q) continue;
#pragma unroll
        for (int nd = 0; nd < CW / 8; ++nd)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = c0 + nd * 8 + 2 * t + e;
                if (col < p.dim_qk) gdq[(int64_t)i * bp.dq_row_stride + col] = from_f32<T>(dq[nd][2 * r2 + e] * p.scale);
            }
    }
}

// ---- Exact path: f32 arithmetic, one warp per row -------------------------------------------------
constexpr int MAX_PER_LANE = CUATTN_ATTENTION_MAX_HEAD_DIM / 32;

template <typename T>
__device__ __forceinline__ void load_row(float (&x)[MAX_PER_LANE], const T* row, int dim, int lane) {
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) {
        const int d = lane + 32 * u;
        x[u] = d < dim ? to_f32(row[d]) : 0.f;
    }
}

__device__ __forceinline__ float dot_lanes(const float (&a)[MAX_PER_LANE], const float (&b)[MAX_PER_LANE]) {
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) acc = fmaf(a[u], b[u], acc);
    return warp_sum(acc);
}

// dQ of query row i: Σ over its band's keys (block-sparse: its kept blocks' keys), in key order.
template <typename T> __device__ void bwd_exact_dq(const cuattn_attention_bwd_params& bp) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    const int lane = threadIdx.x % 32;
    const RowTask task = row_task(p.len_q, p.heads_q);
    const SequenceBounds seq = sequence_bounds(p, task.b);
    if (task.i >= seq.len_q) return;
    const int b = task.b, h = task.h, i = (int)task.i;
    const int len_q = (int)seq.len_q, key_len = (int)seq.key_len;
    const Band band = dense_band(p, len_q, key_len);
    const int begin = max(0, i + band.lo), end = min(key_len, i + band.hi + 1);
    const int hk = h / (p.heads_q / p.heads_kv);
    const int64_t row = seq.row0_q + i;
    float q[MAX_PER_LANE], d_o[MAX_PER_LANE], k[MAX_PER_LANE], v[MAX_PER_LANE], dq[MAX_PER_LANE];
    load_row(q, reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row * p.q_row_stride, p.dim_qk, lane);
    load_row(d_o, reinterpret_cast<const T*>(bp.d_o) + b * bp.do_batch_stride + h * bp.do_head_stride + row * bp.do_row_stride,
             p.dim_v, lane);
    const int64_t r = lse_row0(p, b, h, seq.row0_q) + i;
    const float lse = reinterpret_cast<const float*>(p.lse)[r], delta = reinterpret_cast<const float*>(bp.delta)[r];
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) dq[u] = 0.f;
    const T* gk = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + seq.row0_k * p.k_row_stride;
    const T* gv = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + seq.row0_k * p.v_row_stride;
    const auto visit = [&](int j) {  // warp-uniform
        load_row(k, gk + (int64_t)j * p.k_row_stride, p.dim_qk, lane);
        load_row(v, gv + (int64_t)j * p.v_row_stride, p.dim_v, lane);
        const float pv = expf(fmaf(dot_lanes(q, k), p.scale, -lse));
        const float ds = pv * (dot_lanes(d_o, v) - delta);
#pragma unroll
        for (int u = 0; u < MAX_PER_LANE; ++u) dq[u] = fmaf(ds, k[u], dq[u]);
    };
    if (p.sp_row_offsets) {
        // Block-sparse: the kept key blocks of row i's query block, ascending, key by key.
        const int bs = p.sp_block_size;
        const int lr = (p.sp_stored_heads == 1 ? 0 : h) * p.sp_q_blocks + i / bs;
        const int* ro = reinterpret_cast<const int*>(p.sp_row_offsets);
        for (int x = ro[lr]; x < ro[lr + 1]; ++x) {
            const int j0 = reinterpret_cast<const int*>(p.sp_col_indices)[x] * bs;
            for (int j = j0; j < min(j0 + bs, key_len); ++j)
                if (sparse_admits(p, x, i, j)) visit(j);
        }
    } else {
        for (int j = begin; j < end; ++j) visit(j);
    }
    T* out = reinterpret_cast<T*>(bp.dq) + b * bp.dq_batch_stride + h * bp.dq_head_stride + row * bp.dq_row_stride;
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) {
        const int d = lane + 32 * u;
        if (d < p.dim_qk) out[d] = from_f32<T>(dq[u] * p.scale);
    }
}

// dK and dV of key row j of K/V head hk: Σ over the group's query heads, then over the
// queries whose band holds j (block-sparse: that the layout's kept blocks admit), in that order.
template <typename T> __device__ void bwd_exact_dkdv(const cuattn_attention_bwd_params& bp) {
    const cuattn_attention_fwd_params& p = bp.fwd;
    const int lane = threadIdx.x % 32;
    const RowTask task = row_task(p.len_k, p.heads_kv);
    const SequenceBounds seq = sequence_bounds(p, task.b);
    if (task.i >= seq.len_k) return;
    const int b = task.b, hk = task.h, j = (int)task.i;
    const int len_q = (int)seq.len_q, key_len = (int)seq.key_len;
    const Band band = dense_band(p, len_q, key_len);
    const int group = p.heads_q / p.heads_kv;
    const int64_t krow = seq.row0_k + j;
    float k[MAX_PER_LANE], v[MAX_PER_LANE], q[MAX_PER_LANE], d_o[MAX_PER_LANE], dk[MAX_PER_LANE], dv[MAX_PER_LANE];
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) dk[u] = dv[u] = 0.f;
    if (j < key_len) {  // keys past the key length get zero gradients and are never read
        load_row(k, reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + krow * p.k_row_stride,
                 p.dim_qk, lane);
        load_row(v, reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + krow * p.v_row_stride,
                 p.dim_v, lane);
        const auto visit = [&](int h, int64_t r0, int i) {  // warp-uniform
            const int64_t row = seq.row0_q + i;
            load_row(q, reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row * p.q_row_stride,
                     p.dim_qk, lane);
            load_row(d_o,
                     reinterpret_cast<const T*>(bp.d_o) + b * bp.do_batch_stride + h * bp.do_head_stride +
                         row * bp.do_row_stride,
                     p.dim_v, lane);
            const float lse = reinterpret_cast<const float*>(p.lse)[r0 + i];
            const float delta = reinterpret_cast<const float*>(bp.delta)[r0 + i];
            const float pv = expf(fmaf(dot_lanes(q, k), p.scale, -lse));
            const float ds = pv * (dot_lanes(d_o, v) - delta);
#pragma unroll
            for (int u = 0; u < MAX_PER_LANE; ++u) {
                dv[u] = fmaf(pv, d_o[u], dv[u]);
                dk[u] = fmaf(ds, q[u], dk[u]);
            }
        };
        const int begin = max(0, j - band.hi), end = min(len_q, j - band.lo + 1);
        for (int gi = 0; gi < group; ++gi) {
            const int h = hk * group + gi;
            const int64_t r0 = lse_row0(p, b, h, seq.row0_q);
            if (p.sp_row_offsets) {
                // Block-sparse: the query blocks keeping j's key block (the layout's columns),
                // ascending, and the rows of each that its mask admits.
                const int bs = p.sp_block_size;
                int e0, e1;
                sparse_column(bp, h, j / bs, &e0, &e1);
                for (int e = e0; e < e1; ++e) {
                    const int x = reinterpret_cast<const int*>(bp.sp_col_blocks)[e];
                    const int i0 = reinterpret_cast<const int*>(bp.sp_col_q_blocks)[e] * bs;
                    for (int i = i0; i < min(len_q, i0 + bs); ++i)
                        if (sparse_admits(p, x, i, j)) visit(h, r0, i);
                }
            } else {
                for (int i = begin; i < end; ++i) visit(h, r0, i);
            }
        }
    }
    T* odk = reinterpret_cast<T*>(bp.dk) + b * bp.dk_batch_stride + hk * bp.dk_head_stride + krow * bp.dk_row_stride;
    T* odv = reinterpret_cast<T*>(bp.dv) + b * bp.dv_batch_stride + hk * bp.dv_head_stride + krow * bp.dv_row_stride;
#pragma unroll
    for (int u = 0; u < MAX_PER_LANE; ++u) {
        const int d = lane + 32 * u;
        if (d < p.dim_qk) odk[d] = from_f32<T>(dk[u] * p.scale);
        if (d < p.dim_v) odv[d] = from_f32<T>(dv[u]);
    }
}

}  // namespace

#define CUATTN_ATTENTION_BWD_ROWS(T, SUFFIX)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) attention_bwd_delta_##SUFFIX(const cuattn_attention_bwd_params p) { \
        bwd_delta<T>(p);                                                                                             \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ROWS)                                                          \
        attention_bwd_dq_convert_##SUFFIX(const cuattn_attention_bwd_params p) {                                     \
        bwd_dq_convert<T>(p);                                                                                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ROWS) attention_bwd_exact_dq_##SUFFIX(const cuattn_attention_bwd_params p) { \
        bwd_exact_dq<T>(p);                                                                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ROWS)                                                          \
        attention_bwd_exact_dkdv_##SUFFIX(const cuattn_attention_bwd_params p) {                                     \
        bwd_exact_dkdv<T>(p);                                                                                        \
    }

CUATTN_ATTENTION_BWD_ROWS(float, f32)
CUATTN_ATTENTION_BWD_ROWS(__half, f16)
CUATTN_ATTENTION_BWD_ROWS(__nv_bfloat16, bf16)

#define CUATTN_ATTENTION_BWD_TC(T, SUFFIX, HD)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_dkdv_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                                  \
        extern __shared__ __align__(16) unsigned char smem_bwd_dkdv_hd##HD##_##SUFFIX[];                             \
        attention_bwd_dkdv<T, HD, false, false>(p, reinterpret_cast<T*>(smem_bwd_dkdv_hd##HD##_##SUFFIX));                 \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_dkdv_dq_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                               \
        extern __shared__ __align__(16) unsigned char smem_bwd_dkdvdq_hd##HD##_##SUFFIX[];                           \
        attention_bwd_dkdv<T, HD, true, false>(p, reinterpret_cast<T*>(smem_bwd_dkdvdq_hd##HD##_##SUFFIX));                \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_dq_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                                    \
        extern __shared__ __align__(16) unsigned char smem_bwd_dq_hd##HD##_##SUFFIX[];                               \
        attention_bwd_dq<T, HD, false>(p, reinterpret_cast<T*>(smem_bwd_dq_hd##HD##_##SUFFIX));                            \
    }

CUATTN_ATTENTION_BWD_TC(__half, f16, 64)
CUATTN_ATTENTION_BWD_TC(__half, f16, 128)
CUATTN_ATTENTION_BWD_TC(__half, f16, 256)
CUATTN_ATTENTION_BWD_TC(__nv_bfloat16, bf16, 64)
CUATTN_ATTENTION_BWD_TC(__nv_bfloat16, bf16, 128)
CUATTN_ATTENTION_BWD_TC(__nv_bfloat16, bf16, 256)

// Block-sparse entries (layouts of block size CUATTN_ATTN_BWD_SPARSE_BS = BM = BN; the host
// re-blocks other block sizes to it): the same bodies with the kept-block walks (SPARSE).
static_assert(CUATTN_ATTN_BWD_SPARSE_BS == BM && CUATTN_ATTN_BWD_SPARSE_BS == BN, "one layout block per tile");
#define CUATTN_ATTENTION_BWD_SPARSE(T, SUFFIX, HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_sparse_dkdv_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                           \
        extern __shared__ __align__(16) unsigned char smem_bwd_sp_dkdv_hd##HD##_##SUFFIX[];                          \
        attention_bwd_dkdv<T, HD, false, true>(p, reinterpret_cast<T*>(smem_bwd_sp_dkdv_hd##HD##_##SUFFIX));        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_sparse_dkdv_dq_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                        \
        extern __shared__ __align__(16) unsigned char smem_bwd_sp_dkdvdq_hd##HD##_##SUFFIX[];                        \
        attention_bwd_dkdv<T, HD, true, true>(p, reinterpret_cast<T*>(smem_bwd_sp_dkdvdq_hd##HD##_##SUFFIX));       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                         \
        attention_bwd_sparse_dq_hd##HD##_##SUFFIX(const cuattn_attention_bwd_params p) {                             \
        extern __shared__ __align__(16) unsigned char smem_bwd_sp_dq_hd##HD##_##SUFFIX[];                            \
        attention_bwd_dq<T, HD, true>(p, reinterpret_cast<T*>(smem_bwd_sp_dq_hd##HD##_##SUFFIX));                   \
    }

CUATTN_ATTENTION_BWD_SPARSE(__half, f16, 64)
CUATTN_ATTENTION_BWD_SPARSE(__half, f16, 128)
CUATTN_ATTENTION_BWD_SPARSE(__half, f16, 256)
CUATTN_ATTENTION_BWD_SPARSE(__nv_bfloat16, bf16, 64)
CUATTN_ATTENTION_BWD_SPARSE(__nv_bfloat16, bf16, 128)
CUATTN_ATTENTION_BWD_SPARSE(__nv_bfloat16, bf16, 256)
