"""DARN's sampler by the C kernel (pipeline/darn_sample.c): the torch loop's draws, from the same noise.

The kernel adds the same terms to the running logits in the same order as `DARNLayer`'s loop over
units, so both must draw exactly the same units; the loop's distribution is checked by exact
enumeration in test_layers.py.
"""

import pytest
import torch

from pipeline import darn_sample
from pipeline.layers import DARNLayer

from .kernels import VECTOR_WIDTHS, build_for

pytestmark = pytest.mark.skipif(darn_sample._kernel() is None, reason="no C compiler for the DARN kernel")


def layer_and_cond(size: int, cond_size: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = DARNLayer(size, cond_size)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()  # autoregressive weights far from zero, so units depend on each other
    cond = (torch.rand(5, cond_size) < 0.5).float() if cond_size else None
    return layer, cond


def draws(layer, cond, use_kernel: bool, monkeypatch, sample_shape=(3,)):
    with monkeypatch.context() as patch:
        if not use_kernel:
            patch.setattr(darn_sample, "kernel_applies", lambda *args: False)
        torch.manual_seed(7)
        return layer.sample(cond, sample_shape)


@pytest.mark.parametrize(("size", "cond_size"), [(37, 11), (1, 4), (200, 0), (784, 20)], ids=["odd", "one-unit", "prior", "wide"])
def test_kernel_draws_what_the_torch_loop_draws(size, cond_size, monkeypatch):
    layer, cond = layer_and_cond(size, cond_size)
    calls = []
    original = darn_sample.darn_sample
    monkeypatch.setattr(darn_sample, "darn_sample", lambda *args: calls.append(args) or original(*args))
    drawn = draws(layer, cond, True, monkeypatch)
    expected = draws(layer, cond, False, monkeypatch)
    assert len(calls) == 1, "the kernel did not draw"
    assert drawn.shape == expected.shape and (size == 1 or 0.1 < drawn.mean() < 0.9)  # both values drawn
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def test_kernel_returns_the_drawn_units_logits():
    """The running logits the walk ends with are each unit's logit given the units drawn before it:
    the teacher-forced logits of the draw, which score it in evaluation."""
    layer, cond = layer_and_cond(37, 11)
    base = layer.cond_logits(cond).detach().expand(3, 5, 37).reshape(-1, 37)
    noise = torch.logit(torch.rand(15, 37))
    h, logits = darn_sample.darn_sample(base, noise, layer.autoregressive_weight)
    assert 0.1 < h.mean() < 0.9
    torch.testing.assert_close(logits, layer.logits(h, cond.repeat(3, 1), base).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(h, (logits > noise).float())


def test_units_depend_on_the_units_drawn_before():
    """A unit whose logit is -1e4 unless unit 0 is on (A_10 = 2e4) copies unit 0: the running logits update."""
    layer = DARNLayer(2, 0)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, -1e4]))
        layer.autoregressive_weight.zero_()[1, 0] = 2e4
    h = layer.sample(None, (4000,))
    assert darn_sample.kernel_applies(h, layer.autoregressive_weight)
    assert torch.equal(h[:, 0], h[:, 1]) and 0.4 < h[:, 0].mean() < 0.6


def test_float64_takes_the_torch_loop(monkeypatch):
    layer, cond = layer_and_cond(37, 11)
    monkeypatch.setattr(darn_sample, "darn_sample", lambda *args: pytest.fail("the kernel ran for float64"))
    assert layer.double().sample(cond.double(), (3,)).dtype == torch.float64


@VECTOR_WIDTHS
def test_every_vector_width_draws_the_same(march, flag, tmp_path, monkeypatch):
    library = darn_sample.declare(build_for("darn_sample", march, flag, tmp_path))
    layer, cond = layer_and_cond(37, 11)
    expected = draws(layer, cond, False, monkeypatch)
    monkeypatch.setattr(darn_sample, "_kernel", lambda: library)
    torch.testing.assert_close(draws(layer, cond, True, monkeypatch), expected, rtol=0, atol=0)
