"""`sample_linear`: F.linear over K binary samples, computed from where they differ from their majority.

The sparse path must give the dense product's values and gradients (to float64 rounding here), whatever
the shape, and must be the path taken when the samples are confident: the tests check both.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeline.sample_linear as sample_linear_module
from pipeline.estimators import rws_surrogates
from pipeline.models import HelmholtzMachine
from pipeline.sample_linear import sample_linear, sample_linear_op


def confident_samples(shape, flip: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """0/1 samples [K, ..., H] that differ from a shared per-point pattern in about `flip` of their entries."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.rand(shape[1:], generator=generator) < 0.5
    flips = torch.rand(shape, generator=generator) < flip
    return (pattern ^ flips).to(dtype)


def weights(outputs: int, units: int, dtype=torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, units, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(outputs, generator=generator, dtype=dtype).requires_grad_()
    return weight, bias


def dense(samples, weight, bias):
    """The reference: the dense product, written without F.linear (which a fixture replaces)."""
    return samples @ weight.T + bias


def value_and_grads(fn, samples, weight, bias, grad_out):
    weight.grad = bias.grad = None
    out = fn(samples, weight, bias)
    out.backward(grad_out)
    return out.detach(), weight.grad.clone(), bias.grad.clone()


def assert_dense_values_and_grads(fn, samples, weight, bias, grad_out):
    """fn's values and gradients equal the dense product's, to float64 rounding."""
    got = value_and_grads(fn, samples, weight, bias, grad_out)
    expected = value_and_grads(dense, samples, weight, bias, grad_out)
    for name, g, e in zip(("logits", "weight grad", "bias grad"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


def spy(monkeypatch, owner, name: str) -> list:
    """Record every call of owner.name (which still runs); returns the list of calls."""
    calls, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: calls.append(args) or original(*args))
    return calls


@pytest.fixture
def no_dense_inside_op(monkeypatch):
    """Make the op's dense fallback fail, so that a test proves the sparse path ran."""

    def fail(*args, **kwargs):
        raise AssertionError("the dense fallback ran")

    monkeypatch.setattr(sample_linear_module.F, "linear", fail)


@pytest.mark.parametrize(
    "shape", [(16, 8, 40), (7, 3, 5, 40), (1, 12, 40), (6, 5, 300)], ids=["K-B-H", "K-B1-B2-H", "K=1", "H=300"]
)
@pytest.mark.parametrize("flip", [0.0, 0.05])
def test_sparse_path_matches_dense_product_and_gradients(shape, flip, no_dense_inside_op):
    samples = confident_samples(shape, flip)
    weight, bias = weights(24, shape[-1])
    assert_dense_values_and_grads(sample_linear_op, samples, weight, bias, torch.randn(*shape[:-1], 24, dtype=torch.float64))


@pytest.mark.parametrize("value", [0.25, 0.5, 0.999])
def test_samples_not_all_zero_or_one_fall_back_to_the_dense_product(value, monkeypatch):
    """The sparse path weights each difference by 1 - 2 r, right for 0/1 entries only. Entries
    in [0, 1] that are not 0/1 must be caught (the op compares its count of differing entries with
    the count the sums predict) and get the dense product."""
    samples = confident_samples((16, 8, 40), 0.03)
    samples[3, 2, 5] = value
    weight, bias = weights(24, 40)
    dense_calls = spy(monkeypatch, sample_linear_module.F, "linear")
    assert_dense_values_and_grads(sample_linear_op, samples, weight, bias, torch.randn(16, 8, 24, dtype=torch.float64))
    assert dense_calls, "the sparse path ran on samples that are not all 0/1"


def test_fair_coins_take_the_dense_product(monkeypatch):
    """An untrained Q's samples differ from their majority in ~40% of entries: the op must not pay
    for index lists there (the embedding_bag sums would be slower than the dense product)."""
    samples = confident_samples((16, 8, 40), 0.5)
    weight, bias = weights(24, 40)

    def fail(*args, **kwargs):
        raise AssertionError("the sparse path ran")

    monkeypatch.setattr(sample_linear_module.F, "embedding_bag", fail)
    torch.testing.assert_close(sample_linear_op(samples, weight, bias), dense(samples, weight, bias))


def test_dispatch_uses_the_op_only_for_wide_products_of_detached_cpu_samples(monkeypatch):
    calls = []
    monkeypatch.setattr(sample_linear_module, "sample_linear_op", lambda *args: calls.append(args) or F.linear(*args))
    wide, rows = sample_linear_module._MIN_OUTPUTS, sample_linear_module._MIN_ROWS
    units = sample_linear_module._MAX_NARROW_UNITS + 1
    weight, bias = weights(wide, units, torch.float32)
    sample_linear(torch.zeros(2, rows // 2, units), weight, bias)
    assert len(calls) == 1
    narrow_weight, narrow_bias = weights(wide - 1, units, torch.float32)
    sample_linear(torch.zeros(2, rows // 2, units), narrow_weight, narrow_bias)  # too narrow
    sample_linear(torch.zeros(2, rows // 4, units), weight, bias)  # too few rows
    sample_linear(torch.zeros(rows, units), weight, bias)  # no sample dimension
    samples = torch.zeros(2, rows // 2, units, requires_grad=True)
    sample_linear(samples, weight, bias).sum().backward()  # gradient wanted for the samples themselves
    assert len(calls) == 1
    torch.testing.assert_close(samples.grad, weight.detach().sum(0).expand_as(samples))


def test_samples_with_few_units_get_the_dense_gradients(monkeypatch):
    """Few units: the weight gradient is taken as (h^T g)^T, which must equal autograd's g^T h."""
    units = sample_linear_module._MAX_NARROW_UNITS
    samples = confident_samples((8, sample_linear_module._MIN_ROWS // 8, units), 0.3)
    weight, bias = weights(48, units)
    used = spy(monkeypatch, sample_linear_module._NarrowInputLinear, "apply")
    assert_dense_values_and_grads(sample_linear, samples, weight, bias, torch.randn(*samples.shape[:-1], 48, dtype=torch.float64))
    assert used, "the narrow-input path did not run"


def test_compiled_op_matches_eager():
    samples = confident_samples((16, 8, 40), 0.05, dtype=torch.float32)
    weight, bias = weights(300, 40, torch.float32)
    grad_out = torch.randn(16, 8, 300)
    eager = value_and_grads(sample_linear_op, samples, weight, bias, grad_out)
    compiled = value_and_grads(torch.compile(sample_linear_op, dynamic=False), samples, weight, bias, grad_out)
    for g, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(("p_layer", "compiled"), [("sbn", False), ("darn", False), ("sbn", True)])
def test_rws_step_gradients_match_the_dense_products(p_layer, compiled, monkeypatch):
    """A whole RWS step on a model whose Q is confident, through the sparse path and through dense
    products only: the same losses and gradients to float32 rounding (compiled: with the shared bags)."""
    torch.manual_seed(0)
    model = HelmholtzMachine([784, 64, 32], p_layer=p_layer)
    with torch.no_grad():
        for layer in model.q_conditionals:  # large logits: confident Q, samples mostly agree
            layer.cond_weight.weight.mul_(40)
            layer.bias.copy_(torch.randn_like(layer.bias) * 8)
    x = (torch.rand(64, 784) < 0.3).float()
    monkeypatch.setattr(sample_linear_module, "_MIN_ROWS", 64)
    monkeypatch.setattr(sample_linear_module, "_MIN_OUTPUTS", 64)

    def step(m, sparse: bool):
        monkeypatch.setattr(sample_linear_module, "MAX_DIFFERING", 0.125 if sparse else -1.0)
        taken = []
        majority = sample_linear_module._majority
        monkeypatch.setattr(sample_linear_module, "_majority", lambda s: taken.append(majority(s) is not None) or majority(s))
        torch.manual_seed(1)
        s = (torch.compile(rws_surrogates, dynamic=False) if compiled else rws_surrogates)(m, x, 16, "wake-sleep")
        (s.p_loss + s.q_loss).backward()
        monkeypatch.setattr(sample_linear_module, "_majority", majority)
        return s, taken

    sparse_model, dense_model = model, copy.deepcopy(model)
    sparse, sparse_taken = step(sparse_model, True)
    dense, dense_taken = step(dense_model, False)
    assert sparse_taken and all(sparse_taken), "the sparse path did not run in the step"
    assert not any(dense_taken)
    torch.testing.assert_close(sparse.log_likelihood, dense.log_likelihood)
    for (name, p), q in zip(sparse_model.named_parameters(), dense_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_products_of_the_same_samples_share_their_bags(monkeypatch):
    """Two layers that read the same samples (as Q's q(h_2 | h_1) and P's p(x | h_1) read h_1) must
    build the bags once in a compiled graph, and still give the dense products' values and gradients."""
    samples = confident_samples((16, 80, 40), 0.05, dtype=torch.float32)
    width = 24  # narrower than the eager floor: compiled, every product of samples takes the op
    (weight_a, bias_a), (weight_b, bias_b) = weights(width, 40, torch.float32, 1), weights(width, 40, torch.float32, 2)
    monkeypatch.setattr(sample_linear_module, "_MIN_ROWS", 64)
    built = []
    majority = sample_linear_module._majority
    monkeypatch.setattr(sample_linear_module, "_majority", lambda s: built.append(1) or majority(s))

    def two_products(product, samples, weight_a, bias_a, weight_b, bias_b):
        return (product(samples, weight_a, bias_a).sin().sum() + product(samples, weight_b, bias_b).cos().sum())

    compiled = torch.compile(two_products, dynamic=False, fullgraph=True)
    got = compiled(sample_linear, samples, weight_a, bias_a, weight_b, bias_b)
    built.clear()
    got = compiled(sample_linear, samples, weight_a, bias_a, weight_b, bias_b)
    assert len(built) == 1, f"the bags were built {len(built)} times for one samples tensor"
    got.backward()
    got_grads = [t.grad.clone() for t in (weight_a, bias_a, weight_b, bias_b)]
    for t in (weight_a, bias_a, weight_b, bias_b):
        t.grad = None
    expected = two_products(dense, samples, weight_a, bias_a, weight_b, bias_b)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    for g, t in zip(got_grads, (weight_a, bias_a, weight_b, bias_b), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_editing_the_ops_file_renames_the_ops(tmp_path):
    """torch.compile's disk cache keys graphs by custom op names, not by their backward formulas
    (pytorch#144344): an edited formula must come with new op names, or a stale compiled backward
    would run. The names carry a hash of the file."""
    import importlib.util

    source = Path(sample_linear_module.__file__).read_text()
    edited = tmp_path / "sample_linear_edited.py"
    edited.write_text(source.replace("def _backward(ctx, grad):", "def _backward(ctx, grad):  # edited", 1))
    spec = importlib.util.spec_from_file_location("sample_linear_edited", edited)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._OPS != sample_linear_module._OPS
    assert hasattr(getattr(torch.ops, module._OPS), "sample_linear")
