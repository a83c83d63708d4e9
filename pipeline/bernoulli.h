/* A Bernoulli layer's log-prob and its logits' sigmoids, over vectors of logits (pipeline/vectors.h).
 *
 * For logits l and values v (0/1 samples, or any targets) of one row of units,
 *
 *     log p(v) = sum_i [v_i l_i - softplus(l_i)],    d log p / d l_i = v_i - sigmoid(l_i),
 *
 * as pipeline/bernoulli.py's `log_prob_of_logits` has them. softplus(l) = relu(l) + log(1 + e^-|l|),
 * and each factor 1 + e^-|l| lies in [1, 2], so a vector lane multiplies up to FLUSH of them before
 * it takes their log: one exp per unit, one log per lane per FLUSH vectors (exp and log: vectors.h).
 * Against float64, a row's log-prob is off by a few float32 ulps of its scale, as torch's float32
 * softplus is, plus the e^-|l| < 2^-25 that 1 + e rounds away (under 3e-8 nats a unit). NaN logits
 * give NaN. The product kernels (amx_linear.c, lookup_linear.c) score their logits with
 * `bernoulli_vector` as they produce them, and take the rows and their gradient through the two
 * structs at the end.
 */
#ifndef RWS_BERNOULLI_H
#define RWS_BERNOULLI_H

#include "vectors.h"

#define FLUSH 64         /* vectors per lane product: at most 2^64, far from float32's 2^128 */
#define PAST_END (-100.f) /* logit for lanes past a row's end: relu 0 and e^-100, below exp's cut-off, 0 */

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

/* Orders the streaming stores before the stores that follow (other threads may then read them). */
static inline void store_fence(void) {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

/* What a kernel's log-prob and draw functions add to its product: the values (row m % value_rows for
 * row m), or uniforms [M, N] to draw them from into draws [M, N]; their log-probs log_prob [M]. */
typedef struct {
    const float *values;
    int64_t value_rows;
    const float *uniforms;
    float *draws, *log_prob;
} bernoulli_rows;

/* Row m of `rows_of`, of N columns: its values, or its uniforms and draws (NULL: none). */
typedef struct {
    const float *values, *uniforms;
    float *draws;
} bernoulli_row;

static inline bernoulli_row row_at(const bernoulli_rows *rows_of, int64_t m, int64_t N) {
    return (bernoulli_row){
        .values = rows_of->values ? rows_of->values + m % rows_of->value_rows * N : NULL,
        .uniforms = rows_of->uniforms ? rows_of->uniforms + m * N : NULL,
        .draws = rows_of->draws ? rows_of->draws + m * N : NULL,
    };
}

/* One vector of a row's units: l holds `count` logits (PAST_END after them) of the units from n on,
 * and `row` is the row's values, or uniforms and draws. Adds values l - relu(l) to *terms, multiplies
 * *product by 1 + e^-|l|, and returns the sigmoids, the other part of the gradient
 * d/dl = values - sigmoid(l), from the same e^-|l|. With `uniforms` instead of values, the values
 * are drawn first and written to `draws`: v = 1 where [u + 2^-25 < sigmoid(-|l|)] differs from
 * [l > 0], as pipeline/bernoulli.py's `bernoulli_draws` draws from midpoint uniforms. */
static inline vec bernoulli_vector(vec l, bernoulli_row row, int64_t n, int count, vec *terms, vec *product) {
    vec e = exp_nonpositive(-as_floats(as_bits(l) & 0x7fffffff)), factor = 1.f + e;
    vec inverse = reciprocal(factor), unlikely = e * inverse; /* sigmoid(-|l|) */
    vec v;
    if (row.uniforms) {
        vec u = load_filled(row.uniforms + n, count, 1.f);
        v = pick((u + 0x1p-25f < unlikely) ^ (l > 0.f), splat(1.f), splat(0.f));
        store_part(row.draws + n, count, v);
    } else {
        v = load_filled(row.values + n, count, 0.f);
    }
    *terms += v * l - pick(l < 0.f, splat(0.f), l); /* v l - relu(l); NaN stays */
    *product *= factor;
    return pick(l < 0.f, unlikely, inverse); /* e / (1 + e) or 1 / (1 + e) */
}

/* sum_i [values_i l_i - softplus(l_i)] over row m of `rows_of`, whose `units` logits are at
 * `logits`, by `bernoulli_vector`; writes the sigmoids unless `sigmoids` is NULL, streaming (whole
 * rows at once: the backward reads them much later; the writer must fence before others read them). */
static inline float bernoulli_log_prob(const float *logits, const bernoulli_rows *rows_of, int64_t m, float *sigmoids,
                                       int units) {
    vec terms = {0}, logs = {0}, product = splat(1.f);
    bernoulli_row row = row_at(rows_of, m, units);
    for (int i = 0, steps = 0; i < units; i += LANES) {
        int count = units - i < LANES ? units - i : LANES;
        vec s = bernoulli_vector(load_filled(logits + i, count, PAST_END), row, i, count, &terms, &product);
        if (sigmoids) store_streaming(sigmoids + i, count, s);
        if (++steps == FLUSH) logs += log_positive(product), product = splat(1.f), steps = 0;
    }
    return horizontal_sum(terms - logs - log_positive(product));
}

/* The output gradient [M, N] of a weight gradient: `grad` itself, or where `sigmoids` is given, that
 * of the log-prob rows of a kernel's log-prob function, row_grad[r] (values[r % value_rows] - sigmoids[r]). */
typedef struct {
    const float *grad, *sigmoids, *values, *row_grad;
    int64_t value_rows;
} output_grad;

/* Entries n .. n + count - 1 of row r of the output gradient g [M, N] (zeros after them). */
static inline vec output_grad_part(const output_grad *g, int64_t r, int64_t n, int64_t N, int count) {
    if (!g->sigmoids) return load_part(g->grad + r * N + n, count);
    vec values = load_part(g->values + r % g->value_rows * N + n, count);
    return g->row_grad[r] * (values - load_part(g->sigmoids + r * N + n, count));
}

/* The five functions that a product kernel file exports (pipeline/sample_linear.py's `Kernels`),
 * over its own
 *     static int64_t products(h, weight, bias, Y, M, K, N, threads, const bernoulli_rows *rows_of);
 *     static int64_t weight_grad(h, const output_grad *g, dW, db, M, K, N, threads);
 * `weight` as the file takes it (W [N, K] or its transpose). Each returns how many entries of h
 * [M, K] are neither 0 nor 1, or -1 if memory ran out; its outputs are written only on 0.
 *   NAME: Y [M, N] = h weight^T + bias, for 0/1 h.
 *   NAME_log_prob: log_prob [M], the Bernoulli log-prob of values [value_rows, N] (row m %
 *     value_rows for row m) under each row of those logits, and their sigmoids in S [M, N] (for the
 *     gradient; S NULL: none, when no gradient is wanted).
 *   NAME_draw: values drawn from those rows with uniforms U [M, N] into draws [M, N], then as
 *     NAME_log_prob with them.
 *   NAME_weight_grad: dW [N, K] = grad [M, N]^T h and db [N] = grad's column sums.
 *   NAME_log_prob_weight_grad: the same for the gradient row_grad [M] of NAME_log_prob's rows,
 *     whose logits' gradient is row_grad[m] (values - S[m]). */
#define PRODUCT_KERNEL_FUNCTIONS(NAME)                                                                                   \
    int64_t NAME(const float *h, const float *weight, const float *bias, float *Y, int64_t M, int K, int N, int threads) { \
        return products(h, weight, bias, Y, M, K, N, threads, NULL);                                                     \
    }                                                                                                                    \
    int64_t NAME##_log_prob(const float *h, const float *weight, const float *bias, const float *values,                 \
                            int64_t value_rows, float *S, float *log_prob, int64_t M, int K, int N, int threads) {       \
        bernoulli_rows rows_of = {.values = values, .value_rows = value_rows, .log_prob = log_prob};                   \
        return products(h, weight, bias, S, M, K, N, threads, &rows_of);                                                 \
    }                                                                                                                    \
    int64_t NAME##_draw(const float *h, const float *weight, const float *bias, const float *U, float *draws, float *S,  \
                        float *log_prob, int64_t M, int K, int N, int threads) {                                         \
        bernoulli_rows rows_of = {.uniforms = U, .draws = draws, .log_prob = log_prob};                                 \
        return products(h, weight, bias, S, M, K, N, threads, &rows_of);                                                 \
    }                                                                                                                    \
    int64_t NAME##_weight_grad(const float *h, const float *grad, float *dW, float *db, int64_t M, int K, int N,         \
                               int threads) {                                                                            \
        output_grad g = {.grad = grad};                                                                                  \
        return weight_grad(h, &g, dW, db, M, K, N, threads);                                                             \
    }                                                                                                                    \
    int64_t NAME##_log_prob_weight_grad(const float *h, const float *sigmoids, const float *values, int64_t value_rows,  \
                                        const float *row_grad, float *dW, float *db, int64_t M, int K, int N,            \
                                        int threads) {                                                                   \
        output_grad g = {.sigmoids = sigmoids, .values = values, .row_grad = row_grad, .value_rows = value_rows};        \
        return weight_grad(h, &g, dW, db, M, K, N, threads);                                                             \
    }

#endif
