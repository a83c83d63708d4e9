"""Streaming throughput of the WebDataset shard loader versus what training consumes.

    python benchmarks/streaming_throughput.py [--data binarized_mnist.npz] [--shards DIR] [--no-append]

Measures, on the full binarized MNIST training shards (prepared into --shards if missing):
  * the loader alone: samples/s of one epoch of `StreamingLoader` (batch 100) with 1 and 2
    DataLoader workers (0 = in the main process, for reference), decoding included;
  * the training step alone: samples/s of RWS on SBN 784-200-200-10, K=5, batch 100 (the
    module's step: sample Q, log-probs, both surrogates, backward, two Adam steps), one thread;
  * both together: the same step fed by the loader (0 and 1 workers), against the step fed from memory,
    and the share of the fed step's time spent waiting for the next batch.
The loader is not the bottleneck when its rate is well above the step's and the fed step hardly
ever waits for a batch. The table is printed and appended to benchmarks/RESULTS.md
under "## Streaming throughput (issue 5)".
"""

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import cpu_name  # noqa: E402
from pipeline.data import load_binarized_mnist  # noqa: E402
from pipeline.estimators import rws_surrogates  # noqa: E402
from pipeline.models import HelmholtzMachine  # noqa: E402
from pipeline.shards import locate_shards, prepare_split  # noqa: E402
from pipeline.stream import StreamingLoader  # noqa: E402

BATCH = 100
K = 5
HEADING = "## Streaming throughput (issue 5)"


def prepare(data: Path, shards: Path) -> None:
    if (shards / "index.json").exists() and locate_shards(str(shards)).split("train") is not None:
        return
    train = load_binarized_mnist(data, ["train"])["train"]
    prepare_split(shards, "train", np.packbits(train.numpy(), axis=1), 1000, source=str(data))


def loader_rate(shards, num_workers: int, batches: int) -> float:
    """Samples/s of `batches` batches, worker start-up included (it is paid every epoch)."""
    loader = StreamingLoader(shards, batch_size=BATCH, num_workers=num_workers, seed=0)
    start, n = time.perf_counter(), 0
    for n, _batch in enumerate(loader, 1):
        if n == batches:
            break
    return n * BATCH / (time.perf_counter() - start)


class Step:
    """The training step of RWSModule (without Lightning): SBN 784-200-200-10, K=5, two Adam optimizers."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = HelmholtzMachine([784, 200, 200, 10], "sbn", "sbn")
        self.p_opt = torch.optim.Adam(self.model.p_parameters(), lr=1e-3)
        self.q_opt = torch.optim.Adam(self.model.q_parameters(), lr=1e-3)

    def __call__(self, batch: torch.Tensor) -> None:
        x = batch.float().flatten(1)  # [B, 784]
        surrogates = rws_surrogates(self.model, x, K, "wake-sleep")
        self.p_opt.zero_grad()
        self.q_opt.zero_grad()
        (surrogates.p_loss + surrogates.q_loss).backward()
        self.p_opt.step()
        self.q_opt.step()


def step_rate(batches) -> tuple[float, float]:
    """(samples/s, fraction of the time spent waiting for the next batch) of the training step
    over an iterable of batches; the first 5 steps warm up."""
    step, n, start, waited = Step(), 0, None, 0.0
    iterator = iter(batches)
    for i in range(sys.maxsize):
        if i == 5:
            start, n, waited = time.perf_counter(), 0, 0.0
        before = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - before
        if batch is None:
            break
        step(batch)
        n += len(batch)
    elapsed = time.perf_counter() - start
    return n / elapsed, waited / elapsed


def limited(iterable, count: int):
    for i, item in enumerate(iterable):
        if i == count:
            return
        yield item


def machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPUs ({cpu_name()}), load average {load} at start, torch {torch.__version__}, {threads} torch thread(s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "binarized_mnist.npz")
    parser.add_argument("--shards", type=Path, help="shard directory (prepared from --data if missing; default: a temporary one)")
    parser.add_argument("--loader-batches", type=int, default=500, help="batches per loader measurement (500 = one epoch)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per step measurement")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread per process, as in training runs here
    context = machine()

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.shards or Path(tmp) / "shards"
        prepare(args.data, directory)
        shards = locate_shards(str(directory)).train()
        rows = []
        for workers in (0, 1, 2):
            rate = loader_rate(shards, workers, args.loader_batches)
            rows.append((f"loader, {workers} worker(s)" + (" (main process)" if workers == 0 else ""), rate))
        memory = load_binarized_mnist(args.data, ["train"])["train"][: (args.steps + 5) * BATCH]
        from_memory, _ = step_rate(memory.split(BATCH))
        rows.append(("training step alone (batches from memory)", from_memory))
        waiting = {}
        for workers in (0, 1):
            loader = StreamingLoader(shards, batch_size=BATCH, num_workers=workers, seed=0)
            fed, waiting[workers] = step_rate(limited(loader, args.steps + 5))
            rows.append((f"training step fed by the loader, {workers} worker(s)", fed))

    table = ["| what | samples/s | x step | share of step time waiting for data |", "|---|---:|---:|---:|"]
    for name, rate in rows:
        workers = int(name.split(", ")[1][0]) if name.startswith("training step fed") else None
        wait = f"{waiting[workers]:.1%}" if workers is not None else ""
        table.append(f"| {name} | {rate:,.0f} | {rate / from_memory:.1f} | {wait} |")
    verdict = (
        f"The loader delivers {rows[1][1] / from_memory:.0f}x (1 worker) and {rows[2][1] / from_memory:.0f}x (2 workers) "
        f"what the step consumes. Fed by it, the step waits for data {waiting[0]:.1%} of its time with the loader in "
        f"the main process (the CPU cost of reading, checking and unpacking) and {waiting[1]:.1%} with 1 worker "
        "(inter-process hand-over and scheduling on this shared machine)."
    )
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    report = "\n".join(
        [
            "",
            HEADING,
            "",
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {context}.",
            f"Command: `{command}`. SBN 784-200-200-10, K={K}, batch {BATCH}, full binarized MNIST train "
            f"({shards.total} samples in {len(shards)} shards of 1000).",
            "",
            *table,
            "",
            verdict,
            "",
        ]
    )
    print(report)
    if not args.no_append:
        results = ROOT / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n")
        with open(results, "a") as file:
            file.write(report)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
