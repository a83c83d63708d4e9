/* DARN's sampler: units drawn in order, each one's logit seeing the units drawn before it.
 *
 * For rows n and units i < D, with later[i][j] = A_ji (what unit i adds to unit j's logit, j > i):
 *
 *     h_ni = [logit_ni > noise_ni],   logit_ni = base_ni + sum_{j<i} h_nj A_ij,
 *
 * noise being logistic, so that h_ni ~ Bernoulli(sigmoid(logit_ni)). torch's loop over units
 * (pipeline/layers.py) pays a dozen tensor ops of Python overhead per unit; here a block of ROWS
 * rows walks the units with its running logits in cache, and later[i] is read once per block. The
 * running logits add h_ni A_ji (exact: h is 0 or 1) in the same order as torch's loop, so both
 * draw the same h from the same noise.
 *
 * Built by pipeline/native.py (-O3 -march=native -fopenmp); tests/pipeline/test_darn_sample.py
 * checks it against the torch loop.
 */
#include <omp.h>

#include "vectors.h"

#define ROWS 8 /* rows walked at once: later[i] is loaded once for all of them */

int darn_block_rows(void) { return ROWS; }

/* h [N, D] from the logits' other terms base [N, D] (overwritten: it ends as the last logits), the
 * noise [N, D] and later [D, D]. N must be a multiple of ROWS (the caller pads). */
void darn_sample(float *base, const float *noise, const float *later, float *h, int64_t N, int D, int threads) {
    int64_t blocks = N / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float *logits = base + b * ROWS * D, *hb = h + b * ROWS * D;
        const float *nb = noise + b * ROWS * D;
        for (int i = 0; i < D; i++) {
            int drawn[ROWS], any = 0;
            for (int r = 0; r < ROWS; r++) {
                drawn[r] = logits[r * D + i] > nb[r * D + i];
                hb[r * D + i] = (float)drawn[r];
                any |= drawn[r];
            }
            if (!any) continue;
            const float *row = later + (int64_t)i * D;
            int c = i + 1;
            for (; c + LANES <= D; c += LANES) {
                vec add = load(row + c);
                for (int r = 0; r < ROWS; r++)
                    if (drawn[r]) store(logits + r * D + c, load(logits + r * D + c) + add);
            }
            if (c < D) {
                vec add = load_part(row + c, D - c);
                for (int r = 0; r < ROWS; r++)
                    if (drawn[r]) store_part(logits + r * D + c, D - c, load_part(logits + r * D + c, D - c) + add);
            }
        }
    }
}
