"""Products of samples by the C kernels (`sample_linear`) against torch's dense products (F.linear).

    python benchmarks/sample_linear.py [--threads N] [--repeats N] [--no-append]

Times forward and forward + backward (weight and bias gradients) of the products of SBN
784-200-200-10's wide layers, at K = 5 and K = 50 samples of a batch of B = 100: [K, B, 200]
samples times a [784, 200] weight (P's bottom layer) and a [200, 200] weight (the middle layers).
The samples are 0/1 with a given fraction of ones (the kernels' work does not depend on it). Each
kernel file this machine runs is timed (pipeline/sample_linear.py, `KERNELS`: AMX tiles where the
CPU has them, the table lookups everywhere), and all paths alternate call by call, so that they see
the same machine conditions (throughput.py's `time_steps`). The error column compares each path's
float32 forward with the float64 product: the kernels sum in a different order, not with less
precision. The table is printed and appended to benchmarks/RESULTS.md under "## Products of
samples by table lookup (issue 8)".
"""

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import cpu_name, kernel_benchmark_args, publish  # noqa: E402
from benchmarks.throughput import time_steps  # noqa: E402
from pipeline.sample_linear import KERNELS, kernel_file, kernel_functions, sample_linear  # noqa: E402

BATCH, UNITS = 100, 200
CASES = [(50, 784, 0.5), (50, 784, 0.05), (50, 200, 0.5), (5, 784, 0.5), (5, 200, 0.5)]  # K, outputs, ones
HEADING = "## Products of samples by table lookup (issue 8)"


def through(name):
    """sample_linear through pipeline/<name>.c."""

    def product(samples, weight, bias):
        with kernel_file(name):
            return sample_linear(samples, weight, bias)

    return product


def main(argv=None):
    args = kernel_benchmark_args(__doc__, 30, argv)
    paths = {"dense": F.linear} | {name: through(name) for name in KERNELS if kernel_functions(name)}
    if len(paths) == 1:
        sys.exit("no kernel loaded (see the warning above, or unset RWS_NATIVE=0)")
    generator = torch.Generator().manual_seed(0)

    lines = []
    for num_samples, outputs, ones in CASES:
        samples = (torch.rand(num_samples, BATCH, UNITS, generator=generator) < ones).float()
        weight = (0.1 * torch.randn(outputs, UNITS, generator=generator)).requires_grad_()
        bias = torch.randn(outputs, generator=generator).requires_grad_()
        grad_out = torch.randn(num_samples, BATCH, outputs, generator=generator)

        def forward(fn):
            return lambda: fn(samples, weight.detach(), bias.detach())

        def forward_backward(fn):
            def step():
                weight.grad = bias.grad = None
                fn(samples, weight, bias).backward(grad_out)

            return step

        timings = time_steps(
            [forward(fn) for fn in paths.values()] + [forward_backward(fn) for fn in paths.values()],
            steps=args.repeats,
            warmup=2,
            budget_s=math.inf,
        )
        seconds = [s for s, _ in timings]
        forwards, both = seconds[: len(paths)], seconds[len(paths) :]
        exact = F.linear(samples.double(), weight.detach().double(), bias.detach().double())
        for i, (name, fn) in enumerate(paths.items()):
            error = (fn(samples, weight.detach(), bias.detach()) - exact).abs().max().item()
            line = (
                f"| {num_samples} | {outputs} | {100 * ones:g}% | {name} | {1e3 * forwards[i]:.2f} "
                f"| {forwards[0] / forwards[i]:.2f}x | {1e3 * both[i]:.2f} | {both[0] / both[i]:.2f}x | {error:.1e} |"
            )
            print(line, flush=True)
            lines.append(line)
    header = (
        "| K | outputs | ones | path | forward ms | forward speed-up over dense "
        "| forward + backward ms | forward + backward speed-up over dense | max error vs float64 |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|"
    )
    table = header + "\n" + "\n".join(lines)
    details = [
        f"machine: {os.cpu_count()} CPUs, {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"product: [K, {BATCH}, {UNITS}] float32 samples x [outputs, {UNITS}] weight + bias; "
        f"median of {args.repeats} alternated calls; paths: dense (F.linear), "
        + ", ".join(f"{name} (pipeline/{name}.c)" for name in list(paths)[1:]),
    ]
    publish(__file__, argv, HEADING, details, table, None if args.no_append else args.results)


if __name__ == "__main__":
    main()
