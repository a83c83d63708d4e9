"""Build the small binarized-MNIST subset embedded in the package (pipeline/default_data/).

    python scripts/make_default_data.py --source DATA --out pipeline/default_data/binarized_mnist_small.npz \
        [--train 10000 --valid 1000 --test 1000]

DATA is anything `pipeline.data.load_binarized_mnist` accepts (a directory with Larochelle's
binarized_mnist_{train,valid,test}.amat, or a .npz), so the same validation applies. The output
keeps the FIRST rows of each split (no shuffling, so the subset is reproducible and is a prefix of
the standard files), packed with np.packbits(axis=1) (98 uint8 columns) and saved with
np.savez_compressed (about 1 MB for the default sizes).

Where the data come from: the fixed (stochastically binarized once, then frozen) MNIST of
Larochelle & Murray, "The Neural Autoregressive Distribution Estimator", AISTATS 2011, with its
50000 train / 10000 valid / 10000 test split, as used by Bornschein & Bengio (2015). MNIST itself is
by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, and is available under the Creative
Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0); the embedded subset is a derivative work
under the same license.

Run from an environment where this project is installed (pip install -e .), so `pipeline` imports.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data import SPLITS, load_binarized_mnist

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "default_data" / "binarized_mnist_small.npz"
DEFAULT_ROWS = {"train": 10000, "valid": 1000, "test": 1000}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="directory of .amat files or a .npz file")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz (default: %(default)s)")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_ROWS[split], help=f"first rows of {split}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    data = load_binarized_mnist(args.source)
    subset = {}
    for split in SPLITS:
        rows = getattr(args, split)
        available = len(data[split])
        if not 0 < rows <= available:
            raise SystemExit(f"--{split} {rows}: {args.source} has {available} {split} rows; ask for 1..{available}")
        subset[split] = np.packbits(data[split][:rows].numpy(), axis=1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **subset)
    shapes = ", ".join(f"{split} {array.shape[0]}" for split, array in subset.items())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {shapes} rows, packed to {subset['train'].shape[1]} bytes/row")
    return out


if __name__ == "__main__":
    main()
