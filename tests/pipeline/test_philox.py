"""The Philox uniforms that compiled CPU steps draw their Bernoulli samples from."""

import math

import pytest
import torch

from pipeline import philox
from pipeline.layers import _bernoulli
from pipeline.philox import philox4x32, philox_uniform, tensor_philox_uniform
from .kernels import VECTOR_WIDTHS, build_for

needs_kernel = pytest.mark.skipif(not philox._have_kernel(), reason="no C compiler for pipeline/philox.c")


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's known-answer vectors for philox4x32_10 (kat_vectors)
        ([0, 0, 0, 0], [0, 0], "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0], "d16cfe09 94fdcceb 5001e420 24126ea1"),
    ],
)
def test_philox_matches_the_published_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor([c]) for c in counter], [torch.tensor(k) for k in key])
    assert " ".join(f"{int(word):08x}" for word in words) == expected


def test_uniforms_are_on_the_float32_grid_and_uniform():
    shape = (3, 1001, 333)  # numel not a multiple of 4: the last block is cut
    u = philox_uniform(shape, torch.tensor([12345, 678]))
    assert u.shape == shape and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # 24-bit grid, as torch.rand
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi_square = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi_square < 63 + 6 * math.sqrt(2 * 63)  # 63 degrees of freedom, a 6-sigma bound
    flat = u.flatten()[: n // 4 * 4].view(4, -1)  # the four words of one block sit n/4 apart
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        correlation = torch.corrcoef(flat[[a, b]])[0, 1].item()
        assert abs(correlation) < 6 / math.sqrt(flat.shape[1])


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("implementation", [philox_uniform, tensor_philox_uniform], ids=["kernel-where-built", "tensor-ops"])
def test_uniforms_are_the_top_24_bits_of_the_published_generator(implementation, compiled):
    # Checked against Python's exact integers, eager and compiled, for keys whose words use all 32
    # bits: an int32 version of the words' products, compiled, went wrong for a first key word of
    # 0xFFFFFFFF (its scalar C++ code overflowed signed ints, which the compiler may assume never happens).
    draw = torch.compile(implementation, dynamic=False) if compiled else implementation
    for key in ([0, 0], [0xFFFFFFFF, 0], [0x75BCD15, 0xEE6B2800], [0xA4093822, 0xFFFFFFFE]):
        u = draw((4 * 1003,), torch.tensor(key))  # 1003 blocks: the vector loop and its tail
        for i in (0, 1, 7, 8, 500, 1001, 1002):
            words = _reference_philox([i, 0, 0, 0], key)
            assert [u[j * 1003 + i].item() for j in range(4)] == [(word >> 8) * 2.0**-24 for word in words], (key, i)


def _reference_philox(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 on Python integers (Salmon et al. 2011), the oracle for the tensor version."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


KEYS = ([0, 0], [0xFFFFFFFF, 0], [0x75BCD15, 0xEE6B2800], [0xA4093822, 0xFFFFFFFE])
SIZES = (1, 3, 4, 5, 7, 8, 63, 64, 65, 127, 128, 129, 1001, 4012, 100_003)  # every tail of 4 words and of the vectors


def assert_gives_the_tensor_ops_numbers(draw):
    """draw(key, size): `size` uniforms [size] under `key` [2], which must be the tensor ops' to the bit."""
    for key in KEYS:
        for size in SIZES:
            assert torch.equal(draw(torch.tensor(key), size), tensor_philox_uniform((size,), torch.tensor(key))), (key, size)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_gives_the_tensor_ops_numbers_bit_for_bit(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_gives_the_tensor_ops_numbers(philox._kernel_philox_uniform)
    finally:
        torch.set_num_threads(previous)


@VECTOR_WIDTHS
def test_every_vector_width_of_the_kernel_gives_the_tensor_ops_numbers(march, flag, tmp_path):
    """512-bit, 256-bit (AVX2) and scalar code (an x86-64 build without AVX2) are separate paths in philox.c."""
    kernel = philox.declare(build_for("philox", march, flag, tmp_path))

    def draw(key, size):
        out = torch.empty(size)
        kernel.philox_uniform(*key.tolist(), out.data_ptr(), size, 2)
        return out

    assert_gives_the_tensor_ops_numbers(draw)


@needs_kernel
def test_compiled_draws_run_the_kernel(monkeypatch):
    calls, kernel = [], philox._kernel
    monkeypatch.setattr(philox, "_kernel", lambda: calls.append(1) or kernel())
    torch.compile(lambda logits: _bernoulli(logits, (50,)), dynamic=False)(torch.zeros(100))
    assert calls, "the compiled draw did not call pipeline/philox.c"


def test_keys_give_independent_streams():
    a = philox_uniform((10_000,), torch.tensor([1, 0]))
    b = philox_uniform((10_000,), torch.tensor([2, 0]))
    assert torch.equal(a, philox_uniform((10_000,), torch.tensor([1, 0])))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(10_000)


def test_compiled_cpu_draws_use_philox_and_follow_the_probabilities(monkeypatch):
    """Inside torch.compile the draws come from Philox keyed by torch's generator: seeded runs repeat,
    successive calls differ, and the frequencies match sigmoid(logits). Eager draws use torch.rand."""
    traced_shapes = []

    def recording_philox_uniform(shape, key):
        traced_shapes.append(tuple(shape))
        return philox_uniform(shape, key)

    monkeypatch.setattr(philox, "philox_uniform", recording_philox_uniform)
    logits = torch.linspace(-4, 4, 9)
    _bernoulli(logits, (3,))
    assert traced_shapes == []
    draw = torch.compile(lambda logits: _bernoulli(logits, (20_000,)), dynamic=False)
    torch.manual_seed(0)
    first, second = draw(logits), draw(logits)
    torch.manual_seed(0)
    assert torch.equal(draw(logits), first)
    assert not torch.equal(first, second)
    assert traced_shapes and set(traced_shapes) == {(20_000, 9)}
    probs = torch.sigmoid(logits)
    for sample in (first, second):
        assert set(sample.unique().tolist()) <= {0.0, 1.0}
        stderr = (probs * (1 - probs) / sample.shape[0]).sqrt()
        assert ((sample.mean(0) - probs).abs() <= 5 * stderr).all()
