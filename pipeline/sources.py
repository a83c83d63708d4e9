"""Binarized MNIST sources, whatever the user has: {split: packed uint8 [N, 98]} for `rws data prepare`.

Reads Larochelle's `.amat` files (a directory of them or one file), a `.npz` of packed or 0/1
arrays named by split, or a greyscale MNIST IDX images file, binarized here by a threshold or by
sampling (seeded, so a re-run writes the same shards). `pipeline.shards.prepare_split` writes the
result as WebDataset shards.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data import NUM_PIXELS, SPLITS, _read_amat, load_binarized_mnist
from pipeline.fileio import load_error_reason


def read_source(
    source: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    binarize: Literal["threshold", "stochastic"] | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    valid_size: int = 0,
) -> dict[str, np.ndarray]:
    """Read a binarized MNIST source as {split: packed uint8 [N, 98]}.

    Args:
        source: a directory of Larochelle's `binarized_mnist_<split>.amat`, one such `.amat`
            file, a `.npz` (packed or 0/1 arrays named by split), or a greyscale MNIST IDX images
            file (`train-images-idx3-ubyte[.gz]`), which needs `binarize`.
        splits: which splits to read. Multi-split sources default to every split they hold; a
            single `.amat` or IDX file holds one split, inferred from its name unless given here.
        binarize: IDX only: "threshold" (pixel / 255 > threshold) or "stochastic" (pixel is 1
            with probability pixel / 255, drawn with numpy's PCG64 seeded by `seed`).
        valid_size: IDX only: move the last `valid_size` images into a `valid` split (Larochelle's
            split of the 60k MNIST training images is 50k train + the last 10k as valid).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and _is_idx(path):
        return _read_idx_source(path, splits, binarize, threshold, seed, valid_size)
    if binarize is not None or valid_size:
        raise ValueError(
            f"{path}: --binarize/--valid-size apply only to greyscale MNIST IDX images files; this source is already binary"
        )
    if path.is_file() and path.suffix.lower() == ".amat":
        (split,) = _single_split(path, splits, default=_split_from_name(path.name))
        return {split: np.packbits(_read_amat(path), axis=1)}
    if splits is None:
        splits = _splits_present(path)
    return {split: np.packbits(pixels.numpy(), axis=1) for split, pixels in load_binarized_mnist(path, splits).items()}


def _splits_present(path: Path) -> tuple[str, ...]:
    if path.is_dir():
        present = tuple(s for s in SPLITS if (path / f"binarized_mnist_{s}.amat").is_file())
    elif path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                present = tuple(s for s in SPLITS if s in archive.files)
        except Exception as error:
            raise ValueError(f"{path} is not a readable .npz file ({load_error_reason(error)})") from error
    else:
        raise ValueError(
            f"{path}: unsupported source; expected a directory of binarized_mnist_<split>.amat files, "
            "one .amat file, a .npz, or an MNIST IDX images file (train-images-idx3-ubyte[.gz])"
        )
    if not present:
        raise ValueError(f"{path} holds none of the splits {', '.join(SPLITS)}")
    return present


def _split_from_name(name: str) -> str | None:
    lowered = name.lower()
    if "t10k" in lowered:
        return "test"
    return next((s for s in SPLITS if s in lowered), None)


def _single_split(path: Path, splits: Sequence[str] | None, default: str | None) -> tuple[str]:
    if splits is None:
        if default is None:
            raise ValueError(f"{path} holds one split and its name does not say which; pass --split")
        return (default,)
    splits = tuple(dict.fromkeys([splits] if isinstance(splits, str) else splits))
    if len(splits) != 1 or splits[0] not in SPLITS:
        raise ValueError(f"{path} holds one split: pass exactly one --split of {', '.join(SPLITS)}, got {splits}")
    return splits  # type: ignore[return-value]


_IDX_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions (N, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _unreadable(path: Path, error: BaseException) -> ValueError:
    return ValueError(f"{path} cannot be read: {load_error_reason(error)} (a truncated or damaged download?)")


def _is_idx(path: Path) -> bool:
    # Why sniff the magic number: IDX files come named `train-images-idx3-ubyte`, `*.idx`, gzipped or not.
    if path.suffix.lower() in (".npz", ".amat"):
        return False
    try:
        with _open_maybe_gzip(path) as file:
            magic = file.read(4)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # gzipped but damaged: not a question of its format
        raise _unreadable(path, error) from error
    except OSError:
        return False
    return len(magic) == 4 and int.from_bytes(magic, "big") in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read a (possibly gzipped) MNIST IDX images file as greyscale uint8 [N, 784] in 0..255."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise _unreadable(path, error) from error
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic == _IDX_LABELS_MAGIC:
        raise ValueError(f"{path} is an IDX labels file; pass the images file (e.g. train-images-idx3-ubyte)")
    if magic != _IDX_IMAGES_MAGIC or len(data) < 16:
        raise ValueError(f"{path} is not an IDX images file (magic {magic!r}, expected {_IDX_IMAGES_MAGIC:#010x})")
    count, rows, cols = struct.unpack(">III", data[4:16])
    if rows * cols != NUM_PIXELS:
        raise ValueError(f"{path}: images are {rows}x{cols}, expected 28x28 ({NUM_PIXELS} pixels)")
    expected = 16 + count * NUM_PIXELS
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or padded: {len(data)} bytes, its header implies {expected}")
    if count == 0:
        raise ValueError(f"{path} holds no images")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, NUM_PIXELS)


def binarize_threshold(grey: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 [N, 784] 0..255 -> uint8 [N, 784] of 0/1: 1 where grey / 255 > threshold."""
    if not 0 <= threshold < 1:
        raise ValueError(f"--threshold must be in [0, 1), got {threshold}")
    return (grey > threshold * 255).astype(np.uint8)


def binarize_stochastic(grey: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, 784] 0..255 -> uint8 [N, 784]: each pixel is 1 with probability grey / 255.

    Deterministic for a given seed (numpy's PCG64), so a re-run writes the same shards.
    """
    uniforms = np.random.default_rng(seed).random(grey.shape, dtype=np.float32)  # [N, 784]
    return (uniforms * 255 < grey).astype(np.uint8)


def _read_idx_source(path, splits, binarize, threshold, seed, valid_size) -> dict[str, np.ndarray]:
    if binarize is None:
        raise ValueError(
            f"{path} holds greyscale images: choose --binarize threshold (with --threshold) or stochastic (with --seed)"
        )
    (split,) = _single_split(path, splits, default=_split_from_name(path.name) or "train")
    grey = read_idx_images(path)
    pixels = binarize_threshold(grey, threshold) if binarize == "threshold" else binarize_stochastic(grey, seed)
    packed = np.packbits(pixels, axis=1)  # [N, 98]
    if not valid_size:
        return {split: packed}
    if split == "valid" or not 0 < valid_size < len(packed):
        raise ValueError(
            f"--valid-size must be in [1, {len(packed) - 1}] and the split must not be 'valid', got {valid_size}, {split!r}"
        )
    return {split: packed[:-valid_size], "valid": packed[-valid_size:]}
