"""DARN's sampler on a CPU, by a C kernel (pipeline/darn_sample.c).

DARN draws its units in order: h_i = [b_i + W_i . cond + A_i,<i . h_<i > logistic noise_i]. torch's
loop over units (`DARNLayer._sample` in pipeline/layers.py) costs a dozen tensor ops of Python
overhead per unit, 784 units for P's bottom layer. The kernel walks the units with the running
logits in cache and adds the same terms in the same order, so it draws the same h from the same
noise. It runs for float32 on a CPU when pipeline/native.py can build it; everything else takes
the torch loop.
"""

import ctypes
import functools

import torch

from pipeline.native import load_library, padded


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """pipeline/darn_sample.c, built for this machine (pipeline/native.py), or None."""
    library = load_library("darn_sample")
    return None if library is None else declare(library)


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give a build of darn_sample.c its function's argument types."""
    library.darn_sample.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    library.darn_sample.restype = None
    return library


def kernel_applies(base: torch.Tensor, autoregressive_weight: torch.Tensor) -> bool:
    """Whether `darn_sample` takes these operands: float32 on a CPU, and the kernel built."""
    return base.device.type == "cpu" and base.dtype == autoregressive_weight.dtype == torch.float32 and _kernel() is not None


def darn_sample(
    base: torch.Tensor, noise: torch.Tensor, autoregressive_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, size] drawn unit by unit from the logits' other terms `base` [N, size], logistic `noise`
    [N, size] and A [size, size] (strictly lower-triangular part used), and the drawn units' logits
    base_i + sum_{j<i} h_j A_ij [N, size], which the walk ends with."""
    (n, size), block = base.shape, _kernel().darn_block_rows()
    rows = -(-n // block) * block
    logits, noise = padded(base, rows, size), padded(noise, rows, size)  # the kernel writes the running logits
    later = autoregressive_weight.detach().t().contiguous()  # row i: what unit i adds to each later unit
    h = base.new_empty(rows, size)
    pointers = (t.data_ptr() for t in (logits, noise, later, h))
    _kernel().darn_sample(*pointers, rows, size, torch.get_num_threads())
    return h[:n], logits[:n]
