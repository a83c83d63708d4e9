"""`rws checkpoint`: tools for the sharded DCP checkpoints written by `rws fit`.

    rws checkpoint consolidate DIR OUT.pt   one torch.save file (weights_only-loadable), any world size
    rws checkpoint verify DIR               recheck sizes and sha256 against the COMPLETE marker
    rws checkpoint list RUN_DIR             the complete checkpoints under a directory, oldest first

DIR may also be a run's checkpoint directory (`runs/checkpoints`) or a run directory: the newest
complete checkpoint in it is used.
"""

import argparse
import json
from pathlib import Path

from pipeline import checkpoint as ckpt


def _one(path: str) -> Path:
    found = ckpt.find_checkpoints(path) if Path(path).is_dir() else []
    if not found:
        raise FileNotFoundError(f"no complete checkpoint directory at or under {path}")
    return found[-1].path


def checkpoint_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rws checkpoint", description="Tools for rws's sharded (DCP) checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser("consolidate", help="write one single-file checkpoint (.pt)")
    consolidate.add_argument("dir", help="a checkpoint directory (or a directory holding some: the newest)")
    consolidate.add_argument("out", help="output file, e.g. model.pt; `rws eval/sample --checkpoint` read it")
    verify = commands.add_parser("verify", help="recheck every file's size and sha256")
    verify.add_argument("dir")
    listing = commands.add_parser("list", help="list complete checkpoints")
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
        infos = ckpt.find_checkpoints(args.dir) if Path(args.dir).is_dir() else []
        for info in infos:
            row = {"path": str(info.path), "step": info.step, "epoch": info.epoch, "world_size": info.marker["world_size"], "score": info.score}
            print(json.dumps(row) if args.json else "  ".join(f"{key}={value}" for key, value in row.items()))
    return 0
