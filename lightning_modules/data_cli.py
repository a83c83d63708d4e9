"""`rws data prepare`: binarized MNIST sources -> WebDataset tar shards plus index.json.

    rws data prepare --input binarized_mnist.npz --output shards/ --shard-size 1000
    rws data prepare --input train-images-idx3-ubyte.gz --output shards/ --shard-size 1000 \\
        --binarize stochastic --seed 0 --valid-size 10000

The work is done by `pipeline.sources` and `pipeline.shards`; this module is the command line:
arguments, a progress bar on stderr, one summary line per split on stdout.
"""

import argparse
import sys

from tqdm import tqdm

from pipeline.data import SPLITS
from pipeline.shards import INDEX_NAME, check_shard_size, prepare_split
from pipeline.sources import read_source

_DESCRIPTION = """Convert binarized MNIST into WebDataset tar shards (one 98-byte packed image per sample) and an
index.json listing every shard's name, sample count, size and sha256. `rws fit --data.shards DIR`
streams them. Re-running with the same input and shard size rewrites nothing; a run that fails
never leaves a half-written shard listed in the index."""

_EPILOG = """sources:
  DIR                       Larochelle's binarized_mnist_{train,valid,test}.amat
  FILE.amat                 one split (named by --split or by the file name)
  FILE.npz                  arrays train/valid/test, packed (np.packbits, 98 columns) or 0/1
  *-images-idx3-ubyte[.gz]  greyscale MNIST; needs --binarize (threshold | stochastic)

examples:
  rws data prepare --input binarized_mnist.npz --output shards --shard-size 1000
  rws data prepare --input train-images-idx3-ubyte.gz --output shards --shard-size 1000 \\
      --binarize threshold --threshold 0.5 --valid-size 10000
  rws fit --config configs/sbn_200_200_10.yaml --data.shards shards"""


DEFAULTS = {"threshold": 0.5, "seed": 0}  # of --threshold and --seed, which are refused without their --binarize mode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rws data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", metavar="{prepare}")
    prepare = commands.add_parser(
        "prepare",
        prog="rws data prepare",
        help="write WebDataset shards and their index",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = prepare.add_argument
    add("--input", required=True, metavar="SOURCE", help="a .amat directory or file, a .npz, or an MNIST IDX images file")
    add("--output", required=True, metavar="DIR", help=f"directory for the shards and {INDEX_NAME} (created if missing)")
    add("--shard-size", required=True, type=int, metavar="N", help="samples per shard (e.g. 1000)")
    add(
        "--split",
        action="append",
        choices=SPLITS,
        help="split to write; repeat for several (default: every split the source holds; for one .amat "
        "or IDX file, the split it holds, from its name)",
    )
    add("--binarize", choices=("threshold", "stochastic"), help="IDX input: how to binarize the greyscale pixels")
    add("--threshold", type=float, help=f"--binarize threshold: 1 where grey / 255 > THRESHOLD (default {DEFAULTS['threshold']})")
    add("--seed", type=int, help=f"--binarize stochastic: the seed of the Bernoulli draws (default {DEFAULTS['seed']})")
    add("--valid-size", type=int, default=0, metavar="N", help="IDX input: move the last N images into a 'valid' split")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def data_main(argv: list[str]) -> int:
    """`rws data ...`; returns the exit code. Bad input raises FileNotFoundError/ValueError (the caller prints it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return int(exit_.code or 0)
    if args.command != "prepare":
        parser.print_help(sys.stderr)
        return 2
    check_shard_size(args.shard_size)  # before reading the input, which can take a while
    for option, mode in (("threshold", "threshold"), ("seed", "stochastic")):
        if getattr(args, option) is None:
            setattr(args, option, DEFAULTS[option])
        elif args.binarize != mode:  # it would be ignored: the shards would not be what was asked for
            other = f", not {args.binarize}" if args.binarize else ""
            raise ValueError(f"--{option} applies only with --binarize {mode}{other}")
    return _prepare(args)


def _prepare(args: argparse.Namespace) -> int:
    arrays = read_source(
        args.input,
        args.split,
        binarize=args.binarize,
        threshold=args.threshold,
        seed=args.seed,
        valid_size=args.valid_size,
    )
    source = _describe_source(args)
    for split, packed in arrays.items():
        bar = tqdm(total=len(packed), desc=f"rws data prepare {split}", unit="img", file=sys.stderr, disable=args.quiet)
        with bar:
            result = prepare_split(args.output, split, packed, args.shard_size, source=source, progress=bar.update)
        pattern = _pattern(args.output, result.shards)
        status = "written" if result.written else "up to date, nothing written"
        print(f"{split}: {result.count} samples in {len(result.shards)} shards: {pattern} ({status})")
    print(f"index: {args.output.rstrip('/')}/{INDEX_NAME}")
    return 0


def _describe_source(args: argparse.Namespace) -> str:
    text = str(args.input)
    if args.binarize == "threshold":
        text += f" (binarized: threshold {args.threshold})"
    elif args.binarize == "stochastic":
        text += f" (binarized: stochastic, seed {args.seed})"
    return text


def _pattern(output: str, names: tuple[str, ...]) -> str:
    """The brace pattern of consecutive shard names, e.g. out/train-{000000..000049}.tar."""
    first, last = names[0], names[-1]
    prefix, number_first = first[: -len("000000.tar")], first[-len("000000.tar") : -len(".tar")]
    number_last = last[-len("000000.tar") : -len(".tar")]
    middle = number_first if len(names) == 1 else f"{{{number_first}..{number_last}}}"
    return f"{output.rstrip('/')}/{prefix}{middle}.tar"


if __name__ == "__main__":
    sys.exit(data_main(sys.argv[1:]))
