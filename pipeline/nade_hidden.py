"""NADE's hidden logits V_i . sigmoid(offset + sum_{j<i} h_j A_j) on a CPU, by a C kernel.

The torch version (`NADEHiddenLogits` in pipeline/layers.py) builds the activations of a chunk of
rows as [rows, size, hidden] tensors and makes a dozen elementwise passes over them, forward and
backward. pipeline/nade_hidden.c walks the units in order instead, with a block of 8 rows'
activations in L1, and computes the backward in the same single walk (its comment has the
formulas). Both the forward and the backward are custom ops, so a compiled training step calls them
without a graph break. The sampler computes the hidden logits of what it draws on the way; a third
op, `nade_hidden_logits_drawn`, takes them as the forward's value, so that scoring a draw in training
costs the backward walk only.

The kernel runs for float32 rows on a CPU when pipeline/native.py can build it; everything else
(a GPU, float64, no C compiler, RWS_NATIVE=0) takes the torch version.
"""

import ctypes
import functools
import hashlib
from pathlib import Path

import torch

from pipeline.native import load_library, padded

# Hashed like pipeline/sample_linear.py's ops: torch.compile's cache keys graphs by the ops' names,
# not by the backward registered for them, so a changed formula needs new names.
_OPS = "rws_" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

_HIDDEN_MULTIPLE = 16  # the kernel's hidden width must be a multiple of its vector width (4, 8 or 16 floats)


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    """pipeline/nade_hidden.c, built for this machine (pipeline/native.py), or None."""
    library = load_library("nade_hidden")
    return None if library is None else declare(library)


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give a build of nade_hidden.c its functions' argument types."""
    pointer, rows, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.nade_hidden_logits.argtypes = [pointer] * 5 + [rows, size, size, size]
    library.nade_hidden_logits_backward.argtypes = [pointer] * 9 + [rows, size, size, size]
    library.nade_sample.argtypes = [pointer] * 6 + [rows, size, size, size]
    for kernel in (library.nade_hidden_logits, library.nade_hidden_logits_backward, library.nade_sample):
        kernel.restype = None
    return library


@torch.compiler.assume_constant_result
def have_kernels() -> bool:
    """Whether the kernel loads: a constant to torch.compile, which would otherwise break the graph at ctypes."""
    return _kernels() is not None


def kernel_applies(h: torch.Tensor, offset: torch.Tensor, input_weight: torch.Tensor) -> bool:
    """Whether `nade_hidden_logits` takes these operands: float32 on a CPU, and the kernel built."""
    return (
        h.device.type == "cpu"
        and h.dtype == offset.dtype == input_weight.dtype == torch.float32
        and have_kernels()
    )


def _padded_shapes(h: torch.Tensor, input_weight: torch.Tensor) -> tuple[int, int]:
    """Rows and hidden units as the kernel takes them: multiples of its row block and of 16."""
    block = _kernels().nade_block_rows()
    return -(-h.shape[0] // block) * block, -(-input_weight.shape[1] // _HIDDEN_MULTIPLE) * _HIDDEN_MULTIPLE


def _walk(kernel, per_unit: torch.Tensor, offset, input_weight, output_weight, outputs: int = 1) -> list[torch.Tensor]:
    """Run a forward walk over the units (the logits or the sampler): `outputs` tensors [N, size] from one
    input per unit (h or the thresholds) [N, size], the offsets [N, hidden] and A, V [size, hidden]."""
    (n, size), (rows, hidden) = per_unit.shape, _padded_shapes(per_unit, input_weight)
    operands = [padded(per_unit, rows, size), padded(offset, rows, hidden)]
    operands += [padded(input_weight, size, hidden), padded(output_weight, size, hidden)]
    out = [per_unit.new_empty(rows, size) for _ in range(outputs)]
    kernel(*(t.data_ptr() for t in operands + out), rows, size, hidden, torch.get_num_threads())
    return [t[:n] for t in out]


@torch.library.custom_op(f"{_OPS}::nade_hidden_logits", mutates_args=())
def nade_hidden_logits(
    h: torch.Tensor, offset: torch.Tensor, input_weight: torch.Tensor, output_weight: torch.Tensor
) -> torch.Tensor:
    """V_i . sigmoid(offset_n + sum_{j<i} h_nj A_j): [N, size] from h [N, size], offset [N, hidden], A and V [size, hidden]."""
    return _walk(_kernels().nade_hidden_logits, h, offset, input_weight, output_weight)[0]


@nade_hidden_logits.register_fake
def _(h, offset, input_weight, output_weight):
    return h.new_empty(h.shape)


def nade_sample(
    threshold: torch.Tensor, offset: torch.Tensor, input_weight: torch.Tensor, output_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NADE's draws h [N, size], unit by unit: h_ni = [V_i . sigmoid(offset_n + sum_{j<i} h_nj A_j) > threshold_ni],
    and those hidden logits [N, size]: what `nade_hidden_logits` gives for the drawn h, to the bit."""
    h, hidden_logits = _walk(_kernels().nade_sample, threshold, offset, input_weight, output_weight, outputs=2)
    return h, hidden_logits  # [N, size] each


@torch.library.custom_op(f"{_OPS}::nade_hidden_logits_backward", mutates_args=())
def nade_hidden_logits_backward(
    h: torch.Tensor,
    offset: torch.Tensor,
    grad: torch.Tensor,
    input_weight: torch.Tensor,
    output_weight: torch.Tensor,
    with_grad_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (h [N, size] or empty if not `with_grad_h`, offset [N, hidden], A, V) for the output's gradient [N, size]."""
    (n, size), (rows, hidden) = h.shape, _padded_shapes(h, input_weight)
    threads = max(1, min(torch.get_num_threads(), rows // _kernels().nade_block_rows()))
    h_rows, activations, grad_rows = padded(h, rows, size), padded(offset, rows, hidden), padded(grad, rows, size)
    a, v = padded(input_weight, size, hidden), padded(output_weight, size, hidden)
    total = h.new_zeros(rows, hidden)  # the running sum of pre-activation gradients, over all units at the end
    grad_a, grad_v = h.new_zeros(threads, size, hidden), h.new_zeros(threads, size, hidden)  # one slab per thread
    grad_h = h.new_empty(rows, size) if with_grad_h else None
    _kernels().nade_hidden_logits_backward(
        h_rows.data_ptr(), activations.data_ptr(), grad_rows.data_ptr(), a.data_ptr(), v.data_ptr(), total.data_ptr(),
        grad_a.data_ptr(), grad_v.data_ptr(), grad_h.data_ptr() if with_grad_h else None, rows, size, hidden, threads,
    )  # fmt: skip
    total = total[:n, : offset.shape[1]]  # [N, hidden]
    # The kernel summed -h_nj prefix_nj; unit j's gradient sees total_n - prefix_nj.
    grad_input = torch.addmm(grad_a.sum(0)[:, : offset.shape[1]], h.t(), total)
    grad_h = torch.addmm(grad_h[:n], total, input_weight.t()) if with_grad_h else h.new_empty(0)
    return grad_h, total.clone(), grad_input, grad_v.sum(0)[:, : offset.shape[1]].contiguous()


@nade_hidden_logits_backward.register_fake
def _(h, offset, grad, input_weight, output_weight, with_grad_h):
    grad_h = h.new_empty(h.shape if with_grad_h else 0)
    return grad_h, torch.empty_like(offset), torch.empty_like(input_weight), torch.empty_like(output_weight)


@torch.library.custom_op(f"{_OPS}::nade_hidden_logits_drawn", mutates_args=())
def nade_hidden_logits_drawn(
    h: torch.Tensor, offset: torch.Tensor, input_weight: torch.Tensor, output_weight: torch.Tensor, drawn: torch.Tensor
) -> torch.Tensor:
    """`nade_hidden_logits(h, offset, A, V)` for an h that `nade_sample` drew, given the hidden logits `drawn`
    [N, size] it computed on the way: their values (a copy), with the gradients of `nade_hidden_logits`.
    It saves a training step the forward walk over Q's units."""
    return drawn.clone()


@nade_hidden_logits_drawn.register_fake
def _(h, offset, input_weight, output_weight, drawn):
    return torch.empty_like(drawn)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])  # h, offset, A, V: all the backward walk needs


def _backward(ctx, grad):
    h, offset, input_weight, output_weight = ctx.saved_tensors
    with_grad_h = ctx.needs_input_grad[0]
    grad_h, grad_offset, grad_input, grad_output = nade_hidden_logits_backward(
        h, offset, grad.contiguous(), input_weight, output_weight, with_grad_h
    )
    return grad_h if with_grad_h else None, grad_offset, grad_input, grad_output


nade_hidden_logits.register_autograd(_backward, setup_context=_save_inputs)
nade_hidden_logits_drawn.register_autograd(lambda ctx, grad: (*_backward(ctx, grad), None), setup_context=_save_inputs)
