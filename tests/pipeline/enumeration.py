"""Exact enumeration for tiny Helmholtz machines: the oracles the Monte Carlo estimators are checked against.

Every quantity here is computed by summing over all 2^n binary configurations, in float64, through the
model's own `log_p` / `log_q` (whose per-layer normalization is checked separately by enumeration too).
Nothing here samples, so the results are exact up to rounding.
"""

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.models import HelmholtzMachine


@pytest.fixture(autouse=True)
def single_thread():
    """Run a test on one intra-op thread, restoring the previous setting afterwards.

    The tensors here are small (at most ~10^6 entries): on a machine whose few cores are shared with
    other work, intra-op threads mostly wait for each other, and one thread was measured ~50x faster.
    Import this fixture into a test module to make it autouse there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_binary(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All 2^n binary vectors of length n: [2^n, n], row r is the binary expansion of r (unit 0 = MSB)."""
    codes = torch.arange(2**n).unsqueeze(-1)
    bits = 2 ** torch.arange(n - 1, -1, -1)
    return ((codes & bits) > 0).to(dtype)


def randomize_(module: nn.Module, std: float = 1.0) -> nn.Module:
    """Draw every parameter from normal(0, std), so autoregressive and NADE weights are non-trivial."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std)
    return module


def latent_configurations(model: HelmholtzMachine) -> list[torch.Tensor]:
    """All joint configurations of the latent layers: a list of L tensors [N, H_l], N = 2^(H_1 + ... + H_L)."""
    sizes = model.layer_sizes[1:]
    flat = all_binary(sum(sizes), model.p_prior.bias.dtype)
    return list(flat.split(sizes, dim=-1))


def _expanded(configurations: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """[N, H_l] -> [N, B, H_l] (explicit expand, so the oracle does not rely on broadcasting)."""
    return [h.unsqueeze(1).expand(h.shape[0], batch, h.shape[1]) for h in configurations]


def log_joint_table(model: HelmholtzMachine, x: torch.Tensor) -> torch.Tensor:
    """log p(x_b, h_n) for every latent configuration n and data point b: [N, B] (differentiable)."""
    hs = _expanded(latent_configurations(model), x.shape[0])
    return model.log_p(x.unsqueeze(0).expand(hs[0].shape[0], *x.shape), hs)


def log_q_table(model: HelmholtzMachine, x: torch.Tensor) -> torch.Tensor:
    """log q(h_n | x_b) for every latent configuration n and data point b: [N, B] (differentiable)."""
    hs = _expanded(latent_configurations(model), x.shape[0])
    return model.log_q(hs, x.unsqueeze(0).expand(hs[0].shape[0], *x.shape))


def exact_log_marginal(model: HelmholtzMachine, x: torch.Tensor) -> torch.Tensor:
    """log p(x_b) = logsumexp_h log p(x_b, h): [B] (differentiable w.r.t. P's parameters)."""
    return torch.logsumexp(log_joint_table(model, x), 0)


def exact_posterior(model: HelmholtzMachine, x: torch.Tensor) -> torch.Tensor:
    """P(h_n | x_b): [N, B], detached."""
    with torch.no_grad():
        return torch.softmax(log_joint_table(model, x), 0)


def chi_square(model: HelmholtzMachine, x: torch.Tensor) -> torch.Tensor:
    """chi^2(P(h|x) || Q(h|x)) = sum_h P(h|x)^2 / Q(h|x) - 1 = Var_Q[w / p(x)]: [B].

    With K samples, the relative variance of the importance-sampling estimate of p(x) is chi^2 / K, which
    is what the Monte Carlo tolerances below are derived from.
    """
    with torch.no_grad():
        log_posterior = torch.log_softmax(log_joint_table(model, x), 0)
        return torch.exp(torch.logsumexp(2 * log_posterior - log_q_table(model, x), 0)) - 1


def flat_grad(loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """d loss / d parameters, concatenated; parameters the loss does not reach count as zero."""
    grads = torch.autograd.grad(loss, list(parameters), allow_unused=True, retain_graph=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(parameters, grads)])


class _Method(nn.Module):
    """Calls one method of `model` as `forward`, so `torch.func.functional_call` can swap its parameters."""

    def __init__(self, model: HelmholtzMachine, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def table_grads(
    model: HelmholtzMachine, method: str, x: torch.Tensor, parameters: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-entry gradients of `log_joint_table` (method='log_p') or `log_q_table` (method='log_q'): [N, B, P].

    Entry [n, b] is d/d(parameters) of log p(x_b, h_n) or log q(h_n | x_b), with the parameters flattened
    and concatenated in the given order. One vmapped per-sample gradient (torch.func) over the N * B entries,
    each evaluated through the model's own method on a single unbatched (x, h).
    """
    if method not in ("log_p", "log_q"):
        raise ValueError(method)
    names = {id(p): name for name, p in model.named_parameters()}
    wanted = [names[id(p)] for p in parameters]
    fixed = {"model." + name: p.detach() for name, p in model.named_parameters()}
    wrapper = _Method(model, method)

    def entry(free, x_row, *h_rows):
        args = (x_row, list(h_rows)) if method == "log_p" else (list(h_rows), x_row)
        return functional_call(wrapper, {**fixed, **{"model." + name: v for name, v in free.items()}}, args)

    configurations = latent_configurations(model)
    n, b = configurations[0].shape[0], x.shape[0]
    xs = x.to(configurations[0].dtype).unsqueeze(0).expand(n, *x.shape).reshape(n * b, -1)
    hs = [h.unsqueeze(1).expand(n, b, h.shape[1]).reshape(n * b, -1) for h in configurations]
    free = {name: fixed["model." + name] for name in wanted}
    grads = vmap(grad(entry), in_dims=(None, 0, *[0] * len(hs)))(free, xs, *hs)
    return torch.cat([grads[name].reshape(n * b, -1) for name in wanted], 1).reshape(n, b, -1)


def self_normalized_error_scale(
    posterior: torch.Tensor, log_q: torch.Tensor, grads: torch.Tensor, num_samples: int
) -> float:
    """Asymptotic RMS error (Euclidean norm) of mean_b sum_k w_k g(x_b, h_k) around mean_b E_P(h|x_b)[g].

    For self-normalized importance sampling with K samples from Q, the estimate of E_P[g] has asymptotic
    covariance (1/K) E_Q[(P/Q)^2 (g - E_P g)(g - E_P g)^T]; its trace, summed over the B independent data
    points and divided by B^2 (the batch mean), is the expected squared error norm.
    `posterior`, `log_q`: [N, B] tables; `grads`: [N, B, P], the vector g for each table entry.
    """
    b = posterior.shape[1]
    mean = (posterior.unsqueeze(-1) * grads).sum(0, keepdim=True)  # [1, B, P]
    spread = ((grads - mean) ** 2).sum(-1)  # [N, B]
    variance = (torch.exp(2 * torch.log(posterior) - log_q) * spread).sum(0) / num_samples  # [B]
    return math.sqrt(variance.sum().item()) / b


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()
