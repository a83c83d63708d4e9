"""Reweighted Wake-Sleep estimators as small pure functions of log-probabilities.

For a data point x and K samples h_k ~ Q(h | x) (Bornschein & Bengio, 2015, Sec. 2-3):

    log-weights         lw_k = log p(x, h_k) - log q(h_k | x)                      (Eq. 4)
    normalized weights  w_k  = exp(lw_k) / sum_j exp(lw_j)                          (Eq. 5)
    log-likelihood      log p(x) ~= logsumexp_k lw_k - log K  (unbiased in p(x))    (Eq. 4)
    wake P update       sum_k w_k grad log p(x, h_k)                                (Eq. 6)
    wake Q update       sum_k w_k grad log q(h_k | x)    (descends KL(P(h|x) || Q)) (Eq. 7)
    sleep Q update      grad log q(h | x), (x, h) ~ P    (the classical sleep phase)

"Unbiased" holds for samples drawn exactly from Q; the samplers compare against float uniforms, so
a unit value to which Q gives 2^-25 or less (float32) is never drawn (`pipeline/bernoulli.py`,
`bernoulli_draws`), a bias far below the estimate's standard error.

Samples are discrete, so no gradient flows through them: each loss below is a surrogate whose
gradient is the update, with the weights held constant. Every reduction over samples goes through
`sharded_logsumexp`, so the same functions work when the K samples are spread over a sample group.

References: [1] Reweighted Wake-Sleep, Bornschein & Bengio, ICLR 2015 (arXiv 1406.2751).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipeline.distributed import group_size, sharded_logsumexp, sharded_softmax, sharded_sum, split_evenly
from pipeline.models import HelmholtzMachine

Q_UPDATES = ("wake", "sleep", "wake-sleep")

# Activation floats per chunk that `log_likelihood` aims for when it picks a chunk size: 32 MB.
# `rws eval` of SBN 784-200-200-10 on 100 test points at K = 40000 (2-core CPU): 0.49 GiB peak
# against 0.70 GiB for the 2^25 floats used before, at the same throughput within this VM's noise.
_CHUNK_BUDGET_FLOATS = 2**23

# On a GPU a chunk that small leaves the kernels launch-bound: on an H200, `rws eval` of the same
# model at K = 100000 on 100 test points ran 1.3M points x samples/s with 52 samples per chunk (2^23
# floats), 9.3M with 500 and 12.7M with 5000 (5.2 GiB peak) (benchmarks/RESULTS.md, 2026-12-04).
# So a GPU chunk aims for 2^29 floats (2 GiB), or a sixteenth of the free memory in bytes if less.
_GPU_CHUNK_BUDGET_FLOATS = 2**29


def log_weights(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """lw_k = log p(x, h_k) - log q(h_k | x): [K, B]."""
    return log_p - log_q


def normalized_weights(log_weights: torch.Tensor, sample_group: ProcessGroup | None = None) -> torch.Tensor:
    """w_k = softmax_k(lw_k), detached: [K, B]. A point whose log-weights are all -inf gets w = 0."""
    return sharded_softmax(log_weights, sample_group)


def effective_sample_size(log_weights: torch.Tensor, sample_group: ProcessGroup | None = None) -> torch.Tensor:
    """ESS = 1 / sum_k w_k^2: [B], in [1, K] (0 for a point whose log-weights are all -inf, NaN for NaN ones)."""
    return _effective_sample_size_of(normalized_weights(log_weights, sample_group), sample_group)


def _effective_sample_size_of(weights: torch.Tensor, sample_group: ProcessGroup | None) -> torch.Tensor:
    """ESS from normalized weights [K, B], so a caller that has them does not normalize twice."""
    sum_squares = sharded_sum((weights**2).sum(0), sample_group)  # [B]
    # `== 0`, not `> 0`: NaN weights give a NaN ESS, which shows in the logs, rather than 0.
    return torch.where(sum_squares == 0, torch.zeros_like(sum_squares), 1 / sum_squares)


def log_likelihood_estimate(
    log_weights: torch.Tensor, num_samples: int, sample_group: ProcessGroup | None = None
) -> torch.Tensor:
    """log p(x) ~= logsumexp_k lw_k - log K over all `num_samples` samples of the group: [B]."""
    return sharded_logsumexp(log_weights, sample_group) - math.log(num_samples)


def wake_p_loss(log_p: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is -mean_b sum_k w_k grad log p(x_b, h_k) (Eq. 6). Scalar."""
    return -(weights.detach() * log_p).sum(0).mean()


def wake_q_loss(log_q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is -mean_b sum_k w_k grad log q(h_k | x_b) (Eq. 7). Scalar."""
    return -(weights.detach() * log_q).sum(0).mean()


def sleep_q_loss(model: HelmholtzMachine, num_draws: int, batch_size: int | None = None) -> torch.Tensor:
    """Surrogate whose gradient is -(1 / batch_size) sum over `num_draws` draws (x, h) ~ P of grad log q(h | x).

    `batch_size` defaults to `num_draws` (a mean); a rank holding part of a sample group's draws
    passes the group's total so that the ranks' losses add up to the mean. Scalar.
    Cost: one ancestral pass through P and one log-prob pass through Q for `num_draws` draws.
    """
    x, hs = model.sample_p(num_draws)  # [N, D], L x [N, H_l]
    return -model.log_q(hs, x).sum() / (batch_size or num_draws)


@dataclass
class RWSSurrogates:
    """What one RWS step needs: two losses to backpropagate and two diagnostics per data point."""

    p_loss: torch.Tensor  # scalar, gradient only on P's parameters (x S under sample parallelism)
    q_loss: torch.Tensor  # scalar, gradient only on Q's parameters (x S under sample parallelism)
    log_likelihood: torch.Tensor  # [B], the K-sample estimate of log p(x), detached
    ess: torch.Tensor  # [B], effective sample size of the normalized weights


def rws_surrogates(
    model: HelmholtzMachine,
    x: torch.Tensor,
    num_samples: int,
    q_update: str = "wake-sleep",
    sample_group: ProcessGroup | None = None,
) -> RWSSurrogates:
    """The RWS losses for a batch x [B, D] with K = `num_samples` samples from Q per data point.

    `q_update` picks Q's update: 'wake' (Eq. 7), 'sleep' (one draw from P per data point) or
    'wake-sleep' (their sum, the paper's best). K=1 with 'sleep' is classical wake-sleep.
    Cost: one pass through Q that samples and scores, one log-prob pass through P for K x B samples, plus
    for sleep one ancestral pass through P and a log-prob pass through Q for B draws.

    Sample parallelism: with a `sample_group` of S ranks that hold the same x, the K samples and
    the B sleep draws are split across the ranks (sizes differ by at most one), each rank drawing
    its own share. The weights are normalized over the whole group, so rank r's wake loss gives
    the partial sum g_r of the single-process gradient G = sum_r g_r over its own samples, and its
    sleep loss likewise. Training wraps the model in DDP over the world of D data-parallel groups
    x S ranks, which averages: (1 / (D S)) sum_d sum_r g_{d,r} = (1 / S) * (1 / D) sum_d G_d.
    The losses are therefore multiplied by S, and after DDP's averaging the update is the mean
    over data groups of the single-process update, exactly as with K samples on one process.
    """
    if q_update not in Q_UPDATES:
        raise ValueError(f"q_update must be one of {Q_UPDATES}, got {q_update!r}")
    group_ranks, rank = _group_position(sample_group)
    if num_samples < group_ranks:
        raise ValueError(f"num_samples must be >= 1 per rank of the sample group, got {num_samples} for {group_ranks} ranks")
    hs, log_q = model.sample_q_with_log_q(x, split_evenly(num_samples, group_ranks, rank))  # L x [K, B, H_l], [K, B]
    log_p = model.log_p(x, hs)  # [K, B]
    lw = log_weights(log_p, log_q).detach()  # [K, B]
    weights = normalized_weights(lw, sample_group)  # [K, B]
    q_loss = log_q.new_zeros(())
    if q_update in ("wake", "wake-sleep"):
        q_loss = q_loss + wake_q_loss(log_q, weights)
    if q_update in ("sleep", "wake-sleep"):
        batch_size = x.shape[0]
        q_loss = q_loss + sleep_q_loss(model, split_evenly(batch_size, group_ranks, rank), batch_size)
    return RWSSurrogates(
        p_loss=group_ranks * wake_p_loss(log_p, weights),
        q_loss=group_ranks * q_loss,
        log_likelihood=log_likelihood_estimate(lw, num_samples, sample_group),
        ess=_effective_sample_size_of(weights, sample_group),
    )


def _group_position(sample_group: ProcessGroup | None) -> tuple[int, int]:
    """(number of ranks, this rank's index) in the sample group; (1, 0) without one."""
    size = group_size(sample_group)
    return size, dist.get_rank(sample_group) if size > 1 else 0


def default_chunk_size(model: HelmholtzMachine, batch_size: int, device: torch.device) -> int:
    """Samples per chunk so that one chunk's log-prob pass holds about 2**23 activation floats on a
    CPU, and on a CUDA device 2**29 or a sixteenth of its free memory in bytes, the smaller."""
    budget = _CHUNK_BUDGET_FLOATS
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(_GPU_CHUNK_BUDGET_FLOATS, free_bytes // 16)
    return max(1, budget // (batch_size * model.floats_per_sample()))


def chunk_log_sum_weights(model: HelmholtzMachine, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """logsumexp_k lw_k over `num_samples` fresh samples h_k ~ Q(h | x): [B], one chunk of Eq. 4's sum."""
    hs, log_q = model.sample_q_with_log_q(x, num_samples)
    return torch.logsumexp(log_weights(model.log_p(x, hs), log_q), 0)


# Compiled once per (model, batch, chunk) shape: a K = 100000 evaluation reuses it for every chunk
# but the last. Its elementwise passes fuse around the matmuls (benchmarks/RESULTS.md).
_compiled_chunk_log_sum_weights = torch.compile(chunk_log_sum_weights, dynamic=False)


@torch.no_grad()
def log_likelihood(
    model: HelmholtzMachine,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int | None = None,
    sample_group: ProcessGroup | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Importance-sampling estimate of log p(x) with K = `num_samples` samples: [B].

    The samples are drawn `chunk_size` at a time and folded into a running logsumexp, so memory
    does not grow with K (K = 100000 fits in a few hundred MB on a CPU; a GPU's default chunks are
    larger, see `default_chunk_size`). With a `sample_group`, each rank
    draws its share of the K samples and every rank gets the estimate over all of them.
    `compile` runs each chunk through `torch.compile` (worth its one-off compile time, tens of
    seconds, when K x B is in the millions).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    group_ranks, rank = _group_position(sample_group)
    local_samples = split_evenly(num_samples, group_ranks, rank)
    chunk_size = chunk_size or default_chunk_size(model, x.shape[0], x.device)
    chunk_fn = _compiled_chunk_log_sum_weights if compile else chunk_log_sum_weights
    # float64: in float32 each fold rounds log_total, and 100000 folds drifted by -0.02 nats.
    log_total = x.new_full((x.shape[0],), -math.inf, dtype=torch.float64)  # [B]
    for start in range(0, local_samples, chunk_size):
        chunk = chunk_fn(model, x, min(chunk_size, local_samples - start))  # [B]
        log_total = torch.logaddexp(log_total, chunk.double())
    return log_likelihood_estimate(log_total.unsqueeze(0), num_samples, sample_group)
