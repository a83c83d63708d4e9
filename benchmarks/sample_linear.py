"""Products of samples by table lookup (`sample_linear`) against torch's dense products (F.linear).

    python benchmarks/sample_linear.py [--threads N] [--repeats N] [--no-append]

Times forward and forward + backward (weight and bias gradients) of the products of SBN
784-200-200-10's wide layers, at K = 5 and K = 50 samples of a batch of B = 100: [K, B, 200]
samples times a [784, 200] weight (P's bottom layer) and a [200, 200] weight (the middle layers).
The samples are 0/1 with a given fraction of ones (the lookups' work does not depend on it). The
two paths alternate call by call, so that both see the same machine conditions (throughput.py's
`time_steps`). The error columns compare each path's float32 forward with the float64 product:
the lookups sum in a different order, not with less precision. The table is printed and appended
to benchmarks/RESULTS.md under "## Products of samples by table lookup (issue 8)".
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
from pipeline.sample_linear import _have_kernels, sample_linear  # noqa: E402

BATCH, UNITS = 100, 200
CASES = [(50, 784, 0.5), (50, 784, 0.05), (50, 200, 0.5), (5, 784, 0.5), (5, 200, 0.5)]  # K, outputs, ones
HEADING = "## Products of samples by table lookup (issue 8)"


def main(argv=None):
    args = kernel_benchmark_args(__doc__, 30, argv)
    if not _have_kernels():
        sys.exit("the lookup kernels did not load (see the warning above, or unset RWS_NATIVE=0)")
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
            [forward(F.linear), forward(sample_linear), forward_backward(F.linear), forward_backward(sample_linear)],
            steps=args.repeats,
            warmup=2,
            budget_s=math.inf,
        )
        fwd_dense, fwd_lookup, both_dense, both_lookup = (seconds for seconds, _ in timings)
        exact = F.linear(samples.double(), weight.detach().double(), bias.detach().double())
        errors = [(fn(samples, weight.detach(), bias.detach()) - exact).abs().max().item() for fn in (F.linear, sample_linear)]
        line = (
            f"| {num_samples} | {outputs} | {100 * ones:g}% | {1e3 * fwd_dense:.2f} | {1e3 * fwd_lookup:.2f} "
            f"| {fwd_dense / fwd_lookup:.2f}x | {1e3 * both_dense:.2f} | {1e3 * both_lookup:.2f} "
            f"| {both_dense / both_lookup:.2f}x | {errors[0]:.1e} / {errors[1]:.1e} |"
        )
        print(line, flush=True)
        lines.append(line)
    header = (
        "| K | outputs | ones | forward dense ms | forward lookup ms | forward speed-up "
        "| forward + backward dense ms | forward + backward lookup ms | forward + backward speed-up "
        "| max error vs float64, dense / lookup |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    table = header + "\n" + "\n".join(lines)
    details = [
        f"machine: {os.cpu_count()} CPUs, {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"product: [K, {BATCH}, {UNITS}] float32 samples x [outputs, {UNITS}] weight + bias; "
        f"median of {args.repeats} alternated calls",
    ]
    publish(__file__, argv, HEADING, details, table, None if args.no_append else args.results)


if __name__ == "__main__":
    main()
