"""NADE's hidden logits and the NADE and DARN samplers by their C kernels, against the torch versions.

    python benchmarks/autoregressive.py [--threads N] [--repeats N] [--no-append]

Logits: V_i . sigmoid(offset + sum_{j<i} h_j A_j) for N rows of 0/1 h (30% ones), forward and
forward + backward (gradients of offset, A and V, as training takes them), for the NADE layers of
`configs/nade_200.yaml` at a batch of 100: P's bottom layer (784 units) and a 200-unit layer (Q's
and P's prior), hidden 200, at K = 5 (N = 500) and K = 50 (N = 5000). Three paths alternate call
by call (throughput.py's `time_steps`): the kernel (pipeline/nade_hidden.c), `NADEHiddenLogits` in
eager torch ops, and the same with its chunks compiled (what a compiled step ran before the
kernel). The error columns compare each path's float32 forward with float64 torch.

Samplers: `layer.sample` of K = 5 draws for a batch of conditioning rows, through the kernels
(pipeline/nade_hidden.c, pipeline/darn_sample.c) and through torch's loops over units, for the
layers of `configs/nade_200.yaml` and `configs/darn_200.yaml`.

The tables are printed and appended to benchmarks/RESULTS.md under "## NADE and DARN by C kernels (issue 8)".
"""

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import cpu_name, kernel_benchmark_args, publish  # noqa: E402
from benchmarks.throughput import time_steps  # noqa: E402
from pipeline import darn_sample, layers, nade_hidden  # noqa: E402

HIDDEN, BATCH = 200, 100
CASES = [(5, 784), (5, 200), (50, 784), (50, 200)]  # K, units
HEADING = "## NADE and DARN by C kernels (issue 8)"


def logits_row(num_samples: int, units: int, repeats: int, generator: torch.Generator) -> str:
    rows = num_samples * BATCH
    h = (torch.rand(rows, units, generator=generator) < 0.3).float()
    offset = torch.randn(rows, HIDDEN, generator=generator).requires_grad_()
    input_weight, output_weight = ((torch.randn(units, HIDDEN, generator=generator) / 15).requires_grad_() for _ in range(2))
    grad = torch.randn(rows, units, generator=generator)
    paths = {
        "kernel": nade_hidden.nade_hidden_logits,
        "torch": lambda *args: layers.NADEHiddenLogits.apply(*args, False),
        "compiled": lambda *args: layers.NADEHiddenLogits.apply(*args, True),
    }

    def forward(fn):
        def call():
            with torch.no_grad():
                fn(h, offset, input_weight, output_weight)

        return call

    def forward_backward(fn):
        return lambda: fn(h, offset, input_weight, output_weight).backward(grad)

    steps = [forward(fn) for fn in paths.values()] + [forward_backward(fn) for fn in paths.values()]
    ms = [1e3 * seconds for seconds, _ in time_steps(steps, steps=repeats, warmup=2, budget_s=math.inf)]
    operands = (h, offset, input_weight, output_weight)
    with torch.no_grad():
        exact = layers.NADEHiddenLogits.apply(*(t.double() for t in operands), False)
        errors = [(paths[name](*operands) - exact).abs().max().item() for name in ("kernel", "torch")]
    return (
        f"| {num_samples} | {rows} | {units} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[2] / ms[0]:.2f}x "
        f"| {ms[3]:.2f} | {ms[4]:.2f} | {ms[5]:.2f} | {ms[5] / ms[3]:.2f}x | {errors[0]:.1e} / {errors[1]:.1e} |"
    )


@contextlib.contextmanager
def torch_loops():
    """The layers' samplers take torch's loops over units while this is open."""
    with contextlib.ExitStack() as stack:
        for module, name in ((nade_hidden, "have_kernels"), (darn_sample, "_kernel")):
            original = getattr(module, name)
            stack.callback(setattr, module, name, original)
            setattr(module, name, lambda: None)
        yield


def sampler_row(kind: str, units: int, cond_units: int, batch: int, repeats: int) -> str:
    torch.manual_seed(0)
    layer = layers.make_layer(kind, units, cond_units, nade_hidden=HIDDEN)
    cond = (torch.rand(batch, cond_units) < 0.3).float()

    def sample(kernel: bool):
        def call():
            with contextlib.nullcontext() if kernel else torch_loops():
                layer.sample(cond, (5,))

        return call

    (kernel_s, _), (torch_s, _) = time_steps([sample(True), sample(False)], steps=repeats, warmup=1, budget_s=math.inf)
    timings = f"{1e3 * kernel_s:.2f} | {1e3 * torch_s:.2f} | {torch_s / kernel_s:.2f}x"
    return f"| {kind} | {units} | {cond_units} | {batch} | {timings} |"


def main(argv=None):
    args = kernel_benchmark_args(__doc__, 10, argv)
    if not nade_hidden.have_kernels() or darn_sample._kernel() is None:
        sys.exit("the NADE or DARN kernel did not load (see the warning above, or unset RWS_NATIVE=0)")
    generator = torch.Generator().manual_seed(0)

    logits = []
    for num_samples, units in CASES:
        logits.append(logits_row(num_samples, units, args.repeats, generator))
        print(logits[-1], flush=True)
    samplers = [sampler_row(kind, units, cond, batch, args.repeats) for kind in ("nade", "darn")
                for units, cond, batch in ((784, 200, BATCH), (200, 784, BATCH), (784, 200, 25))]
    print("\n".join(samplers), flush=True)
    table = (
        "| K | rows | units | forward kernel ms | forward torch ms | forward compiled chunks ms | forward speed-up over compiled "
        "| forward + backward kernel ms | forward + backward torch ms | forward + backward compiled chunks ms "
        "| forward + backward speed-up over compiled | max error vs float64, kernel / torch |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
        + "\n".join(logits)
        + "\n\nSamplers, K = 5 draws for each conditioning row:\n\n"
        "| layer | units | conditioning units | conditioning rows | kernel ms | torch loop ms | speed-up |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(samplers)
    )
    details = [
        f"machine: {os.cpu_count()} CPUs, {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"logits: [rows, units] 0/1 h, hidden {HIDDEN}, float32; median of {args.repeats} alternated calls",
    ]
    publish(__file__, argv, HEADING, details, table, None if args.no_append else args.results)


if __name__ == "__main__":
    main()
