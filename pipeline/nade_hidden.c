/* NADE's hidden logits, their gradients and its sampler, one unit after another with the activations in cache.
 *
 * For rows n (N = K x B samples), units i < D and hidden units of width H:
 *
 *     a_ni = offset_n + sum_{j<i} h_nj A_j            (NADE's running sum)            [H]
 *     out_ni = V_i . sigmoid(a_ni)                                                     [N, D]
 *
 * torch computes this as [N, D, H] tensors a dozen elementwise passes long (pipeline/layers.py).
 * Here a block of ROWS rows walks the units in order: a_n stays in L1 and is updated in place, so
 * each (n, i) costs one vector sigmoid and two multiply-adds per LANES hidden units, and A_i, V_i
 * are read once per block.
 *
 * The backward takes the same walk. With the unit's pre-activation gradient
 * d_ni = g_ni V_i * s (1 - s), s = sigmoid(a_ni), and its running sum prefix_ni = sum_{k<=i} d_nk
 * (total_n = prefix_n,D-1), the gradients are
 *
 *     dV_i = sum_n g_ni s_ni        d offset_n = total_n
 *     dA_j = sum_n h_nj (total_n - prefix_nj)        dh_nj = A_j . (total_n - prefix_nj)
 *
 * so one forward walk accumulates -sum_n h_nj prefix_nj and -A_j . prefix_nj, and the caller adds
 * the total_n terms as two matmuls (h^T total, total A^T). torch's version subtracts the same
 * cumulative sum from the same total, row by row (pipeline/layers.py); the tests bound both
 * against float64.
 *
 * Shapes are the caller's to pad: N a multiple of ROWS and H a multiple of 16 (any LANES); padded
 * rows and hidden units must have zero h, g, A and V. Built by pipeline/native.py (-O3
 * -march=native -fopenmp); tests/pipeline/test_nade_hidden.py checks it against float64.
 */
#include <omp.h>

#include "vectors.h"

#define ROWS 8 /* rows walked at once: A_i and V_i are loaded once for all of them */

int nade_block_rows(void) { return ROWS; }

/* sigmoid(a) within a few float32 ulps: e = exp(-|a|) (vectors.h), then 1 / (1 + e) for a >= 0 and
 * e / (1 + e) below, so that neither side cancels. Below -87, e is 0: sigmoid(a) is then 0 where
 * the exact value is under 1.6e-38, which no logit can tell apart. NaN stays NaN. A division, not
 * bernoulli.h's reciprocal estimate: these walks are bound by their multiply-adds, and the estimate's
 * Newton step adds two, which made them 2-4% slower (AVX-512 Xeon, 2026-12-05). */
static inline vec sigmoid(vec a) {
    vec e = exp_nonpositive(-as_floats(as_bits(a) & 0x7fffffff)), upper = 1.f / (1.f + e);
    return pick(a < 0.f, e * upper, upper);
}

/* out [N, D] for a_0 = offset [N, H], which is overwritten (it ends as a_D). */
void nade_hidden_logits(const float *h, float *offset, const float *A, const float *V, float *out, int64_t N, int D,
                        int H, int threads) {
    int64_t blocks = N / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float *act = offset + b * ROWS * H;
        const float *hb = h + b * ROWS * D;
        for (int i = 0; i < D; i++) {
            const float *A_i = A + (int64_t)i * H, *V_i = V + (int64_t)i * H;
            float unit[ROWS];
            vec dot[ROWS];
            for (int r = 0; r < ROWS; r++) unit[r] = hb[r * D + i], dot[r] = splat(0.f);
            for (int c = 0; c < H; c += LANES) {
                vec A_c = load(A_i + c), V_c = load(V_i + c);
                for (int r = 0; r < ROWS; r++) {
                    vec a = load(act + r * H + c);
                    dot[r] += V_c * sigmoid(a);
                    store(act + r * H + c, a + unit[r] * A_c);
                }
            }
            for (int r = 0; r < ROWS; r++) out[(b * ROWS + r) * D + i] = horizontal_sum(dot[r]);
        }
    }
}

/* Draws h [N, D] with h_ni = [V_i . sigmoid(a_ni) > threshold_ni], unit after unit, where a_ni sums the
 * h_nj A_j drawn before (NADE's sampler; threshold = logistic noise - the unit's other logit terms),
 * and writes the drawn units' hidden logits V_i . sigmoid(a_ni) [N, D]: the same operations in the same
 * order as nade_hidden_logits, so the same values. a_0 = offset [N, H] is overwritten. */
void nade_sample(const float *threshold, float *offset, const float *A, const float *V, float *h, float *hidden,
                 int64_t N, int D, int H, int threads) {
    int64_t blocks = N / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float *act = offset + b * ROWS * H, *hb = h + b * ROWS * D, *lb = hidden + b * ROWS * D;
        const float *tb = threshold + b * ROWS * D;
        for (int i = 0; i < D; i++) {
            const float *A_i = A + (int64_t)i * H, *V_i = V + (int64_t)i * H;
            vec dot[ROWS];
            float unit[ROWS];
            for (int r = 0; r < ROWS; r++) dot[r] = splat(0.f);
            for (int c = 0; c < H; c += LANES) {
                vec V_c = load(V_i + c);
                for (int r = 0; r < ROWS; r++) dot[r] += V_c * sigmoid(load(act + r * H + c));
            }
            for (int r = 0; r < ROWS; r++) hb[r * D + i] = unit[r] = (lb[r * D + i] = horizontal_sum(dot[r])) > tb[r * D + i];
            for (int c = 0; c < H; c += LANES) {
                vec A_c = load(A_i + c);
                for (int r = 0; r < ROWS; r++) store(act + r * H + c, load(act + r * H + c) + unit[r] * A_c);
            }
        }
    }
}

/* One block of ROWS rows of the backward (see the top of the file). `with_grad_h` is a constant at
 * each call, so the compiler drops the dh work where it is not wanted. */
static inline void backward_block(const float *hb, float *act, const float *gb, const float *A, const float *V,
                                  float *prefix, float *dA, float *dV, float *dh, int D, int H, const int with_grad_h) {
    for (int i = 0; i < D; i++) {
        const float *A_i = A + (int64_t)i * H, *V_i = V + (int64_t)i * H;
        float *dA_i = dA + (int64_t)i * H, *dV_i = dV + (int64_t)i * H;
        float unit[ROWS], grad[ROWS];
        vec dot[ROWS];
        for (int r = 0; r < ROWS; r++) unit[r] = hb[r * D + i], grad[r] = gb[r * D + i], dot[r] = splat(0.f);
        for (int c = 0; c < H; c += LANES) {
            vec A_c = load(A_i + c), V_c = load(V_i + c), dA_c = splat(0.f), dV_c = splat(0.f);
            for (int r = 0; r < ROWS; r++) {
                vec a = load(act + r * H + c), s = sigmoid(a);
                dV_c += grad[r] * s;
                vec p = load(prefix + r * H + c) + grad[r] * V_c * (s * (1.f - s));
                store(prefix + r * H + c, p);
                dA_c -= unit[r] * p;
                if (with_grad_h) dot[r] += A_c * p;
                store(act + r * H + c, a + unit[r] * A_c);
            }
            store(dA_i + c, load(dA_i + c) + dA_c);
            store(dV_i + c, load(dV_i + c) + dV_c);
        }
        if (with_grad_h)
            for (int r = 0; r < ROWS; r++) dh[r * D + i] = -horizontal_sum(dot[r]);
    }
}

/* Backward of nade_hidden_logits for the output's gradient g [N, D]. offset [N, H] is overwritten;
 * prefix [N, H] must be zeros and ends as total. dA and dV are [threads, D, H] zeros: each thread
 * adds -sum_n h_nj prefix_nj and sum_n g_nj s_nj of its rows into its own slab (the caller sums
 * them). dh [N, D] gets -A_j . prefix_nj, or is NULL. */
void nade_hidden_logits_backward(const float *h, float *offset, const float *g, const float *A, const float *V,
                                 float *prefix, float *dA, float *dV, float *dh, int64_t N, int D, int H, int threads) {
    int64_t blocks = N / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        int me = omp_get_thread_num(), team = omp_get_num_threads();
        float *my_dA = dA + (int64_t)me * D * H, *my_dV = dV + (int64_t)me * D * H;
        for (int64_t b = blocks * me / team; b < blocks * (me + 1) / team; b++) {
            int64_t row = b * ROWS;
            if (dh)
                backward_block(h + row * D, offset + row * H, g + row * D, A, V, prefix + row * H, my_dA, my_dV,
                               dh + row * D, D, H, 1);
            else
                backward_block(h + row * D, offset + row * H, g + row * D, A, V, prefix + row * H, my_dA, my_dV,
                               NULL, D, H, 0);
        }
    }
}
