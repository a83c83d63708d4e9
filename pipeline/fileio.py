"""Durable file writes and checksums shared by data shards and checkpoints."""

import hashlib
import os
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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
