"""Cost of one Bernoulli draw (sigmoid, uniform, comparison) per number, three ways, on this CPU.

    python benchmarks/rng.py [--threads N] [--rows 5000] [--units 400]

- compiled, Philox C kernel: `pipeline.layers._bernoulli` under torch.compile, which is what a
  compiled training step runs where pipeline/philox.c builds (uniforms from `pipeline.philox`);
- compiled, Philox tensor ops: the same draw from `tensor_philox_uniform`, the fallback without a
  C compiler (the same numbers);
- compiled, inductor rand: the same expression with `torch.rand`, lowered by inductor;
- eager torch.rand: the same expression without compiling (aten's mt19937).
Median of 20 calls after warm-up (throughput.py's `time_steps`); prints a table (not appended to
RESULTS.md).
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import time_steps  # noqa: E402
from pipeline.layers import _bernoulli  # noqa: E402
from pipeline.philox import tensor_philox_uniform  # noqa: E402


def torch_rand_bernoulli(logits: torch.Tensor) -> torch.Tensor:
    return (torch.rand_like(logits) < torch.sigmoid(logits)).to(logits.dtype)


def tensor_philox_bernoulli(logits: torch.Tensor) -> torch.Tensor:
    """`_bernoulli`'s draw with the uniforms of the tensor-op Philox."""
    key = torch.randint(0, 2**32, (2,))
    u = tensor_philox_uniform(logits.shape, key) + torch.finfo(logits.dtype).eps / 4
    return ((u < torch.sigmoid(-logits.abs())) ^ (logits > 0)).to(logits.dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=5000, help="K x B rows of logits")
    parser.add_argument("--units", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits = torch.randn(args.rows, args.units)
    variants = {
        "compiled, Philox C kernel (what training runs)": torch.compile(_bernoulli, dynamic=False),
        "compiled, Philox tensor ops (without a C compiler)": torch.compile(tensor_philox_bernoulli, dynamic=False),
        "compiled, inductor rand": torch.compile(torch_rand_bernoulli, dynamic=False),
        "eager torch.rand": torch_rand_bernoulli,
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, logits [{args.rows}, {args.units}]")
    print("| Bernoulli draws | ns per number |\n|---|---:|")
    for name, draw in variants.items():
        ((seconds, _),) = time_steps([partial(draw, logits)], steps=20, warmup=3, budget_s=60.0)
        print(f"| {name} | {1e9 * seconds / logits.numel():.2f} |")


if __name__ == "__main__":
    main()
