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
`bags_by_sample` counts the differing entries (on a CPU, so no device sync) and builds no bags
above `MAX_DIFFERING`; the product and its backward then take the dense path. The samples must be
0/1 (draws): entries in [0, 1] that are not are caught by that count and get the dense product too.
The results agree with the dense product to float32 rounding: the terms are the same, only their
order of summation differs.

The bags depend on the samples alone, so they are their own op: in a compiled step, products that
read the same samples (Q's q(h_2 | h_1) and P's p(x | h_1) both read h_1) share them.
"""

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

# The ops' namespace carries a hash of this file. torch.compile's on-disk cache keys a graph by the
# names of the custom ops in it, not by the backward formulas registered for them (pytorch#144344):
# a changed formula under the same names would reuse a stale compiled backward, with wrong gradients.
_OPS = "rws_" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

# Above this fraction of differing entries, the dense product is faster: forward + backward break
# even at 12-15% (2-core CPU, K = 50, B = 100, 200 -> 784 units; `python benchmarks/sample_linear.py`,
# benchmarks/RESULTS.md, "Sparse sample products").
MAX_DIFFERING = 0.125

# The bags (majority, comparison, index lists) cost a few passes over the samples whatever the
# output width. Eagerly, every product builds its own, and below this many outputs they cost more
# than the dense product saves: with SBN 784-200-200-10's 200-wide products on the sparse path too,
# the eager K = 50 step ran 0.92x as fast (trained weights, side by side). In a compiled step,
# products that read the same samples share one set of bags (`sample_linear_op`), and there every
# product takes the op: the K = 50 step ran 1.08-1.11x faster with SBN 784-200-200-10's 200-wide
# products on it too, and another 1.04x with the 10-wide one (trained weights, side by side;
# benchmarks/RESULTS.md, "Shared bags").
_MIN_OUTPUTS = 256

# Below this many sample rows (K x B), the dense product is cheap whatever its width: K = 5, B = 100
# steps ran at 0.97x with the floor at 256.
_MIN_ROWS = 1024

# Samples with at most this many units take the weight gradient as (h^T g)^T (`_NarrowInputLinear`).
_MAX_NARROW_UNITS = 32


def sample_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(samples, weight, bias) for binary samples [K, ..., H] (K samples first): [K, ..., O].

    On a CPU, products of many samples go through `sample_linear_op`, which computes the same
    values from where the samples differ from their majority (module docstring): eagerly only wide
    ones, in a compiled step all. Samples with few units take the weight gradient in MKL's faster
    orientation instead (`_NarrowInputLinear`).
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
    if weight.shape[0] < _MIN_OUTPUTS and not torch.compiler.is_compiling():
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
    """The sparse product without `sample_linear`'s dispatch rules: logits [K, ..., O].

    Two ops: one builds the bags from the samples alone, one sums them for this weight. Layers that
    read the same samples (Q's q(h_2 | h_1) and P's p(x | h_1) both read h_1) build identical bags;
    in a compiled step the graph keeps one of the identical calls, so they share the bookkeeping.
    """
    return _sample_linear(samples, weight, bias, *_bags_by_sample(samples))


def _gather_padded(source: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """source[index] for 1-D `source`, at the front of a 1-D tensor of `length` entries; the rest is never read.

    Why: the ops' outputs must have sizes known from the input shapes, so that a compiled step
    traces them without a graph break. Index lists are padded to their largest possible length,
    and the lengths travel in the last entry of the bag starts."""
    padded = source.new_empty(length)
    torch.index_select(source, 0, index, out=padded[: index.numel()])
    return padded


def _most_entries(num_rows: int, units: int) -> int:
    """At most half the entries differ from their majority, plus one base row per sample row."""
    return num_rows * units // 2 + num_rows


@torch.library.custom_op(f"{_OPS}::bags_by_sample", mutates_args=())
def _bags_by_sample(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's bags for samples [K, ..., H]: (reference r [B, H], entries, entry weights, bag starts).

    Bag of sample row (k, b): the rows of W^T where it differs from r_b, weighted h - r = 1 - 2 r,
    then its data point's base row r_b W^T + b (table row H + b), weighted 1. r is the per-point
    majority. Bag starts [K B + 1] end with the number of entries; when the dense product is faster,
    r is zeros and that number is 0.
    """
    samples3 = samples.reshape(samples.shape[0], -1, samples.shape[-1])  # [K, B, H]
    num_samples, batch, units = samples3.shape
    num_rows, most = num_samples * batch, _most_entries(num_samples * batch, units)
    found = _majority(samples3)
    if found is not None:
        majority, differing = found
        marks = torch.empty(num_rows, units + 1, dtype=torch.bool)  # [K B, H + 1]
        torch.ne(samples3, majority, out=marks[:, :units].view(samples3.shape))
        marks[:, units] = True
        positions = marks.view(-1).nonzero().squeeze(1)  # (k B + b) (H + 1) + column, sorted by row
        # Entries in [0, 1] differ from the majority at least as often as their sums predict, and
        # exactly as often only if all are 0 or 1 (then h - r = 1 - 2 r). Anything else: dense.
        if positions.numel() - num_rows == differing:
            in_point = positions % (batch * (units + 1))  # b (H + 1) + column: the entry's place in its point
            table_rows = torch.cat([torch.arange(units).expand(batch, units), units + torch.arange(batch)[:, None]], 1)
            signs = torch.cat([1 - 2 * majority, majority.new_ones(batch, 1)], 1)  # [B, H + 1]
            bag_starts = torch.searchsorted(positions, torch.arange(0, (num_rows + 1) * (units + 1), units + 1))
            return (
                majority,
                _gather_padded(table_rows.view(-1), in_point, most),
                _gather_padded(signs.view(-1), in_point, most),
                bag_starts,
            )
    return _no_sample_bags(samples)


@_bags_by_sample.register_fake
def _no_sample_bags(samples):
    """`bags_by_sample`'s outputs for the dense product: r = 0 and no entries (their shapes, for tracing)."""
    batch, units = samples.shape[1:-1].numel(), samples.shape[-1]
    num_rows = samples.shape[0] * batch
    most = _most_entries(num_rows, units)
    return (
        samples.new_zeros(batch, units),
        samples.new_empty(most, dtype=torch.int64),
        samples.new_empty(most),
        samples.new_zeros(num_rows + 1, dtype=torch.int64),
    )


@torch.library.custom_op(f"{_OPS}::sample_linear", mutates_args=())
def _sample_linear(
    samples: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    reference: torch.Tensor,
    entries: torch.Tensor,
    entry_weights: torch.Tensor,
    bag_starts: torch.Tensor,
) -> torch.Tensor:
    """samples [K, ..., H] W^T + b: [K, ..., O], from `bags_by_sample`'s bags (dense if there are none)."""
    count = int(bag_starts[-1])
    if count == 0:
        return F.linear(samples, weight, bias)
    table = torch.cat([weight.t(), torch.addmm(bias, reference, weight.t())])  # [H + B, O]
    logits = F.embedding_bag(
        entries[:count], table, bag_starts[:-1], mode="sum", per_sample_weights=entry_weights[:count].to(table.dtype)
    )
    return logits.view(*samples.shape[:-1], weight.shape[0])


@_sample_linear.register_fake
def _(samples, weight, bias, reference, entries, entry_weights, bag_starts):
    return samples.new_empty(*samples.shape[:-1], weight.shape[0])


@torch.library.custom_op(f"{_OPS}::bags_by_unit", mutates_args=())
def _bags_by_unit(
    samples: torch.Tensor, entries: torch.Tensor, entry_weights: torch.Tensor, bag_starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's bags, from `bags_by_sample`'s: (sample rows, their weights h - r, bag starts [H + 1]
    ending with the number of rows), one bag per unit j holding the sample rows that differ from r
    at j. None (bag starts all 0) where the forward was dense.

    The forward's entries are in sample-row order; a stable sort by unit puts them in unit order.
    The sort keys are int16 (for fewer than 2^15 units), which torch sorts by radix: for the 84k
    entries of [50, 100, 200] trained samples the sort takes 0.2 ms and this op 0.58 ms, against
    1.94 ms for comparing the samples with their majority again and listing the differences unit
    by unit (benchmarks/RESULTS.md, "Shared bags").
    """
    units = samples.shape[-1]
    num_rows, count = bag_starts.numel() - 1, int(bag_starts[-1])
    if count == 0:
        return _no_unit_bags(samples, entries, entry_weights, bag_starts)
    most = _most_entries(num_rows, units)
    unit_of_entry = entries[:count].clamp(max=units)  # a unit, or H for a data point's base row
    keys = unit_of_entry.to(torch.int16 if units < 2**15 else torch.int32)
    by_unit = torch.argsort(keys, stable=True)  # differences by unit, then the base rows
    differing = count - num_rows
    row_of_entry = torch.repeat_interleave(torch.arange(num_rows), bag_starts.diff())  # [count]
    per_unit = torch.bincount(unit_of_entry, minlength=units + 1)[:units]
    return (
        _gather_padded(row_of_entry, by_unit[:differing], most),
        _gather_padded(entry_weights[:count], by_unit[:differing], most),
        F.pad(per_unit.cumsum(0), (1, 0)),
    )


@_bags_by_unit.register_fake
def _no_unit_bags(samples, entries, entry_weights, bag_starts):
    """`bags_by_unit`'s outputs where the forward was dense: no rows (their shapes, for tracing)."""
    units = samples.shape[-1]
    most = _most_entries(samples.shape[:-1].numel(), units)
    return samples.new_empty(most, dtype=torch.int64), samples.new_empty(most), samples.new_zeros(units + 1, dtype=torch.int64)


@torch.library.custom_op(f"{_OPS}::sample_linear_weight_grad", mutates_args=())
def _sample_linear_weight_grad(
    grad: torch.Tensor,
    grad_per_point: torch.Tensor,
    samples: torch.Tensor,
    reference: torch.Tensor,
    sample_bag_starts: torch.Tensor,
    rows: torch.Tensor,
    row_weights: torch.Tensor,
    unit_bag_starts: torch.Tensor,
) -> torch.Tensor:
    """The weight gradient [O, H] for the output's gradient g [K, ..., O] with its sum over K, [B, O]:

        sum_b (sum_k g_kb) r_b^T + sum_kb g_kb (h_kb - r_b)^T    from `bags_by_unit`'s bags,
        g^T h                                                   where the forward was dense.
    """
    flat_grad = grad.reshape(-1, grad.shape[-1])  # [K B, O]
    if int(sample_bag_starts[-1]) == 0:
        return flat_grad.t() @ samples.reshape(-1, samples.shape[-1])
    count = int(unit_bag_starts[-1])
    differences = F.embedding_bag(
        rows[:count], flat_grad, unit_bag_starts[:-1], mode="sum", per_sample_weights=row_weights[:count].to(grad.dtype)
    )  # [H, O]
    return torch.addmm(differences, reference.t(), grad_per_point).t().contiguous()  # [O, H], as the fake kernel


@_sample_linear_weight_grad.register_fake
def _(grad, grad_per_point, samples, reference, sample_bag_starts, rows, row_weights, unit_bag_starts):
    return grad.new_empty(grad.shape[-1], samples.shape[-1])


def _setup_context(ctx, inputs, output):
    samples, _, _, reference, entries, entry_weights, bag_starts = inputs
    ctx.save_for_backward(samples, reference, entries, entry_weights, bag_starts)


def _backward(ctx, grad):
    """The weight and bias gradients. The sum over K is written here, outside the ops: in a compiled
    step it runs inside the kernel that produced `grad`, and layers that read the same samples
    share `bags_by_unit`."""
    samples, reference, entries, entry_weights, bag_starts = ctx.saved_tensors
    grad_per_point = grad.reshape(samples.shape[0], reference.shape[0], grad.shape[-1]).sum(0)  # [B, O]
    bags = _bags_by_unit(samples, entries, entry_weights, bag_starts)
    grad_weight = _sample_linear_weight_grad(grad, grad_per_point, samples, reference, bag_starts, *bags)
    return None, grad_weight, grad_per_point.sum(0), None, None, None, None


_sample_linear.register_autograd(_backward, setup_context=_setup_context)
