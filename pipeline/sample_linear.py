"""The linear part of a layer's logits over K binary samples, by a C kernel on a CPU.

Every big product in a training step has a 0/1 operand: the samples h [N, H] of a layer (N = K x B
sample rows) times a weight W [O, H] (the logits h W^T + b), and the output's gradient g [N, O]
times the same samples (the weight gradient g^T h [O, H], whose pass over g also sums its columns:
the bias gradient). Two C kernels use that, both exact
identities whose results agree with the dense products to float32 rounding (only the order of the
sums differs):

- AMX tiles (pipeline/amx_linear.c), on CPUs with Intel's AMX-BF16. A 0/1 sample is exact in
  bfloat16, and a float32 value splits exactly into three bfloat16 parts, so h W^T is the sum of
  three bfloat16 tile products with float32 sums (g^T h splits g the same way). On a 2-core Xeon
  with AMX, P's bottom product at K = 50, B = 100 ([5000, 200] x [200, 784]) ran 2.1-2.3x as fast
  as MKL's float32 product, and 1.9x with its backward.
- Table lookups (pipeline/lookup_linear.c), everywhere else. Split the H units into groups of 4.
  Each group's 4 bits select one of 16 precomputed sums of W's columns over a subset of the group,
  T_g[c] = sum_{i in c} W[:, 4g + i], so that

      h_n W^T + b = b + sum_g T_g[code_g(h_n)]                                   [N, O]

  adds up H/4 table rows instead of taking H products per output ("Four Russians"). The weight
  gradient splits the same way over groups of 4 sample rows: their rows of g give 16 subset sums,
  and each unit's 4 bits select one. About a quarter of the dense products' vector operations:
  P's bottom product ran 1.8-2.3x as fast as MKL's, and 2.0-2.2x with its backward, on the 2-core
  AMD EPYC of benchmarks/RESULTS.md.

An SBN layer's log-prob log p(v | h) = sum_o [v_o l_o - softplus(l_o)] also goes through the
kernels in one piece (`sample_log_prob`): the product takes the log-prob from the logits while they
are in cache and keeps only their sigmoids (pipeline/bernoulli.h), from which the weight gradient's
kernel forms the logits' gradient v - sigmoid(l) as it reads it. So P's [K, B, 784] logits never
reach memory, and each takes one exp. Q's layers above the first draw their units in the same pass
(`draw_with_log_prob`).

The figures are `python benchmarks/sample_linear.py`'s ("Products of samples by table lookup" in
benchmarks/RESULTS.md), which times each kernel this machine runs beside the dense products.
The kernels are built for the machine on first use (pipeline/native.py). They run on a CPU for
float32 samples [K, ..., H] that need no gradient, with at least `_MIN_ROWS` rows and more than
`_MAX_NARROW_UNITS` units. Entries that are not 0 or 1 are counted by the kernel, and the op
takes the dense product instead (as it does if the kernel cannot allocate its buffers).
Everything else (a GPU, float64, no C compiler, RWS_NATIVE=0) takes torch's dense product.
"""

import contextlib
import ctypes
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.bernoulli import bernoulli_draws, log_prob_of_logits
from pipeline.native import load_library

# The ops' namespace carries a hash of this file. torch.compile's on-disk cache keys a graph by the
# names of the custom ops in it, not by the backward formulas registered for them (pytorch#144344):
# a changed formula under the same names would reuse a stale compiled backward, with wrong gradients.
_OPS = "rws_" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

# Below this many sample rows (K x B), the dense product is as fast: building the tables is paid
# once per call. K = 5, B = 100 (500 rows) already gains (benchmarks/RESULTS.md).
_MIN_ROWS = 256

# Samples with at most this many units take the weight gradient as (h^T g)^T (`_NarrowInputLinear`).
_MAX_NARROW_UNITS = 32


def sample_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(samples, weight, bias) for binary samples [K, ..., H] (K samples first): [K, ..., O].

    On a CPU, float32 products of many samples go through a C kernel (module docstring);
    samples with few units take the weight gradient in MKL's faster orientation instead
    (`_NarrowInputLinear`). Gradients flow to `weight` and `bias` only, as the samples are draws.
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
    if samples.dtype == weight.dtype == bias.dtype == torch.float32 and _have_kernels():
        return _native_linear(samples, weight, bias)
    return F.linear(samples, weight, bias)


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


class Kernels(NamedTuple):
    """The C functions of one kernel file: Y = h W^T + b, and dW = g^T h with db = sum_n g_n (module
    docstring); the two with a Bernoulli log-prob fused in (`sample_log_prob`), and its draws."""

    linear: Callable
    weight_grad: Callable
    weight_transposed: bool  # whether the products take W^T [H, O] (table lookups) or W [O, H] (AMX)
    log_prob: Callable
    log_prob_weight_grad: Callable
    draw: Callable


# The kernel files in the order they are preferred: AMX tiles where the CPU has them, else table lookups.
KERNELS = ("amx_linear", "lookup_linear")


@functools.cache
def kernel_functions(name: str) -> Kernels | None:
    """The functions of pipeline/<name>.c, built for this machine (pipeline/native.py); None if it
    does not build or, for AMX, if the CPU has no AMX or Linux does not grant its tiles."""
    library = load_library(name)
    if library is None or (name == "amx_linear" and not library.amx_ready()):
        return None
    return declare(library, name)


def declare(library: ctypes.CDLL, name: str) -> Kernels:
    """A build of pipeline/<name>.c's functions, with their argument types."""
    suffixes = ("", "_weight_grad", "_log_prob", "_log_prob_weight_grad", "_draw")
    linear, weight_grad, log_prob, log_prob_weight_grad, draw = (getattr(library, name + suffix) for suffix in suffixes)
    pointer, rows, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    linear.argtypes = weight_grad.argtypes = [pointer] * 4 + [rows, size, size, size]
    log_prob.argtypes = [pointer] * 4 + [rows] + [pointer] * 2 + [rows, size, size, size]
    log_prob_weight_grad.argtypes = [pointer] * 3 + [rows] + [pointer] * 3 + [rows, size, size, size]
    draw.argtypes = [pointer] * 7 + [rows, size, size, size]
    for function in (linear, weight_grad, log_prob, log_prob_weight_grad, draw):
        function.restype = ctypes.c_int64
    return Kernels(linear, weight_grad, name == "lookup_linear", log_prob, log_prob_weight_grad, draw)


@functools.cache
def _kernels() -> Kernels | None:
    """The first of `KERNELS` that this machine runs, or None."""
    return next(filter(None, map(kernel_functions, KERNELS)), None)


@contextlib.contextmanager
def kernel_file(name: str):
    """Within the block, products of samples go through pipeline/<name>.c rather than `_kernels()`
    (the benchmarks' side-by-side timings). The choice is read when the op runs, so compiled graphs
    follow it too."""
    kernels = kernel_functions(name)
    if kernels is None:
        raise RuntimeError(f"pipeline/{name}.c does not run on this machine")
    global _kernels
    preferred, _kernels = _kernels, lambda: kernels
    try:
        yield
    finally:
        _kernels = preferred


@torch.compiler.assume_constant_result
def _have_kernels() -> bool:
    """Whether `_kernels` loads: a constant to torch.compile, which would otherwise break the graph at the ctypes call."""
    return _kernels() is not None


@torch.library.custom_op(f"{_OPS}::native_linear", mutates_args=())
def _native_linear(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """samples [K, ..., H] W^T + b: [K, ..., O] by the machine's kernel (`_kernels`), float32.

    Samples that are not all 0/1 get the dense product (the kernel counts them, and its output is dropped)."""
    kernels = _kernels()
    flat = samples.reshape(-1, samples.shape[-1]).contiguous()  # [K B, H]
    (rows, units), outputs = flat.shape, weight.shape[0]
    out = flat.new_empty(rows, outputs)  # [K B, O]
    operands = (flat, _weight_operand(kernels, weight), bias.contiguous(), out)  # held until the kernel returns
    pointers = (t.data_ptr() for t in operands)
    if kernels.linear(*pointers, rows, units, outputs, torch.get_num_threads()):  # not all 0/1, or no memory
        return F.linear(samples, weight, bias)
    return out.view(*samples.shape[:-1], outputs)


def _weight_operand(kernels: Kernels, weight: torch.Tensor) -> torch.Tensor:
    """The weight [O, H] as the kernel file takes it: W^T [H, O] (table lookups) or W [O, H] (AMX)."""
    return weight.t().contiguous() if kernels.weight_transposed else weight.contiguous()


@_native_linear.register_fake
def _(samples, weight, bias):
    return samples.new_empty(*samples.shape[:-1], weight.shape[0])


@torch.library.custom_op(f"{_OPS}::native_linear_weight_grad", mutates_args=())
def _native_linear_weight_grad(samples: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients (g^T h [O, H], sum_n g_n [O]) for samples h [K, ..., H] and the
    output's gradient g [K, ..., O]."""
    flat_samples = samples.reshape(-1, samples.shape[-1]).contiguous()  # [K B, H]
    flat_grad = grad.reshape(-1, grad.shape[-1]).contiguous()  # [K B, O]
    (rows, units), outputs = flat_samples.shape, flat_grad.shape[1]
    weight_grad, bias_grad = grad.new_empty(outputs, units), grad.new_empty(outputs)  # [O, H], [O]
    pointers = (flat_samples.data_ptr(), flat_grad.data_ptr(), weight_grad.data_ptr(), bias_grad.data_ptr())
    if _kernels().weight_grad(*pointers, rows, units, outputs, torch.get_num_threads()):  # as above
        return flat_grad.t() @ flat_samples, flat_grad.sum(0)
    return weight_grad, bias_grad


@_native_linear_weight_grad.register_fake
def _(samples, grad):
    return grad.new_empty(grad.shape[-1], samples.shape[-1]), grad.new_empty(grad.shape[-1])


def _save_samples(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _native_linear_backward(ctx, grad):
    """Gradients for the weight and the bias, both by the kernel; none for the samples, which are draws."""
    (samples,) = ctx.saved_tensors
    return None, *_native_linear_weight_grad(samples, grad)


_native_linear.register_autograd(_native_linear_backward, setup_context=_save_samples)


def fused_log_prob_applies(
    samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, values: torch.Tensor | None = None
) -> bool:
    """Whether `sample_log_prob` takes these operands: a product that `sample_linear` gives to a C
    kernel, and values [..., O] that need no gradient and match the samples' trailing dimensions
    (x [B, D] against samples [K, B, H]).
    Without values: whether `draw_with_log_prob` takes the others. Not for few outputs (Q's top
    layer, 10 units): on AMX, padded to the tiles' 32 columns, the step ran 0.25 ms slower fused."""
    if values is None:
        values = samples.new_empty(()).expand(*samples.shape[:-1], weight.shape[0])
    return (
        samples.device.type == "cpu"
        and not samples.requires_grad
        and not values.requires_grad
        and samples.dim() >= 3
        and samples.shape[:-1].numel() >= _MIN_ROWS
        and samples.shape[-1] > _MAX_NARROW_UNITS
        and samples.dtype == weight.dtype == bias.dtype == values.dtype == torch.float32
        and values.dim() <= samples.dim()
        and values.shape[:-1] == samples.shape[samples.dim() - values.dim() : -1]
        and values.shape[-1] == weight.shape[0]
        and weight.shape[0] > _MAX_NARROW_UNITS
        and _have_kernels()
    )


def sample_log_prob(samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """log p(values | samples) = sum_o [v_o l_o - softplus(l_o)] for an SBN layer's logits
    l = samples W^T + b: [K, ...], with gradients for `weight` and `bias`.

    Why: P's bottom layer at K = 50, B = 100 has [5000, 784] logits. As separate ops, they are written
    by the product, read for the log-prob, read and written again for their gradient, which the
    weight gradient reads once more. Here the product's kernel takes the log-prob from each block
    of logits while it is in cache, replacing them by their sigmoids (pipeline/bernoulli.h), and the
    weight gradient's kernel forms the logits' gradient v - sigmoid(l) as it packs it: written once,
    read once. Only where `fused_log_prob_applies`."""
    return _native_log_prob(samples, weight, bias, values, _gradient_wanted(weight, bias))[0]


def _gradient_wanted(weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the fused ops must keep the logits' sigmoids for a backward (not in evaluation)."""
    return torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)


@torch.library.custom_op(f"{_OPS}::native_log_prob", mutates_args=())
def _native_log_prob(
    samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, values: torch.Tensor, keep_sigmoids: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(values | samples) [K, ...], the logits' sigmoids [K, ..., O] for the backward, or an
    empty tensor without `keep_sigmoids`). Samples that are not all 0/1 (or a kernel out of memory)
    get the product and the log-prob apart."""
    kernels = _kernels()
    flat = samples.reshape(-1, samples.shape[-1]).contiguous()  # [K B, H]
    value_rows = values.reshape(-1, values.shape[-1]).contiguous()  # [B, O] or [K B, O]
    (rows, units), outputs = flat.shape, weight.shape[0]
    log_prob, sigmoids = samples.new_empty(samples.shape[:-1]), _sigmoids(samples, outputs, keep_sigmoids)
    pointers = (flat, _weight_operand(kernels, weight), bias.contiguous(), value_rows)
    if kernels.log_prob(
        *(t.data_ptr() for t in pointers), value_rows.shape[0], _pointer(sigmoids), log_prob.data_ptr(),
        rows, units, outputs, torch.get_num_threads(),
    ):
        return _log_prob_apart(values, _native_linear(samples, weight, bias), keep_sigmoids)
    return log_prob, sigmoids


@_native_log_prob.register_fake
def _(samples, weight, bias, values, keep_sigmoids):
    return samples.new_empty(samples.shape[:-1]), _sigmoids(samples, weight.shape[0], keep_sigmoids)


def _sigmoids(samples: torch.Tensor, outputs: int, keep: bool) -> torch.Tensor:
    """Where the fused ops put the logits' sigmoids: [K, ..., O], or an empty tensor when none are kept."""
    return samples.new_empty(*samples.shape[:-1], outputs) if keep else samples.new_empty(0)


def _pointer(tensor: torch.Tensor) -> int | None:
    """A tensor's data for the kernels: None (NULL) for an empty one (no sigmoids kept)."""
    return tensor.data_ptr() if tensor.numel() else None


def _log_prob_apart(values: torch.Tensor, logits: torch.Tensor, keep_sigmoids: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused ops' log-prob and sigmoids by separate ops, from the logits."""
    return log_prob_of_logits(values, logits), torch.sigmoid(logits) if keep_sigmoids else logits.new_empty(0)


@torch.library.custom_op(f"{_OPS}::native_log_prob_weight_grad", mutates_args=())
def _native_log_prob_weight_grad(
    samples: torch.Tensor, sigmoids: torch.Tensor, values: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients of `_native_log_prob` for the log-prob's gradient grad [K, ...]:
    those of the product for the logits' gradient grad (v - sigmoid(l))."""
    kernels = _kernels()
    flat_samples = samples.reshape(-1, samples.shape[-1]).contiguous()  # [K B, H]
    flat_sigmoids = sigmoids.reshape(-1, sigmoids.shape[-1]).contiguous()  # [K B, O]
    value_rows = values.reshape(-1, values.shape[-1]).contiguous()  # [B, O] or [K B, O]
    row_grad = grad.reshape(-1).contiguous()  # [K B]
    (rows, units), outputs = flat_samples.shape, flat_sigmoids.shape[1]
    weight_grad, bias_grad = grad.new_empty(outputs, units), grad.new_empty(outputs)  # [O, H], [O]
    if kernels.log_prob_weight_grad(
        flat_samples.data_ptr(), flat_sigmoids.data_ptr(), value_rows.data_ptr(), value_rows.shape[0], row_grad.data_ptr(),
        weight_grad.data_ptr(), bias_grad.data_ptr(), rows, units, outputs, torch.get_num_threads(),
    ):
        return _native_linear_weight_grad(samples, grad.unsqueeze(-1) * (values - sigmoids))
    return weight_grad, bias_grad


@_native_log_prob_weight_grad.register_fake
def _(samples, sigmoids, values, grad):
    return grad.new_empty(sigmoids.shape[-1], samples.shape[-1]), grad.new_empty(sigmoids.shape[-1])


def _save_log_prob_inputs(ctx, inputs, output):
    samples, _, _, values, _ = inputs
    ctx.save_for_backward(samples, values, output[1])
    ctx.mark_non_differentiable(output[1])


def _native_log_prob_backward(ctx, grad, _sigmoids_grad):
    """Gradients for the weight and the bias; none for the samples and values, which are draws or data."""
    samples, values, sigmoids = ctx.saved_tensors
    return None, *_native_log_prob_weight_grad(samples, sigmoids, values, grad), None, None


_native_log_prob.register_autograd(_native_log_prob_backward, setup_context=_save_log_prob_inputs)


def draw_with_log_prob(
    samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws h ~ Bernoulli(sigmoid(l)) for an SBN layer's logits l = samples W^T + b, with `uniforms`
    [K, ..., O] by `bernoulli_draws`'s rule, and returns (h, log p(h | samples)),
    the log-prob with gradients for `weight` and `bias`. One kernel does it all, as
    `sample_log_prob` does for given values: Q's middle layer's logits never reach memory. Only
    where `fused_log_prob_applies(samples, weight, bias)`."""
    draws, log_prob, _ = _native_draw(samples, weight, bias, uniforms, _gradient_wanted(weight, bias))
    return draws, log_prob


@torch.library.custom_op(f"{_OPS}::native_draw", mutates_args=())
def _native_draw(
    samples: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, uniforms: torch.Tensor, keep_sigmoids: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(draws [K, ..., O], their log-prob [K, ...], the logits' sigmoids [K, ..., O] for the backward,
    or an empty tensor without `keep_sigmoids`). Samples that are not all 0/1 (or a kernel out of
    memory) get them apart."""
    kernels = _kernels()
    flat = samples.reshape(-1, samples.shape[-1]).contiguous()  # [K B, H]
    (rows, units), outputs = flat.shape, weight.shape[0]
    draws, log_prob = samples.new_empty(*samples.shape[:-1], outputs), samples.new_empty(samples.shape[:-1])
    sigmoids = _sigmoids(samples, outputs, keep_sigmoids)
    pointers = (flat, _weight_operand(kernels, weight), bias.contiguous(), uniforms.contiguous(), draws)
    if kernels.draw(
        *(t.data_ptr() for t in pointers), _pointer(sigmoids), log_prob.data_ptr(), rows, units, outputs,
        torch.get_num_threads(),
    ):
        logits = _native_linear(samples, weight, bias)
        draws = bernoulli_draws(logits, uniforms)
        return draws, *_log_prob_apart(draws, logits, keep_sigmoids)
    return draws, log_prob, sigmoids


@_native_draw.register_fake
def _(samples, weight, bias, uniforms, keep_sigmoids):
    shape, outputs = samples.shape[:-1], weight.shape[0]
    return samples.new_empty(*shape, outputs), samples.new_empty(shape), _sigmoids(samples, outputs, keep_sigmoids)


def _save_draw_outputs(ctx, inputs, output):
    draws, _, sigmoids = output
    ctx.save_for_backward(inputs[0], draws, sigmoids)
    ctx.mark_non_differentiable(draws, sigmoids)


def _native_draw_backward(ctx, _draws_grad, grad, _sigmoids_grad):
    """The log-prob's gradients for the weight and the bias, as `_native_log_prob`'s with the draws as values."""
    samples, draws, sigmoids = ctx.saved_tensors
    return None, *_native_log_prob_weight_grad(samples, sigmoids, draws, grad), None, None


_native_draw.register_autograd(_native_draw_backward, setup_context=_save_draw_outputs)
