"""Step time of a multi-process `rws fit`, with and without Lightning's per-batch SIGTERM broadcast.

    python benchmarks/fit_step_time.py [--pairs 4] [--devices 2] [--no-append]

Lightning broadcasts rank 0's SIGTERM flag before every training batch of a multi-process fit (one
element, then `.item()`: a collective and a host sync per step). `rws fit` skips it while its
checkpoint callback handles SIGTERM itself (lightning_modules/checkpointing.py). This script runs
`rws fit --config configs/debug.yaml` on the embedded data with DDP over `--devices` CPU processes
(gloo), 2 epochs, no checkpoints and one validation batch, `--pairs` times each way, alternating:

- `rws fit`: as shipped;
- `+ broadcast`: the same, with the `StepTimes` callback below making, before every batch, the
  broadcast that Lightning's loop made.

Per run, `StepTimes` takes on rank 0 the median time between consecutive batch starts (after the
first 20 batches). The table gives the median over the runs of each variant and their ratio, and is
appended to benchmarks/RESULTS.md under "## Lightning's per-batch SIGTERM broadcast" unless
--no-append.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_section, command_line, cpu_name  # noqa: E402
from tests.ports import free_port  # noqa: E402

HEADING = "## Lightning's per-batch SIGTERM broadcast"
WARMUP_BATCHES = 20


class StepTimes(pl.Callback):
    """Prints rank 0's median time between batch starts at the end of training; with `broadcast`, first
    makes Lightning's per-batch SIGTERM broadcast at every batch start."""

    def __init__(self, broadcast: bool = False):
        self.broadcast = broadcast
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())
        if self.broadcast:
            flag = torch.tensor([0], device=pl_module.device)
            dist.broadcast(flag, src=0)
            flag.item()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][WARMUP_BATCHES:]
            print(f"STEP_MS {statistics.median(gaps) * 1e3:.3f} over {len(gaps)} batches", flush=True)


def run_fit(devices: int, broadcast: bool, workdir: Path) -> float:
    """Median step time in ms of one `rws fit` run."""
    callback = {"class_path": "benchmarks.fit_step_time.StepTimes", "init_args": {"broadcast": broadcast}}
    command = [
        sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
        "--trainer.strategy", "ddp", "--trainer.devices", str(devices), "--trainer.max_epochs", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--dcp.every_n_epochs", "0",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", tempfile.mkdtemp(dir=workdir), "--trainer.callbacks", json.dumps([callback]),
    ]  # fmt: skip
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"STEP_MS ([0-9.]+)", result.stdout + result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"rws fit failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return float(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="runs of each variant, alternated")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes on the CPU")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.pairs):
            for broadcast in (False, True):
                times[broadcast].append(run_fit(args.devices, broadcast, Path(workdir)))
    shipped, with_broadcast = (statistics.median(times[b]) for b in (False, True))
    table = (
        "| variant | step ms per run (rank 0, median over batches) | median over runs |\n|---|---|---:|\n"
        + "".join(
            f"| {name} | {', '.join(f'{t:.2f}' for t in times[b])} | {statistics.median(times[b]):.2f} |\n"
            for name, b in (("`rws fit`", False), ("+ Lightning's per-batch broadcast", True))
        )
        + f"\n`rws fit` runs {with_broadcast / shipped:.2f}x as fast as with the broadcast.\n"
    )
    print(table)
    if not args.no_append:
        meta = (
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
            f"- machine: {os.cpu_count()} CPUs, {cpu_name()}; torch {torch.__version__}, pytorch-lightning "
            f"{pl.__version__}, python {platform.python_version()}\n"
            f"- `rws fit --config configs/debug.yaml`, DDP over {args.devices} CPU processes (gloo), 2 epochs, the "
            f"first {WARMUP_BATCHES} batches not timed; the variants alternate, {args.pairs} runs each\n"
            f"- command: `{command_line('fit_step_time.py', argv)}`\n"
        )
        append_section(ROOT / "benchmarks" / "RESULTS.md", HEADING, meta, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
