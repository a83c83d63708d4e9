"""`rws eval` at K = 100000: throughput and peak memory, for the 10k-point MNIST test set.

    python benchmarks/eval_throughput.py CHECKPOINT [--points 100] [--num-samples 100000] [--threads 2]
        [--compile] [--chunk-size C] [--device cuda] [--no-append]

Runs `rws eval --num-samples K --max-points N --json [--compile] [--chunk-size C]` in a child
process (the real command, its chunked estimator and data loading) and reports its wall time, data
points x samples per second and peak resident memory (the child's ru_maxrss). The estimator draws the K samples of each batch
in chunks sized from a fixed activation budget and keeps one running logsumexp per point, so memory
does not grow with K or with the number of points: the peak on N points is the peak on all 10k,
and the full test set takes 10000 / N times as long (with --compile, the compile time is in the
wall time, so the extrapolation over-counts it). With --device cuda the peak GPU memory the
child's tensors took (`torch.cuda.max_memory_allocated`) is reported beside its resident memory.
The table is appended to RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_section, command_line, cpu_name, device_name  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "binarized_mnist.npz"
CHILD = (
    "import resource, sys, torch\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "from lightning_modules.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "print('GPU_PEAK_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained SBN 784-200-200-10 checkpoint (file or run directory)")
    parser.add_argument("--points", type=int, default=100, help="first N test points")
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--compile", action="store_true", help="pass --compile to rws eval (compile time included)")
    parser.add_argument("--chunk-size", type=int, default=None, help="pass --chunk-size to rws eval (default: its own)")
    parser.add_argument("--device", default="cpu", help="pass --device to rws eval (cpu, cuda, ...)")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)

    command = [
        "eval", "--checkpoint", args.checkpoint, "--num-samples", str(args.num_samples), "--split", "test",
        "--max-points", str(args.points), "--data-path", args.data, "--json", "--device", args.device,
    ]  # fmt: skip
    command += ["--compile"] * args.compile + ["--chunk-size", str(args.chunk_size)] * (args.chunk_size is not None)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.threads), *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"rws eval failed:\n{result.stderr[-3000:]}")
    estimate = json.loads(result.stdout.strip().splitlines()[-1])
    reported = dict(line.split()[:2] for line in result.stderr.splitlines() if line.startswith(("MAXRSS_KB", "GPU_PEAK_BYTES")))
    peak_kb, gpu_peak = int(reported["MAXRSS_KB"]), int(reported["GPU_PEAK_BYTES"])
    rate = estimate["num_points"] * args.num_samples / estimate["seconds"]
    full_hours = 10_000 * args.num_samples / rate / 3600
    rows = [
        "| K | points | device | threads | chunk | compiled | test LL (nats) | stderr | wall s | points x samples/s "
        "| peak RSS | peak GPU memory | 10k test points (extrapolated) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.num_samples} | {estimate['num_points']} | {args.device} | {args.threads} | {args.chunk_size or 'default'} "
        f"| {'yes' if args.compile else 'no'} | {estimate['log_likelihood']:.2f} "
        f"| {estimate['stderr']:.2f} | {estimate['seconds']:.1f} | {rate:,.0f} | {peak_kb / 2**20:.2f} GiB "
        f"| {f'{gpu_peak / 2**30:.2f} GiB' if gpu_peak else '-'} | {full_hours:.2f} h |",
    ]
    gpu = "" if args.device == "cpu" else f"{device_name(torch.device(args.device))}, "  # the machine line names the CPU
    meta = (
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; machine: {os.cpu_count()} CPUs, "
        f"{cpu_name()}, {gpu}python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}\n"
        f"- checkpoint: `{args.checkpoint}`\n"
        f"- command: `{command_line(__file__, argv)}` "
        f"(runs `rws {shlex.join(command)}` with {args.threads} torch threads)\n"
    )
    table = "\n".join(rows)
    print(meta + "\n" + table)
    if not args.no_append:
        append_section(args.results, f"## rws eval at K = {args.num_samples} (issue 8)", meta, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
