"""Durable file writes, checksums and load-error wording shared by data files, shards and checkpoints."""

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

_HASH_CHUNK = 1 << 20


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one.

    Write-then-rename: the bytes go to a temporary file beside `path` (named by pid, so concurrent
    writers do not collide), are fsynced, then renamed over `path`; the fsync makes the rename
    durable only after the content. On any failure (disk full, `path` a directory, an interrupt)
    the temporary file is removed, so none is left behind, and the error propagates.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> None:
    """OSError if no file can be created beside `path`, as `atomic_write` will: for a check before long work."""
    with tempfile.TemporaryFile(dir=path.parent):
        pass


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_error_reason(error: BaseException) -> str:
    """Why a safe loader refused a file, in one line, without the loader's advice to load it unsafely.

    torch.load(weights_only=True) and np.load(allow_pickle=False) answer a foreign file with a
    paragraph that ends by suggesting the safety be turned off; this project never does that, so the
    reason is said in its own words. Any other error is its type and first line.
    """
    message = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) and message.startswith("Weights only load failed"):
        return "not a torch file of tensors and plain values; objects that would run code are never unpickled"
    if isinstance(error, ValueError) and "allow_pickle" in message:
        return "neither an .npz archive nor an .npy array, and pickled data is never loaded"
    first_line = message.splitlines()[0] if message else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
