"""Where `sample_linear`'s sparse path pays: the op against the dense product, by differing fraction.

    python benchmarks/sample_linear.py [--threads N] [--repeats N] [--no-append]

Times forward and forward + backward of P's bottom-layer product in SBN 784-200-200-10 at K = 50,
B = 100 ([K, B, 200] samples times a [784, 200] weight): F.linear against `sample_linear_op`
with its dense fallback switched off, on samples that differ from a per-point pattern in a given
fraction of their entries. The two alternate call by call, so that both see the same machine
conditions (throughput.py's `time_steps`). The crossover sets `MAX_DIFFERING` in
pipeline/sample_linear.py. The table is printed and appended to benchmarks/RESULTS.md under
"## Sparse sample products (issue 8)".
"""

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.sample_linear as sample_linear_module  # noqa: E402
from benchmarks.report import append_section, command_line, cpu_name  # noqa: E402
from benchmarks.throughput import time_steps  # noqa: E402

NUM_SAMPLES, BATCH, UNITS, OUTPUTS = 50, 100, 200, 784
FRACTIONS = (0.03, 0.07, 0.09, 0.11, 0.13, 0.15, 0.25)
HEADING = "## Sparse sample products (issue 8)"


def samples_differing(fraction: float, generator: torch.Generator) -> torch.Tensor:
    """0/1 samples [K, B, H] that differ from a per-point pattern in about `fraction` of their entries."""
    pattern = torch.rand(BATCH, UNITS, generator=generator) < 0.5
    flips = torch.rand(NUM_SAMPLES, BATCH, UNITS, generator=generator) < fraction
    return (pattern ^ flips).float()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sample_linear_module.MAX_DIFFERING = 1.0  # time the sparse path at every fraction
    generator = torch.Generator().manual_seed(0)
    weight = (0.1 * torch.randn(OUTPUTS, UNITS, generator=generator)).requires_grad_()
    bias = torch.randn(OUTPUTS, generator=generator).requires_grad_()
    grad_out = torch.randn(NUM_SAMPLES, BATCH, OUTPUTS, generator=generator)

    def forward(fn, samples):
        return lambda: fn(samples, weight.detach(), bias.detach())

    def forward_backward(fn, samples):
        def step():
            weight.grad = bias.grad = None
            fn(samples, weight, bias).backward(grad_out)

        return step

    lines = []
    for fraction in FRACTIONS:
        samples = samples_differing(fraction, generator)
        measured = sample_linear_module.differing_fraction(samples)
        timings = time_steps(
            [
                forward(F.linear, samples),
                forward(sample_linear_module.sample_linear_op, samples),
                forward_backward(F.linear, samples),
                forward_backward(sample_linear_module.sample_linear_op, samples),
            ],
            steps=args.repeats,
            warmup=2,
            budget_s=math.inf,
        )
        fwd_dense, fwd_sparse, both_dense, both_sparse = (seconds for seconds, _ in timings)
        line = (
            f"| {100 * measured:.1f}% | {1e3 * fwd_dense:.2f} | {1e3 * fwd_sparse:.2f} | {fwd_dense / fwd_sparse:.2f}x "
            f"| {1e3 * both_dense:.2f} | {1e3 * both_sparse:.2f} | {both_dense / both_sparse:.2f}x |"
        )
        print(line, flush=True)
        lines.append(line)
    header = (
        "| differing entries | forward dense ms | forward sparse ms | forward speed-up "
        "| forward + backward dense ms | forward + backward sparse ms | forward + backward speed-up |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    table = header + "\n" + "\n".join(lines)
    meta = (
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
        f"- machine: {os.cpu_count()} CPUs, {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"- product: [{NUM_SAMPLES}, {BATCH}, {UNITS}] samples x [{OUTPUTS}, {UNITS}] weight + bias, float32; "
        f"median of {args.repeats} alternated calls\n"
        f"- command: `{command_line(__file__, argv)}`\n"
    )
    print()
    print(meta)
    print(table)
    if not args.no_append:
        append_section(args.results, HEADING, meta, table)


if __name__ == "__main__":
    main()
