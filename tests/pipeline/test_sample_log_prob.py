"""`sample_log_prob`: an SBN layer's log-prob log p(values | samples) with its product, one kernel
that takes the softplus from the logits while they are in cache and the logits' gradient as it reads
them (pipeline/amx_linear.c, pipeline/lookup_linear.c, pipeline/bernoulli.h).

It must give the float64 log-prob and gradients to float32 rounding for logits small and large, be
the path that SBN layers take on a CPU, hand samples that are not 0/1 to the separate ops, and keep
NaN visible. Every test runs under each kernel file this CPU runs (AMX tiles, table lookups).
"""

import pytest
import torch

import pipeline.layers as layers_module
import pipeline.sample_linear as sample_linear_module
from pipeline.layers import SBNLayer
from pipeline.sample_linear import draw_with_log_prob, fused_log_prob_applies, sample_log_prob
from .kernels import VECTOR_WIDTHS, build_for
from .test_sample_linear import assert_float32_close, coin_samples, spy, weights
from .test_sample_linear import each_kernel  # noqa: F401 (the fixture, for every test here)

pytestmark = pytest.mark.usefixtures("each_kernel")

EPS = torch.finfo(torch.float32).eps


def float64_log_prob(samples, weight, bias, values, grad):
    """The log-prob and its weight and bias gradients in float64 torch ops."""
    weight64, bias64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    logits = samples.double() @ weight64.T + bias64
    softplus = torch.logaddexp(logits, torch.zeros_like(logits))
    log_prob = (values.double() * logits).sum(-1) - softplus.sum(-1)
    log_prob.backward(grad.double())
    terms = (values.double() * logits).abs().sum(-1) + softplus.sum(-1)  # what float32 rounds
    return log_prob.detach(), weight64.grad, bias64.grad, terms.detach()


def fused_value_and_grads(samples, weight, bias, values, grad):
    weight.grad = bias.grad = None
    log_prob = sample_log_prob(samples, weight, bias, values)
    log_prob.backward(grad)
    return log_prob.detach(), weight.grad.clone(), bias.grad.clone()


def assert_matches_float64(samples, weight, bias, values, grad):
    got = fused_value_and_grads(samples, weight, bias, values, grad)
    *expected, terms = float64_log_prob(samples, weight, bias, values, grad)
    units, rows = samples.shape[-1], samples.shape[:-1].numel()
    # Each logit is off by a few ulps of a sum of `units` terms, and the log-prob adds `outputs` of them.
    tolerance = 4 * units**0.5 * EPS * terms
    assert got[0].dtype == torch.float32 and got[0].shape == expected[0].shape
    assert ((got[0].double() - expected[0]).abs() <= tolerance).all(), (got[0].double() - expected[0]).abs().max()
    assert_float32_close(got[1], expected[1], rows, "weight grad")
    assert_float32_close(got[2], expected[2], rows, "bias grad")


@pytest.fixture
def no_separate_ops(monkeypatch):
    """Make the separate product and softplus fail, so that a test proves the fused kernel ran."""

    def fail(*args, **kwargs):
        raise AssertionError("the separate ops ran")

    monkeypatch.setattr(sample_linear_module, "_native_linear", fail)
    monkeypatch.setattr(sample_linear_module, "log_prob_of_logits", fail)


@pytest.mark.parametrize(
    ("shape", "outputs", "values_shape"),
    [
        ((50, 100, 200), 784, (100, 784)),
        ((16, 20, 40), 40, (16, 20, 40)),
        ((7, 3, 50, 37), 785, (3, 50, 785)),
        ((2, 300, 64), 33, (33,)),
    ],
    ids=["SBN-bottom-x-shared", "a-value-row-per-sample", "odd-units-and-outputs", "one-value-row"],
)
@pytest.mark.parametrize("logit_scale", [0.1, 1.0, 10.0])
def test_fused_log_prob_matches_float64(shape, outputs, values_shape, logit_scale, no_separate_ops):
    """Logits from ~0.1 to ~300 in size: the softplus's exp is cut off below e^-87, and a lane's
    product of factors 1 + e^-|l| is flushed to its log every 64 vectors (784 units: 49)."""
    samples, values = coin_samples(shape, 0.4), coin_samples(values_shape, 0.3, seed=2)
    weight, bias = weights(outputs, shape[-1])
    with torch.no_grad():
        weight *= logit_scale
        bias *= logit_scale
    assert fused_log_prob_applies(samples, weight, bias, values)
    assert_matches_float64(samples, weight, bias, values, torch.randn(shape[:-1]))


def test_long_rows_flush_the_lane_products(no_separate_ops):
    """3000 outputs: 188 vectors a row, so each lane's product of factors 1 + e^-|l| (near 2 for these
    small logits) is flushed to its log twice before it could overflow."""
    samples, values = coin_samples((2, 200, 40)), coin_samples((200, 3000), seed=2)
    weight, bias = weights(3000, 40)
    with torch.no_grad():
        weight *= 0.01
        bias *= 0.01
    assert_matches_float64(samples, weight, bias, values, torch.randn(2, 200))


@pytest.mark.parametrize("logit_scale", [0.1, 3.0, 30.0])
def test_log_prob_and_logit_gradient_are_accurate_to_a_few_ulps(logit_scale, no_separate_ops):
    """One-hot sample rows and no bias make the logits of row r exactly column r of W (the three
    exact parts of a weight add up to it), and each weight gradient a single term, G[r, o] = g_r
    (v_o - sigmoid(W[o, r])). So the kernel's softplus and sigmoid are checked against float64 alone,
    without the product's rounding: the log-prob to a few ulps of its terms, the gradient to a few ulps of g_r."""
    rows, outputs = 300, 784
    samples = torch.eye(rows).unsqueeze(0)  # [1, 300, 300]
    values = coin_samples((rows, outputs), 0.3, seed=2)
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(outputs, rows, generator=generator) * logit_scale).requires_grad_()
    bias = torch.zeros(outputs, requires_grad=True)
    grad = torch.rand(1, rows, generator=generator) + 0.5
    log_prob, weight_grad, _ = fused_value_and_grads(samples, weight, bias, values, grad)
    logits = weight.detach().double().T  # [rows, outputs]: row r's logits
    softplus = torch.logaddexp(logits, torch.zeros_like(logits))
    expected = (values.double() * logits - softplus).sum(-1)
    terms = (values.double() * logits).abs().sum(-1) + softplus.sum(-1)
    assert ((log_prob[0].double() - expected).abs() <= 16 * EPS * terms).all(), (log_prob[0].double() - expected).abs().max()
    expected_grad = grad.double().T * (values.double() - torch.sigmoid(logits))  # [rows, outputs]
    # v - sigmoid(l) cancels where they are close: a few ulps of g_r, as in torch's float32 ops.
    assert ((weight_grad.double().T - expected_grad).abs() <= 4 * EPS * grad.double().T).all()


def test_samples_not_zero_or_one_take_the_separate_ops(monkeypatch):
    samples, values = coin_samples((4, 100, 40)), coin_samples((100, 50), seed=2)
    samples[2, 7, 3] = 0.5
    weight, bias = weights(50, 40)
    separate = spy(monkeypatch, sample_linear_module, "_native_linear")
    assert_matches_float64(samples, weight, bias, values, torch.randn(4, 100))
    assert separate, "the fused kernel's output was used for samples that are not all 0/1"


def test_nan_weights_give_nan_log_probs(no_separate_ops):
    samples, values = coin_samples((4, 100, 40)), coin_samples((100, 50), seed=2)
    weight, bias = weights(50, 40)
    with torch.no_grad():
        weight[7, 0] = float("nan")
    log_prob, weight_grad, bias_grad = fused_value_and_grads(samples, weight, bias, values, torch.ones(4, 100))
    assert torch.isnan(log_prob).all()  # as in the dense product, where 0 x NaN is NaN too
    others = torch.arange(50) != 7  # the NaN logits' gradient is NaN in output 7 only, as in the dense product
    assert torch.isnan(weight_grad[7]).all() and not torch.isnan(weight_grad[others]).any()
    assert torch.isnan(bias_grad[7]) and not torch.isnan(bias_grad[others]).any()


def test_sbn_layers_take_the_fused_log_prob_where_it_applies(monkeypatch):
    calls = spy(monkeypatch, layers_module, "sample_log_prob")
    layer = SBNLayer(784, cond_size=200)
    samples, x = coin_samples((5, 100, 200)), coin_samples((100, 784), seed=2)
    layer.log_prob(x, samples)  # x shared by the 5 samples: P's bottom layer
    layer.log_prob(coin_samples((5, 100, 784)), samples)  # a value row per sample
    assert len(calls) == 2
    layer.log_prob(x[:2], samples[:, :2])  # too few sample rows
    layer.log_prob(x.requires_grad_(), samples)  # values that want a gradient
    layer.log_prob(x.detach(), samples, base=layer.cond_logits(samples))  # the caller has the logits
    SBNLayer(784, cond_size=20).log_prob(x.detach(), coin_samples((5, 100, 20)))  # few units
    SBNLayer(10, cond_size=200).log_prob(coin_samples((5, 100, 10)), samples)  # few outputs
    assert len(calls) == 2


def test_compiled_fused_log_prob_matches_eager_in_one_graph(monkeypatch):
    samples, values = coin_samples((8, 50, 40)), coin_samples((50, 60), seed=2)
    weight, bias = weights(60, 40)
    grad = torch.randn(8, 50)
    compiled = torch.compile(sample_log_prob, dynamic=False, fullgraph=True)  # no graph break at the kernels
    expected = fused_value_and_grads(samples, weight, bias, values, grad)
    weight.grad = bias.grad = None
    compiled(samples, weight, bias, values).backward(grad)  # compiles
    kernels = spy(monkeypatch, sample_linear_module, "_kernels")
    weight.grad = bias.grad = None
    log_prob = compiled(samples, weight, bias, values)
    log_prob.backward(grad)
    assert len(kernels) == 2, "the compiled forward and backward did not both call the kernels"
    for g, e in zip((log_prob.detach(), weight.grad, bias.grad), expected, strict=True):
        torch.testing.assert_close(g, e)


def expected_draws(samples, weight, bias, uniforms):
    """`bernoulli_draws`'s rule on float64 logits, and where a draw is decided by less than float32 rounding."""
    logits = samples.double() @ weight.detach().double().T + bias.detach().double()
    unlikely, threshold = torch.sigmoid(-logits.abs()), uniforms.double() + EPS / 4
    draws = ((threshold < unlikely) ^ (logits > 0)).float()
    return draws, (threshold - unlikely).abs() < 1e-6 * unlikely.clamp(min=1e-30) + 1e-12


@pytest.mark.parametrize("logit_scale", [0.1, 1.0, 30.0])
def test_fused_draws_follow_the_samplers_rule_and_score_them(logit_scale, no_separate_ops):
    """h = [u + 2^-25 < sigmoid(-|l|)] XOR [l > 0] with the given uniforms, as `bernoulli_draws`; the
    log-prob and gradients are those of `sample_log_prob` with the draws as values."""
    samples, uniforms = coin_samples((20, 50, 64)), torch.rand(20, 50, 300, generator=torch.Generator().manual_seed(5))
    weight, bias = weights(300, 64)
    with torch.no_grad():
        weight *= logit_scale
        bias *= logit_scale
    assert fused_log_prob_applies(samples, weight, bias)
    draws, log_prob = draw_with_log_prob(samples, weight, bias, uniforms)
    expected, undecided = expected_draws(samples, weight, bias, uniforms)
    assert draws.dtype == torch.float32 and not draws.requires_grad
    assert torch.equal(draws[~undecided], expected[~undecided]) and undecided.float().mean() < 1e-3
    grad = torch.randn(20, 50)
    log_prob.backward(grad)
    got = (log_prob.detach(), weight.grad.clone(), bias.grad.clone())
    weight.grad = bias.grad = None
    for g, e in zip(got, fused_value_and_grads(samples, weight, bias, draws, grad), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_fused_draws_fall_back_to_the_same_rule(monkeypatch):
    """For samples that are not 0/1, the separate ops draw by the same rule and score the draws."""
    samples, uniforms = coin_samples((4, 100, 40)), torch.rand(4, 100, 50, generator=torch.Generator().manual_seed(5))
    samples[0, 0, 0] = 0.5
    weight, bias = weights(50, 40)
    separate = spy(monkeypatch, sample_linear_module, "_native_linear")
    draws, log_prob = draw_with_log_prob(samples, weight, bias, uniforms)
    assert len(separate) == 1
    expected, undecided = expected_draws(samples, weight, bias, uniforms)
    assert torch.equal(draws[~undecided], expected[~undecided])
    expected_log_prob, *_, terms = float64_log_prob(samples, weight, bias, draws, torch.ones(4, 100))
    assert ((log_prob.double() - expected_log_prob).abs() <= 4 * 40**0.5 * EPS * terms).all()


def test_sbn_layers_draw_with_the_fused_kernel_where_it_applies(monkeypatch):
    calls = spy(monkeypatch, layers_module, "draw_with_log_prob")
    layer = SBNLayer(200, cond_size=200)
    samples = coin_samples((5, 100, 200))
    h, log_prob = layer.sample_with_log_prob(samples)  # samples of the layer below: Q's middle layer
    assert len(calls) == 1 and h.shape == (5, 100, 200) and log_prob.shape == (5, 100)
    layer.sample_with_log_prob(samples[0], (5,))  # K samples of one input: the product is shared
    layer.sample_with_log_prob(samples[:, :2])  # too few sample rows
    assert len(calls) == 1
    torch.manual_seed(0)
    frequencies = layer.sample_with_log_prob(samples[:1].expand(400, 100, 200))[0].mean(0)  # [100, 200]
    probabilities = torch.sigmoid(layer.cond_logits(samples[0])).detach()
    assert ((frequencies - probabilities).abs() <= 5 * (probabilities * (1 - probabilities) / 400).sqrt() + 1e-3).all()


def test_fused_draws_never_take_a_value_less_likely_than_half_a_uniform_step(no_separate_ops):
    """A uniform of exactly 0 must not draw a unit value of probability e^-60 (`bernoulli_draws`)."""
    samples, uniforms = coin_samples((4, 100, 40)), torch.zeros(4, 100, 48)
    weight = torch.zeros(48, 40, requires_grad=True)
    bias = torch.tensor([-60.0, 60.0]).repeat(24).requires_grad_()
    draws, _ = draw_with_log_prob(samples, weight, bias, uniforms)
    assert torch.equal(draws, (bias.detach() > 0).float().expand_as(draws))


def test_without_a_gradient_the_fused_ops_keep_no_sigmoids(no_separate_ops):
    """In evaluation nothing reads the logits' sigmoids: the kernels skip writing them, and give the same results."""
    samples, values = coin_samples((4, 100, 40)), coin_samples((100, 50), seed=2)
    uniforms = torch.rand(4, 100, 50, generator=torch.Generator().manual_seed(5))
    weight, bias = weights(50, 40)
    with torch.no_grad():
        log_prob, sigmoids = sample_linear_module._native_log_prob(samples, weight, bias, values, False)
        draws, draw_log_prob, draw_sigmoids = sample_linear_module._native_draw(samples, weight, bias, uniforms, False)
        assert sigmoids.numel() == 0 and draw_sigmoids.numel() == 0
        assert torch.equal(log_prob, sample_log_prob(samples, weight, bias, values))
    kept_log_prob, kept_sigmoids = sample_linear_module._native_log_prob(samples, weight, bias, values, True)
    kept_draws, kept_draw_log_prob, _ = sample_linear_module._native_draw(samples, weight, bias, uniforms, True)
    assert torch.equal(log_prob, kept_log_prob.detach()) and kept_sigmoids.shape == (4, 100, 50)
    assert torch.equal(draws, kept_draws) and torch.equal(draw_log_prob, kept_draw_log_prob.detach())


@VECTOR_WIDTHS
@pytest.mark.parametrize("each_kernel", ["lookup_linear"])  # in place of the module's fixture: this build instead
def test_every_vector_width_of_the_lookups_matches_float64(march, flag, tmp_path, monkeypatch, no_separate_ops):
    """The lookup kernels' width follows the compiler's target (vectors.h, LANES), and with it the
    fused log-prob's lanes past a row's end: check each width this CPU runs."""
    kernels = sample_linear_module.declare(build_for("lookup_linear", march, flag, tmp_path), "lookup_linear")
    monkeypatch.setattr(sample_linear_module, "_kernels", lambda: kernels)
    samples, values = coin_samples((7, 143, 37)), coin_samples((143, 45), seed=2)  # 1001 rows, 45 outputs: no multiple
    weight, bias = weights(45, 37)
    assert_matches_float64(samples, weight, bias, values, torch.randn(7, 143))
    uniforms = torch.rand(7, 143, 45, generator=torch.Generator().manual_seed(5))
    draws, _ = draw_with_log_prob(samples, weight, bias, uniforms)
    expected, undecided = expected_draws(samples, weight, bias, uniforms)
    assert torch.equal(draws[~undecided], expected[~undecided])
