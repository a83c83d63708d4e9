"""The Helmholtz machine: a generative model P and an inference network Q over binary layers.

With `layer_sizes = [D, H_1, ..., H_L]` (x = h_0 has D units, h_L is the top layer):

    P(x, h) = p(h_L) * prod_{l=1..L} p(h_{l-1} | h_l)      top-down: prior, then conditionals
    Q(h | x) = prod_{l=1..L} q(h_l | h_{l-1})               bottom-up, h_0 = x

Bornschein & Bengio (2015), Sec. 2. Layer types ('sbn', 'darn', 'nade') are chosen per model or
per layer; see `pipeline.layers`.
"""

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.layers import LAYER_TYPES, BernoulliLayer, make_layer

LayerSpec = str | Sequence[str]


def _per_layer(spec: LayerSpec, count: int, name: str) -> list[str]:
    spec = [spec] * count if isinstance(spec, str) else list(spec)
    if len(spec) != count:
        raise ValueError(f"{name} lists {len(spec)} layer types, but this model has {count} {name} layers")
    unknown = [kind for kind in spec if kind not in LAYER_TYPES]
    if unknown:
        raise ValueError(f"{name}: unknown layer type {unknown[0]!r}; choose one of {sorted(LAYER_TYPES)}")
    return spec


class HelmholtzMachine(nn.Module):
    """Generative model P and inference network Q built from `layer_sizes = [D, H_1, ..., H_L]`.

    Args:
        layer_sizes: units per layer, data first: [D, H_1, ..., H_L] with L >= 1.
        p_layer: layer type of P, one name for all or a list of L + 1 names bottom-up:
            [p(x | h_1), p(h_1 | h_2), ..., p(h_L)] (the last is the top prior).
        q_layer: layer type of Q, one name for all or a list of L names bottom-up:
            [q(h_1 | x), ..., q(h_L | h_{L-1})].
        nade_hidden: hidden units of every NADE layer.
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        p_layer: LayerSpec = "sbn",
        q_layer: LayerSpec = "sbn",
        nade_hidden: int = 100,
    ):
        super().__init__()
        layer_sizes = [int(n) for n in layer_sizes]
        if len(layer_sizes) < 2 or min(layer_sizes) < 1:
            raise ValueError(f"layer_sizes must be [D, H_1, ..., H_L] of positive sizes, got {layer_sizes}")
        self.layer_sizes = layer_sizes
        num_latent = len(layer_sizes) - 1
        p_types = _per_layer(p_layer, num_latent + 1, "p_layer")
        q_types = _per_layer(q_layer, num_latent, "q_layer")
        # p_conditionals[l] models h_l given h_{l+1} (h_0 = x); the prior models h_L.
        self.p_conditionals = nn.ModuleList(
            make_layer(p_types[l], layer_sizes[l], layer_sizes[l + 1], nade_hidden) for l in range(num_latent)
        )
        self.p_prior = make_layer(p_types[-1], layer_sizes[-1], 0, nade_hidden)
        # q_conditionals[l] models h_{l+1} given h_l.
        self.q_conditionals = nn.ModuleList(
            make_layer(q_types[l], layer_sizes[l + 1], layer_sizes[l], nade_hidden) for l in range(num_latent)
        )

    @property
    def num_latent_layers(self) -> int:
        return len(self.layer_sizes) - 1

    def p_parameters(self) -> list[nn.Parameter]:
        """Parameters of the generative model P (prior and conditionals)."""
        return [*self.p_conditionals.parameters(), *self.p_prior.parameters()]

    def q_parameters(self) -> list[nn.Parameter]:
        """Parameters of the inference network Q."""
        return list(self.q_conditionals.parameters())

    @torch.no_grad()
    def sample_q(self, x: torch.Tensor, num_samples: int) -> list[torch.Tensor]:
        """Draw K samples h ~ Q(h | x) for x [B, D]: a list of L tensors [K, B, H_l], h_1 first."""
        return self.sample_q_with_log_q(x, num_samples)[0]

    def sample_q_with_log_q(self, x: torch.Tensor, num_samples: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """K samples h ~ Q(h | x) and their log Q(h | x) [K, B], from one pass through Q.

        Each layer's logits serve both its draw and its log-prob, so Q's matmuls are paid once; the
        draws are detached and the log-prob carries the gradient into Q.
        """
        hs, log_q, cond, sample_shape = [], 0, x.to(self.p_prior.bias.dtype), (num_samples,)
        for layer in self.q_conditionals:
            cond, log_prob = layer.sample_with_log_prob(cond, sample_shape)
            hs.append(cond)
            log_q = log_q + log_prob
            sample_shape = ()  # only the first layer adds the K dimension
        return hs, log_q

    def log_q(self, hs: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log Q(h | x) = sum_l log q(h_l | h_{l-1}): [K, B] for x [B, D] or [K, B, D]."""
        conds = [x.to(hs[0].dtype), *hs[:-1]]
        return sum(layer.log_prob(h, cond) for layer, h, cond in zip(self.q_conditionals, hs, conds))

    def log_p(self, x: torch.Tensor, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        """log P(x, h) = log p(h_L) + sum_l log p(h_{l-1} | h_l): [K, B] for x [B, D] or [K, B, D]."""
        targets = [x.to(hs[0].dtype), *hs[:-1]]
        log_prob = self.p_prior.log_prob(hs[-1])
        for layer, target, cond in zip(self.p_conditionals, targets, hs):
            log_prob = log_prob + layer.log_prob(target, cond)
        return log_prob

    @torch.no_grad()
    def sample_p(self, num: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral samples (x, h) ~ P: x [num, D] and a list of L tensors [num, H_l], h_1 first."""
        top = self.p_prior.sample(None, (num,))
        samples = [top]
        for layer in reversed(self.p_conditionals):
            samples.append(layer.sample(samples[-1]))
        x, *hs = reversed(samples)
        return x, hs

    def floats_per_sample(self) -> int:
        """Activation floats one (sample, data point) pair needs in a log-prob pass (for chunking): one
        logit per unit (NADE's hidden activations go through in chunks of their own, see layers.py)."""
        layers: list[BernoulliLayer] = [*self.p_conditionals, self.p_prior, *self.q_conditionals]
        return sum(layer.size for layer in layers)
