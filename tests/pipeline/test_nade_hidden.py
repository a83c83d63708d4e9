"""NADE's hidden logits, their gradients and its sampler by the C kernel (pipeline/nade_hidden.c).

The kernel must give the values and every gradient of V_i . sigmoid(offset + sum_{j<i} h_j A_j) to
float32 rounding in any shape (rows not a multiple of its blocks, hidden widths not a multiple of
its vectors), draw what torch's unit-by-unit loop draws, and be the path that float32 NADE layers
take on a CPU. The references are float64 autograd of the formula itself.
"""

import copy

import pytest
import torch

from pipeline import layers, nade_hidden
from pipeline.estimators import rws_surrogates
from pipeline.layers import NADELayer
from pipeline.models import HelmholtzMachine

from .kernels import VECTOR_WIDTHS, build_for

pytestmark = pytest.mark.skipif(not nade_hidden.have_kernels(), reason="no C compiler for the NADE kernel")

EPS = torch.finfo(torch.float32).eps


def operands(rows: int, size: int, hidden: int, seed: int = 0):
    """h (0/1, about 30% ones), offset, A, V and an output gradient, float32, with weights of scale 1."""
    generator = torch.Generator().manual_seed(seed)
    h = (torch.rand(rows, size, generator=generator) < 0.3).float()
    offset, grad = torch.randn(rows, hidden, generator=generator), torch.randn(rows, size, generator=generator)
    input_weight, output_weight = (torch.randn(size, hidden, generator=generator) / hidden**0.5 for _ in range(2))
    return h, offset, input_weight, output_weight, grad


def reference(h, offset, input_weight, output_weight, grad):
    """The hidden logits and the gradients of (h, offset, A, V), by float64 autograd of the formula."""
    leaves = (t.detach().double().requires_grad_() for t in (h, offset, input_weight, output_weight))
    h, offset, input_weight, output_weight = leaves
    preceding = torch.cumsum(h.unsqueeze(-1) * input_weight, -2) - h.unsqueeze(-1) * input_weight  # sum_{j<i}
    out = (torch.sigmoid(offset.unsqueeze(-2) + preceding) * output_weight).sum(-1)
    out.backward(grad.double())
    return out.detach(), h.grad, offset.grad, input_weight.grad, output_weight.grad


def kernel(h, offset, input_weight, output_weight, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (h, offset, input_weight, output_weight)]
    out = nade_hidden.nade_hidden_logits(*leaves)
    out.backward(grad)
    return (out.detach(), *(leaf.grad for leaf in leaves))


NAMES = ("logits", "grad h", "grad offset", "grad A", "grad V")


def assert_float32_close(got, expected, size: int, hidden: int, rows: int):
    """Each float32 result against float64: a few ulps of its scale, times the square root of the terms
    that add up into it (hidden units per logit, and size units of the running sum; rows for A and V)."""
    for name, g, e in zip(NAMES, got, expected, strict=True):
        terms = size * hidden * (rows if name in ("grad A", "grad V") else 1)
        tolerance = 8 * terms**0.5 * EPS * max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.double(), e, rtol=0, atol=tolerance, msg=name)


@pytest.mark.parametrize(
    ("rows", "size", "hidden"),
    [(37, 29, 37), (8, 1, 16), (3, 200, 5), (130, 300, 40)],
    ids=["odd", "one-unit", "few-rows", "wide"],
)
def test_kernel_matches_float64_values_and_gradients(rows, size, hidden):
    args = operands(rows, size, hidden)
    assert_float32_close(kernel(*args), reference(*args), size, hidden, rows)


def test_tolerance_catches_a_weight_off_by_a_thousandth():
    """The tolerance above is tight enough to see A off by 1e-3 in one entry."""
    h, offset, input_weight, output_weight, grad = operands(37, 29, 37)
    h[:, 3] = 1.0  # unit 3 feeds every later unit of every row
    wrong = input_weight.clone()
    wrong[3, 5] += 1e-3
    got = kernel(h, offset, input_weight, output_weight, grad)
    with pytest.raises(AssertionError):
        assert_float32_close(got, reference(h, offset, wrong, output_weight, grad), 29, 37, 37)


def test_sigmoid_within_a_few_ulps_over_the_float32_range():
    """The kernel's own sigmoid, read off the V gradient of one unit with grad 1: dV_0 = sigmoid(offset)."""
    offset = torch.cat([torch.linspace(-87, 88, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 17.5, -17.5])])
    got = nade_hidden.nade_hidden_logits_backward(
        torch.zeros(1, 1), offset.unsqueeze(0), torch.ones(1, 1), torch.zeros(1, len(offset)), torch.zeros(1, len(offset)), False
    )[3][0]
    exact = torch.sigmoid(offset.double())
    assert ((got.double() - exact).abs() <= 4 * EPS * exact).all(), (got.double() / exact - 1).abs().max()
    below = nade_hidden.nade_hidden_logits_backward(
        torch.zeros(1, 1), torch.tensor([[-88.0, -1e4, float("-inf"), float("inf"), float("nan")]]), torch.ones(1, 1),
        torch.zeros(1, 5), torch.zeros(1, 5), False,
    )[3][0]  # fmt: skip
    assert (below[:3] >= 0).all() and (below[:3] <= 2e-38).all(), below  # the clamp: no logit can tell these apart
    assert below[3] == 1 and below[4].isnan()


@VECTOR_WIDTHS
def test_every_vector_width_matches_float64(march, flag, tmp_path, monkeypatch):
    library = nade_hidden.declare(build_for("nade_hidden", march, flag, tmp_path))
    monkeypatch.setattr(nade_hidden, "_kernels", lambda: library)
    args = operands(37, 29, 37)
    assert_float32_close(kernel(*args), reference(*args), 29, 37, 37)


def test_fractional_h_and_no_h_gradient():
    """The kernel takes any h (the running sum multiplies it), and skips the h gradient when none is wanted."""
    h, offset, input_weight, output_weight, grad = operands(21, 17, 19)
    args = (torch.rand_like(h), offset, input_weight, output_weight, grad)
    assert_float32_close(kernel(*args), reference(*args), 17, 19, 21)
    h = args[0]
    leaves = [offset.clone().requires_grad_(), input_weight.clone().requires_grad_(), output_weight.clone().requires_grad_()]
    nade_hidden.nade_hidden_logits(h, *leaves).backward(grad)
    assert all(leaf.grad is not None for leaf in leaves)


def value_and_grads(layer, value: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`value` detached, and the gradients its sum gives the layer's parameters (from zero)."""
    layer.zero_grad()
    value.sum().backward()
    return value.detach(), [p.grad.clone() for p in layer.parameters()]


def layer_and_cond(seed: int = 0, size: int = 23, cond_size: int = 11, hidden: int = 13):
    torch.manual_seed(seed)
    layer = NADELayer(size, cond_size, hidden_size=hidden)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()  # far from the near-zero initialization, so units depend on each other
    return layer, (torch.rand(5, cond_size) < 0.5).float()


def test_sampler_draws_what_the_torch_loop_draws(monkeypatch):
    layer, cond = layer_and_cond()
    torch.manual_seed(7)
    drawn = layer.sample(cond, (3,))  # [3, 5, 23]: 15 rows, not a multiple of the kernel's blocks
    monkeypatch.setattr(nade_hidden, "kernel_applies", lambda *args: False)
    torch.manual_seed(7)
    expected = layer.sample(cond, (3,))
    assert drawn.shape == (3, 5, 23) and 0.2 < drawn.mean() < 0.8
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def test_samplers_hidden_logits_are_the_forwards_to_the_bit():
    """The sampler's hidden logits, which score its draws in evaluation, equal the forward kernel's for
    the drawn h exactly: both walks take the same operations in the same order."""
    layer, cond = layer_and_cond()
    torch.manual_seed(7)
    with torch.no_grad():
        h, log_prob = layer.sample_with_log_prob(cond, (3,))
        assert nade_hidden.kernel_applies(h, cond, layer.input_weight)
        assert torch.equal(log_prob, layer.log_prob(h, cond))  # the forward kernel's teacher-forced logits


def test_training_log_prob_of_a_draw_skips_the_forward_walk(monkeypatch):
    """With autograd, a draw's log-prob takes the sampler's hidden logits through `nade_hidden_logits_drawn`:
    the value and every gradient of `log_prob`, without a second forward walk."""
    layer, cond = layer_and_cond()
    torch.manual_seed(7)
    h = layer.sample(cond, (3,))
    expected, expected_grads = value_and_grads(layer, layer.log_prob(h, cond))
    monkeypatch.setattr(nade_hidden, "nade_hidden_logits", lambda *args: pytest.fail("a second forward walk"))
    torch.manual_seed(7)
    drawn, log_prob = layer.sample_with_log_prob(cond, (3,))
    value, grads = value_and_grads(layer, log_prob)
    assert torch.equal(drawn, h)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_dispatch_takes_the_kernel_for_float32_on_a_cpu_only(monkeypatch):
    calls = []
    original = nade_hidden.nade_hidden_logits
    monkeypatch.setattr(nade_hidden, "nade_hidden_logits", lambda *args: calls.append(args) or original(*args))
    layer, cond = layer_and_cond()
    h = (torch.rand(4, 5, 23) < 0.5).float()
    layer.log_prob(h, cond)
    assert len(calls) == 1
    layer.double().log_prob(h.double(), cond.double())
    monkeypatch.setattr(nade_hidden, "have_kernels", lambda: False)
    layer.float().log_prob(h, cond)
    assert len(calls) == 1


def test_compiled_log_prob_calls_the_kernel_in_one_graph():
    layer, cond = layer_and_cond()
    h = (torch.rand(4, 5, 23) < 0.5).float()
    compiled = torch.compile(layer.log_prob, dynamic=False, fullgraph=True)  # no graph break at the kernel
    eager_value, eager_grads = value_and_grads(layer, layer.log_prob(h, cond))
    compiled_value, compiled_grads = value_and_grads(layer, compiled(h, cond))
    torch.testing.assert_close(compiled_value, eager_value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_rws_step_matches_the_torch_path(monkeypatch):
    """A whole RWS step of a NADE/NADE model through the kernel and through torch's NADE: the same draws,
    losses and gradients to float32 rounding."""
    torch.manual_seed(0)
    model = HelmholtzMachine([60, 20], p_layer="nade", q_layer="nade", nade_hidden=24)
    x = (torch.rand(16, 60) < 0.3).float()

    def step(m, use_kernel: bool):
        if not use_kernel:
            monkeypatch.setattr(nade_hidden, "kernel_applies", lambda *args: False)
        torch.manual_seed(1)
        s = rws_surrogates(m, x, 5, "wake-sleep")
        (s.p_loss + s.q_loss).backward()
        return s

    kernel_model, torch_model = model, copy.deepcopy(model)
    with_kernel = step(kernel_model, True)
    without = step(torch_model, False)
    torch.testing.assert_close(with_kernel.log_likelihood, without.log_likelihood)
    for (name, p), q in zip(kernel_model.named_parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_path_is_what_layers_take_without_the_kernel(monkeypatch):
    """Without the kernel a float32 layer runs NADEHiddenLogits, and both paths agree."""
    layer, cond = layer_and_cond()
    h = (torch.rand(4, 5, 23) < 0.5).float()
    with_kernel = layer.log_prob(h, cond)
    used = []
    original = layers.NADEHiddenLogits.apply
    monkeypatch.setattr(nade_hidden, "have_kernels", lambda: False)
    monkeypatch.setattr(layers, "_nade_hidden_logits", lambda *args: used.append(args) or original(*args))
    torch.testing.assert_close(layer.log_prob(h, cond), with_kernel, rtol=1e-5, atol=1e-4)
    assert used
