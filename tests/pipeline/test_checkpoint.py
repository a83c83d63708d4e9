"""pipeline.checkpoint: sharded DCP checkpoints, atomic commits, verification, retention, safety."""

import io
import json
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline import checkpoint as ckpt

from ..assertions import assert_same_state
from ..ports import free_port


def nested_state() -> dict:
    """Everything a Lightning checkpoint holds: int dict keys, tuples, None, inf, odd key characters."""
    generator = torch.Generator().manual_seed(0)
    return {
        "epoch": 3,
        "state_dict": {"layer.weight": torch.randn(4, 3, generator=generator), "layer.bias": torch.zeros(4, dtype=torch.float64)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(4, 3, generator=generator)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}],
            }
        ],
        "callbacks": {"ModelCheckpoint{'monitor': 'val/ll'}": {"best_model_score": torch.tensor(-90.5), "path": "a/b.ckpt"}},
        "extras": {"inf": float("inf"), "flag": True, "empty": torch.empty(0, 5), "bytes": torch.arange(5, dtype=torch.uint8),
                   "half": torch.ones(2, dtype=torch.bfloat16), "mask": torch.tensor([True, False]), "nested": [[1, 2], ()]},
    }  # fmt: skip


def test_round_trip_keeps_structure_types_and_bits(tmp_path):
    state = nested_state()
    per_rank = {"rng": ckpt.rng_state(), "data": {"epoch": 2, "batches_consumed": 17}}
    path = ckpt.save(tmp_path, "step000000010", state, per_rank, step=10, epoch=3, score=-90.5).wait()
    assert path == tmp_path / "step000000010"
    loaded = ckpt.load(path)
    assert_same_state(loaded.shared, state)
    assert_same_state(loaded.ranks[0]["data"], per_rank["data"])
    assert loaded.marker["step"] == 10 and loaded.marker["epoch"] == 3 and loaded.marker["score"] == -90.5
    assert set(loaded.marker["files"]) == {".metadata", "__0_0.distcp", "tree.json", "rank0.json"}


def test_rng_state_restores_torch_numpy_python():
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(2), random.random())
    ckpt.set_rng_state(state)
    second = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


@pytest.mark.parametrize("value, type_name", [(Path("x"), "PosixPath"), ({1, 2}, "set"), (np.float32(1.0), "float32")])
def test_unsupported_values_are_errors_naming_the_key(tmp_path, value, type_name):
    with pytest.raises(ckpt.CheckpointError, match=rf"callbacks/cb/odd.*{type_name}"):
        ckpt.save(tmp_path, "bad", {"callbacks": {"cb": {"odd": value}}}, step=1)
    assert not ckpt.list_complete(tmp_path)


def test_shared_keys_may_not_look_like_rank_keys(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="rank3"):
        ckpt.save(tmp_path, "bad", {"rank3": 1}, step=1)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["data_written", "marker_written"])
def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, stage):
    ckpt.save(tmp_path, "step000000010", {"w": torch.ones(3)}, step=10)

    def fault(at, path):
        if at == stage:
            raise Crash(f"killed at {at}")

    with pytest.raises(Crash):
        ckpt.save(tmp_path, "step000000020", {"w": torch.full((3,), 2.0)}, step=20, fault_hook=fault)
    assert (tmp_path / "step000000020.partial").is_dir()  # the interrupted save, invisible
    assert not (tmp_path / "step000000020").exists()
    assert (tmp_path / "step000000020.partial" / ckpt.MARKER).exists() == (stage == "marker_written")
    assert [info.step for info in ckpt.list_complete(tmp_path)] == [10]
    latest = ckpt.latest_complete(tmp_path)
    assert latest.step == 10 and torch.equal(ckpt.load(latest.path).shared["w"], torch.ones(3))
    # The next save clears the stale .partial directory.
    ckpt.save(tmp_path, "step000000030", {"w": torch.full((3,), 3.0)}, step=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step000000010", "step000000030"]


@pytest.fixture()
def two_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        ckpt.save(root, f"step{step:09d}", {"w": torch.randn(1000)}, {"r": torch.arange(3)}, step=step)
    return root


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_damaged_shard_and_auto_falls_back(two_checkpoints, damage):
    shard = two_checkpoints / "step000000020" / "__0_0.distcp"
    if damage == "flip":
        _flip_byte(shard)
        message = "sha256 differs"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
        message = "truncated"
    else:
        shard.unlink()
        message = "missing"
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard}.*{message}"):
        ckpt.verify(shard.parent)
    with pytest.raises(ckpt.CheckpointError, match=str(shard)):
        ckpt.load(shard.parent)
    skipped = []
    latest = ckpt.latest_complete(two_checkpoints, on_skip=lambda path, error: skipped.append((path, str(error))))
    assert latest.step == 10
    assert skipped[0][0] == shard.parent and str(shard) in skipped[0][1]


def test_corrupt_marker_and_json_are_named(two_checkpoints):
    marker = two_checkpoints / "step000000020" / ckpt.MARKER
    marker.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=str(marker)):
        ckpt.verify(marker.parent)
    skipped = []
    latest = ckpt.latest_complete(two_checkpoints, on_skip=lambda path, error: skipped.append((path, str(error))))
    assert latest.step == 10  # no valid marker: not listed, and the caller is told which file and why
    assert [path for path, _ in skipped] == [marker.parent] and f"{marker}: unreadable or corrupt" in skipped[0][1]
    (two_checkpoints / "notes").mkdir()  # no marker at all: not a checkpoint, nothing to say
    skipped.clear()
    assert [info.step for info in ckpt.list_complete(two_checkpoints, on_skip=lambda *args: skipped.append(args))] == [10]
    assert [path for path, _ in skipped] == [marker.parent]
    tree = two_checkpoints / "step000000010" / "tree.json"
    tree.write_text(tree.read_text().replace("@t", "@x"))
    with pytest.raises(ckpt.CheckpointError, match="tree.json"):
        ckpt.verify(tree.parent)


@pytest.mark.parametrize("entry", [None, "abc", {"size": 10}, {"size": "10", "sha256": "0" * 64}])
def test_a_marker_with_an_invalid_file_entry_is_named_and_skipped(two_checkpoints, entry):
    """A marker that parses but holds a bad entry for a file: an error naming the marker and the file, and
    `latest_complete` falls back (it used to end in an AttributeError traceback)."""
    marker = two_checkpoints / "step000000020" / ckpt.MARKER
    data = json.loads(marker.read_text())
    data["files"]["__0_0.distcp"] = entry
    marker.write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"{marker}: the entry of file '__0_0.distcp' is invalid"):
        ckpt.verify(marker.parent)
    skipped = []
    assert ckpt.latest_complete(two_checkpoints, on_skip=lambda *args: skipped.append(args)).step == 10
    assert [path for path, _ in skipped] == [marker.parent]


def test_verify_checks_every_file_the_checkpoint_holds(two_checkpoints):
    """A marker that does not list one of the directory's data files is damaged: that file would go unchecked."""
    marker = two_checkpoints / "step000000020" / ckpt.MARKER
    data = json.loads(marker.read_text())
    del data["files"]["__0_0.distcp"]
    marker.write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"{marker}: does not list __0_0.distcp"):
        ckpt.verify(marker.parent)
    assert ckpt.verify(two_checkpoints / "step000000010")["step"] == 10


def test_retention_keeps_last_n_and_the_best(tmp_path):
    scores = {10: -100.0, 20: -80.0, 30: -95.0, 40: -90.0, 50: -85.0}
    for step, score in scores.items():
        ckpt.save(tmp_path, f"step{step:09d}", {"w": torch.zeros(1)}, step=step, score=score, keep_last=2)
    assert [info.step for info in ckpt.list_complete(tmp_path)] == [20, 40, 50]  # the best (20) + the last two
    ckpt.apply_retention(tmp_path, keep_last=1, mode="min")
    assert [info.step for info in ckpt.list_complete(tmp_path)] == [40, 50]  # mode=min: 40 (-90) is the lowest left
    assert not any(p.name.endswith((ckpt.DELETING, ckpt.PARTIAL)) for p in tmp_path.iterdir())


def _save_epochs(root: Path, epochs_and_steps, keep_last: int | None = None, tag: float = 0.0) -> None:
    """Checkpoints named as `rws fit` names them, each holding `tag` so a rewrite is recognizable."""
    for epoch, step in epochs_and_steps:
        name = f"epoch{epoch:04d}-step{step:09d}"
        ckpt.save(root, name, {"tag": torch.tensor(tag)}, step=step, epoch=epoch, keep_last=keep_last)


@pytest.mark.parametrize(
    "branch",
    [
        [(2, 30), (3, 40)],  # resumed from step 20: the same names, rewritten
        [(2, 24), (3, 28)],  # resumed from step 20 with 4 steps per epoch instead of 10: smaller steps
    ],
    ids=["same-steps", "fewer-steps-per-epoch"],
)
def test_retention_after_resuming_an_older_checkpoint_keeps_the_new_timeline(tmp_path, branch):
    _save_epochs(tmp_path, [(0, 10), (1, 20), (2, 30), (3, 40)])
    for written, (epoch, step) in enumerate(branch, start=1):
        _save_epochs(tmp_path, [(epoch, step)], keep_last=1, tag=1.0)
        infos = ckpt.list_complete(tmp_path)
        assert [(info.epoch, info.step) for info in infos] == [(epoch, step)]  # the abandoned step 40 is gone
        latest = ckpt.latest_complete(tmp_path)
        assert latest.step == step and ckpt.load(latest.path).shared["tag"].item() == 1.0
        assert ckpt.find_checkpoints(tmp_path.parent)[-1].path == latest.path  # `rws checkpoint` agrees
        assert latest.marker["seq"] == 4 + written


def test_write_order_reads_markers_without_a_sequence_number(tmp_path):
    _save_epochs(tmp_path, [(0, 10), (1, 20)])
    for name, when in (("epoch0000-step000000010", 200.0), ("epoch0001-step000000020", 100.0)):
        marker_path = tmp_path / name / ckpt.MARKER
        marker = json.loads(marker_path.read_text())
        del marker["seq"]  # as written before sequence numbers; COMPLETE is not in its own file list
        marker_path.write_text(json.dumps({**marker, "time": when}))
    _save_epochs(tmp_path, [(1, 14)])
    # Old markers by their time, before every numbered one; numbering goes on from 1.
    assert [info.step for info in ckpt.list_complete(tmp_path)] == [20, 10, 14]
    assert ckpt.list_complete(tmp_path)[-1].marker["seq"] == 1


def test_retention_never_removes_the_checkpoint_just_written(tmp_path):
    ckpt.save(tmp_path, "a", {"w": torch.zeros(1)}, step=1, score=-10.0)
    ckpt.save(tmp_path, "b", {"w": torch.zeros(1)}, step=2, score=-20.0, keep_last=0)  # keep only the best...
    assert [info.path.name for info in ckpt.list_complete(tmp_path)] == ["a", "b"]  # ...and what was just written


def test_async_save_snapshots_the_state_before_returning(tmp_path):
    weights = torch.randn(100, 100)
    expected = weights.clone()
    pending = ckpt.save(tmp_path, "step000000001", {"w": weights}, step=1, async_save=True)
    weights.add_(1.0)  # training goes on while the background thread writes
    path = pending.wait()
    assert torch.equal(ckpt.load(path).shared["w"], expected)


def test_consolidate_refuses_a_directory_and_replaces_a_file(two_checkpoints, tmp_path):
    source = two_checkpoints / "step000000020"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ckpt.CheckpointError, match=rf"{out}: is a directory"):
        ckpt.consolidate(source, out)
    assert list(tmp_path.glob(".*.tmp")) == []
    (out / "model.pt").write_text("old")
    ckpt.consolidate(source, out / "model.pt")
    assert torch.load(out / "model.pt", weights_only=True)[ckpt.CONSOLIDATED_INFO]["step"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]


def test_atomic_write_leaves_no_temporary_file_when_it_fails(tmp_path):
    from pipeline.fileio import atomic_write

    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "taken", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_consolidate_is_a_weights_only_file(two_checkpoints, tmp_path):
    source = two_checkpoints / "step000000020"
    out = ckpt.consolidate(source, tmp_path / "out" / "model.pt")
    single = torch.load(out, weights_only=True)
    loaded = ckpt.load(source, ranks=[0])
    assert torch.equal(single["w"], loaded.shared["w"])
    assert torch.equal(single[ckpt.CONSOLIDATED_RANKS]["rank0"]["r"], torch.arange(3))
    assert single[ckpt.CONSOLIDATED_INFO]["step"] == 20 and "files" not in single[ckpt.CONSOLIDATED_INFO]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RWS_TEST_PWNED']}",))


def _reseal(path: Path) -> None:
    """Recompute COMPLETE's hashes, as an attacker would: the reader itself must refuse the file."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    for name in marker["files"]:
        marker["files"][name] = {"size": (path / name).stat().st_size, "sha256": ckpt.sha256_file(path / name)}
    (path / ckpt.MARKER).write_text(json.dumps(marker))


def _shard_items(path: Path):
    """(metadata, [(file, offset, length)]) of a checkpoint's tensor data."""
    metadata = ckpt.SafeFileSystemReader(path).read_metadata()
    return metadata, [(info.relative_path, info.offset, info.length) for info in metadata.storage_data.values()]


@pytest.mark.parametrize("content", [os.urandom(5000), b"\x89PNG\r\n\x1a\n" + bytes(200)], ids=["random", "png"])
def test_a_foreign_file_is_one_line_that_never_suggests_unsafe_loading(tmp_path, content):
    """torch's own message for such a file is a paragraph that suggests weights_only=False."""
    path = tmp_path / "foreign.ckpt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=r"foreign\.ckpt is not a readable checkpoint") as refused:
        ckpt.read_file(path)
    message = str(refused.value)
    assert "\n" not in message and "weights_only" not in message, message


def test_loading_never_runs_pickled_code(two_checkpoints, tmp_path, monkeypatch):
    path = two_checkpoints / "step000000020"
    for name in ("tree.json", "rank0.json", ckpt.MARKER):
        json.loads((path / name).read_text())  # plain JSON
    _, items = _shard_items(path)
    for name, offset, length in items:  # every item of the shards is a tensor that weights_only reads
        data = (path / name).read_bytes()[offset : offset + length]
        assert isinstance(torch.load(io.BytesIO(data), weights_only=True), torch.Tensor)

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("RWS_TEST_PWNED", str(pwned))
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    _reseal(path)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata.*refusing to load posix\.system"):
        ckpt.load(path)
    assert not pwned.exists()

    # A shard item that pickles code (the metadata pointing at it) is refused by DCP's weights_only read.
    path = two_checkpoints / "step000000010"
    metadata, _ = _shard_items(path)
    buffer = io.BytesIO()
    torch.save(_Payload(), buffer)
    (path / "__0_0.distcp").write_bytes(buffer.getvalue())
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, len(buffer.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(path)
    with pytest.raises(ckpt.CheckpointError, match="Weights only load failed"):
        ckpt.load(path)
    assert not pwned.exists()


def test_bytes_entries_in_metadata_are_refused(tmp_path):
    # DCP would torch.load a bytes entry without weights_only: this format never has one.
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(2), "blob": io.BytesIO(b"anything")}, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load .*BytesStorageMetadata"):
        ckpt.SafeFileSystemReader(tmp_path).read_metadata()


def test_list_and_find_ignore_partial_deleting_and_foreign_dirs(two_checkpoints):
    (two_checkpoints / "step000000030.partial").mkdir()
    (two_checkpoints / "step000000005.deleting").mkdir()
    (two_checkpoints / "notes").mkdir()
    assert [info.step for info in ckpt.list_complete(two_checkpoints)] == [10, 20]
    assert [info.step for info in ckpt.find_checkpoints(two_checkpoints.parent)] == [10, 20]
    assert ckpt.find_checkpoints(two_checkpoints / "step000000010")[0].step == 10
    assert ckpt.latest_complete(two_checkpoints / "nothing-here") is None


# ---- two processes: per-rank keys, replicated tensors written once, resharding to one process


def _two_rank_save(rank: int, root: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # every rank has its own RNG stream
        shared = {"model": {"w": torch.arange(12.0).reshape(3, 4), "big": torch.ones(1000)}, "step": 5}
        per_rank = {"rng": ckpt.rng_state(), "data": {"batches_consumed": 10 + rank}, "marker": torch.full((2,), float(rank))}
        group = dist.new_group(backend="gloo")
        ckpt.save(root, "step000000005", shared, per_rank, step=5, process_group=group, async_save=rank == 1).wait()
        # Collective load on the same layout: every rank gets its own state back.
        loaded = ckpt.load(Path(root) / "step000000005")
        assert loaded.ranks[rank]["data"]["batches_consumed"] == 10 + rank
        assert torch.equal(loaded.ranks[rank]["rng"]["torch"], per_rank["rng"]["torch"])
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_in_parallel_per_rank_keys_and_reshard_to_one(tmp_path):
    mp.start_processes(_two_rank_save, args=(str(tmp_path), free_port()), nprocs=2, join=True, start_method="fork")
    path = tmp_path / "step000000005"
    marker = ckpt.verify(path)
    assert marker["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", "rank0.json", "rank1.json"} <= set(marker["files"])
    metadata = ckpt.SafeFileSystemReader(path).read_metadata()
    files = {index.fqn: info.relative_path for index, info in metadata.storage_data.items()}
    assert {key for key in files if key.startswith("rank0/")} == {"rank0/rng/torch", "rank0/rng/numpy/keys", "rank0/rng/python/state", "rank0/marker"}
    assert files["rank0/marker"] == "__0_0.distcp" and files["rank1/marker"] == "__1_0.distcp"  # each rank writes its own
    assert len([index for index in metadata.storage_data if index.fqn == "model/big"]) == 1  # replicated: written once
    # One process reads both ranks' states (e.g. to consolidate, or a 2 -> 1 resume).
    loaded = ckpt.load(path, ranks=[0, 1])
    assert loaded.shared["step"] == 5 and torch.equal(loaded.shared["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert [loaded.ranks[r]["data"]["batches_consumed"] for r in (0, 1)] == [10, 11]
    assert [loaded.ranks[r]["marker"][0].item() for r in (0, 1)] == [0.0, 1.0]
    assert not torch.equal(loaded.ranks[0]["rng"]["torch"], loaded.ranks[1]["rng"]["torch"])  # not de-duplicated
    assert ckpt.load(path).ranks.keys() == {0}  # one process, default: rank 0's state


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
