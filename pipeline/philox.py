"""Uniform random numbers for the samplers: Philox4x32-10 written in tensor ops for compiled CPU steps.

Why: under torch.compile on a CPU, inductor draws each random number with its own scalar Philox
call and keeps one of its four outputs (5.6 ns per Bernoulli draw here), which made the draws of
Q's K samples a quarter of the compiled K=50 training step. The same generator written as int64
tensor ops compiles into one vectorized loop that keeps all four outputs (0.8 ns per draw;
`python benchmarks/rng.py`). On an AVX2 CPU the int64 multiplies run lane by lane, as ATen's AVX2
vectors have no 64-bit multiply: 4.1 ns against inductor's 8.9 there. Eager steps keep `torch.rand`: there
these ops would be dozens of passes over memory, and CUDA's generator is Philox already.
Caveat: inductor keeps the four words in one loop only when it fuses them horizontally, which
depends on the surrounding graph. An experimental log-prob function once ran 1.6x slower, which was
put down to inlined words; a column-major data batch (since fixed in pipeline/data.py) also made that
graph read x transposed. benchmarks/throughput.py is the check.

Where pipeline/native.py can build it, a C kernel (pipeline/philox.c) computes the same numbers,
bit for bit, as an op inside the compiled graph: its rounds use the vectors' 32 x 32 -> 64-bit
multiply, which AVX2 has too (`python benchmarks/rng.py` times both).

Philox4x32-10 is the counter-based generator of Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011), the one cuRAND and JAX use; `philox4x32` reproduces its published known-answer
vectors (tests/pipeline/test_philox.py). Each call keys a fresh stream with 64 bits drawn from
torch's generator, so `torch.manual_seed` still makes a run reproducible.
"""

import ctypes
import functools
import hashlib
import math
from pathlib import Path

import torch

from pipeline.native import load_library

# Hashed like pipeline/sample_linear.py's ops: torch.compile's cache keys graphs by the ops' names.
_OPS = "rws_" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)  # Weyl sequence of the key, one step per round
_LOW32 = 0xFFFFFFFF
_ROUNDS = 10


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Philox4x32-10 bijection of 4 x 32-bit counter words under a 2 x 32-bit key.

    Words are int64 tensors holding values in [0, 2^32) (torch has no uint32 arithmetic); a 32 x 32
    bit product fits int64 up to wrap-around, which keeps its low 64 bits exact. Returns 4 words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_ROUNDS):
        product0, product1 = c0 * _MULTIPLIERS[0], c2 * _MULTIPLIERS[1]
        c0, c1, c2, c3 = (
            ((product1 >> 32) & _LOW32) ^ c1 ^ k0,
            product1 & _LOW32,
            ((product0 >> 32) & _LOW32) ^ c3 ^ k1,
            product0 & _LOW32,
        )
        k0, k1 = (k0 + _KEY_INCREMENTS[0]) & _LOW32, (k1 + _KEY_INCREMENTS[1]) & _LOW32
    return [c0, c1, c2, c3]


def philox_uniform(shape: tuple[int, ...], key: torch.Tensor) -> torch.Tensor:
    """float32 uniforms on the 2^-24 grid of [0, 1), as torch.rand draws them: tensor of `shape`.

    `key`: int64 [2] in [0, 2^32). By the C kernel for a key on a CPU where it builds, else by
    `tensor_philox_uniform`: the same numbers either way."""
    if key.device.type == "cpu" and _have_kernel():
        return _kernel_philox_uniform(key, math.prod(shape)).view(shape)
    return tensor_philox_uniform(shape, key)


def tensor_philox_uniform(shape: tuple[int, ...], key: torch.Tensor) -> torch.Tensor:
    """`philox_uniform` in tensor ops. Counter i = (i, 0, 0, 0) yields numbers i, n/4 + i, n/2 + i
    and 3n/4 + i (n = numel rounded up to 4): four separate outputs that inductor writes from one
    loop, one Philox call per four."""
    numel = math.prod(shape)
    blocks = -(-numel // 4)
    index = torch.arange(blocks, dtype=torch.int64, device=key.device)  # [n / 4]
    zero = torch.zeros_like(index)
    words = philox4x32([index, zero, zero, zero], [key[0], key[1]])
    uniform = [(word >> 8).to(torch.float32) * 2.0**-24 for word in words]  # the top 24 bits, as torch.rand
    return torch.cat(uniform)[:numel].view(shape)


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """pipeline/philox.c, built for this machine (pipeline/native.py), or None."""
    library = load_library("philox")
    return None if library is None else declare(library)


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give a build of philox.c its function's argument types."""
    library.philox_uniform.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    library.philox_uniform.restype = None
    return library


@torch.compiler.assume_constant_result
def _have_kernel() -> bool:
    """Whether `_kernel` loads: a constant to torch.compile, which would otherwise break the graph at the ctypes call."""
    return _kernel() is not None


@torch.library.custom_op(f"{_OPS}::philox_uniform", mutates_args=())
def _kernel_philox_uniform(key: torch.Tensor, numel: int) -> torch.Tensor:
    """`numel` uniforms [numel] by pipeline/philox.c."""
    out = torch.empty(numel, dtype=torch.float32)
    k0, k1 = key.tolist()
    _kernel().philox_uniform(k0, k1, out.data_ptr(), numel, torch.get_num_threads())
    return out


@_kernel_philox_uniform.register_fake
def _(key, numel):
    return key.new_empty(numel, dtype=torch.float32)


def uniform(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) of `shape`: Philox (`philox_uniform`) inside a compiled float32 CPU graph, else torch.rand."""
    if torch.compiler.is_compiling() and device.type == "cpu" and dtype == torch.float32:
        key = torch.randint(0, 2**32, (2,), device=device)  # a fresh stream per call
        return philox_uniform(shape, key)
    return torch.rand(shape, dtype=dtype, device=device)
