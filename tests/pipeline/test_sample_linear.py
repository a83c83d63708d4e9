"""`sample_linear`: F.linear over K binary samples, by a C kernel on a CPU: AMX tiles
(pipeline/amx_linear.c) where the CPU has them, else table lookups (pipeline/lookup_linear.c).

Each kernel this machine runs must give the dense product's values and gradients to float32
rounding, in every shape (units and outputs that are not multiples of the kernels' groups and
tiles, rows that are not multiples of their blocks), must be the path taken for float32 samples,
and must hand anything that is not 0/1 to the dense product. The references are float64 products.
"""

import copy
import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeline.sample_linear as sample_linear_module
from pipeline.estimators import rws_surrogates
from pipeline.models import HelmholtzMachine
from pipeline.sample_linear import sample_linear
from .kernels import VECTOR_WIDTHS, build_for, cpu_has

pytestmark = pytest.mark.skipif(not sample_linear_module._have_kernels(), reason="no C compiler for the kernels")


def coin_samples(shape, ones: float = 0.5, seed: int = 0) -> torch.Tensor:
    """float32 0/1 samples with about `ones` of their entries 1."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < ones).float()


def weights(outputs: int, units: int, dtype=torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, units, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(outputs, generator=generator, dtype=dtype).requires_grad_()
    return weight, bias


def value_and_grads(fn, samples, weight, bias, grad_out):
    weight.grad = bias.grad = None
    out = fn(samples, weight, bias)
    out.backward(grad_out)
    return out.detach(), weight.grad.clone(), bias.grad.clone()


def float64_reference(samples, weight, bias, grad_out):
    """The dense product and its gradients in float64, written without F.linear (which a fixture replaces)."""
    weight64, bias64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    out = samples.double() @ weight64.T + bias64
    out.backward(grad_out.double())
    return out.detach(), weight64.grad, bias64.grad


def assert_float32_close(got, expected, sums_of: int, name: str):
    """float32 results of sums of `sums_of` terms of size ~1 against float64: a few float32 ulps of the sum's scale."""
    tolerance = 8 * sums_of**0.5 * torch.finfo(torch.float32).eps * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance, msg=name)


def spy(monkeypatch, owner, name: str) -> list:
    """Record every call of owner.name (which still runs); returns the list of calls' arguments."""
    calls, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: calls.append(args) or original(*args))
    return calls


@pytest.fixture(params=sample_linear_module.KERNELS)
def each_kernel(request, monkeypatch):
    """Run the test once per kernel file that this machine runs (skipped for the others)."""
    kernels = sample_linear_module.kernel_functions(request.param)
    if kernels is None:
        pytest.skip(f"this machine does not run pipeline/{request.param}.c")
    monkeypatch.setattr(sample_linear_module, "_kernels", lambda: kernels)
    return kernels


@pytest.fixture
def no_dense_product(monkeypatch):
    """Make torch's dense products fail inside the module, so that a test proves the kernels ran."""

    def fail(*args, **kwargs):
        raise AssertionError("the dense product ran")

    monkeypatch.setattr(sample_linear_module.F, "linear", fail)


@pytest.mark.parametrize(
    ("shape", "outputs"),
    [
        ((16, 20, 40), 24),
        ((7, 3, 50, 37), 785),
        ((1, 1100, 40), 16),
        ((6, 201, 300), 200),
        ((4, 300, 33), 10),
        ((50, 100, 200), 784),
    ],
    ids=["K-B-H", "odd-units-and-outputs", "K=1", "H=300", "few-outputs", "SBN-bottom"],
)
@pytest.mark.parametrize("ones", [0.5, 0.03])
def test_kernels_match_the_dense_product_and_gradients(shape, outputs, ones, each_kernel, no_dense_product):
    samples = coin_samples(shape, ones)
    weight, bias = weights(outputs, shape[-1])
    grad_out = torch.randn(*shape[:-1], outputs)
    got = value_and_grads(sample_linear, samples, weight, bias, grad_out)
    expected = float64_reference(samples, weight, bias, grad_out)
    rows = samples.shape[:-1].numel()
    for name, g, e, sums_of in zip(("logits", "weight grad", "bias grad"), got, expected, (shape[-1], rows, rows), strict=True):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert_float32_close(g, e, sums_of, name)


def test_a_nan_weight_makes_its_output_nan_in_every_row(each_kernel, no_dense_product):
    """As in the dense product, where 0 x NaN is NaN: the rows whose unit is 0 do not hide a NaN
    weight (the lookup tables carry it into every subset sum), and its gradient stays in its output."""
    samples = coin_samples((4, 100, 40))
    weight, bias = weights(50, 40)
    with torch.no_grad():
        weight[7, 3] = float("nan")
    logits, weight_grad, bias_grad = value_and_grads(sample_linear, samples, weight, bias, torch.ones(4, 100, 50))
    others = torch.arange(50) != 7
    assert torch.isnan(logits[..., 7]).all() and not torch.isnan(logits[..., others]).any()
    assert not torch.isnan(weight_grad).any() and not torch.isnan(bias_grad).any()  # g^T h: no NaN in g or h


def test_kernels_are_exact_where_each_sum_has_one_term(each_kernel, no_dense_product):
    """With one 1 per sample row and per unit, every logit is one weight (bias 0) and every weight
    gradient one output gradient: no rounding, so the kernels must return them bit for bit. The
    values span 12 decades and use all 24 bits, which AMX's three bfloat16 parts must carry."""
    units, outputs, rows = 200, 130, 400  # rows 0-199 pick units 0-199; rows 200-399 are zeros
    generator = torch.Generator().manual_seed(2)

    def wide(*shape):
        return torch.randn(*shape, generator=generator) * 10 ** (12 * torch.rand(*shape, generator=generator) - 6)

    samples = torch.zeros(rows, units)
    samples[torch.arange(units), torch.randperm(units, generator=generator)] = 1.0
    samples = samples.view(2, rows // 2, units)
    weight, bias = wide(outputs, units).requires_grad_(), torch.zeros(outputs, requires_grad=True)
    grad_out = wide(2, rows // 2, outputs)
    logits, weight_grad, _ = value_and_grads(sample_linear, samples, weight, bias, grad_out)
    assert torch.equal(logits, samples @ weight.detach().T)  # a single term each: exact in any order
    assert torch.equal(weight_grad, grad_out.reshape(rows, outputs).T @ samples.reshape(rows, units))


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_kernels_match_the_float64_product_for_any_thread_count(each_kernel, threads):
    """The kernels split rows, tiles and chunks between threads: more threads than work must not
    lose any. Each function counts the entries that are not 0/1 itself."""
    rows, units, outputs = 300, 45, 37
    samples, grad = coin_samples((rows, units)), torch.randn(rows, outputs)
    weight, bias = weights(outputs, units)
    weight_arg = weight.detach().t().contiguous() if each_kernel.weight_transposed else weight.detach()
    out, weight_grad, bias_grad = torch.empty(rows, outputs), torch.empty(outputs, units), torch.empty(outputs)
    assert each_kernel.linear(*(t.data_ptr() for t in (samples, weight_arg, bias, out)), rows, units, outputs, threads) == 0
    grad_pointers = [t.data_ptr() for t in (samples, grad, weight_grad, bias_grad)]
    assert each_kernel.weight_grad(*grad_pointers, rows, units, outputs, threads) == 0
    expected = float64_reference(samples, weight, bias, grad)
    assert_float32_close(out, expected[0], units, "logits")
    assert_float32_close(weight_grad, expected[1], rows, "weight grad")
    assert_float32_close(bias_grad, expected[2], rows, "bias grad")
    samples[[0, 150, 299], [44, 0, 20]] = torch.tensor([0.5, 2.0, float("nan")])  # each function counts them
    assert each_kernel.linear(*(t.data_ptr() for t in (samples, weight_arg, bias, out)), rows, units, outputs, threads) == 3
    assert each_kernel.weight_grad(*grad_pointers, rows, units, outputs, threads) == 3


def test_kernels_reuse_their_scratch_memory_between_calls(each_kernel):
    """The kernels keep their buffers from call to call (pipeline/scratch.h): a call after a larger
    one, and a repeated call, must not see what the last call left there (the weight gradient's sums
    start from zero each time)."""
    def run(rows, units, outputs):
        samples, grad = coin_samples((rows, units), seed=rows), torch.randn(rows, outputs)
        weight, bias = weights(outputs, units)
        weight_arg = weight.detach().t().contiguous() if each_kernel.weight_transposed else weight.detach()
        out, weight_grad, bias_grad = torch.empty(rows, outputs), torch.empty(outputs, units), torch.empty(outputs)
        assert each_kernel.linear(*(t.data_ptr() for t in (samples, weight_arg, bias, out)), rows, units, outputs, 2) == 0
        pointers = [t.data_ptr() for t in (samples, grad, weight_grad, bias_grad)]
        assert each_kernel.weight_grad(*pointers, rows, units, outputs, 2) == 0
        return samples, weight, bias, grad, (out, weight_grad, bias_grad)

    run(1500, 300, 800)
    samples, weight, bias, grad, got = run(301, 45, 37)
    expected = float64_reference(samples, weight, bias, grad)
    for name, g, e, sums_of in zip(("logits", "weight grad", "bias grad"), got, expected, (45, 301, 301), strict=True):
        assert_float32_close(g, e, sums_of, name)


def test_kernel_choice_prefers_amx_and_falls_back_to_the_lookups(monkeypatch):
    """AMX where the CPU has it (so that a build without it cannot go unnoticed); the table
    lookups where Linux refuses the tiles."""
    lookups = sample_linear_module.kernel_functions("lookup_linear")
    if cpu_has("amx_bf16") and cpu_has("amx_tile") and lookups is not None:
        assert sample_linear_module._kernels() == sample_linear_module.kernel_functions("amx_linear")
    refused = type("Library", (), {"amx_ready": staticmethod(lambda: 0)})()
    monkeypatch.setattr(sample_linear_module, "load_library", lambda name: refused)
    assert sample_linear_module.kernel_functions.__wrapped__("amx_linear") is None
    monkeypatch.setattr(sample_linear_module, "kernel_functions", {"amx_linear": None, "lookup_linear": lookups}.get)
    assert sample_linear_module._kernels.__wrapped__() is lookups


def test_kernel_file_routes_the_products_within_its_block_only():
    preferred = sample_linear_module._kernels()
    lookups = sample_linear_module.kernel_functions("lookup_linear")
    calls = []
    counting = lookups._replace(linear=lambda *args: calls.append(1) or lookups.linear(*args))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample_linear_module, "kernel_functions", {"lookup_linear": counting}.get)
        with sample_linear_module.kernel_file("lookup_linear"):
            assert sample_linear_module._kernels() is counting
            sample_linear(coin_samples((16, 20, 40)), *weights(24, 40))
        with pytest.raises(RuntimeError, match="amx_linear.c does not run"):
            with sample_linear_module.kernel_file("amx_linear"):
                pass
    assert calls and sample_linear_module._kernels() is preferred


def test_lookup_tolerance_catches_a_wrong_table_entry():
    """The comparison above must fail for a product that is off in one weight, so that it can catch a bad table."""
    samples = coin_samples((16, 20, 40))
    weight, bias = weights(24, 40)
    grad_out = torch.randn(16, 20, 24)
    expected = float64_reference(samples, weight, bias, grad_out)
    with torch.no_grad():
        weight[3, 17] += 1e-3
    got = value_and_grads(sample_linear, samples, weight, bias, grad_out)
    with pytest.raises(AssertionError):
        assert_float32_close(got[0], expected[0], 40, "logits")


@pytest.mark.parametrize("value", [0.25, 0.999, 2.0, -1.0, float("nan")])
def test_samples_not_all_zero_or_one_get_the_dense_product(value, each_kernel, monkeypatch):
    """The kernels read a nonzero entry as 1. Anything but 0/1 must be caught and get the dense product."""
    samples = coin_samples((16, 20, 40))
    samples[3, 2, 5] = value
    weight, bias = weights(24, 40)
    grad_out = torch.randn(16, 20, 24)
    expected = value_and_grads(F.linear, samples, weight, bias, grad_out)
    dense_calls = spy(monkeypatch, sample_linear_module.F, "linear")
    got = value_and_grads(sample_linear, samples, weight, bias, grad_out)
    assert dense_calls, "the lookup ran on samples that are not all 0/1"
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)


@VECTOR_WIDTHS
def test_every_vector_width_of_the_kernels_matches_the_float64_product(march, flag, tmp_path):
    """The kernel's width follows the compiler's target (vectors.h, LANES): check each width this CPU runs."""
    kernels = build_for("lookup_linear", march, flag, tmp_path)
    kernels.lookup_linear.restype = kernels.lookup_linear_weight_grad.restype = ctypes.c_int64
    rows, units, outputs = 1001, 37, 45  # no multiple of any group, tile or block
    samples, grad = coin_samples((rows, units)), torch.randn(rows, outputs)
    weight, bias = weights(outputs, units)
    weight_t = weight.detach().t().contiguous()
    out, weight_grad, bias_grad = torch.empty(rows, outputs), torch.empty(outputs, units), torch.empty(outputs)
    size = ctypes.c_int64
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (samples, weight_t, bias, out)]
    assert kernels.lookup_linear(*pointers, size(rows), units, outputs, 2) == 0
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (samples, grad, weight_grad, bias_grad)]
    assert kernels.lookup_linear_weight_grad(*pointers, size(rows), units, outputs, 2) == 0
    expected = float64_reference(samples, weight, bias, grad)
    assert_float32_close(out, expected[0], units, "logits")
    assert_float32_close(weight_grad, expected[1], rows, "weight grad")
    assert_float32_close(bias_grad, expected[2], rows, "bias grad")


def test_negative_zero_counts_as_zero(each_kernel, no_dense_product):
    samples = coin_samples((16, 20, 40))
    samples[samples == 0] = -0.0
    weight, bias = weights(24, 40)
    grad_out = torch.randn(16, 20, 24)
    expected = float64_reference(samples, weight, bias, grad_out)
    assert_float32_close(value_and_grads(sample_linear, samples, weight, bias, grad_out)[0], expected[0], 40, "logits")


def test_dispatch_uses_the_kernels_only_for_float32_products_of_many_detached_cpu_samples(monkeypatch):
    calls = spy(monkeypatch, sample_linear_module, "_native_linear")
    rows, units = sample_linear_module._MIN_ROWS, sample_linear_module._MAX_NARROW_UNITS + 1
    weight, bias = weights(24, units)
    sample_linear(torch.zeros(2, rows // 2, units), weight, bias)
    assert len(calls) == 1
    sample_linear(torch.zeros(2, rows // 4, units), weight, bias)  # too few rows
    sample_linear(torch.zeros(rows, units), weight, bias)  # no sample dimension
    sample_linear(torch.zeros(2, rows // 2, units, dtype=torch.float64), *weights(24, units, torch.float64))  # float64
    sample_linear(torch.zeros(2, rows // 2, units - 1), *weights(24, units - 1))  # few units: _NarrowInputLinear
    samples = torch.zeros(2, rows // 2, units, requires_grad=True)
    sample_linear(samples, weight, bias).sum().backward()  # gradient wanted for the samples themselves
    assert len(calls) == 1
    torch.testing.assert_close(samples.grad, weight.detach().sum(0).expand_as(samples))


def test_without_the_kernels_products_are_dense(monkeypatch, no_dense_product):
    monkeypatch.setattr(sample_linear_module, "_have_kernels", lambda: False)
    with pytest.raises(AssertionError, match="the dense product ran"):
        sample_linear(coin_samples((16, 20, 40)), *weights(24, 40))


def test_samples_with_few_units_get_the_dense_gradients(monkeypatch):
    """Few units: the weight gradient is taken as (h^T g)^T, which must equal autograd's g^T h."""
    units = sample_linear_module._MAX_NARROW_UNITS
    samples = coin_samples((8, sample_linear_module._MIN_ROWS // 8, units), 0.3).double()
    weight, bias = weights(48, units, torch.float64)
    grad_out = torch.randn(*samples.shape[:-1], 48, dtype=torch.float64)
    used = spy(monkeypatch, sample_linear_module._NarrowInputLinear, "apply")
    got = value_and_grads(sample_linear, samples, weight, bias, grad_out)
    expected = float64_reference(samples, weight, bias, grad_out)
    assert used, "the narrow-input path did not run"
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_compiled_kernels_match_the_dense_product_in_one_graph(each_kernel, monkeypatch):
    samples = coin_samples((16, 20, 40))
    weight, bias = weights(300, 40)
    grad_out = torch.randn(16, 20, 300)
    calls = spy(monkeypatch, sample_linear_module, "_kernels")
    compiled = torch.compile(sample_linear, dynamic=False, fullgraph=True)  # no graph break at the kernels
    value_and_grads(compiled, samples, weight, bias, grad_out)  # compiles
    calls.clear()
    got = value_and_grads(compiled, samples, weight, bias, grad_out)
    assert len(calls) == 2, "the compiled forward and backward did not both call the kernels"
    expected = float64_reference(samples, weight, bias, grad_out)
    for name, g, e, sums_of in zip(("logits", "weight grad", "bias grad"), got, expected, (40, 320, 320), strict=True):
        assert_float32_close(g, e, sums_of, name)


@pytest.mark.parametrize(("p_layer", "compiled"), [("sbn", False), ("darn", False), ("sbn", True)])
def test_rws_step_gradients_match_the_dense_products(p_layer, compiled, each_kernel, monkeypatch):
    """A whole RWS step through the kernels and through dense products only: the same losses and
    gradients to float32 rounding."""
    torch.manual_seed(0)
    model = HelmholtzMachine([784, 64, 48], p_layer=p_layer)
    x = (torch.rand(64, 784) < 0.3).float()

    def step(m, native: bool):
        monkeypatch.setattr(sample_linear_module, "_have_kernels", lambda: native)
        calls = spy(monkeypatch, sample_linear_module, "_native_linear")
        log_prob_calls = spy(monkeypatch, sample_linear_module, "_native_log_prob")
        draw_calls = spy(monkeypatch, sample_linear_module, "_native_draw")
        torch._dynamo.reset()
        torch.manual_seed(1)
        s = (torch.compile(rws_surrogates, dynamic=False) if compiled else rws_surrogates)(m, x, 16, "wake-sleep")
        (s.p_loss + s.q_loss).backward()
        return s, calls, log_prob_calls + draw_calls

    native_model, dense_model = model, copy.deepcopy(model)
    native, native_calls, native_fused_calls = step(native_model, True)
    dense, dense_calls, dense_fused_calls = step(dense_model, False)
    assert (native_calls or native_fused_calls) and not dense_calls and not dense_fused_calls
    assert native_fused_calls, "P's bottom log-prob (784 outputs of 64 units) did not take the fused kernels"
    torch.testing.assert_close(native.log_likelihood, dense.log_likelihood)
    for (name, p), q in zip(native_model.named_parameters(), dense_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_editing_the_ops_file_renames_the_ops(tmp_path):
    """torch.compile's disk cache keys graphs by custom op names, not by their backward formulas
    (pytorch#144344): an edited formula must come with new op names, or a stale compiled backward
    would run. The names carry a hash of the file."""
    import importlib.util

    source = Path(sample_linear_module.__file__).read_text()
    edited = tmp_path / "sample_linear_edited.py"
    marker = "def _native_linear_backward(ctx, grad):"
    assert source.count(marker) == 1
    edited.write_text(source.replace(marker, marker + "  # edited"))
    spec = importlib.util.spec_from_file_location("sample_linear_edited", edited)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._OPS != sample_linear_module._OPS
    assert hasattr(getattr(torch.ops, module._OPS), "native_linear")
