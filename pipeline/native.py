"""The C kernels beside this file (`pipeline/*.c`), built with the machine's C compiler and loaded with ctypes.

A kernel is compiled on first use, for the CPU it runs on (-march=native), into a cache directory,
and reused by later processes: the library's name carries a hash of the source and the headers
beside it (the shared vector type, pipeline/vectors.h), the compile
command, the compiler's version and the CPU's model and flags, so a changed kernel, compiler or
node type gets its own build. Ranks that build at once each write a private file and rename it
into place, so none loads a half-written library.

No compiler, a failed build, or RWS_NATIVE=0 in the environment: `load_library` warns (except for
RWS_NATIVE=0) and returns None, and callers take torch's own ops. torch.compile on a CPU needs the
same compiler, so a machine that compiles the training step builds these kernels too.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    """$RWS_CACHE_DIR, else $XDG_CACHE_HOME/rws, else ~/.cache/rws."""
    if os.environ.get("RWS_CACHE_DIR"):
        return Path(os.environ["RWS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rws"


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """pipeline/<name>.c as a loaded library, built if needed; None (with a warning) if it cannot be built."""
    if os.environ.get("RWS_NATIVE", "1") == "0":
        return None
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    try:
        if shutil.which(compiler) is None:
            raise OSError(f"no C compiler {compiler!r} on PATH (set CC to choose one)")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(
            "\0".join([_source_text(source), compiler, *FLAGS, version, _cpu_identity()]).encode()
        ).hexdigest()[:16]
        library = cache_dir() / f"{name}-{key}.so"
        if not library.exists():
            _build(compiler, source, library)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"rws: cannot build {source} ({error}); torch's own ops run instead", RuntimeWarning, stacklevel=2)
        return None


def padded(t: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """A fresh contiguous [rows, columns] copy of t [r, c], zeros past its end: a kernel's operand,
    padded to its blocks, which it may write into."""
    out = t.new_zeros(rows, columns)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _source_text(source: Path) -> str:
    """The kernel's source and the headers beside it (pipeline/*.h), which it may include."""
    headers = sorted(source.parent.glob("*.h"))
    return "\0".join(path.read_text() for path in [source, *headers])


def _build(compiler: str, source: Path, library: Path) -> None:
    """Compile `source` into `library`, atomically (a private file renamed into place)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=library.stem, suffix=".so.partial", dir=library.parent)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", partial], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model name and feature flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    fields = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(line for line in info.splitlines()[:64] if line.startswith(fields))
