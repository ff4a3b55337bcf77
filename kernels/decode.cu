// Single-token decode attention over a KV cache, split along the keys (Flash-Decoding):
// o[b, h] = softmax(scale · q[b, h] · K[b, hk]ᵀ) · V[b, hk] over the sequence's first len_b
// cache rows, hk = h / (Hq / Hkv), with LSE = ln Σ exp(scale · q·k). CPU twin:
// src/twin/decode.rs (`forward_kernel` runs this file's loop, key assignment and both merges).
//
// Phase 1, decode_split_<T>_hd<HD>_h<HPB>: one block of 128 threads per (batch, kv-head, chunk
// of HPB query heads sharing that kv-head, split), flattened into gridDim.x. The query heads of
// a chunk are processed together, so each K/V row is read from memory once for all of them.
// Split s covers whole tiles of CUATTN_DECODE_SPLIT_TILE keys of [0, len_b) (cuattn_params.h;
// the host planner and the twin use the same `split_range`).
//   Threads: a key row of HD elements is HD·sizeof(T)/16 packs of 16 bytes; TPK = min(32, that)
//   threads own one key (thread t of the group holds packs t, t+TPK, ...: NP packs), so the
//   block holds NG = 128/TPK key groups. Per iteration the block takes NG·KPG consecutive keys
//   (KPG = 4, 2 or 1 as the per-thread q and O, NP·HPB packs, grow),
//   group g the KPG keys g·KPG.. of them. Each thread first issues every K and V load of its
//   KPG keys (16-byte LDG, evict-first: the cache is streamed once), then partial dot products
//   with its q packs (q pre-multiplied by scale·log2 e, so scores are in the exp2 domain).
//   f32 (and 2-byte types where HPB·KPG > TPK: HD 64 with 8 heads): per head, a shuffle-xor
//   butterfly per key, then every lane of the group runs the same online-softmax update per
//   KPG keys (running max m, sum l, unnormalised O in f32 registers).
//   f16/bf16 otherwise (SCATTER, v2): the HPB·KPG (head, key) partials go through one
//   reduce-scatter over the group's lanes (N = HPB·KPG scores: N − 1 + log2(TPK/N) shuffles,
//   each level halving what a lane carries, instead of N·log2 TPK), so each lane ends with
//   the full score of one slot (slot t / REPL, REPL = TPK / N lanes per slot), bitwise the
//   butterfly's.
//   The lane runs the online softmax for its slot only: the head's max over its KPG slots
//   (log2 KPG shuffles), one alpha and one p (2 exp2 per lane instead of HPB·(KPG+1)), a
//   running sum l per slot (summed per head at the end of the block, butterfly order); then
//   every lane fetches each head's alpha and the slots' p (HPB·(KPG+1) indexed shuffles) for
//   its O packs, and O is rescaled only when some alpha of the warp is not 1 (a warp vote:
//   multiplying by 1 is exact, so skipping changes no bit, and the max seldom moves after the
//   first keys). Keys past the split's end are not loaded and get score −inf, p = 0.
//   End of the block: the NG groups' (m, l, O) are merged through shared memory per head:
//   M = max m_g, w_g = 2^(m_g − M), L = Σ w_g l_g, O = Σ w_g O_g / L (fixed group order).
//   Written: O_s (f32, normalised) and LSE_s = (M + log2 L)·ln 2 into the workspace; an empty
//   split writes O_s = 0, LSE_s = −inf. With a single split, O (dtype) and LSE directly.
// Phase 2, decode_merge_<T>: one warp per (batch, q-head) row combines the splits in split
//   order: Mx = max LSE_s (0 if −inf), Σ = Σ exp(LSE_s − Mx), LSE = Mx + ln Σ (−inf if Σ = 0),
//   O = Σ exp(LSE_s − LSE)·O_s, 0 for LSE = −inf (docs/kernels/attention-forward.md, split-KV).
//
// Head dims: HD ∈ {64, 128, 256} is the padded tile (64 and 128 exact, any other D ≤ 256 padded
// with zero packs). The 16-byte path needs K/V bases and strides aligned (host flag
// `vectorized`); otherwise the same packs are read element by element.
//
// Bytes: K and V read once: 2·B·Hkv·len·D·sizeof(T); q, O, and the workspace, B·Hq·splits·(D+1)
// f32 written and read once, are small next to it. FLOPs: 4·B·Hq·len·D. The kernel is bound by
// HBM bandwidth when enough blocks are in flight: the host picks `splits` so that
// B·Hkv·chunks·splits fills every SM (`plan_splits` in src/twin/decode.rs, called by
// src/ops/decode.rs with the GPU's resident-block count).
//
// Pipelining: iteration i + 1's K/V loads are issued before iteration i's arithmetic, so a
// warp keeps two iterations in flight (2·KPG·NP 16-byte loads each of K and V per thread).
//
// History: v1 (kernels/dev/decode_v1.cu, measured on H200: f32 60–94% of copy bandwidth at
// L ≥ 32k, f16/bf16 only 38–64%, PyTorch's flash backend 1.4–1.5x faster) ran the butterfly
// and the online softmax redundantly on all lanes of a key for every type. Its f16 main loop
// cost 110 warp-instructions per key against f32's 176 per key with twice the bytes per key:
// the 2-byte types were bound by instructions per key, not memory. v2 changes only the
// 2-byte path (SCATTER above); the f32 kernels' SASS is identical to v1's.
//
// Build findings (CUDA 13.0 ptxas -v, 2026-11-26; `cuattn info` prints the current ones): no
// stack frame and no spills in any decode kernel on sm_80 or sm_90 (enforced by the test
// ops::decode::tests::every_decode_kernel_was_compiled_for_sm80_and_sm90_without_spills).
// Registers on sm_90: f16/bf16 split kernels 167 at HPB 4 (3 blocks/SM), 161 at HPB 1,
// 195 at HPB 2, 243–255 at HPB 8; f32 100–217; merge 40. SASS (cuobjdump -sass, sm_90), the
// vectorised main loop per thread per block iteration, counting as issued what runs while no
// max moves (the rescales behind the vote branches skipped), in warp-instructions per key:
//   HD 128      HPB 1         HPB 2         HPB 4          HPB 8
//   f16 v1→v2   47.0 → 42.5   65.4 → 54.1   110.2 → 81.8   191.8 → 131.2
//   bf16 v1→v2  53.1 → 48.1   71.5 → 59.5   116.2 → 87.0   197.5 → 136.8
//   f32 (same)  63.8          93.0          176.5          299.5
// (f16 HPB 4, 16 keys per iteration: v1 441 instructions with 32 SHFL, 52 FADD, 12 MUFU,
// 56 FMUL; v2 351 in the loop, 327 issued, with 21 SHFL, 10 FADD, 2 MUFU.) Per KiB of K+V,
// f16 HPB 4 went from 220 to 164 warp-instructions, below f32's 176. The 4 prefetch
// LDG.E.EF.128 still go out back to back before the arithmetic; no LDL/STL, and no BRA.DIV
// (the vote branches hold no shuffle). Tried and dropped (ptxas, sm_90): two iterations per
// trip on ping-pong K/V buffers, to drop the ~30 MOV/PRMT that copy the prefetched packs each
// iteration, took HPB 4 to 199 registers (2 blocks/SM) and spilled at HPB 8;
// __launch_bounds__(128, 4) for 2-byte types (4 blocks/SM) spills 124–1372 bytes everywhere.
// Measured (v2, NVIDIA H200, 2026-11-26, commit 8ef7da2, docs/gpu-runs/2026-11-26-h200-final-8ef7da2.md):
// every decode GPU test passes, racecheck and memcheck clean; Hq 32 / Hkv 8, D 128, % of copy
// bandwidth at L = 32k / 128k: f16 B=1 41% / 58% (v1 38% / 53%), B=8 67% / 70% (v1 62% / 64%);
// bf16 B=8 65% / 68%; f32 unchanged (B=8 90% / 94%). PyTorch's flash decode is still ~1.35x
// faster in f16: the 80% target is not met for 2-byte types.

#include "common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int THREADS = CUATTN_DECODE_THREADS;
constexpr int TILE = CUATTN_DECODE_SPLIT_TILE;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Geometry of the split kernel for element type T, padded head dim HD and HPB heads per block.
template <typename T, int HD, int HPB> struct Geometry {
    static constexpr int VEC = 16 / (int)sizeof(T);           // elements per 16-byte pack
    static constexpr int PACKS = HD / VEC;                    // packs per key row
    static constexpr int TPK = PACKS < 32 ? PACKS : 32;       // threads per key
    static constexpr int NP = PACKS / TPK;                    // packs per thread
    static constexpr int NG = THREADS / TPK;                  // key groups per block
    // Keys per group per iteration: fewer as the per-thread q and O grow, to stay in registers.
    static constexpr int KPG = NP * HPB <= 2 ? 4 : (NP * HPB <= 8 ? 2 : 1);
    static constexpr int BLOCK_KEYS = NG * KPG;               // keys per block iteration
    // 2-byte types score by reduce-scatter (header): the group's SCORES = HPB·KPG dot products
    // end one per lane, each held by REPL adjacent lanes; where there are more scores than
    // lanes (HD 64 with 8 heads) and for f32, the butterfly per score.
    static constexpr int SCORES = HPB * KPG;
    static constexpr bool SCATTER = sizeof(T) == 2 && SCORES <= TPK;
    static constexpr int REPL = SCATTER ? TPK / SCORES : 1;
};

// Pinned to the CPU twin's `Geometry` (tests/decode_twin.rs, geometry_follows_the_kernels_constants):
// change both together.
static_assert(Geometry<__half, 128, 4>::TPK == 16 && Geometry<__half, 128, 4>::NG == 8 &&
                  Geometry<__half, 128, 4>::KPG == 2,
              "f16 D128 HPB4 geometry differs from twin::decode::Geometry");
static_assert(Geometry<__half, 64, 1>::TPK == 8 && Geometry<__half, 64, 1>::NG == 16 &&
                  Geometry<__half, 64, 1>::KPG == 4,
              "f16 D64 HPB1 geometry differs from twin::decode::Geometry");
static_assert(Geometry<float, 256, 8>::TPK == 32 && Geometry<float, 256, 8>::NP == 2 &&
                  Geometry<float, 256, 8>::NG == 4 && Geometry<float, 256, 8>::KPG == 1,
              "f32 D256 HPB8 geometry differs from twin::decode::Geometry");
static_assert(Geometry<__half, 128, 4>::SCATTER && Geometry<__nv_bfloat16, 64, 1>::SCATTER &&
                  !Geometry<__half, 64, 8>::SCATTER && !Geometry<float, 128, 4>::SCATTER,
              "reduce-scatter scoring differs from twin::decode::Geometry::scatter_scores");
static_assert(TILE == 64 && THREADS == 128, "twin::decode::{SPLIT_TILE, THREADS} differ");

// Key range [start, end) of split s (the host planner and the twin compute the same).
__device__ __forceinline__ void split_range(int s, int splits, int len, int& start, int& end) {
    const int tiles = (len + TILE - 1) / TILE;
    const int per = (tiles + splits - 1) / splits;
    start = min(s * per * TILE, len);
    end = min((s + 1) * per * TILE, len);
}

// Pack `pk` of a row (elements pk·VEC ..), raw; zero when `valid` is false or past `dim`.
// VECTOR: one 16-byte evict-first load (the host guarantees alignment and dim % VEC == 0, so a
// pack is whole or wholly past dim); otherwise element by element.
template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* row, int pk, int dim, bool valid) {
    const int d0 = pk * VEC;
    Pack<T, VEC> out;
    if constexpr (VECTOR) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (valid && d0 < dim) u = __ldcs(reinterpret_cast<const uint4*>(row) + pk);
        memcpy(&out, &u, 16);
    } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = (valid && d0 + e < dim) ? row[d0 + e] : from_f32<T>(0.f);
    }
    return out;
}

// Sum over the TPK threads of one key group (aligned lanes of one warp).
template <int TPK> __device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int off = TPK / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Reduce-scatter over a key group's lanes (thread t of the group), from offset OFF down: on
// entry x[i] is this lane's partial of score i (2·HALF scores of a power of two, at most the
// group's lanes); on return x[0] is the group's full sum of score t / (lanes / scores). Each
// step halves the scores a lane carries (it keeps the half its OFF bit selects and sends the
// other); once one is left, plain butterflies. Every sum is own + partner at group_sum's
// offsets, so each score equals group_sum's bit for bit. Recursion over the steps keeps every
// index a compile-time constant (x stays in registers).
template <int OFF, int HALF, int N> __device__ __forceinline__ void group_reduce_scatter(float (&x)[N], int t) {
    if constexpr (HALF >= 1) {
        static_assert(OFF >= 1, "more scores than lanes");
        const bool upper = (t & OFF) != 0;
#pragma unroll
        for (int i = 0; i < HALF; ++i) {
            const float keep = upper ? x[i + HALF] : x[i];
            const float send = upper ? x[i] : x[i + HALF];
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
        }
        group_reduce_scatter<OFF / 2, HALF / 2>(x, t);
    } else {
#pragma unroll
        for (int off = OFF; off > 0; off >>= 1) x[0] += __shfl_xor_sync(0xffffffffu, x[0], off);
    }
}

template <typename T, int HD, int HPB, bool VECTOR>
__device__ void decode_split(const cuattn_decode_params& p) {
    using G = Geometry<T, HD, HPB>;
    constexpr int VEC = G::VEC, TPK = G::TPK, NP = G::NP, NG = G::NG, KPG = G::KPG;
    __shared__ float s_m[NG][HPB], s_l[NG][HPB];
    __shared__ float s_o[NG][HD];

    // Block → (batch, kv-head, head chunk, split).
    int64_t flat = blockIdx.x;
    const int split = (int)(flat % p.splits);
    flat /= p.splits;
    const int chunk = (int)(flat % p.head_chunks);
    flat /= p.head_chunks;
    const int hk = (int)(flat % p.heads_kv);
    const int b = (int)(flat / p.heads_kv);
    const int group_size = p.heads_q / p.heads_kv;
    const int h0 = hk * group_size + chunk * HPB;
    const int nh = min(HPB, group_size - chunk * HPB);

    // Lengths come from device memory: clamped to the cache, so no read leaves it.
    const int len = max(0, min(reinterpret_cast<const int*>(p.cache_lens)[b], p.capacity));
    int start, end;
    split_range(split, p.splits, len, start, end);

    const int tid = threadIdx.x, g = tid / TPK, t = tid % TPK;
    const float c = p.scale * LOG2E;

    // q of every head of the chunk, this thread's packs, scaled into the exp2 domain.
    float qr[HPB][NP][VEC];
#pragma unroll
    for (int hh = 0; hh < HPB; ++hh) {
        const T* qh = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + (int64_t)min(h0 + hh, p.heads_q - 1) * p.q_head_stride;
#pragma unroll
        for (int n = 0; n < NP; ++n) {
            const int d0 = (t + n * TPK) * VEC;
#pragma unroll
            for (int e = 0; e < VEC; ++e) qr[hh][n][e] = (hh < nh && d0 + e < p.dim) ? c * to_f32(qh[d0 + e]) : 0.f;
        }
    }

    float m[HPB], l[HPB], acc[HPB][NP][VEC];
    // SCATTER: this lane's score slot (head own_h, key own_k of the group's KPG), the running
    // max of head own_h and the running sum of slot (own_h, own_k) alone; m and l unused.
    constexpr int REPL = G::REPL;
    const int own = t / REPL, own_h = own / KPG, own_k = own % KPG;
    float m_own = -INFINITY, l_own = 0.f;
#pragma unroll
    for (int hh = 0; hh < HPB; ++hh) {
        m[hh] = -INFINITY;
        l[hh] = 0.f;
#pragma unroll
        for (int n = 0; n < NP; ++n)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[hh][n][e] = 0.f;
    }

    const T* kb = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vb = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    // Issues every K and V load of the block iteration starting at `base` (keys past `end`:
    // none, zero packs).
    auto load_keys = [&](int base, Pack<T, VEC> (&kr)[KPG][NP], Pack<T, VEC> (&vr)[KPG][NP]) {
#pragma unroll
        for (int kk = 0; kk < KPG; ++kk) {
            const int j = base + g * KPG + kk;
            const bool ok = j < end;
            const T* krow = kb + (int64_t)j * p.k_row_stride;
            const T* vrow = vb + (int64_t)j * p.v_row_stride;
#pragma unroll
            for (int n = 0; n < NP; ++n) {
                kr[kk][n] = load_pack<T, VEC, VECTOR>(krow, t + n * TPK, p.dim, ok);
                vr[kk][n] = load_pack<T, VEC, VECTOR>(vrow, t + n * TPK, p.dim, ok);
            }
        }
    };
    // Software pipeline: iteration i + 1's loads are issued before iteration i's arithmetic,
    // so each warp keeps two iterations of K/V in flight.
    Pack<T, VEC> k_next[KPG][NP], v_next[KPG][NP];
    if (start < end) load_keys(start, k_next, v_next);
    for (int base = start; base < end; base += G::BLOCK_KEYS) {
        const int j0 = base + g * KPG;
        Pack<T, VEC> kr[KPG][NP], vr[KPG][NP];
#pragma unroll
        for (int kk = 0; kk < KPG; ++kk)
#pragma unroll
            for (int n = 0; n < NP; ++n) {
                kr[kk][n] = k_next[kk][n];
                vr[kk][n] = v_next[kk][n];
            }
        if (base + G::BLOCK_KEYS < end) load_keys(base + G::BLOCK_KEYS, k_next, v_next);
        if constexpr (G::SCATTER) {
            // Partial dot products of every (head, key) slot, then one reduce-scatter: the
            // online softmax runs once per lane on its slot, not on every lane for every slot.
            float x[G::SCORES];
#pragma unroll
            for (int hh = 0; hh < HPB; ++hh)
#pragma unroll
                for (int kk = 0; kk < KPG; ++kk) {
                    float part = 0.f;
#pragma unroll
                    for (int n = 0; n < NP; ++n)
#pragma unroll
                        for (int e = 0; e < VEC; ++e) part = fmaf(qr[hh][n][e], to_f32(kr[kk][n].v[e]), part);
                    x[hh * KPG + kk] = part;
                }
            group_reduce_scatter<TPK / 2, G::SCORES / 2>(x, t);
            const float dot = x[0];
            const float sc = j0 + own_k < end ? dot : -INFINITY;
            // Max over the head's KPG slots (lanes REPL·kk apart), largest offset first.
            float m_new = fmaxf(m_own, sc);
#pragma unroll
            for (int off = KPG * REPL / 2; off >= REPL; off >>= 1) m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, off));
            // While no key has been seen m_new is −inf: use 0 so that exp2 gets −inf, not NaN.
            const float mu = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m_own - mu);
            const float pk = exp2f(sc - mu);
            l_own = fmaf(l_own, alpha, pk);
            m_own = m_new;
#pragma unroll
            for (int hh = 0; hh < HPB; ++hh) {
                // Every lane needs every slot's p and its head's alpha for its O packs.
                const float a = __shfl_sync(0xffffffffu, alpha, hh * KPG * REPL, TPK);
                float ph[KPG];
#pragma unroll
                for (int kk = 0; kk < KPG; ++kk) ph[kk] = __shfl_sync(0xffffffffu, pk, (hh * KPG + kk) * REPL, TPK);
                // Rescale only when some head's max moved in this warp (rare after the first
                // keys); multiplying by alpha = 1 is exact, so skipping changes no bit.
                if (__any_sync(0xffffffffu, a != 1.f)) {
#pragma unroll
                    for (int n = 0; n < NP; ++n)
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[hh][n][e] *= a;
                }
#pragma unroll
                for (int n = 0; n < NP; ++n)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        float acc_e = acc[hh][n][e];
#pragma unroll
                        for (int kk = 0; kk < KPG; ++kk) acc_e = fmaf(ph[kk], to_f32(vr[kk][n].v[e]), acc_e);
                        acc[hh][n][e] = acc_e;
                    }
            }
        } else {
#pragma unroll
            for (int hh = 0; hh < HPB; ++hh) {
                float s[KPG];
                float m_new = m[hh];
#pragma unroll
                for (int kk = 0; kk < KPG; ++kk) {
                    float part = 0.f;
#pragma unroll
                    for (int n = 0; n < NP; ++n)
#pragma unroll
                        for (int e = 0; e < VEC; ++e) part = fmaf(qr[hh][n][e], to_f32(kr[kk][n].v[e]), part);
                    // Every lane shuffles (groups of one warp may differ in validity).
                    const float dot = group_sum<TPK>(part);
                    s[kk] = j0 + kk < end ? dot : -INFINITY;
                    m_new = fmaxf(m_new, s[kk]);
                }
                // While no key has been seen m_new is −inf: use 0 so that exp2 gets −inf, not NaN.
                const float mu = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = exp2f(m[hh] - mu);
                float psum = 0.f, pk[KPG];
#pragma unroll
                for (int kk = 0; kk < KPG; ++kk) {
                    pk[kk] = exp2f(s[kk] - mu);
                    psum += pk[kk];
                }
                l[hh] = l[hh] * alpha + psum;
#pragma unroll
                for (int n = 0; n < NP; ++n)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        float a = acc[hh][n][e] * alpha;
#pragma unroll
                        for (int kk = 0; kk < KPG; ++kk) a = fmaf(pk[kk], to_f32(vr[kk][n].v[e]), a);
                        acc[hh][n][e] = a;
                    }
                m[hh] = m_new;
            }
        }
    }

    // Merge the NG groups, one head at a time.
    if constexpr (G::SCATTER) {
        // The head's sum over its KPG slots, largest offset first (the twin's group_sum).
        float l_head = l_own;
#pragma unroll
        for (int off = KPG * REPL / 2; off >= REPL; off >>= 1) l_head += __shfl_xor_sync(0xffffffffu, l_head, off);
        if (t % (KPG * REPL) == 0) {
            s_m[g][own_h] = m_own;
            s_l[g][own_h] = l_head;
        }
    } else if (t == 0) {
#pragma unroll
        for (int hh = 0; hh < HPB; ++hh) {
            s_m[g][hh] = m[hh];
            s_l[g][hh] = l[hh];
        }
    }
    __syncthreads();
    const bool direct = p.splits == 1;
#pragma unroll
    for (int hh = 0; hh < HPB; ++hh) {
        float mx = -INFINITY;
#pragma unroll
        for (int gg = 0; gg < NG; ++gg) mx = fmaxf(mx, s_m[gg][hh]);
        const float mu = mx == -INFINITY ? 0.f : mx;
        float total = 0.f;
#pragma unroll
        for (int gg = 0; gg < NG; ++gg) total += exp2f(s_m[gg][hh] - mu) * s_l[gg][hh];
        const float w = exp2f((G::SCATTER ? s_m[g][hh] : m[hh]) - mu);
#pragma unroll
        for (int n = 0; n < NP; ++n)
#pragma unroll
            for (int e = 0; e < VEC; ++e) s_o[g][(t + n * TPK) * VEC + e] = acc[hh][n][e] * w;
        __syncthreads();
        const bool any = total > 0.f;
        const float inv = any ? 1.f / total : 0.f;
        const int h = h0 + hh;
        if (hh < nh) {
            for (int d = tid; d < p.dim; d += THREADS) {
                float sum = 0.f;
#pragma unroll
                for (int gg = 0; gg < NG; ++gg) sum += s_o[gg][d];
                const float od = sum * inv;
                if (direct) {
                    T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
                    o[d] = from_f32<T>(od);
                } else {
                    float* wo = reinterpret_cast<float*>(p.ws_o) + (((int64_t)b * p.heads_q + h) * p.splits + split) * p.dim;
                    wo[d] = od;
                }
            }
            if (tid == 0) {
                const float lse = any ? (mu + log2f(total)) * LN2 : -INFINITY;
                if (direct) {
                    if (p.lse) reinterpret_cast<float*>(p.lse)[(int64_t)b * p.heads_q + h] = lse;
                } else {
                    reinterpret_cast<float*>(p.ws_lse)[((int64_t)b * p.heads_q + h) * p.splits + split] = lse;
                }
            }
        }
        __syncthreads();  // s_o is rewritten for the next head
    }
}

template <typename T>
__device__ void decode_merge(const cuattn_decode_params& p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= (int64_t)p.batch * p.heads_q) return;  // warp-uniform; no barriers below
    const int b = (int)(row / p.heads_q), h = (int)(row % p.heads_q);
    const float* lse_s = reinterpret_cast<const float*>(p.ws_lse) + row * p.splits;
    const float* o_s = reinterpret_cast<const float*>(p.ws_o) + row * p.splits * p.dim;

    float mx = -INFINITY;
    for (int s = lane; s < p.splits; s += 32) mx = fmaxf(mx, lse_s[s]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float mg = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
    for (int s = lane; s < p.splits; s += 32) sum += expf(lse_s[s] - mg);
    sum = warp_sum(sum);
    const bool any = sum > 0.f;
    const float lse = any ? mg + logf(sum) : -INFINITY;

    T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
    for (int d = lane; d < p.dim; d += 32) {
        float od = 0.f;
        if (any) {
            for (int s = 0; s < p.splits; ++s) od = fmaf(expf(lse_s[s] - lse), o_s[(int64_t)s * p.dim + d], od);
        }
        o[d] = from_f32<T>(od);
    }
    if (p.lse && lane == 0) reinterpret_cast<float*>(p.lse)[row] = lse;
}

}  // namespace

#define CUATTN_DECODE_SPLIT(T, NAME, HD, HPB)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) decode_split_##NAME##_hd##HD##_h##HPB( \
        const cuattn_decode_params p) {                                                            \
        if (p.vectorized)                                                                          \
            decode_split<T, HD, HPB, true>(p);                                                     \
        else                                                                                       \
            decode_split<T, HD, HPB, false>(p);                                                    \
    }
#define CUATTN_DECODE_SPLIT_HEADS(T, NAME, HD) \
    CUATTN_DECODE_SPLIT(T, NAME, HD, 1)        \
    CUATTN_DECODE_SPLIT(T, NAME, HD, 2)        \
    CUATTN_DECODE_SPLIT(T, NAME, HD, 4)        \
    CUATTN_DECODE_SPLIT(T, NAME, HD, 8)
#define CUATTN_DECODE_DTYPE(T, NAME)                                                             \
    CUATTN_DECODE_SPLIT_HEADS(T, NAME, 64)                                                       \
    CUATTN_DECODE_SPLIT_HEADS(T, NAME, 128)                                                      \
    CUATTN_DECODE_SPLIT_HEADS(T, NAME, 256)                                                      \
    extern "C" __global__ void decode_merge_##NAME(const cuattn_decode_params p) { decode_merge<T>(p); }

CUATTN_DECODE_DTYPE(float, f32)
CUATTN_DECODE_DTYPE(__half, f16)
CUATTN_DECODE_DTYPE(__nv_bfloat16, bf16)
