"""Tests for pipeline.sources, pipeline.shards and pipeline.stream: reading sources, prepare/index/
atomicity/idempotence, locating, splitting, determinism, stream position, and corrupt/truncated/
missing shards in raise and skip modes.

Every image here encodes its own row number in its first 32 pixels (`ids_of`), so a batch says
exactly which source rows it holds: coverage checks need no side channel.
"""

import gzip
import hashlib
import http.server
import itertools
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline import shards as S
from pipeline import sources, stream
from pipeline.data import NUM_PIXELS

B = 4  # batch size of most tests: small, so shard and rank boundaries fall inside batches


def id_rows(n: int, seed: int = 0) -> np.ndarray:
    """Packed rows [n, 98]: bytes 0..3 are the row id (big endian), the rest random."""
    rows = np.random.default_rng(seed).integers(0, 256, size=(n, S.ROW_BYTES), dtype=np.uint8)
    rows[:, :4] = np.frombuffer(np.arange(n, dtype=">u4").tobytes(), dtype=np.uint8).reshape(n, 4)
    return rows


def ids_of(batch: torch.Tensor) -> list[int]:
    """Row ids of a uint8 batch [B, 784] made from `id_rows`."""
    assert batch.dtype == torch.uint8 and batch.shape[1] == NUM_PIXELS
    assert set(batch.unique().tolist()) <= {0, 1}
    packed = np.packbits(batch.numpy(), axis=1)  # [B, 98]
    return [int.from_bytes(row[:4].tobytes(), "big") for row in packed]


def make_shards(directory: Path, n: int, shard_size: int, split: str = "train") -> S.ShardSet:
    S.prepare_split(directory, split, id_rows(n), shard_size)
    return S.locate_shards(str(directory)).split(split)


def epoch_ids(shards: S.ShardSet, **kw) -> list[list[int]]:
    """One epoch of a StreamingLoader as a list of batches of row ids."""
    loader = stream.StreamingLoader(shards, batch_size=kw.pop("batch_size", B), **kw)
    return [ids_of(batch) for batch in loader]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


# ------------------------------------------------------------------------------------------------
# prepare: shards, index, idempotence, atomicity


def test_prepare_writes_webdataset_shards_and_index(tmp_path):
    rows = id_rows(23)
    result = S.prepare_split(tmp_path, "train", rows, shard_size=10, source="unit test")
    assert result.written and result.count == 23
    assert result.shards == ("train-000000.tar", "train-000001.tar", "train-000002.tar")
    index = json.loads((tmp_path / "index.json").read_text())
    entry = index["splits"]["train"]
    assert index["format"] == S.INDEX_FORMAT and entry["count"] == 23 and entry["source"] == "unit test"
    assert [s["count"] for s in entry["shards"]] == [10, 10, 3]
    for shard in entry["shards"]:
        data = (tmp_path / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    # The shards are plain WebDataset: webdataset's own reader sees {__key__, bits} per sample.
    urls = [str(tmp_path / name) for name in result.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(23)]
    assert b"".join(s["bits"] for s in samples) == rows.tobytes()


def test_prepare_is_idempotent_and_deterministic(tmp_path):
    rows = id_rows(25)
    S.prepare_split(tmp_path / "a", "train", rows, 10)
    index_bytes = (tmp_path / "a" / "index.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = S.prepare_split(tmp_path / "a", "train", rows, 10)
    assert not again.written
    assert (tmp_path / "a" / "index.json").read_bytes() == index_bytes
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes
    # Same data into another directory: byte-identical shards (fixed tar mtime, fixed keys).
    S.prepare_split(tmp_path / "b", "train", rows, 10)
    for name in ("train-000000.tar", "train-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # A damaged shard or other parameters are not "up to date": the split is rewritten.
    (tmp_path / "a" / "train-000001.tar").write_bytes(b"junk")
    assert S.prepare_split(tmp_path / "a", "train", rows, 10).written
    assert (tmp_path / "a" / "train-000001.tar").read_bytes() == (tmp_path / "b" / "train-000001.tar").read_bytes()
    assert S.prepare_split(tmp_path / "a", "train", rows, 20).shards == ("train-000000.tar", "train-000001.tar")
    assert not (tmp_path / "a" / "train-000002.tar").exists(), "stale shard of the old layout removed"


def listed_shards_are_intact(directory: Path) -> bool:
    index = json.loads((directory / "index.json").read_text())
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            data = (directory / shard["name"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                return False
    return True


def test_failed_prepare_never_lists_a_partial_shard(tmp_path, monkeypatch):
    S.prepare_split(tmp_path, "train", id_rows(30), 10)
    S.prepare_split(tmp_path, "valid", id_rows(5), 10)

    def crash_mid_write(n):
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):  # dies while writing the staged shards
        S.prepare_split(tmp_path, "train", id_rows(30, seed=1), 7, progress=crash_mid_write)
    assert listed_shards_are_intact(tmp_path)
    assert [s["count"] for s in json.loads((tmp_path / "index.json").read_text())["splits"]["train"]["shards"]] == [10] * 3

    real_replace, calls = os.replace, []

    def crash_while_publishing(src, dst):  # dies after the first new shard replaced an old one
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk vanished")
        real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", crash_while_publishing)
    with pytest.raises(OSError):
        S.prepare_split(tmp_path, "train", id_rows(30, seed=1), 7)
    monkeypatch.undo()
    index = json.loads((tmp_path / "index.json").read_text())
    assert "train" not in index["splits"] and "valid" in index["splits"], "train unlisted while its shards change"
    assert listed_shards_are_intact(tmp_path)
    assert not list(tmp_path.glob(".staging-*")), "staging cleaned up"
    assert S.prepare_split(tmp_path, "train", id_rows(30, seed=1), 7).written  # a re-run completes
    assert listed_shards_are_intact(tmp_path)


# ------------------------------------------------------------------------------------------------
# sources


def write_idx(path: Path, grey: np.ndarray, compress: bool = False) -> Path:
    data = struct.pack(">IIII", 0x803, len(grey), 28, 28) + grey.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_sources_amat_npz_and_idx(tmp_path):
    rng = np.random.default_rng(3)
    pixels = (rng.random((6, NUM_PIXELS)) < 0.4).astype(np.uint8)
    amat = tmp_path / "binarized_mnist_valid.amat"
    amat.write_text("".join(" ".join(map(str, row)) + "\n" for row in pixels.tolist()))
    assert np.array_equal(sources.read_source(amat)["valid"], np.packbits(pixels, axis=1))
    assert np.array_equal(sources.read_source(tmp_path)["valid"], np.packbits(pixels, axis=1))  # directory form
    np.savez(tmp_path / "d.npz", train=pixels, test=np.packbits(pixels, axis=1))
    assert sorted(sources.read_source(tmp_path / "d.npz")) == ["test", "train"]
    assert list(sources.read_source(tmp_path / "d.npz", ["test"])) == ["test"]

    grey = rng.integers(0, 256, size=(50, NUM_PIXELS))
    idx = write_idx(tmp_path / "train-images-idx3-ubyte.gz", grey, compress=True)
    out = sources.read_source(idx, binarize="threshold", threshold=0.5)
    assert np.array_equal(np.unpackbits(out["train"], axis=1), (grey >= 128).astype(np.uint8))
    split = sources.read_source(idx, binarize="threshold", valid_size=10)
    assert len(split["train"]) == 40 and np.array_equal(split["valid"], out["train"][40:])
    same = sources.read_source(idx, binarize="stochastic", seed=7)["train"]
    assert np.array_equal(same, sources.read_source(idx, binarize="stochastic", seed=7)["train"])
    assert not np.array_equal(same, sources.read_source(idx, binarize="stochastic", seed=8)["train"])
    ones = np.unpackbits(same, axis=1).mean()
    assert abs(ones - grey.mean() / 255) < 0.02  # P(pixel = 1) = grey / 255
    test_idx = write_idx(tmp_path / "t10k-images-idx3-ubyte", grey[:5])
    assert list(sources.read_source(test_idx, binarize="threshold")) == ["test"]


def _unbinarized_idx(d: Path) -> Path:
    return write_idx(d / "train-images-idx3-ubyte", np.zeros((2, 784)))


def _labels_idx(d: Path) -> Path:
    path = d / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x801, 1) + b"\0")
    return path


def _truncated_idx(d: Path) -> Path:
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 0x803, 3, 28, 28) + bytes(784))  # says 3 images, holds 1
    return path


def _cut_gzip_idx(d: Path) -> Path:
    """A gzipped IDX file cut in half, as an interrupted download leaves it."""
    path = write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((20, 784)), compress=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _damaged_gzip_idx(d: Path) -> Path:
    """A gzipped IDX file whose compressed stream is overwritten after its header."""
    path = write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((20, 784)), compress=True)
    data = bytearray(path.read_bytes())
    data[12:40] = bytes(28)
    path.write_bytes(bytes(data))
    return path


def _binary_npz(d: Path) -> Path:
    np.savez(d / "p.npz", train=np.zeros((2, 784)))
    return d / "p.npz"


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (_unbinarized_idx, {}, "choose --binarize"),
        (_labels_idx, {"binarize": "threshold"}, "labels file"),
        (_truncated_idx, {"binarize": "threshold"}, "truncated"),
        (_cut_gzip_idx, {"binarize": "threshold"}, r"idx3-ubyte\.gz cannot be read: .*truncated or damaged download"),
        (_damaged_gzip_idx, {"binarize": "threshold"}, r"idx3-ubyte\.gz cannot be read: .*truncated or damaged download"),
        (_binary_npz, {"binarize": "threshold"}, "already binary"),
        (lambda d: d / "nope.npz", {}, "does not exist"),
    ],
)
def test_source_errors_are_clear(tmp_path, make, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sources.read_source(make(tmp_path), **kwargs)


# ------------------------------------------------------------------------------------------------
# locating shards


def test_locate_directory_index_pattern_and_urls(tmp_path):
    make_shards(tmp_path, 25, 10)
    S.prepare_split(tmp_path, "valid", id_rows(4), 10)
    by_dir = S.locate_shards(str(tmp_path))
    assert by_dir.train().counts == [10, 10, 5] and by_dir.split("valid").counts == [4]
    assert by_dir.split("test") is None
    assert S.locate_shards(str(tmp_path / "index.json")).train().counts == [10, 10, 5]
    assert S.locate_shards(f"file://{tmp_path}").train().shards[0].url == f"file://{tmp_path}/train-000000.tar"
    subset = S.locate_shards(f"{tmp_path}/train-{{000001..000002}}.tar")
    assert [s.name for s in subset.train().shards] == ["train-000001.tar", "train-000002.tar"]
    assert subset.split("valid").counts == [4], "eval splits come from the same index"
    piped = S.locate_shards(f"pipe:cat {tmp_path}/train-{{000000..000002}}.tar")
    assert piped.index_url == f"pipe:cat {tmp_path}/index.json"
    piped_ids = flat(epoch_ids(piped.train()))
    assert len(piped_ids) == len(set(piped_ids)) == 24 and set(piped_ids) <= set(range(25))  # 6 batches of 4
    with pytest.raises(S.ShardError, match="not listed in the index"):
        S.locate_shards(f"{tmp_path}/train-{{000000..000003}}.tar").train()
    with pytest.raises(ValueError, match="names train-000000.tar more than once"):
        S.locate_shards(f"{tmp_path}/train-{{000000,000000,000001}}.tar")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(S.ShardError, match="cannot read the shard index.*missing"):
        S.locate_shards(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="neither a directory"):
        S.locate_shards("http://example.invalid/data")


def _drop_key(key):
    return lambda index: index["splits"]["train"]["shards"][1].pop(key)


def _set(key, value):
    return lambda index: index["splits"]["train"]["shards"][1].__setitem__(key, value)


def _duplicate(index):
    shards = index["splits"]["train"]["shards"]
    shards.append(dict(shards[0]))
    index["splits"]["train"]["count"] += shards[0]["count"]


def _negative_count(index):
    index["splits"]["train"]["shards"][1]["count"] = -10
    index["splits"]["train"]["count"] = 5  # consistent, so only the sign is wrong


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda index: index["splits"].__setitem__("train", []), r"splits.train: expected an object with keys count, .*got \[\]"),
        (lambda index: index["splits"]["train"].pop("shards"), r"splits.train: the key 'shards' is missing"),
        (lambda index: index["splits"]["train"].__setitem__("shards", {}), r"splits.train.shards: expected a list, got \{\}"),
        (lambda index: index["splits"]["train"].update(shards=[], count=0), r"splits.train.shards: the split lists no shards"),
        (lambda index: index["splits"]["train"]["shards"].__setitem__(1, 1), r"splits.train.shards\[1\]: expected an object"),
        (_drop_key("sha256"), r"splits.train.shards\[1\]: the key 'sha256' is missing"),
        (_set("count", "10"), r"splits.train.shards\[1\].count: expected an integer, got \"10\""),
        (_set("bytes", True), r"splits.train.shards\[1\].bytes: expected an integer, got true"),
        (_negative_count, r"splits.train.shards\[1\].count: must be >= 0, got -10"),
        (_set("name", "../train-000001.tar"), r"splits.train.shards\[1\].name: '../train-000001.tar' is not a shard file name"),
        (_duplicate, r"splits.train.shards\[3\]: shard 'train-000000.tar' is listed twice"),
        (_set("count", 9), r"splits.train.count: 25 differs from the sum of its shards' counts, 24"),
    ],
    ids=["split-list", "no-shards", "shards-object", "empty-shards", "shard-int", "no-sha256", "count-string", "bytes-bool",
         "negative-count", "name-path", "duplicate", "count-sum"],
)  # fmt: skip
def test_malformed_index_is_rejected_naming_file_split_entry_and_key(tmp_path, damage, message):
    make_shards(tmp_path, 25, 10)
    index_file = tmp_path / "index.json"
    index = json.loads(index_file.read_text())
    damage(index)
    index_file.write_text(json.dumps(index))
    with pytest.raises(S.ShardError, match=rf"^{index_file}: {message}"):
        S.locate_shards(str(tmp_path))
    with pytest.raises(S.ShardError, match=rf"^{index_file}: {message}"):  # `rws data prepare` into the directory
        S.prepare_split(tmp_path, "train", id_rows(25), 10)


def test_http_urls(tmp_path):
    """http(s):// goes through webdataset's gopen (curl); served here by a local http.server."""
    if not any((Path(p) / "curl").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("curl is not installed")
    make_shards(tmp_path, 20, 10)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        shards = S.locate_shards(f"{base}/train-{{000000..000001}}.tar").train()
        assert sorted(flat(epoch_ids(shards))) == list(range(20))
        missing = S.ShardInfo(f"{base}/train-000009.tar", "train-000009.tar", 10, 1, "0")
        with pytest.raises(S.ShardError, match="train-000009.tar: cannot be read"):
            S.read_shard(missing)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------
# splitting: exactly once, data-parallel ranks, workers, determinism


def test_one_rank_sees_every_sample_exactly_once(tmp_path):
    shards = make_shards(tmp_path, 40, 10)
    batches = epoch_ids(shards, seed=3)
    assert len(batches) == 10 and all(len(b) == B for b in batches)
    assert sorted(flat(batches)) == list(range(40))
    assert flat(batches) != list(range(40)), "shuffled"


@pytest.mark.parametrize("n, shard_size", [(40, 10), (50, 10), (53, 10), (37, 5)])
def test_two_data_parallel_ranks_disjoint_equal_and_drop_only_the_tail(tmp_path, n, shard_size):
    """4 shards (divisible by 2 ranks), 5 shards (not), uneven last shards: equal batch counts,
    disjoint coverage, and the dropped samples are exactly the tail of the epoch's shard order."""
    shards = make_shards(tmp_path, n, shard_size)
    for epoch in (0, 1):
        ranks = []
        for rank in (0, 1):
            loader = stream.StreamingLoader(shards, batch_size=B, dp_rank=rank, dp_size=2, seed=5)
            loader.resume({"epoch": epoch, "batches_consumed": 0})
            ranks.append([ids_of(batch) for batch in loader])
        expected_batches = n // (2 * B)
        assert len(ranks[0]) == len(ranks[1]) == expected_batches
        seen = [set(flat(r)) for r in ranks]
        assert not seen[0] & seen[1], "ranks are disjoint"
        assert len(flat(ranks[0]) + flat(ranks[1])) == len(seen[0] | seen[1]), "nothing repeats"
        order = stream.shard_order(len(shards), 5, epoch)
        concatenated = [i for s in order for i in range(s * shard_size, min(n, (s + 1) * shard_size))]
        used = 2 * expected_batches * B
        assert seen[0] | seen[1] == set(concatenated[:used]), "exactly the tail is dropped"
        assert len(concatenated) - used < 2 * B


def test_dataloader_workers_split_a_rank_without_overlap(tmp_path):
    shards = make_shards(tmp_path, 60, 10)
    one = epoch_ids(shards, dp_rank=1, dp_size=2, seed=2, num_workers=0)
    two = epoch_ids(shards, dp_rank=1, dp_size=2, seed=2, num_workers=2)
    assert len(one) == len(two) == 7  # 60 // (2 * 4)
    assert sorted(flat(two)) == sorted(flat(one)) and len(set(flat(two))) == 28, "same samples, each once"


def test_plan_pieces_cover_each_rank_range():
    counts = [7, 3, 10, 5]
    pieces = {}
    for rank in range(2):
        for worker in range(3):
            plan = stream.plan_consumer(counts, seed=0, epoch=0, dp_rank=rank, dp_size=2, batch_size=2, num_workers=3, worker=worker)
            pieces[rank, worker] = plan
            assert sum(hi - lo for _, lo, hi in plan.pieces) == plan.num_batches * 2
    assert sum(p.num_batches for p in pieces.values()) == 2 * (25 // 4)
    assert [pieces[0, w].num_batches for w in range(3)] == [2, 2, 2]
    order = stream.shard_order(4, 0, 0)
    assert [s for s, _, _ in pieces[0, 0].pieces][0] == order[0]


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    shards = make_shards(tmp_path, 60, 10)
    first = epoch_ids(shards, seed=1)
    assert first == epoch_ids(shards, seed=1), "same seed, same order"
    other = epoch_ids(shards, seed=2)
    assert other != first and sorted(flat(other)) == sorted(flat(first))
    loader = stream.StreamingLoader(shards, batch_size=B, seed=1)
    epochs = [[ids_of(b) for b in loader] for _ in range(2)]
    assert epochs[0] == first and epochs[1] != first, "a new order each epoch"


def test_ranks_with_the_same_data_parallel_rank_get_identical_batches(tmp_path):
    shards = make_shards(tmp_path, 50, 10)
    a = [b for b in stream.StreamingLoader(shards, batch_size=B, dp_rank=1, dp_size=2, seed=9)]
    b = [b for b in stream.StreamingLoader(shards, batch_size=B, dp_rank=1, dp_size=2, seed=9)]
    other = [b for b in stream.StreamingLoader(shards, batch_size=B, dp_rank=0, dp_size=2, seed=9)]
    assert len(a) == len(b) == len(other) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, other))


# ------------------------------------------------------------------------------------------------
# stream position


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_skips_exactly_the_consumed_batches(tmp_path, num_workers):
    shards = make_shards(tmp_path, 60, 10)
    kw = dict(batch_size=B, seed=4, num_workers=num_workers)
    full = [ids_of(b) for b in stream.StreamingLoader(shards, **kw)]
    loader = stream.StreamingLoader(shards, **kw)
    iterator = iter(loader)
    head = [ids_of(next(iterator)) for _ in range(5)]
    position = loader.position()
    del iterator
    assert head == full[:5] and position["epoch"] == 0 and position["batches_consumed"] == 5
    restored = stream.StreamingLoader(shards, **kw)
    restored.resume(json.loads(json.dumps(position)))  # survives a round trip through a checkpoint
    assert [ids_of(b) for b in restored] == full[5:]
    assert restored.position()["batches_consumed"] == len(full)
    # A finished epoch resumes at the start of the next one.
    after = stream.StreamingLoader(shards, **kw)
    after.resume(restored.position())
    fresh = stream.StreamingLoader(shards, **kw)
    list(fresh)  # epoch 0
    assert [ids_of(b) for b in after] == [ids_of(b) for b in fresh] and after.position()["epoch"] == 1


# ------------------------------------------------------------------------------------------------
# corrupt, truncated and missing shards


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_a_bit(path: Path, offset: int = 600) -> None:  # byte 600 is inside the first sample's data
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated mid-sample": (lambda p: truncate(p, 3000), "truncated tar archive"),
    "truncated at a sample boundary": (lambda p: truncate(p, 3 * 1024), "truncated or altered: 3 samples, the index says 10"),
    "garbage": (lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "not a valid tar archive"),
    "bit flip": (flip_a_bit, "corrupt: sha256"),
    "missing": (lambda p: p.unlink(), "missing: no such file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_bad_shard_raises_an_error_naming_shard_and_reason(tmp_path, damage):
    shards = make_shards(tmp_path, 40, 10)
    bad = tmp_path / "train-000002.tar"
    corrupt, reason = DAMAGE[damage]
    corrupt(bad)
    with pytest.raises(S.ShardError) as error:
        S.read_shard(shards.shards[2])
    assert str(error.value).startswith(str(bad)) and reason in str(error.value)
    with pytest.raises(S.ShardError, match="train-000002.tar"):
        list(stream.StreamingLoader(shards, batch_size=B, seed=0))


def test_fast_tar_parser_agrees_with_tarfile_and_declines_other_layouts(tmp_path):
    shards = make_shards(tmp_path, 23, 10)
    data = (tmp_path / "train-000002.tar").read_bytes()
    assert S._ustar_rows(data) == S._tarfile_rows(data, "x") == [row.tobytes() for row in id_rows(23)[20:]]
    with wds.TarWriter(str(tmp_path / "pax.tar"), encoder=False) as writer:  # a 150-char key needs a pax header
        writer.write({"__key__": "k" * 150, "bits": bytes(98)})
    pax = (tmp_path / "pax.tar").read_bytes()
    assert S._ustar_rows(pax) is None and S._tarfile_rows(pax, "x") == [bytes(98)]
    assert len(S.read_shard(shards.shards[2])) == 3


def test_local_check_finds_missing_and_truncated_shards_without_reading(tmp_path):
    shards = make_shards(tmp_path, 40, 10)
    truncate(tmp_path / "train-000001.tar", 100)
    (tmp_path / "train-000003.tar").unlink()
    problems = dict(S.check_local_shards(shards))
    assert set(problems) == {str(tmp_path / "train-000001.tar"), str(tmp_path / "train-000003.tar")}
    assert "truncated: 100 bytes" in problems[str(tmp_path / "train-000001.tar")]


def test_skip_mode_goes_on_keeps_batch_counts_and_reports(tmp_path, caplog):
    shards = make_shards(tmp_path, 80, 10)
    truncate(tmp_path / "train-000002.tar", 3000)
    (tmp_path / "train-000005.tar").write_bytes(b"this is not a tar file" * 100)
    caplog.set_level(logging.WARNING, logger="pipeline.stream")
    per_rank, skipped = [], {}
    for rank in (0, 1):
        loader = stream.StreamingLoader(shards, batch_size=B, dp_rank=rank, dp_size=2, seed=0, on_error="skip")
        # As Lightning takes them: len(loader) batches, without running the generator to its end.
        per_rank.append(flat([ids_of(b) for b in itertools.islice(loader, loader.num_batches)]))
        skipped.update(loader.skipped)
    assert len(per_rank[0]) == len(per_rank[1]) == 40, "every rank still yields its 10 batches"
    assert caplog.text.count("bad shard read(s) skipped") == 2, "each rank's epoch summary"
    bad_ids = set(range(20, 30)) | set(range(50, 60))
    assert not bad_ids & set(per_rank[0] + per_rank[1]), "nothing from a bad shard is used"
    assert set(skipped) == {str(tmp_path / "train-000002.tar"), str(tmp_path / "train-000005.tar")}
    assert "truncated" in skipped[str(tmp_path / "train-000002.tar")]
    assert "skipped shard" in caplog.text and "train-000005.tar" in caplog.text
    with pytest.raises(S.ShardError, match="train-00000[25].tar"):  # the default still raises
        for rank in (0, 1):
            list(stream.StreamingLoader(shards, batch_size=B, dp_rank=rank, dp_size=2, seed=0))


def test_skip_mode_with_every_shard_bad_fails_clearly(tmp_path):
    shards = make_shards(tmp_path, 20, 10)
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(S.ShardError, match="no readable shard left"):
        list(stream.StreamingLoader(shards, batch_size=B, on_error="skip"))


def test_read_split_for_evaluation_keeps_order(tmp_path):
    shards = make_shards(tmp_path, 25, 10, split="valid")
    pixels, skipped = S.read_split(shards)
    assert ids_of(pixels) == list(range(25)) and skipped == []
    (tmp_path / "valid-000001.tar").unlink()
    with pytest.raises(S.ShardError, match="valid-000001.tar: cannot be read .missing"):
        S.read_split(shards)
    pixels, skipped = S.read_split(shards, "skip")
    assert ids_of(pixels) == list(range(10)) + list(range(20, 25)) and len(skipped) == 1


def test_pipeline_data_modules_import_no_lightning():
    code = (
        "import sys, pipeline.shards, pipeline.sources, pipeline.stream\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'ray')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
