/* cuattn from C: causal attention with key padding on random inputs.
 *
 * CPU part (always): cuattn's f64 reference (cuattn_attention_reference) against a naive
 * softmax-attention loop written here, so the C program checks the library without Rust.
 * GPU part (when cuattn_gpu_open finds a device): the same inputs in f16 on the device, the
 * kernel queued on a stream of ours (NULL: the default stream) with device key lengths, and its
 * output compared with the reference. Without a device it says the GPU part was skipped.
 *
 * Build and run: `make c-example` (links the shared library target/release/libcuattn_c.so). */

#include "cuattn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { B = 2, HQ = 4, HKV = 2, LQ = 5, LK = 7, D = 16 };

static int fail(const char *what, int rc) {
    fprintf(stderr, "%s failed: code %d: %s\n", what, rc, cuattn_last_error());
    return 1;
}

static float frand(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* f32 -> f16 bits, round to nearest even (normal range only: our values are in [-1, 1]). */
static unsigned short to_f16(float f) {
    unsigned bits;
    memcpy(&bits, &f, 4);
    unsigned sign = (bits >> 16) & 0x8000u;
    int exp = (int)((bits >> 23) & 0xff) - 127 + 15;
    unsigned mant = bits & 0x7fffffu;
    if (exp <= 0) return (unsigned short)sign; /* tiny: flush to zero */
    unsigned half = (unsigned)(exp << 10) | (mant >> 13);
    unsigned rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half++;
    return (unsigned short)(sign | half);
}

static float from_f16(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000u) << 16;
    unsigned exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    unsigned bits;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Naive attention in double, bottom-right causal with key lengths (the library's definition). */
static void naive(const float *q, const float *k, const float *v, const int *lens, float *o) {
    for (int b = 0; b < B; b++)
        for (int h = 0; h < HQ; h++)
            for (int i = 0; i < LQ; i++) {
                int hk = h / (HQ / HKV), klen = lens[b];
                int end = i + klen - LQ + 1; /* keys j < end are visible */
                if (end > klen) end = klen;
                double s[LK], max = -INFINITY, sum = 0.0;
                const float *qi = q + ((b * HQ + h) * LQ + i) * D;
                for (int j = 0; j < end; j++) {
                    const float *kj = k + ((b * HKV + hk) * LK + j) * D;
                    double dot = 0.0;
                    for (int d = 0; d < D; d++) dot += (double)qi[d] * kj[d];
                    s[j] = dot / sqrt((double)D);
                    if (s[j] > max) max = s[j];
                }
                float *oi = o + ((b * HQ + h) * LQ + i) * D;
                double acc[D] = {0};
                for (int j = 0; j < end; j++) {
                    double p = exp(s[j] - max);
                    sum += p;
                    for (int d = 0; d < D; d++) acc[d] += p * v[((b * HKV + hk) * LK + j) * D + d];
                }
                for (int d = 0; d < D; d++) oi[d] = end > 0 ? (float)(acc[d] / sum) : 0.0f;
            }
}

static double max_abs_diff(const float *a, const float *b, int n) {
    double worst = 0.0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d) return INFINITY; /* NaN */
        if (d > worst) worst = d;
    }
    return worst;
}

static cuattn_tensor tensor4(uint64_t data, int dtype, long b, long h, long l, long d, size_t elem) {
    cuattn_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.bytes = (uint64_t)(b * h * l * d) * elem;
    t.dtype = dtype;
    t.rank = 4;
    t.shape[0] = b, t.shape[1] = h, t.shape[2] = l, t.shape[3] = d;
    return t; /* strides all 0: contiguous */
}

int main(void) {
    enum { NQ = B * HQ * LQ * D, NK = B * HKV * LK * D };
    static float q[NQ], k[NK], v[NK], o_ref[NQ], o_naive[NQ], o_gpu[NQ];
    static unsigned short q16[NQ], k16[NK], v16[NK], o16[NQ];
    unsigned seed = 12345;
    /* Values rounded to f16 first, so the CPU and GPU parts read the same numbers. */
    for (int i = 0; i < NQ; i++) q16[i] = to_f16(frand(&seed)), q[i] = from_f16(q16[i]);
    for (int i = 0; i < NK; i++) k16[i] = to_f16(frand(&seed)), k[i] = from_f16(k16[i]);
    for (int i = 0; i < NK; i++) v16[i] = to_f16(frand(&seed)), v[i] = from_f16(v16[i]);
    const int lens[B] = {LK, 3};

    printf("cuattn %s\n", cuattn_version());
    cuattn_attention_options opts;
    memset(&opts, 0, sizeof opts);
    opts.causal = CUATTN_MASK_BOTTOM_RIGHT;
    opts.window_left = -1, opts.window_right = -1;
    opts.window_align = CUATTN_MASK_TOP_LEFT;
    opts.kernel = CUATTN_KERNEL_AUTO;
    cuattn_attention_shape shape = {B, HQ, HKV, LQ, LK, D, D};

    int rc = cuattn_attention_reference(&shape, q, k, v, lens, &opts, o_ref, NULL);
    if (rc != CUATTN_OK) return fail("cuattn_attention_reference", rc);
    naive(q, k, v, lens, o_naive);
    double cpu_err = max_abs_diff(o_ref, o_naive, NQ);
    printf("CPU: reference vs naive C loop, max |diff| = %.3g\n", cpu_err);
    if (!(cpu_err < 1e-5)) {
        fprintf(stderr, "CPU reference disagrees with the naive loop\n");
        return 1;
    }
    /* Bad input is a code and a message, not a crash. */
    cuattn_attention_shape bad = shape;
    bad.heads_q = 3;
    rc = cuattn_attention_reference(&bad, q, k, v, NULL, &opts, o_ref, NULL);
    printf("CPU: bad heads -> code %d (%s)\n", rc, cuattn_last_error());
    if (rc == CUATTN_OK) return 1;

    cuattn_gpu *gpu = NULL;
    rc = cuattn_gpu_open(0, &gpu);
    if (rc == CUATTN_ERROR_NO_DEVICE || rc == CUATTN_ERROR_CUDA_DISABLED) {
        printf("GPU: skipped (%s)\n", cuattn_last_error());
        return 0;
    }
    if (rc != CUATTN_OK) return fail("cuattn_gpu_open", rc);

    uint64_t dq, dk, dv, dout, dlens;
    if ((rc = cuattn_malloc(gpu, sizeof q16, &dq)) || (rc = cuattn_malloc(gpu, sizeof k16, &dk)) ||
        (rc = cuattn_malloc(gpu, sizeof v16, &dv)) || (rc = cuattn_malloc(gpu, sizeof o16, &dout)) ||
        (rc = cuattn_malloc(gpu, sizeof lens, &dlens)))
        return fail("cuattn_malloc", rc);
    if ((rc = cuattn_memcpy_htod(gpu, dq, q16, sizeof q16)) ||
        (rc = cuattn_memcpy_htod(gpu, dk, k16, sizeof k16)) ||
        (rc = cuattn_memcpy_htod(gpu, dv, v16, sizeof v16)) ||
        (rc = cuattn_memcpy_htod(gpu, dlens, lens, sizeof lens)))
        return fail("cuattn_memcpy_htod", rc);
    cuattn_tensor tq = tensor4(dq, CUATTN_DTYPE_F16, B, HQ, LQ, D, 2);
    cuattn_tensor tk = tensor4(dk, CUATTN_DTYPE_F16, B, HKV, LK, D, 2);
    cuattn_tensor tv = tensor4(dv, CUATTN_DTYPE_F16, B, HKV, LK, D, 2);
    cuattn_tensor to = tensor4(dout, CUATTN_DTYPE_F16, B, HQ, LQ, D, 2);
    opts.key_lens = dlens; /* device lengths: the call uploads nothing */
    rc = cuattn_attention_fwd(gpu, NULL, &tq, &tk, &tv, &to, NULL, &opts);
    if (rc != CUATTN_OK) return fail("cuattn_attention_fwd", rc);
    if ((rc = cuattn_stream_synchronize(gpu, NULL))) return fail("cuattn_stream_synchronize", rc);
    if ((rc = cuattn_memcpy_dtoh(gpu, o16, dout, sizeof o16))) return fail("cuattn_memcpy_dtoh", rc);
    for (int i = 0; i < NQ; i++) o_gpu[i] = from_f16(o16[i]);
    double gpu_err = max_abs_diff(o_gpu, o_ref, NQ);
    /* f16 output of values in [-1, 1]: half an ulp is 2^-11; accumulation adds a little. */
    printf("GPU: f16 kernel vs reference, max |diff| = %.3g\n", gpu_err);
    cuattn_free(gpu, dq), cuattn_free(gpu, dk), cuattn_free(gpu, dv);
    cuattn_free(gpu, dout), cuattn_free(gpu, dlens);
    cuattn_gpu_close(gpu);
    if (!(gpu_err < 2e-3)) {
        fprintf(stderr, "GPU kernel disagrees with the reference\n");
        return 1;
    }
    return 0;
}
