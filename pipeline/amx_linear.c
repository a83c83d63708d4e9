/* Products of 0/1 samples with float32 matrices on Intel's AMX tile units, exactly in three bfloat16 parts.
 *
 * AMX multiplies bfloat16 tiles into float32 sums. A 0/1 sample is exact in bfloat16, and a float32
 * x splits exactly into three bfloat16 parts, x = hi + mid + lo (hi = x rounded to 8 significant
 * bits, mid the remainder rounded so, lo what is left: at most 8 bits), so
 *
 *     h W^T = h hi(W)^T + h mid(W)^T + h lo(W)^T
 *
 * is the float32 product: every term is exact and only the order of the float32 sums differs from
 * the dense product (tests/pipeline/test_sample_linear.py). The weight gradient G^T h splits G the
 * same way. (Below |x| = 2^-102 a part can be subnormal, which AMX reads as 0: an error under
 * 2^-126.) A tile instruction does 16 x 16 x 32 products; on a 2-core Xeon with AMX the three
 * products ran 2.1-2.3x as fast as MKL's float32 product, and faster than lookup_linear.c's
 * tables (benchmarks/RESULTS.md, "Products of samples by table lookup").
 *
 * Built by pipeline/native.py with -march=native: on a CPU without AMX-BF16 only `amx_ready` is
 * compiled, and it returns 0. On one with it, `amx_ready` asks Linux for the tile state (the
 * permission is per process) and returns 1 if granted. The products take lookup_linear.c's
 * arguments, except that amx_linear takes the weight [N, K] itself rather than its transpose, and
 * return the same: how many entries of h are neither 0 nor 1 (the output is then not to be used),
 * or -1 if memory ran out.
 */
#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bernoulli.h"
#include "scratch.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PARTS 3
#define CHUNK 128 /* sample rows per block of the weight gradient: a thread's parts of grad and its sums stay in L2 */

int amx_ready(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Every tile 16 rows of 64 bytes: C[16 x 16] float32 += A[16 x 32] bfloat16 B[32 x 16] bfloat16,
 * B packed in pairs of rows ("VNNI": row r holds B[2r][n], B[2r+1][n] for each n). Tiles 0-3 sum a
 * 32 x 32 block of C, 4-5 hold A's two row tiles, 6-7 B's two column tiles. */
static void configure_tiles(void) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

/* The three bfloat16 parts of 16 floats: x = hi + mid + lo exactly (for |x| >= 2^-102). */
static inline void split(__m512 x, __m256bh parts[PARTS]) {
    for (int p = 0; p < PARTS; p++) {
        parts[p] = _mm512_cvtneps_pbh(x);
        x = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)parts[p]), 16)));
    }
}

/* The first `count` floats of p, up to 16 (zeros after; none read if count <= 0). */
static inline __m512 load16(const float *p, int64_t count) { return (__m512)load_part(p, count < 16 ? (int)count : 16); }

/* Which of 16 floats are 1, adding to *bad how many are neither 0 nor 1 (NaN included). */
static inline __mmask16 ones(__m512 x, int64_t *bad) {
    __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ);
    __mmask16 one = _mm512_cmp_ps_mask(x, _mm512_set1_ps(1.f), _CMP_EQ_OQ);
    *bad += __builtin_popcount((uint16_t) ~(zero | one));
    return one;
}

/* out[k * stride + i] = h[m0 + i, k0 + k] as bfloat16, for i < 32 and k < 16 (zeros past M and K),
 * adding to *bad how many of those entries of h are neither 0 nor 1. Each row's 16 entries become 16
 * bits, and bit k of the 32 rows' bits is unit k's column. */
static void transpose_block(const float *h, int64_t M, int K, int64_t m0, int64_t k0, uint16_t *out, int64_t stride,
                            int64_t *bad) {
    uint16_t bits[32];
    for (int i = 0; i < 32; i++) bits[i] = m0 + i < M ? ones(load16(h + (m0 + i) * K + k0, K - k0), bad) : 0;
    __m512i rows = _mm512_loadu_si512(bits);
    for (int k = 0; k < 16; k++) {
        __mmask32 column = _mm512_test_epi16_mask(rows, _mm512_set1_epi16((short)(1 << k)));
        _mm512_storeu_si512(out + k * stride, _mm512_maskz_mov_epi16(column, _mm512_set1_epi16(0x3f80)));
    }
}

/* Entries n .. n + 15 of row r of the output gradient (zeros past N). */
static inline __m512 output_grad16(const output_grad *g, int64_t r, int64_t n, int64_t N) {
    return (__m512)output_grad_part(g, r, n, N, N - n < 16 ? (int)(N - n) : 16);
}

/* out[p] (VNNI, [rows/2][width][2] bfloat16, width a multiple of 16) = part p of rows m0 .. m0 +
 * rows - 1 of the output gradient g [M, N], zeros past M and N; adds the rows to column_sums [width]. */
static void pack_parts(const output_grad *g, int64_t m0, int64_t rows, int64_t M, int64_t width, int64_t N,
                       uint16_t *out[PARTS], float *column_sums) {
    for (int64_t r = 0; r < rows; r += 2)
        for (int64_t n = 0; n < width; n += 16) {
            __m512 first = m0 + r < M ? output_grad16(g, m0 + r, n, N) : _mm512_setzero_ps();
            __m512 second = m0 + r + 1 < M ? output_grad16(g, m0 + r + 1, n, N) : _mm512_setzero_ps();
            _mm512_storeu_ps(column_sums + n, _mm512_add_ps(_mm512_loadu_ps(column_sums + n), _mm512_add_ps(first, second)));
            __m256bh even[PARTS], odd[PARTS];
            split(first, even);
            split(second, odd);
            for (int p = 0; p < PARTS; p++) {
                __m512i pairs = _mm512_or_si512(_mm512_cvtepu16_epi32((__m256i)even[p]),
                                                _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)odd[p]), 16));
                _mm512_storeu_si512(out[p] + r * width + 2 * n, pairs);
            }
        }
}

/* The parts of row n of weight [N, K] into out[p] (VNNI, [Kp/2][Np] pairs): the pair of units
 * 2j, 2j + 1 of each step of 32 units is one 32-bit entry, scattered to row j of the step's 16.
 * Rows n >= N and units past K are zeros. */
static void pack_weight_row(const float *weight, int64_t n, int K, int64_t N, int64_t Kp, int64_t Np,
                            uint16_t *out[PARTS]) {
    __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                      _mm512_set1_epi32((int)Np));
    for (int64_t k = 0; k < Kp; k += 32) {
        __m256bh first[PARTS], second[PARTS];
        split(n < N ? load16(weight + n * K + k, K - k) : _mm512_setzero_ps(), first);
        split(n < N ? load16(weight + n * K + k + 16, K - k - 16) : _mm512_setzero_ps(), second);
        for (int p = 0; p < PARTS; p++) {
            __m512i pairs = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)first[p]), (__m256i)second[p], 1);
            _mm512_i32scatter_epi32((uint32_t *)out[p] + (k / 2) * Np + n, rows, pairs, 4);
        }
    }
}

/* parts[p] = buffer + p * size: the PARTS arrays of one allocation. */
static inline void part_pointers(uint16_t *buffer, int64_t size, uint16_t *parts[PARTS]) {
    for (int p = 0; p < PARTS; p++) parts[p] = buffer + p * size;
}

/* Tiles 0-3 = the 32 x 32 block of floats at c, rows `ld` floats apart (ld = 0: one row, repeated). */
static inline void load_block(const float *c, int64_t ld) {
    _tile_loadd(0, c, ld * sizeof(float));
    _tile_loadd(1, c + 16, ld * sizeof(float));
    _tile_loadd(2, c + 16 * ld, ld * sizeof(float));
    _tile_loadd(3, c + 16 * ld + 16, ld * sizeof(float));
}

/* C tiles 0-3 += A (stride a_stride bytes, `steps` steps of 32 along the sum) times the parts of B
 * (VNNI rows of b_stride bytes), for the 32 x 32 block whose A rows start at a and B columns at
 * column `n0` of each part. */
static inline void block_products(const uint16_t *a, int64_t a_stride, uint16_t *const parts[PARTS], int64_t n0,
                                  int64_t b_stride, int64_t steps) {
    for (int64_t s = 0; s < steps; s++) {
        _tile_loadd(4, a + 32 * s, a_stride);
        _tile_loadd(5, (const char *)(a + 32 * s) + 16 * a_stride, a_stride);
        for (int p = 0; p < PARTS; p++) {
            const char *rows = (const char *)(parts[p] + 2 * n0) + 16 * s * b_stride;
            _tile_loadd(6, rows, b_stride);
            _tile_loadd(7, rows + 64, b_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* Stores tile t (16 x 16 floats) at out (row stride `stride` floats), its first `rows` rows and `columns` columns. */
#define STORE_TILE(t, out, stride, rows, columns)                                                   \
    do {                                                                                            \
        if ((rows) >= 16 && (columns) >= 16) {                                                      \
            _tile_stored(t, out, (stride) * sizeof(float));                                         \
        } else if ((rows) > 0 && (columns) > 0) {                                                   \
            float buf[256];                                                                         \
            _tile_stored(t, buf, 64);                                                               \
            for (int i = 0; i < (rows) && i < 16; i++)                                              \
                memcpy((out) + i * (stride), buf + 16 * i, ((columns) < 16 ? (columns) : 16) * 4); \
        }                                                                                           \
    } while (0)

/* Y [M, N] = h [M, K] weight [N, K]^T + bias [N] for 0/1 h; or given `rows_of`, with L those logits,
 * log_prob[m] = sum_n [v[m, n] L[m, n] - softplus(L[m, n])] for the values v (bernoulli.h) and
 * Y = sigmoid(L): each block of 32 rows of L goes to a thread's buffer, which stays in cache, and
 * only the sigmoids (and draws) go to memory, the sigmoids past the caches. */
static int64_t products(const float *h, const float *weight, const float *bias, float *Y, int64_t M, int K, int N,
                        int threads, const bernoulli_rows *rows_of) {
    float *log_prob = rows_of ? rows_of->log_prob : NULL;
    int64_t Kp = round_up(K, 32), Np = round_up(N, 32), blocks = (M + 31) / 32, bad = 0;
    uint16_t *weights = scratch(0, PARTS * Kp * Np * sizeof(uint16_t));
    float *bias_row = scratch(1, Np * sizeof(float));
    uint16_t *samples = scratch(2, (size_t)threads * 32 * Kp * sizeof(uint16_t));
    float *blocks_logits = log_prob ? scratch(3, (size_t)threads * 32 * Np * sizeof(float)) : NULL;
    if (!weights || !bias_row || !samples || (log_prob && !blocks_logits)) return -1;
    uint16_t *parts[PARTS];
    part_pointers(weights, Kp * Np, parts);
    memset(bias_row, 0, Np * sizeof(float));
    memcpy(bias_row, bias, N * sizeof(float));
    #pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < Np; n++) pack_weight_row(weight, n, K, N, Kp, Np, parts);
        configure_tiles();
        uint16_t *a = samples + (size_t)omp_get_thread_num() * 32 * Kp; /* [32][Kp]: this block's rows */
        float *block_logits = log_prob ? blocks_logits + (size_t)omp_get_thread_num() * 32 * Np : NULL;
        int64_t ld = log_prob ? Np : N;
        #pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            int64_t m0 = 32 * block, rows = M - m0 < 32 ? M - m0 : 32;
            for (int64_t i = 0; i < 32; i++)
                for (int64_t k = 0; k < Kp; k += 16) { /* the rows' 0/1 entries as bfloat16 0 or 1.0 (0x3f80) */
                    __mmask16 one = i < rows ? ones(load16(h + (m0 + i) * K + k, K - k), &bad) : 0;
                    _mm256_storeu_si256((__m256i *)(a + i * Kp + k), _mm256_maskz_mov_epi16(one, _mm256_set1_epi16(0x3f80)));
                }
            for (int64_t n0 = 0; n0 < Np; n0 += 32) {
                load_block(bias_row + n0, 0); /* every row the bias */
                block_products(a, Kp * sizeof(uint16_t), parts, n0, Np * 2 * sizeof(uint16_t), Kp / 32);
                float *out = log_prob ? block_logits + n0 : Y + m0 * N + n0;
                STORE_TILE(0, out, ld, rows, N - n0);
                STORE_TILE(1, out + 16, ld, rows, N - n0 - 16);
                STORE_TILE(2, out + 16 * ld, ld, rows - 16, N - n0);
                STORE_TILE(3, out + 16 * ld + 16, ld, rows - 16, N - n0 - 16);
            }
            for (int64_t i = 0, m = m0; log_prob && i < rows; i++, m++)
                log_prob[m] = bernoulli_log_prob(block_logits + i * Np, rows_of, m, Y ? Y + m * N : NULL, N);
        }
        store_fence(); /* the sigmoids' streaming stores, before other threads read them */
        _tile_release();
    }
    return bad;
}

/* dW [N, K] = G [M, N]^T h [M, K] for 0/1 h, and db [N] = G's column sums, for the output gradient G
 * that `g` gives: the weight and bias gradients of amx_linear. dW is taken as its transpose h^T G
 * [K, N] so that h is A and G's parts are B. Each thread sums its chunks of rows into its own [K, N]
 * and [N] (transposing h's rows and packing G's parts a chunk at a time, so that they stay in L2;
 * the packing adds up the columns), and the threads' sums are added at the end. */
static int64_t weight_grad(const float *h, const output_grad *g, float *dW, float *db, int64_t M, int K, int N,
                           int threads) {
    int64_t Kp = round_up(K, 32), Np = round_up(N, 32), chunks = (M + CHUNK - 1) / CHUNK, bad = 0;
    threads = threads < chunks ? threads : (int)chunks;
    int failed = 0;
    float *sums = scratch(0, (size_t)threads * (Kp + 1) * Np * sizeof(float)); /* [thread][Kp + 1][Np]: dW^T, then db */
    if (!sums) return -1;
    #pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *mine = sums + (size_t)omp_get_thread_num() * (Kp + 1) * Np, *column_sums = mine + Kp * Np;
        memset(mine, 0, (Kp + 1) * Np * sizeof(float));
        uint16_t *packed = scratch(2, PARTS * CHUNK * Np * sizeof(uint16_t)); /* grad's parts, VNNI */
        uint16_t *samples_t = scratch(3, Kp * CHUNK * sizeof(uint16_t));       /* h^T [Kp][CHUNK] */
        if (!packed || !samples_t) {
            #pragma omp atomic write
            failed = 1;
        }
        uint16_t *parts[PARTS];
        part_pointers(packed, CHUNK * Np, parts);
        if (packed && samples_t) configure_tiles();
        #pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            if (!packed || !samples_t) continue;
            int64_t m0 = chunk * CHUNK;
            for (int64_t i = 0; i < CHUNK; i += 32)
                for (int64_t k = 0; k < Kp; k += 16) transpose_block(h, M, K, m0 + i, k, samples_t + k * CHUNK + i, CHUNK, &bad);
            pack_parts(g, m0, CHUNK, M, Np, N, parts, column_sums);
            for (int64_t k0 = 0; k0 < Kp; k0 += 32)
                for (int64_t n0 = 0; n0 < Np; n0 += 32) {
                    float *out = mine + k0 * Np + n0;
                    load_block(out, Np);
                    block_products(samples_t + k0 * CHUNK, CHUNK * sizeof(uint16_t), parts, n0, Np * 2 * sizeof(uint16_t),
                                   CHUNK / 32);
                    _tile_stored(0, out, Np * 4);
                    _tile_stored(1, out + 16, Np * 4);
                    _tile_stored(2, out + 16 * Np, Np * 4);
                    _tile_stored(3, out + 16 * Np + 16, Np * 4);
                }
        }
        if (packed && samples_t) _tile_release();
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k <= K; k++) { /* k = K: db */
                float sum = 0.f;
                for (int t = 0; t < threads; t++) sum += sums[((size_t)t * (Kp + 1) + (k < K ? k : Kp)) * Np + n];
                *(k < K ? dW + n * K + k : db + n) = sum;
            }
    }
    return failed ? -1 : bad;
}

/* The exported functions (bernoulli.h), with the layer's weight [N, K]. */
PRODUCT_KERNEL_FUNCTIONS(amx_linear)

#else
int amx_ready(void) { return 0; }
#endif
