"""Stochastic binary layers: the building blocks of P and Q in a Helmholtz machine.

Every layer is a distribution over a binary vector h of `size` units, optionally conditioned on
another binary vector `cond` (the layer above in P, the layer below in Q). A layer without a
conditioning input (`cond_size=0`) is a top prior. All layers share one contract, so P and Q can
mix them freely:

    logits(h, cond)             -> [..., size]  logit of p(h_i = 1 | h_<i, cond), teacher-forced
    log_prob(h, cond)           -> [...]        log p(h | cond), summed over units
    sample(cond, sample_shape)  -> [*sample_shape, *cond.shape[:-1], size]

Three layer types, as in Bornschein & Bengio (2015), Sec. 3:
    SBN  - sigmoid belief layer: units independent given `cond`.
    DARN - autoregressive within the layer: logit_i also sees h_<i through a strictly
           lower-triangular matrix (Gregor et al., 2014).
    NADE - conditional NADE: logit_i comes from a hidden layer that sees h_<i
           (Larochelle & Murray, 2011), computed with NADE's running sum.

`cond` may have fewer leading dimensions than `h` (e.g. x [B, D] against h [K, B, H]): the
conditioning term is computed once and broadcast, so Q's first layer does no K-fold work on x.
"""

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.cond_weight(cond) + self.bias

    def log_prob(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(h | cond) = sum_i [h_i log s(l_i) + (1 - h_i) log s(-l_i)], via BCE with logits."""
        logits = self.logits(h, cond)
        logits, h = torch.broadcast_tensors(logits, h)
        return -F.binary_cross_entropy_with_logits(logits, h, reduction="none").sum(-1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor | None = None, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Draw h ~ p(h | cond): shape [*sample_shape, *cond.shape[:-1], size]."""
        base = self.cond_logits(cond)
        return self._sample(base.expand(*sample_shape, *base.shape), cond)

    def logits(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, base: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Draw h given `base` = cond_logits(cond), already expanded to the output shape."""
        raise NotImplementedError


def _bernoulli(logits: torch.Tensor) -> torch.Tensor:
    return (torch.rand_like(logits) < torch.sigmoid(logits)).to(logits.dtype)


class SBNLayer(BernoulliLayer):
    """Sigmoid belief layer: p(h_i = 1 | cond) = sigmoid(b_i + W_i . cond), units independent."""

    def logits(self, h, cond):
        return self.cond_logits(cond)

    def _sample(self, base, cond):
        return _bernoulli(base)


class DARNLayer(BernoulliLayer):
    """Autoregressive layer: p(h_i = 1 | h_<i, cond) = sigmoid(b_i + W_i . cond + A_i,<i . h_<i)."""

    def __init__(self, size: int, cond_size: int = 0):
        super().__init__(size, cond_size)
        self.autoregressive_weight = nn.Parameter(torch.zeros(size, size))
        self.register_buffer("mask", torch.ones(size, size).tril(-1), persistent=False)

    def logits(self, h, cond):
        return self.cond_logits(cond) + h @ (self.autoregressive_weight * self.mask).T

    def _sample(self, base, cond):
        h = torch.zeros_like(base)
        weight = self.autoregressive_weight
        for i in range(self.size):  # sequential by definition: unit i depends on the units before it
            h[..., i] = _bernoulli(base[..., i] + h[..., :i] @ weight[i, :i])
        return h


class NADELayer(BernoulliLayer):
    """Conditional NADE: logit_i = b_i + W_i . cond + V_i . sigmoid(c + U cond + A_:,<i h_<i).

    The hidden pre-activation for unit i is a running sum over the units before it, so all
    logits come from one exclusive cumulative sum: O(size * hidden_size) per sample.
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
        return self.hidden_cond_weight(cond) + self.hidden_bias

    def logits(self, h, cond):
        base = self.cond_logits(cond)  # first: it checks that `cond` matches the layer's role
        contributions = h.unsqueeze(-1) * self.input_weight  # [..., size, hidden]
        preceding = contributions.cumsum(-2) - contributions  # exclusive: unit i sees h_<i
        hidden = torch.sigmoid(self.hidden_offset(cond).unsqueeze(-2) + preceding)
        return base + (hidden * self.output_weight).sum(-1)

    def _sample(self, base, cond):
        activation = self.hidden_offset(cond).expand(*base.shape[:-1], self.hidden_size).clone()
        h = torch.zeros_like(base)
        for i in range(self.size):  # running sum: add unit i's contribution once it is drawn
            logit = base[..., i] + torch.sigmoid(activation) @ self.output_weight[i]
            h[..., i] = _bernoulli(logit)
            activation += h[..., i, None] * self.input_weight[i]
        return h


LAYER_TYPES = {"sbn": SBNLayer, "darn": DARNLayer, "nade": NADELayer}


def make_layer(kind: str, size: int, cond_size: int = 0, nade_hidden: int = 100) -> BernoulliLayer:
    """Build a layer by name ('sbn', 'darn' or 'nade'); `cond_size=0` makes a top prior."""
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}; choose one of {sorted(LAYER_TYPES)}")
    if kind == "nade":
        return NADELayer(size, cond_size, hidden_size=nade_hidden)
    return LAYER_TYPES[kind](size, cond_size)
