/* Philox4x32-10 uniforms in C: the numbers of pipeline/philox.py's `philox_uniform`, bit for bit.
 *
 * Counter i = (i, 0, 0, 0) under the key (k0, k1) gives four 32-bit words; word j's top 24 bits,
 * times 2^-24, are number j * blocks + i of the output (blocks = ceil(numel / 4)), as the tensor
 * version lays them out. The tensor ops compile into one vectorized loop, but in int64 lanes, and
 * an AVX2 CPU has no 64-bit multiply. Here a round's 32 x 32 -> 64-bit products are the vectors'
 * widening multiply of even lanes (vpmuludq), which AVX2 has too: one for the even lanes, one for
 * the odd lanes shifted down, then the high and low halves blended back into 32-bit lanes.
 *
 * Built by pipeline/native.py (-O3 -march=native -fopenmp): 512-bit vectors with AVX-512, 256-bit
 * with AVX2, else a scalar loop.
 */
#include <stdint.h>
#include <omp.h>

#define MULTIPLIER0 0xD2511F53u
#define MULTIPLIER1 0xCD9E8D57u
#define KEY_INCREMENT0 0x9E3779B9u
#define KEY_INCREMENT1 0xBB67AE85u
#define ROUNDS 10

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define WIDTH 16 /* 32-bit lanes */
typedef __m512i lanes;
#define set1(x) _mm512_set1_epi32((int)(x))
#define xor3(a, b, c) _mm512_ternarylogic_epi32(a, b, c, 0x96)
#define mul_even(a, b) _mm512_mul_epu32(a, b)
#define shift_down(a) _mm512_srli_epi64(a, 32)
#define shift_up(a) _mm512_slli_epi64(a, 32)
#define odd_from(a, b) _mm512_mask_blend_epi32(0xAAAA, a, b) /* even lanes of a, odd lanes of b */
#define counting(first) _mm512_add_epi32(set1(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
#define to_uniform(w) _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(0x1p-24f))
#define store(p, v) _mm512_storeu_ps(p, v)
#define zero() _mm512_setzero_si512()
#else
#define WIDTH 8
typedef __m256i lanes;
#define set1(x) _mm256_set1_epi32((int)(x))
#define xor3(a, b, c) _mm256_xor_si256(_mm256_xor_si256(a, b), c)
#define mul_even(a, b) _mm256_mul_epu32(a, b)
#define shift_down(a) _mm256_srli_epi64(a, 32)
#define shift_up(a) _mm256_slli_epi64(a, 32)
#define odd_from(a, b) _mm256_blend_epi32(a, b, 0xAA)
#define counting(first) _mm256_add_epi32(set1(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#define to_uniform(w) _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(0x1p-24f))
#define store(p, v) _mm256_storeu_ps(p, v)
#define zero() _mm256_setzero_si256()
#endif

/* The high and low 32 bits of each lane's product with m, in place of the lane. */
static inline void multiply(lanes a, lanes m, lanes *high, lanes *low) {
    lanes even = mul_even(a, m), odd = mul_even(shift_down(a), m);
    *high = odd_from(shift_down(even), odd);
    *low = odd_from(even, shift_up(odd));
}

/* The four words of counters first .. first + WIDTH - 1. */
static inline void philox(uint32_t first, uint32_t k0, uint32_t k1, lanes words[4]) {
    lanes c0 = counting(first), c1 = zero(), c2 = zero(), c3 = zero();
    lanes m0 = set1(MULTIPLIER0), m1 = set1(MULTIPLIER1);
    for (int round = 0; round < ROUNDS; round++) {
        lanes high0, low0, high1, low1;
        multiply(c0, m0, &high0, &low0);
        multiply(c2, m1, &high1, &low1);
        c0 = xor3(high1, c1, set1(k0));
        c1 = low1;
        c2 = xor3(high0, c3, set1(k1));
        c3 = low0;
        k0 += KEY_INCREMENT0, k1 += KEY_INCREMENT1;
    }
    words[0] = c0, words[1] = c1, words[2] = c2, words[3] = c3;
}
#else
#define WIDTH 1
#endif

/* The four words of counter i, in scalar code: the vectors' tail, and the whole loop without them. */
static inline void philox_scalar(uint32_t i, uint32_t k0, uint32_t k1, uint32_t words[4]) {
    uint32_t c0 = i, c1 = 0, c2 = 0, c3 = 0;
    for (int round = 0; round < ROUNDS; round++) {
        uint64_t product0 = (uint64_t)c0 * MULTIPLIER0, product1 = (uint64_t)c2 * MULTIPLIER1;
        c0 = (uint32_t)(product1 >> 32) ^ c1 ^ k0;
        c1 = (uint32_t)product1;
        c2 = (uint32_t)(product0 >> 32) ^ c3 ^ k1;
        c3 = (uint32_t)product0;
        k0 += KEY_INCREMENT0, k1 += KEY_INCREMENT1;
    }
    words[0] = c0, words[1] = c1, words[2] = c2, words[3] = c3;
}

/* out[numel]: float32 uniforms on the 2^-24 grid of [0, 1). */
void philox_uniform(uint32_t k0, uint32_t k1, float *out, int64_t numel, int threads) {
    int64_t blocks = (numel + 3) / 4, full = 0; /* counters whose 4 words all land, in whole vectors */
#if WIDTH > 1
    if (numel - 3 * blocks > 0) full = (numel - 3 * blocks) / WIDTH * WIDTH; /* word 3 of counter i is 3 blocks + i */
#endif
    #pragma omp parallel num_threads(threads)
    {
#if WIDTH > 1
        #pragma omp for schedule(static)
        for (int64_t first = 0; first < full; first += WIDTH) {
            lanes words[4];
            philox((uint32_t)first, k0, k1, words);
            for (int j = 0; j < 4; j++) store(out + j * blocks + first, to_uniform(words[j]));
        }
#endif
        #pragma omp for schedule(static)
        for (int64_t i = full; i < blocks; i++) {
            uint32_t words[4];
            philox_scalar((uint32_t)i, k0, k1, words);
            for (int j = 0; j < 4; j++)
                if (j * blocks + i < numel) out[j * blocks + i] = (float)(words[j] >> 8) * 0x1p-24f;
        }
    }
}
