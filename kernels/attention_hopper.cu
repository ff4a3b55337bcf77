// Attention forward for Hopper (sm_90a): TMA loads, an mbarrier ring, warp specialisation and
// warpgroup MMAs (wgmma). docs/kernels/attention-hopper.md has the long version.
//
// Algorithm: FlashAttention's online softmax. For a block of BM = 128 query rows of one
// (batch, head): for each key tile of BN = 128 rows in the block's band,
//     S = Q·Kᵀ,  m' = max(m, rowmax(S)),  P = exp(scale·(S − m')),  l = l·e^{scale(m−m')} + rowsum(P),
//     O = O·e^{scale(m−m')} + P·V,
// and finally O /= l, LSE = scale·m + ln l (natural log, −∞ for a row that sees no key).
//
// Who does what (384 threads = three warpgroups of 128):
//   warpgroup 0, the PRODUCER, gives most of its registers away (setmaxnreg to 24) and one of
//     its threads issues every TMA load: Q once, then K and V of each tile into a ring of
//     STAGES = 2 buffers. Each buffer has a "full" mbarrier (completes when the TMA bytes have
//     landed) and an "empty" one (completes when both consumers have released it).
//   warpgroups 1 and 2, the CONSUMERS (setmaxnreg to 240), own query rows 0–63 and 64–127 of
//     the block. Each runs S = Q·Kᵀ as an SS wgmma (both operands in shared memory) and
//     O += P·V as an RS wgmma (P straight from the S accumulators, packed to 16 bits).
//   Overlap: in iteration t a consumer issues S_t = Q·K_tᵀ and O += P_{t−1}·V_{t−1} back to
//     back, waits for the first only, and runs tile t's softmax while the second is still on
//     the tensor cores. The two consumers also take turns issuing (named barriers 1 and 2), so
//     one's softmax runs while the other's GEMMs do.
//
// Shared memory (bytes, D = 128): Q 32 Ki, K 2×32 Ki, V 2×32 Ki, barriers: 160 Ki + 64 (D = 64:
// 80 Ki). Every tile is stored as D/64 boxes of [rows][64] 16-bit values in the 128-byte swizzled
// layout TMA writes and wgmma reads (each box 1024-byte aligned).
//
// Masks: key padding (key_lens), causal top-left / bottom-right and sliding windows, as one band
// [i + lo, i + hi] of keys per query row i (src/key_band.rs). Tiles outside the block's band are
// never loaded; tiles crossing its edge are masked element by element. V rows past a sequence's
// key length are zeroed in shared memory before P·V, so NaN in padding cannot leak through 0·NaN.
// Not here (the host keeps those calls on attention_tc): packed varlen batches, block-sparse
// layouts, head dims other than 64 and 128, D ≠ Dv, row strides that are not multiples of
// 8 elements.
//
// Per block: reads BM·D + 2·tiles·BN·D elements (K/V tiles shared by the two consumers), writes
// BM·D (+ BM LSE); 4·BM·BN·D FLOPs per tile.
//
// Status: compiled and its SASS read (tests/attention_hopper_sass.rs); its barrier protocol is
// model-checked on the CPU (src/twin/hopper_pipeline.rs). It has NOT run on a GPU yet, so
// Kernel::Auto never picks it; `Kernel::Hopper` asks for it explicitly.

#include "cuattn_params.h"
#include "attention_common.cuh"
#include "hopper.cuh"
#include "hopper_wgmma.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int THREADS = CUATTN_ATTN_HOPPER_THREADS;

#ifdef CUATTN_HOPPER
constexpr int BM = CUATTN_ATTN_HOPPER_BM;
constexpr int BN = CUATTN_ATTN_HOPPER_BN;
constexpr int STAGES = CUATTN_ATTN_HOPPER_STAGES;
constexpr int BOX = CUATTN_ATTN_HOPPER_BOX_COLS;
constexpr int CONSUMER_THREADS = THREADS - 128;
static_assert(BM == 2 * 64, "two consumer warpgroups of 64 rows");
static_assert(BN == 128, "S accumulators are m64n128");

template <int D> struct Tiles {
    static constexpr int BOXES = D / BOX;
    static constexpr uint32_t Q_BOX_BYTES = BM * BOX * 2;  // 16 KiB
    static constexpr uint32_t KV_BOX_BYTES = BN * BOX * 2; // 16 KiB
    static constexpr uint32_t Q_BYTES = BOXES * Q_BOX_BYTES;
    static constexpr uint32_t KV_BYTES = BOXES * KV_BOX_BYTES;
};

template <int D> struct __align__(1024) Smem {
    uint8_t q[Tiles<D>::Q_BYTES];
    uint8_t k[STAGES][Tiles<D>::KV_BYTES];
    uint8_t v[STAGES][Tiles<D>::KV_BYTES];
    uint64_t q_full;
    uint64_t k_full[STAGES], v_full[STAGES];
    uint64_t k_empty[STAGES], v_empty[STAGES];
};

static_assert(sizeof(Smem<64>) + 1024 == CUATTN_ATTN_HOPPER_SMEM_HD64, "CUATTN_ATTN_HOPPER_SMEM_HD64");
static_assert(sizeof(Smem<128>) + 1024 == CUATTN_ATTN_HOPPER_SMEM_HD128, "CUATTN_ATTN_HOPPER_SMEM_HD128");

// The key tiles block m_block visits: [first, first + count). Producer and consumers both call
// this, so they agree on the tile sequence.
struct TileRange {
    int first, count;
    int key_len;
    cuattn::Band band;
};

__device__ __forceinline__ TileRange tile_range(const cuattn_attention_fwd_params& p, int b, int m_block) {
    int key_len = p.len_k;
    if (p.key_lens) key_len = min(key_len, reinterpret_cast<const int*>(p.key_lens)[b]);
    key_len = max(key_len, 0);
    const cuattn::Band band = cuattn::dense_band(p, p.len_q, key_len);
    const int q0 = m_block * BM, q_last = min(q0 + BM, p.len_q) - 1;
    const int kb = max(0, q0 + band.lo);
    const int ke = min(key_len, q_last + band.hi + 1);
    TileRange r{0, 0, key_len, band};
    if (ke > kb) {
        r.first = kb / BN;
        r.count = (ke - 1) / BN - r.first + 1;
    }
    return r;
}

// The wgmma shapes per element type, chosen by accumulator size (m64n64: 32 floats per thread,
// m64n128: 64). S = Q·Kᵀ has both operands K-major (no transposes); O += P·V reads V, stored
// [keys][d], N-major (transpose B).
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) { wgmma_m64n128k16_ss_bf16<0, 0>(d, a, b, acc); }
    static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int acc) { wgmma_m64n64k16_rs_bf16<1>(d, a, b, acc); }
    static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int acc) { wgmma_m64n128k16_rs_bf16<1>(d, a, b, acc); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return cuattn::pack2<__nv_bfloat16>(lo, hi); }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int acc) { wgmma_m64n128k16_ss_f16<0, 0>(d, a, b, acc); }
    static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int acc) { wgmma_m64n64k16_rs_f16<1>(d, a, b, acc); }
    static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int acc) { wgmma_m64n128k16_rs_f16<1>(d, a, b, acc); }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return cuattn::pack2<__half>(lo, hi); }
};

// S(64×BN) = Q_c(64×D)·Kᵀ. K-major, 128-byte swizzle: 8-row groups 1024 bytes apart; a k16 step
// moves 32 bytes inside a 128-byte row, the next 64 columns live in the next box.
template <typename T, int D>
__device__ __forceinline__ void gemm_qk(float (&s)[BN / 2], uint32_t q_base, uint32_t k_base) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t qa = q_base + (kk / 4) * Tiles<D>::Q_BOX_BYTES + (kk % 4) * 32;
        const uint32_t ka = k_base + (kk / 4) * Tiles<D>::KV_BOX_BYTES + (kk % 4) * 32;
        Mma<T>::ss(s, smem_desc_sw128(qa, 16, 1024), smem_desc_sw128(ka, 16, 1024), kk > 0);
    }
}

// O(64×D) += P(64×BN)·V(BN×D), P in registers. V N-major: the leading offset is the distance
// between 64-column boxes, a k16 step is 16 rows = 2048 bytes.
template <typename T, int D>
__device__ __forceinline__ void gemm_pv(float (&o)[D / 2], const uint32_t (&p)[BN / 4], uint32_t v_base) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
        Mma<T>::rs(o, a, smem_desc_sw128(v_base + kk * 2048, Tiles<D>::KV_BOX_BYTES, 1024), 1);
    }
}

// Accumulator element i of an m64nN wgmma in this thread: row 16·warp + lane/4 + 8·half(i),
// column 8·(i/4) + 2·(lane%4) + i%2, half(i) = (i/2)%2. Each row's values sit in the 4 lanes
// of a quad.
__device__ __forceinline__ int acc_half(int i) { return (i >> 1) & 1; }
__device__ __forceinline__ int acc_col(int i, int lane) { return 8 * (i >> 2) + 2 * (lane & 3) + (i & 1); }

// Sets S to −∞ outside the band and past key_len, for rows r0 and r0 + 8 of this thread.
__device__ __forceinline__ void mask_tile(float (&s)[BN / 2], int row0, int key0, int lane, const TileRange& tr) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
        const int row = row0 + 8 * acc_half(i), j = key0 + acc_col(i, lane);
        if (j >= tr.key_len || j < row + tr.band.lo || j > row + tr.band.hi) s[i] = -INFINITY;
    }
}

// One online-softmax step on a tile's scores (in place → P, unnormalised), per owned row h:
// new max, the factor the old O and l are scaled by, and the running partial sum l (this
// thread's columns only; the quad's partial sums are combined once, at the end).
__device__ __forceinline__ void softmax_step(float (&s)[BN / 2], float (&m)[2], float (&l)[2], float (&rescale)[2],
                                             float scale_log2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float mx = m[h];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i)
            if (acc_half(i) == h) mx = fmaxf(mx, s[i]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that has seen no key yet keeps m = −∞: subtract 0 instead so exp2 gives 0, not NaN.
        const float shift = mx == -INFINITY ? 0.f : mx * scale_log2;
        rescale[h] = exp2f(m[h] * scale_log2 - shift);
        m[h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 2; ++i)
            if (acc_half(i) == h) {
                s[i] = exp2f(s[i] * scale_log2 - shift);
                sum += s[i];
            }
        l[h] = l[h] * rescale[h] + sum;
    }
}

// Zeroes rows [from, BN) of a K/V tile in shared memory (whole 128-byte rows, so the swizzle
// does not matter), shared by the 256 consumer threads.
template <int D>
__device__ __forceinline__ void zero_rows(uint8_t* tile, int from, int ctid) {
    const int chunks = (BN - from) * 8 * Tiles<D>::BOXES; // 16-byte chunks
    for (int c = ctid; c < chunks; c += CONSUMER_THREADS) {
        const int box = c / ((BN - from) * 8), rest = c % ((BN - from) * 8);
        const int row = from + rest / 8, chunk = rest % 8;
        *reinterpret_cast<uint4*>(tile + box * Tiles<D>::KV_BOX_BYTES + row * 128 + chunk * 16) = make_uint4(0, 0, 0, 0);
    }
}

template <typename T, int D>
__device__ void attention_hopper(const cuattn_attention_fwd_params& p, const CUtensorMap* tm_q,
                                 const CUtensorMap* tm_k, const CUtensorMap* tm_v) {
    // Dynamic shared memory is only guaranteed 16-byte alignment: skip to the next 1024-byte
    // boundary of the shared window (the host adds 1 KiB for this).
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u));
    const int tid = threadIdx.x, wg = tid / 128;
    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int h_kv = h / (p.heads_q / p.heads_kv);
    const TileRange tr = tile_range(p, b, m_block);

    if (tid == 0) {
        mbar_init(&sm.q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&sm.k_full[s], 1);
            mbar_init(&sm.v_full[s], 1);
            mbar_init(&sm.k_empty[s], 2); // one arrival per consumer warpgroup
            mbar_init(&sm.v_empty[s], 2);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) { // ------------------------------------------------------------ producer
        regs_shrink<CUATTN_ATTN_HOPPER_REGS_PRODUCER>();
        if (tid == 0 && tr.count > 0) {
            tma_prefetch_map(tm_q);
            tma_prefetch_map(tm_k);
            tma_prefetch_map(tm_v);
            mbar_expect_bytes(&sm.q_full, Tiles<D>::Q_BYTES);
            for (int x = 0; x < Tiles<D>::BOXES; ++x)
                tma_load_4d(sm.q + x * Tiles<D>::Q_BOX_BYTES, tm_q, &sm.q_full, x * BOX, m_block * BM, h, b);
            for (int t = 0; t < tr.count; ++t) {
                const int st = t % STAGES, key0 = (tr.first + t) * BN;
                // First lap: the empty barriers are fresh, and waiting on the parity before
                // phase 0 returns at once.
                const uint32_t free_parity = ((t / STAGES) & 1) ^ 1;
                mbar_wait(&sm.k_empty[st], free_parity);
                mbar_expect_bytes(&sm.k_full[st], Tiles<D>::KV_BYTES);
                for (int x = 0; x < Tiles<D>::BOXES; ++x)
                    tma_load_4d(sm.k[st] + x * Tiles<D>::KV_BOX_BYTES, tm_k, &sm.k_full[st], x * BOX, key0, h_kv, b);
                mbar_wait(&sm.v_empty[st], free_parity);
                mbar_expect_bytes(&sm.v_full[st], Tiles<D>::KV_BYTES);
                for (int x = 0; x < Tiles<D>::BOXES; ++x)
                    tma_load_4d(sm.v[st] + x * Tiles<D>::KV_BOX_BYTES, tm_v, &sm.v_full[st], x * BOX, key0, h_kv, b);
            }
        }
        return;
    }

    // ------------------------------------------------------------------------------ consumers
    regs_grow<CUATTN_ATTN_HOPPER_REGS_CONSUMER>();
    const int c = wg - 1, ctid = tid - 128, lane = tid & 31, warp = (tid % 128) / 32;
    const bool leader = (tid % 128) == 0;
    const int row0 = m_block * BM + 64 * c + 16 * warp + (lane >> 2); // this thread's first row
    const uint32_t q_base = smem_addr(sm.q) + c * 64 * 128;          // rows 64c.. of every box
    const float scale_log2 = p.scale * 1.4426950408889634f;
    const uint32_t my_turn = CUATTN_ATTN_HOPPER_BAR_TURN0 + c, other_turn = CUATTN_ATTN_HOPPER_BAR_TURN0 + (c ^ 1);

    float s[BN / 2], o[D / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, rescale[2];
    uint32_t pk[BN / 4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

    // Does tile t need its V rows past key_len zeroed (the tile holding the key-padding edge)?
    auto pads_v = [&](int t) {
        const int key0 = (tr.first + t) * BN;
        return p.key_lens != 0 && key0 + BN > tr.key_len && tr.key_len < p.len_k;
    };
    // Does tile t need element masks (it crosses the band's edge or the key length)?
    const int q0 = m_block * BM, q_last = min(q0 + BM, p.len_q) - 1;
    auto needs_mask = [&](int t) {
        const int key0 = (tr.first + t) * BN;
        return !(q_last + tr.band.lo <= key0 && key0 + BN - 1 <= q0 + tr.band.hi && key0 + BN <= tr.key_len);
    };
    // Waits for V of tile t, zeroes its padding rows if it has any (both consumers take part,
    // then meet at the padding barrier: before either's turn barrier, so they cannot deadlock).
    auto wait_v = [&](int t) {
        mbar_wait(&sm.v_full[t % STAGES], (t / STAGES) & 1);
        if (pads_v(t)) {
            zero_rows<D>(sm.v[t % STAGES], tr.key_len - (tr.first + t) * BN, ctid);
            fence_async_smem();
            bar_sync(CUATTN_ATTN_HOPPER_BAR_VPAD, CONSUMER_THREADS);
        }
    };

    if (tr.count > 0) {
        if (c == 0) bar_arrive(my_turn, CONSUMER_THREADS); // consumer 0 issues first
        mbar_wait(&sm.q_full, 0);

        // Tile 0: S_0 alone.
        mbar_wait(&sm.k_full[0], 0);
        bar_sync(my_turn, CONSUMER_THREADS);
        wgmma_fence();
        gemm_qk<T, D>(s, q_base, smem_addr(sm.k[0]));
        wgmma_commit();
        bar_arrive(other_turn, CONSUMER_THREADS);
        wgmma_wait<0>();
        hold_all(s);
        if (leader) mbar_arrive(&sm.k_empty[0]);
        if (needs_mask(0)) mask_tile(s, row0, tr.first * BN, lane, tr);
        softmax_step(s, m, l, rescale, scale_log2);
#pragma unroll
        for (int j = 0; j < BN / 4; ++j) pk[j] = Mma<T>::pack(s[2 * j], s[2 * j + 1]);

        // Tile t: S_t = Q·K_tᵀ and O += P_{t−1}·V_{t−1} in flight together; softmax of S_t
        // runs while the second is still on the tensor cores.
        for (int t = 1; t < tr.count; ++t) {
            const int st = t % STAGES, pst = (t - 1) % STAGES;
            mbar_wait(&sm.k_full[st], (t / STAGES) & 1);
            wait_v(t - 1);
            bar_sync(my_turn, CONSUMER_THREADS);
            hold_all(s);
            hold_all(o);
            hold_all(pk);
            wgmma_fence();
            gemm_qk<T, D>(s, q_base, smem_addr(sm.k[st]));
            wgmma_commit();
            gemm_pv<T, D>(o, pk, smem_addr(sm.v[pst]));
            wgmma_commit();
            bar_arrive(other_turn, CONSUMER_THREADS);
            wgmma_wait<1>(); // S_t is done; P·V may still run
            hold_all(s);
            if (leader) mbar_arrive(&sm.k_empty[st]);
            if (needs_mask(t)) mask_tile(s, row0, (tr.first + t) * BN, lane, tr);
            softmax_step(s, m, l, rescale, scale_log2);
            wgmma_wait<0>(); // P·V done: o and pk are ours again, V_{t−1} can be reused
            hold_all(o);
            hold_all(pk);
            if (leader) mbar_arrive(&sm.v_empty[pst]);
#pragma unroll
            for (int i = 0; i < D / 2; ++i) o[i] *= rescale[acc_half(i)];
#pragma unroll
            for (int j = 0; j < BN / 4; ++j) pk[j] = Mma<T>::pack(s[2 * j], s[2 * j + 1]);
        }

        // Last P·V.
        const int t_last = tr.count - 1;
        wait_v(t_last);
        hold_all(o);
        hold_all(pk);
        wgmma_fence();
        gemm_pv<T, D>(o, pk, smem_addr(sm.v[t_last % STAGES]));
        wgmma_commit();
        wgmma_wait<0>();
        hold_all(o);
        if (leader) mbar_arrive(&sm.v_empty[t_last % STAGES]);
    }

    // Epilogue: normalise and store O (pairs of 16-bit values) and LSE; zeros and −∞ for rows
    // that saw no key (including every row of a block with no tiles).
    T* out = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = row0 + 8 * hh;
        if (row < p.len_q) {
            T* orow = out + (int64_t)row * p.o_row_stride;
#pragma unroll
            for (int i = 0; i < D / 2; i += 2) {
                if (acc_half(i) != hh) continue;
                const uint32_t packed = Mma<T>::pack(o[i] * inv, o[i + 1] * inv);
                *reinterpret_cast<uint32_t*>(orow + acc_col(i, lane)) = packed;
            }
            if (p.lse && (lane & 3) == 0) {
                float* lse = reinterpret_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;
                lse[row] = sum > 0.f ? (m[hh] * scale_log2 + __log2f(sum)) * 0.6931471805599453f : -INFINITY;
            }
        }
    }
}

#endif // CUATTN_HOPPER

} // namespace

// Entry points: attention_hopper_hd{64,128}_{bf16,f16}(params, Q map, K map, V map). The maps
// are 4-D over (d, row, head, batch) with {64, BM or BN, 1, 1} boxes and the 128-byte swizzle
// (src/ops/attention_hopper.rs encodes them). In the sm_80 image these are trapping stubs.
#define CUATTN_HOPPER_ENTRY(NAME, T, D)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                           \
        NAME(const cuattn_attention_fwd_params p, const __grid_constant__ CUtensorMap tm_q,            \
             const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {     \
        HOPPER_BODY(T, D)                                                                              \
    }
#ifdef CUATTN_HOPPER
#define HOPPER_BODY(T, D) attention_hopper<T, D>(p, &tm_q, &tm_k, &tm_v);
#else
#define HOPPER_BODY(T, D) __trap();
#endif

CUATTN_HOPPER_ENTRY(attention_hopper_hd64_bf16, __nv_bfloat16, 64)
CUATTN_HOPPER_ENTRY(attention_hopper_hd128_bf16, __nv_bfloat16, 128)
CUATTN_HOPPER_ENTRY(attention_hopper_hd64_f16, __half, 64)
CUATTN_HOPPER_ENTRY(attention_hopper_hd128_f16, __half, 128)
