"""Sharded checkpoints end to end through `rws fit`: kill -9 and resume bitwise, SIGTERM and Ctrl-C,
crashes mid-save, corrupt shards, resharding 2 ranks -> 1, and `rws eval`/`rws checkpoint` on the results.

Every training is a subprocess (`python -m lightning_modules.cli`): Lightning's "ddp" re-executes
sys.argv, and a SIGKILL must not take pytest with it. An epoch is 5 batches = 10 optimizer steps
(global_step counts the P and the Q steps), so N = 10 steps is one epoch and 2N two. The fault
hooks are environment variables read by lightning_modules/checkpointing.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.checkpointing import (
    RESUME_KEY,
    DCPCheckpointIO,
    DistributedCheckpoint,
    resolve_resume,
    split_per_rank,
)
from lightning_modules.checkpoints import resolve_checkpoint
from lightning_modules.cli import main
from pipeline import checkpoint as ckpt

from ..assertions import assert_same_state
from ..ports import free_port

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"
N = 10  # steps per epoch

TINY = [
    "--config", str(CONFIGS / "debug.yaml"), "--model.layer_sizes", "[784, 20, 5]",
    "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2", "--model.val_num_samples", "10",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--model.lr_schedule", "exponential",  # scheduler state must survive the resume too
    "--dcp.keep_last", "10",
]  # fmt: skip


def fit(run: Path, *args: str, env: dict | None = None, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`rws fit` of the tiny model in run directory `run`; 2 devices: Lightning DDP on CPU (gloo)."""
    command = [sys.executable, "-m", "lightning_modules.cli", "fit", *TINY, "--trainer.default_root_dir", str(run)]
    if devices > 1:
        command += ["--trainer.strategy", "ddp", "--trainer.devices", str(devices)]
    full_env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [*command, *args], cwd=run.parent, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so a hung DDP peer can be killed with its process group
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"rws fit timed out after {timeout} s:\n{output[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def checkpoints(run: Path) -> list[ckpt.CheckpointInfo]:
    return ckpt.list_complete(run / "checkpoints")


def steps(run: Path) -> list[int]:
    return [info.step for info in checkpoints(run)]


def epoch_lines(output: str) -> list[str]:
    return [line.split(":")[0] for line in output.splitlines() if line.startswith("epoch ") and "val/log_likelihood" in line]


def training_state(path: Path, world_size: int) -> dict:
    """What must be bitwise equal after a resume: model, both optimizers, schedulers, loops, every rank's RNG."""
    loaded = ckpt.load(path, ranks=range(world_size))
    shared = loaded.shared
    return {
        "state_dict": shared["state_dict"],
        "optimizer_states": shared["optimizer_states"],
        "lr_schedulers": shared["lr_schedulers"],
        "loops": shared["loops"]["fit_loop"],
        "global_step": shared["global_step"],
        "rng": {rank: state["rng"] for rank, state in loaded.ranks.items()},
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """2N steps without interruption: the reference."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = fit(run, "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    assert steps(run) == [N, 2 * N]
    return run


def test_kill_9_after_n_steps_then_resume_auto_is_bitwise_identical(straight, tmp_path):
    run = tmp_path / "run"
    killed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto", env={"RWS_FAULT_KILL_AT_STEP": str(N + 2)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "no complete checkpoint" in killed.stdout and "starting fresh" in killed.stdout
    assert steps(run) == [N]  # killed mid-epoch 1, after the step-N checkpoint

    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'epoch0000-step000000010'}" in resumed.stdout
    assert epoch_lines(resumed.stdout) == [f"epoch 1 step {2 * N}"]  # continued, did not start over
    assert steps(run) == [N, 2 * N]
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))


@pytest.mark.parametrize(
    "kill_at, newest", [(N, "epoch0000-step000000008"), (N + 4, "epoch0001-step000000012")], ids=["epoch 0", "epoch 1"]
)
def test_checkpoints_every_n_train_steps_inside_epochs_resume_bitwise(straight, tmp_path, kill_at, newest):
    """--dcp.every_n_train_steps 4: saves at steps 4 and 8 inside epoch 0 (an epoch is N = 10 steps), the
    epoch's own at 10, then 12 (epoch 1's first batch) and 16. Killed in the batch of step 10 (before the
    epoch's save) or 14, --resume auto continues from 8 or 12, inside the epoch, bitwise."""
    run = tmp_path / "run"
    periodic = ("--dcp.every_n_train_steps", "4")
    killed = fit(run, "--trainer.max_epochs", "2", *periodic, env={"RWS_FAULT_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert steps(run) == [4, 8, N, 12][: 2 if kill_at == N else 4]
    assert [info.score is None for info in checkpoints(run)] == [True, True, False, True][: len(steps(run))]

    resumed = fit(run, "--trainer.max_epochs", "2", *periodic, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / newest}" in resumed.stdout
    assert steps(run) == [4, 8, N, 12, 16, 2 * N]
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))


@pytest.mark.slow  # two fits with worker processes, 20 s
def test_resume_with_worker_processes_is_bitwise_identical(straight, tmp_path):
    """--data.num_workers 2: the loaders keep their worker processes from epoch to epoch, so an
    uninterrupted fit starts each loader's iterator once, and a resumed fit starts them again. Those
    starts used to draw a seed from torch's RNG (the samples' RNG), and the first epoch's iterator,
    started before Lightning sets the sampler's epoch, prefetched epoch 0's order: other batches,
    other weights, another validation estimate. Resumed inside epoch 1, the run must end bitwise where
    one without worker processes ends (the workers only slice rows), with the same score."""
    run, workers = tmp_path / "run", ("--data.num_workers", "2", "--dcp.every_n_train_steps", "4")
    killed = fit(run, "--trainer.max_epochs", "2", *workers, env={"RWS_FAULT_KILL_AT_STEP": str(N + 4)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    resumed = fit(run, "--trainer.max_epochs", "2", *workers, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'epoch0001-step000000012'}" in resumed.stdout
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))
    assert checkpoints(run)[-1].score == checkpoints(straight)[-1].score


def _recorded_batches(out_dir: Path) -> list[str]:
    return json.loads((out_dir / "rank0.json").read_text())["digests"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_a_mid_epoch_ckpt_trains_the_rest_of_that_epoch(tmp_path, num_workers):
    """Lightning's last.ckpt, written by the validation that --trainer.val_check_interval runs after 3
    of the epoch's 5 batches, resumes there: the batches trained after the resume are the straight
    run's last 2, neither the epoch's first ones again nor a crash in the first step."""
    recorder = "tests.lightning_modules.test_sample_parallel.BatchRecorder"  # digests of the batches trained
    env = {"PYTHONPATH": str(ROOT)}

    def run(name: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        callbacks = json.dumps([{"class_path": recorder, "init_args": {"out_dir": str(tmp_path / name)}}])
        (tmp_path / name).mkdir(exist_ok=True)
        common = ["--trainer.max_epochs", "1", "--data.num_workers", str(num_workers), "--trainer.callbacks", callbacks]
        return fit(tmp_path / name / "run", *common, *args, env={**env, **extra_env})

    straight = run("straight")
    assert straight.returncode == 0, straight.stdout[-3000:]
    killed = run("killed", "--trainer.val_check_interval", "3", RWS_FAULT_KILL_AT_STEP="8")  # in batch 4 of 5
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    (last,) = (tmp_path / "killed" / "run").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 6  # 3 batches: mid-epoch
    resumed = run("resumed", "--trainer.val_check_interval", "3", "--resume", str(last))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _recorded_batches(tmp_path / "resumed") == _recorded_batches(tmp_path / "straight")[3:]


class SignalAt(pl.Callback):
    """Sends this process `times` signals `name` at the end of the training batch that reaches global step
    `step` (on rank `rank` only, if given), as a scheduler's preemption, `kill PID` or Ctrl-C would; with
    `in_validation`, after the first batch of the validation that follows that step instead."""

    def __init__(self, step: int, rank: int | None = None, name: str = "SIGTERM", times: int = 1, in_validation: bool = False):
        self.step, self.rank, self.times, self.in_validation = step, rank, times, in_validation
        self.signum = signal.Signals[name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.in_validation:
            self._send(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.in_validation and not trainer.sanity_checking and batch_idx == 0:
            self._send(trainer)

    def _send(self, trainer):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class CountBroadcasts(pl.Callback):
    """Counts this rank's calls of torch.distributed.broadcast between the start and the end of training."""

    def on_train_start(self, trainer, pl_module):
        self.count, broadcast = 0, torch.distributed.broadcast

        def counted(*args, **kwargs):
            self.count += 1
            return broadcast(*args, **kwargs)

        torch.distributed.broadcast = counted

    def on_train_end(self, trainer, pl_module):
        batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        print(f"rank {trainer.global_rank}: {self.count} broadcasts in {batches} batches", flush=True)


def signal_at(step: int, **init_args) -> tuple[str, str]:
    """`rws fit` arguments that add a `SignalAt` callback."""
    callback = {"class_path": f"{__name__}.SignalAt", "init_args": {"step": step, **init_args}}
    return "--trainer.callbacks", json.dumps([callback])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_mid_epoch_saves_there_and_resume_auto_is_bitwise_identical(straight, tmp_path, name):
    run = tmp_path / "run"
    stopped = fit(run, "--trainer.max_epochs", "2", *signal_at(N + 4, name=name), env={"PYTHONPATH": str(ROOT)})
    assert stopped.returncode == 128 + signal.Signals[name], stopped.stdout[-3000:]
    assert f"{name} at step {N + 4}: saved checkpoint" in stopped.stdout
    assert f"rws fit: stopped by {name}" in stopped.stdout and "Traceback" not in stopped.stdout
    assert ("Ctrl-C again stops at once" in stopped.stdout) == (name == "SIGINT")
    assert steps(run) == [N, N + 4]  # the epoch's checkpoint, and one where the signal stopped, mid-epoch

    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'epoch0001-step{N + 4:09d}'}" in resumed.stdout
    assert "dataloader is not resumable" not in resumed.stdout  # Lightning's warning; the DataModule resumes it
    assert steps(run) == [N, N + 4, 2 * N]
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))


def test_a_second_ctrl_c_stops_at_once_saving_nothing(tmp_path):
    run = tmp_path / "run"
    stopped = fit(run, "--trainer.max_epochs", "2", *signal_at(N + 4, name="SIGINT", times=2), env={"PYTHONPATH": str(ROOT)})
    assert stopped.returncode == 1, stopped.stdout[-3000:]  # Lightning's exit on KeyboardInterrupt
    assert "Detected KeyboardInterrupt" in stopped.stdout and "Traceback" not in stopped.stdout
    assert steps(run) == [N]


def test_sigterm_in_a_validation_finishes_it_saves_the_epoch_and_exits_143(straight, tmp_path):
    run = tmp_path / "run"
    stopped = fit(run, "--trainer.max_epochs", "2", *signal_at(N, in_validation=True), env={"PYTHONPATH": str(ROOT)})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert epoch_lines(stopped.stdout) == [f"epoch 0 step {N}"]  # the validation ran to its end
    assert f"SIGTERM at step {N}: saved checkpoint" in stopped.stdout
    assert steps(run) == [N] and checkpoints(run)[0].score is not None  # the epoch's own checkpoint, scored

    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))


@pytest.mark.slow  # the crash itself is tested without Lightning in tests/pipeline/test_checkpoint.py
def test_kill_during_save_keeps_previous_checkpoint_and_training_goes_on(straight, tmp_path):
    run = tmp_path / "run"
    # SIGKILL inside the save of step 2N, after COMPLETE is written in the .partial directory, before the rename.
    killed = fit(run, "--trainer.max_epochs", "2", env={"RWS_FAULT_KILL_IN_SAVE": f"{2 * N}:marker_written"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    partial = run / "checkpoints" / "epoch0001-step000000020.partial"
    assert (partial / ckpt.MARKER).is_file()  # fully written, but never made visible
    assert steps(run) == [N]

    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout and "epoch0000-step000000010" in resumed.stdout
    assert not partial.exists()  # the stale .partial directory was removed by the next save
    assert steps(run) == [N, 2 * N]
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(checkpoints(run)[-1].path, 1))


def test_corrupt_shard_is_an_error_with_path_and_a_fallback_with_auto(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    newest = checkpoints(run)[-1].path
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    # In process (it stops before training): the error names the damaged file.
    code = main(["fit", *TINY, "--trainer.default_root_dir", str(run), "--resume", str(newest)])
    assert code == 2
    assert f"rws fit: error: {shard}: sha256 differs" in capsys.readouterr().err

    auto = fit(run, "--trainer.max_epochs", "2", "--resume", "auto")
    assert auto.returncode == 0, auto.stdout[-3000:]
    assert f"skipping damaged checkpoint {newest}" in auto.stdout and str(shard) in auto.stdout
    assert "epoch0000-step000000010" in auto.stdout and epoch_lines(auto.stdout) == [f"epoch 1 step {2 * N}"]
    ckpt.verify(newest)  # rewritten by the resumed run, whole again
    assert_same_state(training_state(checkpoints(straight)[-1].path, 1), training_state(newest, 1))


def test_eval_sample_and_consolidate_read_sharded_checkpoints(straight, tmp_path, capsys):
    def rws(*args):  # in process: these tools start no training
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    newest = checkpoints(straight)[-1].path
    out = tmp_path / "model.pt"
    result = rws("checkpoint", "consolidate", str(straight / "checkpoints"), str(out))
    assert result.returncode == 0 and f"from {newest}" in result.stdout, result.stderr
    single = torch.load(out, weights_only=True)
    assert_same_state(single["state_dict"], ckpt.load(newest).shared["state_dict"])
    assert single["rws_ranks"]["rank0"]["rng"]["torch"].dtype == torch.uint8

    estimates = set()
    for source in (newest, out, straight):  # a checkpoint directory, the consolidated file, a run directory
        result = rws("eval", "--checkpoint", str(source), "--num-samples", "5", "--max-points", "10", "--json")
        assert result.returncode == 0, result.stderr
        estimates.add(result.stdout.split('"log_likelihood": ')[1].split(",")[0])
    assert len(estimates) == 1  # the same model, read three ways
    assert rws("sample", "--checkpoint", str(newest), "--num", "4", "--out", str(tmp_path / "s.png")).returncode == 0

    broken = tmp_path / "broken"
    shutil.copytree(newest, broken)
    (broken / "__0_0.distcp").write_bytes((broken / "__0_0.distcp").read_bytes()[:100])
    result = rws("eval", "--checkpoint", str(broken))
    assert result.returncode == 2 and f"{broken / '__0_0.distcp'}: 100 bytes" in result.stderr


def test_fresh_fit_into_a_directory_with_checkpoints_is_an_error(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    code = main(["fit", *TINY, "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1"])  # no --resume
    assert code == 2
    error = capsys.readouterr().err
    assert f"rws fit: error: checkpoint directory {run / 'checkpoints'} already holds 2 complete checkpoint(s)" in error
    assert "--resume auto" in error and "--dcp.dirpath" in error and "--trainer.default_root_dir" in error
    assert [info.marker for info in checkpoints(run)] == [info.marker for info in checkpoints(straight)]  # untouched


def _corrupt_newest(root: Path, name: str) -> Path:
    """Flip a byte in `name` of the newest checkpoint under `root`; returns the file."""
    damaged = ckpt.list_complete(root)[-1].path / name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    return damaged


def test_resume_auto_with_only_damaged_checkpoints_may_start_fresh_there(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save(root, "epoch0000-step000000010", {"w": torch.zeros(100)}, step=10, epoch=0)
    _corrupt_newest(root, "__0_0.distcp")
    callback, trainer = DistributedCheckpoint(dirpath=str(root)), SimpleNamespace(ckpt_path=None, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="already holds 1 complete checkpoint"):
        callback.on_fit_start(trainer, None)  # no --resume
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert resolve_resume("auto", root) is None
    callback.on_fit_start(trainer, None)  # --resume auto found nothing usable: a fresh start, as asked


def test_resume_refuses_an_interrupted_save(tmp_path):
    """A `.partial` directory that a crash left with its marker written (see test_checkpoint's crash
    test) verifies, but is not a finished checkpoint: --resume names it instead of training from it."""
    partial = tmp_path / f"epoch0000-step000000010{ckpt.PARTIAL}"
    ckpt.save(tmp_path, "epoch0000-step000000010", {"w": torch.zeros(3)}, step=10, epoch=0)
    (tmp_path / "epoch0000-step000000010").rename(partial)
    with pytest.raises(ValueError, match=rf"--resume {partial}: an interrupted save, not a complete checkpoint"):
        resolve_resume(str(partial), tmp_path)


def test_resume_auto_says_so_when_a_marker_is_damaged(straight, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    marker = _corrupt_newest(root, ckpt.MARKER)
    with pytest.warns(UserWarning, match=rf"skipping damaged checkpoint {marker.parent} \({marker}: unreadable or corrupt"):
        resumed = resolve_resume("auto", root)
    assert resumed == str(root / "epoch0000-step000000010")


@pytest.fixture(scope="module")
def every_other_validation(tmp_path_factory) -> Path:
    """3 epochs validated every 2nd: checkpoints at N (not validated), 2N (validated), 3N (not)."""
    run = tmp_path_factory.mktemp("every_other") / "run"
    result = fit(run, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    return run


def test_only_validated_epochs_record_a_score(every_other_validation):
    scores = {info.step: info.score for info in checkpoints(every_other_validation)}
    assert scores[N] is None and scores[3 * N] is None  # not the previous validation's score
    assert scores[2 * N] is not None


def test_resuming_an_older_checkpoint_with_fewer_steps_per_epoch_keeps_the_new_checkpoints(every_other_validation, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(every_other_validation / "checkpoints", run / "checkpoints")
    branch = run / "checkpoints" / "epoch0000-step000000010"
    # 2 batches per epoch instead of 5: epoch 1 now ends at step N + 4, before the abandoned steps 2N and 3N.
    result = fit(run, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--dcp.keep_last", "1", "--resume", str(branch))
    assert result.returncode == 0, result.stdout[-3000:]
    newest = run / "checkpoints" / f"epoch0001-step{N + 4:09d}"
    assert steps(run)[-1] == N + 4 and 3 * N not in steps(run)  # kept: the newest written (and the best, if another)
    assert ckpt.latest_complete(run / "checkpoints").path == newest  # what --resume auto continues
    assert resolve_checkpoint(run / "checkpoints") == newest  # what rws eval/sample read
    main(["checkpoint", "list", str(run), "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["path"] == str(newest)  # what rws checkpoint uses


def test_consolidate_into_an_existing_directory_is_an_error(straight, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["checkpoint", "consolidate", str(straight / "checkpoints"), str(out)]) == 2
    assert f"rws checkpoint: error: {out}: is a directory" in capsys.readouterr().err
    assert list(tmp_path.rglob("*.tmp")) == []


def test_verify_checks_every_checkpoint_and_names_the_damaged_one(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    older, newest = (info.path for info in checkpoints(run))
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert [line.split(": ")[0] for line in capsys.readouterr().out.splitlines()] == [str(older), str(newest)]

    shard = older / "__0_0.distcp"  # the older one: checking only the newest would report all well
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["checkpoint", "verify", str(run / "checkpoints")]) == 2
    captured = capsys.readouterr()
    assert f"{older}: DAMAGED" in captured.out and f"{newest}: OK" in captured.out
    assert f"rws checkpoint: error: 1 damaged checkpoint(s) under {run / 'checkpoints'}: {older}" in captured.err


def test_list_of_a_missing_directory_is_an_error(tmp_path, capsys):
    assert main(["checkpoint", "list", str(tmp_path / "typo")]) == 2
    assert f"rws checkpoint: error: {tmp_path / 'typo'} is not a directory" in capsys.readouterr().err
    assert main(["checkpoint", "list", str(tmp_path)]) == 0  # a directory without checkpoints: said on stderr
    assert capsys.readouterr().err.strip() == f"rws checkpoint: no complete checkpoints under {tmp_path}"


def test_per_rank_entries_go_to_rank_state_and_come_back(tmp_path):
    """The DataModule's stream position (and a stateful loader's state) is saved per rank and restored in place."""
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "BinarizedMNISTDataModule": {"epoch": 3, "batches_consumed": 7},
        "loops": {"fit_loop": {"state_dict": {"combined_loader": [{"position": 1}]}}},
    }
    per_rank = split_per_rank(checkpoint, "BinarizedMNISTDataModule")
    assert "BinarizedMNISTDataModule" not in checkpoint and checkpoint["loops"]["fit_loop"]["state_dict"] == {}
    path = ckpt.save(tmp_path, "x", checkpoint, per_rank, step=1, meta={"sample_parallel": 1}).wait()
    io = DCPCheckpointIO()
    for source in (path, ckpt.consolidate(path, tmp_path / "x.pt")):  # a directory and a consolidated file
        loaded = io.load_checkpoint(source)
        assert loaded["BinarizedMNISTDataModule"] == {"epoch": 3, "batches_consumed": 7}
        assert loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"position": 1}]
        assert torch.equal(loaded[RESUME_KEY]["rng"]["torch"], per_rank["rng"]["torch"])
        assert loaded[RESUME_KEY]["world_size"] == 1 and loaded[RESUME_KEY]["sample_parallel"] == 1


# ---- two processes (Lightning DDP on CPU): slow


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight_ddp") / "run"
    result = fit(run, "--trainer.max_epochs", "2", devices=2)
    assert result.returncode == 0, result.stdout[-3000:]
    assert steps(run) == [N, 2 * N] and checkpoints(run)[-1].marker["world_size"] == 2
    return run


@pytest.mark.slow
def test_ddp_kill_one_rank_then_resume_auto_is_bitwise_identical(straight_ddp, tmp_path):
    run = tmp_path / "run"
    # SIGKILL rank 1 only, mid-epoch 1: rank 0 then fails in its next all-reduce and the job ends.
    killed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto", devices=2, env={"RWS_FAULT_KILL_AT_STEP": f"{N + 2}:1"})
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert steps(run) == [N]
    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto", devices=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "epoch0000-step000000010" in resumed.stdout and epoch_lines(resumed.stdout) == [f"epoch 1 step {2 * N}"]
    assert_same_state(training_state(checkpoints(straight_ddp)[-1].path, 2), training_state(checkpoints(run)[-1].path, 2))


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(straight_ddp, tmp_path):
    run = tmp_path / "run"
    source = checkpoints(straight_ddp)[0].path  # step N, written by 2 ranks
    result = fit(run, "--trainer.max_epochs", "2", "--resume", str(source))
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("RNG streams differ") == 1  # said once
    assert "written by 2 rank(s)" in result.stdout and "now 1 rank(s)" in result.stdout
    assert epoch_lines(result.stdout) == [f"epoch 1 step {2 * N}"]
    final = checkpoints(run)[-1]
    assert final.step == 2 * N and final.marker["world_size"] == 1
    # Resharded: the model and optimizers continued from the 2-rank state (Adam's step count went on).
    state = ckpt.load(final.path).shared
    assert state["optimizer_states"][0]["state"][0]["step"].item() == 2 * N / 2


@pytest.mark.slow
def test_ddp_sigterm_on_one_rank_stops_both_at_one_batch_saves_and_resumes_bitwise(straight_ddp, tmp_path):
    """Rank 1 alone gets a SIGTERM in the batch of step N + 2. The ranks compare their notes every
    log_every_n_steps = 2 batches, so both stop at step N + 4, save a checkpoint there together and exit 143."""
    run = tmp_path / "run"
    stopped = fit(
        run, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "2", *signal_at(N + 2, rank=1),
        devices=2, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert f"SIGTERM at step {N + 4}: saved checkpoint" in stopped.stdout
    assert stopped.stdout.count("rws fit: stopped by SIGTERM") == 2 and "Traceback" not in stopped.stdout
    assert steps(run) == [N, N + 4] and checkpoints(run)[-1].marker["world_size"] == 2

    resumed = fit(run, "--trainer.max_epochs", "2", "--resume", "auto", devices=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'epoch0001-step{N + 4:09d}'}" in resumed.stdout
    assert_same_state(training_state(checkpoints(straight_ddp)[-1].path, 2), training_state(checkpoints(run)[-1].path, 2))


@pytest.mark.slow
def test_ddp_training_makes_no_broadcast_per_batch(tmp_path):
    """Lightning broadcasts its SIGTERM flag before every batch of a multi-process fit (a collective and a
    host sync per step); DistributedCheckpoint, which handles SIGTERM itself, skips it. What is left: the
    epoch's checkpoint, whose path Lightning's ModelCheckpoint broadcasts from rank 0."""
    callback = json.dumps([{"class_path": f"{__name__}.CountBroadcasts"}])
    result = fit(tmp_path / "run", "--trainer.max_epochs", "2", "--trainer.callbacks", callback, devices=2,
                 env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:]
    assert sorted(re.findall(r"rank \d: \d+ broadcasts in \d+ batches", result.stdout)) == [
        "rank 0: 2 broadcasts in 10 batches", "rank 1: 2 broadcasts in 10 batches"
    ]
