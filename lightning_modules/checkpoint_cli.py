"""`rws checkpoint`: tools for the sharded DCP checkpoints written by `rws fit`.

    rws checkpoint consolidate DIR OUT.pt   one torch.save file (weights_only-loadable), any world size
    rws checkpoint verify DIR               recheck sizes and sha256 against the COMPLETE markers
    rws checkpoint list DIR                 the complete checkpoints under a directory, oldest written first

DIR may also be a run's checkpoint directory (`runs/checkpoints`) or a run directory: `consolidate`
uses the newest written complete checkpoint in it, `verify` checks every one (exit code 2 if any is
damaged). A checkpoint whose COMPLETE marker is damaged is left out with a warning on stderr (and
counts as damaged for `verify`).
"""

import argparse
import json
import sys
from pathlib import Path

from pipeline import checkpoint as ckpt


def _warn_skipped(path: Path, error: ckpt.CheckpointError) -> None:
    print(f"rws checkpoint: warning: skipping damaged checkpoint {path} ({error})", file=sys.stderr)


def _find(path: str, on_skip=_warn_skipped) -> list[ckpt.CheckpointInfo]:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    return ckpt.find_checkpoints(path, on_skip=on_skip)


def _verify_all(path: str) -> None:
    """Recheck every complete checkpoint at or under `path`, one line each; a CheckpointError naming
    the damaged ones at the end, so that one bad checkpoint does not hide the state of the others."""
    damaged = []

    def skipped(where: Path, error: ckpt.CheckpointError) -> None:
        _warn_skipped(where, error)
        damaged.append(str(where))

    found = _find(path, on_skip=skipped)
    if not found and not damaged:
        raise FileNotFoundError(f"no complete checkpoint directory at or under {path}")
    for info in found:
        try:
            marker = ckpt.verify(info.path)
        except ckpt.CheckpointError as error:
            print(f"{info.path}: DAMAGED ({error})")
            damaged.append(str(info.path))
        else:
            print(f"{info.path}: OK ({len(marker['files'])} files, step {marker['step']}, world size {marker['world_size']})")
    if damaged:
        raise ckpt.CheckpointError(f"{len(damaged)} damaged checkpoint(s) under {path}: {', '.join(damaged)}")


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
    verify = commands.add_parser("verify", help="recheck the size and sha256 of every file of every checkpoint")
    verify.add_argument("dir", help="a checkpoint directory, or a directory holding some (each is checked)")
    listing = commands.add_parser("list", help="list complete checkpoints, oldest written first")
    listing.add_argument("dir", help="a checkpoint directory, or a directory holding some")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    if args.command == "consolidate":
        source = _one(args.dir)
        out = ckpt.consolidate(source, args.out)
        print(f"wrote {out} ({out.stat().st_size} bytes) from {source}")
    elif args.command == "verify":
        _verify_all(args.dir)
    else:
        found = _find(args.dir)
        if not found:
            print(f"rws checkpoint: no complete checkpoints under {args.dir}", file=sys.stderr)
        for info in found:
            row = {"path": str(info.path), "step": info.step, "epoch": info.epoch, "world_size": info.marker["world_size"], "score": info.score}
            print(json.dumps(row) if args.json else "  ".join(f"{key}={value}" for key, value in row.items()))
    return 0
