"""Binarized MNIST as WebDataset tar shards: writing, the index, locating, reading and streaming.

Layout written by `prepare_split` (driven by `rws data prepare`):

    DIR/index.json            shard names, sample counts, byte sizes and sha256 per split
    DIR/train-000000.tar      one tar member per image: `train-00000000.bits`, the 98 bytes of
    DIR/train-000001.tar      np.packbits(pixels) (784 pixels, row-major, most significant bit first);
    ...                       WebDataset groups members by key, so the sample is {__key__, bits}
    DIR/valid-000000.tar ...

The training stream (`ShardStream`, wrapped by `StreamingLoader`) reads those shards from a
directory, a brace pattern or URLs (`file://`, `http(s)://`, `pipe:COMMAND`, opened with
webdataset's `gopen`) and yields uint8 batches [B, 784] of 0/1.

The epoch plan (`plan_consumer`) is a pure function of the index's sample counts and of
(seed, epoch, dp_rank, dp_size, batch_size, num_workers, worker):

    1. the shards are permuted by (seed, epoch) -- the same permutation on every rank;
    2. their samples, concatenated in that order, are cut into dp_size contiguous ranges of
       exactly `batches_per_rank = total // (dp_size * batch_size)` batches each; the
       `total - dp_size * batches_per_rank * batch_size` samples at the end of the concatenation
       (fewer than dp_size * batch_size; they change with the epoch's permutation) are dropped;
    3. a rank's range is cut into num_workers contiguous runs of whole batches, one per
       DataLoader worker; each worker shuffles its run through a buffer.

So every rank yields the same number of batches (DDP never waits on a rank that ran out), each
kept sample is seen exactly once per epoch, and ranks of one sample group (same dp_rank) see
identical batches. The price: a shard at the boundary of two ranges is read by both consumers
(each keeps its part), i.e. at most dp_size * num_workers - 1 extra shard reads per epoch.

Errors: every shard is read whole and checked (tar structure, sample count and sha256 against
the index) before any of its samples is used, so a corrupt shard either raises `ShardError`
naming the shard and the reason, or (on_error="skip") contributes nothing; its quota is then
filled from the shards that follow in the epoch order, so batch counts stay equal.

Nothing here imports Lightning; torch is used for the IterableDataset/DataLoader plumbing and the batches.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import struct
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from pipeline.data import NUM_PIXELS, SPLITS, _read_amat, load_binarized_mnist
from pipeline.fileio import atomic_write

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "rws-binarized-mnist-shards"
INDEX_VERSION = 1
FIELD = "bits"  # the tar member extension that holds one packed image
ROW_BYTES = NUM_PIXELS // 8  # 98: np.packbits of 784 pixels, no padding
# Why a fixed mtime: tar headers carry one, and with the wall clock two runs over the same data
# would write different bytes (and sha256s), breaking idempotence and reproducibility.
_TAR_MTIME = 0
OnError = Literal["raise", "skip"]


class ShardError(ValueError):
    """A shard (or the index) is missing, truncated, corrupt, or disagrees with the index.

    A ValueError, so the `rws` command prints it as one line. The message always starts with the
    shard's URL and states the reason.
    """


# ------------------------------------------------------------------------------------------------
# Sources: whatever the user has -> {split: packed uint8 [N, 98]}


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
            raise ValueError(f"{path} is not a readable .npz file ({error})") from error
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


def _is_idx(path: Path) -> bool:
    # Why sniff the magic number: IDX files come named `train-images-idx3-ubyte`, `*.idx`, gzipped or not.
    if path.suffix.lower() in (".npz", ".amat"):
        return False
    try:
        with _open_maybe_gzip(path) as file:
            magic = file.read(4)
    except OSError:
        return False
    return len(magic) == 4 and int.from_bytes(magic, "big") in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read a (possibly gzipped) MNIST IDX images file as greyscale uint8 [N, 784] in 0..255."""
    path = Path(path)
    with _open_maybe_gzip(path) as file:
        data = file.read()
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


# ------------------------------------------------------------------------------------------------
# Writing: packed rows -> staged tar shards -> atomically published shards + index


@dataclass(frozen=True)
class PrepareResult:
    split: str
    count: int
    shards: tuple[str, ...]  # file names, in order
    written: bool  # False: the shards on disk were already up to date


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(split: str, row: int) -> str:
    # Why the row number in the key: a stream can be traced back to the source row, and tests can
    # check exactly-once coverage from keys.
    return f"{split}-{row:08d}"


def prepare_split(
    out_dir: str | os.PathLike,
    split: str,
    packed: np.ndarray,
    shard_size: int,
    *,
    source: str = "",
    progress: Callable[[int], None] | None = None,
) -> PrepareResult:
    """Write packed rows [N, 98] of one split as `split-NNNNNN.tar` shards and list them in the index.

    Idempotent: if the index already lists this split with the same data (sha256 of the rows) and
    shard size, and every listed shard still matches its size and sha256, nothing is written.

    Atomic: shards are written into a staging directory inside `out_dir`; the split is first
    removed from the index, then the finished shards are renamed into place, then the index is
    rewritten with them (each index write is itself a rename). At no moment does the index list
    a shard that is half-written or from another run. A lock file serialises concurrent runs on
    one directory (e.g. train and valid prepared in parallel).

    `progress(n)` is called with the number of samples written since its last call.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    packed = _check_packed(packed, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_sha = hashlib.sha256(packed.tobytes()).hexdigest()
    with _locked(out):
        index = read_local_index(out)
        old = index["splits"].get(split)
        if old and old.get("data_sha256") == data_sha and old.get("shard_size") == shard_size and _shards_intact(out, old):
            if progress:
                progress(len(packed))
            return PrepareResult(split, len(packed), tuple(s["name"] for s in old["shards"]), written=False)
        for stale in out.glob(f".staging-{split}-*"):  # left by a run that crashed
            shutil.rmtree(stale, ignore_errors=True)
        staging = out / f".staging-{split}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            shards = _write_shards(staging, split, packed, shard_size, progress)
            if old:  # unlist the old shards before any of them is replaced
                del index["splits"][split]
                _write_index(out, index)
            for info in shards:
                os.replace(staging / info["name"], out / info["name"])
            new_names = {info["name"] for info in shards}
            for info in old["shards"] if old else ():
                if info["name"] not in new_names:
                    (out / info["name"]).unlink(missing_ok=True)
            index["splits"][split] = {
                "count": len(packed),
                "shard_size": shard_size,
                "data_sha256": data_sha,
                "source": source,
                "shards": shards,
            }
            _write_index(out, index)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(split, len(packed), tuple(info["name"] for info in shards), written=True)


def _check_packed(packed: np.ndarray, split: str) -> np.ndarray:
    packed = np.ascontiguousarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != ROW_BYTES or len(packed) == 0:
        raise ValueError(f"split {split!r}: expected packed uint8 rows [N>0, {ROW_BYTES}], got {packed.dtype} {packed.shape}")
    return packed


def _write_shards(staging: Path, split: str, packed: np.ndarray, shard_size: int, progress) -> list[dict]:
    """Write [N, 98] rows into staging/split-%06d.tar with wds.ShardWriter; return the index entries."""
    pattern = str(staging / f"{split}-%06d.tar")
    # encoder=False: values are raw bytes, stored as is (no pickling, no extension-based encoding).
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=_TAR_MTIME) as writer:
        for row, bits in enumerate(packed):
            writer.write({"__key__": sample_key(split, row), FIELD: bits.tobytes()})
            if progress and (row + 1) % 1000 == 0:
                progress(1000)
    if progress and len(packed) % 1000:
        progress(len(packed) % 1000)
    counts = [min(shard_size, len(packed) - start) for start in range(0, len(packed), shard_size)]
    shards = []
    for number, count in enumerate(counts):
        file = staging / shard_name(split, number)
        data = file.read_bytes()
        shards.append({"name": file.name, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return shards


def _shards_intact(out: Path, entry: dict) -> bool:
    for info in entry.get("shards", []):
        file = out / info["name"]
        if not file.is_file() or file.stat().st_size != info["bytes"]:
            return False
        if hashlib.sha256(file.read_bytes()).hexdigest() != info["sha256"]:
            return False
    return True


@contextlib.contextmanager
def _locked(out: Path):
    with open(out / ".index.lock", "a") as lock:  # "a": taking the lock must not modify the file
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _empty_index() -> dict:
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "sample": {
            "key": "<split>-<source row, 8 digits>",
            FIELD: f"{ROW_BYTES} bytes: numpy.packbits of the {NUM_PIXELS} 0/1 pixels (28x28 row-major, MSB first)",
        },
        "splits": {},
    }


def read_local_index(out_dir: str | os.PathLike) -> dict:
    """The index in `out_dir`, or an empty one if there is none yet."""
    file = Path(out_dir) / INDEX_NAME
    if not file.exists():
        return _empty_index()
    return _parse_index(file.read_bytes(), str(file))


def _write_index(out: Path, index: dict) -> None:
    # Atomic: readers (a training job, another prepare) see the old or the new index, never a torn one.
    atomic_write(out / INDEX_NAME, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())


def _parse_index(data: bytes, where: str) -> dict:
    try:
        index = json.loads(data)
    except ValueError as error:
        raise ShardError(f"{where}: the shard index is not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("splits"), dict):
        raise ShardError(f"{where} is not an rws shard index (expected \"format\": \"{INDEX_FORMAT}\" and \"splits\")")
    if index.get("version") != INDEX_VERSION:
        raise ShardError(f"{where}: shard index version {index.get('version')!r}, this code reads version {INDEX_VERSION}")
    return index


# ------------------------------------------------------------------------------------------------
# Locating: a directory, an index URL or a brace pattern -> URLs with their sample counts


@dataclass(frozen=True)
class ShardInfo:
    url: str
    name: str
    count: int  # samples
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """An ordered list of shards with the index's facts about each."""

    shards: tuple[ShardInfo, ...]

    @property
    def counts(self) -> list[int]:
        return [shard.count for shard in self.shards]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return len(self.shards)


@dataclass(frozen=True)
class ShardLocation:
    """Where shards live: shard `name` is at `prefix + name + suffix`; `index` is the parsed index."""

    index: dict
    index_url: str
    prefix: str
    suffix: str
    selected: tuple[str, ...] | None  # shard names picked by a brace pattern, in pattern order

    def url(self, name: str) -> str:
        return f"{self.prefix}{name}{self.suffix}"

    def split(self, split: str) -> ShardSet | None:
        """The shards of `split` in index order, or None if the index has no such split."""
        entry = self.index["splits"].get(split)
        if entry is None:
            return None
        return ShardSet(tuple(self._info(shard) for shard in entry["shards"]))

    def train(self) -> ShardSet:
        """The shards a pattern selected, else the index's `train` split."""
        if self.selected is None:
            shards = self.split("train")
            if shards is None:
                present = ", ".join(self.index["splits"]) or "none"
                raise ShardError(f"{self.index_url} lists no 'train' split (it has: {present})")
            return shards
        by_name = {shard["name"]: shard for entry in self.index["splits"].values() for shard in entry["shards"]}
        unknown = [name for name in self.selected if name not in by_name]
        if unknown:
            raise ShardError(f"{self.url(unknown[0])}: shard {unknown[0]!r} is not listed in the index {self.index_url}")
        return ShardSet(tuple(self._info(by_name[name]) for name in self.selected))

    def _info(self, shard: dict) -> ShardInfo:
        return ShardInfo(self.url(shard["name"]), shard["name"], int(shard["count"]), int(shard["bytes"]), shard["sha256"])


# The last shard file name in a spec: no '/' or whitespace (for `pipe:` commands) or quotes.
_TAR_TOKEN = re.compile(r"[^/\s'\"]+\.tar(?=$|[\s'\"])")
_JSON_TOKEN = re.compile(r"[^/\s'\"]+\.json(?=$|[\s'\"])")


def locate_shards(spec: str) -> ShardLocation:
    """Resolve a `--data.shards` value.

        DIR  or  file:///DIR                       DIR/index.json lists the shards
        .../index.json  (any URL, or pipe:)        the index; shards are next to it
        .../train-{000000..000049}.tar (any URL)   those shards; the index is `index.json` next to them,
                                                   e.g. pipe:aws s3 cp s3://b/d/train-{0..9}.tar -
                                                   reads pipe:aws s3 cp s3://b/d/index.json -

    The index is required: it gives every rank the sample counts needed for equal batch counts.
    """
    spec = spec.strip()
    local = _local_path(spec)
    if local is not None and os.path.isdir(local):
        base = spec.rstrip("/") + "/"
        return _load_location(base + INDEX_NAME, base, "", None)
    json_tokens = list(_JSON_TOKEN.finditer(spec))
    if json_tokens and "{" not in spec:
        token = json_tokens[-1]
        return _load_location(spec, spec[: token.start()], spec[token.end() :], None)
    tar_tokens = list(_TAR_TOKEN.finditer(spec))
    if not tar_tokens:
        if local is not None and not os.path.exists(local):
            raise FileNotFoundError(f"data.shards: {local} does not exist")
        raise ValueError(
            f"data.shards: {spec!r} is neither a directory, an index .json, nor a .tar shard pattern "
            "such as DIR/train-{000000..000009}.tar"
        )
    token = tar_tokens[-1]
    prefix, suffix = spec[: token.start()], spec[token.end() :]
    if "{" in prefix or "{" in suffix:
        raise ValueError(f"data.shards: {spec!r}: brace expressions are supported in the shard file name only")
    names = tuple(_expand_braces(token.group()))
    return _load_location(prefix + INDEX_NAME + suffix, prefix, suffix, names)


def _expand_braces(pattern: str) -> list[str]:
    return list(wds.shardlists.expand_urls(pattern))


def _load_location(index_url: str, prefix: str, suffix: str, selected) -> ShardLocation:
    try:
        data = _read_url(index_url)
    except OSError as error:
        raise ShardError(
            f"{index_url}: cannot read the shard index ({_reason(error)}); shards need the {INDEX_NAME} "
            "that `rws data prepare` writes next to them"
        ) from error
    return ShardLocation(_parse_index(data, index_url), index_url, prefix, suffix, selected)


def _local_path(url: str) -> str | None:
    """The filesystem path of a plain path or file: URL; None for any other scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a Windows drive letter parses as a scheme
        return url
    return None


def _read_url(url: str) -> bytes:
    with contextlib.closing(gopen(url, "rb")) as stream:
        return stream.read()


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing: no such file"
    return f"{type(error).__name__}: {error}"


def check_local_shards(shards: ShardSet) -> list[tuple[str, str]]:
    """(url, reason) for each local shard that is missing or has the wrong size.

    Cheap (one stat per shard), so every rank runs it before training: a missing or truncated
    local file then fails on all ranks alike instead of stopping one rank mid-epoch.
    Remote shards are checked when read.
    """
    problems = []
    for shard in shards.shards:
        path = _local_path(shard.url)
        if path is None:
            continue
        if not os.path.isfile(path):
            problems.append((shard.url, "missing: no such file"))
        elif (size := os.path.getsize(path)) != shard.bytes:
            what = "truncated" if size < shard.bytes else "larger than indexed"
            problems.append((shard.url, f"{what}: {size} bytes, the index says {shard.bytes}"))
    return problems


# ------------------------------------------------------------------------------------------------
# Reading one shard


def read_shard(shard: ShardInfo) -> list[bytes]:
    """All samples of one shard as packed rows (98 bytes each), in order, verified against the index.

    Raises ShardError naming the shard and the reason: missing/unreadable, not a tar archive,
    truncated, a malformed sample, a sample count or sha256 that differs from the index.
    """
    try:
        # Why read the whole shard first: its sha256 must match before any sample is used, and
        # shards are small (about 1 MB per 1000 images).
        with contextlib.closing(gopen(shard.url, "rb")) as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise ShardError(f"{shard.url}: cannot be read ({_reason(error)})") from error
    sha = hashlib.sha256(data).hexdigest()
    intact = sha == shard.sha256
    # Bytes with the indexed sha256 are exactly what `prepare_split` wrote, so the fast parser for
    # that layout is safe on them; anything else goes through tarfile, whose errors say what is wrong.
    rows = _ustar_rows(data) if intact else None
    if rows is None:
        rows = _tarfile_rows(data, shard.url)
    if len(rows) != shard.count:
        raise ShardError(f"{shard.url}: truncated or altered: {len(rows)} samples, the index says {shard.count}")
    if not intact:
        raise ShardError(f"{shard.url}: corrupt: sha256 {sha[:12]}... differs from the index's {shard.sha256[:12]}...")
    return rows


def _is_ours(name: bytes | str) -> bool:
    # WebDataset's rule: the key is the base name up to its first dot, the field is the rest.
    sep, dot = ("/", ".") if isinstance(name, str) else (b"/", b".")
    field = name.rsplit(sep, 1)[-1].partition(dot)[2]
    return field == (FIELD if isinstance(name, str) else FIELD.encode())


def _ustar_rows(data: bytes) -> list[bytes] | None:
    """Rows of a plain ustar archive as TarWriter writes them (about 10x faster than tarfile).

    Each member is a 512-byte header (name at 0, octal size at 124, type at 156, ustar name
    prefix at 345) and its data padded to 512 bytes; a zero block ends the archive. Returns None
    on anything else (long names, pax headers, ...), and the caller falls back to tarfile.
    """
    rows, offset = [], 0
    while offset + 512 <= len(data):
        if data[offset] == 0:  # no name: the end-of-archive block
            return rows
        if data[offset + 156] not in (0x30, 0) or data[offset + 345] != 0:  # not a regular file, or a prefix
            return None
        try:
            size = int(data[offset + 124 : offset + 136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        start = offset + 512
        if _is_ours(data[offset : offset + 100].split(b"\0", 1)[0]):
            if size != ROW_BYTES:
                return None
            rows.append(data[start : start + size])
        offset = start + (size + 511) // 512 * 512
    return None  # no end-of-archive block


def _tarfile_rows(data: bytes, url: str) -> list[bytes]:
    """Rows of any tar archive via tarfile; raises ShardError saying why the bytes are not a valid shard."""
    rows = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not _is_ours(member.name):
                    continue  # other fields (e.g. labels added later) are not ours to read
                payload = tar.extractfile(member).read()
                if len(payload) != ROW_BYTES:
                    raise ShardError(f"{url}: {member.name} has {len(payload)} bytes, expected {ROW_BYTES}")
                rows.append(payload)
    except tarfile.TarError as error:
        raise ShardError(f"{url}: {_tar_reason(error)}") from error
    return rows


def _tar_reason(error: tarfile.TarError) -> str:
    text = str(error)
    if "unexpected end of data" in text:
        return "truncated tar archive (unexpected end of data)"
    if text in ("empty file",):
        return "empty file, not a tar archive"
    return f"not a valid tar archive ({text})"


def unpack_rows(rows: Sequence[bytes] | bytes) -> torch.Tensor:
    """Packed rows (98 bytes each, or their concatenation) -> uint8 tensor [B, 784] of 0/1."""
    joined = rows if isinstance(rows, bytes) else b"".join(rows)
    packed = np.frombuffer(joined, dtype=np.uint8).reshape(-1, ROW_BYTES)  # [B, 98]
    return torch.from_numpy(np.unpackbits(packed, axis=1))  # [B, 784]


def read_split(shards: ShardSet, on_error: OnError = "raise") -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Every sample of `shards` in order, as uint8 [N, 784], plus the (url, reason) of skipped shards.

    For validation/test, which are small and must see every point: read whole into memory.
    """
    rows, skipped = [], []
    for shard in shards.shards:
        try:
            rows.extend(read_shard(shard))
        except ShardError as error:
            if on_error == "raise":
                raise
            skipped.append((shard.url, str(error)))
            log.warning("skipping shard (%d skipped so far): %s", len(skipped), error)
    if not rows:
        raise ShardError(f"no readable shard among {len(shards)} (first: {shards.shards[0].url if len(shards) else 'none'})")
    return unpack_rows(rows), skipped


# ------------------------------------------------------------------------------------------------
# Planning an epoch: pure functions of the index counts and the layout


def _mix(*numbers: int) -> int:
    """A 64-bit seed from several integers (so (seed, epoch, rank, worker) streams are independent)."""
    digest = hashlib.sha256(",".join(str(int(n)) for n in numbers).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard permutation: a function of (seed, epoch) only, so every rank agrees."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng(_mix(seed, epoch)).permutation(num_shards).tolist()


def batches_per_rank(total: int, dp_size: int, batch_size: int) -> int:
    """floor(total / (dp_size * batch_size)): the same on every rank, as DDP requires."""
    return total // (dp_size * batch_size)


def worker_batches(num_batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """(first batch, number of batches) of `worker` among a rank's `num_batches`.

    Workers 0..r-1 get one batch more (r = num_batches % num_workers). That is exactly the share a
    round-robin DataLoader takes from each worker, so batch i of the rank comes from worker i % W.
    """
    base, extra = divmod(num_batches, num_workers)
    count = base + (worker < extra)
    first = worker * base + min(worker, extra)
    return first, count


@dataclass(frozen=True)
class ConsumerPlan:
    """What one (dp_rank, worker) reads in one epoch."""

    pieces: tuple[tuple[int, int, int], ...]  # (shard index, first sample, end sample), in read order
    num_batches: int
    order: tuple[int, ...]  # the epoch's shard order (for refilling after skipped shards)
    last_position: int  # position in `order` of the last piece's shard (-1 if none)


def plan_consumer(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    dp_rank: int,
    dp_size: int,
    batch_size: int,
    num_workers: int = 1,
    worker: int = 0,
    shuffle: bool = True,
) -> ConsumerPlan:
    """The pieces of shards that (dp_rank, worker) reads in `epoch` (see the module docstring)."""
    if not 0 <= dp_rank < dp_size or not 0 <= worker < num_workers or batch_size < 1:
        raise ValueError(
            f"bad layout: dp_rank={dp_rank}, dp_size={dp_size}, worker={worker}, num_workers={num_workers}, "
            f"batch_size={batch_size}"
        )
    order = shard_order(len(counts), seed, epoch, shuffle)
    rank_batches = batches_per_rank(sum(counts), dp_size, batch_size)
    first, num_batches = worker_batches(rank_batches, num_workers, worker)
    start = (dp_rank * rank_batches + first) * batch_size  # in the epoch's concatenated sample order
    stop = start + num_batches * batch_size
    pieces, last_position, offset = [], -1, 0
    for position, shard in enumerate(order):
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
            last_position = position
        offset += counts[shard]
    return ConsumerPlan(tuple(pieces), num_batches, tuple(order), last_position)


def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """WebDataset-style shuffle buffer: emit a random element of a full buffer, refill its slot."""
    if buffer_size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------------
# Streaming


class ShardStream(IterableDataset):
    """One epoch of one data-parallel rank: yields (packed batch | None, skipped, error).

    A packed batch is the B rows' 98-byte encodings concatenated (B * 98 bytes; `unpack_rows`
    makes the uint8 [B, 784] tensor). Why not the tensor: from a DataLoader worker, a 9.8 kB bytes
    object goes down the pipe as is, while a 78 kB tensor is shared through a file-descriptor
    handshake that needs the worker scheduled again (milliseconds per batch on a busy machine).
    `skipped` lists the (url, reason) of shards skipped since the previous item; `error` is a
    ShardError message (then batch is None and the stream ends). Errors travel as items, not
    exceptions, because DataLoader workers would wrap them in a multi-line traceback.

    `skip_batches` resumes mid-epoch: batch i of the rank comes from worker i % W (see
    `worker_batches`), and after skipping k batches the DataLoader asks worker 0 first, so DataLoader
    worker w plays the role of worker (w + k) % W; each worker drops the batches it already gave.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
        shuffle_buffer: int = 10_000,
        shuffle: bool = True,
        on_error: OnError = "raise",
    ):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.shards, self.batch_size = shards, batch_size
        self.dp_rank, self.dp_size, self.seed, self.epoch = dp_rank, dp_size, seed, epoch
        self.skip_batches, self.shuffle_buffer, self.shuffle, self.on_error = skip_batches, shuffle_buffer, shuffle, on_error

    def __iter__(self):
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (physical + self.skip_batches) % num_workers
        skip = self.skip_batches // num_workers + (worker < self.skip_batches % num_workers)
        plan = plan_consumer(
            self.shards.counts, seed=self.seed, epoch=self.epoch, dp_rank=self.dp_rank, dp_size=self.dp_size,
            batch_size=self.batch_size, num_workers=num_workers, worker=worker, shuffle=self.shuffle,
        )  # fmt: skip
        skipped: list[tuple[str, str]] = []
        rows = self._rows(plan, skipped)
        if self.shuffle:
            rows = shuffled(rows, self.shuffle_buffer, random.Random(_mix(self.seed, self.epoch, self.dp_rank, worker)))
        try:
            for number in range(plan.num_batches):
                chunk = [next(rows) for _ in range(self.batch_size)]
                if number < skip:
                    continue  # resuming: this batch was consumed before the checkpoint
                yield b"".join(chunk), skipped[:], None
                skipped.clear()
        except ShardError as error:
            yield None, skipped[:], str(error)

    def _rows(self, plan: ConsumerPlan, skipped: list) -> Iterator[bytes]:
        """Exactly plan.num_batches * batch_size packed rows: the plan's pieces, refilled after skips."""
        needed = plan.num_batches * self.batch_size
        bad: set[int] = set()
        for shard, lo, hi in plan.pieces:
            rows = self._read(shard, bad, skipped)
            if rows is None:
                continue
            piece = rows[lo:hi][:needed]
            needed -= len(piece)
            yield from piece
        # Only after skipped shards: refill from the shards that follow in the epoch order
        # (wrapping around), so this rank still yields its full number of batches.
        order = plan.order[plan.last_position + 1 :] + plan.order[: plan.last_position + 1]
        while needed > 0:
            progress = False
            for shard in order:
                if shard in bad or needed <= 0:
                    continue
                rows = self._read(shard, bad, skipped)
                if rows:
                    piece = rows[:needed]
                    needed -= len(piece)
                    progress = True
                    yield from piece
            if not progress:
                raise ShardError(
                    f"no readable shard left among {len(self.shards)}: skipped {len(bad)}; cannot fill the epoch"
                )

    def _read(self, shard: int, bad: set[int], skipped: list) -> list[bytes] | None:
        try:
            return read_shard(self.shards.shards[shard])
        except ShardError as error:
            if self.on_error == "raise":
                raise
            bad.add(shard)
            skipped.append((self.shards.shards[shard].url, str(error)))
            return None


def _no_collate(item):
    return item


class StreamingLoader:
    """The training loader over shards: a fresh DataLoader per epoch, and the stream position.

    Iterating it once is one epoch of exactly `len(self)` batches (uint8 [B, 784]), the same on
    every data-parallel rank. The epoch number comes from `epoch_fn()` (e.g. the trainer's
    current epoch) if given, else it counts iterations.

    Position: `position()` is {"epoch", "batches_consumed", ...}; `resume(position)` makes the
    next iteration of that epoch skip the consumed batches. By default a batch counts as consumed
    when it is yielded; a caller whose consumer prefetches (Lightning does) passes
    count_on_yield=False and calls `mark_consumed()` when a batch is really used.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        num_workers: int = 0,
        on_error: OnError = "raise",
        epoch_fn: Callable[[], int] | None = None,
        count_on_yield: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.shards, self.batch_size, self.dp_rank, self.dp_size = shards, batch_size, dp_rank, dp_size
        self.seed, self.shuffle_buffer, self.num_workers, self.on_error = seed, shuffle_buffer, num_workers, on_error
        self.epoch_fn, self.count_on_yield = epoch_fn, count_on_yield
        self.num_batches = batches_per_rank(shards.total, dp_size, batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{shards.total} samples in {len(shards)} shard(s) make no full batch of {batch_size} per "
                f"data-parallel rank ({dp_size} ranks)"
            )
        self.epoch, self.consumed = 0, 0
        self._next_epoch, self._pending = 0, None
        self.skipped: dict[str, str] = {}  # url -> reason, for every shard skipped so far (all epochs)
        self.skip_events = 0  # skipped shard reads, counted over all epochs and workers

    def __len__(self) -> int:
        # The full epoch even after a mid-epoch resume: Lightning restores its own batch counter
        # and expects the loader's length to be the epoch's.
        return self.num_batches

    def position(self) -> dict:
        if self._pending is not None:
            epoch, consumed = self._pending["epoch"], self._pending["batches_consumed"]
        else:
            epoch, consumed = self.epoch, self.consumed
        return {
            "epoch": int(epoch),
            "batches_consumed": int(consumed),
            "batches_per_epoch": self.num_batches,
            "batch_size": self.batch_size,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }

    def resume(self, position: dict) -> None:
        """Continue from `position` (from `position()`): skip its consumed batches of its epoch."""
        epoch, consumed = int(position["epoch"]), int(position["batches_consumed"])
        if consumed >= self.num_batches:  # that epoch was finished: start the next one
            epoch, consumed = epoch + 1, 0
        current = self.position()
        keys = ("batch_size", "dp_size", "num_workers", "seed")
        changed = [key for key in keys if key in position and position[key] != current[key]]
        if changed:
            log.warning(
                "resuming the shard stream with different %s than when it was saved: the remaining "
                "batches of the epoch will not be the ones the saved run would have seen", ", ".join(changed)
            )
        self._pending = {"epoch": epoch, "batches_consumed": consumed}
        self._next_epoch = epoch

    def mark_consumed(self) -> None:
        self.consumed += 1

    def _start_epoch(self) -> tuple[int, int]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._next_epoch
        skip = 0
        if self._pending is not None:
            if self._pending["epoch"] == epoch:
                skip = min(self._pending["batches_consumed"], self.num_batches)
            self._pending = None
        self._next_epoch = epoch + 1
        self.epoch, self.consumed = epoch, skip
        return epoch, skip

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, skip = self._start_epoch()
        stream = ShardStream(
            self.shards, batch_size=self.batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.seed,
            epoch=epoch, skip_batches=skip, shuffle_buffer=self.shuffle_buffer, on_error=self.on_error,
        )  # fmt: skip
        # batch_size=None: the stream yields whole packed batches (one bytes object per batch crosses
        # the worker pipe); they are unpacked here, which costs ~50 us per batch of 100.
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_no_collate)
        skipped_this_epoch = 0
        for packed, skipped, error in loader:
            for url, reason in skipped:
                skipped_this_epoch += 1
                self.skip_events += 1
                self.skipped[url] = reason
                log.warning("rank %d: skipped shard (%d this epoch): %s", self.dp_rank, skipped_this_epoch, reason)
            if error is not None:
                raise ShardError(error)
            if self.count_on_yield:
                self.consumed += 1
            yield unpack_rows(packed)  # [B, 784]
        if skipped_this_epoch:
            log.warning(
                "rank %d, epoch %d: %d bad shard read(s) skipped; their samples were replaced by samples of the "
                "following shards",
                self.dp_rank, epoch, skipped_this_epoch,
            )  # fmt: skip
