"""Bernoulli draws and log-probs from logits: the rules that pipeline/layers.py and the fused
kernels' fallbacks (pipeline/sample_linear.py) share."""

import torch


class SoftplusSum(torch.autograd.Function):
    """sum_i softplus(l_i) over the last dimension, the normalizer of a Bernoulli log-prob: [...].

    Why not F.softplus(l).sum(-1): the log-prob of P's bottom layer evaluates it on [K, B, D] logits
    every step, and it costs one log per element forward plus a broadcast-gradient pass backward.
    Here softplus(l) = relu(l) - log sigmoid(|l|) with sigmoid(|l|) in [1/2, 1], so the logs are
    taken of products over groups of at most 100 units (>= 2^-100, no underflow in float32):
    one exp per element. In float32 the error is a few ulps of the sum of |l| (relu(l) comes from
    sum l + sum |l|, which cancel when signs mix): 4-5x the direct form's, 1e-3 nats at logits of
    scale 20 over 784 units, and unbiased.
    Backward: d/dl_i = sigmoid(l_i), in one pass.
    """

    generate_vmap_rule = True  # works under torch.func transforms (the exact-gradient tests use them)

    @staticmethod
    def forward(logits: torch.Tensor) -> torch.Tensor:
        size = logits.shape[-1]
        group = max(g for g in range(1, min(size, 100) + 1) if size % g == 0)
        magnitude = logits.abs()
        sigmoids = torch.sigmoid(magnitude).unflatten(-1, (size // group, group))  # [..., size / group, group]
        log_sigmoid_sum = sigmoids.prod(-1).log().sum(-1)
        return (logits.sum(-1) + magnitude.sum(-1)) / 2 - log_sigmoid_sum  # sum relu(l) - sum log sigmoid(|l|)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        return torch.sigmoid(logits) * grad.unsqueeze(-1)


softplus_sum = SoftplusSum.apply


def log_prob_of_logits(h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_i [h_i l_i - softplus(l_i)] = log p(h) for Bernoulli logits l (broadcastable to h): [...]."""
    return (h * logits).sum(-1) - softplus_sum(logits)


def bernoulli_draws(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Bernoulli(sigmoid(logits)) draws from uniforms of the grid torch.rand draws from (logits
    broadcast to the uniforms' shape): the less likely value where the uniform's midpoint falls
    below that value's probability sigmoid(-|l|), which float32 holds to full relative precision
    even when the likely value's probability rounds to 1. The sigmoid is taken before broadcasting,
    so logits shared by all samples cost one pass. pipeline/bernoulli.h's fused draws follow it.

    Why midpoints u + step / 2 (step 2^-24 in float32): the grid's points are k x step on [0, 1),
    and a draw of u = 0 makes `u < p` true for every p > 0. A unit value to which Q gives
    probability e^-50 would then come out once in 2^24 draws in float32, about 10^14 times too
    often, and its importance weight (e^30 too large) would swamp an estimate with K = 100000.
    Against midpoints, an outcome less likely than half a step is never drawn, on either side, and
    any other one at most twice as often as it should. Below 0.5 the sum is exact; only values below
    0.5 are compared with it.
    """
    midpoints = uniforms + torch.finfo(logits.dtype).eps / 4  # eps / 2 is torch.rand's step
    return ((midpoints < torch.sigmoid(-logits.abs())) ^ (logits > 0)).to(logits.dtype)
