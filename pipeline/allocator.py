"""Keep freed memory in the process heap (glibc), so that each training step does not page-fault anew.

Why: a CPU training step allocates and frees tens of MB of temporaries ([K, B, 784] logits and
their gradients are 16 MB each at K = 50, B = 100). glibc gives memory back to the kernel once the
free top of the heap exceeds its trim threshold (by default twice a threshold that adapts to the
largest freed block), so the next step touches fresh pages, which the kernel faults in and zeroes.
A compiled SBN 784-200-200-10 step at K = 50 took 2,400-3,400 page faults; with the settings below,
33-88, and ran 1.07-1.23x faster, at the same peak memory (benchmarks/RESULTS.md, "Allocator").

`rws fit`/`validate`/`test` (every rank) and `rws eval` call `retain_freed_memory()`; set
RWS_KEEP_FREED_MEMORY=0 to leave the allocator as it is. Other C libraries: nothing to do.
"""

import ctypes
import os
import platform

# mallopt(3) parameters and the values set: memory at the top of the heap is kept up to the trim
# threshold, the heap grows in steps of the top pad, and blocks above the mmap threshold (its
# maximum on 64-bit glibc) come from mmap and go back to the kernel when freed.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_TRIM_THRESHOLD, 256 << 20), (_M_TOP_PAD, 64 << 20), (_M_MMAP_THRESHOLD, 32 << 20))


def retain_freed_memory() -> bool:
    """Apply the settings above to this process's glibc malloc; True if they took effect.

    False on other C libraries, or when RWS_KEEP_FREED_MEMORY=0."""
    if os.environ.get("RWS_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
