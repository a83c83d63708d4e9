"""The linear part of a layer's logits over K binary samples, from where the samples differ.

For K samples h_k of a binary layer that share a data point (h [K, B, H]), a weight W [O, H] and
a bias b, with r_b the per-unit majority of data point b's K samples:

    h_kb W^T + b = (r_b W^T + b) + (h_kb - r_b) W^T                       [K, B, O]
    sum_kb g_kb h_kb^T = sum_b (sum_k g_kb) r_b^T + sum_kb g_kb (h_kb - r_b)^T   (the weight gradient)

Both are exact identities. The first term of each is paid once per data point, not once per
sample. h - r has entries in {-1, 0, +1} and is nonzero only where a sample differs from its
majority. A trained Q is confident. For the SBN 200-200-10 model of benchmarks/RESULTS.md, its
K = 50 samples of h_1 differ from the majority in 7.9% of the entries. So each sample's logits add
up about 16 rows of W^T instead of taking a 200-term product per output. Those sums run as one
`embedding_bag` over all samples, with rows of W^T and each data point's r_b W^T + b as its table.

Why not always: an untrained Q draws near-fair coins, and then the dense product is faster.
Forward and backward each count the differing entries (on a CPU, so no device sync) and pick
the dense product above `MAX_DIFFERING`. The results agree with the dense product to float32
rounding: the terms are the same, only their order of summation differs.
"""

import torch
import torch.nn.functional as F

# Above this fraction of differing entries, the dense product is faster: forward + backward break
# even at 12-15% (2-core CPU, K = 50, B = 100, 200 -> 784 units; `python benchmarks/sample_linear.py`,
# benchmarks/RESULTS.md, "Sparse sample products").
MAX_DIFFERING = 0.125

# The bookkeeping (majority, comparison, index lists) costs a few passes over the samples whatever
# the output width; below this many outputs it costs more than the dense product saves. With SBN
# 784-200-200-10's 200-wide products on the sparse path too, the K = 50 step was 1.11x faster than
# dense, against 1.15x with only the 784-wide one (benchmarks/RESULTS.md).
_MIN_OUTPUTS = 256

# Below this many sample rows (K x B), the dense product is cheap whatever its width: K = 5, B = 100
# steps ran at 0.97x with the floor at 256.
_MIN_ROWS = 1024

# Samples with at most this many units take the weight gradient as (h^T g)^T (`_NarrowInputLinear`).
_MAX_NARROW_UNITS = 32


def sample_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(samples, weight, bias) for binary samples [K, ..., H] (K samples first): [K, ..., O].

    On a CPU, wide enough products go through `torch.ops.rws.sample_linear`, which computes the
    same values from where the samples differ from their majority (module docstring), and samples
    with few units take the weight gradient in MKL's faster orientation (`_NarrowInputLinear`).
    Gradients flow to `weight` and `bias` only, as the samples are draws.
    """
    if (
        samples.device.type != "cpu"
        or samples.requires_grad
        or samples.dim() < 3
        or samples.shape[:-1].numel() < _MIN_ROWS
    ):
        return F.linear(samples, weight, bias)
    if samples.shape[-1] <= _MAX_NARROW_UNITS:
        return _NarrowInputLinear.apply(samples, weight, bias)
    if weight.shape[0] < _MIN_OUTPUTS:
        return F.linear(samples, weight, bias)
    return sample_linear_op(samples, weight, bias)


class _NarrowInputLinear(torch.autograd.Function):
    """F.linear whose weight gradient is taken as (h^T g)^T, for samples with few units.

    Why: autograd's g^T h is a [O, N] x [N, H] product. With H = 10 (P's top conditional in SBN
    784-200-200-10), MKL takes 1.1 ms for it at N = 5000 on the 2-core CPU of benchmarks/RESULTS.md.
    [H, N] x [N, O] takes 0.4 ms, in the profile of a compiled K = 50 step."""

    generate_vmap_rule = True

    @staticmethod
    def forward(samples, weight, bias):
        return F.linear(samples, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (samples,) = ctx.saved_tensors
        flat_grad, flat_samples = grad.reshape(-1, grad.shape[-1]), samples.reshape(-1, samples.shape[-1])
        return None, (flat_samples.t() @ flat_grad).t(), flat_grad.sum(0)


def differing_fraction(samples: torch.Tensor) -> float:
    """Fraction of the entries of 0/1 samples [K, ..., H] that differ from their per-unit majority over K."""
    return _differing_count(samples.sum(0), samples.shape[0]) / samples.numel()


def _differing_count(ones: torch.Tensor, num_samples: int) -> float:
    """How many of the 0/1 samples differ from their per-unit majority, from their sum over K, `ones`.

    Summed in float64: exact to 2^53 entries, where float32 would round past 2^24."""
    return float(torch.minimum(ones, num_samples - ones).sum(dtype=torch.float64))


def _majority(samples: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """The per-unit majority [B, H] of samples [K, B, H] and how many entries differ from it, or None
    when more than `MAX_DIFFERING` of the entries do (the dense product is faster then)."""
    ones, num_samples = samples.sum(0), samples.shape[0]  # [B, H]
    differing = _differing_count(ones, num_samples)
    if differing > MAX_DIFFERING * samples.numel():
        return None
    return (2 * ones > num_samples).to(samples.dtype), differing


def sample_linear_op(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`torch.ops.rws.sample_linear` without `sample_linear`'s dispatch rules: the logits [K, ..., O]."""
    return torch.ops.rws.sample_linear(samples, weight, bias)[0]


@torch.library.custom_op("rws::sample_linear", mutates_args=())
def _sample_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """samples [K, ..., H] W^T + b: [K, ..., O], and the reference r [B, H] it was computed from.

    r is the per-point majority when the sparse path ran, zeros when the dense product did (then
    h - r = h): the backward splits the weight gradient at the same r.
    """
    leading, units = samples.shape[:-1], samples.shape[-1]
    samples3 = samples.reshape(leading[0], -1, units)  # [K, B, H]
    found = _majority(samples3)
    logits = None if found is None else _logits_from_differences(samples3, weight, bias, *found)
    if logits is None:
        return F.linear(samples, weight, bias), samples.new_zeros(samples3.shape[1:])
    return logits.view(*leading, weight.shape[0]), found[0]


def _logits_from_differences(samples, weight, bias, majority, differing: float) -> torch.Tensor | None:
    """samples [K, B, H] W^T + b as [K B, O] from the entries that differ from `majority` [B, H]:
    one embedding_bag over all sample rows. None if the samples turn out not to be all 0/1."""
    num_samples, batch, units = samples.shape
    num_rows = num_samples * batch
    # Bag of sample row (k, b): the rows of W^T where it differs from r_b, weighted by h - r = 1 - 2 r,
    # then its data point's base row r_b W^T + b (table row H + b), weighted 1.
    marks = torch.empty(num_rows, units + 1, dtype=torch.bool)  # [K B, H + 1]
    torch.ne(samples, majority, out=marks[:, :units].view(samples.shape))
    marks[:, units] = True
    positions = marks.view(-1).nonzero().squeeze(1)  # (k B + b) (H + 1) + column, sorted by row
    if positions.numel() - num_rows != differing:
        # Entries in [0, 1] differ from the majority at least as often as their sums predict, and
        # exactly as often only if all are 0 or 1 (then h - r = 1 - 2 r). Anything else: dense.
        return None
    in_point = positions % (batch * (units + 1))  # b (H + 1) + column: the entry's place in its data point
    table_rows = torch.cat([torch.arange(units).expand(batch, units), units + torch.arange(batch)[:, None]], 1)
    signs = torch.cat([1 - 2 * majority, majority.new_ones(batch, 1)], 1)  # [B, H + 1]
    table = torch.cat([weight.t(), torch.addmm(bias, majority, weight.t())])  # [H + B, O]
    return F.embedding_bag(
        table_rows.view(-1).take(in_point),
        table,
        torch.searchsorted(positions, torch.arange(0, num_rows * (units + 1), units + 1)),  # bag starts
        mode="sum",
        per_sample_weights=signs.view(-1).take(in_point).to(table.dtype),
    )


@_sample_linear.register_fake
def _(samples, weight, bias):
    batch = samples.shape[1:-1].numel()
    return samples.new_empty(*samples.shape[:-1], weight.shape[0]), samples.new_empty(batch, samples.shape[-1])


@torch.library.custom_op("rws::sample_linear_backward", mutates_args=())
def _sample_linear_backward(grad: torch.Tensor, samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sum_kb g_kb (h_kb - r_b)^T: [O, H], for the output's gradient g [K, ..., O] and reference r [B, H].

    A reference of zeros (the forward's dense product) gives the dense g^T h.
    """
    units, outputs = samples.shape[-1], grad.shape[-1]
    samples3 = samples.reshape(samples.shape[0], -1, units)  # [K, B, H]
    batch, num_rows = samples3.shape[1], samples3.shape[:2].numel()
    flat_grad = grad.reshape(num_rows, outputs)  # [K B, O]
    if not reference.any():
        return flat_grad.t() @ samples3.reshape(num_rows, units)
    # One bag per unit j: the gradient rows of the samples that differ from the reference at j,
    # weighted by h - r = 1 - 2 r.
    differs_by_unit = torch.empty(units, num_rows, dtype=torch.bool)  # [H, K B]: rows of one unit together
    torch.ne(samples3, reference, out=differs_by_unit.t().view(samples3.shape))
    positions = differs_by_unit.view(-1).nonzero().squeeze(1)  # j K B + k B + b, sorted by unit
    signs = (1 - 2 * reference).t().reshape(-1)  # [H B]
    offsets = torch.searchsorted(positions, torch.arange(0, units * num_rows, num_rows))
    return F.embedding_bag(
        positions % num_rows,
        flat_grad,
        offsets,
        mode="sum",
        per_sample_weights=signs.take(positions // num_rows * batch + positions % batch).to(grad.dtype),
    ).t().contiguous()  # [O, H], the layout the fake kernel promises


@_sample_linear_backward.register_fake
def _(grad, samples, reference):
    return grad.new_empty(grad.shape[-1], samples.shape[-1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _backward(ctx, grad, _):
    """The r-terms of the weight gradient and the bias gradient, outside the op: in a compiled step
    the sum over K then runs inside the kernel that produced `grad`, instead of as one more pass."""
    samples, reference = ctx.saved_tensors
    grad_per_point = grad.reshape(samples.shape[0], *reference.shape[:-1], grad.shape[-1]).sum(0)  # [B, O]
    grad_weight = grad_per_point.t() @ reference + torch.ops.rws.sample_linear_backward(grad, samples, reference)
    return None, grad_weight, grad_per_point.sum(0)


_sample_linear.register_autograd(_backward, setup_context=_setup_context)
