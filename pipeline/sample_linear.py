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
    return torch.ops.rws.sample_linear(samples, weight, bias)


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
    return _differing_fraction(samples.sum(0), samples.shape[0])


def _differing_fraction(ones: torch.Tensor, num_samples: int) -> float:
    """differing_fraction from the samples' sum over K, `ones`."""
    return float(torch.minimum(ones, num_samples - ones).sum()) / (ones.numel() * num_samples)


def _majority(samples: torch.Tensor) -> torch.Tensor | None:
    """The per-unit majority [B, H] of samples [K, B, H], or None when more than `MAX_DIFFERING` of
    the entries differ from it (the dense product is faster then)."""
    ones, num_samples = samples.sum(0), samples.shape[0]  # [B, H]
    if _differing_fraction(ones, num_samples) > MAX_DIFFERING:
        return None
    return (2 * ones > num_samples).to(samples.dtype)


def _differences_at(samples: torch.Tensor, majority: torch.Tensor, rows, columns) -> torch.Tensor:
    """h - r at the (sample row, unit) pairs given, for samples [K, B, H] and majority [B, H]."""
    units, batch = samples.shape[-1], samples.shape[1]
    return samples.reshape(-1).take(rows * units + columns) - majority.reshape(-1).take(rows % batch * units + columns)


@torch.library.custom_op("rws::sample_linear", mutates_args=())
def _sample_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """samples [K, ..., H] W^T + b: [K, ..., O], dense or from the differences to the majority."""
    leading, units = samples.shape[:-1], samples.shape[-1]
    samples3 = samples.reshape(leading[0], -1, units)  # [K, B, H]
    num_rows, batch = leading.numel(), samples3.shape[1]
    majority = _majority(samples3)
    if majority is None:
        return F.linear(samples, weight, bias)
    base = torch.addmm(bias, majority, weight.t())  # [B, O]: r_b W^T + b
    # One bag per sample row: the rows of W^T where it differs from its majority, weighted by
    # h - r, plus its data point's base row (table index H + b) with weight 1.
    differs = (samples3 != majority).view(num_rows, units)
    marks = torch.cat([differs, differs.new_ones(num_rows, 1)], 1)  # [K B, H + 1]
    rows, columns = marks.nonzero().unbind(1)  # sorted by row
    is_base = columns == units
    indices = torch.where(is_base, units + rows % batch, columns)
    values = torch.where(is_base, 1.0, _differences_at(samples3, majority, rows, columns.clamp(max=units - 1)))
    offsets = torch.searchsorted(rows, torch.arange(num_rows))
    table = torch.cat([weight.t(), base])  # [H + B, O]
    logits = F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=values.to(table.dtype))
    return logits.view(*leading, weight.shape[0])


@_sample_linear.register_fake
def _(samples, weight, bias):
    return samples.new_empty(*samples.shape[:-1], weight.shape[0])


@torch.library.custom_op("rws::sample_linear_backward", mutates_args=())
def _sample_linear_backward(grad: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sample_linear's weight [O, H] and bias [O] given the output's gradient [K, ..., O]."""
    units, outputs = samples.shape[-1], grad.shape[-1]
    samples3 = samples.reshape(samples.shape[0], -1, units)  # [K, B, H]
    grad3 = grad.reshape(*samples3.shape[:2], outputs)  # [K, B, O]
    flat_grad = grad3.reshape(-1, outputs)  # [K B, O]
    majority = _majority(samples3)
    if majority is None:
        return flat_grad.t() @ samples3.reshape(-1, units), flat_grad.sum(0)
    grad_per_point = grad3.sum(0)  # [B, O]
    grad_weight = grad_per_point.t() @ majority  # [O, H]: sum_b (sum_k g_kb) r_b^T
    # One bag per unit j: the gradient rows of the samples that differ from the majority at j.
    differs_by_unit = torch.empty(units, flat_grad.shape[0], dtype=torch.bool)  # [H, K B]: rows of one unit together
    torch.ne(samples3, majority, out=differs_by_unit.t().view(samples3.shape))
    columns, rows = differs_by_unit.nonzero().unbind(1)  # sorted by unit
    values = _differences_at(samples3, majority, rows, columns)
    offsets = torch.searchsorted(columns, torch.arange(units))
    grad_weight += F.embedding_bag(rows, flat_grad, offsets, mode="sum", per_sample_weights=values.to(grad.dtype)).t()
    return grad_weight, grad_per_point.sum(0)


@_sample_linear_backward.register_fake
def _(grad, samples):
    return grad.new_empty(grad.shape[-1], samples.shape[-1]), grad.new_empty(grad.shape[-1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (samples,) = ctx.saved_tensors
    grad_weight, grad_bias = torch.ops.rws.sample_linear_backward(grad, samples)
    return None, grad_weight, grad_bias


_sample_linear.register_autograd(_backward, setup_context=_setup_context)
