"""End-to-end: `rws fit` -> `rws eval` -> `rws sample` through the real command line, and its errors."""

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_modules.checkpoints import load_checkpoint
from pipeline import checkpoint as ckpt

CONFIGS = Path(__file__).parents[2] / "configs"


def rws(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny debug model trained for 2 short epochs on the embedded data."""
    run_dir = tmp_path_factory.mktemp("run")
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "20", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--model.layer_sizes", "[784, 20, 5]",
        "--trainer.default_root_dir", str(run_dir / "runs"), cwd=run_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "val/log_likelihood" in line]
    assert len(lines) == 2, "one validation line per epoch"
    (run_dir / "fit.log").write_text(result.stdout + result.stderr)
    return run_dir


def test_fit_prints_no_third_party_noise(trained_run):
    """Lightning's logger advertisement and torch's LeafSpec FutureWarning (raised inside Lightning) are dropped."""
    output = (trained_run / "fit.log").read_text()
    assert "GPU available" in output  # Lightning's own lines still print
    assert "litlogger" not in output and "LeafSpec" not in output, output


def test_fit_writes_checkpoints_with_finite_parameters(trained_run):
    checkpoints = sorted(p.name for p in (trained_run / "runs").rglob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    module, data_hparams = load_checkpoint(trained_run / "runs")
    assert module.model.layer_sizes == [784, 20, 5]
    assert data_hparams["path"] is None  # trained on the embedded default


def test_eval_json(trained_run):
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "20", "--max-points", "50", "--json", cwd=trained_run)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_samples"] == 20 and report["num_points"] == 50 and report["split"] == "test"
    assert -784 * 0.7 < report["log_likelihood"] < 0  # better than uniform pixels (-543 nats), a probability
    assert 0 < report["stderr"] < 20
    # the checkpoint read, not the run directory given: the report says which of the run's checkpoints it scored
    assert report["checkpoint"] != "runs" and (trained_run / report["checkpoint"]).exists(), report["checkpoint"]


def test_eval_json_of_one_point_is_valid_json_without_a_stderr(trained_run):
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "5", "--max-points", "1", "--json", cwd=trained_run)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON: {result.stdout}"))
    assert report["num_points"] == 1 and report["stderr"] is None


def test_eval_per_point_file_holds_the_estimates_behind_the_mean(trained_run, tmp_path):
    out = tmp_path / "points.txt"
    args = ("eval", "--checkpoint", "runs", "--num-samples", "20", "--max-points", "30", "--json", "--seed", "3")
    result = rws(*args, "--per-point", str(out), cwd=trained_run)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    values = [float(line) for line in out.read_text().splitlines()]
    assert len(values) == 30 and report["per_point"] == str(out)
    assert abs(sum(values) / len(values) - report["log_likelihood"]) < 1e-5
    assert len(set(values)) > 1  # one estimate per point, not the mean repeated
    # The same seed without the file: the same estimate, so the option does not change the draws.
    assert json.loads(rws(*args, cwd=trained_run).stdout)["log_likelihood"] == report["log_likelihood"]


def test_eval_per_point_into_a_missing_directory_fails_before_evaluating(trained_run, tmp_path):
    target = tmp_path / "no_such_dir" / "points.txt"
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "20", "--per-point", str(target), cwd=trained_run)
    assert result.returncode == 2
    assert f"--per-point {target}: not a file in an existing directory" in result.stderr
    assert "rws eval K=" not in result.stderr  # no progress bar: it stopped before evaluating


def test_eval_per_point_where_no_file_can_be_made_fails_before_evaluating(trained_run, tmp_path):
    """A directory the OS refuses files in (here /proc, even for root): it used to fail after the whole evaluation."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "20", "--per-point", "/proc/points.txt", cwd=trained_run)
    assert result.returncode == 2 and "--per-point /proc/points.txt: cannot write there" in result.stderr, result.stderr
    assert "rws eval K=" not in result.stderr


def test_eval_compiled_agrees_with_eager(trained_run):
    """`--compile` draws other samples (its own generator), so the two runs agree within Monte Carlo error."""
    args = ("eval", "--checkpoint", "runs", "--num-samples", "200", "--max-points", "50", "--json")
    eager, compiled = (rws(*args, *extra, cwd=trained_run) for extra in ((), ("--compile",)))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    eager, compiled = json.loads(eager.stdout), json.loads(compiled.stdout)
    assert compiled["num_points"] == 50 and compiled["log_likelihood"] != eager["log_likelihood"]
    assert abs(compiled["log_likelihood"] - eager["log_likelihood"]) < 1.0, (compiled, eager)


def test_eval_table_and_progress(trained_run):
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "5", "--max-points", "10", "--split", "valid", cwd=trained_run)
    assert result.returncode == 0, result.stderr
    assert "log_likelihood" in result.stdout and "num_points" in result.stdout
    assert "rws eval K=5" in result.stderr  # the progress bar goes to stderr, keeping stdout clean


def test_sample_writes_png(trained_run, tmp_path):
    out = tmp_path / "grid.png"
    result = rws("sample", "--checkpoint", "runs", "--num", "16", "--out", str(out), cwd=trained_run)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 tiles of 28 pixels, 2 pixels of padding


def test_sample_into_a_new_directory_as_jpeg_with_more_columns_than_samples(trained_run, tmp_path):
    out = tmp_path / "new" / "grid.jpg"
    result = rws("sample", "--checkpoint", "runs", "--num", "4", "--nrow", "100", "--out", str(out), cwd=trained_run)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == (4 * 30 + 2, 30 + 2)  # one row of the 4 samples


@pytest.mark.parametrize(
    "override, message",
    [
        (["--nrow", "0"], "--nrow must be >= 1, got 0"),
        (["--nrow", "-2"], "--nrow must be >= 1, got -2"),
        (["--num", "0"], "--num must be >= 1, got 0"),
        (["--out", "grid"], "--out grid: not an image file name"),
        (["--out", "."], "--out .: not an image file name"),
    ],
)
def test_sample_rejects_bad_options_by_name(trained_run, override, message):
    result = rws("sample", "--checkpoint", "runs", *override, cwd=trained_run)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def nan_checkpoint(source: Path, path: Path) -> tuple[Path, str]:
    """A copy of checkpoint `source` at `path` with its first parameter all NaN; returns the path and that name."""
    checkpoint = torch.load(source, weights_only=True)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, path)
    return path, name


@pytest.mark.parametrize("damage", ["nan", "truncated"])
@pytest.mark.parametrize("command", ["validate", "test", "fit"])
def test_commands_refuse_a_damaged_checkpoint(trained_run, tmp_path, command, damage):
    """One line naming the file (and the parameters), not a traceback, a nan score with exit 0 (validate, test),
    or a first training step that blames the learning rates (fit)."""
    last = next((trained_run / "runs").rglob("last.ckpt"))
    if damage == "nan":
        damaged, name = nan_checkpoint(last, tmp_path / "damaged.ckpt")
        message = f"checkpoint {damaged}: parameters {name} hold NaN or inf values"
    else:
        damaged = tmp_path / "damaged.ckpt"
        damaged.write_bytes(last.read_bytes()[:2000])
        message = f"{damaged} is not a readable checkpoint"
    result = rws(
        command, "--config", str(CONFIGS / "debug.yaml"), "--ckpt_path", str(damaged), "--trainer.max_epochs", "3",
        "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.parametrize("command, option", [("validate", "--ckpt_path"), ("fit", "--ckpt_path"), ("fit", "--resume")])
def test_commands_refuse_a_torch_file_that_is_no_checkpoint(tmp_path, capsys, command, option):
    """A torch file of other contents: one line naming it (Lightning's KeyError named only the key it missed)."""
    from lightning_modules.cli import main

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(3)}, foreign)
    args = [command, "--config", str(CONFIGS / "debug.yaml"), option, str(foreign)]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rws {command}: error: {foreign} is not an rws checkpoint: key 'hyper_parameters' is missing", err


def test_a_checkpoint_directory_under_a_file_is_refused_before_training(tmp_path, capsys):
    """--dcp.dirpath under a file: the first save, an epoch later, used to be where it failed."""
    from lightning_modules.cli import main

    (tmp_path / "file").write_text("")
    args = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--dcp.dirpath", str(tmp_path / "file" / "ckpts")]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"checkpoint directory {tmp_path / 'file' / 'ckpts'}: {tmp_path / 'file'} is a file" in captured.err
    assert "val/log_likelihood" not in captured.out + captured.err  # refused before the epoch


def test_outputs_that_cannot_be_written_are_one_line_naming_them(trained_run, tmp_path, capsys):
    """An output path under a file (or anywhere the OS refuses): rws's one-line error, exit 2, not a traceback."""
    from lightning_modules.cli import main

    (tmp_path / "file").write_text("")
    runs = trained_run / "runs"
    for args in (["sample", "--checkpoint", str(runs), "--out", str(tmp_path / "file" / "s.png")],
                 ["checkpoint", "consolidate", str(runs / "checkpoints"), str(tmp_path / "file" / "m.pt")]):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rws {args[0]}: error: ") and "\n" not in err and str(tmp_path / "file") in err, err


@pytest.mark.parametrize("command", ["validate", "test", "fit"])
def test_only_fit_needs_the_optimizer_the_checkpoint_was_trained_with(trained_run, tmp_path, command):
    result = rws(
        command, "--config", str(CONFIGS / "debug.yaml"), "--ckpt_path", str(next((trained_run / "runs").rglob("last.ckpt"))),
        "--model.optimizer", "momentum", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    if command == "fit":
        assert result.returncode == 2 and "the checkpoint was trained with 'adam'" in result.stderr, result.stderr[-2000:]
    else:
        metric = {"validate": "val", "test": "test"}[command] + "/log_likelihood"
        assert result.returncode == 0 and metric in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["file", "sharded", "run"])
@pytest.mark.parametrize("command", ["validate", "test", "fit"])
def test_ckpt_path_gives_the_architecture_and_the_config_the_rest(trained_run, monkeypatch, command, kind):
    """The checkpoint's layer sizes over the configured ones (its weights fix them), but the command line's
    val_num_samples and p_lr over the checkpoint's (Lightning's own rule would keep the checkpoint's silently).
    The checkpoint: a .ckpt file, a sharded checkpoint directory, or a run directory (its newest checkpoint)."""
    from lightning_modules import cli
    from lightning_modules.checkpoints import resolve_checkpoint

    runs = trained_run / "runs"
    path = {"file": next(runs.rglob("last.ckpt")), "sharded": sorted((runs / "checkpoints").iterdir())[0], "run": runs}[kind]
    seen = {}

    def record(self):
        seen.update(self.model.hparams, ckpt_path=self.config[command]["ckpt_path"])
        raise ValueError("stop before running")

    monkeypatch.setattr(cli.RWSLightningCLI, f"before_{command}", record)
    code = cli.main([
        command, "--config", str(CONFIGS / "debug.yaml"), "--ckpt_path", str(path),
        "--model.layer_sizes", "[784, 30, 3]", "--model.val_num_samples", "7", "--model.p_lr", "0.0001",
    ])  # fmt: skip
    assert code == 2 and seen["layer_sizes"] == [784, 20, 5]
    assert seen["val_num_samples"] == 7 and seen["p_lr"] == 0.0001
    assert seen["ckpt_path"] == str(resolve_checkpoint(runs) if kind == "run" else path)


def test_eval_errors_name_the_file(trained_run, tmp_path):
    missing = rws("eval", "--checkpoint", str(tmp_path / "nope.ckpt"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.ckpt" in missing.stderr and "Traceback" not in missing.stderr

    last = next((trained_run / "runs").rglob("last.ckpt"))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:2000])
    result = rws("eval", "--checkpoint", str(truncated), cwd=tmp_path)
    assert result.returncode == 2 and "truncated.ckpt" in result.stderr and "not a readable checkpoint" in result.stderr

    poisoned, name = nan_checkpoint(last, tmp_path / "nan.ckpt")
    result = rws("eval", "--checkpoint", str(poisoned), cwd=tmp_path)
    assert result.returncode == 2 and "nan.ckpt" in result.stderr and name in result.stderr

    result = rws("eval", "--checkpoint", str(last), "--data-path", str(tmp_path / "data.npz"), cwd=tmp_path)
    assert result.returncode == 2 and "data.npz" in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.num_samples", "0"], "num_samples"),
        (["--model.q_update", "dream"], "q_update"),
        (["--model.p_layer", "rbm"], "p_layer: unknown layer type 'rbm'"),
        (["--data.path", "/nonexistent/mnist.npz"], "/nonexistent/mnist.npz"),
        (["--trainer.precision", "bf16-mixed"], "trainer.precision='bf16-mixed'"),
        (["--model.matmul_precision", "low"], "matmul_precision"),
        (["--model.layer_sizes", "[100, 50, 10]"], "model.layer_sizes=[100, 50, 10] starts with 100, but the data has 784"),
        (["--model.nade_hidden", "0", "--model.p_layer", "nade"], "model.nade_hidden must be >= 1, got 0"),
        (["--sample_grid.num", "0"], "sample_grid.num must be >= 1, got 0"),
        (["--sample_grid.num", "-4"], "sample_grid.num must be >= 1, got -4"),
        (["--trainer.devices", "[0, 1]"], "trainer.devices=[0, 1] lists device ids"),
        (["--model.val_chunk_size", "-1"], "model.val_chunk_size must be >= 1, got -1"),
        (["--model.val_chunk_size", "0"], "model.val_chunk_size must be >= 1, got 0"),
        (["--model.lr_schedule", "exponential", "--model.lr_decay", "0"], "model.lr_decay must be a positive number"),
        (
            ["--model.lr_schedule", "cosine", "--trainer.max_epochs", "-1", "--trainer.max_steps", "2"],
            "trainer.max_epochs, which is -1",
        ),
        (["--cpu_time_budget.seconds", "-1"], "cpu_time_budget.seconds must be a number >= 0"),
        (["--data.batch_size", "20000"], "data.batch_size=20000 is larger than the 10000 training points"),
        (["--model.sample_parallel", "0"], "model.sample_parallel must be >= 1, got 0"),
    ],
)
def test_fit_rejects_bad_config_values(tmp_path, override, message):
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.default_root_dir", str(tmp_path), *override, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--trainer.precision", "bf16-mixed"], "trainer.precision='bf16-mixed'"),
        (["fit", "--model.lr_schedule", "cosine", "--trainer.max_epochs", "-1", "--trainer.max_steps", "2"], "cosine"),
        (["fit", "--trainer.max_epochs", "1"], "already holds 1 complete checkpoint(s)"),  # the directory holds a run
        (["validate", "--ckpt_path", "missing.ckpt"], "--ckpt_path missing.ckpt: no such file or directory"),
        (["fit", "--data.batch_size", "20000"], "data.batch_size=20000 is larger than the 10000 training points"),
    ],
)
def test_refusals_leave_no_log_directory(tmp_path, args, message):
    """Checked before Lightning's logger makes runs/lightning_logs/version_N (which would then hold a
    config.yaml of a run that never happened)."""
    run = ["--config", str(CONFIGS / "debug.yaml"), "--trainer.default_root_dir", "runs", "--trainer.limit_train_batches", "1"]
    checkpoint = tmp_path / "runs" / "checkpoints" / "epoch0000-step000000002"
    checkpoint.mkdir(parents=True)
    marker = {"format": ckpt.FORMAT, "step": 2, "epoch": 0, "world_size": 1, "files": {}}  # complete, as listing goes
    (checkpoint / ckpt.MARKER).write_text(json.dumps(marker))
    result = rws(args[0], *run, *args[1:], cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "runs" / "lightning_logs").exists(), "a refused run left a log directory behind"


def test_lr_decay_must_be_a_positive_number():
    """NaN cannot come from the command line (jsonargparse rejects it), but from a YAML `.nan` it can."""
    from lightning_modules.module import RWSModule

    for decay in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="model.lr_decay must be a positive number"):
            RWSModule(lr_schedule="exponential", lr_decay=decay)
    # A rate beyond float32's range overflowed in the optimizer's first step, with a traceback.
    with pytest.raises(ValueError, match=r"model.p_lr must be a positive number within float32's range, got 1e\+39"):
        RWSModule(p_lr=1e39)


def test_resume_with_other_model_sizes_names_the_checkpoint_and_the_shapes(trained_run, tmp_path):
    (checkpoint,) = sorted((trained_run / "runs" / "checkpoints").iterdir())[-1:]
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--model.layer_sizes", "[784, 30, 5]", "--resume", str(checkpoint),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "4", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("rws fit: error:")]
    assert str(checkpoint) in line and "model.layer_sizes" in line
    assert "model.p_conditionals.0.cond_weight.weight: checkpoint [784, 20], model [784, 30]" in line


def test_resume_past_max_epochs_is_one_line(tmp_path):
    args = ("fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert rws(*args, "--trainer.max_epochs", "3", cwd=tmp_path).returncode == 0
    result = rws(*args, "--trainer.max_epochs", "1", "--resume", "auto", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    checkpoint = tmp_path / "checkpoints" / "epoch0002-step000000012"
    assert f"rws fit: error: checkpoint {checkpoint} is at epoch 2, past trainer.max_epochs=1" in result.stderr


def test_a_resumed_fit_keeps_its_best_checkpoint_where_it_was(tmp_path):
    """Lightning's best/last checkpoints continue in the resumed run's directory, with its best score:
    by default a resume wrote them into a new lightning_logs/version_N, restored no best score, and
    saved its first validation as the best whatever its value (with a warning on every resume)."""
    runs = tmp_path / "runs"
    args = ("fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(runs))  # fmt: skip
    first = rws(*args, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # Learning rates that wreck the model: its next validation is far worse than the first.
    resumed = rws(*args, "--trainer.max_epochs", "2", "--resume", "auto", "--model.p_lr", "10", "--model.q_lr", "10", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (before,), (after,) = (
        [float(line.split()[5]) for line in (run.stdout + run.stderr).splitlines() if "val/log_likelihood" in line]
        for run in (first, resumed)
    )
    assert after < before - 10, (before, after)  # setup: the resumed epoch is not the best
    assert "dirpath has changed" not in resumed.stderr and "not empty" not in resumed.stderr, resumed.stderr[-3000:]
    saved = sorted(path.relative_to(runs).as_posix() for path in runs.rglob("*.ckpt"))
    assert saved == ["lightning_logs/version_0/checkpoints/best-epoch=0-step=4.ckpt", "lightning_logs/version_0/checkpoints/last.ckpt"]
    validated = rws("validate", *args[1:], "--ckpt_path", str(runs), cwd=tmp_path)
    assert validated.returncode == 0 and "dirpath has changed" not in validated.stderr, validated.stderr[-3000:]


@pytest.mark.slow  # four fits, 20 s
def test_a_fit_from_another_runs_checkpoint_never_writes_into_that_run(tmp_path):
    """A copy of a run resumed, or a fit branching from a run's checkpoint with --ckpt_path, writes its
    best/last checkpoints under its own root: the saved (relative) directory of the source run used to be
    reused, so the branch replaced the source's last.ckpt and deleted its best. A branch into a directory
    that already holds another run's checkpoints is refused, as a fresh run there is."""
    args = ("fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false")  # fmt: skip
    first = rws(*args, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "one", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    def saved(root: str) -> dict[str, str]:
        """Every .ckpt under `root`, by path: its sha256."""
        files = (tmp_path / root).rglob("*.ckpt")
        return {path.relative_to(tmp_path / root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}

    source = saved("one")
    assert len(source) == 2, source.keys()  # setup: last.ckpt and a best
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    resumed = rws(*args, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "copy", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    branched = rws(*args, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "branch", "--ckpt_path", "one",
                   "--model.p_lr", "0.001", cwd=tmp_path)  # fmt: skip
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert saved("one") == source
    for root in ("copy", "branch"):
        assert any(path.endswith("/last.ckpt") and data not in source.values() for path, data in saved(root).items()), root

    refused = rws(*args, "--trainer.max_epochs", "3", "--trainer.default_root_dir", "copy", "--ckpt_path", "branch", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"checkpoint directory {Path('copy') / 'checkpoints'} already holds 2 complete checkpoint(s)" in refused.stderr
    assert saved("one") == source


@pytest.mark.parametrize("schedule", ["constant", "exponential"])
def test_a_resumed_fit_trains_at_the_learning_rates_it_is_given(tmp_path, schedule):
    """Lightning restores the optimizers' saved learning rates over the configured ones: a resumed
    fit with other --model.p_lr/q_lr ran at the old rates. The same run resumed twice, with its own
    rates and with others, must save rates in their ratio (a schedule's progress is kept)."""
    args = ("fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.lr_schedule", schedule, "--model.lr_decay", "0.5", "--trainer.default_root_dir", "run")  # fmt: skip
    (tmp_path / "same").mkdir()
    first = rws(*args, "--trainer.max_epochs", "1", "--model.p_lr", "0.003", "--model.q_lr", "0.003", cwd=tmp_path / "same")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp_path / "same", tmp_path / "other")
    rates = {}
    for name, p_lr, q_lr in [("same", "0.003", "0.003"), ("other", "0.001", "0.002")]:
        resumed = rws(*args, "--trainer.max_epochs", "2", "--resume", "auto", "--model.p_lr", p_lr, "--model.q_lr", q_lr,
                      cwd=tmp_path / name)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        state = torch.load(next((tmp_path / name).rglob("last.ckpt")), weights_only=True)
        rates[name] = [group["lr"] for optimizer in state["optimizer_states"] for group in optimizer["param_groups"]]
    assert rates["other"] == pytest.approx([rates["same"][0] / 3, rates["same"][1] * 2 / 3], rel=1e-9), rates


def test_validation_line_only_in_epochs_that_validated(tmp_path):
    """check_val_every_n_epoch 2 validates after epochs 1 and 3; epochs 0 and 2 must not repeat the last value."""
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "2",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "val/log_likelihood" in line]
    assert [line.split()[1] for line in lines] == ["1", "3"], lines


def test_matmul_precision_holds_when_lightning_sets_up_the_device(tmp_path):
    """Lightning checks the float32 matmul precision as it sets up the device, before the module's
    setup sets it; on a GPU it then told users of --model.matmul_precision high to set the precision."""
    script = (
        "import sys, torch\n"
        "from pytorch_lightning.accelerators.cpu import CPUAccelerator\n"
        "setup_device = CPUAccelerator.setup_device\n"
        "def recording(self, device):\n"
        "    print('precision at device setup:', torch.get_float32_matmul_precision(), flush=True)\n"
        "    setup_device(self, device)\n"
        "CPUAccelerator.setup_device = recording\n"
        "from lightning_modules.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "fit", "--config", str(CONFIGS / "debug.yaml"), "--model.matmul_precision", "high",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [line for line in result.stdout.splitlines() if line.startswith("precision at device setup:")]
    assert seen == ["precision at device setup: high"], seen  # not "highest", the default


def test_lightnings_tensor_core_hint_names_this_clis_option(monkeypatch, caplog):
    """Lightning's hint says to call torch.set_float32_matmul_precision; an rws user sets an option."""
    from lightning_fabric.accelerators import cuda

    from lightning_modules.cli import TENSOR_CORES, quiet_lightning

    quiet_lightning()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(cuda, "_is_ampere_or_later", lambda device=None: True)
    logger = logging.getLogger("lightning_fabric.utilities.rank_zero")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            cuda._check_cuda_matmul_precision(torch.device("cuda", 0))
    finally:
        logger.removeHandler(caplog.handler)
    messages = {record.getMessage() for record in caplog.records}
    assert messages == {TENSOR_CORES}, messages
    assert "--model.matmul_precision high" in TENSOR_CORES


def test_inductors_tf32_hint_is_dropped_in_rws_commands(recwarn):
    """Inductor's own TF32 hint (a compiled step on a GPU at 'highest') says what Lightning's reworded
    hint says in training, and contradicts rws eval's exact float32 on purpose."""
    from lightning_modules.cli import quiet_lightning

    quiet_lightning()
    warnings.warn(
        "TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled. Consider setting "
        "`torch.set_float32_matmul_precision('high')` for better performance.",
        UserWarning,
    )
    warnings.warn("a warning of another kind", UserWarning)
    assert [str(w.message) for w in recwarn] == ["a warning of another kind"]


def test_version_names_the_package_and_its_stack(capsys):
    from importlib.metadata import version

    from lightning_modules.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"rws {version('rws')} (torch {torch.__version__}, pytorch-lightning ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "--config", str(CONFIGS / "debug.yaml")], "rws: error: unknown command 'predict'"),
        (["validate", "--config", str(CONFIGS / "debug.yaml"), "--resume", "auto"], "--ckpt_path"),
        (["test", "--config", str(CONFIGS / "debug.yaml"), "--resume", "auto"], "--ckpt_path"),
        # without a checkpoint they would score the config's untrained model
        (["validate", "--config", str(CONFIGS / "debug.yaml")], "validate scores a trained model: give --ckpt_path"),
        (["test", "--config", str(CONFIGS / "debug.yaml")], "test scores a trained model: give --ckpt_path"),
    ],
)
def test_commands_reject_what_they_cannot_do(capsys, args, message):
    from lightning_modules.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.optimizer", "sgd"], 'Parser key "model.optimizer"'),
        (["--modle.p_lr", "1"], "--modle.p_lr"),
        # LightningCLI's own: the module has two optimizers of its own, which one --optimizer would replace
        (["--optimizer", "Adam"], "--optimizer"),
        (["--lr_scheduler", "StepLR"], "--lr_scheduler"),
    ],
)
def test_a_bad_option_is_a_short_error_naming_it(capsys, command, override, message):
    from lightning_modules.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--config", str(CONFIGS / "debug.yaml"), *override])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and f" {command} --help" in err
    assert len(err.splitlines()) <= 4, err  # not the usage of every option (about 100 lines) first


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "--device bogus: not a device"),
        pytest.param(
            "cuda", "--device cuda: CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)  # fmt: skip
def test_eval_rejects_a_device_this_machine_lacks(trained_run, device, message):
    result = rws("eval", "--checkpoint", "runs", "--num-samples", "5", "--max-points", "5", "--device", device, cwd=trained_run)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"rws eval: error: {message}" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_run_trained_on_a_gpu_scores_alike_on_the_gpu_and_the_cpu(tmp_path):
    """`rws fit` on one GPU with the compiled step and TF32 products ('high'), then `rws eval` of its
    checkpoint on the GPU and on the CPU: both load it, and their estimates agree within Monte Carlo error."""
    result = rws(
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.accelerator", "gpu", "--trainer.devices", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "50", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--model.compile", "true", "--model.matmul_precision", "high",
        "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/log_likelihood" in result.stdout + result.stderr
    args = ("eval", "--checkpoint", "runs", "--num-samples", "500", "--max-points", "100", "--json")
    gpu, cpu = (rws(*args, "--device", device, cwd=tmp_path) for device in ("cuda", "cpu"))
    assert gpu.returncode == 0 and cpu.returncode == 0, (gpu.stderr + cpu.stderr)[-3000:]
    gpu, cpu = json.loads(gpu.stdout), json.loads(cpu.stdout)
    assert -784 * 0.7 < gpu["log_likelihood"] < 0
    # Other devices draw other samples: the same points' estimates differ by Monte Carlo error only,
    # well under the 1 nat that a log-prob computed wrongly on one device would move them by.
    assert abs(gpu["log_likelihood"] - cpu["log_likelihood"]) < 1.0, (gpu, cpu)


def test_eval_uses_the_test_shards_the_checkpoint_was_trained_with(tmp_path):
    """A run trained with --data.shards is evaluated on its shards' test split, not the embedded data."""
    import numpy as np

    from lightning_modules.module import RWSModule
    from pipeline.data import load_binarized_mnist
    from pipeline.shards import prepare_split

    test = load_binarized_mnist(None, splits=("test",))["test"][:30]
    prepare_split(tmp_path / "shards", "test", np.packbits(test.numpy(), axis=1), 10)
    module = RWSModule(layer_sizes=[784, 10, 5])
    torch.save(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
         "datamodule_hyper_parameters": {"path": None, "shards": str(tmp_path / "shards")}},
        tmp_path / "model.pt",
    )  # fmt: skip
    result = rws("eval", "--checkpoint", str(tmp_path / "model.pt"), "--num-samples", "5", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["num_points"] == 30 and report["data"] == str(tmp_path / "shards")


def test_top_level_help_lists_commands(tmp_path):
    result = rws("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("fit", "eval", "sample"):
        assert f"\n  {command} " in result.stdout


def test_eval_with_100000_samples_stays_within_4_gb(tmp_path):
    """`rws eval --num-samples 100000` on SBN 784-200-200-10 (the issue's memory bound): the samples are
    drawn in chunks, so the process peaks far below 4 GB (without chunking, [K, B, 784] alone is 1.25 GB
    per tensor here). The child reports its own peak RSS; the estimate must still be a log-probability."""
    from lightning_modules.module import RWSModule

    torch.manual_seed(0)
    module = RWSModule(layer_sizes=[784, 200, 200, 10])
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "sbn.pt")
    child = (
        "import resource, sys\n"
        "from lightning_modules.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, "eval", "--checkpoint", str(tmp_path / "sbn.pt"), "--num-samples", "100000",
         "--max-points", "4", "--batch-size", "4", "--json"],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["num_samples"] == 100_000 and report["num_points"] == 4
    assert -784 < report["log_likelihood"] < 0
    peak_gb = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("MAXRSS_KB"))) / 2**20
    assert peak_gb < 4, f"rws eval at K=100000 peaked at {peak_gb:.2f} GiB"


@pytest.mark.parametrize("launcher", [{"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "1"}, {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}])
def test_a_random_seed_is_refused_in_processes_a_launcher_started(launcher, tmp_path, monkeypatch, capsys):
    """Each process that torchrun or srun starts would draw its own seed, and the ranks' data orders would differ."""
    from lightning_modules.cli import main

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    args = ["fit", "--config", str(CONFIGS / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    assert main([*args, "--seed_everything", "true"]) == 2
    assert "seed_everything=true draws a random seed in every process" in capsys.readouterr().err


# What gloo 2.13 raised on the surviving rank of a 2-process fit whose other rank stopped on a corrupt shard.
GLOO_PEER_GONE = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:9427. This is typically caused by a remote worker crashing. Check the logs of the remote "
    "worker before reporting an error. GLHF!"
)


@pytest.mark.parametrize(
    "message", [GLOO_PEER_GONE, "shape '[5, 7]' is invalid for input of size 3", "HTTP read: Connection reset by peer"]
)
def test_a_peer_that_exited_is_one_line_and_other_runtime_errors_keep_their_traceback(monkeypatch, capsys, message):
    from lightning_modules import cli

    def fail(self):
        raise RuntimeError(message)

    monkeypatch.setattr(cli.RWSLightningCLI, "before_fit", fail)
    args = ["fit", "--config", str(CONFIGS / "debug.yaml")]
    if message != GLOO_PEER_GONE:  # not a collective's: the traceback stays
        with pytest.raises(RuntimeError, match=re.escape(message)):
            cli.main(args)
        return
    monkeypatch.setenv("RANK", "3")
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "rws fit: rank 3 stopped: another process of this run exited (the cause is in its output); "
        "gloo: Connection closed by peer [127.0.0.1]:9427"
    )
    monkeypatch.setenv("RWS_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(args)


def test_eval_picks_its_default_chunk_once_for_all_batches(trained_run, monkeypatch, capsys):
    """On a GPU the default chunk follows the free memory; one that moved between batches would make
    `--compile` compile again. Faked here: each call of the default gives another size."""
    from lightning_modules import evaluate

    sizes, used = iter(range(7, 100)), []
    monkeypatch.setattr(evaluate, "default_chunk_size", lambda model, batch, device: next(sizes))
    real = evaluate.log_likelihood

    def spy(model, x, num_samples, chunk_size, *rest):
        used.append(chunk_size)
        return real(model, x, num_samples, chunk_size, *rest)

    monkeypatch.setattr(evaluate, "log_likelihood", spy)
    args = ["--checkpoint", str(trained_run / "runs"), "--num-samples", "20", "--max-points", "30", "--batch-size", "10"]
    assert evaluate.eval_main([*args, "--json"]) == 0
    assert used == [7, 7, 7]
    assert json.loads(capsys.readouterr().out)["num_points"] == 30
