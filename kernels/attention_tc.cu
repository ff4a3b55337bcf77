// Scaled dot-product attention forward on tensor cores (f16/bf16 in, f32 accumulation), v2:
// the FlashAttention-2 schedule with 128-row query blocks and a cp.async pipeline.
// History and measured speeds: kernels/dev/attention_tc_v1.cu (v1: 64-row blocks, synchronous
// loads, ~170 TFLOP/s at hd128 on an H200).
//
// Algorithm (docs/kernels/attention-forward.md; CPU twin: src/twin/attention.rs; warp
// fragment twin: tests/attention_tc_fragments.rs): one CTA per (query block of BM rows, head,
// batch), flattened into gridDim.x with the query block fastest and visited last-to-first, so
// causal masks start the heaviest (most key tiles) blocks first and the short ones fill the
// tail. Four warps; each owns MT = BM/64 slabs of 16 consecutive query rows. For each key tile
// of BN keys:
//   S = Q·Kᵀ with mma.m16n8k16 (A = Q from shared memory by ldmatrix, B = K rows by ldmatrix;
//       one K fragment feeds the warp's MT row slabs);
//   the key tiles are those of the row band [i + lo, i + hi] that causal masks and sliding
//       windows leave (src/key_band.rs): tiles outside it are never loaded; tiles that cross
//       its edges or run past the last key are masked element by element (assignment to −inf);
//       block-sparse entries (SPARSE) instead visit the kept blocks of a layout
//       (src/sparse/), running full blocks unmasked and partial ones with their band/bitmask;
//   online softmax in the exp2 domain on raw scores (running max m, per-lane partial sums l,
//       unnormalised O; mu = 0 while m is −inf, so fully-masked rows never make NaN);
//   O += P·V with P (rounded to the input dtype) re-used from the S accumulators as the A
//       operand (no trip through shared memory), B = V by ldmatrix.trans.
// Finalisation: l summed over the quad, O /= l, LSE = scale·m + ln l; O = 0 and LSE = −inf when
// l = 0. K/V rows past the block's last admissible key are zero-filled, so NaN in keys that no
// row of the block may see cannot reach the output through 0·NaN.
//
// Pipeline (one buffer each for Q, K, V; cp.async.cg 16-byte copies with zero-fill):
//   load Q, K₀ ─┐ loop n: wait K_n; barrier; start V_n; S = Q·K_nᵀ; softmax;
//               └──────── wait V_n; barrier; start K_{n+1}; O += P·V_n
// so V_n arrives while S is computed and K_{n+1} while P·V runs. Layouts that are not 16-byte
// aligned (odd strides or head dims) take synchronous element loads through the same schedule.
//
// Tiles (cuattn_params.h): HD ∈ {64, 128, 256} (head dims padded with zeros); BM×BN = 128×128
// for HD 64, 128×64 for HD 128, 64×32 for HD 256. Shared rows are padded by 8 elements (16
// bytes), so the 8 row addresses of each ldmatrix 8×8 matrix fall in 8 different 16-byte bank
// groups: conflict-free without a swizzle.
// Why 128 rows: each CTA streams all of K and V through L2; 64-row blocks needed ~10 TB/s of L2
// traffic at 170 TFLOP/s (v1). Why these BN: measured on an H200 (2026-11-26,
// docs/gpu-runs/2026-11-26-h200-attention-tile-variants.txt; kernels/dev/attention_tc_variants.cu),
// bf16, L = 16k, TFLOP/s non-causal / causal:
//   HD 128: 128×64 4 warps 294/267 (255 registers, ~130 bytes spilled) · 128×32 4 warps 274/252
//           (no spills) · 128×32 8 warps 255/232 · 64×64 4 warps 251/249 · 128×64 8 warps 217/217
//   HD 64:  128×128 4 warps 273/259 (~110 bytes spilled) · 128×64 4 warps 253/243 · 8 warps ≤246
// The small spills cost less than the extra barriers and row-max passes of half-size key tiles;
// eight warps of 16 rows each read every K/V fragment twice as often from shared memory.
// Per thread at HD 128: O is 2·16·4 = 128 f32 registers, S 2·8·4 = 64.
// At HD 64 those spills were mostly the tile loads' per-copy offsets, kept live across the
// key loop. Since 2026-11-30 the 128-row tiles' K/V loads find their copies from one row base per
// thread where ptxas spills less that way (KvLoadForm below; the same copies): spill bytes
// (stores/loads) sm_80 HD 64 144/136 → 40/40, HD 128 76/72 → 56/56; sm_90 HD 64 160/164 → 0,
// HD 128 76/84 → 60/72. What is left at HD 64 is the softmax's running sums. Not yet run on a GPU.
//
// The mma/ldmatrix/cp.async wrappers (common.cuh) and the tile loads and mask band
// (attention_common.cuh) are shared with the backward, kernels/attention_bwd.cu.
//
// FLOPs: 4·B·Hq·Lq·Lk·D (half when causal). Bytes: Q and O once, K and V once per query block.

#include "common.cuh"
#include "attention_common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int WARPS = CUATTN_ATTN_TC_THREADS / 32;  // of the built kernels; dev variants vary it

// How the K and V tile loads find their copies (load_tile's ROW_STEP; the same copies in the same
// order either way, tests/load_tile_forms.rs). The 128-row tiles of HD ≤ 128 sit at 255
// registers; with the flat index ptxas keeps every copy's row and column offsets of the K/V loads
// live across the key loop and spills them (HD 64: 144 / 136 bytes on sm_80, 160 / 164 on sm_90).
// With ROW_STEP a thread keeps one row base and one column. Which loads take it is what ptxas
// gives the fewest spills for, per tile and arch (never more than the flat index): `k` is
// K_{n+1}'s load in the loop, `k0` K_0's before it, `v` V_n's. The dense HD 128 tile spills more
// with a ROW_STEP K load (92 / 212 bytes on sm_80) and less with only V's (56 / 56); sm_90's
// sparse HD 64 entry keeps the flat index for K_0 (56 spilled bytes instead of 140). The 64-row
// tiles do not spill and keep the flat index. Numbers per entry and arch:
// docs/kernels/attention-forward.md (register report).
template <int HD, int BM, bool SPARSE>
struct KvLoadForm {
    static constexpr bool v = BM == 128 && HD <= 128;
    static constexpr bool k = v && (HD == 64 || SPARSE);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static constexpr bool k0 = k && !(SPARSE && HD == 64);
#else
    static constexpr bool k0 = k;
#endif
};

// SPARSE: the key tiles are the kept blocks of the block-sparse layout in `p` (sp_*), each of
// BM = block size keys cut into BM/BN tiles; otherwise every tile of the dense band.
template <typename T, int HD, int BM, int BN, int WARPS, bool SPARSE>
__device__ void attention_tc(const cuattn_attention_fwd_params& p, T* smem) {
    constexpr int PITCH = HD + 8;
    constexpr int THREADS = 32 * WARPS;
    constexpr int MT = BM / (16 * WARPS);  // 16-row slabs per warp
    static_assert(MT * 16 * WARPS == BM, "BM is a multiple of 16 rows per warp");
    using KvForm = KvLoadForm<HD, BM, SPARSE>;
    T* sQ = smem;
    T* sK = sQ + BM * PITCH;
    T* sV = sK + BN * PITCH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;

    const int64_t q_blocks = (p.len_q + BM - 1) / BM;
    const int64_t flat = blockIdx.x;
    const int64_t mb = q_blocks - 1 - flat % q_blocks;  // last block first (see header)
    const int h = (int)((flat / q_blocks) % p.heads_q);
    const int b = (int)(flat / (q_blocks * p.heads_q));

    const SequenceBounds seq = sequence_bounds(p, b);
    // Row and key indices are 32-bit (lengths are int32); only pointer offsets need 64 bits.
    const int64_t row0_q = seq.row0_q, row0_k = seq.row0_k;
    const int len_q = (int)seq.len_q, key_len = (int)seq.key_len;
    const int q0 = (int)mb * BM;
    if (q0 >= len_q) return;  // CTA-uniform, before any barrier

    const int q_last = min(len_q, q0 + BM) - 1;  // the block's last real row
    // Dense: the band's key range [kb, ke) for the block's rows, as whole tiles from n_begin.
    // Sparse: the row of kept blocks (per-block bands and bitmasks are read per tile).
    const Band band = dense_band(p, len_q, key_len);
    int n_begin = 0, n_tiles = 0, kb = 0, ke = key_len;
    int sp_first = 0;  // sparse: first kept block of this row
    constexpr int SUB = SPARSE ? BM / BN : 1;  // sparse: tiles per kept block
    static_assert(!SPARSE || BM % BN == 0, "a kept block is whole key tiles");
    if constexpr (SPARSE) {
        const int* ro = reinterpret_cast<const int*>(p.sp_row_offsets);
        const int r = (p.sp_stored_heads == 1 ? 0 : h) * p.sp_q_blocks + (int)mb;
        sp_first = ro[r];
        n_tiles = (ro[r + 1] - sp_first) * SUB;
    } else {
        kb = max(0, q0 + band.lo);
        ke = min(key_len, q_last + band.hi + 1);
        if (ke > kb) {
            n_begin = kb / BN;
            n_tiles = (ke + BN - 1) / BN - n_begin;
        }
    }
    // Key tile `tile` of this block: its first key, which K/V rows to load, and how it is masked.
    struct TileInfo {
        int key0, kind, lo, hi, bits;  // kind: CUATTN_SPARSE_* for sparse tiles
        int kv_lo, kv_hi;              // rows of the tile whose K/V any row of the block keeps
        uint64_t keep_lo, keep_hi;     // ... and the bitmask's union of kept keys
    };
    const auto tile_info = [&](int tile) {
        TileInfo ti;
        ti.keep_lo = ti.keep_hi = ~0ull;
        ti.bits = -1;
        if constexpr (SPARSE) {
            const int idx = sp_first + tile / SUB;
            const int bs_col = reinterpret_cast<const int*>(p.sp_col_indices)[idx] * BM;
            ti.key0 = bs_col + (tile % SUB) * BN;
            ti.kind = reinterpret_cast<const int*>(p.sp_mask_kind)[idx];
            ti.lo = band.lo, ti.hi = key_len;
            int lo_key = 0, hi_key = key_len;
            if (ti.kind == CUATTN_SPARSE_BAND) {
                ti.lo = reinterpret_cast<const int*>(p.sp_band_lo)[idx];
                ti.hi = reinterpret_cast<const int*>(p.sp_band_hi)[idx];
                lo_key = max(0, q0 + ti.lo), hi_key = min(key_len, q_last + ti.hi + 1);
            } else if (ti.kind == CUATTN_SPARSE_BITS) {
                ti.bits = reinterpret_cast<const int*>(p.sp_bits_index)[idx];
                // union of the block's rows, for this tile's BN keys (BN ≤ 128, offset a multiple of BN)
                const uint64_t* u = reinterpret_cast<const uint64_t*>(p.sp_bits_union) + (int64_t)ti.bits * p.sp_words_per_row;
                const int c0 = (tile % SUB) * BN;  // first column of the tile in the block
                if constexpr (BN >= 64) {
                    ti.keep_lo = u[c0 / 64];
                    ti.keep_hi = BN > 64 ? u[c0 / 64 + 1] : 0;
                } else {
                    ti.keep_lo = (u[c0 / 64] >> (c0 % 64)) & ((1ull << BN) - 1);
                    ti.keep_hi = 0;
                }
            }
            ti.kv_lo = max(0, lo_key - ti.key0);
            ti.kv_hi = min(BN, hi_key - ti.key0);
        } else {
            ti.key0 = (n_begin + tile) * BN;
            ti.kind = CUATTN_SPARSE_BAND;
            ti.lo = band.lo, ti.hi = band.hi;
            ti.kv_lo = max(0, kb - ti.key0);
            ti.kv_hi = min(BN, ke - ti.key0);
            // Full tile: every row's band encloses it (the block's last row's start, first row's end).
            if (q_last + band.lo <= ti.key0 && ti.key0 + BN - 1 <= q0 + band.hi && ti.key0 + BN <= key_len)
                ti.kind = CUATTN_SPARSE_FULL;
        }
        if (ti.kind == CUATTN_SPARSE_FULL && ti.key0 + BN > key_len) ti.kind = CUATTN_SPARSE_KEY_TAIL;
        return ti;
    };

    const int hk = h / (p.heads_q / p.heads_kv);
    const T* gq = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + (row0_q + q0) * p.q_row_stride;
    const T* gk = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + row0_k * p.k_row_stride;
    const T* gv = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + row0_k * p.v_row_stride;
    const bool vec = p.vectorized != 0;

    load_tile<T, HD, BM, THREADS>(sQ, gq, p.q_row_stride, 0, len_q - q0, p.dim_qk, vec, gq);
    TileInfo ti{};  // the tile being computed; K of tile 0 starts loading now
    if (n_tiles > 0) ti = tile_info(0);
    if (n_tiles > 0)
        load_tile<T, HD, BN, THREADS, SPARSE, KvForm::k0>(sK, gk + (int64_t)ti.key0 * p.k_row_stride, p.k_row_stride, ti.kv_lo, ti.kv_hi,
                                      p.dim_qk, vec, gk, ti.keep_lo, ti.keep_hi);

    float o[MT][HD / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nd = 0; nd < HD / 8; ++nd)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][nd][e] = 0.f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;
    const float c = p.scale * 1.4426950408889634f;
    const int wrow = warp * 16 * MT;     // the warp's first row in the block
    const int row_base = q0 + wrow + g;  // this lane's rows: row_base + 16·mt + {0, 8}

    for (int n = 0; n < n_tiles; ++n) {
        const int key0 = ti.key0;
        if (vec) cp_async_wait_all();  // K_n (and Q, the first time)
        __syncthreads();               // ... visible to all; every warp is done with V_{n-1}
        load_tile<T, HD, BN, THREADS, SPARSE, KvForm::v>(sV, gv + (int64_t)key0 * p.v_row_stride, p.v_row_stride, ti.kv_lo, ti.kv_hi,
                                      p.dim_v, vec, gv, ti.keep_lo, ti.keep_hi);

        // S = Q·Kᵀ for this warp's MT slabs: BN/8 accumulators of 16×8 each.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(a[mt], sQ + (wrow + 16 * mt + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
                uint32_t kb[4];  // reg0 n-block 0, reg0 n-block 1, reg1 n-block 0, reg1 n-block 1
                ldmatrix_x4(kb, sK + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(s[mt][2 * nb2], a[mt], kb[0], kb[2]);
                    mma16816<T>(s[mt][2 * nb2 + 1], a[mt], kb[1], kb[3]);
                }
            }
        }

        // Mask by assignment in tiles where some element is masked: the band (dense, or a sparse
        // band block), the key tail, or a sparse block's bitmask.
        if (ti.kind != CUATTN_SPARSE_FULL) {
            const uint64_t* bits = ti.kind == CUATTN_SPARSE_BITS
                                       ? reinterpret_cast<const uint64_t*>(p.sp_bits) + (int64_t)ti.bits * BM * p.sp_words_per_row
                                       : nullptr;
            const int block_col0 = SPARSE ? key0 - key0 % BM : 0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = row_base + 16 * mt + 8 * (e >> 1);
                        const int col = key0 + nb * 8 + 2 * t + (e & 1);
                        bool keep = col < key_len && col >= row + ti.lo && col <= row + ti.hi;
                        // sparse_bit's test written out: the call computes the same bit, but
                        // ptxas then allocates the sm_80 bs128 HD 64 entry worse (spill bytes
                        // 140/144 -> 184/200; sm_90 56/56 -> 48/48), over its bound in
                        // ops::attention's spill test.
                        if (bits) {
                            const int c = col - block_col0;
                            keep = col < key_len && row < len_q &&
                                   ((bits[(int64_t)(row - q0) * p.sp_words_per_row + c / 64] >> (c % 64)) & 1);
                        }
                        if (!keep) s[mt][nb][e] = -INFINITY;
                    }
        }

        // Online softmax; per slab, rows g (r = 0: elements 0, 1) and g + 8 (r = 1: 2, 3).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * r], s[mt][nb][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][r], mx);
                const float mu_c = (m_new == -INFINITY ? 0.f : m_new) * c;
                const float alpha = exp2_ftz(fmaf(m[mt][r], c, -mu_c));
                l[mt][r] *= alpha;
                // Once the running max settles, alpha is 1 for every row of the warp: skip the
                // HD/4 multiplies (the vote keeps the branch warp-uniform).
                if (__any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
                    for (int nd = 0; nd < HD / 8; ++nd) {
                        o[mt][nd][2 * r] *= alpha;
                        o[mt][nd][2 * r + 1] *= alpha;
                    }
                }
#pragma unroll
                for (int nb = 0; nb < BN / 8; ++nb) {
                    s[mt][nb][2 * r] = exp2_ftz(fmaf(s[mt][nb][2 * r], c, -mu_c));
                    s[mt][nb][2 * r + 1] = exp2_ftz(fmaf(s[mt][nb][2 * r + 1], c, -mu_c));
                    l[mt][r] += s[mt][nb][2 * r] + s[mt][nb][2 * r + 1];
                }
                m[mt][r] = m_new;
            }

        if (vec) cp_async_wait_all();  // V_n
        __syncthreads();               // ... visible to all; every warp is done with K_n
        const TileInfo next = tile_info(n + 1 < n_tiles ? n + 1 : n);
        if (n + 1 < n_tiles)
            load_tile<T, HD, BN, THREADS, SPARSE, KvForm::k>(sK, gk + (int64_t)next.key0 * p.k_row_stride, p.k_row_stride, next.kv_lo,
                                          next.kv_hi, p.dim_qk, vec, gk, next.keep_lo, next.keep_hi);

        // O += P·V, P taken from the S accumulators as A fragments (notes §3).
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2<T>(s[mt][2 * j][0], s[mt][2 * j][1]);
                pa[mt][1] = pack2<T>(s[mt][2 * j][2], s[mt][2 * j][3]);
                pa[mt][2] = pack2<T>(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
                pa[mt][3] = pack2<T>(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
            }
#pragma unroll
            for (int nd2 = 0; nd2 < HD / 16; ++nd2) {
                uint32_t vb[4];  // .trans: reg0/reg1 of dims nd2*16..+7, then reg0/reg1 of +8..+15
                ldmatrix_x4_trans(vb, sV + (j * 16 + (lane & 15)) * PITCH + nd2 * 16 + 8 * (lane >> 4));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(o[mt][2 * nd2], pa[mt], vb[0], vb[1]);
                    mma16816<T>(o[mt][2 * nd2 + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
        ti = next;
    }
    if (vec) cp_async_wait_all();  // no tiles: nothing may stay in flight past the CTA's end

    // Finalise and write this lane's rows.
    T* go = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + row0_q * p.o_row_stride;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = l[mt][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int row = row_base + 16 * mt + 8 * r;
            const bool any = sum > 0.f;
            const float inv = any ? 1.f / sum : 0.f;
            if (row < len_q) {
#pragma unroll
                for (int nd = 0; nd < HD / 8; ++nd)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = nd * 8 + 2 * t + e;
                        if (col < p.dim_v) go[(int64_t)row * p.o_row_stride + col] = from_f32<T>(any ? o[mt][nd][2 * r + e] * inv : 0.f);
                    }
                if (p.lse && t == 0) {
                    float* lse = reinterpret_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + row0_q + row;
                    *lse = any ? p.scale * m[mt][r] + logf(sum) : -INFINITY;
                }
            }
        }
}

}  // namespace

#define CUATTN_ATTENTION_TC(T, SUFFIX, HD)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 2)                                        \
        attention_tc_hd##HD##_##SUFFIX(const cuattn_attention_fwd_params p) {                         \
        extern __shared__ __align__(16) unsigned char smem_tc_hd##HD##_##SUFFIX[];                    \
        attention_tc<T, HD, CUATTN_ATTN_TC_BM_HD##HD, CUATTN_ATTN_TC_BN_HD##HD, WARPS, false>(        \
            p, reinterpret_cast<T*>(smem_tc_hd##HD##_##SUFFIX));                                      \
    }

CUATTN_ATTENTION_TC(__half, f16, 64)
CUATTN_ATTENTION_TC(__half, f16, 128)
CUATTN_ATTENTION_TC(__half, f16, 256)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 64)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 128)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 256)

// Block-sparse entries: query blocks of the layout's block size BS, key tiles of min(BS, the
// dense BN) (cuattn_params.h: CUATTN_SPARSE_BN_*).
#define CUATTN_ATTENTION_SPARSE(T, SUFFIX, BS, HD)                                                     \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 2)                                        \
        attention_sparse_bs##BS##_hd##HD##_##SUFFIX(const cuattn_attention_fwd_params p) {            \
        extern __shared__ __align__(16) unsigned char smem_sp_bs##BS##_hd##HD##_##SUFFIX[];           \
        attention_tc<T, HD, BS, CUATTN_SPARSE_BN_BS##BS##_HD##HD, WARPS, true>(                       \
            p, reinterpret_cast<T*>(smem_sp_bs##BS##_hd##HD##_##SUFFIX));                             \
    }

CUATTN_ATTENTION_SPARSE(__half, f16, 64, 64)
CUATTN_ATTENTION_SPARSE(__half, f16, 64, 128)
CUATTN_ATTENTION_SPARSE(__half, f16, 64, 256)
CUATTN_ATTENTION_SPARSE(__half, f16, 128, 64)
CUATTN_ATTENTION_SPARSE(__half, f16, 128, 128)
CUATTN_ATTENTION_SPARSE(__nv_bfloat16, bf16, 64, 64)
CUATTN_ATTENTION_SPARSE(__nv_bfloat16, bf16, 64, 128)
CUATTN_ATTENTION_SPARSE(__nv_bfloat16, bf16, 64, 256)
CUATTN_ATTENTION_SPARSE(__nv_bfloat16, bf16, 128, 64)
CUATTN_ATTENTION_SPARSE(__nv_bfloat16, bf16, 128, 128)
