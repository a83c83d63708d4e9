/* The vector type shared by the C kernels beside this file (pipeline/native.py builds them).
 *
 * LANES: floats per vector, as wide as the target's registers (AVX-512, AVX, else 128 bits: SSE or
 * NEON). A vector wider than the registers takes two registers per value, and GCC spills them:
 * with 16 lanes on AVX2, lookup_linear.c ran 2-3x slower than MKL, with 8 lanes 1.7-1.9x faster
 * (benchmarks/RESULTS.md). GCC's vector extensions keep the kernels free of per-ISA intrinsics. */
#ifndef RWS_VECTORS_H
#define RWS_VECTORS_H

#include <stdint.h>
#include <string.h>

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

/* Loads (stores) the first `count` <= LANES floats of a vector through a zero-padded buffer. */
static inline vec load_part(const float *p, int count) {
    if (count == LANES) return load(p);
    float buf[LANES] = {0};
    memcpy(buf, p, count * sizeof(float));
    return load(buf);
}
static inline void store_part(float *p, int count, vec v) {
    if (count == LANES) return store(p, v);
    float buf[LANES];
    store(buf, v);
    memcpy(p, buf, count * sizeof(float));
}

#endif
