"""Stochastic binary layers: the building blocks of P and Q in a Helmholtz machine.

Every layer is a distribution over a binary vector h of `size` units, optionally conditioned on
another binary vector `cond` (the layer above in P, the layer below in Q). A layer without a
conditioning input (`cond_size=0`) is a top prior. All layers share one contract, so P and Q can
mix them freely:

    cond_logits(cond)                      -> [..., size]  the part of the logits that depends on cond only
    logits(h, cond, base)                  -> [..., size]  logit of p(h_i = 1 | h_<i, cond), teacher-forced
    log_prob(h, cond)                      -> [...]        log p(h | cond), summed over units
    sample(cond, sample_shape)             -> [*sample_shape, *cond.shape[:-1], size]
    sample_with_log_prob(cond, sample_shape) -> (h, log p(h | cond)), one cond_logits pass for both,
                                              and the sampler's logits serve the log-prob

Three layer types, as in Bornschein & Bengio (2015), Sec. 3:
    SBN  - sigmoid belief layer: units independent given `cond`.
    DARN - autoregressive within the layer: logit_i also sees h_<i through a strictly
           lower-triangular matrix (Gregor et al., 2014).
    NADE - conditional NADE: logit_i comes from a hidden layer that sees h_<i
           (Larochelle & Murray, 2011), computed with NADE's running sum.

`cond` may have fewer leading dimensions than `h` (e.g. x [B, D] against h [K, B, H]): the
conditioning term is computed once and broadcast, so Q's first layer does no K-fold work on x.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import darn_sample, nade_hidden
from pipeline.bernoulli import bernoulli_draws, log_prob_of_logits, softplus_sum
from pipeline.philox import uniform
from pipeline.sample_linear import draw_with_log_prob, fused_log_prob_applies, sample_linear, sample_log_prob


class BernoulliLayer(nn.Module):
    """Shared contract of all layers; subclasses define `logits` and `_sample`."""

    def __init__(self, size: int, cond_size: int = 0):
        super().__init__()
        self.size = size
        self.cond_size = cond_size
        self.bias = nn.Parameter(torch.zeros(size))
        # Why a Linear without bias: `self.bias` carries the offset for prior and conditional alike.
        self.cond_weight = nn.Linear(cond_size, size, bias=False) if cond_size else None

    def cond_logits(self, cond: torch.Tensor | None) -> torch.Tensor:
        """The part of the logits that depends only on `cond`: [..., size] (or [size] for a prior)."""
        if self.cond_weight is None:
            if cond is not None:
                raise ValueError(f"{type(self).__name__} is a prior and takes no conditioning input")
            return self.bias
        if cond is None:
            raise ValueError(f"{type(self).__name__} needs a conditioning input of size {self.cond_size}")
        return sample_linear(cond, self.cond_weight.weight, self.bias)  # F.linear, by table lookup for samples

    def log_prob(
        self, h: torch.Tensor, cond: torch.Tensor | None = None, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(h | cond) = sum_i [h_i l_i - softplus(l_i)] with l the teacher-forced logits: [...].

        This is sum_i [h_i log s(l_i) + (1 - h_i) log s(-l_i)] written so that a logit enters one
        transcendental (softplus) and one product; `base` = cond_logits(cond) when the caller has it.
        """
        return log_prob_of_logits(h, self.logits(h, cond, self.cond_logits(cond) if base is None else base))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor | None = None, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Draw h ~ p(h | cond): shape [*sample_shape, *cond.shape[:-1], size]."""
        return self._sample(self.cond_logits(cond), cond, sample_shape)[0]

    def sample_with_log_prob(
        self, cond: torch.Tensor | None = None, sample_shape: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw h ~ p(h | cond) and return (h, log p(h | cond)) from one evaluation of cond_logits.

        The draw is detached; the log-prob carries the gradient. Sharing `base` between the two
        saves the layer's matmul that a separate sample() and log_prob() would each pay. The logits
        the sampler computed serve the log-prob too: without autograd (evaluation) as they are, which
        saves DARN and NADE layers their teacher-forced pass (for NADE, a second walk over the units);
        with autograd through `_logits_of_draw`.
        """
        base = self.cond_logits(cond)
        with torch.no_grad():
            h, logits = self._sample(base.detach(), cond, sample_shape)
        if torch.is_grad_enabled():  # the gradient into the layer's weights goes through the logits
            logits = self._logits_of_draw(h, cond, base, logits)
        return h, log_prob_of_logits(h, logits)

    def logits(self, h: torch.Tensor, cond: torch.Tensor | None, base: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of p(h_i = 1 | h_<i, cond) given `base` = cond_logits(cond)."""
        raise NotImplementedError

    def _logits_of_draw(
        self, h: torch.Tensor, cond: torch.Tensor | None, base: torch.Tensor, drawn: torch.Tensor
    ) -> torch.Tensor:
        """`logits(h, cond, base)` with its gradient, for an h this layer drew, whose logits the sampler
        gave as `drawn` (values only): a layer may take the costly part of its logits from them."""
        return self.logits(h, cond, base)

    def _sample(
        self, base: torch.Tensor, cond: torch.Tensor | None, sample_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw h of shape [*sample_shape, *base.shape] given `base` = cond_logits(cond), and return it
        with its logits (as `logits(h, cond, base)` gives them, broadcastable to h)."""
        raise NotImplementedError


def _bernoulli(logits: torch.Tensor, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Bernoulli(sigmoid(logits)) draws of shape [*sample_shape, *logits.shape] (`bernoulli_draws`)."""
    return bernoulli_draws(logits, uniform((*sample_shape, *logits.shape), logits.dtype, logits.device))


def _logistic_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Logistic(0, 1) noise eps = logit(u) of midpoint uniforms u: [l > eps] is a Bernoulli(sigmoid(l)) draw.

    Midpoints for the reason given in `bernoulli_draws` (pipeline/bernoulli.py); above 0.5, logit(u) is taken as
    -logit(1 - u), where 1 - u is exact and u + step / 2 is not, so eps is symmetric and within
    +-17.3 (float32). The sequential samplers draw all their noise
    up front, so each unit's step is one comparison of a logit against its threshold instead of a
    sigmoid, a uniform draw and a comparison."""
    u = uniform(shape, dtype, device)
    half_step = torch.finfo(dtype).eps / 4
    lower = u < 0.5
    nearer_end = torch.where(lower, u + half_step, (1 - u) - half_step)  # min(u', 1 - u') of the midpoint u'
    magnitude = torch.log1p(-nearer_end) - torch.log(nearer_end)  # |logit(u')|
    return torch.where(lower, -magnitude, magnitude)


class SBNLayer(BernoulliLayer):
    """Sigmoid belief layer: p(h_i = 1 | cond) = sigmoid(b_i + W_i . cond), units independent."""

    def logits(self, h, cond, base):
        return base

    def log_prob(self, h, cond=None, base=None):
        """As the base class, but when h is shared by all samples of `cond` (x [B, D] against the K
        samples of h_1 [K, B, H] in log p(x | h_1)), sum_i h_i l_i = (h W) . cond + h . b: h W is
        computed once per data point ([B, H]), not once per sample ([K, B, D] products). On a CPU
        where the C kernels build, one kernel takes the product and the log-prob together
        (`sample_log_prob`)."""
        if base is None and cond is not None and self._fused(cond, h):
            return sample_log_prob(cond, self.cond_weight.weight, self.bias, h)
        if base is None and cond is not None and h.dim() < cond.dim():
            linear = (cond * (h @ self.cond_weight.weight)).sum(-1) + h @ self.bias  # [K, B]
            return linear - softplus_sum(self.cond_logits(cond))
        return super().log_prob(h, cond, base)

    def sample_with_log_prob(self, cond=None, sample_shape=()):
        """As the base class; on a CPU where the C kernels build, when `cond` holds samples already
        (Q's layers above the first), one kernel takes the product, the draws and their log-prob
        (`draw_with_log_prob`)."""
        if cond is not None and not sample_shape and self._fused(cond):
            uniforms = uniform((*cond.shape[:-1], self.size), cond.dtype, cond.device)
            return draw_with_log_prob(cond, self.cond_weight.weight, self.bias, uniforms)
        return super().sample_with_log_prob(cond, sample_shape)

    def _fused(self, cond: torch.Tensor, values: torch.Tensor | None = None) -> bool:
        """Whether this conditional's log-prob of `values` (or of its own draws) given `cond` goes to
        the fused kernels (`fused_log_prob_applies`)."""
        return self.cond_weight is not None and fused_log_prob_applies(cond, self.cond_weight.weight, self.bias, values)

    def _sample(self, base, cond, sample_shape):
        return _bernoulli(base, sample_shape), base  # base [B, size] is shared by the samples: one softplus pass


class DARNLayer(BernoulliLayer):
    """Autoregressive layer: p(h_i = 1 | h_<i, cond) = sigmoid(b_i + W_i . cond + A_i,<i . h_<i)."""

    def __init__(self, size: int, cond_size: int = 0):
        super().__init__(size, cond_size)
        self.autoregressive_weight = nn.Parameter(torch.zeros(size, size))
        self.register_buffer("mask", torch.ones(size, size).tril(-1), persistent=False)

    def logits(self, h, cond, base):
        return base + h @ (self.autoregressive_weight * self.mask).T

    @torch.compiler.disable  # a loop over units: torch.compile would unroll it (minutes of compiling)
    def _sample(self, base, cond, sample_shape):
        logits = base.expand(*sample_shape, *base.shape).clone()  # running logits: b + W cond + A h_<i
        noise = _logistic_noise(logits.shape, logits.dtype, logits.device)
        if darn_sample.kernel_applies(logits, self.autoregressive_weight):  # a CPU: pipeline/darn_sample.c
            rows, final_logits = darn_sample.darn_sample(
                logits.view(-1, self.size), noise.view(-1, self.size), self.autoregressive_weight
            )
            return rows.view(logits.shape), final_logits.view(logits.shape)
        h = torch.zeros_like(logits)
        later_weight = self.autoregressive_weight.T.contiguous()  # row i: A_{j,i}, what unit i adds to unit j
        units, unit_logits, unit_noise = h.unbind(-1), logits.unbind(-1), noise.unbind(-1)  # views, made once
        for i in range(self.size):  # sequential by definition: unit i depends on the units before it
            torch.gt(unit_logits[i], unit_noise[i], out=units[i])
            logits[..., i + 1 :].addcmul_(units[i].unsqueeze(-1), later_weight[i, i + 1 :])
        return h, logits  # each unit's logit saw exactly the units before it


class NADELayer(BernoulliLayer):
    """Conditional NADE: logit_i = b_i + W_i . cond + V_i . sigmoid(c + U cond + A_:,<i h_<i).

    The hidden pre-activation for unit i is a running sum over the units before it, so all
    logits come from one exclusive cumulative sum: O(size * hidden_size) per sample. On a CPU, in
    float32, the logits, their gradients and the sampler run in a C kernel that keeps the running
    sum in cache (pipeline/nade_hidden.py); elsewhere `NADEHiddenLogits` runs them as torch ops.
    """

    def __init__(self, size: int, cond_size: int = 0, hidden_size: int = 100):
        super().__init__(size, cond_size)
        self.hidden_size = hidden_size
        self.hidden_bias = nn.Parameter(torch.zeros(hidden_size))
        self.hidden_cond_weight = nn.Linear(cond_size, hidden_size, bias=False) if cond_size else None
        self.input_weight = nn.Parameter(torch.randn(size, hidden_size) * 0.01)  # A^T: row j feeds unit j's value
        self.output_weight = nn.Parameter(torch.randn(size, hidden_size) * 0.01)  # V

    def hidden_offset(self, cond):
        if self.hidden_cond_weight is None:
            return self.hidden_bias
        return F.linear(cond, self.hidden_cond_weight.weight, self.hidden_bias)

    def logits(self, h, cond, base):
        return self._logits(h, cond, base)

    def _logits_of_draw(self, h, cond, base, drawn):
        return self._logits(h, cond, base, drawn)

    def _logits(self, h, cond, base, drawn=None):
        """The logits, and with `drawn` (the sampler's logits of h), the hidden part's values taken from
        them on a CPU: the kernel's gradient then needs only its backward walk."""
        offset = self.hidden_offset(cond)  # [..., hidden]
        leading = torch.broadcast_shapes(h.shape[:-1], offset.shape[:-1])  # h may be shared by samples of cond
        h_rows = h.expand(*leading, self.size).reshape(-1, self.size)  # [N, size]
        offset_rows = offset.expand(*leading, self.hidden_size).reshape(-1, self.hidden_size)  # [N, hidden]
        if nade_hidden.kernel_applies(h_rows, offset_rows, self.input_weight):  # a CPU: pipeline/nade_hidden.c
            if drawn is None:
                hidden_part = nade_hidden.nade_hidden_logits(h_rows, offset_rows, self.input_weight, self.output_weight)
            else:
                drawn_rows = (drawn - base.detach()).expand(*leading, self.size).reshape(-1, self.size)  # [N, size]
                hidden_part = nade_hidden.nade_hidden_logits_drawn(
                    h_rows, offset_rows, self.input_weight, self.output_weight, drawn_rows
                )
        else:
            compiled = torch.compiler.is_compiling() and h.device.type == "cpu"  # measured on CPUs only
            hidden_part = _nade_hidden_logits(h_rows, offset_rows, self.input_weight, self.output_weight, compiled)
        return base + hidden_part.view(*leading, self.size)

    @torch.compiler.disable  # a loop over units: torch.compile would unroll it (minutes of compiling)
    def _sample(self, base, cond, sample_shape):
        base = base.expand(*sample_shape, *base.shape)
        threshold = _logistic_noise(base.shape, base.dtype, base.device) - base  # h_i = [V_i . sigmoid(a) > threshold_i]
        offset = self.hidden_offset(cond).expand(*base.shape[:-1], self.hidden_size)
        if nade_hidden.kernel_applies(threshold, offset, self.input_weight):  # a CPU: pipeline/nade_hidden.c
            rows, hidden_part = nade_hidden.nade_sample(
                threshold.reshape(-1, self.size), offset.reshape(-1, self.hidden_size), self.input_weight, self.output_weight
            )
            return rows.view(base.shape), base + hidden_part.view(base.shape)
        activation = offset.clone()
        h = torch.zeros_like(base)
        hidden_part = base.new_empty(self.size, *base.shape[:-1])  # unit-major: unit i's hidden logits are one block
        units, unit_thresholds = h.unbind(-1), threshold.unbind(-1)  # views, made once
        for i in range(self.size):  # running sum: add unit i's contribution once it is drawn
            torch.matmul(torch.sigmoid(activation), self.output_weight[i], out=hidden_part[i])
            torch.gt(hidden_part[i], unit_thresholds[i], out=units[i])
            activation.addcmul_(units[i].unsqueeze(-1), self.input_weight[i])
        return h, base + hidden_part.movedim(0, -1)


# Hidden activations per chunk of rows in NADEHiddenLogits: 4 MB, so that a chunk's dozen elementwise
# passes run in cache. On the 2-core CPU of benchmarks/RESULTS.md (1 MB L2 per core), NADE 784-200
# training steps side by side: 2^20 floats ran 1.3x (K = 1, 5, 10) and 1.1x (K = 50) faster than 2^21;
# 2^19 matched 2^20 at K <= 5 and lost at K >= 10, where the per-chunk overhead of more chunks shows.
_NADE_CHUNK_FLOATS = 2**20


def _cumsum_over_units(values: torch.Tensor, block: int = 16) -> torch.Tensor:
    """values.cumsum(-2) for [N, size, hidden], as a [block, block] lower-triangular matmul within blocks
    of units plus each block's offset: 1.5x faster than aten's sequential scan on this CPU (NADE steps
    4-6% faster at K = 1, 5, 10, side by side)."""
    n, size, hidden = values.shape
    if size % block:
        return values.cumsum(-2)
    blocks = values.reshape(n, size // block, block, hidden)
    within = torch.matmul(values.new_ones(block, block).tril(), blocks)  # [N, size / block, block, hidden]
    totals = blocks.sum(-2)
    return (within + (totals.cumsum(-2) - totals).unsqueeze(-2)).view(n, size, hidden)


def _nade_activations(h: torch.Tensor, offset: torch.Tensor, input_weight: torch.Tensor) -> torch.Tensor:
    """sigmoid(offset + sum_{j<i} h_j A_j) for every unit i: [N, size, hidden] from h [N, size], offset [N, hidden]."""
    # Shifted by one unit, so that the cumulative sum at unit i adds up h_<i only.
    shifted_h, shifted_weight = F.pad(h[..., :-1], (1, 0)), F.pad(input_weight[:-1], (0, 0, 1, 0))
    preceding = _cumsum_over_units(shifted_h.unsqueeze(-1) * shifted_weight)  # [N, size, hidden]
    return torch.sigmoid(offset.unsqueeze(-2) + preceding)


def _rows_per_chunk(input_weight: torch.Tensor) -> int:
    return max(1, _NADE_CHUNK_FLOATS // input_weight.numel())  # size x hidden activations per row


def _forward_chunk(h, offset, input_weight, output_weight):
    """NADE's hidden logits of one chunk of rows: [c, size]."""
    return (_nade_activations(h, offset, input_weight) * output_weight).sum(-1)


def _backward_chunk(h, offset, grad, input_weight, output_weight, needs_grad_h: bool):
    """Gradients of one chunk: (offset [c, hidden], A, V, h [c, size] or None), from its activations
    recomputed once and reduced while they are in cache."""
    hidden = _nade_activations(h, offset, input_weight)  # [c, size, hidden]
    grad_output = (grad.unsqueeze(-1) * hidden).sum(0)  # not einsum: its bmm is 10x slower here
    grad_pre = grad.unsqueeze(-1) * output_weight * hidden * (1 - hidden)  # d/d(pre-activation of unit i)
    total = grad_pre.sum(-2, keepdim=True)
    later = total - _cumsum_over_units(grad_pre)  # unit j feeds every unit after it: sum over i > j
    grad_input = (h.unsqueeze(-1) * later).sum(0)
    grad_h = (later * input_weight).sum(-1) if needs_grad_h else None
    return total.squeeze(-2), grad_input, grad_output, grad_h


# Inside a compiled CPU step, the chunks run compiled too: inductor fuses a chunk's elementwise passes
# around the blocked scan's matmuls. On the AVX2 CPU of 2026-12-03, the hidden logits of 784 units x 200
# (forward and backward, 125 and 500 rows) ran 1.35-1.45x faster, and whole compiled NADE steps 1.1-1.2x
# (benchmarks/RESULTS.md). Compiled once per layer shape, about 8 s: every chunk has the same number of
# rows (the last one is padded). Built on first use: building them loads inductor (about 1.3 s).
@functools.cache
def _compiled_chunks():
    return torch.compile(_forward_chunk, dynamic=False), torch.compile(_backward_chunk, dynamic=False)


def _chunks(rows: int, *tensors: torch.Tensor):
    """Chunks of `rows` rows of each tensor (fewer if the tensors have fewer), zipped; the last chunk
    padded with zero rows to the same size.

    Zero rows are exact padding: their h and gradient are 0, so they add 0 to the parameters'
    gradients, and their own outputs are cut off by the caller."""
    rows = max(1, min(rows, len(tensors[0])))
    pad = -len(tensors[0]) % rows
    per_tensor = [list(t.split(rows)) for t in tensors]
    if pad:
        for parts in per_tensor:
            parts[-1] = F.pad(parts[-1], (0, 0, 0, pad))  # a copy of the last chunk only
    return zip(*per_tensor, strict=True)


class NADEHiddenLogits(torch.autograd.Function):
    """The hidden part of NADE's teacher-forced logits, V_i . sigmoid(offset + sum_{j<i} h_j A_j): [N, size].

    In torch ops, for GPUs, float64 and machines without the C kernel (pipeline/nade_hidden.py).

    Why a custom function: autograd would keep the [N, size, hidden] activations (N = K B rows: 3 GB
    for 784 x 200 units at K = 50, B = 100) and run its backward as a dozen more passes over tensors
    of that size. Here the rows go through in chunks of about 2^20 activations, the forward keeps
    none of them, and the backward recomputes a chunk's activations once and reduces them into the
    gradients while they are in cache. `compiled`: run the chunks through `_compiled_chunks`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h, offset, input_weight, output_weight, compiled: bool):
        forward_chunk = _compiled_chunks()[0] if compiled else _forward_chunk
        chunks = _chunks(_rows_per_chunk(input_weight), h, offset)
        outputs = [forward_chunk(*chunk, input_weight, output_weight) for chunk in chunks]
        return torch.cat(outputs)[: len(h)]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.compiled = inputs[4]

    @staticmethod
    def backward(ctx, grad):
        h, offset, input_weight, output_weight = ctx.saved_tensors  # [N, size], [N, hidden], A, V
        backward_chunk = _compiled_chunks()[1] if ctx.compiled else _backward_chunk
        grad_offset, grad_h, grad_input, grad_output = [], [], 0, 0
        for chunk in _chunks(_rows_per_chunk(input_weight), h, offset, grad):
            offset_part, input_part, output_part, h_part = backward_chunk(
                *chunk, input_weight, output_weight, ctx.needs_input_grad[0]
            )
            grad_offset.append(offset_part)
            grad_h.append(h_part)
            grad_input, grad_output = grad_input + input_part, grad_output + output_part
        n = len(h)
        grad_h = torch.cat(grad_h)[:n] if ctx.needs_input_grad[0] else None
        return grad_h, torch.cat(grad_offset)[:n], grad_input, grad_output, None


# A loop over chunks of rows: torch.compile would unroll it, so a compiled step calls it eagerly.
_nade_hidden_logits = torch.compiler.disable(NADEHiddenLogits.apply)


LAYER_TYPES = {"sbn": SBNLayer, "darn": DARNLayer, "nade": NADELayer}


def make_layer(kind: str, size: int, cond_size: int = 0, nade_hidden: int = 100) -> BernoulliLayer:
    """Build a layer by name ('sbn', 'darn' or 'nade'); `cond_size=0` makes a top prior."""
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}; choose one of {sorted(LAYER_TYPES)}")
    if kind == "nade":
        return NADELayer(size, cond_size, hidden_size=nade_hidden)
    return LAYER_TYPES[kind](size, cond_size)
