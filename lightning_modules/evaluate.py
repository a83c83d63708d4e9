"""`rws eval` and `rws sample`: importance-sampled test log-likelihood and sample grids of a checkpoint."""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lightning_modules.checkpoints import load_checkpoint, resolve_checkpoint
from lightning_modules.datamodule import read_splits
from lightning_modules.module import ignore_inductor_tf32_hint
from pipeline.allocator import retain_freed_memory
from pipeline.data import SPLITS
from pipeline.distributed import rank_seed
from pipeline.estimators import default_chunk_size, log_likelihood
from pipeline.fileio import atomic_write, check_writable
from pipeline.images import image_extensions, image_grid, save_image, square_shape
from pipeline.shards import locate_shards

CHECKPOINT_HELP = "checkpoint file or directory, or a run directory (its newest checkpoint)"


def _device(name: str) -> torch.device:
    """The torch device of `--device NAME`; ValueError naming the option for one this machine lacks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # "cuda" alone: one GPU per rank under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _points(split: str, data_path: str | None, data_hparams: dict) -> tuple[torch.Tensor, str]:
    """The split to evaluate, and where it came from: `--data-path`, else the checkpoint's training
    data, read as its DataModule reads validation and test (`read_splits`)."""
    shards = data_hparams.get("shards") if data_path is None else None
    location = locate_shards(shards) if shards else None
    path = data_path if data_path is not None else data_hparams.get("path")
    points = read_splits(location, path, [split])[0][split]
    from_shards = location is not None and location.split(split) is not None
    return points, shards if from_shards else path or "embedded default"


@contextlib.contextmanager
def _launched_ranks(device: torch.device) -> Iterator[tuple[dist.ProcessGroup | None, int]]:
    """(process group, rank): under torchrun (WORLD_SIZE > 1) all ranks join one group and split
    the K samples; alone, (None, 0). A group joined here is destroyed on the way out: gloo's threads
    outliving it abort the process at exit ("terminate called without an active exception",
    pytorch#190489)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None, 0
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.group.WORLD, dist.get_rank()
    finally:
        if joined:
            dist.destroy_process_group()


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rws eval",
        description="Estimate log p(x) of a trained model with K importance samples per point. "
        "Launched on several ranks (torchrun --nproc-per-node N), the ranks split the K samples.",
    )
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--num-samples", type=int, default=5000, help="K samples from Q per data point (default 5000)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--data-path", default=None, help="data to evaluate on (default: the checkpoint's training data)")
    parser.add_argument("--batch-size", type=int, default=100, help="data points per batch (default 100)")
    parser.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: from a memory budget)")
    parser.add_argument("--max-points", type=int, default=None, help="evaluate only the first N points of the split")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run each chunk of samples through torch.compile: about 2x the throughput on a CPU, "
        "after 10-30 s of compiling (worth it for K in the thousands and up)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the importance samples (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--per-point",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write each point's estimate (nats, one line per point, in split order) to FILE, "
        "e.g. to compare two models point by point",
    )
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size", "chunk_size", "max_points"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    # Checked before the evaluation, which can take hours, rather than when its result is written.
    if args.per_point is not None:
        if args.per_point.is_dir() or not args.per_point.parent.is_dir():
            parser.error(f"--per-point {args.per_point}: not a file in an existing directory")
        try:
            check_writable(args.per_point)
        except OSError as error:
            parser.error(f"--per-point {args.per_point}: cannot write there ({error.strerror or error})")

    device = _device(args.device)
    ignore_inductor_tf32_hint()  # the estimates keep exact float32 products on purpose
    checkpoint = resolve_checkpoint(args.checkpoint)  # reported as read, not as the run directory given
    module, data_hparams = load_checkpoint(checkpoint)
    points, data_source = _points(args.split, args.data_path, data_hparams)
    points = points[: args.max_points]
    model = module.model.to(device)
    # Once, not per batch: on a GPU the default follows the free memory, and a chunk size that moved
    # between batches would make `--compile` compile again.
    chunk_size = args.chunk_size or default_chunk_size(model, max(1, min(args.batch_size, len(points))), device)
    with _launched_ranks(device) as (sample_group, rank):
        torch.manual_seed(rank_seed(args.seed, rank))  # every rank draws its own share of the K samples
        retain_freed_memory()  # the chunks' temporaries stay mapped between batches (pipeline/allocator.py)
        start = time.perf_counter()
        estimates = []
        desc = f"rws eval K={args.num_samples}"
        with tqdm(total=len(points), desc=desc, unit="pt", file=sys.stderr, disable=rank != 0) as progress:
            for batch in points.split(args.batch_size):
                x = batch.to(device=device, dtype=torch.float32)
                log_px = log_likelihood(model, x, args.num_samples, chunk_size, sample_group, args.compile)
                estimates.append(log_px.cpu())
                progress.update(len(batch))
    if rank != 0:
        return 0  # every rank holds the same estimates; one prints them
    estimates = torch.cat(estimates).double()  # [N]
    result = {
        "log_likelihood": estimates.mean().item(),
        "stderr": (estimates.std() / math.sqrt(len(estimates))).item() if len(estimates) > 1 else None,  # JSON null
        "num_samples": args.num_samples,
        "num_points": len(estimates),
        "split": args.split,
        "data": data_source,
        "checkpoint": str(checkpoint),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.per_point is not None:
        atomic_write(args.per_point, "".join(f"{value:.6f}\n" for value in estimates.tolist()).encode())
        result["per_point"] = str(args.per_point)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            shown = f"{value:.4f}" if isinstance(value, float) else "n/a (one point)" if value is None else value
            print(f"{key:<{width}}  {shown}")
    return 0


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rws sample", description="Write a grid image of samples x ~ P.")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument(
        "--out", type=Path, default=Path("samples.png"),
        help="output image (default samples.png); its extension picks the format, e.g. .png or .jpg",
    )  # fmt: skip
    parser.add_argument("--nrow", type=int, default=None, help="images per row (default: a square grid)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    args = parser.parse_args(argv)
    for name in ("num", "nrow"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.out.is_dir() or args.out.suffix.lower() not in image_extensions():
        parser.error(f"--out {args.out}: not an image file name; give one ending in .png (or another image extension)")
    module, _ = load_checkpoint(args.checkpoint)
    torch.manual_seed(args.seed)
    x, _ = module.model.sample_p(args.num)
    shape = square_shape(x.shape[1]) or (1, x.shape[1])  # non-square data: one row of pixels each
    save_image(image_grid(x, shape, args.nrow), args.out)
    print(f"wrote {args.num} samples to {args.out}")
    return 0
