/* Scratch memory that a thread keeps from one kernel call to the next.
 *
 * Why: the kernels' buffers are hundreds of KB to a few MB (AMX: the weight's three bfloat16 parts and
 * the threads' sums of a weight gradient). Allocated and freed per call, glibc serves blocks that
 * large with fresh pages from the kernel, which fault in and are zeroed on first touch: at K = 50 a
 * compiled SBN training step took ~770 page faults and about 1 ms of them (benchmarks/RESULTS.md).
 * A thread's buffer in each slot grows to the largest size asked of it and is never freed (a few MB
 * a thread at most; OpenMP's threads persist). Its contents are whatever the last call left.
 */
#ifndef RWS_SCRATCH_H
#define RWS_SCRATCH_H

#include <stddef.h>
#include <stdlib.h>

#define SCRATCH_SLOTS 4

/* A 64-byte aligned buffer of at least `bytes` for this thread's slot `slot`, or NULL if memory ran out. */
static void *scratch(int slot, size_t bytes) {
    static _Thread_local void *buffers[SCRATCH_SLOTS];
    static _Thread_local size_t sizes[SCRATCH_SLOTS];
    if (sizes[slot] < bytes) {
        free(buffers[slot]);
        size_t rounded = (bytes + 63) / 64 * 64;
        buffers[slot] = aligned_alloc(64, rounded);
        sizes[slot] = buffers[slot] ? rounded : 0;
    }
    return buffers[slot];
}

#endif
