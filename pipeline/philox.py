"""Uniform random numbers for the samplers: Philox4x32-10 written in tensor ops for compiled CPU steps.

Why: under torch.compile on a CPU, inductor draws each random number with its own scalar Philox
call and keeps one of its four outputs (5.6 ns per Bernoulli draw here), which made the draws of
Q's K samples a quarter of the compiled K=50 training step. The same generator written as int64
tensor ops compiles into one vectorized loop that keeps all four outputs (0.8 ns per draw;
`python benchmarks/rng.py`). The words live in int32 lanes and each 32 x 32-bit product is taken
from four 16 x 16-bit ones: AVX2 has no 64-bit vector multiply, and ATen multiplies int64 lanes
one by one there, which made the draws cost 4.1 ns (benchmarks/RESULTS.md). Eager steps keep `torch.rand`: there
these ops would be dozens of passes over memory, and CUDA's generator is Philox already.
Caveat: inductor keeps the four words in one loop only when it fuses them horizontally, which
depends on the surrounding graph. An experimental log-prob function once ran 1.6x slower, which was
put down to inlined words; a column-major data batch (since fixed in pipeline/data.py) also made that
graph read x transposed. benchmarks/throughput.py is the check.

Philox4x32-10 is the counter-based generator of Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011), the one cuRAND and JAX use; `philox4x32` reproduces its published known-answer
vectors (tests/pipeline/test_philox.py). Each call keys a fresh stream with 64 bits drawn from
torch's generator, so `torch.manual_seed` still makes a run reproducible.
"""

import math

import torch

_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)  # Weyl sequence of the key, one step per round
_LOW16 = 0xFFFF
_ROUNDS = 10


def as_word(value: torch.Tensor | int) -> torch.Tensor | int:
    """The int32 that holds the 32 bits of `value` in [0, 2^32) (two's complement: 0xFFFFFFFF is -1)."""
    return ((value + 2**31) & 0xFFFFFFFF) - 2**31


def _multiply(word: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product word x multiplier, for int32 words.

    From the 16-bit halves: the four partial products fit 32 bits. int32 arithmetic wraps modulo
    2^32, as unsigned 32-bit arithmetic does; its right shift copies the sign bit, hence the masks.
    """
    word_high, word_low = (word >> 16) & _LOW16, word & _LOW16
    low_low, high_high = word_low * (multiplier & _LOW16), word_high * (multiplier >> 16)
    cross_a, cross_b = word_low * (multiplier >> 16), word_high * (multiplier & _LOW16)
    middle = ((low_low >> 16) & _LOW16) + (cross_a & _LOW16) + (cross_b & _LOW16)  # bits 16.. of the product, < 3 x 2^16
    high = high_high + ((cross_a >> 16) & _LOW16) + ((cross_b >> 16) & _LOW16) + (middle >> 16)
    return high, word * as_word(multiplier)  # the low word is the wrapped product


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Philox4x32-10 bijection of 4 x 32-bit counter words under a 2 x 32-bit key.

    Counter words are int32 tensors holding the 32 bits (`as_word`); key words are int64 in
    [0, 2^32). Returns 4 int32 words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_ROUNDS):
        high0, low0 = _multiply(c0, _MULTIPLIERS[0])
        high1, low1 = _multiply(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = high1 ^ c1 ^ as_word(k0).to(torch.int32), low1, high0 ^ c3 ^ as_word(k1).to(torch.int32), low0
        k0, k1 = (k0 + _KEY_INCREMENTS[0]) & 0xFFFFFFFF, (k1 + _KEY_INCREMENTS[1]) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


def philox_uniform(shape: tuple[int, ...], key: torch.Tensor) -> torch.Tensor:
    """float32 uniforms on the 2^-24 grid of [0, 1), as torch.rand draws them: tensor of `shape`.

    `key`: int64 [2] in [0, 2^32). Counter i = (i, 0, 0, 0) yields numbers i, n/4 + i, n/2 + i and
    3n/4 + i: four separate outputs that inductor writes from one loop, one Philox call per four.
    """
    numel = math.prod(shape)
    blocks = -(-numel // 4)
    index = torch.arange(blocks, dtype=torch.int32, device=key.device)  # [n / 4]
    zero = torch.zeros_like(index)
    words = philox4x32([index, zero, zero, zero], [key[0], key[1]])
    uniform = [((word >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24 for word in words]  # the top 24 bits, as torch.rand
    return torch.cat(uniform)[:numel].view(shape)


def uniform(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) of `shape`: Philox tensor ops inside a compiled float32 CPU graph, else torch.rand."""
    if torch.compiler.is_compiling() and device.type == "cpu" and dtype == torch.float32:
        key = torch.randint(0, 2**32, (2,), device=device)  # a fresh stream per call
        return philox_uniform(shape, key)
    return torch.rand(shape, dtype=dtype, device=device)
