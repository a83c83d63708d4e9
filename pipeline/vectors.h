/* The vector type shared by the C kernels beside this file (pipeline/native.py builds them).
 *
 * LANES: floats per vector, as wide as the target's registers (AVX-512, AVX, else 128 bits: SSE or
 * NEON). A vector wider than the registers takes two registers per value, and GCC spills them:
 * with 16 lanes on AVX2, lookup_linear.c ran 2-3x slower than MKL, with 8 lanes 1.7-1.9x faster
 * (benchmarks/RESULTS.md). GCC's vector extensions keep the kernels free of per-ISA intrinsics, but
 * for the few without a portable form (AVX-512's masked loads and reciprocal estimate).
 * Below the type: the elementwise helpers and functions that more than one kernel uses. */
#ifndef RWS_VECTORS_H
#define RWS_VECTORS_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4 /* SSE, NEON */
#endif

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* Loads (stores) the first `count` <= LANES floats of a vector: a masked load on AVX-512, else through
 * a zero-padded buffer. None for count <= 0 (zeros). */
static inline vec load_part(const float *p, int count) {
    if (count == LANES) return load(p);
#if defined(__AVX512F__)
    return (vec)_mm512_maskz_loadu_ps(count > 0 ? (__mmask16)((1u << count) - 1) : 0, p);
#else
    float buf[LANES] = {0};
    if (count > 0) memcpy(buf, p, count * sizeof(float));
    return load(buf);
#endif
}
static inline void store_part(float *p, int count, vec v) {
    if (count == LANES) return store(p, v);
    float buf[LANES];
    store(buf, v);
    memcpy(p, buf, count * sizeof(float));
}

/* Bit casts, broadcasts, lane selection (mask: all ones or zeros per lane), and Cephes'
 * single-precision exp and log polynomials (within 2 ulp). */
static inline vec as_floats(ivec bits) { return (vec)bits; }
static inline ivec as_bits(vec x) { return (ivec)x; }
static inline vec splat(float x) { vec v = {0}; return v + x; }
static inline vec pick(ivec mask, vec yes, vec no) { return as_floats((as_bits(yes) & mask) | (as_bits(no) & ~mask)); }

/* v with `fill` past its first `count` lanes (a row's last vector). */
static inline vec fill_past(vec v, int count, float fill) {
    if (count >= LANES) return v;
    ivec lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    return pick(lane < count, v, splat(fill));
}

/* load_part with `fill` past the first `count` floats. */
static inline vec load_filled(const float *p, int count, float fill) { return fill_past(load_part(p, count), count, fill); }

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

static inline float horizontal_sum(vec v) {
    float sum = 0.f;
    for (int k = 0; k < LANES; k++) sum += v[k];
    return sum;
}

#endif
