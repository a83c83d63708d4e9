"""Communication for sample parallelism: the only module of `pipeline` that talks to torch.distributed.

Ranks of one sample group see the same minibatch and each holds K_local of the K importance samples.
Everything the estimators need across samples is a logsumexp over the K dimension, so one stable
reduction serves normalized weights, ESS and the log-likelihood estimate.
"""

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in `group`; 1 when there is no group or no initialized process group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _shifted_exp(log_weights: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """(shift [B], exp(lw - shift) [K_local, B], total [B]) with shift the max over the group's samples.

    Shifting by the maximum keeps lw - shift exact in float32 (both are close, Sterbenz), where a
    rounded logsumexp would cost ~1e-3 absolute at |lw| ~ 1e4. A point whose log-weights are all
    -inf gets shift 0, so its exponentials and total are 0 rather than NaN.
    """
    shift = log_weights.amax(0)  # [B]
    if group_size(group) > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    scaled = torch.exp(log_weights - shift)  # [K_local, B]
    return shift, scaled, sharded_sum(scaled.sum(0), group)


def sharded_sum(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of `values` over the ranks of `group` (detached; `values` itself without a group)."""
    if group_size(group) == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def sharded_logsumexp(log_weights: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """logsumexp over dim 0 of the samples held by every rank of `group`: [K_local, B] -> [B].

    Stable: all-reduce the MAX of the per-point maxima, then the SUM of the shifted exponentials,
    so each rank sends 2 floats per data point, never its samples. A point whose log-weights are
    all -inf gets -inf. Without a group (or with one rank) this is `torch.logsumexp(log_weights, 0)`,
    differentiable; across ranks the result is detached, as the estimators only use it for
    constants (normalized weights) and reported quantities.
    """
    if group_size(group) == 1:
        return torch.logsumexp(log_weights, 0)
    shift, _, total = _shifted_exp(log_weights.detach(), group)
    return shift + torch.log(total)


def sharded_softmax(log_weights: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """softmax over dim 0 of the samples held by every rank of `group`, detached: [K_local, B].

    Each rank gets the normalized weights of its own samples; a point whose log-weights are all
    -inf gets weights 0. Same communication as `sharded_logsumexp`.
    """
    _, scaled, total = _shifted_exp(log_weights.detach(), group)
    return scaled / torch.where(total > 0, total, torch.ones_like(total))


@functools.lru_cache(maxsize=4)
def _position_weights(numel: int, device: torch.device) -> torch.Tensor:
    """sin(1), sin(2), ..., sin(numel) in float64: nonzero weights with no linear relation between
    positions (with weights affine in the position, two rows swapped could keep the sum)."""
    return torch.sin(torch.arange(1, numel + 1, dtype=torch.float64, device=device))


def fingerprint(values: torch.Tensor) -> torch.Tensor:
    """A position-weighted float64 sum of `values`: 0-dim. Tensors that differ in any entry, order
    or size give different sums, but for coincidences of rounding; sums of fingerprints stay so."""
    flat = values.detach().flatten().double()
    return flat @ _position_weights(flat.numel(), flat.device)


def agrees_across(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Whether `values` holds the same entries in the same places on every rank of `group`: a 0-dim
    bool tensor, without waiting on the host (True without a group). One all-reduce of 2 numbers:
    the group's largest and smallest `fingerprint`.
    """
    if group_size(group) == 1:
        return torch.ones((), dtype=torch.bool, device=values.device)
    own = fingerprint(values)
    extremes = torch.stack([own, -own])  # MAX of both: the group's largest and smallest
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    return extremes[0] == -extremes[1]


def init_sample_parallel_mesh(sample_parallel: int, device_type: str = "cpu") -> DeviceMesh | None:
    """The 2-D layout world = data x sample, as a DeviceMesh with dims ("data", "sample").

    Ranks r = d * S + s: the S ranks of one sample group are consecutive (usually one node), since
    they reduce log-weights every step, while gradients are averaged over the whole world.
    Returns None when torch.distributed is not initialized (a single process). Collective: every
    rank must call it, in the same order.
    """
    if not dist.is_available() or not dist.is_initialized():
        if sample_parallel != 1:
            raise ValueError(f"sample_parallel={sample_parallel} needs a distributed run with a multiple of {sample_parallel} ranks")
        return None
    world_size = dist.get_world_size()
    if sample_parallel < 1 or world_size % sample_parallel:
        raise ValueError(f"sample_parallel={sample_parallel} must divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // sample_parallel, sample_parallel), mesh_dim_names=("data", "sample"))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s sampling stream: distinct per rank, reproducible from `seed`."""
    return seed + 1_000_003 * rank


def split_evenly(total: int, parts: int, index: int) -> int:
    """How many of `total` items part `index` of `parts` gets: sizes differ by at most one."""
    return total // parts + (index < total % parts)
