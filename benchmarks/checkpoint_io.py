"""Save/load time and size of the sharded DCP checkpoints (pipeline.checkpoint), sync vs async.

    python benchmarks/checkpoint_io.py [--repeats 5] [--ranks 1] [--no-append]

For each model (SBN 784-200-200-10 and a deep NADE/NADE 784-500-500 with 500 hidden units per
NADE) it builds what `rws fit` checkpoints: the parameters, both Adam optimizers' states (after a
step, so exp_avg/exp_avg_sq exist), loop counters and every rank's RNG states, then measures:

- sync: `save()` until the checkpoint is committed (all data written, fsynced, sha256'd, renamed);
- async: the time training is blocked (the state is copied to CPU memory, a thread writes it),
  and the time until the checkpoint is committed;
- load: sha256 verification plus the DCP read into freshly allocated tensors;
- torch.save / torch.load of the same dict to one file, as a reference;
- size on disk.

Medians over `--repeats` runs (torch intra-op threads: `--threads`, default 1), in a temporary directory on the same file system as the system's
temp dir. With `--ranks 2` the saves are collective over 2 forked gloo processes (rank 0's times).
The table is printed and, unless --no-append, appended to benchmarks/RESULTS.md with the date,
the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import cpu_name  # noqa: E402
from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline.models import HelmholtzMachine  # noqa: E402

MODELS = {
    "SBN 784-200-200-10": dict(layer_sizes=[784, 200, 200, 10], p_layer="sbn", q_layer="sbn"),
    "NADE/NADE 784-500-500 (hidden 500)": dict(layer_sizes=[784, 500, 500], p_layer="nade", q_layer="nade", nade_hidden=500),
}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def training_state(spec: dict) -> tuple[dict, int]:
    """A checkpoint like `rws fit`'s: model, two Adam states, counters; and the parameter count."""
    torch.manual_seed(0)
    model = HelmholtzMachine(**spec)
    optimizers = [torch.optim.Adam(model.p_parameters(), lr=1e-3), torch.optim.Adam(model.q_parameters(), lr=1e-3)]
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    for optimizer in optimizers:
        optimizer.step()
    state = {
        "epoch": 1,
        "global_step": 2000,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict() for optimizer in optimizers],
        "lr_schedulers": [],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2, "completed": 1}}}},
    }
    return state, sum(p.numel() for p in model.parameters())


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def measure(state: dict, root: Path, repeats: int, group=None) -> dict:
    rank = torch.distributed.get_rank() if group is not None else 0
    times = {key: [] for key in ("sync", "async_blocked", "async_total", "load", "torch_save", "torch_load")}
    sizes = {}
    for i in range(repeats):
        start = time.perf_counter()
        path = ckpt.save(root, f"sync{i:03d}", state, {"rng": ckpt.rng_state()}, step=i, process_group=group).wait()
        times["sync"].append(time.perf_counter() - start)
        sizes["dcp"] = size_of(path)

        start = time.perf_counter()
        pending = ckpt.save(root, f"async{i:03d}", state, {"rng": ckpt.rng_state()}, step=i, process_group=group, async_save=True)
        times["async_blocked"].append(time.perf_counter() - start)
        pending.wait()
        times["async_total"].append(time.perf_counter() - start)

        start = time.perf_counter()
        ckpt.load(path, process_group=group)
        times["load"].append(time.perf_counter() - start)

        if rank == 0:
            single = root / f"single{i:03d}.pt"
            start = time.perf_counter()
            with open(single, "wb") as stream:
                torch.save(state, stream)
                stream.flush()
                os.fsync(stream.fileno())
            times["torch_save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(single, weights_only=True)
            times["torch_load"].append(time.perf_counter() - start)
            sizes["torch"] = single.stat().st_size
        for name in (f"sync{i:03d}", f"async{i:03d}"):
            if rank == 0:
                shutil.rmtree(root / name, ignore_errors=True)
        if group is not None:
            torch.distributed.barrier(group)
    return {key: statistics.median(values) for key, values in times.items() if values} | {"sizes": sizes}


def _worker(rank: int, world: int, port: int, root: str, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    group = torch.distributed.new_group(backend="gloo")
    rows = []
    for name, spec in MODELS.items():
        state, params = training_state(spec)
        rows.append((name, params, measure(state, Path(root) / f"m{len(rows)}", repeats, group)))
    if rank == 0:
        queue.put(rows)
    torch.distributed.destroy_process_group()


def run(repeats: int, ranks: int) -> list:
    with tempfile.TemporaryDirectory(prefix="rws-ckpt-bench-") as root:
        if ranks == 1:
            rows = []
            for name, spec in MODELS.items():
                state, params = training_state(spec)
                rows.append((name, params, measure(state, Path(root) / f"m{len(rows)}", repeats)))
            return rows
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("fork").SimpleQueue()
        mp.start_processes(_worker, args=(ranks, port, root, repeats, queue), nprocs=ranks, join=True, start_method="fork")
        return queue.get()


def table(rows: list) -> str:
    lines = [
        "| model | params | DCP size | sync save | async: blocked | async: committed | load (sha256 + DCP) | torch.save / torch.load (1 file) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, params, r in rows:
        mb = r["sizes"]["dcp"] / 1e6
        reference = f"{r['torch_save'] * 1e3:.0f} / {r['torch_load'] * 1e3:.0f} ms ({r['sizes']['torch'] / 1e6:.1f} MB)" if "torch_save" in r else "-"
        lines.append(
            f"| {name} | {params / 1e6:.2f} M | {mb:.1f} MB | {r['sync'] * 1e3:.0f} ms | {r['async_blocked'] * 1e3:.0f} ms | "
            f"{r['async_total'] * 1e3:.0f} ms | {r['load'] * 1e3:.0f} ms | {reference} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu_name()}, {os.cpu_count()} cores{load}; {platform.system()} {platform.release()}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=1, help="processes saving collectively (forked, gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see below)")
    parser.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    # Why 1 thread by default: on a small shared machine, a multi-threaded tensor copy waits for
    # descheduled OpenMP threads (50x slower copies measured at load 9 on 2 cores), which would
    # measure the machine's load rather than the checkpoint code.
    torch.set_num_threads(args.threads)
    rows = run(args.repeats, args.ranks)
    text = table(rows)
    print(text)
    if not args.no_append:
        command = "python benchmarks/checkpoint_io.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = "" if RESULTS.exists() and "## Checkpoints (issue 7)" in RESULTS.read_text() else "\n## Checkpoints (issue 7)\n"
        with open(RESULTS, "a") as stream:
            stream.write(
                f"{header}\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {args.ranks} rank(s), "
                f"{args.threads} thread(s), median of {args.repeats}:\n`{command.strip()}`\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
