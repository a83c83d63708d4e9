"""Sample parallelism across real processes: 2 gloo ranks on the CPU, spawned by this module.

One spawn (a module-scoped fixture) runs every multi-process computation below in 2 processes and
saves what each rank saw; the tests compare it against single-process references computed here, in
a process without any process group. What is proved:

(a) `sharded_logsumexp` over 2 ranks equals `torch.logsumexp` of the concatenated log-weights:
    random values, -inf entries, a column that is -inf on both ranks, one rank holding all the mass
    (the other all -inf, or finite but ~1e4 nats lower), magnitudes of +-1e4, uneven splits; float64,
    plus one float32 case.
(b) Same samples, by construction: the K samples from Q and the B sleep draws from P are drawn once
    here (the "bank"); rank r's `model.sample_q_with_log_q` / `model.sample_p` are patched to serve the r-th
    block of the bank in `split_evenly` order (rank 0 the first block), the single-process reference
    is served the whole bank. Then, in float64:
      - 1 data group x 2 sample ranks (the mesh of `init_sample_parallel_mesh(2)`), K = 7 and B = 5
        so both splits are uneven: the sharded `log_likelihood` (chunked and unchunked), the
        `rws_surrogates` log-likelihood and ESS equal the single-process ones; the gradient after
        DDP's world average and the parameters after one Adam step equal the single-process ones,
        for q_update in wake, sleep, wake-sleep;
      - 2 data groups x 1 sample rank (sample_group None, each rank its own minibatch): DDP's
        gradient and Adam step equal the single-process ones from the mean of the two ranks'
        single-process gradients.
    Adam's first step is invariant to scaling the gradient, so the step alone would not see a wrong
    factor S; the gradients are compared directly too, and a plausible mistake (weights normalized
    per rank instead of over the group) is shown to lie far outside the tolerance.
(c) Large K: the S = 2 gradient (each rank its own independent samples, averaged over the ranks as
    DDP does: all-reduce SUM, divide by the world size) matches the
    exact-enumeration gradient of the oracles in `test_oracles.py`, within their error model.

Tolerances: everything in (a) (but its float32 case) and (b) is float64 and the sharded and single-process computations
differ only in summation order, so they agree to ~1e-15 relative; 1e-9 (relative) leaves room for
accumulated rounding and is still 10^4 x tighter than the 1e-5 asked for.
"""

import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.distributed import agrees_across, init_sample_parallel_mesh, sharded_logsumexp, split_evenly
from pipeline.estimators import Q_UPDATES, log_likelihood, rws_surrogates
from pipeline.models import HelmholtzMachine

from .enumeration import (
    flat_grad,
    randomize_,
    single_thread,  # noqa: F401  (autouse fixture)
)
from .test_oracles import _check_gradient, all_x, make_model, p_gradient_oracle, sleep_q_oracle, wake_q_oracle
from ..ports import free_port

WORLD = 2
RTOL, ATOL = 1e-9, 1e-12  # float64, same numbers summed in a different order (see the module docstring)

# (b): a small model with non-trivial weights; K and B odd so that both splits over 2 ranks are uneven.
SMALL_SIZES = [12, 6, 4]
SMALL_MODELS = [("sbn", "sbn"), (["nade", "darn", "sbn"], ["darn", "nade"])]
K, B = 7, 5
LR = 1e-3

# (c): the oracle models of test_oracles.py and its sample sizes.
ORACLE_MODELS = [("sbn", "sbn"), ("darn", "nade"), (["nade", "darn", "sbn"], ["darn", "nade"])]
ORACLE_K = 10_000  # total K over the 2 ranks, per data point (test_oracles.GRADIENT_SAMPLES)
ORACLE_SLEEP_DRAWS = 100_000  # total sleep draws over the 2 ranks


def _name(spec) -> str:
    return spec if isinstance(spec, str) else "-".join(spec)


# ---------------------------------------------------------------------------------------------------------
# Inputs, built identically in the parent and in the workers
# ---------------------------------------------------------------------------------------------------------


def logsumexp_cases() -> dict[str, tuple[torch.Tensor, list[int]]]:
    """name -> (full log-weights [K, B], rows held by rank 0 and rank 1, in order)."""
    g = torch.Generator().manual_seed(0)
    inf = math.inf
    cases = {}
    cases["random"] = (3 * torch.randn(7, 6, generator=g, dtype=torch.float64), [4, 3])
    lw = 3 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    lw[torch.rand(8, 6, generator=g) < 0.3] = -inf  # scattered -inf entries
    lw[:, 2] = -inf  # a data point whose log-weights are -inf on both ranks
    lw[:4, 4] = -inf  # rank 0 has no mass for this point, rank 1 some
    cases["with_-inf"] = (lw, [4, 4])
    lw = torch.randn(6, 5, generator=g, dtype=torch.float64)
    cases["rank0_holds_all_mass"] = (torch.cat([lw[:3], torch.full((3, 5), -inf, dtype=torch.float64)]), [3, 3])
    cases["rank1_holds_all_mass"] = (torch.cat([torch.full((2, 5), -inf, dtype=torch.float64), lw[2:]]), [2, 4])
    big = torch.randn(6, 4, generator=g, dtype=torch.float64)
    big[:, 0] += 1e4  # large and positive
    big[:, 1] -= 1e4  # large and negative
    big[:3, 2] += 1e4  # rank 0 holds the mass; rank 1 is finite but exp(-1e4) relatively
    big[:3, 3] -= 1e4  # ... and the other way round
    cases["magnitudes_1e4"] = (big, [3, 3])
    cases["uneven_1_vs_6"] = (5 * torch.randn(7, 3, generator=g, dtype=torch.float64), [1, 6])
    cases["float32"] = (3 * torch.randn(9, 6, generator=g, dtype=torch.float32), [5, 4])
    return cases


def small_model(p_layer, q_layer) -> HelmholtzMachine:
    torch.manual_seed(11)
    model = HelmholtzMachine(SMALL_SIZES, p_layer, q_layer, nade_hidden=5).double()
    randomize_(model.p_conditionals, 1.0)
    randomize_(model.p_prior, 1.0)
    randomize_(model.q_conditionals, 0.3)
    return model


def _draw_bank(model: HelmholtzMachine, x: torch.Tensor, num_samples: int, num_draws: int, seed: int) -> dict:
    """K samples from Q for x and `num_draws` ancestral draws from P, through the unpatched methods."""
    torch.manual_seed(seed)
    hs = HelmholtzMachine.sample_q(model, x, num_samples)
    sleep_x, sleep_hs = HelmholtzMachine.sample_p(model, num_draws)
    return {"x": x, "hs": hs, "sleep_x": sleep_x, "sleep_hs": sleep_hs}


def make_inputs() -> dict:
    """Per small model: initial parameters, the 1x2 minibatch and bank, the 2x1 minibatches and banks."""
    inputs = {}
    for p_layer, q_layer in SMALL_MODELS:
        model = small_model(p_layer, q_layer)
        g = torch.Generator().manual_seed(12)
        data = torch.bernoulli(torch.full((3 * B, SMALL_SIZES[0]), 0.4, dtype=torch.float64), generator=g)
        inputs[(_name(p_layer), _name(q_layer))] = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "sample_parallel": _draw_bank(model, data[:B], K, B, seed=13),
            # 2 data-parallel ranks: rank r trains on its own minibatch with its own samples.
            "data_parallel": [_draw_bank(model, data[B * (r + 1) : B * (r + 2)], K, B, seed=14 + r) for r in range(WORLD)],
        }
    return inputs


def serve(model: HelmholtzMachine, bank: dict, q_block: tuple[int, int], p_block: tuple[int, int]) -> dict:
    """Patch `model.sample_q_with_log_q` / `model.sample_p` (on the instance) to hand out rows [start, stop) of the bank.

    Successive calls continue where the previous one stopped (so chunked draws get consecutive rows),
    and each call must be for the bank's own x. Returns the cursors, to check that every row was used.
    """
    cursors = {"q": q_block[0], "p": p_block[0]}

    def sample_q_with_log_q(x, num_samples):
        assert torch.equal(x, bank["x"]), "sample_q_with_log_q called for another minibatch"
        start, cursors["q"] = cursors["q"], cursors["q"] + num_samples
        assert cursors["q"] <= q_block[1], f"sample_q_with_log_q asked for more than this rank's block {q_block}"
        hs = [h[start : cursors["q"]] for h in bank["hs"]]
        return hs, model.log_q(hs, x)

    def sample_p(num):
        start, cursors["p"] = cursors["p"], cursors["p"] + num
        assert cursors["p"] <= p_block[1], f"sample_p asked for more than this rank's block {p_block}"
        return bank["sleep_x"][start : cursors["p"]], [h[start : cursors["p"]] for h in bank["sleep_hs"]]

    model.sample_q_with_log_q, model.sample_p = sample_q_with_log_q, sample_p
    return cursors


def block(total: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of part `index` when `total` rows are split by `split_evenly`, in rank order."""
    start = sum(split_evenly(total, parts, i) for i in range(index))
    return start, start + split_evenly(total, parts, index)


class _Step(nn.Module):
    """The training step as a module, so DDP's forward prepares its gradient all-reduce like Lightning's."""

    def __init__(self, model, num_samples, q_update, sample_group):
        super().__init__()
        self.model, self.num_samples, self.q_update, self.sample_group = model, num_samples, q_update, sample_group

    def forward(self, x):
        out = rws_surrogates(self.model, x, self.num_samples, self.q_update, self.sample_group)
        return out.p_loss + out.q_loss, out.log_likelihood, out.ess


def _named_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _adam_step(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.optim.Adam(model.parameters(), lr=LR).step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------
# The worker: everything that runs on the 2 ranks
# ---------------------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )  # a rank that fails makes the other time out instead of hanging the test
    try:
        results = {"rank": rank}
        # The two layouts, built by the library as training builds them (collective: same order on all ranks).
        sample_mesh = init_sample_parallel_mesh(2)  # world = 1 data group x 2 sample ranks
        data_mesh = init_sample_parallel_mesh(1)  # world = 2 data groups x 1 sample rank
        group = sample_mesh["sample"].get_group()
        results["layouts"] = {
            "1x2": (sample_mesh["data"].size(), sample_mesh["sample"].size(), sample_mesh["sample"].get_local_rank()),
            "2x1": (data_mesh["data"].size(), data_mesh["sample"].size(), data_mesh["data"].get_local_rank()),
        }

        # (a) sharded logsumexp
        results["logsumexp"] = {}
        for name, (full, sizes) in logsumexp_cases().items():
            start = sum(sizes[:rank])
            results["logsumexp"][name] = sharded_logsumexp(full[start : start + sizes[rank]], group)

        # (a') agrees_across: rank 1 holds the same batch, then one pixel flipped (the first, the last, one
        # inside), two rows swapped, a row fewer
        batch = (torch.arange(6 * 5).reshape(6, 5) % 3 == 0).float()
        variants = {"same": batch, "two rows swapped": batch[[1, 0, *range(2, 6)]], "a row fewer": batch[:5]}
        for row, column in ((0, 0), (5, 4), (4, 2)):
            variants[f"pixel {row},{column}"] = batch.clone()
            variants[f"pixel {row},{column}"][row, column] = 1 - batch[row, column]
        results["agrees"] = {
            name: agrees_across(batch if rank == 0 else variant, group).item() for name, variant in variants.items()
        }

        # (b) same samples
        results["same_samples"] = {}
        for key, inputs in torch.load(Path(out_dir) / "inputs.pt", weights_only=False).items():
            p_layer, q_layer = next((p, q) for p, q in SMALL_MODELS if (_name(p), _name(q)) == key)
            bank = inputs["sample_parallel"]
            q_block, p_block = block(K, WORLD, rank), block(B, WORLD, rank)
            entry = {"log_likelihood": {}}
            model = small_model(p_layer, q_layer)
            model.load_state_dict(inputs["state"])
            # One sample between two ranks: rank 1 draws none, as validation allows (only training's K must divide).
            for num_samples, chunk_size in ((K, K), (K, 2), (1, K)):
                share = block(num_samples, WORLD, rank)
                cursors = serve(model, bank, share, p_block)
                estimate = log_likelihood(model, bank["x"], num_samples, chunk_size, group)
                entry["log_likelihood"][num_samples, chunk_size] = estimate
                assert cursors["q"] == share[1], "log_likelihood did not draw this rank's share of K"
            for q_update in Q_UPDATES:
                # 1 data group x 2 sample ranks: DDP over the world, the sample group splits K and B.
                model = small_model(p_layer, q_layer)
                model.load_state_dict(inputs["state"])
                cursors = serve(model, bank, q_block, p_block)
                ddp = nn.parallel.DistributedDataParallel(_Step(model, K, q_update, group))
                loss, ll, ess = ddp(bank["x"])
                loss.backward()
                assert cursors["q"] == q_block[1], "rws_surrogates did not draw this rank's share of K"
                assert cursors["p"] == (p_block[1] if q_update != "wake" else p_block[0]), "wrong number of sleep draws"
                entry[("1x2", q_update)] = {
                    "log_likelihood": ll,
                    "ess": ess,
                    "grads": _named_grads(model),
                    "params": _adam_step(model),
                }
                # 2 data groups x 1 sample rank: own minibatch and samples, no sample group.
                own = inputs["data_parallel"][rank]
                model = small_model(p_layer, q_layer)
                model.load_state_dict(inputs["state"])
                serve(model, own, (0, K), (0, B))
                ddp = nn.parallel.DistributedDataParallel(_Step(model, K, q_update, None))
                ddp(own["x"])[0].backward()
                entry[("2x1", q_update)] = {"grads": _named_grads(model), "params": _adam_step(model)}
            results["same_samples"][key] = entry

        # (c) large K, independent samples on each rank, against exact enumeration
        results["oracle"] = {}
        for p_layer, q_layer in ORACLE_MODELS:
            model = make_model(p_layer, q_layer)
            torch.manual_seed(100 + rank)  # each rank its own samples, as RWSModule.setup arranges
            wake = rws_surrogates(model, all_x(), ORACLE_K, "wake", group)
            sleep_x = all_x()[6].expand(ORACLE_SLEEP_DRAWS, all_x().shape[1])  # only sets the number of draws
            sleep = rws_surrogates(model, sleep_x, 2, "sleep", group)
            grads = {
                "p": flat_grad(wake.p_loss, model.p_parameters()),
                "wake_q": flat_grad(wake.q_loss, model.q_parameters()),
                "sleep_q": flat_grad(sleep.q_loss, model.q_parameters()),
            }
            for value in grads.values():  # what DDP does: SUM over the world, then divide by its size
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
                value /= WORLD
            results["oracle"][(_name(p_layer), _name(q_layer))] = grads
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run `_worker` on 2 spawned gloo processes once; return both ranks' results and the inputs."""
    with tempfile.TemporaryDirectory() as out_dir:
        inputs = make_inputs()
        torch.save(inputs, Path(out_dir) / "inputs.pt")
        mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, inputs


def test_agrees_across_tells_a_shared_batch_from_any_other(ranks):
    results, _ = ranks
    expected = {"same": True, "two rows swapped": False, "a row fewer": False, "pixel 0,0": False, "pixel 5,4": False}
    expected["pixel 4,2"] = False
    assert [r["agrees"] for r in results] == [expected, expected], "both ranks of the group get the same answer"


# ---------------------------------------------------------------------------------------------------------
# (a) sharded logsumexp
# ---------------------------------------------------------------------------------------------------------


def test_mesh_layouts(ranks):
    results, _ = ranks
    for rank, result in enumerate(results):
        assert result["layouts"] == {"1x2": (1, 2, rank), "2x1": (2, 1, rank)}


@pytest.mark.parametrize("case", list(logsumexp_cases()))
def test_sharded_logsumexp_equals_logsumexp_of_concatenation(ranks, case):
    results, _ = ranks
    full, _ = logsumexp_cases()[case]
    expected = torch.logsumexp(full, 0)
    # float32 rounds at ~6e-8 relative per operation; float64 at ~1e-16.
    rtol, atol = (1e-6, 1e-6) if full.dtype == torch.float32 else (1e-13, 1e-12)
    for result in results:
        got = result["logsumexp"][case]
        assert got.dtype == full.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected)) and not torch.isnan(got).any()
    if case == "with_-inf":
        assert torch.isneginf(expected[2]), "setup: column 2 is all -inf"
    if case == "magnitudes_1e4":
        assert expected[0] > 9e3 and expected[1] < -9e3


# ---------------------------------------------------------------------------------------------------------
# (b) same samples: sharded == single process
# ---------------------------------------------------------------------------------------------------------

MODEL_KEYS = [(_name(p), _name(q)) for p, q in SMALL_MODELS]


def _reference(inputs: dict, bank: dict, q_update: str, model_key) -> tuple[HelmholtzMachine, tuple]:
    """Single process, whole bank: the model after backward, and (loss, log-likelihood, ess)."""
    p_layer, q_layer = next((p, q) for p, q in SMALL_MODELS if (_name(p), _name(q)) == model_key)
    model = small_model(p_layer, q_layer)
    model.load_state_dict(inputs["state"])
    serve(model, bank, (0, K), (0, B))
    out = rws_surrogates(model, bank["x"], K, q_update)
    (out.p_loss + out.q_loss).backward()
    return model, (out.log_likelihood, out.ess)


def _assert_named_close(got: dict, expected: dict, what: str):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("model_key", MODEL_KEYS, ids=["-".join(k) for k in MODEL_KEYS])
def test_sharded_log_likelihood_equals_single_process(ranks, model_key):
    results, all_inputs = ranks
    bank = all_inputs[model_key]["sample_parallel"]
    model = small_model(*next((p, q) for p, q in SMALL_MODELS if (_name(p), _name(q)) == model_key))
    model.load_state_dict(all_inputs[model_key]["state"])
    for result in results:
        for (num_samples, chunk_size), got in result["same_samples"][model_key]["log_likelihood"].items():
            serve(model, bank, (0, num_samples), (0, B))
            expected = log_likelihood(model, bank["x"], num_samples, chunk_size=K)
            what = f"K = {num_samples}, chunk {chunk_size}"
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    serve(model, bank, (0, K), (0, B))
    expected = log_likelihood(model, bank["x"], K, chunk_size=K)
    # The plausible mistake: each rank's own K_r samples, averaged as if each were the whole estimate.
    per_rank = []
    for rank in range(WORLD):
        start, stop = block(K, WORLD, rank)
        serve(model, bank, (start, stop), (0, B))
        per_rank.append(log_likelihood(model, bank["x"], stop - start, chunk_size=K))
    assert (torch.stack(per_rank).mean(0) - expected).abs().max() > 1e3 * ATOL


@pytest.mark.parametrize("q_update", Q_UPDATES)
@pytest.mark.parametrize("model_key", MODEL_KEYS, ids=["-".join(k) for k in MODEL_KEYS])
def test_sample_parallel_step_equals_single_process(ranks, model_key, q_update):
    """1 data group x 2 sample ranks, same samples: LL, ESS, DDP gradient and one Adam step match."""
    results, all_inputs = ranks
    inputs = all_inputs[model_key]
    bank = inputs["sample_parallel"]
    model, (ll, ess) = _reference(inputs, bank, q_update, model_key)
    grads = _named_grads(model)
    params = _adam_step(model)
    for rank, result in enumerate(results):
        got = result["same_samples"][model_key][("1x2", q_update)]
        torch.testing.assert_close(got["log_likelihood"], ll, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got["ess"], ess, rtol=RTOL, atol=ATOL)
        _assert_named_close(got["grads"], grads, f"rank {rank} gradient of")
        _assert_named_close(got["params"], params, f"rank {rank} parameter after one Adam step")
    assert (ess > 1.05).any() and (ess < K - 0.05).all(), "setup: weights neither degenerate nor uniform"

    # The check can fail: weights normalized per rank (over K_r samples, each rank's update scaled by
    # 1/S by DDP, as if the group were data-parallel) give a different gradient, far outside tolerance.
    wrong = None
    for rank in range(WORLD):
        start, stop = block(K, WORLD, rank)
        sub = {**bank, "hs": [h[start:stop] for h in bank["hs"]]}  # sleep: the whole bank, the same mean
        p_layer, q_layer = next((p, q) for p, q in SMALL_MODELS if (_name(p), _name(q)) == model_key)
        m = small_model(p_layer, q_layer)
        m.load_state_dict(inputs["state"])
        serve(m, sub, (0, stop - start), (0, B))
        out = rws_surrogates(m, bank["x"], stop - start, q_update)
        (out.p_loss + out.q_loss).backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()]) / WORLD
        wrong = g if wrong is None else wrong + g
    right = torch.cat([g.flatten() for g in grads.values()])
    assert (wrong - right).norm() > 1e-3 * right.norm(), "setup: the plausible mistake is indistinguishable"


@pytest.mark.parametrize("q_update", Q_UPDATES)
@pytest.mark.parametrize("model_key", MODEL_KEYS, ids=["-".join(k) for k in MODEL_KEYS])
def test_data_parallel_step_equals_mean_of_single_process_gradients(ranks, model_key, q_update):
    """2 data groups x 1 sample rank: DDP's update is the single-process update of the mean gradient."""
    results, all_inputs = ranks
    inputs = all_inputs[model_key]
    per_rank = [_named_grads(_reference(inputs, bank, q_update, model_key)[0]) for bank in inputs["data_parallel"]]
    mean_grads = {name: sum(g[name] for g in per_rank) / WORLD for name in per_rank[0]}
    p_layer, q_layer = next((p, q) for p, q in SMALL_MODELS if (_name(p), _name(q)) == model_key)
    model = small_model(p_layer, q_layer)
    model.load_state_dict(inputs["state"])
    for name, parameter in model.named_parameters():
        parameter.grad = mean_grads[name].clone()
    params = _adam_step(model)
    for rank, result in enumerate(results):
        got = result["same_samples"][model_key][("2x1", q_update)]
        _assert_named_close(got["grads"], mean_grads, f"rank {rank} gradient of")
        _assert_named_close(got["params"], params, f"rank {rank} parameter after one Adam step")
    difference = sum((per_rank[0][n] - per_rank[1][n]).norm() for n in mean_grads)
    assert difference > 1e-3, "setup: the two minibatches give the same gradient, so averaging is untested"


# ---------------------------------------------------------------------------------------------------------
# (c) large K, S = 2: the exact gradient
# ---------------------------------------------------------------------------------------------------------

ORACLE_KEYS = [(_name(p), _name(q)) for p, q in ORACLE_MODELS]


@pytest.mark.parametrize("model_key", ORACLE_KEYS, ids=["-".join(k) for k in ORACLE_KEYS])
def test_sample_parallel_gradient_matches_exact_enumeration(ranks, model_key):
    """S = 2, K = 10000 in all: P, wake-Q and sleep-Q gradients against the enumerated ones.

    Same error model as test_oracles.py: cosine > 0.99 and |g - g_exact| < 5 asymptotic standard
    errors of self-normalized importance sampling with the TOTAL K (or of the mean of the total number
    of sleep draws), each check first shown able to reject a plausible mistake.
    """
    results, _ = ranks
    torch.testing.assert_close(results[0]["oracle"][model_key], results[1]["oracle"][model_key], rtol=0, atol=0)
    grads = results[0]["oracle"][model_key]
    p_layer, q_layer = next((p, q) for p, q in ORACLE_MODELS if (_name(p), _name(q)) == model_key)
    model = make_model(p_layer, q_layer)
    oracles = {
        "P": (grads["p"], p_gradient_oracle(model, all_x(), ORACLE_K)),
        "wake Q": (grads["wake_q"], wake_q_oracle(model, all_x(), ORACLE_K)),
        "sleep Q": (grads["sleep_q"], sleep_q_oracle(model, ORACLE_SLEEP_DRAWS)),
    }
    for name, (estimate, oracle) in oracles.items():
        _check_gradient(estimate, oracle, f"S=2 {name} gradient")
        # A missing factor S would halve the gradient: 0.5 g is 0.5 |g| away, far beyond the tolerance.
        assert 0.5 * oracle.exact.norm() > 2 * 5 * oracle.error_scale
