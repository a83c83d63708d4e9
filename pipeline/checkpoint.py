"""Sharded, atomic, safely loadable checkpoints on `torch.distributed.checkpoint` (DCP).

Framework-free (torch, numpy for its RNG state, and the standard library; no Lightning). A
checkpoint is a nested dict of tensors and plain values, split in two:

- `shared`: the same on every rank (model, optimizers, schedulers, loop counters, ...);
- `per_rank`: this rank's own state (RNG streams, data-stream position, ...).

Layout of one checkpoint directory `ROOT/NAME/`:

    __0_0.distcp, __1_0.distcp ...   tensor data: every rank writes its file in parallel; a tensor
                                     held by several ranks under the same key (replicated
                                     parameters) is written once (DCP de-duplicates by key)
    .metadata                        DCP's index of the tensors (read with a restricted unpickler)
    tree.json                        the structure of `shared` with every non-tensor value
    rank{r}.json                     the structure of rank r's `per_rank` state (its tensors are
                                     DCP keys `rank{r}/...`, so ranks never overwrite each other)
    COMPLETE                         JSON: format, save sequence number (write order within
                                     ROOT), step, epoch, world size, caller metadata (e.g. score)
                                     and the size and sha256 of every other file

Atomicity: every rank writes into `ROOT/NAME.partial/`; once all ranks are done (a collective),
rank 0 writes COMPLETE (fsynced) and renames the directory to `ROOT/NAME`. Only directories with
a valid COMPLETE marker and no `.partial`/`.deleting` suffix are listed, so a crash at any point
of a save leaves the previous checkpoint the latest one; stale `.partial` directories are removed
by the next save.

Safety: nothing is unpickled from a checkpoint except DCP's `.metadata`, and that through an
allow-list of DCP's own metadata classes; tensors are read by DCP with `torch.load(weights_only=
True)`, every other value comes from JSON. Non-tensor values must be int, float, str, bool, None,
or lists, tuples and dicts of them (dict keys: str, int, float, bool or None); anything else is an
error naming its key. `verify` rechecks sizes and sha256 and names the damaged file.

Fault hook (tests only): `save(..., fault_hook=f)` calls `f(stage, path)` at the stages
"data_written" (this rank's files written, before the all-ranks collective) and
"marker_written" (rank 0: COMPLETE written inside the `.partial` directory, before the rename).
A hook that raises or kills the process simulates a crash at that point.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

from pipeline.fileio import atomic_write, load_error_reason, sha256_file

FORMAT = "rws-dcp/1"
MARKER = "COMPLETE"
SHARED_TREE = "tree.json"
PARTIAL = ".partial"
DELETING = ".deleting"
_RANK_TREE = "rank{}.json"
_RANK_KEY = re.compile(r"rank\d+")

FaultHook = Callable[[str, Path], None]

# DCP warns on every single-process save/load ("assuming the intent is to save in a single process").
_SINGLE_PROCESS_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file or key."""


# ------------------------------------------------------------------------------------------------
# nested dict <-> (JSON structure, flat {key: tensor})


def _component(key: Any) -> str:
    # Why "#": quote() escapes "#", so an int key 3 ("#3") never collides with a str key "3".
    return f"#{key}" if isinstance(key, int) and not isinstance(key, bool) else quote(str(key), safe="")


def _describe(path: list[str]) -> str:
    return "/".join(path) or "<root>"


def flatten(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `tree` into a JSON-able structure and its tensors, keyed `prefix` + path.

    Containers are tagged ({"@d": [[key, value], ...]}, {"@l": [...]}, {"@tu": [...]}), tensors
    become {"@t": key, "dtype": ..., "shape": [...]}, plain values stay as they are.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: list[str]) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized:
                raise CheckpointError(f"checkpoint value {_describe(path)}: only dense tensors can be saved")
            key = prefix + "/".join(path)
            tensors[key] = obj.detach()
            return {"@t": key, "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape)}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if not (key is None or isinstance(key, (str, int, float, bool))):
                    raise CheckpointError(
                        f"checkpoint key {key!r} under {_describe(path)} has type {type(key).__name__}; "
                        "keys must be str, int, float, bool or None"
                    )
                items.append([key, walk(value, [*path, _component(key)])])
            return {"@d": items}
        if isinstance(obj, (list, tuple)):
            values = [walk(value, [*path, str(i)]) for i, value in enumerate(obj)]
            return {"@tu": values} if isinstance(obj, tuple) else {"@l": values}
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj  # json writes repr(float) (exact), and NaN/Infinity
        raise CheckpointError(
            f"checkpoint value {_describe(path)} has type {type(obj).__module__}.{type(obj).__qualname__}; "
            "only tensors, int, float, str, bool, None and lists, tuples and dicts of them can be saved"
        )

    return walk(tree, []), tensors


def _tensor_leaves(structure: Any) -> Iterable[dict]:
    if isinstance(structure, dict):
        if "@t" in structure:
            yield structure
        elif "@d" in structure:
            for _, value in structure["@d"]:
                yield from _tensor_leaves(value)
        else:
            for value in structure.get("@l", structure.get("@tu", [])):
                yield from _tensor_leaves(value)


def allocate(structure: Any, where: str = "") -> dict[str, torch.Tensor]:
    """Empty CPU tensors for every tensor leaf of a `flatten` structure (DCP loads in place)."""
    tensors = {}
    for leaf in _tensor_leaves(structure):
        dtype = getattr(torch, str(leaf.get("dtype")), None)
        shape = leaf.get("shape")
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise CheckpointError(f"{where}: bad tensor entry {leaf!r}")
        tensors[leaf["@t"]] = torch.empty(shape, dtype=dtype)
    return tensors


def unflatten(structure: Any, tensors: dict[str, torch.Tensor] | None, where: str = "") -> Any:
    """Inverse of `flatten`; with `tensors` None, every tensor leaf reads as None (the plain values alone)."""
    if isinstance(structure, dict):
        if "@t" in structure:
            if tensors is None:
                return None
            if structure["@t"] not in tensors:
                raise CheckpointError(f"{where}: tensor {structure['@t']!r} is missing")
            return tensors[structure["@t"]]
        if "@d" in structure:
            return {key: unflatten(value, tensors, where) for key, value in structure["@d"]}
        if "@l" in structure:
            return [unflatten(value, tensors, where) for value in structure["@l"]]
        if "@tu" in structure:
            return tuple(unflatten(value, tensors, where) for value in structure["@tu"])
        raise CheckpointError(f"{where}: unknown entry {structure!r}")
    if isinstance(structure, list):
        raise CheckpointError(f"{where}: untagged list {structure!r}")
    return structure


# ------------------------------------------------------------------------------------------------
# RNG state as tensors + plain values


def rng_state() -> dict:
    """This process's RNG states: torch CPU (and CUDA where initialized), numpy, python `random`."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA only where present in both)."""
    import numpy as np

    torch.set_rng_state(state["torch"].to(torch.uint8))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------
# DCP's .metadata through an allow-list


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (os.system, BytesStorageMetadata, ...) is refused."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a DCP tensor-metadata class")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read through an allow-list instead of pickle.load.

    Tensors are read by DCP itself with torch.load(weights_only=True). Non-tensor (bytes) entries
    are refused: this format stores them as JSON, and DCP would torch.load them without
    weights_only.
    """

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({type(error).__name__}: {error})") from error
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({type(entry).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------------------
# files, markers, listing


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data).encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable or corrupt ({type(error).__name__}: {error})") from error


def read_marker(path: str | os.PathLike) -> dict:
    """The COMPLETE marker of checkpoint directory `path`; CheckpointError if missing or invalid."""
    path = Path(path)
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{marker_path}: missing; {path} is not a complete checkpoint (an interrupted save?)")
    marker = _read_json(marker_path)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{marker_path}: not an {FORMAT} completion marker")
    for key, kind in (("step", int), ("world_size", int), ("files", dict)):
        if not isinstance(marker.get(key), kind):
            raise CheckpointError(f"{marker_path}: field {key!r} is missing or invalid")
    for name, entry in marker["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{marker_path}: the entry of file {name!r} is invalid")
    return marker


def _data_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory that its COMPLETE marker lists: all but the marker and temporaries."""
    return [f for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MARKER and not f.name.endswith(".tmp")]


def verify(path: str | os.PathLike) -> dict:
    """Recheck every file of a checkpoint against its COMPLETE marker; returns the marker.

    Raises CheckpointError naming the first missing, truncated or corrupt file.
    """
    path = Path(path)
    marker = read_marker(path)
    required = {".metadata", SHARED_TREE} | {_RANK_TREE.format(r) for r in range(marker["world_size"])}
    required |= {file.relative_to(path).as_posix() for file in _data_files(path)}  # a file it holds is checked too
    for name in sorted(required - set(marker["files"])):
        raise CheckpointError(f"{path / MARKER}: does not list {name}")
    for name, expected in sorted(marker["files"].items()):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path / MARKER}: bad file name {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint {path}")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file}: {size} bytes, the checkpoint recorded {expected['size']} (truncated or corrupt)")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one recorded at save time (corrupt)")
    return marker


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and its marker."""

    path: Path
    marker: dict

    @property
    def step(self) -> int:
        return self.marker["step"]

    @property
    def epoch(self) -> int | None:
        return self.marker.get("epoch")

    @property
    def score(self) -> float | None:
        score = self.marker.get("score")
        return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None

    @property
    def seq(self) -> int:
        """The save sequence number within its directory (0 for markers written before it existed)."""
        seq = self.marker.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0

    @property
    def time(self) -> float:
        """When the marker was written (seconds since the epoch; 0 if it does not say)."""
        when = self.marker.get("time")
        return float(when) if isinstance(when, (int, float)) and math.isfinite(when) else 0.0

    def write_order(self) -> tuple:
        """Sort key, oldest written first: the one definition of "newest" for resuming, retention and the tools.

        Why not the step: a run resumed from an older checkpoint (a branch) or with fewer steps
        per epoch writes smaller steps after larger ones, and its checkpoints are the newest.
        Markers without a sequence number (older versions) sort before all that have one, by time.
        """
        return (self.seq, self.time, self.path.name)


SkipHook = Callable[[Path, CheckpointError], None]


def _read_info(directory: Path, on_skip: SkipHook | None) -> CheckpointInfo | None:
    """The checkpoint in `directory`; None for a directory without a COMPLETE marker (not a
    checkpoint) or with a damaged one, after calling `on_skip(directory, error)`."""
    if not (directory / MARKER).is_file():
        return None
    try:
        return CheckpointInfo(directory, read_marker(directory))
    except CheckpointError as error:
        if on_skip is not None:
            on_skip(directory, error)
        return None


def list_complete(root: str | os.PathLike, on_skip: SkipHook | None = None) -> list[CheckpointInfo]:
    """Complete checkpoints directly under `root`, oldest written first (`CheckpointInfo.write_order`).

    A directory whose COMPLETE marker is damaged is left out after calling `on_skip(path, error)`.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.endswith((PARTIAL, DELETING)):
            info = _read_info(child, on_skip)
            if info is not None:
                found.append(info)
    return sorted(found, key=CheckpointInfo.write_order)


def latest_complete(root: str | os.PathLike, check: bool = True, on_skip: SkipHook | None = None) -> CheckpointInfo | None:
    """The newest written complete checkpoint under `root` that passes `verify` (if `check`), else None.

    A damaged newer one (its marker, or with `check` a data file) is skipped after calling
    `on_skip(path, error)`, so the caller can say so.
    """
    for info in reversed(list_complete(root, on_skip)):
        if not check:
            return info
        try:
            verify(info.path)
        except CheckpointError as error:
            if on_skip is not None:
                on_skip(info.path, error)
            continue
        return info
    return None


def find_checkpoints(path: str | os.PathLike, on_skip: SkipHook | None = None) -> list[CheckpointInfo]:
    """`path` itself if it is a complete checkpoint, else every complete one below it, newest last.

    Sequence numbers only order the checkpoints of one directory: each checkpoint directory's
    list is in write order, and the directories are ordered by when their newest was written.
    """
    path = Path(path)
    if (path / MARKER).is_file():
        return [CheckpointInfo(path, read_marker(path))]
    roots = set()
    for marker in path.rglob(MARKER):
        if not any(part.endswith((PARTIAL, DELETING)) for part in marker.parent.relative_to(path).parts):
            roots.add(marker.parent.parent)
    groups = [group for group in (list_complete(root, on_skip) for root in roots) if group]
    groups.sort(key=lambda group: (group[-1].time, str(group[-1].path)))
    return [info for group in groups for info in group]


def _remove_tree(path: Path) -> None:
    """Rename to `.deleting` first, so a crash mid-removal never leaves a listed, half-deleted checkpoint."""
    target = path
    if not path.name.endswith((PARTIAL, DELETING)):
        target = path.with_name(path.name + DELETING)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.rename(path, target)
    shutil.rmtree(target, ignore_errors=True)


def apply_retention(
    root: str | os.PathLike, keep_last: int | None, mode: str = "max", written: Path | None = None
) -> list[Path]:
    """Remove complete checkpoints except the newest written `keep_last`, the best by score and
    `written` (the checkpoint just saved, whatever the order says); returns the removed."""
    if keep_last is None:
        return []
    infos = list_complete(root)
    keep = {info.path for info in infos[-keep_last:]} if keep_last > 0 else set()
    if written is not None:
        keep.add(Path(written))
    scored = [info for info in infos if info.score is not None]
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda info: (info.score, info.write_order()))
        keep.add(best.path)
    removed = []
    for info in infos:
        if info.path not in keep:
            _remove_tree(info.path)
            removed.append(info.path)
    return removed


# ------------------------------------------------------------------------------------------------
# saving


def _layout(process_group) -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group), True
    return 0, 1, False


def _all_failed(failed: bool, process_group, distributed: bool) -> int:
    """Collective: the number of ranks that failed (also the barrier between the save stages)."""
    if not distributed:
        return int(failed)
    flag = torch.tensor([int(failed)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=process_group)
    return int(flag.item())


def _broadcast_status(failed: bool, process_group, distributed: bool) -> bool:
    if not distributed:
        return failed
    flag = torch.tensor([int(failed)], dtype=torch.int64)
    dist.broadcast(flag, group_src=0, group=process_group)
    return bool(flag.item())


@dataclass
class PendingSave:
    """A save in progress (async) or done (sync); `wait()` returns the final directory or raises."""

    path: Path
    _thread: threading.Thread | None = None
    _error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Path:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.path


def save(
    root: str | os.PathLike,
    name: str,
    shared: dict,
    per_rank: dict | None = None,
    *,
    step: int,
    epoch: int | None = None,
    meta: dict | None = None,
    score: float | None = None,
    keep_last: int | None = None,
    mode: str = "max",
    process_group=None,
    async_save: bool = False,
    fault_hook: FaultHook | None = None,
) -> PendingSave:
    """Write checkpoint `root/name` collectively (every rank of `process_group` must call it).

    `shared` must be identical on all ranks (rank 0's non-tensor values are the ones written);
    `per_rank` is this rank's own state. `meta` (JSON-able) and `score` go into the COMPLETE
    marker; `keep_last` applies `apply_retention` after the commit (the best `score` by `mode` is
    kept too). With `async_save` the tensors are copied to CPU memory, the call returns, and a
    background thread writes them, then commits; call `.wait()` before the next save. For
    `async_save` in a multi-rank job pass a separate (gloo) `process_group`, since the background
    thread runs collectives on it while training uses the default group.
    """
    root = Path(root)
    if not re.fullmatch(r"[A-Za-z0-9_.=-]+", name) or name.endswith((PARTIAL, DELETING)):
        raise CheckpointError(f"bad checkpoint name {name!r}")
    rank, world_size, distributed = _layout(process_group)
    for key in shared:
        if isinstance(key, str) and _RANK_KEY.fullmatch(key):
            raise CheckpointError(f"shared checkpoint key {key!r} is reserved for per-rank state")
    shared_structure, tensors = flatten(shared)
    rank_structure, rank_tensors = flatten(per_rank if per_rank is not None else {}, prefix=f"rank{rank}/")
    tensors.update(rank_tensors)
    final = root / name
    partial = root / (name + PARTIAL)

    # Stage 1: rank 0 clears stale partial/deleting directories (crashed saves), then everyone writes.
    failed = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for child in root.iterdir():
                if child.is_dir() and child.name.endswith((PARTIAL, DELETING)):
                    shutil.rmtree(child, ignore_errors=True)
        except OSError as error:
            failed = error
    if _all_failed(failed is not None, process_group, distributed):
        raise CheckpointError(f"cannot prepare checkpoint directory {partial}: {failed or 'failed on rank 0'}")

    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / _RANK_TREE.format(rank), {"format": FORMAT, "rank": rank, "tree": rank_structure})
    if rank == 0:
        _write_json(partial / SHARED_TREE, {"format": FORMAT, "world_size": world_size, "tree": shared_structure})
    writer = FileSystemWriter(partial, sync_files=True)
    pending = PendingSave(final)
    kwargs = dict(storage_writer=writer, process_group=process_group, no_dist=not distributed)

    def commit(data_future: Future | None) -> None:
        try:
            error = None
            try:
                if data_future is not None:
                    data_future.result()
                if fault_hook is not None:
                    fault_hook("data_written", partial)
            except (Exception, CheckpointException) as caught:  # noqa: BLE001 - reported to every rank below
                error = caught
            failures = _all_failed(error is not None, process_group, distributed)
            if error is not None:
                raise error
            if failures:
                raise CheckpointError(f"saving {final} failed on {failures} other rank(s); the previous checkpoint stays the latest")
            commit_error = None
            if rank == 0:
                try:
                    _commit(root, partial, final, world_size, step, epoch, meta, score, time.time(), fault_hook)
                    if keep_last is not None:
                        apply_retention(root, keep_last, mode, written=final)
                except Exception as caught:  # noqa: BLE001
                    commit_error = caught
            if _broadcast_status(commit_error is not None, process_group, distributed):
                raise commit_error or CheckpointError(f"rank 0 failed to commit {final}")
        except BaseException as caught:  # noqa: BLE001 - re-raised by wait()
            pending._error = caught
        finally:
            pending._done.set()

    if async_save:
        if not distributed:  # the warning is raised in DCP's thread: the filter must be global
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)
        future = dcp.async_save(tensors, **kwargs)
        pending._thread = threading.Thread(target=commit, args=(future,), name=f"rws-checkpoint-{name}", daemon=True)
        pending._thread.start()
    else:
        data_error = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)
                dcp.save(tensors, **kwargs)
        except (Exception, CheckpointException) as caught:  # noqa: BLE001
            data_error = caught
        future = Future()
        if data_error is None:
            future.set_result(None)
        else:
            future.set_exception(data_error)
        commit(future)
        pending.wait()
    return pending


def _next_seq(root: Path) -> int:
    """1 + the largest save sequence number of the complete checkpoints in `root`: records write order."""
    return 1 + max((info.seq for info in list_complete(root)), default=0)


def _commit(root, partial, final, world_size, step, epoch, meta, score, when, fault_hook) -> None:
    files = {
        file.relative_to(partial).as_posix(): {"size": file.stat().st_size, "sha256": sha256_file(file)}
        for file in _data_files(partial)
    }
    marker = {
        "format": FORMAT,
        "name": final.name,
        "seq": _next_seq(root),
        "step": int(step),
        "epoch": None if epoch is None else int(epoch),
        "world_size": world_size,
        "score": None if score is None or not math.isfinite(score) else float(score),
        "time": when,
        "meta": meta or {},
        "files": files,
    }
    _write_json(partial / MARKER, marker)
    _fsync_dir(partial)
    if fault_hook is not None:
        fault_hook("marker_written", partial)
    if final.exists():  # the same step saved again (e.g. after falling back past a damaged one)
        _remove_tree(final)
    os.rename(partial, final)
    _fsync_dir(root)


# ------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the shared dict, the requested ranks' per-rank dicts, the marker."""

    path: Path
    shared: dict
    ranks: dict[int, dict]
    marker: dict

    @property
    def world_size(self) -> int:
        return self.marker["world_size"]


def _read_tree(file: Path) -> Any:
    """The `flatten` structure stored in tree file `file` (tree.json or rankN.json)."""
    stored = _read_json(file)
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an {FORMAT} tree")
    return stored["tree"]


def read_shared_value(path: str | os.PathLike, key: str, tensors_as_none: bool = False) -> Any:
    """`shared[key]` of complete checkpoint directory `path` (None if absent), for a value without
    tensors, such as the hyperparameters: read from tree.json alone, without verifying or reading
    the tensor data, which `load` does. `tensors_as_none`: a value with tensors reads with None in
    their place (a tensor is otherwise a CheckpointError)."""
    path = Path(path)
    read_marker(path)
    entries = dict(_read_tree(path / SHARED_TREE).get("@d", []))
    return unflatten(entries[key], None if tensors_as_none else {}, str(path / SHARED_TREE)) if key in entries else None


def load(
    path: str | os.PathLike,
    ranks: Iterable[int] | None = None,
    *,
    check: bool = True,
    process_group=None,
    no_dist: bool | None = None,
) -> LoadedCheckpoint:
    """Read checkpoint directory `path` (collective when torch.distributed is initialized).

    `ranks`: whose per-rank state to read (default: this rank's if the checkpoint has it, else
    rank 0's; every rank may ask for different ones, e.g. all of them to consolidate). `check`
    verifies sizes and sha256 first. Tensors come back on the CPU; nothing is unpickled except
    DCP's metadata through an allow-list.
    """
    path = Path(path)
    marker = verify(path) if check else read_marker(path)
    rank, _, distributed = _layout(process_group)
    if no_dist is None:
        no_dist = not distributed
    if ranks is None:
        ranks = [rank if rank < marker["world_size"] else 0]
    ranks = sorted(set(ranks))
    structures = {"shared": _read_tree(path / SHARED_TREE)}
    for r in ranks:
        if not 0 <= r < marker["world_size"]:
            raise CheckpointError(f"{path}: has ranks 0..{marker['world_size'] - 1}, no rank {r}")
        structures[r] = _read_tree(path / _RANK_TREE.format(r))
    tensors = {}
    for where, structure in structures.items():
        file = SHARED_TREE if where == "shared" else _RANK_TREE.format(where)
        tensors.update(allocate(structure, str(path / file)))
    if tensors:
        # Read (and so vet) the metadata here first: inside dcp.load a refusal would only show up
        # after DCP's fallback to per-rank metadata files, under a less clear message.
        SafeFileSystemReader(path).read_metadata()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)
                dcp.load(tensors, storage_reader=SafeFileSystemReader(path), process_group=process_group, no_dist=no_dist)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{path}: cannot read the tensor data ({type(error).__name__}: {error})") from error
    shared = unflatten(structures.pop("shared"), tensors, str(path / SHARED_TREE))
    per_rank = {r: unflatten(s, tensors, str(path / _RANK_TREE.format(r))) for r, s in structures.items()}
    return LoadedCheckpoint(path, shared, per_rank, marker)


CONSOLIDATED_RANKS = "rws_ranks"
CONSOLIDATED_INFO = "rws_checkpoint"


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write checkpoint directory `path` as one torch.save file (single process, any world size).

    The file holds the shared dict with two extra keys: CONSOLIDATED_RANKS ({"rank0": ..., ...},
    every rank's state) and CONSOLIDATED_INFO (the marker without its file list). It contains only
    tensors and plain values, so `torch.load(out, weights_only=True)` reads it. An existing file
    `out` is replaced (atomically); an existing directory is an error.
    """
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the output file's name, e.g. {out / 'model.pt'}")
    loaded = load(path, ranks=range(read_marker(path)["world_size"]), no_dist=True)
    for key in (CONSOLIDATED_RANKS, CONSOLIDATED_INFO):
        if key in loaded.shared:
            raise CheckpointError(f"{path}: shared state already has a key {key!r}")
    info = {key: value for key, value in loaded.marker.items() if key != "files"}
    result = {**loaded.shared, CONSOLIDATED_RANKS: {f"rank{r}": s for r, s in loaded.ranks.items()}, CONSOLIDATED_INFO: info}
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(result, buffer)
    atomic_write(out, buffer.getvalue())
    return out


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """A single-file checkpoint (a Lightning `.ckpt`, or a file `consolidate` wrote) as its dict.

    Only tensors and plain values are unpickled (weights_only). A truncated or foreign file is a
    CheckpointError naming it; torch raises many exception types for those.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({load_error_reason(error)})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint
