"""`rws tune` end to end, through the real command line (each run its own Ray instance, in a
subprocess): a 3-trial search killed after its first trial finished and resumed, its results and
best config (which `rws fit` trains), a resume whose saved state names a deleted checkpoint, a
trial that fails once and resumes from its checkpoint, and (slow) trials of 2 data/sample-parallel
workers through Ray Train."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEBUG_SEARCH = ROOT / "configs" / "tune" / "debug.yaml"
METRIC = "val/log_likelihood"


def rws(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_modules.cli", *args]


def environment() -> dict[str, str]:
    # Ray's workers import test helpers (tests.tune.faults) named in a trial's config.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        rws(*args), cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout, check=False
    )


def trial_states(experiment: Path) -> dict[str, dict]:
    """trial id -> {status, num_failures, checkpoint}, from Ray's newest saved experiment state ({}
    before one exists); checkpoint: the directory name of the checkpoint of the trial's last result."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        saved = json.loads(states[-1].read_text())
    except json.JSONDecodeError:
        return {}  # being written
    trials = {}
    for trial_json, runtime_json in saved["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        checkpoint = re.search(r"'checkpoint_dir_name': '(checkpoint_\d+)'", str(runtime["last_result"]))
        trials[trial["trial_id"]] = {
            "status": trial["status"],
            "num_failures": runtime["num_failures"],
            "checkpoint": checkpoint and checkpoint.group(1),
        }
    return trials


def reported_epochs(experiment: Path, trial_id: str) -> list[int]:
    """The epochs a trial reported to Tune, in order, over all its attempts."""
    lines = (experiment / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def session_processes(session: int) -> list[int]:
    """Processes of a session (Ray's workers leave the process group but stay in the session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL `rws tune` and everything it started (its own session), as a crash would."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 60
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not session_processes(process.pid), "processes of the killed search are still running"


def run_until_killed(args: tuple[str, ...], cwd: Path, experiment: Path, reached, what: str) -> dict[str, dict]:
    """Start `rws ARGS` in its own session and SIGKILL it, as a crash would, as soon as
    `reached(trial_states(experiment))`; returns the trial states it left. `what` names the moment."""
    started = time.monotonic()
    with (cwd / "first.log").open("w") as log:
        process = subprocess.Popen(
            rws(*args), cwd=cwd, env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while not reached(trial_states(experiment)):
                assert process.poll() is None, f"the search ended before {what}:\n" + (cwd / "first.log").read_text()
                assert time.monotonic() - started < 300, f"not {what} within 5 minutes"
                time.sleep(0.05)
        finally:
            kill_session(process)
    return trial_states(experiment)


@pytest.fixture(scope="module")
def resumed_search(tmp_path_factory) -> SimpleNamespace:
    """The CI-sized search (3 tiny trials, embedded data), SIGKILLed as soon as Ray has recorded
    its first finished trial, then completed with --resume. The kill may come before Ray has
    synced a finished trial's result history to storage; the fixture always empties it, so the
    results table is tested on what survives a crash."""
    cwd = tmp_path_factory.mktemp("search")
    experiment = cwd / "runs" / "tune" / "debug"
    killed = run_until_killed(
        ("tune", "--config", str(DEBUG_SEARCH)), cwd, experiment,
        lambda states: any(state["status"] == "TERMINATED" for state in states.values()), "a trial finished",
    )  # fmt: skip
    finished = sorted(trial for trial, state in killed.items() if state["status"] == "TERMINATED")
    for trial in finished:  # as Ray's later sync of the trial's history may leave it (seen in CI)
        (experiment / f"trial_{trial}" / "result.json").write_text("")
        (experiment / f"trial_{trial}" / "progress.csv").unlink(missing_ok=True)
    epochs = {trial: reported_epochs(experiment, trial) for trial in finished}
    resumed = run("tune", "--config", str(DEBUG_SEARCH), "--resume", cwd=cwd)
    return SimpleNamespace(
        cwd=cwd, experiment=experiment, killed=killed, finished=finished, epochs=epochs, resumed=resumed
    )


def test_resume_completes_the_search_without_rerunning_finished_trials(resumed_search):
    search = resumed_search
    assert search.resumed.returncode == 0, search.resumed.stdout[-3000:] + search.resumed.stderr[-3000:]
    assert 1 <= len(search.finished) < 3, f"the kill should interrupt the search: {search.killed}"
    after = trial_states(search.experiment)
    assert len(after) == 3 and all(state["status"] == "TERMINATED" for state in after.values()), after
    for trial in search.finished:
        assert reported_epochs(search.experiment, trial) == search.epochs[trial]  # no new result: not run again
        assert f"trial {trial} started" not in search.resumed.stdout
    assert any(f"trial {trial} started" in search.resumed.stdout for trial in set(after) - set(search.finished))


def test_results_table_sorted_by_val_log_likelihood(resumed_search):
    search = resumed_search
    with (search.experiment / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert b"\r" not in (search.experiment / "trials.csv").read_bytes()  # cut/awk on a path column get no \r
    assert {row["trial"] for row in rows} == set(trial_states(search.experiment))
    scores = [float(row[METRIC]) for row in rows]
    assert all(math.isfinite(score) and -784 < score < 0 for score in scores)
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        assert row["status"] == "ok" and 1 <= int(row["epochs"]) <= 2  # ASHA may stop a trial after epoch 0
        assert {"depth", "width", "model.num_samples", "model.p_lr", "model.q_update", "data.batch_size"} <= set(row)
        assert Path(row["checkpoint"]).is_file()
    markdown = (search.experiment / "trials.md").read_text().splitlines()
    assert markdown[0].startswith("| rank | trial | status | val/log_likelihood") and len(markdown) == 2 + 3
    # Progress while running, and the top of the table and the file paths at the end.
    assert f"| 1 | {rows[0]['trial']} | ok |" in search.resumed.stdout
    assert f"best: {search.experiment / 'best.yaml'}" in search.resumed.stdout
    assert "epoch 1: val/log_likelihood" in (search.cwd / "first.log").read_text() + search.resumed.stdout


def test_best_config_is_the_best_trial_and_rws_fit_trains_it(resumed_search, tmp_path):
    search = resumed_search
    with (search.experiment / "trials.csv").open() as handle:
        best = next(csv.DictReader(handle))
    config = yaml.safe_load((search.experiment / "best.yaml").read_text())
    depth, width = int(best["depth"]), int(best["width"])
    top_width = 5  # fixed in configs/tune/debug.yaml
    assert config["model"]["layer_sizes"] == [784] + [width] * (depth - 1) + [top_width]
    assert math.isclose(config["model"]["p_lr"], float(best["model.p_lr"]), rel_tol=1e-9)
    assert config["model"]["num_samples"] == int(best["model.num_samples"])
    assert config["model"]["q_update"] == best["model.q_update"]
    assert config["data"]["batch_size"] == int(best["data.batch_size"])
    assert config["trainer"]["limit_train_batches"] == 20  # the search's fixed settings come along
    assert "enable_progress_bar" not in config["trainer"] and "dcp" not in config  # trial-only settings do not

    best_yaml = str(search.experiment / "best.yaml")
    result = run("fit", "--config", best_yaml, "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # One validation line per epoch (progress-bar redraws also mention the metric: count the epoch lines).
    lines = (result.stdout + result.stderr).splitlines()
    assert len([line for line in lines if line.startswith("epoch ") and "val/log_likelihood" in line]) == 2


def test_resume_replaces_a_checkpoint_that_the_interruption_deleted(tmp_path):
    """Ray deletes a trial's previous checkpoint when it registers the next, and saves the state that
    names the checkpoint to resume from a moment later: a kill in between (as CI once did) leaves the
    state naming a deleted checkpoint. This builds that state: a 1-trial search killed once its saved
    state names a checkpoint, which is then deleted, with a later one beside it."""
    search = (
        "tune", "--config", str(DEBUG_SEARCH), "--name", "lost", "--num-trials", "1",
        "--fixed.trainer.max_epochs", "4", "--scheduler.grace_period", "4",
    )  # fmt: skip
    experiment = tmp_path / "runs" / "tune" / "lost"
    states = run_until_killed(
        search, tmp_path, experiment, lambda states: any(state["checkpoint"] for state in states.values()),
        "its saved state named a checkpoint",
    )  # fmt: skip
    ((trial, killed),) = states.items()
    assert killed["status"] == "RUNNING", killed
    directory = experiment / f"trial_{trial}"
    named = directory / killed["checkpoint"]
    index = int(named.name.removeprefix("checkpoint_"))
    later = directory / f"checkpoint_{index + 1:06d}"
    if not later.exists():  # the trial had not reported again: stand in for the checkpoint that would have
        shutil.copytree(named, later)
    shutil.rmtree(named)

    resumed = run(*search, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert trial_states(experiment)[trial] == {"status": "TERMINATED", "num_failures": 0, "checkpoint": ANY}
    assert (
        f"trial {trial}: the interruption left its saved state naming {named.name}, already replaced by {later.name}"
    ) in resumed.stdout
    epochs = reported_epochs(experiment, trial)
    assert epochs[-1] == 3 and epochs == sorted(set(epochs)), epochs  # went on to the end, no epoch twice


def test_failed_trial_is_retried_from_its_last_checkpoint(tmp_path):
    marker = tmp_path / "failed-once"
    fault = [{"class_path": "tests.tune.faults.FailOnce", "init_args": {"marker": str(marker), "epoch": 1}}]
    result = run(
        "tune", "--config", str(DEBUG_SEARCH), "--name", "faults", "--num-trials", "2",
        "--fixed.trainer.callbacks", json.dumps(fault),
        "--scheduler.grace_period", "2",  # no early stop: both trials reach epoch 1, where the fault is
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert marker.exists(), "the fault was never injected"
    experiment = tmp_path / "runs" / "tune" / "faults"
    states = trial_states(experiment)
    assert all(state["status"] == "TERMINATED" for state in states.values()), states
    (failed,) = [trial for trial, state in states.items() if state["num_failures"] == 1]
    # Epoch 0 was reported (and checkpointed) once: the retry went on from that checkpoint, not from scratch.
    assert reported_epochs(experiment, failed) == [0, 1]
    error_file = experiment / f"trial_{failed}" / "error.txt"
    assert f"trial {failed} failed ({error_file}); retrying from its last checkpoint" in result.stdout
    assert "Trial task failed" not in result.stdout + result.stderr  # Ray's traceback stays in Ray's logs
    with (experiment / "trials.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["ok", "ok"]


def test_ctrl_c_exits_130_and_the_random_searcher_keeps_its_concurrency_cap(tmp_path):
    """Ctrl-C (SIGINT to the process group) while the first of two trials runs: exit code 130 and
    rws's line, not Ray's `Tuner.restore` hint, though Ray marks the unfinished trials TERMINATED.
    With max_concurrent_trials 1, the random searcher never runs the two trials at once."""
    experiment = tmp_path / "runs" / "tune" / "interrupted"
    args = [
        "tune", "--config", str(DEBUG_SEARCH), "--name", "interrupted", "--num-trials", "2", "--searcher", "random",
        "--max-concurrent-trials", "1", "--fixed.trainer.max_epochs", "6", "--scheduler.grace_period", "6",
    ]  # fmt: skip
    started, running_at_once = time.monotonic(), 0
    with (tmp_path / "out.log").open("w") as log:
        process = subprocess.Popen(
            rws(*args), cwd=tmp_path, env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while not (tmp_path / "out.log").read_text().count(" epoch 0: "):
                assert process.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
                assert time.monotonic() - started < 300, "no epoch reported within 5 minutes"
                states = trial_states(experiment)
                running_at_once = max(running_at_once, sum(s["status"] == "RUNNING" for s in states.values()))
                time.sleep(0.1)
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                kill_session(process)
    output = (tmp_path / "out.log").read_text()
    assert code == 130, output[-3000:]
    assert "rws tune: interrupted before the search's end" in output and "Tuner.restore" not in output
    assert running_at_once <= 1 and sum(s["status"] == "RUNNING" for s in trial_states(experiment).values()) <= 1


@pytest.mark.slow
def test_trials_of_two_sample_parallel_workers_through_ray_train(tmp_path):
    result = run(
        "tune", "--config", str(DEBUG_SEARCH), "--name", "workers", "--num-trials", "2",
        "--workers-per-trial", "2", "--sample-parallel", "2", "--resources-per-trial", "{cpu: 2}",
        "--space.model.num_samples", "{choice: [2, 4]}",  # max_concurrent_trials 2 is capped to what 2 CPUs hold: 1
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "tune" / "workers"
    states = trial_states(experiment)
    assert len(states) == 2 and all(state["status"] == "TERMINATED" for state in states.values()), states
    for trial in states:
        assert reported_epochs(experiment, trial)[0] == 0
        assert list((experiment / f"trial_{trial}").glob("train-trial_id=*")), "no Ray Train run in the trial"
    with (experiment / "trials.csv").open() as handle:
        assert all(Path(row["checkpoint"]).is_file() for row in csv.DictReader(handle))
    config = yaml.safe_load((experiment / "best.yaml").read_text())
    assert config["model"]["sample_parallel"] == 2 and config["trainer"]["devices"] == 2
    assert config["trainer"]["strategy"] == "ddp"


def test_report_to_ray_skips_epochs_without_validation(tmp_path):
    """check_val_every_n_epoch 2: the metric stays in callback_metrics after epoch 1, but epoch 2 did not
    validate, so ASHA must not get the old value again."""
    import torch

    from tune.trial import ReportToRay

    reports = []
    callback = ReportToRay(lambda metrics, checkpoint: reports.append(metrics["epoch"]), SimpleNamespace(from_directory=str))
    trainer = SimpleNamespace(
        callback_metrics={METRIC: torch.tensor(-100.0)}, current_epoch=0, global_step=0, sanity_checking=False,
        is_global_zero=True, save_checkpoint=lambda path: Path(path).write_text(""),
    )  # fmt: skip
    for epoch in range(4):
        trainer.current_epoch = epoch
        if epoch % 2 == 1:
            callback.on_validation_end(trainer, None)
        callback.on_train_epoch_end(trainer, None)
    assert reports == [1, 3]


def test_report_to_ray_carries_the_best_score_so_far_through_a_retry():
    """Each report holds the best score so far and its epoch; a retried trial restores them from the checkpoint."""
    import torch

    from tune.trial import BEST_METRIC, ReportToRay

    def trainer_at(epoch: int, score: float) -> SimpleNamespace:
        return SimpleNamespace(
            callback_metrics={METRIC: torch.tensor(score)}, current_epoch=epoch, global_step=epoch, sanity_checking=False,
            is_global_zero=True, save_checkpoint=lambda path: Path(path).write_text(""),
        )  # fmt: skip

    def run_epochs(callback: ReportToRay, scores: dict[int, float]) -> list[tuple]:
        reports = []
        callback.report = lambda metrics, checkpoint: reports.append((metrics[METRIC], metrics[BEST_METRIC], metrics["best_epoch"]))
        for epoch, score in scores.items():
            trainer = trainer_at(epoch, score)
            callback.on_validation_end(trainer, None)
            callback.on_train_epoch_end(trainer, None)
        return reports

    first = ReportToRay(None, SimpleNamespace(from_directory=str))
    assert run_epochs(first, {0: math.nan, 1: -200.0, 2: -150.0, 3: -180.0}) == [
        (ANY, -math.inf, None), (-200.0, -200.0, 1), (-150.0, -150.0, 2), (-180.0, -150.0, 2),
    ]  # fmt: skip
    retried = ReportToRay(None, SimpleNamespace(from_directory=str))
    retried.load_state_dict(first.state_dict())
    assert run_epochs(retried, {4: -170.0, 5: -120.0}) == [(-170.0, -150.0, 2), (-120.0, -120.0, 5)]


def test_results_table_reads_each_trial_from_its_last_result(tmp_path):
    """The table needs no result history (an interrupted search may have lost it): score, epochs and checkpoint come
    from the last result; a trial without a score goes last."""
    from tune.results import trial_rows, write_results
    from tune.space import load_spec
    from tune.trial import BEST_METRIC

    spec = load_spec(DEBUG_SEARCH)
    config = {key: 1 for key in spec.space}

    def result(trial: str, **metrics) -> SimpleNamespace:
        return SimpleNamespace(
            config=config, metrics={"trial_id": trial, **metrics}, path=str(tmp_path / f"trial_{trial}"), error=None,
            checkpoint=SimpleNamespace(path=str(tmp_path / trial)),
        )  # fmt: skip

    diverged = result("d", **{METRIC: -900.0, BEST_METRIC: -200.0, "best_epoch": 0, "epoch": 3})
    diverged.error = RuntimeError("the training losses are NaN")
    rows = trial_rows([
        result("a", **{METRIC: -300.0, BEST_METRIC: -250.0, "best_epoch": 0, "epoch": 1}),
        result("b"),
        diverged,  # the best score, but it failed: ranked after the trials that did not
        result("c", **{METRIC: -240.0, BEST_METRIC: -240.0, "best_epoch": 2, "epoch": 2}),
    ], spec)  # fmt: skip
    assert [(row["trial"], row["rank"], row["status"], row["best_epoch"], row["epochs"]) for row in rows] == [
        ("c", 1, "ok", 2, 3), ("a", 2, "ok", 0, 2), ("d", 3, "error", 0, 4), ("b", 4, "ok", None, 0),
    ]  # fmt: skip
    assert [row[METRIC] for row in rows[:3]] == [-240.0, -250.0, -200.0] and math.isnan(rows[3][METRIC])
    assert rows[0]["checkpoint"] == str(tmp_path / "c" / "checkpoint.ckpt")
    assert "trial c," in write_results(rows, spec, tmp_path)["best"].read_text()
    # Only failed trials and trials without a score: no best.yaml, and none left from before.
    assert "best" not in write_results([row for row in rows if row["trial"] in ("d", "b")], spec, tmp_path)
    assert not (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize("finished, failed, code", [(2, 0, 0), (1, 1, 0), (0, 2, 1)])
def test_exit_code_counts_failed_trials(tmp_path, capsys, finished, failed, code):
    from tune.cli import report_failures

    assert report_failures(finished, failed, tmp_path) == code
    captured = capsys.readouterr()
    assert ("rws tune: error: no trial finished" in captured.err) == (code == 1)


def test_search_whose_every_trial_failed_exits_non_zero(tmp_path):
    fault = [{"class_path": "tests.tune.faults.FailOnce", "init_args": {"marker": str(tmp_path / "failed"), "epoch": 0}}]
    result = run(
        "tune", "--config", str(DEBUG_SEARCH), "--name", "failing", "--num-trials", "1", "--max-failures", "0",
        "--fixed.trainer.callbacks", json.dumps(fault), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rws tune: error: no trial finished: all 1 failed" in result.stderr
    assert not (tmp_path / "runs" / "tune" / "failing" / "best.yaml").exists()
