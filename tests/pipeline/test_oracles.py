"""Exact-enumeration oracles for the RWS estimators on tiny Helmholtz machines.

Every test builds a model with layer_sizes [4, 3, 2] (16 values of x, 32 joint latent configurations,
512 joint (x, h)) for every combination of P and Q layer types plus one mixed per-layer model, draws all
parameters at random, and checks a Monte Carlo quantity of `pipeline.estimators` against the same
quantity summed exactly over all configurations (`tests/pipeline/enumeration.py`).

Tolerances come from the exact Monte Carlo standard error, itself computed by enumeration:
    - importance sampling of p(x) with K samples has relative variance chi^2(P(h|x) || Q(h|x)) / K;
    - self-normalized importance sampling of E_P(h|x)[g] has asymptotic covariance
      (1/K) E_Q[(P/Q)^2 (g - E_P g)(g - E_P g)^T];
    - the sleep phase averages N i.i.d. draws from P(x, h), covariance Cov_P[g] / N.
Each test also asserts that the tolerance is tight enough to tell the right answer from a plausible
wrong one (unweighted averaging, a log-likelihood that is unbiased in log p instead of p, ...).

The samplers, the log-likelihood estimate and the gradient estimates are checked on every backend
(`backend`): float64 and float32 on every device this machine has. The estimate runs on a copy of
the model there, the exact tables in float64 on the CPU. float32 on a CPU is what training runs:
DARN's and NADE's C kernels where they build (the SBN kernels take only layers wider than these;
tests/pipeline/test_sample_log_prob.py checks them against dense products). Without a GPU the CUDA
cases are skipped. Two more tests cover the compiled step, and depths other than [4, 3, 2].
"""

import copy
import itertools
import math
from typing import NamedTuple

import pytest
import torch

from pipeline.estimators import Q_UPDATES, log_likelihood, rws_surrogates
from pipeline.models import HelmholtzMachine

from .enumeration import (
    all_binary,
    chi_square,
    cosine,
    exact_log_marginal,
    exact_posterior,
    flat_grad,
    log_joint_table,
    log_q_table,
    randomize_,
    self_normalized_error_scale,
    single_thread,  # noqa: F401  (autouse fixture)
    table_grads,
)

LAYER_SIZES = [4, 3, 2]
NADE_HIDDEN = 5
P_STD = 1.0  # P's parameters: a peaked, non-trivial posterior
Q_STD = 0.3  # Q's parameters: broader than the posterior, so importance sampling is not hopeless (chi^2 ~ 1-30)
Z = 5.0  # standard errors allowed for a Monte Carlo estimate (two-sided normal tail ~ 6e-7)

KINDS = ("sbn", "darn", "nade")
COMBINATIONS = [(p, q) for p, q in itertools.product(KINDS, KINDS)] + [(["nade", "darn", "sbn"], ["darn", "nade"])]


def _name(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


def make_model(p_layer, q_layer, seed: int = 0, layer_sizes=LAYER_SIZES) -> HelmholtzMachine:
    torch.manual_seed(seed)
    model = HelmholtzMachine(layer_sizes, p_layer, q_layer, nade_hidden=NADE_HIDDEN).double()
    randomize_(model.p_conditionals, P_STD)
    randomize_(model.p_prior, P_STD)
    randomize_(model.q_conditionals, Q_STD)
    return model


@pytest.fixture(params=COMBINATIONS, ids=[f"p={_name(p)},q={_name(q)}" for p, q in COMBINATIONS])
def model(request) -> HelmholtzMachine:
    return make_model(*request.param)


class Backend(NamedTuple):
    """Where and in which precision an estimate runs (the exact tables stay float64 on the CPU)."""

    device: str
    dtype: torch.dtype

    def model(self, model: HelmholtzMachine) -> HelmholtzMachine:
        """The model itself for the CPU in float64, else a copy of it here."""
        return model if self == EXACT else copy.deepcopy(model).to(self.device, self.dtype)

    def data(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)


EXACT = Backend("cpu", torch.float64)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BACKENDS = [
    pytest.param(Backend(device, dtype), id=f"{device}-{str(dtype).removeprefix('torch.')}", marks=marks)
    for device, marks in (("cpu", ()), ("cuda", NO_CUDA))
    for dtype in (torch.float64, torch.float32)
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return request.param


def exact_dtype(estimate: torch.Tensor) -> torch.Tensor:
    """An estimate brought beside the exact tables: float64 on the CPU."""
    return estimate.to("cpu", torch.float64)


def all_x() -> torch.Tensor:
    return all_binary(LAYER_SIZES[0])


def some_x() -> torch.Tensor:
    """A fixed handful of data points (rows 1, 6, 10 and 15 of the 16)."""
    return all_x()[[1, 6, 10, 15]]


def binary_index(bits: torch.Tensor) -> torch.Tensor:
    """Row index in `all_binary(n)` of each binary vector in `bits` [..., n] (unit 0 = MSB)."""
    n = bits.shape[-1]
    return (bits.long() * (2 ** torch.arange(n - 1, -1, -1))).sum(-1)


def assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor, num_draws: int, what: str):
    """Every cell's empirical frequency is within Z binomial standard errors of its probability.

    The extra Z / num_draws is a continuity allowance for cells with only a handful of expected counts,
    where the normal approximation of the binomial is poor.
    """
    freq = counts / num_draws
    tolerance = Z * torch.sqrt(probs * (1 - probs) / num_draws) + Z / num_draws
    excess = ((freq - probs).abs() / tolerance).max().item()
    assert excess < 1, f"{what}: a frequency is {excess:.2f}x its tolerance off the enumerated probability"


# ---------------------------------------------------------------------------------------------------------
# The enumeration itself: normalization, and the samplers against the enumerated distributions
# ---------------------------------------------------------------------------------------------------------


def test_p_and_q_normalize_over_all_configurations(model):
    x = all_x()
    log_joint = log_joint_table(model, x)  # [32, 16]
    assert log_joint.shape == (2 ** sum(LAYER_SIZES[1:]), 2 ** LAYER_SIZES[0])
    total = torch.logsumexp(log_joint.flatten(), 0)
    assert abs(total.item()) < 1e-12, f"sum over (x, h) of p(x, h) = exp({total.item()})"
    log_q_total = torch.logsumexp(log_q_table(model, x), 0)  # [16]
    torch.testing.assert_close(log_q_total, torch.zeros_like(log_q_total), atol=1e-12, rtol=0)


def test_samplers_match_enumerated_distributions(model, backend):
    torch.manual_seed(1)
    x = all_x()
    sampler = backend.model(model)
    num_latent = sum(LAYER_SIZES[1:])
    # sample_q: K draws per x, against q(h | x).
    num_draws = 20_000
    hs = sampler.sample_q(backend.data(x), num_draws)
    expected = [((num_draws, 16, size), backend.device, backend.dtype) for size in LAYER_SIZES[1:]]
    assert [(tuple(h.shape), h.device.type, h.dtype) for h in hs] == expected
    h_index = binary_index(torch.cat(hs, -1).cpu())  # [K, 16]
    counts = torch.zeros(2**num_latent, 16, dtype=torch.float64)
    counts.scatter_add_(0, h_index, torch.ones_like(h_index, dtype=torch.float64))
    with torch.no_grad():
        assert_frequencies_match(counts, log_q_table(model, x).exp(), num_draws, "sample_q")
    # sample_p: ancestral draws of (x, h), against p(x, h).
    num_draws = 200_000
    x_drawn, hs = sampler.sample_p(num_draws)
    assert x_drawn.shape == (num_draws, LAYER_SIZES[0]) and (x_drawn.device.type, x_drawn.dtype) == backend
    assert [tuple(h.shape) for h in hs] == [(num_draws, size) for size in LAYER_SIZES[1:]]
    x_drawn, hs = x_drawn.cpu(), [h.cpu() for h in hs]
    joint_index = binary_index(torch.cat(hs, -1)) * 16 + binary_index(x_drawn)  # row-major in the [32, 16] table
    counts = torch.bincount(joint_index, minlength=2**num_latent * 16).to(torch.float64)
    with torch.no_grad():
        assert_frequencies_match(counts, log_joint_table(model, x).exp().flatten(), num_draws, "sample_p")


# ---------------------------------------------------------------------------------------------------------
# The log-likelihood estimate
# ---------------------------------------------------------------------------------------------------------


def test_log_likelihood_converges_to_exact_log_marginal(model, backend):
    torch.manual_seed(2)
    x = some_x()
    num_samples = 50_000
    estimate = exact_dtype(log_likelihood(backend.model(model), backend.data(x), num_samples))
    _check_log_likelihood(estimate, model, x, num_samples)


def _check_log_likelihood(estimate: torch.Tensor, model: HelmholtzMachine, x: torch.Tensor, num_samples: int):
    """A K-sample estimate of log p(x) [B] is within its tolerance of the exact log-marginal."""
    with torch.no_grad():
        exact = exact_log_marginal(model, x)
    # Delta method: log p_hat - log p(x) ~ (p_hat - p) / p, of variance chi^2 / K; its bias is -chi^2 / (2K).
    chi2 = chi_square(model, x)
    tolerance = Z * torch.sqrt(chi2 / num_samples) + chi2 / num_samples
    # 0.25 nats tells the estimate apart from one that drops a term (log K is 9.2 nats at K = 10000).
    assert tolerance.max() < 0.25, "setup: the model's chi^2 is too large for a meaningful tolerance"
    assert estimate.shape == exact.shape
    error = (estimate - exact).abs()
    assert (error < tolerance).all(), f"|log p_hat - log p| = {error.tolist()}, tolerance {tolerance.tolist()}"


def _exact_moments_of_log_estimate(lw: torch.Tensor, log_q: torch.Tensor, num_samples: int):
    """Mean and variance of log((1/K) sum_k w_k), h_k ~ Q i.i.d., over all N^K tuples: ([B], [B]).

    `lw`, `log_q`: [N, B] tables of log-weights and log q over the N latent configurations.
    """
    n, b = lw.shape
    tuple_lw = torch.full([n] * num_samples + [b], -math.inf, dtype=lw.dtype)
    tuple_log_q = torch.zeros([n] * num_samples + [b], dtype=lw.dtype)
    for k in range(num_samples):  # broadcast sample k along tuple axis k
        shape = [1] * num_samples + [b]
        shape[k] = n
        tuple_lw = torch.logaddexp(tuple_lw, lw.reshape(shape))
        tuple_log_q = tuple_log_q + log_q.reshape(shape)
    log_estimate = (tuple_lw - math.log(num_samples)).reshape(-1, b)
    prob = tuple_log_q.reshape(-1, b).exp()
    estimate = (prob * log_estimate).sum(0)
    variance = (prob * (log_estimate - estimate) ** 2).sum(0)
    return estimate, variance


@pytest.mark.parametrize("num_samples, via", [(2, "log_likelihood"), (3, "rws_surrogates")])
def test_estimate_is_unbiased_in_p_and_biased_down_in_log_p(model, num_samples, via):
    """With K = 2 or 3 samples, E[exp(estimate)] = p(x) exactly, while E[estimate] < log p(x) (Jensen).

    The mean and variance of the log-estimate are enumerated exactly over all K-tuples of latent
    configurations, so the Jensen gap is checked against its exact value too.
    """
    torch.manual_seed(3)
    x = some_x()
    runs = 30_000 // num_samples  # independent estimates per data point, vectorized along the batch
    batch = x.repeat(runs, 1)  # row r * 4 + j holds x_j
    if via == "log_likelihood":
        estimates = log_likelihood(model, batch, num_samples)
    else:
        estimates = rws_surrogates(model, batch, num_samples, q_update="wake").log_likelihood
    estimates = estimates.reshape(runs, x.shape[0])
    assert torch.isfinite(estimates).all()

    with torch.no_grad():
        log_joint, log_q = log_joint_table(model, x), log_q_table(model, x)
    exact_log_p = torch.logsumexp(log_joint, 0)
    p = exact_log_p.exp()
    # Unbiased in p: exp(estimate) = mean of K weights, of variance p^2 chi^2 / K.
    standard_error = p * torch.sqrt(chi_square(model, x) / (num_samples * runs))
    mean_p_hat = estimates.exp().mean(0)
    assert (standard_error < 0.05 * p).all(), "setup: too few runs to resolve a 5% bias in p"
    assert ((mean_p_hat - p).abs() < Z * standard_error).all(), (
        f"mean of p_hat {mean_p_hat.tolist()} vs p(x) {p.tolist()}, standard error {standard_error.tolist()}"
    )
    # Biased in log p: its mean is the exact E[log p_hat_K], strictly below log p(x) by many standard errors.
    expected_log, variance_log = _exact_moments_of_log_estimate(log_joint - log_q, log_q, num_samples)
    log_standard_error = torch.sqrt(variance_log / runs)
    mean_log = estimates.mean(0)
    assert ((mean_log - expected_log).abs() < Z * log_standard_error).all(), (
        f"mean log-estimate {mean_log.tolist()} vs exact E[log p_hat] {expected_log.tolist()}"
    )
    jensen_gap = exact_log_p - mean_log
    assert (jensen_gap > 2 * Z * log_standard_error).all(), (
        f"log-estimate not biased down: gap {jensen_gap.tolist()}, standard error {log_standard_error.tolist()}"
    )
    # ... and E[p_hat] = p(x) is not an artifact of a log-unbiased estimator: exp(E[log p_hat]) misses p by far.
    assert ((exp_mean := expected_log.exp()) < p - 2 * Z * standard_error).all(), (exp_mean, p)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def _grad_or_none(loss, parameters):
    return torch.autograd.grad(loss, list(parameters), allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("q_update", Q_UPDATES)
def test_gradient_routing(model, q_update):
    """p_loss reaches only P's parameters, q_loss only Q's: each loss has zero/None gradient on the other."""
    torch.manual_seed(4)
    surrogates = rws_surrogates(model, all_x(), 5, q_update=q_update)
    p_params, q_params = model.p_parameters(), model.q_parameters()
    assert {id(p) for p in p_params}.isdisjoint(id(q) for q in q_params)
    assert len(p_params) + len(q_params) == len(list(model.parameters()))
    for loss, own, other, name in [
        (surrogates.p_loss, p_params, q_params, "p_loss"),
        (surrogates.q_loss, q_params, p_params, "q_loss"),
    ]:
        assert loss.dim() == 0 and torch.isfinite(loss)
        leaked = [g for g in _grad_or_none(loss, other) if g is not None and g.abs().max() > 0]
        assert not leaked, f"{name} has a non-zero gradient on the other network's parameters"
        own_grads = _grad_or_none(loss, own)
        assert sum(g.abs().sum() for g in own_grads if g is not None) > 0, f"{name} has no gradient at all"
    for value in (surrogates.log_likelihood, surrogates.ess):
        assert value.shape == (16,) and not value.requires_grad


class GradientOracle(NamedTuple):
    """The exact expectation of a gradient estimator, its Monte Carlo error scale, and a plausible mistake."""

    exact: torch.Tensor  # [P]
    error_scale: float  # asymptotic RMS error (Euclidean norm) of the estimate
    wrong: torch.Tensor  # [P], the exact value of a plausible mistake


def p_gradient_oracle(model: HelmholtzMachine, x: torch.Tensor, num_samples: int) -> GradientOracle:
    """P's gradient of the wake surrogate: -grad mean_x log p(x), which self-normalized weights recover."""
    p_params = model.p_parameters()
    posterior = exact_posterior(model, x)
    with torch.no_grad():
        log_q = log_q_table(model, x)
    scores = table_grads(model, "log_p", x, p_params)  # [N, B, P]: grad log p(x_b, h_n)
    return GradientOracle(
        exact=flat_grad(-exact_log_marginal(model, x).mean(), p_params),
        error_scale=self_normalized_error_scale(posterior, log_q, scores, num_samples),
        # Averaging grad log p(x, h) over h ~ Q without importance weights.
        wrong=flat_grad(-(log_q.exp() * log_joint_table(model, x)).sum(0).mean(), p_params),
    )


def wake_q_oracle(model: HelmholtzMachine, x: torch.Tensor, num_samples: int) -> GradientOracle:
    """Q's wake gradient: -mean_x E_P(h|x)[grad log q(h|x)], descending KL(P(h|x) || Q(h|x))."""
    q_params = model.q_parameters()
    posterior = exact_posterior(model, x)
    log_q = log_q_table(model, x)
    exact = flat_grad(-(posterior * log_q).sum(0).mean(), q_params)
    scores = table_grads(model, "log_q", x, q_params)
    return GradientOracle(
        exact=exact,
        error_scale=self_normalized_error_scale(posterior, log_q.detach(), scores, num_samples),
        wrong=torch.zeros_like(exact),  # unweighted samples from Q, whose expected score is exactly zero
    )


def sleep_q_oracle(model: HelmholtzMachine, num_draws: int) -> GradientOracle:
    """Q's sleep gradient: -sum_{x,h} p(x, h) grad log q(h|x), averaged over `num_draws` draws from P."""
    q_params = model.q_parameters()
    x_all = all_binary(model.layer_sizes[0])
    log_q = log_q_table(model, x_all)  # [N, 2^D]
    with torch.no_grad():
        joint = log_joint_table(model, x_all).exp()
    # Mean of i.i.d. scores under P: expected squared error norm = E_P |g - E_P g|^2 / num_draws.
    scores = table_grads(model, "log_q", x_all, q_params)  # [N, 2^D, P]
    mean_score = (joint.unsqueeze(-1) * scores).sum((0, 1))
    x_wake = x_all[-1:]
    return GradientOracle(
        exact=flat_grad(-(joint * log_q).sum(), q_params),
        error_scale=math.sqrt((joint * ((scores - mean_score) ** 2).sum(-1)).sum().item() / num_draws),
        # A wake update for the data point instead of a sleep update.
        wrong=flat_grad(-(exact_posterior(model, x_wake) * log_q_table(model, x_wake)).sum(), q_params),
    )


def _check_gradient(estimate: torch.Tensor, oracle: GradientOracle, what: str):
    """estimate vs the oracle's exact value: cosine > 0.99 and error within Z asymptotic standard errors
    (of the norm). The oracle's plausible mistake must lie well outside the tolerance, so the check can
    tell the two apart."""
    exact, tolerance = oracle.exact, Z * oracle.error_scale
    assert tolerance < 0.15 * exact.norm(), f"setup: {what} tolerance {tolerance} too loose for |g| = {exact.norm()}"
    assert (oracle.wrong - exact).norm() > 2 * tolerance, f"setup: {what} cannot distinguish the plausible mistake"
    estimate = exact_dtype(estimate)
    similarity = cosine(estimate, exact)
    assert similarity > 0.99, f"{what}: cosine {similarity}"
    error = (estimate - exact).norm().item()
    assert error < tolerance, f"{what}: |g - g_exact| = {error:.4g} > {tolerance:.4g} (|g_exact| = {exact.norm():.4g})"


GRADIENT_SAMPLES = 10_000  # K per data point in the wake gradient checks
SLEEP_DRAWS = 100_000  # draws from P in the sleep gradient checks


def _sleep_batch(model: HelmholtzMachine) -> torch.Tensor:
    """SLEEP_DRAWS copies of the last data point: in a sleep-only step x only sets the number of draws."""
    return all_binary(model.layer_sizes[0])[-1].expand(SLEEP_DRAWS, model.layer_sizes[0])


def _check_wake_gradients(surrogates, estimator: HelmholtzMachine, model: HelmholtzMachine, x: torch.Tensor,
                          num_samples: int, what: str = ""):  # fmt: skip
    """P's and Q's gradients of a wake step of `estimator` (`model` on some backend) against their oracles."""
    p_estimate = flat_grad(surrogates.p_loss, estimator.p_parameters())
    _check_gradient(p_estimate, p_gradient_oracle(model, x, num_samples), f"{what}P gradient")
    q_estimate = flat_grad(surrogates.q_loss, estimator.q_parameters())
    _check_gradient(q_estimate, wake_q_oracle(model, x, num_samples), f"{what}wake Q gradient")


def test_wake_gradients_match_exact_values(model, backend):
    """One wake step: P's gradient ~ -grad mean_x log p(x), Q's ~ -mean_x E_P(h|x)[grad log q(h|x)]."""
    torch.manual_seed(5)
    x = all_x()
    estimator = backend.model(model)
    surrogates = rws_surrogates(estimator, backend.data(x), GRADIENT_SAMPLES, q_update="wake")
    _check_wake_gradients(surrogates, estimator, model, x, GRADIENT_SAMPLES)


def test_sleep_q_gradient_matches_exact_expectation_under_p(model, backend):
    """q_update='sleep': one P-draw per data point."""
    torch.manual_seed(7)
    estimator = backend.model(model)
    surrogates = rws_surrogates(estimator, backend.data(_sleep_batch(model)), 1, q_update="sleep")
    estimate = flat_grad(surrogates.q_loss, estimator.q_parameters())
    _check_gradient(estimate, sleep_q_oracle(model, SLEEP_DRAWS), "sleep Q gradient")


def test_wake_sleep_q_gradient_is_sum_of_wake_and_sleep(model):
    """Same seed, same samples: 'wake-sleep' = 'wake' + 'sleep' exactly; P's loss does not depend on the mode."""
    x = all_x().repeat(50, 1)
    q_params, p_params = model.q_parameters(), model.p_parameters()
    results = {}
    for q_update in Q_UPDATES:
        torch.manual_seed(8)
        surrogates = rws_surrogates(model, x, 10, q_update=q_update)
        results[q_update] = (surrogates, flat_grad(surrogates.q_loss, q_params), flat_grad(surrogates.p_loss, p_params))
    (wake, g_wake, gp_wake), (sleep, g_sleep, gp_sleep), (both, g_both, gp_both) = (results[u] for u in Q_UPDATES)
    # The Q-samples (drawn first in every mode) are the same: identical P loss, gradient and diagnostics.
    for other, gp_other in [(sleep, gp_sleep), (both, gp_both)]:
        assert torch.equal(other.p_loss, wake.p_loss)
        assert torch.equal(gp_other, gp_wake)
        assert torch.equal(other.log_likelihood, wake.log_likelihood)
        assert torch.equal(other.ess, wake.ess)
    torch.testing.assert_close(both.q_loss, wake.q_loss + sleep.q_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_both, g_wake + g_sleep, rtol=1e-10, atol=1e-12)
    # Neither part is negligible, so dropping one of them would fail the check above.
    assert g_wake.norm() > 0.1 and g_sleep.norm() > 0.1 and (g_wake - g_sleep).norm() > 0.1


COMPILED = [
    pytest.param("sbn", "sbn", id="p=sbn,q=sbn"),
    pytest.param(["nade", "darn", "sbn"], ["darn", "nade"], id="p=nade-darn-sbn,q=darn-nade", marks=pytest.mark.slow),  # 20 s
]


@pytest.mark.parametrize("p_layer, q_layer", COMPILED)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NO_CUDA)])
def test_compiled_step_gradients_match_exact_gradients(p_layer, q_layer, device):
    """torch.compile(rws_surrogates) in float32, as `RWSModule(compile=True)` trains: on a CPU it draws
    from the Philox uniforms of `pipeline.philox` and runs the C kernels inside the graph, on a GPU
    Inductor generates its kernels, and it fuses the log-prob passes. Its P, wake-Q and sleep-Q
    gradients and its log-likelihood estimate must still match the exact (float64) ones."""
    torch.manual_seed(8)
    model = make_model(p_layer, q_layer)
    x = all_x()
    backend = Backend(device, torch.float32)
    model32 = backend.model(model)
    step = torch.compile(rws_surrogates, dynamic=False)
    surrogates = step(model32, backend.data(x), GRADIENT_SAMPLES, "wake")
    _check_wake_gradients(surrogates, model32, model, x, GRADIENT_SAMPLES, "compiled ")
    _check_log_likelihood(exact_dtype(surrogates.log_likelihood), model, x, GRADIENT_SAMPLES)
    sleep = step(model32, backend.data(_sleep_batch(model)), 1, "sleep")
    sleep_estimate = flat_grad(sleep.q_loss, model32.q_parameters())
    _check_gradient(sleep_estimate, sleep_q_oracle(model, SLEEP_DRAWS), "compiled sleep Q gradient")


# Depths other than LAYER_SIZES' two latent layers, with a mix of layer types (one per layer).
DEPTHS = [([4, 3], ["nade", "sbn"], ["darn"]), ([3, 2, 2, 2], ["sbn", "darn", "nade", "sbn"], ["nade", "darn", "sbn"])]


@pytest.mark.parametrize("layer_sizes, p_layer, q_layer", DEPTHS, ids=["one latent layer", "three latent layers"])
def test_estimators_match_exact_values_at_other_depths(layer_sizes, p_layer, q_layer):
    """One latent layer (P's prior feeds x directly) and three: the log-likelihood and every gradient."""
    model = make_model(p_layer, q_layer, layer_sizes=layer_sizes)
    x = all_binary(layer_sizes[0])
    torch.manual_seed(9)
    _check_log_likelihood(log_likelihood(model, x, 50_000), model, x, 50_000)
    num_samples = 4 * GRADIENT_SAMPLES  # x has only 8 values here, and the deeper model's gradients are smaller
    surrogates = rws_surrogates(model, x, num_samples, q_update="wake")
    _check_wake_gradients(surrogates, model, model, x, num_samples)
    sleep = rws_surrogates(model, _sleep_batch(model), 1, q_update="sleep")
    _check_gradient(flat_grad(sleep.q_loss, model.q_parameters()), sleep_q_oracle(model, SLEEP_DRAWS), "sleep Q gradient")
