/* CALM's energy head + autoencoder decoder + vocabulary argmax for a few rows, in one call.
 *
 * At batch 1 a CALM decoding step runs ~80 small PyTorch ops after the backbone (head,
 * decoder, argmax); each costs a few microseconds of dispatch for a few microseconds of work.
 * This file does the same arithmetic in one pass over the model's own float32 weights (no
 * copies), the vocabulary argmax in float32. It includes no PyTorch header: plain C++ with
 * GCC/Clang vector extensions. `fused_decode_ext.cpp` checks the tensors and calls it; both
 * are built by `torch.utils.cpp_extension` on first use (`calm.fused_decode`).
 *
 * Results equal the PyTorch modules' up to float32 rounding (another summation order), and do
 * not depend on how many rows are decoded together. Single-threaded on purpose: it is used for
 * a handful of rows, where threads cost more than they save; larger batches go through
 * PyTorch's GEMMs.
 */
#include "fused_decode_kernel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

#define LANES 16 /* floats per vector: one AVX-512 register, two AVX2 registers (hsum assumes 16) */

/* GCC/Clang vector extensions: portable SIMD, lowered to the target's registers. */
typedef float vf __attribute__((vector_size(4 * LANES)));
static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

/* Sum of the 16 lanes by a fixed tree of half-vector additions: deterministic, and a few
 * register shuffles (a scalar loop over the lanes cost ~40% of the kernel). */
static inline float hsum(vf v) {
#if defined(__clang__) || __GNUC__ >= 12
    vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vf4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else /* the same tree through memory */
    vf8 lo8, hi8;
    memcpy(&lo8, &v, sizeof lo8);
    memcpy(&hi8, (const char *)&v + sizeof lo8, sizeof hi8);
    vf8 s8 = lo8 + hi8;
    vf4 lo4, hi4;
    memcpy(&lo4, &s8, sizeof lo4);
    memcpy(&hi4, (const char *)&s8 + sizeof lo4, sizeof hi4);
    vf4 s4 = lo4 + hi4;
#endif
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* dot(a, b) over n floats: two vectors of partial sums, then a fixed reduction tree (vectorised
 * without -ffast-math; the result depends on the inputs only, not on the batch). One weight row
 * is read front to back, which the hardware prefetchers follow best (measured: interleaving 4
 * weight rows per pass was 20-40% slower here). */
static float dot(const float *__restrict__ a, const float *__restrict__ b, int64_t n) {
    vf s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        s0 += load(a + i) * load(b + i);
        s1 += load(a + i + LANES) * load(b + i + LANES);
    }
    float tail = 0.f;
    for (; i < n; i++) tail += a[i] * b[i];
    return hsum(s0 + s1) + tail;
}

/* Y[r, o] = (bias ? bias[o] : 0) + (accumulate ? Y[r, o] : 0) + dot(W[o, 0:in], X[r, 0:in]).
 * W rows are `ldw` apart (a column slice of a wider matrix); a weight row serves every row of
 * X while it is in L1, so the weights are read from memory once per call. */
static void linear(const float *W, int64_t ldw, const float *bias, const float *X, int64_t ldx, float *Y,
                   int64_t ldy, int64_t rows, int64_t out, int64_t in, int accumulate) {
    for (int64_t o = 0; o < out; o++) {
        const float *w = W + o * ldw;
        float b = bias ? bias[o] : 0.f;
        for (int64_t r = 0; r < rows; r++) {
            float v = dot(w, X + r * ldx, in) + b;
            Y[r * ldy + o] = accumulate ? Y[r * ldy + o] + v : v;
        }
    }
}

static inline float silu(float x) { return x / (1.f + expf(-x)); }

static void silu_inplace(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = silu(x[i]);
}

/* nn.LayerNorm over each row of d (biased variance, as PyTorch). */
static void layer_norm(const float *X, float *Y, int64_t rows, int64_t d, const float *w, const float *b,
                       float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = X + r * d;
        float *y = Y + r * d;
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < d; i++) mean += x[i];
        mean /= (double)d;
        for (int64_t i = 0; i < d; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
        var /= (double)d;
        float m = (float)mean, inv = (float)(1.0 / sqrt(var + (double)eps));
        for (int64_t i = 0; i < d; i++) y[i] = (x[i] - m) * inv * w[i] + b[i];
    }
}

/* RMSNorm (F.rms_norm) over each row of d. */
static void rms_norm(const float *X, float *Y, int64_t rows, int64_t d, const float *w, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = X + r * d;
        float *y = Y + r * d;
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
        float inv = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (int64_t i = 0; i < d; i++) y[i] = x[i] * inv * w[i];
    }
}

/* Residual SwiGLU block of the autoencoder: X += down(silu(gate(n)) * up(n)), n = RMSNorm(X). */
static void residual_mlp(float *X, int64_t rows, int64_t d, int64_t f, const float *const *p, float eps,
                         float *t, float *g, float *u) {
    rms_norm(X, t, rows, d, p[0], eps);
    linear(p[1], d, NULL, t, d, g, f, rows, f, d, 0);
    linear(p[2], d, NULL, t, d, u, f, rows, f, d, 0);
    for (int64_t i = 0; i < rows * f; i++) g[i] = silu(g[i]) * u[i];
    linear(p[3], f, NULL, g, f, X, d, rows, d, f, 1);
}

}  // namespace

int calm_fused_head_decode(const float *const *p, const int64_t *dims, const float *eps, const float *h,
                           int64_t B, const float *noise, int64_t m, int64_t *out, float *latents) {
    using namespace calm_fused;
    const int64_t d = dims[D], nd = dims[NOISE], l = dims[LATENT], hb = dims[HEAD_BLOCKS];
    const int64_t da = dims[AE_D], f = dims[AE_FFN], pre = dims[PRE_BLOCKS], post = dims[POST_BLOCKS];
    const int64_t Kc = dims[K], Vc = dims[V];
    const int64_t R = B * m, RK = R * Kc;
    const float ln_eps = eps[0], rms_eps = eps[1];
    /* widest row of the scratch t, u, g: the head's 2d, the decoder's d_ae and ffn */
    int64_t big = 2 * d > f ? 2 * d : f;
    if (da > big) big = da;
    const int64_t xd = d > da ? d : da; /* x: the head's state [R, d], then the decoder's [R, d_ae] */
    /* scratch: hh [B,d], hp [B,d], x [R,xd], t [RK,big], u [RK,big], g [RK,big], z [R,l],
     * e [RK,d_ae], row maxima [RK] */
    size_t n = (size_t)(2 * B * d + R * xd + 3 * RK * big + R * l + RK * da + RK);
    float *buf = (float *)malloc(n * sizeof(float));
    if (!buf) return -1;
    float *hh = buf, *hp = hh + B * d, *x = hp + B * d, *t = x + R * xd, *u = t + RK * big, *g = u + RK * big;
    float *z = g + RK * big, *e = z + R * l, *best = e + RK * da;

    /* ---- energy head (width d) ---- */
    int i = 0;
    linear(p[i], d, p[i + 1], h, d, t, d, B, d, d, 0);
    layer_norm(t, hh, B, d, p[i + 2], p[i + 3], ln_eps);
    linear(p[i + 4], nd, p[i + 5], noise, nd, t, d, R, d, nd, 0);
    layer_norm(t, x, R, d, p[i + 6], p[i + 7], ln_eps);
    i += 8;
    for (int64_t blk = 0; blk < hb; blk++, i += 10) {
        /* first linear on concat(LN(x), h'): the h' half once per position, broadcast over m */
        linear(p[i + 2] + d, 2 * d, p[i + 3], hh, d, hp, d, B, d, d, 0);
        layer_norm(x, t, R, d, p[i], p[i + 1], ln_eps);
        for (int64_t r = 0; r < R; r++) memcpy(u + r * d, hp + (r / m) * d, d * sizeof(float));
        linear(p[i + 2], 2 * d, NULL, t, d, u, d, R, d, d, 1);
        silu_inplace(u, R * d);
        linear(p[i + 4], d, p[i + 5], u, d, t, d, R, d, d, 0);
        silu_inplace(t, R * d);
        linear(p[i + 6], d, p[i + 7], t, d, u, 2 * d, R, 2 * d, d, 0);
        for (int64_t r = 0; r < R; r++) {
            float *gu = u + r * 2 * d;
            for (int64_t j = 0; j < d; j++) g[r * d + j] = silu(gu[j]) * gu[d + j];
        }
        linear(p[i + 8], d, p[i + 9], g, d, x, d, R, d, d, 1);
    }
    layer_norm(x, t, R, d, p[i], p[i + 1], ln_eps);
    linear(p[i + 2], d, p[i + 3], t, d, u, d, R, d, d, 0);
    silu_inplace(u, R * d);
    linear(p[i + 4], d, p[i + 5], u, d, z, l, R, l, d, 0);
    i += 6;
    if (latents) memcpy(latents, z, (size_t)(R * l) * sizeof(float));

    /* ---- autoencoder decoder (width d_ae, which the authors' releases make smaller than d) ---- */
    linear(p[i], l, p[i + 1], z, l, x, da, R, da, l, 0);
    i += 2;
    for (int64_t blk = 0; blk < pre; blk++, i += 4) residual_mlp(x, R, da, f, p + i, rms_eps, t, g, u);
    linear(p[i], da, p[i + 1], x, da, e, Kc * da, R, Kc * da, da, 0); /* e: [R, K*d_ae] = [RK, d_ae] */
    i += 2;
    for (int64_t blk = 0; blk < post; blk++, i += 4) residual_mlp(e, RK, da, f, p + i, rms_eps, t, g, u);
    rms_norm(e, t, RK, da, p[i], rms_eps);
    i += 1;

    /* ---- vocabulary argmax through the tied embedding, in float32 ---- */
    /* (A bf16 screen with float32 rescoring, as `tied_argmax` does, reads half the bytes but
     * measured 25% slower end to end here: at a few rows this loop is bound by the dot
     * products, not by memory.) Ties go to the first index, as torch.argmax. */
    const float *emb = p[i];
    for (int64_t r = 0; r < RK; r++) best[r] = -INFINITY, out[r] = 0;
    for (int64_t v = 0; v < Vc; v++)
        for (int64_t r = 0; r < RK; r++) {
            float value = dot(emb + v * da, t + r * da, da);
            if (value > best[r]) best[r] = value, out[r] = v;
        }
    free(buf);
    return 0;
}
