"""The pure RWS estimator functions (float32 edge cases) and the estimator entry points' contracts."""

import math

import pytest
import torch

from pipeline import estimators
from pipeline.estimators import (
    effective_sample_size,
    log_likelihood,
    log_likelihood_estimate,
    log_weights,
    normalized_weights,
    rws_surrogates,
    wake_p_loss,
    wake_q_loss,
)
from pipeline.models import HelmholtzMachine

from .enumeration import (
    all_binary,
    chi_square,
    exact_log_marginal,
    randomize_,
    single_thread,  # noqa: F401  (autouse fixture)
)

INF = math.inf
Z = 5.0  # standard errors allowed for a Monte Carlo estimate

# Columns are data points, rows the K = 4 samples: each column is one edge case.
EDGE_CASES = {
    "ordinary": [0.3, -1.2, 2.0, 0.5],
    "some -inf": [-INF, 1.0, -INF, 0.0],
    "+1e4": [1e4, 1e4 - 1, 1e4 - 2, 1e4 + 0.5],
    "-1e4": [-1e4, -1e4 + 1, -1e4 - 3, -1e4],
    "+-1e4 and -inf": [1e4, -1e4, 0.0, -INF],
    "one dominates": [0.0, -200.0, -300.0, -INF],
    "all -inf": [-INF, -INF, -INF, -INF],
    "all equal": [3.0, 3.0, 3.0, 3.0],
    "all equal, large": [1e4, 1e4, 1e4, 1e4],
}
NAMES = list(EDGE_CASES)
K = 4


def edge_case_log_weights(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([EDGE_CASES[name] for name in NAMES], dtype=dtype).T  # [K, B]


def column(name: str) -> int:
    return NAMES.index(name)


def reference_weights(lw64: torch.Tensor) -> torch.Tensor:
    """softmax over samples in float64, 0 for an all -inf column."""
    shifted = lw64 - lw64.max(0).values.clamp(min=-1e300)  # finite shift even for an all -inf column
    unnormalized = shifted.exp()
    total = unnormalized.sum(0)
    return torch.where(total > 0, unnormalized / total.clamp(min=1e-300), torch.zeros_like(unnormalized))


def test_log_weights_is_log_p_minus_log_q():
    log_p = torch.tensor([[-1.0, -INF], [-3.0, -2.0]])
    log_q = torch.tensor([[-0.5, -1.0], [-4.0, -INF]])
    torch.testing.assert_close(log_weights(log_p, log_q), torch.tensor([[-0.5, -INF], [1.0, INF]]))


def rounding_slack(lw: torch.Tensor) -> torch.Tensor:
    """Relative error of exp(a - b) for float32 a, b of the column's magnitude M: a few eps * M: [B].

    A log-normalizer of magnitude M is only representable to ~eps * M, so an implementation that
    subtracts it (w = exp(lw - logsumexp(lw))) is off by that much relative; see the strict test below.
    """
    magnitude = torch.where(torch.isfinite(lw), lw.abs(), torch.zeros_like(lw)).amax(0).clamp(min=1.0)
    return 4 * torch.finfo(torch.float32).eps * magnitude


def test_normalized_weights_edge_cases():
    lw = edge_case_log_weights()
    weights = normalized_weights(lw)
    assert weights.dtype == torch.float32 and weights.shape == lw.shape
    assert not weights.isnan().any() and (weights >= 0).all()
    slack = rounding_slack(lw)
    totals = weights.sum(0)
    finite = torch.isfinite(lw).any(0)
    assert ((totals - 1).abs()[finite] <= slack[finite]).all(), totals
    assert (totals[~finite] == 0).all() and (~finite).sum() == 1  # the all -inf column gets w = 0
    assert (weights[lw == -INF] == 0).all()  # a -inf log-weight has weight 0
    reference = reference_weights(lw.double())
    assert ((weights.double() - reference).abs() <= slack * reference + 1e-7).all()
    torch.testing.assert_close(weights[:, column("one dominates")], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(weights[:, column("all equal")], torch.full((K,), 1 / K))
    # Detached: no gradient path back to the log-weights.
    assert not normalized_weights(lw.clone().requires_grad_()).requires_grad


def test_effective_sample_size_edge_cases():
    lw = edge_case_log_weights()
    ess = effective_sample_size(lw)
    assert ess.shape == (lw.shape[1],) and not ess.isnan().any()
    reference = reference_weights(lw.double())
    no_weight = torch.zeros(lw.shape[1], dtype=torch.float64)
    reference_ess = torch.where(reference.sum(0) > 0, 1 / (reference**2).sum(0), no_weight)
    slack = 2 * rounding_slack(lw)  # ESS = exp(2 logsumexp(lw) - logsumexp(2 lw)): twice the magnitude
    assert ((ess.double() - reference_ess).abs() <= slack * reference_ess + 1e-6).all(), (ess, reference_ess)
    finite = torch.isfinite(lw).any(0)
    assert ((ess >= 1 - slack) & (ess <= K * (1 + slack)))[finite].all()
    assert ess[column("all -inf")] == 0
    torch.testing.assert_close(ess[column("one dominates")], torch.tensor(1.0))
    torch.testing.assert_close(ess[column("+-1e4 and -inf")], torch.tensor(1.0))
    torch.testing.assert_close(ess[column("all equal")], torch.tensor(float(K)))
    assert abs(ess[column("all equal, large")] - K) <= K * slack[column("all equal, large")]
    # Two of four samples carry the weight equally (the others are -inf): ESS = 2.
    torch.testing.assert_close(effective_sample_size(torch.tensor([[5.0], [-INF], [5.0], [-INF]])), torch.tensor([2.0]))
    # NaN log-weights give a NaN ESS, which shows in the logs, not 0, which looks like a degenerate Q.
    assert effective_sample_size(torch.tensor([[5.0, 1.0], [float("nan"), 2.0]])).isnan().tolist() == [True, False]


def test_weights_and_ess_keep_float32_accuracy_at_large_magnitudes():
    """At |lw| ~ 1e4 the float32 weights still sum to 1 and the ESS is accurate to float32 precision.

    Shifting by the (exactly representable) maximum keeps every difference lw_k - max exact, as
    torch.softmax does; shifting by a rounded logsumexp (ulp(1e4) ~ 1e-3) costs ~4e-4 relative.
    """
    lw = edge_case_log_weights()[:, [column("+1e4"), column("-1e4"), column("all equal, large")]]
    reference = reference_weights(lw.double())
    weights = normalized_weights(lw)
    torch.testing.assert_close(weights.sum(0), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.double(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(effective_sample_size(lw).double(), 1 / (reference**2).sum(0), rtol=1e-5, atol=0)


def test_log_likelihood_estimate_is_logsumexp_minus_log_k():
    lw = edge_case_log_weights()
    estimate = log_likelihood_estimate(lw, K)
    assert not estimate.isnan().any()
    lw64 = lw.double()
    expected = torch.logsumexp(lw64, 0) - math.log(K)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(estimate.double()[finite], expected[finite], rtol=1e-6, atol=1e-5)
    assert estimate[column("all -inf")] == -INF and finite.sum() == len(NAMES) - 1
    torch.testing.assert_close(estimate[column("all equal, large")], torch.tensor(1e4))
    # The count is the one passed in (the samples of a whole sample group), not the local row count.
    torch.testing.assert_close(log_likelihood_estimate(lw, 3 * K)[finite], estimate[finite] - math.log(3))


@pytest.mark.parametrize("loss_fn", [wake_p_loss, wake_q_loss], ids=["wake_p_loss", "wake_q_loss"])
def test_wake_loss_gradient_is_minus_weights_over_batch(loss_fn):
    torch.manual_seed(0)
    k, b = 5, 3
    log_prob = torch.randn(k, b).requires_grad_()
    weights = torch.softmax(torch.randn(k, b), 0).requires_grad_()  # a leaf that would receive a gradient
    loss = loss_fn(log_prob, weights)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, -(weights * log_prob).sum(0).mean())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -weights.detach() / b)
    assert weights.grad is None, "the weights must be treated as constants"


def tiny_model(seed=0, layer_sizes=(4, 3, 2)) -> HelmholtzMachine:
    torch.manual_seed(seed)
    model = HelmholtzMachine(list(layer_sizes), "sbn", "sbn").double()
    randomize_(model.p_conditionals, 1.0)
    randomize_(model.p_prior, 1.0)
    randomize_(model.q_conditionals, 0.3)
    return model


def test_rws_surrogates_rejects_bad_arguments():
    model = tiny_model()
    x = all_binary(4)
    with pytest.raises(ValueError, match="q_update"):
        rws_surrogates(model, x, 5, q_update="sleep-wake")
    with pytest.raises(ValueError, match="num_samples"):
        rws_surrogates(model, x, 0)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, x, 0)


def zero_variance_model() -> HelmholtzMachine:
    """A model whose importance weights are all exactly p(x): x independent of h, and Q(h|x) = p(h).

    P: p(x | h) with zero weights on h (a DARN over x), prior p(h) a DARN; Q: a DARN with zero weights
    on x and the prior's own bias and autoregressive weights. Then w = p(x, h) / q(h | x) = p(x) for
    every h, so the K-sample estimate is exact whatever K and however the samples are chunked.
    """
    torch.manual_seed(0)
    model = HelmholtzMachine([4, 3], p_layer="darn", q_layer="darn").double()
    randomize_(model)
    with torch.no_grad():
        model.p_conditionals[0].cond_weight.weight.zero_()
        q = model.q_conditionals[0]
        q.cond_weight.weight.zero_()
        q.bias.copy_(model.p_prior.bias)
        q.autoregressive_weight.copy_(model.p_prior.autoregressive_weight)
    return model


@pytest.mark.parametrize("num_samples", [1, 10])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 11, None])
def test_log_likelihood_counts_every_sample_across_chunks(num_samples, chunk_size):
    """With all weights equal to p(x), any miscount of samples over (ragged) chunks shows up exactly."""
    model = zero_variance_model()
    x = all_binary(4)
    torch.manual_seed(1)
    estimate = log_likelihood(model, x, num_samples, chunk_size=chunk_size)
    with torch.no_grad():
        exact = exact_log_marginal(model, x)
    assert exact.max() - exact.min() > 1.0  # the data points differ, so a mix-up would be visible too
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-12)


def test_many_float32_chunks_fold_without_drift(monkeypatch):
    """K = 100000 in chunks of one sample (the default chunk size for batches of a few thousand
    points): folded in float32, chunks of log-weight -90 drifted by -0.02 nats; the fold is float64."""
    monkeypatch.setattr(estimators, "chunk_log_sum_weights", lambda model, x, num_samples: torch.full((2,), -90.0))
    model = HelmholtzMachine([4, 3])
    estimate = log_likelihood(model, torch.zeros(2, 4), 100_000, chunk_size=1)
    torch.testing.assert_close(estimate.double(), torch.full((2,), -90.0, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("free_gib", [80, 1])
def test_default_chunks_on_a_gpu_are_larger_and_fit_its_free_memory(monkeypatch, free_gib):
    """A CUDA device gets larger chunks than the CPU (launch-bound kernels otherwise), but never more
    activation floats than a sixteenth of its free memory in bytes. (Only `torch.cuda.mem_get_info` is
    faked: a device object needs no GPU.)"""
    model = HelmholtzMachine([784, 200, 200, 10])
    free_bytes = free_gib * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))
    batch = 100
    cpu, gpu = (estimators.default_chunk_size(model, batch, torch.device(kind)) for kind in ("cpu", "cuda"))
    floats_per_sample = batch * model.floats_per_sample()
    assert cpu * floats_per_sample <= 2**23 < (cpu + 1) * floats_per_sample
    assert gpu > 5 * cpu and gpu * floats_per_sample * 16 <= free_bytes
    assert gpu * floats_per_sample <= 2**29 < (gpu + 1) * floats_per_sample or (gpu + 1) * floats_per_sample * 16 > free_bytes


@pytest.mark.parametrize(
    "chunk_size, compile", [(1, False), (7, False), (None, False), (64, True)], ids=["1", "7", "default", "64-compiled"]
)
def test_log_likelihood_chunk_sizes_agree_with_exact(chunk_size, compile):
    """Chunk sizes draw different samples, so each is compared to the exact log p(x), not to each other.

    Every data point is repeated R times along the batch (independent estimates), and the R * K samples
    per data point are pooled: the mean of exp(estimate) over the R rows estimates p(x) without bias, with
    relative standard error sqrt(chi^2 / (K R)). With `compile=True` the model runs in float32, so its
    compiled chunks draw Q's samples from the tensor-op Philox generator (pipeline/philox.py).
    """
    model = tiny_model()
    x = all_binary(4)[[2, 9]]
    runs, num_samples = 500, 200
    dtype = torch.float32 if compile else torch.float64
    torch.manual_seed(2)
    estimates = log_likelihood(
        model.to(dtype), x.to(dtype).repeat(runs, 1), num_samples, chunk_size=chunk_size, compile=compile
    )
    estimates = estimates.double().reshape(runs, 2)
    assert torch.isfinite(estimates).all()
    with torch.no_grad():
        model.double()
        exact = exact_log_marginal(model, x)
    relative_error = Z * torch.sqrt(chi_square(model, x) / (num_samples * runs))
    assert (relative_error < 0.1).all(), "setup: tolerance too loose"
    pooled = torch.logsumexp(estimates, 0) - math.log(runs)  # log of the mean of exp(estimate)
    assert ((pooled - exact).abs() < relative_error).all(), (pooled, exact, relative_error)
    # Each single estimate is itself close to log p(x) (delta method, K = 200).
    per_row_tolerance = Z * torch.sqrt(chi_square(model, x) / num_samples) + 0.05
    assert ((estimates - exact).abs() < per_row_tolerance).all()
    assert estimates.std(0).min() > 0, "every row must draw its own samples"


def test_compiled_log_likelihood_counts_every_sample_across_chunks():
    """`compile=True` runs each chunk through torch.compile: the ragged last chunk (10 = 3 + 3 + 3 + 1)
    is compiled on its own and must still be counted exactly."""
    model = zero_variance_model()
    x = all_binary(4)
    torch.manual_seed(1)
    estimate = log_likelihood(model, x, 10, chunk_size=3, compile=True)
    with torch.no_grad():
        exact = exact_log_marginal(model, x)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-12)


def test_log_likelihood_with_100000_samples():
    model = tiny_model()
    x = all_binary(4)[[0, 5, 10, 15]]
    num_samples = 100_000
    torch.manual_seed(3)
    estimate = log_likelihood(model, x, num_samples)
    assert estimate.shape == (4,) and torch.isfinite(estimate).all()
    with torch.no_grad():
        exact = exact_log_marginal(model, x)
    chi2 = chi_square(model, x)
    tolerance = Z * torch.sqrt(chi2 / num_samples) + chi2 / num_samples
    assert (tolerance < 0.1).all(), "setup: tolerance too loose"
    assert ((estimate - exact).abs() < tolerance).all(), (estimate - exact, tolerance)


def test_k1_sleep_is_classical_wake_sleep():
    """K = 1 with q_update='sleep': P learns from one unweighted Q-sample, Q from one dream of P per point."""
    model = tiny_model()
    x = all_binary(4).repeat(4, 1)  # B = 64
    torch.manual_seed(4)
    surrogates = rws_surrogates(model, x, 1, q_update="sleep")
    torch.testing.assert_close(surrogates.ess, torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.isfinite(surrogates.log_likelihood).all()
    # Replay the same random stream: Q's samples first, then P's dreams (one per data point).
    torch.manual_seed(4)
    hs = model.sample_q(x, 1)
    dreamed_x, dreamed_hs = model.sample_p(x.shape[0])
    with torch.no_grad():
        log_p, log_q = model.log_p(x, hs), model.log_q(hs, x)
        torch.testing.assert_close(surrogates.log_likelihood, (log_p - log_q)[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(surrogates.p_loss, -log_p.mean(), rtol=1e-12, atol=1e-12)
        dream_loss = -model.log_q(dreamed_hs, dreamed_x).mean()
        torch.testing.assert_close(surrogates.q_loss, dream_loss, rtol=1e-12, atol=1e-12)
    # Q's loss comes from the dreams, not from the wake samples: it differs from the wake loss on the same hs.
    assert not torch.isclose(surrogates.q_loss, -log_q.mean())
    p_grads = torch.autograd.grad(surrogates.p_loss, model.p_parameters(), allow_unused=True, retain_graph=True)
    q_grads = torch.autograd.grad(surrogates.q_loss, model.q_parameters(), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in (*p_grads, *q_grads))
