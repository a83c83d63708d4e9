"""`rws checkpoint`: tools for the sharded DCP checkpoints written by `rws fit`.

    rws checkpoint consolidate DIR OUT.pt   one torch.save file (weights_only-loadable), any world size
    rws checkpoint verify DIR               recheck sizes and sha256 against the COMPLETE marker
    rws checkpoint list RUN_DIR             the complete checkpoints under a directory, oldest written first

DIR may also be a run's checkpoint directory (`runs/checkpoints`) or a run directory: the newest
written complete checkpoint in it is used. A checkpoint whose COMPLETE marker is damaged is left
out with a warning on stderr.
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline import checkpoint as ckpt


def _warn_skipped(path: Path, error: ckpt.CheckpointError) -> None:
    print(f"rws checkpoint: warning: skipping damaged checkpoint {path} ({error})", file=sys.stderr)


def _find(path: str) -> list[ckpt.CheckpointInfo]:
    return ckpt.find_checkpoints(path, on_skip=_warn_skipped) if Path(path).is_dir() else []


def _one(path: str) -> Path:
    found = _find(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint directory at or under {path}")
    return found[-1].path


def checkpoint_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rws checkpoint", description="Tools for rws's sharded (DCP) checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser("consolidate", help="write one single-file checkpoint (.pt)")
    consolidate.add_argument("dir", help="a checkpoint directory (or a directory holding some: the newest)")
    consolidate.add_argument(
        "out", help="output file, e.g. model.pt (an existing file is replaced, atomically; a directory is refused); "
        "`rws eval/sample --checkpoint` read it",
    )  # fmt: skip
    verify = commands.add_parser("verify", help="recheck every file's size and sha256")
    verify.add_argument("dir")
    listing = commands.add_parser("list", help="list complete checkpoints, oldest written first")
    listing.add_argument("dir")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    if args.command == "consolidate":
        source = _one(args.dir)
        out = ckpt.consolidate(source, args.out)
        print(f"wrote {out} ({out.stat().st_size} bytes) from {source}")
    elif args.command == "verify":
        source = _one(args.dir)
        marker = ckpt.verify(source)
        print(f"{source}: OK ({len(marker['files'])} files, step {marker['step']}, world size {marker['world_size']})")
    else:
        for info in _find(args.dir):
            row = {"path": str(info.path), "step": info.step, "epoch": info.epoch, "world_size": info.marker["world_size"], "score": info.score}
            print(json.dumps(row) if args.json else "  ".join(f"{key}={value}" for key, value in row.items()))
    return 0
