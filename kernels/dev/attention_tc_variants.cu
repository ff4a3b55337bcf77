// Tile-shape experiments for kernels/attention_tc.cu (dev only; not built by build.rs).
// Instantiates the production kernel template with other (BM, BN, warps) choices, times each on
// the benchmark's shapes (B·L = 16k, hidden 2048, bf16, BHSD) with CUDA events, and checks every
// variant's output against the production tile's (max |ΔO|), so a broken variant shows.
//
//   build (no GPU needed): scripts/build-attention-variants.sh -> gpu-bundle/dev/attention_tc_variants
//   run (device): gpu-bundle/dev/attention_tc_variants [--quick]
//
// Results and what they taught go in the header of kernels/attention_tc.cu and BENCHMARKS.md.

#include "../attention_tc.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define VARIANT(NAME, HD, BM, BN, W, MINB)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * W, MINB) NAME(const cuattn_attention_fwd_params p) { \
        extern __shared__ __align__(16) unsigned char smem_##NAME[];                                  \
        attention_tc<__nv_bfloat16, HD, BM, BN, W>(p, reinterpret_cast<__nv_bfloat16*>(smem_##NAME)); \
    }

VARIANT(v128_bm128_bn32_w4, 128, 128, 32, 4, 2)
VARIANT(v128_bm128_bn64_w4, 128, 128, 64, 4, 2)
VARIANT(v128_bm128_bn64_w8, 128, 128, 64, 8, 1)
VARIANT(v128_bm128_bn32_w8, 128, 128, 32, 8, 2)
VARIANT(v128_bm64_bn64_w4, 128, 64, 64, 4, 2)
VARIANT(v64_bm128_bn64_w4, 64, 128, 64, 4, 2)
VARIANT(v64_bm128_bn128_w4, 64, 128, 128, 4, 2)
VARIANT(v64_bm128_bn128_w8, 64, 128, 128, 8, 1)
VARIANT(v64_bm128_bn64_w8, 64, 128, 64, 8, 2)

struct Variant {
    const char* name;
    void (*fn)(cuattn_attention_fwd_params);
    int hd, bm, bn, warps;
};

// The first of each head dim is the built tile (cuattn_params.h) and the reference for max|dO|.
// Measured 2026-11-26 on an H200: docs/gpu-runs/2026-11-26-h200-attention-tile-variants.txt
// (taken when 128×32 and 128×64 were the built tiles).
static const Variant VARIANTS[] = {
    {"bm128 bn64 w4 (built)", v128_bm128_bn64_w4, 128, 128, 64, 4},
    {"bm128 bn32 w4", v128_bm128_bn32_w4, 128, 128, 32, 4},
    {"bm128 bn64 w8", v128_bm128_bn64_w8, 128, 128, 64, 8},
    {"bm128 bn32 w8", v128_bm128_bn32_w8, 128, 128, 32, 8},
    {"bm64 bn64 w4", v128_bm64_bn64_w4, 128, 64, 64, 4},
    {"bm128 bn128 w4 (built)", v64_bm128_bn128_w4, 64, 128, 128, 4},
    {"bm128 bn64 w4", v64_bm128_bn64_w4, 64, 128, 64, 4},
    {"bm128 bn128 w8", v64_bm128_bn128_w8, 64, 128, 128, 8},
    {"bm128 bn64 w8", v64_bm128_bn64_w8, 64, 128, 64, 8},
};

#define CK(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) {                                                                       \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));         \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)

__global__ void fill_uniform(__nv_bfloat16* x, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
        x[i] = __float2bfloat16((h >> 8) * (2.f / 16777216.f) - 1.f);
    }
}

__global__ void max_abs_diff(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n, float* out) {
    float m = 0.f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float d = fabsf(__bfloat162float(a[i]) - __bfloat162float(b[i]));
        m = fmaxf(m, d != d ? INFINITY : d);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));  // m ≥ 0
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    std::vector<int> lens = quick ? std::vector<int>{1024, 4096} : std::vector<int>{512, 2048, 4096, 8192, 16384};
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    printf("%-24s %4s %6s %6s %5s %10s %8s %10s\n", "variant", "hd", "L", "causal", "B", "time_us", "TFLOP/s", "max|dO|");
    for (int hd : {128, 64}) {
        for (int len : lens) {
            const int B = 16384 / len, H = 2048 / hd;
            const int64_t n = (int64_t)B * H * len * hd;
            __nv_bfloat16 *q, *k, *v, *o, *o_ref;
            float *lse, *diff;
            CK(cudaMalloc(&q, n * 2));
            CK(cudaMalloc(&k, n * 2));
            CK(cudaMalloc(&v, n * 2));
            CK(cudaMalloc(&o, n * 2));
            CK(cudaMalloc(&o_ref, n * 2));
            CK(cudaMalloc(&lse, (int64_t)B * H * len * 4));
            CK(cudaMalloc(&diff, 4));
            fill_uniform<<<1024, 256>>>(q, n, 1);
            fill_uniform<<<1024, 256>>>(k, n, 2);
            fill_uniform<<<1024, 256>>>(v, n, 3);
            for (int causal : {0, 1}) {
                bool first = true;
                for (const Variant& var : VARIANTS) {
                    if (var.hd != hd) continue;
                    cuattn_attention_fwd_params p;
                    memset(&p, 0, sizeof p);
                    p.q = (uint64_t)q, p.k = (uint64_t)k, p.v = (uint64_t)v, p.o = (uint64_t)o, p.lse = (uint64_t)lse;
                    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = hd;
                    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = (int64_t)len * hd;
                    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = (int64_t)H * len * hd;
                    p.lse_head_stride = len, p.lse_batch_stride = (int64_t)H * len;
                    p.batch = B, p.heads_q = H, p.heads_kv = H, p.len_q = len, p.len_k = len;
                    p.dim_qk = hd, p.dim_v = hd, p.causal = causal ? CUATTN_CAUSAL_TOP_LEFT : CUATTN_CAUSAL_NONE;
                    p.scale = 1.f / sqrtf((float)hd), p.rows_per_block = var.bm, p.vectorized = 1;
                    const int smem = (var.bm + 2 * var.bn) * (hd + 8) * 2;
                    CK(cudaFuncSetAttribute(var.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                    const dim3 grid((unsigned)(((len + var.bm - 1) / var.bm) * (int64_t)H * B));
                    CK(cudaMemset(o, 0xff, n * 2));  // NaN: unwritten outputs show in max|dO|
                    for (int w = 0; w < 2; ++w) var.fn<<<grid, 32 * var.warps, smem>>>(p);
                    CK(cudaGetLastError());
                    cudaEvent_t e0, e1;
                    CK(cudaEventCreate(&e0));
                    CK(cudaEventCreate(&e1));
                    const int iters = 10;
                    CK(cudaEventRecord(e0));
                    for (int it = 0; it < iters; ++it) var.fn<<<grid, 32 * var.warps, smem>>>(p);
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    float ms;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    const double us = ms * 1e3 / iters;
                    const double flops = 4.0 * B * H * (double)len * len * hd / (causal ? 2 : 1);
                    float d = 0.f;
                    if (first) {
                        CK(cudaMemcpy(o_ref, o, n * 2, cudaMemcpyDeviceToDevice));
                    } else {
                        CK(cudaMemset(diff, 0, 4));
                        max_abs_diff<<<1024, 256>>>(o, o_ref, n, diff);
                        CK(cudaMemcpy(&d, diff, 4, cudaMemcpyDeviceToHost));
                    }
                    printf("%-24s %4d %6d %6s %5d %10.1f %8.1f %10.2e\n", var.name, hd, len, causal ? "yes" : "no", B, us,
                           flops / us * 1e-6, d);
                    fflush(stdout);
                    first = false;
                    CK(cudaEventDestroy(e0));
                    CK(cudaEventDestroy(e1));
                }
            }
            CK(cudaFree(q));
            CK(cudaFree(k));
            CK(cudaFree(v));
            CK(cudaFree(o));
            CK(cudaFree(o_ref));
            CK(cudaFree(lse));
            CK(cudaFree(diff));
        }
    }
    return 0;
}
