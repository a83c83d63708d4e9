/* Products of 0/1 samples with float32 matrices by table lookup ("Four Russians").
 *
 * h [M, K] holds 0/1 samples. Split the K units into groups of 4: a group's 4 bits pick one of the
 * 16 sums of W's columns over a subset of the group, so each output row h_m W^T adds up K/4 table
 * rows instead of K products. The weight gradient G^T h [N, K] takes the same trick over the M
 * sample rows: 4 rows of G give 16 subset sums, and each unit's 4 bits pick one.
 *
 * The tables of a tile of LANES output columns stay in cache while many rows read them: in the
 * forward pass each thread owns a range of rows and builds every tile's tables in turn; in the weight
 * gradient each thread owns a range of tiles. ROWS rows (units) run at once, so that independent sums
 * hide the latency of the additions. The lookups are bound by the loads of table rows: on a 2-core
 * AVX-512 CPU, 2.1x (forward) and 2.4x (weight gradient) as fast as MKL's dense products for
 * [5000, 200] x [200, 784] (benchmarks/RESULTS.md, "Products of samples by table lookup").
 *
 * An SBN layer's log-prob takes its softplus terms from each vector of logits as it is summed
 * (`lookup_linear_log_prob`, bernoulli.h), and its weight gradient forms the logits' gradient from
 * the sigmoids kept (`lookup_linear_log_prob_weight_grad`): the logits never reach memory.
 *
 * Built by pipeline/native.py with the machine's C compiler (-O3 -march=native -fopenmp); the
 * vector type is as wide as the machine's vectors (AVX-512, AVX, else 128 bits: SSE or NEON). The
 * results agree with the dense products to float32 rounding (tests/pipeline/test_sample_linear.py).
 */
#include <stdlib.h>
#include <omp.h>

#include "bernoulli.h"
#include "scratch.h"

#define ROWS 8   /* output rows (forward) or units (weight gradient) summed at once: 8 independent sums */
#define BLOCK 24 /* groups of 4 sample rows per table block of the weight gradient: 24 x 1 KiB at 16 lanes, in L1 */
#define PREFETCH_ROWS 64 /* how far ahead the weight gradient fetches its operand's strips: the hardware
                          * prefetchers miss a 64-byte strip per row (1.4 ms of P's bottom layer at K = 50) */
#define LOG_PROB_ROWS 1024 /* rows whose `row_sums` (128 B each at 16 lanes) a thread keeps in cache across tiles */

/* How many of h's `count` entries are neither 0 nor 1 (NaN included). */
static int64_t non_binary(const float *h, int64_t count, int threads) {
    int64_t bad = 0;
    #pragma omp parallel for num_threads(threads) reduction(+ : bad) schedule(static)
    for (int64_t i = 0; i < count; i++) bad += !(h[i] == 0.f || h[i] == 1.f);
    return bad;
}

/* codes[m][g] = h[m, 4g] + 2 h[m, 4g+1] + 4 h[m, 4g+2] + 8 h[m, 4g+3] (units past K count 0). */
static void row_codes(const float *h, int64_t M, int K, uint8_t *codes, int threads) {
    int G = (K + 3) / 4, full = K / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *x = h + m * K;
        uint8_t *out = codes + m * G;
        for (int g = 0; g < full; g++)
            out[g] = (x[4 * g] != 0.f) | (x[4 * g + 1] != 0.f) << 1 | (x[4 * g + 2] != 0.f) << 2 | (x[4 * g + 3] != 0.f) << 3;
        if (full < G) {
            out[full] = 0;
            for (int k = 4 * full; k < K; k++) out[full] |= (x[k] != 0.f) << (k - 4 * full);
        }
    }
}

/* codes[q][k] = h[4q, k] + 2 h[4q+1, k] + 4 h[4q+2, k] + 8 h[4q+3, k] (rows past M count 0). */
static void column_codes(const float *h, int64_t M, int K, uint8_t *codes, int threads) {
    int64_t Q = (M + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < Q; q++) {
        uint8_t *out = codes + q * K;
        memset(out, 0, K);
        for (int i = 0; i < 4 && 4 * q + i < M; i++) {
            const float *x = h + (4 * q + i) * K;
            for (int k = 0; k < K; k++) out[k] |= (x[k] != 0.f) << i;
        }
    }
}

/* The 16 subset sums of 4 vectors: table[c] = sum of rows[i] over the bits i of c, plus 0 x the
 * other rows, as in a dense product: a NaN or infinite entry makes the lane NaN in every sum. */
static inline void subset_sums(const vec rows[4], float *table) {
    store(table, 0.f * (rows[0] + rows[1] + rows[2] + rows[3]));
    for (int c = 1; c < 16; c++) /* c = its lowest bit + the rest, whose sum is already there */
        store(table + c * LANES, load(table + (c & (c - 1)) * LANES) + rows[__builtin_ctz(c)]);
}

/* acc[r] += the sum over g < count of table[g][codes[r * row_stride + g * group_stride]]. */
static inline void add_lookups(const float *table, const uint8_t *codes, int64_t row_stride, int64_t group_stride,
                               int count, vec acc[ROWS]) {
    for (int g = 0; g < count; g++, codes += group_stride, table += 16 * LANES)
        for (int r = 0; r < ROWS; r++) acc[r] += load(table + codes[r * row_stride] * LANES);
}

/* This thread's share [first, last) of `count` tiles or row blocks, called by every thread of a
 * parallel region once its scratch memory is allocated (`have_memory`). If any thread's allocation
 * failed, every share is empty and *failed is 1. */
static void my_share(int64_t count, int have_memory, int *failed, int64_t *first, int64_t *last) {
    if (!have_memory) {
        #pragma omp atomic write
        *failed = 1;
    }
    #pragma omp barrier
    int threads = omp_get_num_threads(), me = omp_get_thread_num(), any_failed;
    #pragma omp atomic read
    any_failed = *failed;
    *first = count * me / threads;
    *last = any_failed ? *first : count * (me + 1) / threads;
}

/* The tables of the tile of LANES output columns at n0 (`width` of them): [g][c][LANES], the 16
 * subset sums of weight_t's rows 4g .. 4g + 3 (rows past K: zeros). */
static void tile_tables(const float *weight_t, int K, int N, int n0, int width, float *tables) {
    for (int g = 0; g < (K + 3) / 4; g++) {
        vec rows[4];
        for (int i = 0; i < 4; i++)
            rows[i] = 4 * g + i < K ? load_part(weight_t + (int64_t)(4 * g + i) * N + n0, width) : (vec){0};
        subset_sums(rows, tables + (int64_t)g * 16 * LANES);
    }
}

/* A row's lane sums of v l - relu(l) and lane products of 1 + e^-|l| (`bernoulli_vector`), so far. */
typedef struct {
    vec terms, product;
} row_sums;

/* Y [M, N] = h [M, K] weight_t [K, N] + bias [N] for 0/1 h; or given `rows_of`, with L those logits,
 * log_prob[m] = sum_n [v[m, n] L[m, n] - softplus(L[m, n])] for the values v (bernoulli.h) and
 * Y = sigmoid(L) (Y NULL: none kept), so that L never reaches memory.
 *
 * Each thread takes a range of row blocks, in chunks of LOG_PROB_ROWS rows when it takes log-probs,
 * else all at once. For each tile of LANES output columns, it builds the tile's tables, which stay in
 * cache while the chunk's rows read them. With log-probs, each row's lane sums of v l - relu(l) and
 * lane products of 1 + e^-|l| (`bernoulli_vector`) stay in the thread's buffer from tile to tile. */
static int64_t products(const float *h, const float *weight_t, const float *bias, float *Y, int64_t M, int K, int N,
                        int threads, const bernoulli_rows *rows_of) {
    int G = (K + 3) / 4, tiles = (N + LANES - 1) / LANES, failed = 0;
    int64_t blocks = (M + ROWS - 1) / ROWS;
    threads = threads < blocks ? threads : (int)blocks;
    int64_t bad = non_binary(h, M * K, threads);
    if (bad) return bad;
    uint8_t *codes = scratch(0, blocks * ROWS * G); /* rows past M: zero codes, never stored */
    if (!codes) return -1;
    memset(codes + M * G, 0, (blocks * ROWS - M) * G);
    row_codes(h, M, K, codes, threads);
    #pragma omp parallel num_threads(threads)
    {
        float *tables = scratch(1, (size_t)G * 16 * LANES * sizeof(float)); /* [g][c][LANES]: one tile's */
        row_sums *sums = rows_of ? scratch(2, LOG_PROB_ROWS * sizeof(row_sums)) : NULL; /* the chunk's rows' */
        int64_t first, last;
        my_share(blocks, tables && (sums || !rows_of), &failed, &first, &last);
        int64_t chunk = rows_of ? LOG_PROB_ROWS / ROWS : last - first;
        for (int64_t b0 = first; b0 < last; b0 += chunk) {
            int64_t b1 = b0 + chunk < last ? b0 + chunk : last, m_first = b0 * ROWS, m_last = b1 * ROWS < M ? b1 * ROWS : M;
            for (int64_t i = 0; rows_of && i < m_last - m_first; i++) sums[i] = (row_sums){.terms = {0}, .product = splat(1.f)};
            for (int t = 0; t < tiles; t++) {
                int n0 = t * LANES, width = N - n0 < LANES ? N - n0 : LANES;
                tile_tables(weight_t, K, N, n0, width, tables);
                vec b = load_part(bias + n0, width);
                for (int64_t m0 = b0 * ROWS; m0 < m_last; m0 += ROWS) {
                    vec acc[ROWS];
                    for (int r = 0; r < ROWS; r++) acc[r] = b;
                    add_lookups(tables, codes + m0 * G, G, 1, G, acc);
                    for (int64_t r = 0, m = m0; r < ROWS && m < m_last; r++, m++) {
                        float *out = Y ? Y + m * N + n0 : NULL;
                        if (!rows_of) {
                            store_part(out, width, acc[r]);
                            continue;
                        }
                        row_sums *row = sums + (m - m_first);
                        vec sigmoids = bernoulli_vector(fill_past(acc[r], width, PAST_END), row_at(rows_of, m, N), n0, width,
                                                        &row->terms, &row->product);
                        if (out) store_part(out, width, sigmoids); /* through the caches: streaming these strips was slower */
                    }
                }
                if (rows_of && (t + 1) % FLUSH == 0) /* the products' logs, before they can overflow */
                    for (int64_t i = 0; i < m_last - m_first; i++)
                        sums[i].terms -= log_positive(sums[i].product), sums[i].product = splat(1.f);
            }
            for (int64_t i = 0; rows_of && i < m_last - m_first; i++)
                rows_of->log_prob[m_first + i] = horizontal_sum(sums[i].terms - log_positive(sums[i].product));
        }
    }
    return failed ? -1 : 0;
}

/* dW [N, K] = G [M, N]^T h [M, K] for 0/1 h, and db [N] = G's column sums, for the output gradient G
 * that `g` gives (bernoulli.h). Returns how many entries of h are neither 0 nor 1, or -1 if memory ran
 * out; dW and db are written only on 0. */
static int64_t weight_grad(const float *h, const output_grad *g, float *dW, float *db, int64_t M, int K, int N,
                           int threads) {
    int64_t Q = (M + 3) / 4;
    int tiles = (N + LANES - 1) / LANES, units = (K + ROWS - 1) / ROWS * ROWS, failed = 0;
    threads = threads < tiles ? threads : tiles;
    int64_t bad = non_binary(h, M * K, threads);
    if (bad) return bad;
    uint8_t *codes = scratch(0, Q * K + ROWS); /* units past K read past a row of codes: their sums are dropped */
    if (!codes) return -1;
    memset(codes + Q * K, 0, ROWS);
    column_codes(h, M, K, codes, threads);
    #pragma omp parallel num_threads(threads)
    {
        float *tables = scratch(1, (size_t)BLOCK * 16 * LANES * sizeof(float)); /* [q][c][LANES] */
        float *sums = scratch(2, (size_t)units * LANES * sizeof(float));         /* [k][LANES]: a tile of dW^T */
        int64_t first, last;
        my_share(tiles, tables && sums, &failed, &first, &last);
        for (int t = first; t < last; t++) {
            int n0 = t * LANES, width = N - n0 < LANES ? N - n0 : LANES;
            memset(sums, 0, (size_t)units * LANES * sizeof(float));
            vec column_sum = {0};
            const float *strips = g->sigmoids ? g->sigmoids : g->grad; /* [M, N], read a column strip at a time */
            for (int64_t q0 = 0; q0 < Q; q0 += BLOCK) {
                int count = Q - q0 < BLOCK ? (int)(Q - q0) : BLOCK;
                for (int q = 0; q < count; q++) {
                    vec rows[4];
                    for (int i = 0; i < 4; i++) {
                        int64_t m = 4 * (q0 + q) + i;
                        rows[i] = m < M ? output_grad_part(g, m, n0, N, width) : (vec){0};
                        if (m + PREFETCH_ROWS < M) __builtin_prefetch(strips + (m + PREFETCH_ROWS) * N + n0);
                    }
                    column_sum += rows[0] + rows[1] + rows[2] + rows[3];
                    subset_sums(rows, tables + q * 16 * LANES);
                }
                for (int k = 0; k < units; k += ROWS) {
                    vec acc[ROWS];
                    for (int r = 0; r < ROWS; r++) acc[r] = load(sums + (k + r) * LANES);
                    add_lookups(tables, codes + q0 * K + k, 1, K, count, acc);
                    for (int r = 0; r < ROWS; r++) store(sums + (k + r) * LANES, acc[r]);
                }
            }
            for (int j = 0; j < width; j++)
                for (int k = 0; k < K; k++) dW[(int64_t)(n0 + j) * K + k] = sums[k * LANES + j];
            store_part(db + n0, width, column_sum);
        }
    }
    return failed ? -1 : 0;
}

/* The exported functions (bernoulli.h), with weight_t [K, N]: the layer's weight transposed. */
PRODUCT_KERNEL_FUNCTIONS(lookup_linear)
