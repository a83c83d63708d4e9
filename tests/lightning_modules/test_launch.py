"""`rws fit --dry-run` (lightning_modules/launch.py) and the torchrun recipe of docs/cluster.md."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.cli import main
from lightning_modules.launch import (
    LayoutError,
    WorldLayout,
    check_environment,
    check_layout,
    cluster_environment,
    dry_run,
    resolve_devices,
)

from ..ports import free_port

ROOT = Path(__file__).parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")
TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
SLURM_ENV = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "rws"}
# Launcher variables of the process running the tests must not leak into the launches below.
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "PL_")  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------ the layout, as pure functions


@pytest.mark.parametrize(
    "devices, env, expected",
    [
        (4, {}, 4),
        ("4", {}, 4),
        ("auto", {}, 1),  # accelerator cpu
        (-1, {}, 1),
        ("auto", TORCHRUN_ENV, 4),  # LOCAL_WORLD_SIZE
        ("auto", {k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_WORLD_SIZE"}, 4),  # WORLD_SIZE / num_nodes
        ("auto", SLURM_ENV, 4),
        ("auto", {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "4(x2)"}, 4),
        ("auto", {**SLURM_ENV, "SLURM_JOB_NAME": "interactive"}, 1),  # Lightning ignores interactive SLURM jobs
    ],
)
def test_resolve_devices(devices, env, expected):
    assert resolve_devices(devices, "cpu", 2, env)[0] == expected


@pytest.mark.parametrize("devices, expected", [([0, 1, 2], 3), ("0,1", 2)])
def test_resolve_devices_counts_gpu_ids(devices, expected):
    assert resolve_devices(devices, "gpu", 1, {})[0] == expected


@pytest.mark.parametrize("devices", [0, "0", [], "cuda", [0, 1], "0,1"])
def test_resolve_devices_rejects_nonsense(devices):
    with pytest.raises(LayoutError, match="trainer.devices"):
        resolve_devices(devices, "cpu", 1, {})


def test_cluster_environment_follows_lightnings_precedence():
    assert cluster_environment({}) == "LightningEnvironment"
    assert cluster_environment(SLURM_ENV) == "SLURMEnvironment"
    assert cluster_environment({**SLURM_ENV, **TORCHRUN_ENV}) == "TorchElasticEnvironment"  # torchrun inside SLURM


def test_sample_groups_are_consecutive_ranks():
    layout = WorldLayout(num_nodes=2, devices=4, sample_parallel=2, devices_source="test")
    assert (layout.world_size, layout.data_parallel) == (8, 4)
    assert [layout.sample_group(d) for d in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "nodes, devices, s, k, message",
    [
        (2, 3, 4, 4, "world size 6 .* not divisible by model.sample_parallel 4"),
        (1, 1, 2, 4, "world size 1 .* not divisible"),
        (1, 4, 4, 10, r"model.num_samples \(K = 10\) is not divisible by model.sample_parallel 4"),
    ],
)
def test_check_layout_errors(nodes, devices, s, k, message):
    with pytest.raises(LayoutError, match=message):
        check_layout(WorldLayout(nodes, devices, s, "test"), k)


def test_check_environment_matches_the_launcher():
    layout = WorldLayout(2, 4, 1, "test")
    check_environment(layout, "TorchElasticEnvironment", TORCHRUN_ENV)
    check_environment(layout, "SLURMEnvironment", SLURM_ENV)
    with pytest.raises(LayoutError, match="WORLD_SIZE=4"):
        check_environment(layout, "TorchElasticEnvironment", {**TORCHRUN_ENV, "WORLD_SIZE": "4"})
    with pytest.raises(LayoutError, match="SLURM_NTASKS_PER_NODE=2"):
        check_environment(layout, "SLURMEnvironment", {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "2"})
    with pytest.raises(LayoutError, match="3 nodes"):
        check_environment(layout, "SLURMEnvironment", {**SLURM_ENV, "SLURM_NNODES": "3"})


# ------------------------------------------------------------------ dry_run through the real CLI parser


def test_dry_run_prints_config_and_layout(capsys):
    code = main(
        ["fit", "--config", DEBUG, "--trainer.num_nodes", "2", "--trainer.devices", "4", "--trainer.accelerator", "gpu",
         "--trainer.strategy", "ddp", "--model.sample_parallel", "2", "--model.num_samples", "10", "--dry-run"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    config, layout = out.split("\n---\n")
    assert "num_samples: 10" in config and "sample_parallel: 2" in config and "layer_sizes: [784, 50, 10]" in config
    assert "nodes x devices:   2 x 4 = 8 ranks" in layout
    assert "4 data-parallel groups x 2 ranks per sample group" in layout
    assert "d=0: ranks [0, 1] on node 0" in layout and "d=3: ranks [6, 7] on node 1" in layout
    assert "K (train):         5 of K = 10" in layout
    assert "effective batch:   100 x 4 data-parallel groups = 400" in layout
    assert "nothing was trained" in layout


def test_fit_help_mentions_dry_run(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--help"])
    assert exited.value.code == 0 and "--dry-run: print the resolved config" in capsys.readouterr().out


def test_dry_run_accepts_fit_only_arguments_and_lists_many_groups(capsys):
    """--ckpt_path belongs to the `fit` subcommand; 64 ranks list 8 groups and an ellipsis."""
    code = dry_run(["fit", "--config", DEBUG, "--trainer.num_nodes", "8", "--trainer.devices", "8",
                    "--ckpt_path", "last", "--dry-run"], env={})  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "ckpt_path: last" in out
    assert "64 data-parallel groups x 1 ranks" in out and "(56 more, up to d=63: ranks [63])" in out


def test_dry_run_under_torchrun_resolves_auto_devices(capsys):
    env = {**TORCHRUN_ENV, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    args = ["fit", "--config", DEBUG, "--trainer.num_nodes", "2", "--trainer.devices", "auto", "--model.sample_parallel", "2",
            "--model.num_samples", "4"]  # fmt: skip
    assert dry_run(args, env=env) == 0
    out = capsys.readouterr().out
    assert "2 x 2 = 4 ranks" in out and "environment:       TorchElasticEnvironment" in out
    assert dry_run(args, env={**env, "RANK": "3"}) == 0
    assert capsys.readouterr().out == ""  # only rank 0 prints


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainer.num_nodes", "2", "--trainer.devices", "3", "--model.sample_parallel", "4"], "world size 6"),
        (["--trainer.devices", "3", "--model.sample_parallel", "3", "--model.num_samples", "4"], "K = 4"),
        (["--model.num_samples", "0"], "num_samples"),  # the model's own check still runs
        (["--trainer.num_nodes", "0"], "trainer.num_nodes must be >= 1, got 0"),  # as the real run refuses it
        (["--trainer.devices", "[0, 1]"], "lists device ids, which need GPUs"),  # the CPU accelerator of debug.yaml
    ],
)
def test_dry_run_errors_exit_2(capsys, args, message):
    assert main(["fit", "--config", DEBUG, *args, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith("rws fit: error:") and message in captured.err


# ------------------------------------------------------------------ the torchrun recipe of docs/cluster.md

# Prints which ClusterEnvironment Lightning chose, from inside each torchrun worker; loaded through
# PYTHONPATH so that the command line stays exactly the one in the docs.
PROBE = """
import os, sys
if "TORCHELASTIC_RUN_ID" in os.environ:
    import pytorch_lightning as pl
    _fit = pl.Trainer.fit
    def fit(self, *args, **kwargs):
        print(f"probe: rank {self.global_rank}/{self.world_size} {type(self.strategy.cluster_environment).__name__}",
              file=sys.stderr, flush=True)
        return _fit(self, *args, **kwargs)
    pl.Trainer.fit = fit
"""


def docs_torchrun_command() -> list[str]:
    """The command between the torchrun-cpu markers of docs/cluster.md."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"<!-- torchrun-cpu:begin -->\s*```bash\n(.*?)```\s*<!-- torchrun-cpu:end -->", text, re.S)
    assert block, "docs/cluster.md lost its torchrun-cpu block"
    command = shlex.split(block.group(1).replace("\\\n", " "))
    assert command[0] == "torchrun" and "--nproc-per-node" in command
    return command


def run_torchrun(extra: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = docs_torchrun_command()
    # torchrun is torch.distributed.run's console script; run it with this interpreter.
    argv = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *command[1:], *extra]
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    env = clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "probe"), str(ROOT)]))
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_docs_torchrun_command_layout(capsys):
    """The docs' torchrun command, checked in-process with torchrun's variables (fast; the real
    launches are the slow tests below)."""
    command = docs_torchrun_command()
    nproc = command[command.index("--nproc-per-node") + 1]
    module = command.index("-m")
    assert command[module + 1] == "lightning_modules.cli"
    rws_args = [arg.replace("configs/", f"{ROOT}/configs/") for arg in command[module + 2 :]]
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc}
    assert dry_run([*rws_args, "--dry-run"], env=env) == 0
    out = capsys.readouterr().out
    assert f"nodes x devices:   1 x {nproc} = {nproc} ranks" in out and "strategy ddp" in out
    assert "environment:       TorchElasticEnvironment" in out


@pytest.mark.slow
def test_docs_torchrun_command_dry_run(tmp_path):
    """The docs' command under torchrun, with --dry-run: both ranks see TorchElastic's variables."""
    result = run_torchrun(["--dry-run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("# world layout") == 1  # rank 0 only
    assert "nodes x devices:   1 x 2 = 2 ranks" in result.stdout
    assert "environment:       TorchElasticEnvironment" in result.stdout


@pytest.mark.slow
def test_docs_torchrun_command_trains_with_two_processes(tmp_path):
    """The docs' torchrun command on this CPU: 2 processes, one DDP run, a checkpoint."""
    runs = tmp_path / "runs"
    tiny = ["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2",
            "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    result = run_torchrun(tiny, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    probes = sorted(line for line in output.splitlines() if line.startswith("probe:"))
    assert probes == ["probe: rank 0/2 TorchElasticEnvironment", "probe: rank 1/2 TorchElasticEnvironment"]
    assert "Starting with 2 processes" in output
    assert len([line for line in output.splitlines() if "val/log_likelihood" in line]) == 1  # max_epochs 1, rank 0
    assert [p.name for p in runs.rglob("last.ckpt")] == ["last.ckpt"]
