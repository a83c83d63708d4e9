"""Sample parallelism through Lightning and the `rws` command line.

- `model.sample_parallel` must divide `model.num_samples`: the module and the CLI say so, naming both keys.
- The DataModule's contract: ranks of one sample group get the same minibatches, data-parallel groups
  disjoint ones, even though every rank's torch RNG is seeded differently (RWSModule.setup).
- 2-process `rws fit` (Lightning 'ddp', subprocesses: 'ddp' re-executes sys.argv, never inside pytest) in
  the layouts 1 data group x 2 sample ranks and 2 data groups x 1 sample rank: both train, validate
  once, and a recording callback (this module's `BatchRecorder`, loaded by the CLI through its class
  path) shows which minibatches each rank trained on and what it logged: under sample parallelism
  both ranks log the group's metrics, the losses included.
- `torchrun --nproc-per-node 2 -m lightning_modules.cli eval` splits K over the 2 ranks and gives
  the single-process estimate, printing one JSON line.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.datamodule import BinarizedMNISTDataModule
from lightning_modules.module import RWSModule
from pipeline import checkpoint as ckpt
from pipeline.data import load_binarized_mnist
from pipeline.estimators import log_likelihood

from ..ports import free_port

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"
TORCHRUN = Path(sys.executable).parent / "torchrun"



def _env(**extra: str) -> dict:
    # One intra-op thread per process (2 processes on a 2-core machine); the repository root on the
    # path so that the CLI can import this module's BatchRecorder by its class path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def rws(*args: str, cwd: Path, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = launcher or [sys.executable, "-m"]
    return subprocess.run(
        [*command, "lightning_modules.cli", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600
    )


class BatchRecorder(pl.Callback):
    """Test-only callback: writes `rank{global_rank}.json` to `out_dir`: a digest of every training
    batch and the training metrics the rank logged for it."""

    METRICS = ("train/log_likelihood", "train/ess", "train/p_loss", "train/q_loss")

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.digests: list[str] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.digests.append(hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({name: trainer.callback_metrics[f"{name}_step"].item() for name in self.METRICS})

    def on_train_end(self, trainer, pl_module):
        layout = {"data": list(pl_module.data_parallel_layout()), "sample_group": pl_module.sample_group is not None}
        epoch = {name: trainer.callback_metrics[f"{name}_epoch"].item() for name in self.METRICS}
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"digests": self.digests, "metrics": self.metrics, "epoch": epoch, "layout": layout}))


# ---------------------------------------------------------------------------------------------------------
# K must be divisible by S
# ---------------------------------------------------------------------------------------------------------


def test_module_rejects_num_samples_not_divisible_by_sample_parallel():
    with pytest.raises(ValueError, match=r"model\.num_samples \(5\).*model\.sample_parallel \(2\)"):
        RWSModule(num_samples=5, sample_parallel=2)
    with pytest.raises(ValueError, match="model.sample_parallel"):
        RWSModule(num_samples=4, sample_parallel=0)
    RWSModule(num_samples=6, sample_parallel=3)  # divisible: fine


def test_cli_rejects_num_samples_not_divisible_by_sample_parallel(tmp_path):
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--model.sample_parallel", "2", "--model.num_samples", "5",
        "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.num_samples" in result.stderr and "model.sample_parallel" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------------------
# The DataModule: same minibatches within a sample group, disjoint ones across data groups
# ---------------------------------------------------------------------------------------------------------


class _Stub:
    """Just enough of a Trainer / LightningModule for the hooks under test."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def _first_epoch_indices(rank: int, layout: tuple[int, int], monkeypatch) -> list[list[int]]:
    """The training-index order rank `rank` gets when the module reports data-parallel `layout`.

    The rank's torch RNG is left as RWSModule.setup leaves it on that rank (reseeded per global rank).
    """
    monkeypatch.setenv("PL_GLOBAL_SEED", "1234")
    pl.seed_everything(1234, verbose=False)  # what the CLI does on every rank
    module = RWSModule(layer_sizes=[784, 5, 2])
    module.trainer = _Stub(world_size=1, global_rank=rank, precision="32-true")  # world_size 1: no mesh, but the per-rank reseed
    module.setup("fit")
    datamodule = BinarizedMNISTDataModule(batch_size=50)
    datamodule.splits = {"train": torch.arange(1000).unsqueeze(1)}  # the data are the indices
    module_stub = _Stub(data_parallel_layout=lambda: layout)
    datamodule.trainer = _Stub(lightning_module=module_stub, global_rank=rank, world_size=2, current_epoch=0)
    loader = datamodule.train_dataloader()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)  # what Lightning's fit loop does
    return [batch[0].flatten().tolist() for batch in loader]


def test_datamodule_two_data_groups_get_disjoint_batches(monkeypatch):
    """World 2 = 2 data groups x 1 sample rank: rank r is data-parallel rank r of 2."""
    rank0, rank1 = (_first_epoch_indices(rank, (rank, 2), monkeypatch) for rank in range(2))
    assert len(rank0) == len(rank1) == 10
    seen0, seen1 = {i for b in rank0 for i in b}, {i for b in rank1 for i in b}
    assert not seen0 & seen1 and seen0 | seen1 == set(range(1000))


def test_datamodule_sample_group_ranks_get_identical_batches(monkeypatch):
    """World 2 = 1 data group x 2 sample ranks: both ranks are data-parallel rank 0 of 1, and their
    torch RNGs differ (each draws its own samples), yet they must see the same minibatches in the
    same order, or the sample group would pool log-weights of different images."""
    rank0, rank1 = (_first_epoch_indices(rank, (0, 1), monkeypatch) for rank in range(2))
    assert sorted(i for b in rank0 for i in b) == list(range(1000))  # a whole, shuffled epoch
    assert rank0 != sorted(rank0)
    assert rank0 == rank1, "the two ranks of one sample group get different minibatches"


# ---------------------------------------------------------------------------------------------------------
# 2-process `rws fit` in both layouts, then `rws eval` under torchrun
# ---------------------------------------------------------------------------------------------------------

LAYOUTS = {1: "2x1", 2: "1x2"}  # sample_parallel S -> data groups x sample ranks, for a world of 2


def _fit_ddp(run_dir: Path, sample_parallel: int, *extra: str) -> subprocess.CompletedProcess:
    recorder = {"class_path": f"{__name__}.BatchRecorder", "init_args": {"out_dir": str(run_dir)}}
    return rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu", "--model.sample_parallel", str(sample_parallel), "--model.num_samples", "4",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir / "runs"),
        "--trainer.callbacks", json.dumps([recorder]), *extra, cwd=run_dir, env=_env(MASTER_PORT=str(free_port())),
    )  # fmt: skip


@pytest.mark.slow
def test_compiled_step_trains_under_ddp_with_sample_parallelism(tmp_path):
    """`--model.compile true` with S=2: the sample group's all-reduces sit inside the compiled
    rws_surrogates and DDP syncs gradients that AOTAutograd produced; both ranks see the same batches."""
    result = _fit_ddp(tmp_path, 2, "--model.compile", "true")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("epoch ") and "val/log_likelihood" in line)
    value = float(re.search(r"val/log_likelihood (\S+) nats", line).group(1))
    assert math.isfinite(value) and -784 * math.log(2) < value < 0, line
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert records[0]["digests"] == records[1]["digests"] and len(records[0]["digests"]) == 10


class SplitBatch(pl.Callback):
    """Test-only callback: rank 1 flips one pixel of its third batch, as if it had read other data than
    its sample group's rank 0 (a shard that only one rank failed to read, under --data.on_error skip)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 2:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x[0, 0] = 1 - x[0, 0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, found_at, saved_steps",
    [
        # Checked with the NaN note, every log_every_n_steps batches (here 4: batches 3, 7) and at the epoch's last ...
        (["--trainer.log_every_n_steps", "4"], 3, []),
        # ... and before every checkpoint: here one every batch (2 steps), so the one after batch 2 is refused.
        (["--dcp.every_n_train_steps", "2"], 2, [2, 4]),
    ],
    ids=["with the notes", "before a checkpoint"],
)
def test_sample_group_that_trained_on_different_batches_stops_before_its_checkpoint(tmp_path, settings, found_at, saved_steps):
    result = _fit_ddp(tmp_path, 2, f"--trainer.callbacks+={__name__}.SplitBatch", *settings)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    message = f"rws fit: error: epoch 0, batch {found_at} or before: the ranks of a sample group trained on different"
    assert message in output and "Traceback" not in output, output[-3000:]
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    assert [info.step for info in ckpt.list_complete(tmp_path / "runs" / "checkpoints")] == saved_steps


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    runs = {}
    for sample_parallel in LAYOUTS:
        run_dir = tmp_path_factory.mktemp(f"ddp_s{sample_parallel}")
        runs[sample_parallel] = (run_dir, _fit_ddp(run_dir, sample_parallel))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("sample_parallel", list(LAYOUTS), ids=[f"{v}(S={k})" for k, v in LAYOUTS.items()])
def test_ddp_fit_trains_in_both_layouts(ddp_runs, sample_parallel):
    run_dir, result = ddp_runs[sample_parallel]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("epoch ") and "val/log_likelihood" in line]
    assert len(lines) == 1, f"one validation line (rank 0, one epoch) expected, got {lines}"
    value = float(re.search(r"val/log_likelihood (\S+) nats", lines[0]).group(1))
    assert math.isfinite(value) and -784 * math.log(2) < value < 0, lines[0]  # better than uniform pixels
    assert list((run_dir / "runs").rglob("last.ckpt")), "no checkpoint written"

    records = [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in records:
        assert len(record["digests"]) == 10
    # The epoch's training metrics (the printed line's) are means over both ranks' batches, on every rank.
    assert "sync_dist" not in output
    for name in BatchRecorder.METRICS:
        mean = sum(step[name] for record in records for step in record["metrics"]) / 20
        assert [record["epoch"][name] for record in records] == [pytest.approx(mean, rel=1e-5)] * 2, name
    if sample_parallel == 2:  # 1 data group x 2 sample ranks: both are data rank 0 of 1, in a sample group
        assert [r["layout"] for r in records] == [{"data": [0, 1], "sample_group": True}] * 2
        assert records[0]["digests"] == records[1]["digests"], "ranks of one sample group trained on different batches"
        # Each rank holds its share of the samples, but every metric it logs is the group's (the
        # losses: what one process with all K samples would log), so rank 0's logs tell the truth.
        for batch, (metrics0, metrics1) in enumerate(zip(records[0]["metrics"], records[1]["metrics"], strict=True)):
            assert metrics0 == pytest.approx(metrics1, rel=1e-6), f"batch {batch}: the two ranks logged {metrics0} and {metrics1}"
    else:  # 2 data groups x 1 sample rank
        assert [r["layout"] for r in records] == [{"data": [r, 2], "sample_group": False} for r in range(2)]
        assert not set(records[0]["digests"]) & set(records[1]["digests"]), "data-parallel ranks shared a batch"


def _monte_carlo_stderr(run_dir: Path, num_samples: int) -> float:
    """Standard error of the mean K-sample estimate over the validation split from Monte Carlo noise alone.

    Two in-process evaluations with different seeds: the per-point differences have variance twice
    the per-point Monte Carlo variance (the points themselves cancel).
    """
    module, _ = load_checkpoint(run_dir / "runs")
    x = load_binarized_mnist(None, splits=("valid",))["valid"].to(torch.float32)
    runs, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared machine: one thread is faster
    try:
        for seed in (101, 102):
            torch.manual_seed(seed)
            runs.append(torch.cat([log_likelihood(module.model, batch, num_samples) for batch in x.split(100)]).double())
    finally:
        torch.set_num_threads(threads)
    return ((runs[0] - runs[1]).std() / math.sqrt(2) / math.sqrt(len(x))).item()


@pytest.mark.slow
def test_torchrun_eval_splits_samples_and_matches_one_process(ddp_runs):
    run_dir, result = ddp_runs[2]
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    args = ["eval", "--checkpoint", "runs", "--num-samples", "200", "--split", "valid", "--json", "--seed", "0"]
    launcher = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m"]
    two = rws(*args, cwd=run_dir, launcher=launcher)
    one = rws(*args, cwd=run_dir)
    assert two.returncode == 0 and one.returncode == 0, (two.stderr + one.stderr)[-3000:]
    stdout_lines = [line for line in two.stdout.splitlines() if line.strip()]
    assert len(stdout_lines) == 1, f"expected exactly one JSON line from 2 ranks, got {two.stdout!r}"
    report2, report1 = json.loads(stdout_lines[0]), json.loads(one.stdout)
    assert report2["num_points"] == report1["num_points"] == 1000 and report2["num_samples"] == 200
    difference = abs(report2["log_likelihood"] - report1["log_likelihood"])
    assert difference < 3 * report1["stderr"], (report1, report2)  # the acceptance: within a few stderr
    # Tighter: same points, so the two means differ only by Monte Carlo noise (independent samples).
    noise = _monte_carlo_stderr(run_dir, 200)
    assert difference < 5 * math.sqrt(2) * noise, f"|{report2} - {report1}| vs Monte Carlo stderr {noise:.3f}"
