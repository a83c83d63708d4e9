"""Binarized MNIST: the fixed binarization of Larochelle & Murray (2011), as used by RWS.

One entry point, `load_binarized_mnist(path, splits)`, returns {split: uint8 tensor [N, 784] of 0/1}
from one of three sources:

    None          the small subset shipped inside this package (10000 train / 1000 valid /
                  1000 test rows of the standard binarization), so everything runs offline;
    a directory   Larochelle's public text files binarized_mnist_{train,valid,test}.amat
                  (one image per line, 784 '0'/'1' values separated by single spaces);
    a .npz file   one array per split, named by split: either packed with
                  `np.packbits(X, axis=1)` (uint8, 98 columns) or unpacked (784 columns of 0/1,
                  any bool/integer/float dtype).

Every input is validated, and every error names the offending file (and split or row), because a
silently mis-parsed data set only shows up much later as a bad log-likelihood.
Nothing here downloads anything.
"""

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.fileio import load_error_reason

SPLITS = ("train", "valid", "test")
NUM_PIXELS = 784

# Why 98: np.packbits packs 8 pixels per byte and 784 = 98 * 8, so packed rows carry no padding.
_PACKED_COLUMNS = NUM_PIXELS // 8
_DEFAULT_FILE = Path(__file__).resolve().parent / "default_data" / "binarized_mnist_small.npz"
_AMAT_VALUE_LAYOUT = f"one image per line, {NUM_PIXELS} space-separated 0/1 values"


def load_binarized_mnist(
    path: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS
) -> dict[str, torch.Tensor]:
    """Load binarized MNIST as {split: uint8 tensor [N, 784] with values in {0, 1}}.

    Args:
        path: None for the subset embedded in the package, a directory holding Larochelle's
            `binarized_mnist_<split>.amat` files, or a `.npz` file with one array per split.
        splits: which of "train", "valid", "test" to load (only those files/arrays are read).

    Raises:
        FileNotFoundError: `path`, or a requested split's .amat file, does not exist.
        KeyError: a .npz file lacks an array for a requested split.
        ValueError: an unknown split, an unsupported file type, an empty or unreadable file,
            a wrong shape, or a value other than 0/1.
    """
    splits = _check_splits(splits)
    source = _DEFAULT_FILE if path is None else Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist; expected a directory holding "
            f"{', '.join(_amat_name(s) for s in SPLITS)} or a .npz file with arrays {', '.join(SPLITS)}"
        )
    if source.is_dir():
        arrays = _read_amat_dir(source, splits)
    elif source.suffix.lower() == ".npz":
        arrays = _read_npz(source, splits)
    else:
        # Why no single-.amat form: one file holds one split, so the directory names all three.
        hint = "; pass the directory that holds it" if source.suffix.lower() == ".amat" else ""
        raise ValueError(
            f"{source}: unsupported file type {source.suffix or '(no extension)'!r}; expected a .npz "
            f"file or a directory holding {', '.join(_amat_name(s) for s in SPLITS)}{hint}"
        )
    return {split: torch.from_numpy(array) for split, array in arrays.items()}


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    # Why accept a bare string: load_binarized_mnist(p, "test") would otherwise iterate characters.
    if isinstance(splits, str):
        splits = (splits,)
    splits = tuple(dict.fromkeys(splits))  # de-duplicate, keep order
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty selection of {SPLITS}, got {splits}")
    return splits


def _amat_name(split: str) -> str:
    return f"binarized_mnist_{split}.amat"


def _read_amat_dir(directory: Path, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    files = {split: directory / _amat_name(split) for split in splits}
    # Why check all before reading any: parsing 50k rows first and then failing on a missing
    # file wastes seconds, and listing every missing file at once saves round trips.
    missing = [file.name for file in files.values() if not file.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {', '.join(missing)}; expected Larochelle's files "
            f"{', '.join(f.name for f in files.values())} ({_AMAT_VALUE_LAYOUT})"
        )
    return {split: _read_amat(file) for split, file in files.items()}


def _read_amat(file: Path) -> np.ndarray:
    """Read one Larochelle .amat file into a uint8 array [N, 784] of 0/1, validating every value."""
    data = file.read_bytes()
    if not data.strip():
        raise ValueError(f"{file} is empty; expected {_AMAT_VALUE_LAYOUT}")
    # Why not np.loadtxt: it is slow before numpy 1.23, accepts any number (a stray 2 would pass),
    # and its errors do not say which row broke the 0/1 contract. Instead, the canonical layout
    # ("0 1 ... 0\n", fixed width) is checked and decoded with a few vectorised numpy operations
    # (~0.2 s for all 70k rows); anything else (CRLF, extra spaces, a bad value or row) goes to a
    # line-by-line parser that either accepts it or pinpoints the first problem.
    pixels = _decode_canonical_amat(data)
    return pixels if pixels is not None else _decode_amat_lines(data, file)


def _decode_canonical_amat(data: bytes) -> np.ndarray | None:
    """Decode fixed-width '0 1 ... 1\\n' rows with numpy; None if the bytes are not exactly that."""
    if not data.endswith(b"\n"):
        data += b"\n"
    width = 2 * NUM_PIXELS  # 784 digits, 783 spaces and one '\n'
    if len(data) % width:
        return None
    grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    digits = grid[:, 0::2]
    separators = grid[:, 1:-1:2]
    if not ((separators == ord(" ")).all() and (grid[:, -1] == ord("\n")).all()):
        return None
    if not ((digits >= ord("0")) & (digits <= ord("1"))).all():
        return None
    return digits - np.uint8(ord("0"))  # a new, writable array (frombuffer's is read-only)


def _decode_amat_lines(data: bytes, file: Path) -> np.ndarray:
    """Parse any whitespace-separated layout line by line, raising on the first bad row or value."""
    lines = data.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    pixels = np.empty((len(lines), NUM_PIXELS), dtype=np.uint8)
    for row, line in enumerate(lines):
        tokens = line.split()
        if len(tokens) != NUM_PIXELS:
            raise ValueError(
                f"{file}: row {row} (line {row + 1}) has {len(tokens)} values, expected {NUM_PIXELS}; "
                f"an .amat file holds {_AMAT_VALUE_LAYOUT}"
            )
        joined = b"".join(tokens)
        codes = np.frombuffer(joined, dtype=np.uint8) if len(joined) == NUM_PIXELS else None
        if codes is None or not ((codes >= ord("0")) & (codes <= ord("1"))).all():
            column = next(i for i, t in enumerate(tokens) if t not in (b"0", b"1"))
            value = tokens[column].decode("ascii", "backslashreplace")
            raise ValueError(
                f"{file}: row {row} (line {row + 1}), column {column}: value {value!r} is not 0 or 1"
            )
        pixels[row] = codes - np.uint8(ord("0"))
    return pixels


def _read_npz(file: Path, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    # Why allow_pickle=False: a data file must never be able to run code when loaded.
    try:
        archive = np.load(file, allow_pickle=False)
    except Exception as error:  # np.load raises EOFError, BadZipFile, ValueError... for bad files
        problem = "is empty" if file.stat().st_size == 0 else f"is not a readable .npz file ({load_error_reason(error)})"
        raise ValueError(f"{file} {problem}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):  # an .npy array under an .npz name
        raise ValueError(f"{file} holds a single array, not an .npz archive of arrays {', '.join(map(repr, splits))}")
    with archive:
        missing = [split for split in splits if split not in archive.files]
        if missing:
            raise KeyError(
                f"{file} has no array {', '.join(repr(s) for s in missing)}; "
                f"arrays present: {sorted(archive.files)}"
            )
        return {split: _to_pixels(_load_array(archive, split, file), f"{file} [{split!r}]") for split in splits}


def _load_array(archive: np.lib.npyio.NpzFile, key: str, file: Path) -> np.ndarray:
    try:
        return archive[key]
    # ValueError: e.g. an object array, refused because pickles are disallowed. The archive reads each
    # array when it is asked for, so a damaged member fails here: a bad CRC (BadZipFile), a broken
    # compressed stream (zlib.error, an OSError), a truncated member (EOFError).
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{file} [{key!r}] cannot be read: {load_error_reason(error)}") from error


def _to_pixels(array: np.ndarray, where: str) -> np.ndarray:
    """Turn a packed (N, 98) uint8 or unpacked (N, 784) 0/1 array into uint8 (N, 784), or raise."""
    expected = f"(N, {NUM_PIXELS}) of 0/1, or (N, {_PACKED_COLUMNS}) uint8 from np.packbits(axis=1)"
    if array.ndim != 2 or array.shape[1] not in (NUM_PIXELS, _PACKED_COLUMNS):
        raise ValueError(f"{where} has shape {array.shape}, expected {expected}")
    if array.shape[0] == 0:
        raise ValueError(f"{where} has no rows (shape {array.shape})")
    if array.shape[1] == _PACKED_COLUMNS:
        # Why insist on uint8: packbits always yields uint8, so a 98-column array of another dtype
        # is not packed data, and unpacking it would silently produce garbage.
        if array.dtype != np.uint8:
            raise ValueError(f"{where} has shape {array.shape} and dtype {array.dtype}, expected {expected}")
        # Why ascontiguousarray: unpackbits returns the pixels column-major here, and every consumer
        # reads rows (batches, shards), which would then touch 784 cache lines per row.
        return np.ascontiguousarray(np.unpackbits(array, axis=1)[:, :NUM_PIXELS])
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where} has dtype {array.dtype}; expected bool, integer or float 0/1 values")
    bad = (array != 0) & (array != 1)  # NaN counts as bad: it differs from both
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(f"{where}: row {row}, column {column}: value {array[row, column].item()} is not 0 or 1")
    return array.astype(np.uint8)
