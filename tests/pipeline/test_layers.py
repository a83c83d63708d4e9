"""The shared contract of the stochastic binary layers (SBN, DARN, NADE), checked by exact enumeration.

Every layer type is tested both as a top prior (cond_size=0) and as a conditional, with all parameters
drawn from normal(0, 1) so the autoregressive (DARN) and NADE weights are far from their near-zero
initialization.
"""

import pytest
import torch

from pipeline import layers
from pipeline.layers import LAYER_TYPES, DARNLayer, NADELayer, SBNLayer, make_layer, softplus_sum

from .enumeration import all_binary, randomize_, single_thread  # noqa: F401  (autouse fixture)

SIZE = 4  # units: 16 configurations
COND_SIZE = 3  # conditioning units: 8 configurations
NADE_HIDDEN = 6
Z = 5.0  # standard errors allowed for a Monte Carlo estimate

KINDS = ("sbn", "darn", "nade")
CASES = [(kind, cond_size) for kind in KINDS for cond_size in (0, COND_SIZE)]


def _id(case):
    kind, cond_size = case
    return f"{kind}-{'prior' if cond_size == 0 else 'conditional'}"


@pytest.fixture(params=CASES, ids=[_id(case) for case in CASES])
def layer(request):
    kind, cond_size = request.param
    torch.manual_seed(0)
    return randomize_(make_layer(kind, SIZE, cond_size, nade_hidden=NADE_HIDDEN).double(), std=1.0)


def conds(layer, count=None):
    """Every conditioning configuration [8, c] (or `count` of them), or [None] for a prior."""
    if layer.cond_size == 0:
        return None
    values = all_binary(layer.cond_size)
    return values if count is None else values[:count]


def enumerated_log_probs(layer, cond):
    """log p(h | cond) for all 16 h and each cond: [16, C] (C = 1 for a prior)."""
    h = all_binary(SIZE)  # [16, n]
    if cond is None:
        return layer.log_prob(h).unsqueeze(-1)
    expanded = h.unsqueeze(1).expand(h.shape[0], cond.shape[0], SIZE)  # [16, C, n]
    return layer.log_prob(expanded, cond.unsqueeze(0).expand(h.shape[0], *cond.shape))


def binary_index(bits):
    return (bits.long() * (2 ** torch.arange(SIZE - 1, -1, -1))).sum(-1)


def test_make_layer_builds_the_named_type():
    assert set(LAYER_TYPES) == set(KINDS)
    for kind, cls in [("sbn", SBNLayer), ("darn", DARNLayer), ("nade", NADELayer)]:
        layer = make_layer(kind, SIZE, COND_SIZE, nade_hidden=NADE_HIDDEN)
        assert type(layer) is cls and layer.size == SIZE and layer.cond_size == COND_SIZE
    assert make_layer("nade", SIZE, 0, nade_hidden=7).hidden_size == 7


def test_make_layer_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"unknown layer type 'rbm'.*darn.*nade.*sbn"):
        make_layer("rbm", SIZE, COND_SIZE)


def test_probabilities_sum_to_one(layer):
    with torch.no_grad():
        log_probs = enumerated_log_probs(layer, conds(layer))  # [16, C]
    assert torch.isfinite(log_probs).all() and (log_probs < 0).all()
    totals = torch.logsumexp(log_probs, 0)
    torch.testing.assert_close(totals, torch.zeros_like(totals), atol=1e-12, rtol=0)
    # Non-degenerate: the randomized layer is far from uniform, so the check above is not trivially met.
    assert (log_probs.max(0).values - log_probs.min(0).values > 1.0).all()


def test_sample_frequencies_match_probabilities(layer):
    torch.manual_seed(1)
    num_draws = 100_000
    cond = conds(layer, count=3)
    samples = layer.sample(cond, (num_draws,))  # [N, C, n] or [N, n]
    if cond is None:
        samples = samples.unsqueeze(1)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    index = binary_index(samples)  # [N, C]
    counts = torch.zeros(2**SIZE, index.shape[1], dtype=torch.float64)
    counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    with torch.no_grad():
        probs = enumerated_log_probs(layer, cond).exp()  # [16, C]
    freq = counts / num_draws
    # Binomial standard error per cell; + Z / N is a continuity allowance for cells with few expected counts.
    tolerance = Z * torch.sqrt(probs * (1 - probs) / num_draws) + Z / num_draws
    excess = ((freq - probs).abs() / tolerance).max().item()
    assert excess < 1, f"a frequency is {excess:.2f}x its tolerance off exp(log_prob)"
    # The tolerance is tight enough to matter: a few percent on the likeliest configurations.
    assert (tolerance.max(0).values < 0.01).all()


def test_sample_shapes(layer):
    torch.manual_seed(2)
    k, b = 5, 7
    if layer.cond_size == 0:
        assert layer.sample(None, (k, b)).shape == (k, b, SIZE)
        assert layer.sample(None, (k,)).shape == (k, SIZE)
        assert layer.sample().shape == (SIZE,)
    else:
        cond = torch.randint(0, 2, (b, layer.cond_size)).double()
        assert layer.sample(cond, (k,)).shape == (k, b, SIZE)
        assert layer.sample(cond).shape == (b, SIZE)
        assert layer.sample(cond.expand(k, b, layer.cond_size)).shape == (k, b, SIZE)
        assert layer.sample(cond, (3, k)).shape == (3, k, b, SIZE)


def test_log_prob_broadcasts_cond_over_leading_dims(layer):
    torch.manual_seed(3)
    k, b = 5, 7
    h = torch.randint(0, 2, (k, b, SIZE)).double()
    if layer.cond_size == 0:
        log_prob = layer.log_prob(h)
        assert log_prob.shape == (k, b)
        torch.testing.assert_close(log_prob, layer.log_prob(h.reshape(-1, SIZE)).reshape(k, b), rtol=1e-12, atol=0)
        return
    cond = torch.randint(0, 2, (b, layer.cond_size)).double()
    log_prob = layer.log_prob(h, cond)
    assert log_prob.shape == (k, b)
    torch.testing.assert_close(log_prob, layer.log_prob(h, cond.expand(k, b, layer.cond_size)), rtol=1e-12, atol=0)
    # Each (k, b) entry is the unbatched log-probability of h[k, b] given cond[b].
    for i, j in [(0, 0), (2, 5), (4, 6)]:
        torch.testing.assert_close(log_prob[i, j], layer.log_prob(h[i, j], cond[j]), rtol=1e-12, atol=0)
    # ... and cond matters (a layer ignoring it would pass the checks above).
    assert not torch.allclose(log_prob, layer.log_prob(h, 1 - cond))


def test_logits_of_unit_i_ignore_units_at_and_after_i(layer):
    """Autoregressive order: flipping h_j leaves logit_i unchanged for every i <= j.

    For DARN and NADE, flipping h_j must change some logit_i with i > j (otherwise the layer would not be
    autoregressive at all and the check would be vacuous); SBN logits do not depend on h.
    """
    torch.manual_seed(4)
    b = 16
    h = all_binary(SIZE)  # every configuration
    cond = None if layer.cond_size == 0 else torch.randint(0, 2, (b, layer.cond_size)).double()
    with torch.no_grad():
        base = layer.logits(h, cond, layer.cond_logits(cond)).expand(b, SIZE)
        for j in range(SIZE):
            flipped = h.clone()
            flipped[:, j] = 1 - flipped[:, j]
            diff = (layer.logits(flipped, cond, layer.cond_logits(cond)).expand(b, SIZE) - base).abs()
            assert diff[:, : j + 1].max() < 1e-12, f"a logit of unit <= {j} depends on h_{j}"
            if j == SIZE - 1:
                continue
            later = diff[:, j + 1 :]
            if isinstance(layer, SBNLayer):
                assert later.max() == 0
            else:
                assert later.max() > 1e-3, f"no later unit depends on h_{j}"


@pytest.mark.parametrize("kind", KINDS)
def test_prior_rejects_cond_and_conditional_requires_it(kind):
    h = torch.zeros(2, SIZE, dtype=torch.float64)
    cond = torch.zeros(2, COND_SIZE, dtype=torch.float64)
    prior = make_layer(kind, SIZE, 0, nade_hidden=NADE_HIDDEN).double()
    conditional = make_layer(kind, SIZE, COND_SIZE, nade_hidden=NADE_HIDDEN).double()
    with pytest.raises(ValueError, match="is a prior and takes no conditioning input"):
        prior.log_prob(h, cond)
    with pytest.raises(ValueError, match="is a prior and takes no conditioning input"):
        prior.sample(cond)
    with pytest.raises(ValueError, match=f"needs a conditioning input of size {COND_SIZE}"):
        conditional.log_prob(h)
    with pytest.raises(ValueError, match=f"needs a conditioning input of size {COND_SIZE}"):
        conditional.sample(None, (2,))
    # The right calls work, so the errors above come from the cond check and not something else.
    assert prior.log_prob(h).shape == (2,) and conditional.log_prob(h, cond).shape == (2,)


def test_log_prob_broadcasts_h_over_samples_of_cond(layer):
    """h [B, n] shared by K samples of cond [K, B, c] (log p(x | h_1) in P) gives the same values
    and parameter gradients as h expanded to [K, B, n] (SBN takes a different code path here)."""
    if layer.cond_size == 0:
        return
    torch.manual_seed(5)
    k, b = 5, 7
    h = torch.randint(0, 2, (b, SIZE)).double()
    cond = torch.randint(0, 2, (k, b, layer.cond_size)).double()

    def value_and_grads(target):
        layer.zero_grad()
        log_prob = layer.log_prob(target, cond)
        (log_prob * torch.linspace(0.5, 2.0, k * b, dtype=torch.float64).reshape(k, b)).sum().backward()
        return log_prob.detach(), [p.grad.clone() for p in layer.parameters()]

    shared, shared_grads = value_and_grads(h)
    expanded, expanded_grads = value_and_grads(h.expand(k, b, SIZE))
    assert shared.shape == (k, b)
    torch.testing.assert_close(shared, expanded, rtol=1e-12, atol=1e-12)
    for got, want in zip(shared_grads, expanded_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sample_with_log_prob_is_sample_then_log_prob(layer):
    """The same draw as `sample` (same RNG stream), its exact log-prob, and a gradient only through the log-prob."""
    k, b = 5, 7
    cond = None if layer.cond_size == 0 else torch.randint(0, 2, (b, layer.cond_size)).double()
    torch.manual_seed(6)
    drawn = layer.sample(cond, (k,))
    torch.manual_seed(6)
    h, log_prob = layer.sample_with_log_prob(cond, (k,))
    assert torch.equal(h, drawn) and not h.requires_grad
    torch.testing.assert_close(log_prob, layer.log_prob(h, cond), rtol=1e-12, atol=1e-12)
    log_prob.sum().backward()
    assert layer.bias.grad is not None and torch.isfinite(layer.bias.grad).all()


def test_sample_with_log_prob_without_autograd_scores_with_the_samplers_logits(layer, monkeypatch):
    """Without autograd (evaluation), the log-prob comes from the logits the sampler computed: the same
    draw, the same log-prob as `log_prob`, and no teacher-forced `logits` pass."""
    k, b = 5, 7
    cond = None if layer.cond_size == 0 else torch.randint(0, 2, (b, layer.cond_size)).double()
    torch.manual_seed(6)
    drawn = layer.sample(cond, (k,))
    expected = layer.log_prob(drawn, cond).detach()
    monkeypatch.setattr(layer, "logits", lambda *args: pytest.fail("the teacher-forced logits were computed again"))
    torch.manual_seed(6)
    with torch.no_grad():
        h, log_prob = layer.sample_with_log_prob(cond, (k,))
    assert torch.equal(h, drawn)
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [1, 7, 10, 197, 200, 784])
def test_softplus_sum_matches_log1p_exp_in_value_and_gradient(size):
    """The grouped-product form of sum_i softplus(l_i) = sum_i log(1 + e^l_i) against logaddexp(l, 0) in
    float64 (exact where F.softplus's threshold approximates), extremes included."""
    torch.manual_seed(7)
    logits = torch.randn(3, 4, size, dtype=torch.float64) * 8
    logits[0, 0] = 1e4  # sigmoid(|l|) == 1 exactly: the product must not lose the relu part
    logits[0, 1] = -1e4
    logits[1, 0] = 0.0
    logits.requires_grad_()
    weights = torch.randn(3, 4, dtype=torch.float64)
    got = softplus_sum(logits)
    want = torch.logaddexp(logits, torch.zeros((), dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    # float32: within a few ulps of the float64 sum (the sums reach ~8 * size / 2)
    got32 = softplus_sum(logits.detach().float()).double()
    assert ((got32 - want.detach()).abs() <= 4e-7 * want.detach().abs().clamp(min=1) * max(1, size**0.5)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_draws_stay_on_the_layers_device(kind):
    """Uniforms are created on the logits' device (a CPU default would break GPU runs); the meta device
    stands in for a GPU here: mixing it with CPU tensors raises."""
    layer = make_layer(kind, SIZE, COND_SIZE, nade_hidden=NADE_HIDDEN).to("meta")
    h, log_prob = layer.sample_with_log_prob(torch.zeros(7, COND_SIZE, device="meta"), (5,))
    assert h.device.type == "meta" and h.shape == (5, 7, SIZE) and log_prob.shape == (5, 7)


@pytest.mark.parametrize("size", [9, 32])  # 9 units: aten's scan; 32: the blocked scan, two blocks of 16
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 100])
def test_nade_chunked_logits_match_plain_autograd(monkeypatch, rows_per_chunk, size):
    """NADE's teacher-forced logits go through `NADEHiddenLogits` in chunks of rows with a hand-written
    backward: values and gradients (parameters, h and cond) equal plain autograd through the same
    formula, for chunks that split the rows unevenly, and for h shared by the samples of cond."""
    cond_size, hidden = 5, 7
    monkeypatch.setattr(layers, "_NADE_CHUNK_FLOATS", rows_per_chunk * size * hidden)
    torch.manual_seed(11)
    layer = NADELayer(size, cond_size, hidden_size=hidden).double()
    randomize_(layer, 0.8)
    k, b = 4, 5
    cond = torch.randint(0, 2, (k, b, cond_size)).double().requires_grad_()

    def plain_logits(h, cond):
        contributions = h.unsqueeze(-1) * layer.input_weight
        preceding = contributions.cumsum(-2) - contributions
        hidden_units = torch.sigmoid(layer.hidden_offset(cond).unsqueeze(-2) + preceding)
        return layer.cond_logits(cond) + (hidden_units * layer.output_weight).sum(-1)

    for h_shape in [(k, b, size), (b, size)]:
        h = torch.randint(0, 2, h_shape).double().requires_grad_()
        weights = torch.randn(k, b, size, dtype=torch.float64)
        inputs = [h, cond, *layer.parameters()]
        got = layer.logits(h, cond, layer.cond_logits(cond))
        want = plain_logits(h, cond)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got_grads = torch.autograd.grad((got * weights).sum(), inputs)
        want_grads = torch.autograd.grad((want * weights).sum(), inputs)
        for name, g, w in zip(["h", "cond", *(n for n, _ in layer.named_parameters())], got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_nade_logits_in_a_compiled_step_run_compiled_chunks(monkeypatch):
    """Inside torch.compile on a CPU, NADE's chunks run through `_compiled_chunks`, padded to whole
    chunks (20 rows in chunks of 3), with the values and gradients of the eager chunks."""
    size, cond_size, hidden = 32, 5, 7
    monkeypatch.setattr(layers, "_NADE_CHUNK_FLOATS", 3 * size * hidden)
    calls = []

    def spy(name, fn):
        return lambda *args: (calls.append(name), fn(*args))[1]

    forward_chunk, backward_chunk = layers._compiled_chunks()
    spies = spy("forward", forward_chunk), spy("backward", backward_chunk)
    monkeypatch.setattr(layers, "_compiled_chunks", lambda: spies)
    torch.manual_seed(12)
    layer = NADELayer(size, cond_size, hidden_size=hidden).double()
    randomize_(layer, 0.8)
    cond = torch.randint(0, 2, (4, 5, cond_size)).double().requires_grad_()
    h = torch.randint(0, 2, (4, 5, size)).double().requires_grad_()
    weights = torch.randn(4, 5, size, dtype=torch.float64)
    inputs = [h, cond, *layer.parameters()]

    def logits(h, cond):
        return layer.logits(h, cond, layer.cond_logits(cond))

    want = logits(h, cond)
    assert calls == []
    got = torch.compile(logits, dynamic=False)(h, cond)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    assert calls.count("forward") == 7 and calls.count("backward") == 7  # ceil(20 / 3) chunks each way
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_nade_chunks_pad_the_last_chunk_but_never_beyond_the_rows():
    """The last chunk is padded with zero rows to the chunk size; with fewer rows than a chunk, the
    chunk size is the number of rows (exact enumeration runs a few rows of tiny layers, where a
    chunk is 10^5 rows)."""
    h, offset = torch.arange(14.0).view(7, 2), torch.ones(7, 3)
    chunks = list(layers._chunks(3, h, offset))
    assert [tuple(c.shape for c in chunk) for chunk in chunks] == [((3, 2), (3, 3))] * 3
    assert torch.equal(torch.cat([c[0] for c in chunks])[:7], h) and chunks[-1][0][1:].eq(0).all()
    assert chunks[-1][1][1:].eq(0).all()
    assert [tuple(c.shape for c in chunk) for chunk in layers._chunks(100_000, h, offset)] == [((7, 2), (7, 3))]


@pytest.mark.parametrize("size", [7, 16, 48])
def test_blocked_cumsum_over_units_equals_cumsum(size):
    values = torch.randn(3, size, 5, dtype=torch.float64)
    torch.testing.assert_close(layers._cumsum_over_units(values), values.cumsum(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rand_value", ["smallest", "largest"])
def test_values_rarer_than_a_uniform_step_are_never_drawn(kind, dtype, rand_value, monkeypatch):
    """At logits of -50 and +50 every unit takes its likely value, even when torch.rand returns the
    ends of its grid: 0, or the last step below 1. A draw of 0 once made `u < p` true for any p > 0,
    so the unit with logit -50 (probability 2e-22) came out 1 once in 2^24 draws in float32, and its
    importance weight, about e^30 too large, then dominated estimates with K in the hundred thousands."""
    layer = make_layer(kind, SIZE, COND_SIZE, nade_hidden=NADE_HIDDEN).to(dtype)
    likely = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.zero_()
        layer.bias.copy_(100 * likely - 50)  # logits -50, +50, -50, +50 whatever h_<i and cond are
    step = torch.finfo(dtype).eps / 2  # torch.rand's grid: multiples of eps / 2 in [0, 1)
    value = 0.0 if rand_value == "smallest" else 1 - step
    monkeypatch.setattr(torch, "rand", lambda shape, dtype, device: torch.full(shape, value, dtype=dtype, device=device))
    samples = layer.sample(torch.zeros(2, COND_SIZE, dtype=dtype), (3,))  # [3, 2, n]
    assert torch.equal(samples, likely.expand_as(samples))
