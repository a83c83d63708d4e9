"""Per-step time and communication of sample parallelism: S=1 (1 process) vs S=2 (2 gloo processes).

    python benchmarks/sample_parallel.py [--ks 5 50 500] [--layouts 1x1 1x2 2x1] [--steps 10] [--no-append]

One RWS training step as `RWSModule.training_step` does it (rws_surrogates, one backward, Adam on P
and on Q) for an SBN 784-200-200-10 on minibatches of 100 binarized-MNIST images (the embedded
data), q_update wake-sleep, every process on one intra-op thread. Layouts are D x S (data groups x
sample ranks):
    1x1  one process, K samples per data point;
    1x2  two processes sharing each minibatch, K/2 samples each, sample group = the world, wrapped in
         DDP over the world (what `rws fit --trainer.devices 2 --model.sample_parallel 2` runs);
         the update equals the 1x1 one;
    2x1  two data-parallel processes, K samples each on their own minibatch (a different algorithm:
         twice the batch per update), for reference.
Reported per step: the median wall time over the measured steps (the slower rank's, ranks start each
step together after a barrier), each rank's CPU time, and the bytes each rank all-reduces: in the
sample group (counted by wrapping `torch.distributed.all_reduce`, which `pipeline.distributed` calls:
a few all-reduces of B floats per step, for the normalized weights, the ESS and the log-likelihood
estimate) and DDP's gradient all-reduce (counted by a DDP communication hook: every parameter,
4 bytes each). Payload per rank; a ring all-reduce moves about 2 (n-1)/n times it over the wire.
No GPU is used. The table is printed and, unless --no-append,
added with the date, machine, torch version and command to benchmarks/RESULTS.md under
"## Sample parallelism (issue 4)".
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import cpu_name  # noqa: E402
from pipeline.data import load_binarized_mnist  # noqa: E402
from pipeline.distributed import init_sample_parallel_mesh, split_evenly  # noqa: E402
from pipeline.estimators import rws_surrogates  # noqa: E402
from pipeline.models import HelmholtzMachine  # noqa: E402

SECTION = "## Sample parallelism (issue 4)"
RESULTS = Path(__file__).parent / "RESULTS.md"


class _Step(nn.Module):
    """RWSModule's training step as a module, so DDP's forward arms its gradient all-reduce."""

    def __init__(self, model, num_samples, q_update, sample_group):
        super().__init__()
        self.model, self.num_samples, self.q_update, self.sample_group = model, num_samples, q_update, sample_group

    def forward(self, x):
        out = rws_surrogates(self.model, x, self.num_samples, self.q_update, self.sample_group)
        return out.p_loss + out.q_loss


def _worker(rank: int, world: int, sample_parallel: int, port: int, config: dict, out_dir: str):
    torch.set_num_threads(1)
    counters = {"sample_group": 0, "gradients": 0}
    step_module_group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5)
        )
        mesh = init_sample_parallel_mesh(sample_parallel)
        step_module_group = mesh["sample"].get_group() if sample_parallel > 1 else None
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):  # what sharded_logsumexp sends
            counters["sample_group"] += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
    data_rank = rank // sample_parallel
    torch.manual_seed(0)  # the same parameters everywhere (DDP would broadcast rank 0's anyway)
    model = HelmholtzMachine(config["layer_sizes"])
    step = _Step(model, config["num_samples"], config["q_update"], step_module_group)
    if world > 1:

        def counting_hook(state, bucket):  # DDP's default hook (average = divide, then SUM), counted
            buffer = bucket.buffer()
            counters["gradients"] += buffer.numel() * buffer.element_size()
            buffer.div_(world)
            return all_reduce(buffer, async_op=True).get_future().then(lambda future: future.value()[0])

        step = nn.parallel.DistributedDataParallel(step)
        step.register_comm_hook(None, counting_hook)
    torch.manual_seed(1 + rank)  # each rank its own samples, as RWSModule.setup arranges
    optimizers = [torch.optim.Adam(model.p_parameters(), lr=1e-3), torch.optim.Adam(model.q_parameters(), lr=1e-3)]
    train = load_binarized_mnist(None, splits=("train",))["train"]
    batch = config["batch_size"]
    walls, cpus = [], []
    started = time.perf_counter()
    for i in range(config["warmup"] + config["steps"]):
        if i == config["warmup"]:
            counters = dict.fromkeys(counters, 0)
            started = time.perf_counter()
        start = ((i * (world // sample_parallel) + data_rank) * batch) % (len(train) - batch)
        x = train[start : start + batch].float()  # a sample group shares it, data groups differ
        if world > 1:
            dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        for optimizer in optimizers:
            optimizer.zero_grad()
        step(x).backward()
        for optimizer in optimizers:
            optimizer.step()
        if i >= config["warmup"]:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        if world > 1:  # stop together once the time budget is spent (at least 3 measured steps)
            done = torch.tensor(float(len(walls) >= 3 and time.perf_counter() - started > config["max_seconds"]))
            all_reduce(done, op=dist.ReduceOp.MAX)
            if done.item():
                break
        elif len(walls) >= 3 and time.perf_counter() - started > config["max_seconds"]:
            break
    steps = len(walls)
    result = {
        "walls": walls,
        "cpus": cpus,
        "sample_group_bytes": counters["sample_group"] / steps,
        "gradient_bytes": counters["gradients"] / steps,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _burn(rank: int, out_dir: str):
    """A fixed amount of single-threaded matmul work; writes its wall time."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(1500):
        a @ a
    Path(out_dir, f"burn{rank}.txt").write_text(str(time.perf_counter() - start))


def parallel_capacity() -> float:
    """Throughput of 2 concurrent single-threaded processes over that of 1, on pure compute.

    2.0 means two free cores; less means the cores are shared (other jobs, or a host that gives
    this VM less than its nominal CPUs). Wall-time speedups of 2 processes are bounded by it.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_burn, args=(out_dir,), nprocs=1, join=True)
        one = float(Path(out_dir, "burn0.txt").read_text())
        mp.spawn(_burn, args=(out_dir,), nprocs=2, join=True)
        two = max(float(Path(out_dir, f"burn{r}.txt").read_text()) for r in range(2))
    return 2 * one / two


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(layout: str, config: dict) -> dict:
    data_groups, sample_parallel = map(int, layout.split("x"))
    world = data_groups * sample_parallel
    with tempfile.TemporaryDirectory() as out_dir:
        if world == 1:
            _worker(0, 1, 1, 0, config, out_dir)
        else:
            mp.spawn(_worker, args=(world, sample_parallel, _free_port(), config, out_dir), nprocs=world, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    steps = min(len(r["walls"]) for r in ranks)
    slowest = [max(r["walls"][i] for r in ranks) for i in range(steps)]
    return {
        "layout": layout,
        "K": config["num_samples"],
        "K_per_rank": "/".join(str(split_evenly(config["num_samples"], sample_parallel, r)) for r in range(sample_parallel)),
        "images_per_step": config["batch_size"] * data_groups,
        "step_ms": 1e3 * statistics.median(slowest),
        "cpu_ms": 1e3 * statistics.median(c for r in ranks for c in r["cpus"][:steps]),
        "sample_group_bytes": ranks[0]["sample_group_bytes"],
        "gradient_bytes": ranks[0]["gradient_bytes"],
        "parameters": ranks[0]["parameters"],
        "steps": steps,
    }


def table(rows: list[dict]) -> str:
    baseline = {row["K"]: row["step_ms"] for row in rows if row["layout"] == "1x1"}
    lines = [
        "| D x S | K | K per rank | images/step | step ms (median) | CPU ms/step per rank | step speedup vs 1x1 "
        "| samples/s (K x images) | sample-group all-reduce B/step | DDP gradient all-reduce B/step | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = baseline.get(row["K"])
        speedup = f"{speedup / row['step_ms']:.2f}x" if speedup else "-"
        lines.append(
            f"| {row['layout']} | {row['K']} | {row['K_per_rank']} | {row['images_per_step']} | {row['step_ms']:.1f} "
            f"| {row['cpu_ms']:.1f} | {speedup} | {row['K'] * row['images_per_step'] / row['step_ms'] * 1e3:,.0f} "
            f"| {row['sample_group_bytes']:,.0f} | {row['gradient_bytes']:,.0f} "
            f"| {row['steps']} |"
        )
    return "\n".join(lines)


def machine() -> str:
    return f"{os.cpu_count()} CPUs ({cpu_name()}), no GPU used, torch {torch.__version__}, Python {platform.python_version()}"


def append_to_section(text: str, path: Path = RESULTS):
    """Add `text` at the end of this benchmark's section of RESULTS.md, creating the section (and file)."""
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in content:
        content = content.rstrip("\n") + f"\n\n{SECTION}\n"
    start = content.index(SECTION) + len(SECTION)
    following = content.find("\n## ", start)
    end = len(content) if following == -1 else following + 1
    section = content[start:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n"
    path.write_text(content[:start] + section + ("\n" + content[end:] if following != -1 else ""))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 50, 500])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"], help="D x S, e.g. 1x2")
    parser.add_argument("--layer-sizes", type=int, nargs="+", default=[784, 200, 200, 10])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--q-update", default="wake-sleep")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (fewer if --max-seconds runs out)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=40, help="time budget per layout and K")
    parser.add_argument("--no-append", action="store_true", help="print only, do not write RESULTS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    capacity_before = parallel_capacity()
    rows = []
    for k in args.ks:
        for layout in args.layouts:
            config = {
                "layer_sizes": args.layer_sizes, "batch_size": args.batch_size, "q_update": args.q_update,
                "num_samples": k, "steps": args.steps, "warmup": args.warmup, "max_seconds": args.max_seconds,
            }  # fmt: skip
            rows.append(measure(layout, config))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    capacity_after = parallel_capacity()
    result = table(rows)
    print(result)
    print(f"parallel capacity (2 processes / 1 process, pure compute): {capacity_before:.2f}x before, {capacity_after:.2f}x after")
    if not args.no_append:
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
        load_after = os.getloadavg()
        header = (
            f"### Per-step time and communication, {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"- Machine: {machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
            f"(shared with other jobs: see the load). Parallel capacity, the throughput of 2 concurrent "
            f"single-threaded matmul loops over that of 1 (2.00x = two free cores): {capacity_before:.2f}x before, "
            f"{capacity_after:.2f}x after; 2-process wall-time speedups are bounded by it.\n"
            f"- SBN {'-'.join(map(str, args.layer_sizes[1:]))} on {args.layer_sizes[0]} pixels, batch {args.batch_size}, "
            f"q_update {args.q_update}, one thread per process, {rows[0]['parameters']:,} parameters.\n"
            f"- Command: `{command}`\n"
        )
        append_to_section(header + "\n" + result)


if __name__ == "__main__":
    main()
