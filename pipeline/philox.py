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

Philox4x32-10 is the counter-based generator of Salmon et al., "Parallel random numbers: as easy as
1, 2, 3" (SC 2011), the one cuRAND and JAX use; `philox4x32` reproduces its published known-answer
vectors (tests/pipeline/test_philox.py). Each call keys a fresh stream with 64 bits drawn from
torch's generator, so `torch.manual_seed` still makes a run reproducible.
"""

import math

import torch

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

    `key`: int64 [2] in [0, 2^32). Counter i = (i, 0, 0, 0) yields numbers i, n/4 + i, n/2 + i and
    3n/4 + i: four separate outputs that inductor writes from one loop, one Philox call per four.
    """
    numel = math.prod(shape)
    blocks = -(-numel // 4)
    index = torch.arange(blocks, dtype=torch.int64, device=key.device)  # [n / 4]
    zero = torch.zeros_like(index)
    words = philox4x32([index, zero, zero, zero], [key[0], key[1]])
    uniform = [(word >> 8).to(torch.float32) * 2.0**-24 for word in words]  # the top 24 bits, as torch.rand
    return torch.cat(uniform)[:numel].view(shape)


def uniform(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) of `shape`: Philox tensor ops inside a compiled float32 CPU graph, else torch.rand."""
    if torch.compiler.is_compiling() and device.type == "cpu" and dtype == torch.float32:
        key = torch.randint(0, 2**32, (2,), device=device)  # a fresh stream per call
        return philox_uniform(shape, key)
    return torch.rand(shape, dtype=dtype, device=device)
