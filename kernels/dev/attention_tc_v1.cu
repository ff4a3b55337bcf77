// Tensor-core attention v1 (kept for the record; not built). Measured on NVIDIA H200,
// 2026-11-26, commit d0f14bb (docs/gpu-runs/2026-11-26-h200-attention-v1.md), B·L = 16k, hidden
// 2048, TFLOP/s (FA convention) at L = 512 → 16k:
//   bf16 hd64  non-causal 135 → 173    causal  99 → 175
//   bf16 hd128 non-causal 117 → 169    causal  87 → 172     (PyTorch flash 299 → 350, cuDNN 522 → 675)
// Registers (ptxas, sm_90): hd64 160, hd128 196, hd256 249; no spills. All GPU tests passed.
// What it taught: (1) 64-row query blocks read every K/V tile from L2 once per 64 rows: at
// hd128 that is ~10 TB/s of L2 traffic at 170 TFLOP/s, close to what L2 delivers, so 128-row
// blocks are needed to go further. (2) Synchronous tile loads leave the tensor cores idle while
// K and V arrive; only the second resident CTA hides that. (3) Causal at short L lost ~25% to
// the last wave of heavy diagonal blocks (launched last).
// Scaled dot-product attention forward on tensor cores (f16/bf16 in, f32 accumulation):
// a first FlashAttention-2-schedule kernel, written for correctness first. UNVERIFIED ON
// HARDWARE when written (2026-11-26, no device time left); the op does not pick it by default
// (`ops::attention::Kernel::TensorCore` asks for it) until the GPU tests have passed on it.
//
// Algorithm (see docs/kernels/attention-forward.md and src/twin/attention.rs, its CPU
// twin): one CTA per (query block of BM = 64 rows, head, batch), flattened into gridDim.x; four
// warps, each owning 16 query rows. For each key tile of BN keys:
//   S = Q·Kᵀ with mma.m16n8k16 (A = Q from shared memory by ldmatrix, B = K rows by ldmatrix);
//   tiles wholly above the causal diagonal are never loaded; tiles on the diagonal or past the
//   last key are masked element by element by assignment to −inf;
//   online softmax in the exp2 domain on raw scores (running max m, per-lane partial sums l,
//   unnormalised O; mu = 0 while m is −inf);
//   P (rounded to the input dtype) is re-used from the S accumulators as the A operand of
//   O += P·V (B = V by ldmatrix.trans), with no trip through shared memory.
// Finalisation: l summed over the quad, O /= l, LSE = scale·m + ln l; O = 0 and LSE = −inf when
// l = 0 (fully masked rows). K and V rows past the block's last admissible key are zero-filled,
// so NaN in keys no row of the block may see cannot reach the output through 0·NaN.
//
// Tiles: head dims padded with zeros to HD ∈ {64, 128, 256}; BN = 64 (32 for HD = 256). Shared
// memory rows are padded by 8 elements (16 bytes) so ldmatrix row addresses fall in different
// banks. This first version loads tiles synchronously (no cp.async pipeline) and reloads Q
// fragments from shared memory every tile: FA2-class speed needs both (next steps).
//
// FLOPs: 4·B·Hq·Lq·Lk·D (half when causal). Bytes: Q, K, V read once per query block.

#include "common.cuh"
#include "attention_common.cuh"
#include "cuattn_params.h"

using namespace cuattn;

namespace {

constexpr int BM = 64;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// D(16×8, f32) += A(16×16) · B(16×8); A and B of the element type T.
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one .b32 of T pairs, x in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
    const __half2 h = __floats2half2_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

// Copies rows [row0, row0 + ROWS) × cols [0, HD) of a global matrix (row stride in elements)
// into shared memory with pitch HD + 8; rows ≥ rows_valid and cols ≥ cols_valid become 0.
template <typename T, int HD, int ROWS>
__device__ void load_tile(T* dst, const T* src, int64_t row_stride, int64_t rows_valid, int cols_valid, bool vec) {
    constexpr int PITCH = HD + 8;
    if (vec) {
        constexpr int CHUNKS = HD / 8;
        for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
            const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (r < rows_valid && c < cols_valid) val = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
            *reinterpret_cast<uint4*>(dst + r * PITCH + c) = val;
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * HD; idx += THREADS) {
            const int r = idx / HD, c = idx % HD;
            dst[r * PITCH + c] = (r < rows_valid && c < cols_valid) ? src[r * row_stride + c] : from_f32<T>(0.f);
        }
    }
}

template <typename T, int HD, int BN>
__device__ void attention_tc(const cuattn_attention_fwd_params& p, T* smem) {
    constexpr int PITCH = HD + 8;
    T* sQ = smem;
    T* sK = sQ + BM * PITCH;
    T* sV = sK + BN * PITCH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;

    const int64_t q_blocks = (p.len_q + BM - 1) / BM;
    const int64_t flat = blockIdx.x;
    const int64_t mb = flat % q_blocks;
    const int h = (int)((flat / q_blocks) % p.heads_q);
    const int b = (int)(flat / (q_blocks * p.heads_q));

    const SequenceBounds seq = sequence_bounds(p, b);
    const int64_t row0_q = seq.row0_q, row0_k = seq.row0_k, len_q = seq.len_q, key_len = seq.key_len;
    const int64_t q0 = mb * BM;
    if (q0 >= len_q) return;  // CTA-uniform, before any barrier

    const bool causal = p.causal != CUATTN_CAUSAL_NONE;
    const int64_t off = p.causal == CUATTN_CAUSAL_BOTTOM_RIGHT ? key_len - len_q : 0;
    const int64_t n_tiles = (key_len + BN - 1) / BN;
    int64_t n_max = n_tiles;
    int64_t kv_end = key_len;  // K/V rows at or past this are zero-filled
    if (causal) {
        const int64_t a = q0 + BM + off;  // ceil_div(a, BN), a possibly ≤ 0
        const int64_t c = a > 0 ? (a + BN - 1) / BN : 0;
        n_max = min(n_tiles, c);
        kv_end = max((int64_t)0, min(key_len, min(len_q, q0 + BM) + off));
    }

    const int hk = h / (p.heads_q / p.heads_kv);
    const T* gq = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + (row0_q + q0) * p.q_row_stride;
    const T* gk = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + row0_k * p.k_row_stride;
    const T* gv = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + row0_k * p.v_row_stride;
    const bool vec = p.vectorized != 0;

    load_tile<T, HD, BM>(sQ, gq, p.q_row_stride, len_q - q0, p.dim_qk, vec);

    float o[HD / 8][4];
#pragma unroll
    for (int nd = 0; nd < HD / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nd][e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const float c = p.scale * 1.4426950408889634f;
    const int64_t row_base = q0 + warp * 16 + g;  // this lane's rows: row_base and row_base + 8

    for (int64_t n = 0; n < n_max; ++n) {
        const int64_t key0 = n * BN;
        __syncthreads();  // previous tile's K/V fully consumed (and sQ written, first time)
        load_tile<T, HD, BN>(sK, gk + key0 * p.k_row_stride, p.k_row_stride, kv_end - key0, p.dim_qk, vec);
        load_tile<T, HD, BN>(sV, gv + key0 * p.v_row_stride, p.v_row_stride, kv_end - key0, p.dim_v, vec);
        __syncthreads();

        // S = Q·Kᵀ for this warp's 16 rows: BN/8 accumulators of 16×8.
        float s[BN / 8][4];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            uint32_t a[4];
            ldmatrix_x4(a, sQ + (warp * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
                uint32_t kb[4];  // K2 order: reg0 n-block 0, reg0 n-block 1, reg1 n-block 0, reg1 n-block 1
                ldmatrix_x4(kb, sK + (nb2 * 16 + (lane & 15)) * PITCH + ks * 16 + 8 * (lane >> 4));
                mma16816<T>(s[2 * nb2], a, kb[0], kb[2]);
                mma16816<T>(s[2 * nb2 + 1], a, kb[1], kb[3]);
            }
        }

        // Mask by assignment where the tile straddles the diagonal or the end of the keys.
        const bool diag = causal && key0 + BN - 1 > q0 + off;
        const bool tail = key0 + BN > key_len;
        if (diag || tail) {
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t row = row_base + 8 * (e >> 1);
                    const int64_t col = key0 + nb * 8 + 2 * t + (e & 1);
                    if (col >= key_len || (causal && col > row + off)) s[nb][e] = -INFINITY;
                }
        }

        // Online softmax for rows g (r = 0: elements 0, 1) and g + 8 (r = 1: elements 2, 3).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mt = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) mt = fmaxf(mt, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
            const float m_new = fmaxf(m[r], mt);
            const float mu = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(c * (m[r] - mu));
            l[r] *= alpha;
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd) {
                o[nd][2 * r] *= alpha;
                o[nd][2 * r + 1] *= alpha;
            }
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                s[nb][2 * r] = exp2f(s[nb][2 * r] * c - mu * c);
                s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] * c - mu * c);
                l[r] += s[nb][2 * r] + s[nb][2 * r + 1];
            }
            m[r] = m_new;
        }

        // O += P·V, P taken from the S accumulators as A fragments (notes §3).
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            uint32_t pa[4];
            pa[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
            pa[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
            pa[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
            pa[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
            for (int nd2 = 0; nd2 < HD / 16; ++nd2) {
                uint32_t vb[4];  // .trans: reg0/reg1 of dims nd2*16..+7, then reg0/reg1 of +8..+15
                ldmatrix_x4_trans(vb, sV + (j * 16 + (lane & 15)) * PITCH + nd2 * 16 + 8 * (lane >> 4));
                mma16816<T>(o[2 * nd2], pa, vb[0], vb[1]);
                mma16816<T>(o[2 * nd2 + 1], pa, vb[2], vb[3]);
            }
        }
    }

    // Finalise and write this lane's rows.
    T* go = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + row0_q * p.o_row_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int64_t row = row_base + 8 * r;
        const bool any = sum > 0.f;
        const float inv = any ? 1.f / sum : 0.f;
        if (row < len_q) {
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = nd * 8 + 2 * t + e;
                    if (col < p.dim_v) go[row * p.o_row_stride + col] = from_f32<T>(any ? o[nd][2 * r + e] * inv : 0.f);
                }
            if (p.lse && t == 0) {
                float* lse = reinterpret_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + row0_q + row;
                *lse = any ? p.scale * m[r] + logf(sum) : -INFINITY;
            }
        }
    }
}

}  // namespace

#define CUATTN_ATTENTION_TC(T, SUFFIX, HD, BN)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                          \
        attention_tc_hd##HD##_##SUFFIX(const cuattn_attention_fwd_params p) {                        \
        extern __shared__ __align__(16) unsigned char smem_tc_hd##HD##_##SUFFIX[];                   \
        attention_tc<T, HD, BN>(p, reinterpret_cast<T*>(smem_tc_hd##HD##_##SUFFIX));                 \
    }

CUATTN_ATTENTION_TC(__half, f16, 64, 64)
CUATTN_ATTENTION_TC(__half, f16, 128, 64)
CUATTN_ATTENTION_TC(__half, f16, 256, 32)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 64, 64)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 128, 64)
CUATTN_ATTENTION_TC(__nv_bfloat16, bf16, 256, 32)
