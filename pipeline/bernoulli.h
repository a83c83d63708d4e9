/* A Bernoulli layer's log-prob and its logits' sigmoids, over vectors of logits (pipeline/vectors.h).
 *
 * For logits l and values v (0/1 samples, or any targets) of one row of units,
 *
 *     log p(v) = sum_i [v_i l_i - softplus(l_i)],    d log p / d l_i = v_i - sigmoid(l_i),
 *
 * as pipeline/layers.py's `_log_prob_of_logits` has them. softplus(l) = relu(l) + log(1 + e^-|l|),
 * and each factor 1 + e^-|l| lies in [1, 2], so a vector lane multiplies up to FLUSH of them before
 * it takes their log: one exp per unit, one log per lane per FLUSH vectors. exp and log are Cephes'
 * single-precision polynomials (within 2 ulp). Against float64, a row's log-prob is off by a few
 * float32 ulps of its scale, as torch's float32 softplus is, plus the e^-|l| < 2^-25 that 1 + e
 * rounds away (under 3e-8 nats a unit). NaN logits give NaN.
 */
#ifndef RWS_BERNOULLI_H
#define RWS_BERNOULLI_H

#include "vectors.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define FLUSH 64         /* vectors per lane product: at most 2^64, far from float32's 2^128 */
#define PAST_END (-100.f) /* logit for lanes past a row's end: relu 0 and e^-100, below exp's cut-off, 0 */

static inline vec as_floats(ivec bits) { return (vec)bits; }
static inline ivec as_bits(vec x) { return (ivec)x; }
static inline vec splat(float x) { vec v = {0}; return v + x; }
static inline vec pick(ivec mask, vec yes, vec no) { return as_floats((as_bits(yes) & mask) | (as_bits(no) & ~mask)); }

/* e^x for x <= 0; 0 below -87 (where e^x leaves the normal floats), NaN for NaN. */
static inline vec exp_nonpositive(vec x) {
    ivec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec); /* round(x / ln 2): truncation of a negative */
    vec nf = __builtin_convertvector(n, vec);
    vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f; /* x - n ln 2, in [-ln 2 / 2, ln 2 / 2] */
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vec e = (p * r * r + r + 1.f) * as_floats((n + 127) << 23);
    return as_floats(as_bits(e) & ~(x < -87.f));
}

/* log x for normal x > 0; NaN for NaN. */
static inline vec log_positive(vec x) {
    ivec bits = as_bits(x);
    ivec exponent = ((bits >> 23) & 0xff) - 126; /* x = m 2^exponent, m in [1/2, 1) */
    vec m = as_floats((bits & 0x007fffff) | 0x3f000000);
    ivec below = m < 0.70710678118654752f; /* -1 where m < sqrt(1/2): take 2m instead */
    exponent += below;
    m = m + as_floats(as_bits(m) & below) - 1.f; /* m - 1 or 2m - 1, in [-0.29, 0.41] */
    vec e = __builtin_convertvector(exponent, vec), z = m * m;
    vec y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e + (x - x);
}

/* The first `count` floats at p, `fill` after (count < LANES: a row's last vector). */
static inline vec load_filled(const float *p, int count, float fill) {
    if (count >= LANES) return load(p);
    float buf[LANES];
    for (int i = 0; i < LANES; i++) buf[i] = i < count ? p[i] : fill;
    return load(buf);
}

/* 1 / d for d in [1, 2], within an ulp: AVX-512's 14-bit estimate and a Newton step, where a
 * division would take several times as long. */
static inline vec reciprocal(vec d) {
#if defined(__AVX512F__)
    vec r = (vec)_mm512_rcp14_ps((__m512)d);
    return r * (2.f - d * r);
#else
    return 1.f / d;
#endif
}

/* store_part, past the caches where the vector is whole and aligned (AVX-512): for results that are
 * read again only much later, which a store through the caches would first read from memory. */
static inline void store_streaming(float *p, int count, vec v) {
#if defined(__AVX512F__)
    if (count == LANES && ((uintptr_t)p & 63) == 0) return _mm512_stream_ps(p, (__m512)v);
#endif
    store_part(p, count, v);
}

/* sum_i [values_i l_i - softplus(l_i)] over a row of `units` logits; writes their sigmoids, the
 * other part of the gradient d/dl_i = values_i - sigmoid(l_i), from the same e^-|l_i|, to `sigmoids`
 * (streaming: the backward reads them; the writer must fence before others read them).
 * With `uniforms` instead of values, the values are drawn first and written to `draws`: v_i = 1 where
 * [u_i + 2^-25 < sigmoid(-|l_i|)] differs from [l_i > 0], as pipeline/layers.py's `_bernoulli` draws
 * from midpoint uniforms. */
static inline float bernoulli_log_prob(const float *logits, const float *values, const float *uniforms, float *draws,
                                       float *sigmoids, int units) {
    vec terms = {0}, logs = {0}, product = splat(1.f);
    for (int i = 0, steps = 0; i < units; i += LANES) {
        int count = units - i < LANES ? units - i : LANES;
        vec l = load_filled(logits + i, count, PAST_END);
        vec e = exp_nonpositive(-as_floats(as_bits(l) & 0x7fffffff)), factor = 1.f + e;
        vec inverse = reciprocal(factor), unlikely = e * inverse; /* sigmoid(-|l|) */
        vec v;
        if (uniforms) {
            vec u = load_filled(uniforms + i, count, 1.f);
            v = pick((u + 0x1p-25f < unlikely) ^ (l > 0.f), splat(1.f), splat(0.f));
            store_part(draws + i, count, v);
        } else {
            v = load_filled(values + i, count, 0.f);
        }
        terms += v * l - pick(l < 0.f, splat(0.f), l); /* v l - relu(l); NaN stays */
        product *= factor;
        if (++steps == FLUSH) logs += log_positive(product), product = splat(1.f), steps = 0;
        store_streaming(sigmoids + i, count, pick(l < 0.f, unlikely, inverse)); /* e / (1 + e) or 1 / (1 + e) */
    }
    vec total = terms - logs - log_positive(product);
    float sum = 0.f;
    for (int i = 0; i < LANES; i++) sum += total[i];
    return sum;
}

#endif
