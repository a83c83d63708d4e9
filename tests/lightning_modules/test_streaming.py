"""The DataModule streaming WebDataset shards, `rws data prepare`, and `rws fit --data.shards` end to end.

Shards are made from the embedded default data (`load_binarized_mnist(None)`: 10k/1k/1k rows).
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.cli import main as cli_main
from lightning_modules.data_cli import data_main
from lightning_modules.datamodule import BinarizedMNISTDataModule, sampler_seed
from pipeline.data import load_binarized_mnist
from pipeline.shards import ShardError, prepare_split
from pipeline.stream import StreamingLoader

from ..ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def embedded() -> dict[str, torch.Tensor]:
    return load_binarized_mnist(None)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, embedded) -> Path:
    """Train shards of 1000 rows (10 shards) and valid shards of 300 (4 shards)."""
    directory = tmp_path_factory.mktemp("shards")
    prepare_split(directory, "train", np.packbits(embedded["train"].numpy(), axis=1), 1000)
    prepare_split(directory, "valid", np.packbits(embedded["valid"].numpy(), axis=1), 300)
    return directory


def rows(batches) -> Counter:
    """Multiset of image rows (as bytes): equal multisets = the same samples, each as often."""
    return Counter(bytes(row) for batch in batches for row in batch.numpy())


def fake_trainer(dp_rank: int, dp_size: int, global_rank: int, world_size: int, epoch: int = 0):
    """The bits of a Trainer the DataModule reads; the module decides the data-parallel layout."""
    module = SimpleNamespace(data_parallel_layout=lambda: (dp_rank, dp_size))
    return SimpleNamespace(lightning_module=module, global_rank=global_rank, world_size=world_size, current_epoch=epoch, training=True)


def streaming_module(shard_spec, trainer=None, **kw) -> BinarizedMNISTDataModule:
    dm = BinarizedMNISTDataModule(shards=str(shard_spec), **kw)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def test_datamodule_streams_every_training_row_once(shard_dir, embedded):
    dm = streaming_module(shard_dir, batch_size=100)
    loader = dm.train_dataloader()
    assert isinstance(loader, StreamingLoader) and len(loader) == 100
    batches = list(loader)
    assert len(batches) == 100 and all(b.shape == (100, 784) and b.dtype == torch.uint8 for b in batches)
    assert rows(batches) == rows([embedded["train"]])
    assert torch.equal(dm.splits["valid"], embedded["valid"]), "valid read whole, in order, from its shards"
    val = dm.val_dataloader()
    assert sum(len(b[0]) for b in val) == 1000


def test_eval_splits_fall_back_to_path_without_shards(tmp_path, embedded):
    prepare_split(tmp_path, "train", np.packbits(embedded["train"][:500].numpy(), axis=1), 250)
    prepare_split(tmp_path, "test", np.packbits(embedded["test"][:200].numpy(), axis=1), 100)
    dm = BinarizedMNISTDataModule(shards=str(tmp_path), path=None)
    dm.setup("test")
    assert dm.splits["test"].shape == (200, 784), "test from its shards"
    dm.setup("fit")
    assert torch.equal(dm.splits["valid"], embedded["valid"]), "no valid shards: valid from data.path"
    assert "train" not in dm.splits, "training data is streamed, not loaded"


def test_sample_group_ranks_get_identical_batches_split_by_data_parallel_rank(shard_dir, embedded):
    """World of 4 = 2 data-parallel groups x 2 sample ranks: global ranks 0,1 are dp rank 0."""
    layout = {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}
    batches = {}
    for global_rank, (dp_rank, dp_size) in layout.items():
        dm = streaming_module(shard_dir, fake_trainer(dp_rank, dp_size, global_rank, 4), batch_size=64)
        batches[global_rank] = list(dm.train_dataloader())
    assert {len(b) for b in batches.values()} == {10000 // (2 * 64)}, "equal batch counts"
    assert all(torch.equal(x, y) for x, y in zip(batches[0], batches[1])), "same sample group, same batches"
    assert all(torch.equal(x, y) for x, y in zip(batches[2], batches[3]))
    first, second = rows(batches[0]), rows(batches[2])
    assert sum(first.values()) == sum(second.values()) == 78 * 64
    assert not (first + second) - rows([embedded["train"]]), "no row used more often than it exists: disjoint groups"


def test_stream_position_round_trip(shard_dir):
    full = list(streaming_module(shard_dir, batch_size=100, num_workers=0).train_dataloader())
    dm = streaming_module(shard_dir, batch_size=100)
    iterator = iter(dm.train_dataloader())
    for _ in range(7):
        next(iterator)
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 7
    resumed = BinarizedMNISTDataModule(shards=str(shard_dir), batch_size=100)
    resumed.load_state_dict(state)  # Lightning restores before it asks for the loader
    resumed.setup("fit")
    rest = list(resumed.train_dataloader())
    assert len(rest) == 93 and all(torch.equal(a, b) for a, b in zip(rest, full[7:]))


@pytest.mark.parametrize("changed", [{"shuffle_buffer": 50}, {"batch_size": 50}])
def test_resuming_with_another_order_says_so(shard_dir, caplog, changed):
    """A position saved under other settings cannot give the saved run's remaining batches: a warning names them."""
    dm = streaming_module(shard_dir, batch_size=100)
    iterator = iter(dm.train_dataloader())
    next(iterator)
    state = dm.state_dict()
    resumed = BinarizedMNISTDataModule(shards=str(shard_dir), **{"batch_size": 100, **changed})
    resumed.setup("fit")
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        resumed.train_dataloader()
    (name,) = changed
    assert any(f"with different {name}" in message for message in caplog.messages), caplog.messages


def test_under_a_trainer_prefetched_batches_are_not_counted(shard_dir):
    """Lightning fetches batch k+1 before step k runs; only batches that reach the step count."""
    trainer = fake_trainer(0, 1, 0, 1, epoch=3)
    dm = streaming_module(shard_dir, trainer, batch_size=100)
    iterator = iter(dm.train_dataloader())
    for _ in range(5):
        batch = next(iterator)
        dm.on_after_batch_transfer(batch, 0)  # what Lightning calls when the batch reaches the step
    next(iterator)  # prefetched, not consumed
    trainer.training = False  # validation batches do not count either
    dm.on_after_batch_transfer(batch, 0)
    assert dm.state_dict()["epoch"] == 3 and dm.state_dict()["batches_consumed"] == 5


def test_in_memory_path_is_unchanged(embedded):
    dm = BinarizedMNISTDataModule(batch_size=50)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 200
    assert dm.state_dict()["batches_consumed"] == 0  # the in-memory sampler's position (test_resume.py resumes it)
    assert torch.equal(dm.splits["train"], embedded["train"])


def in_memory_order(monkeypatch, seed: int, epoch: int) -> list[int]:
    """The training sample order of the in-memory loader under run seed `seed` in `epoch`."""
    monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
    dm = BinarizedMNISTDataModule(batch_size=50)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)  # what Lightning does each epoch
    return list(sampler)


def test_in_memory_orders_of_consecutive_seeds_are_unrelated(monkeypatch):
    assert in_memory_order(monkeypatch, 7, 3) == in_memory_order(monkeypatch, 7, 3), "one seed, one order"
    assert in_memory_order(monkeypatch, 7, 3) != in_memory_order(monkeypatch, 7, 4), "each epoch its own order"
    assert in_memory_order(monkeypatch, 7, 4) != in_memory_order(monkeypatch, 8, 3), "seed s+1 does not replay seed s"
    assert in_memory_order(monkeypatch, 0, 1) != in_memory_order(monkeypatch, 1, 0)
    assert max(sampler_seed(seed) for seed in range(1000)) + 10**6 < 2**64, "room for + epoch in torch's seed range"


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "valid-shards"])
def test_evaluation_splits_each_point_onto_exactly_one_rank(shard_dir, embedded, streamed):
    """3 data-parallel ranks x 2 sample ranks over 1000 valid rows: 334 + 333 + 333, nothing repeated."""
    shares = {}
    for global_rank in range(6):
        dm = BinarizedMNISTDataModule(shards=str(shard_dir) if streamed else None, eval_batch_size=100)
        dm.trainer = fake_trainer(global_rank // 2, 3, global_rank, 6)
        dm.setup("validate")
        shares[global_rank] = [batch for (batch,) in dm.val_dataloader()]
    assert [sum(len(b) for b in shares[r]) for r in range(0, 6, 2)] == [334, 333, 333]
    assert rows(shares[0] + shares[2] + shares[4]) == rows([embedded["valid"]]), "every point exactly once"
    assert all(torch.equal(x, y) for r in range(0, 6, 2) for x, y in zip(shares[r], shares[r + 1], strict=True))
    dm.splits["valid"] = embedded["valid"][:2]
    with pytest.raises(ValueError, match="the valid split has 2 rows, fewer than the 3 data-parallel ranks"):
        dm.val_dataloader()


def test_bad_training_shard_fails_at_setup_or_is_skipped(tmp_path, embedded):
    prepare_split(tmp_path, "train", np.packbits(embedded["train"][:1000].numpy(), axis=1), 250)
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001.tar: truncated: 5000 bytes.*--data.on_error skip"):
        streaming_module(tmp_path)
    dm = streaming_module(tmp_path, batch_size=50, on_error="skip")
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 and list(dm.training_skipped_shards) == [str(bad)]


def test_validate_and_test_need_only_their_own_split(tmp_path, embedded):
    """An index with no train split, or a damaged one, does not stop `rws validate`/`rws test`."""
    prepare_split(tmp_path, "test", np.packbits(embedded["test"][:200].numpy(), axis=1), 100)
    dm = BinarizedMNISTDataModule(shards=str(tmp_path))
    dm.setup("test")
    assert dm.splits["test"].shape == (200, 784)
    dm.setup("validate")
    assert torch.equal(dm.splits["valid"], embedded["valid"]), "no valid shards: valid from data.path"
    with pytest.raises(ShardError, match=r"index.json lists no 'train' split \(it has: test\)"):
        dm.setup("fit")
    prepare_split(tmp_path, "train", np.packbits(embedded["train"][:500].numpy(), axis=1), 250)
    (tmp_path / "train-000001.tar").unlink()
    BinarizedMNISTDataModule(shards=str(tmp_path)).setup("test")
    with pytest.raises(ShardError, match=r"train-000001.tar: missing"):
        BinarizedMNISTDataModule(shards=str(tmp_path)).setup("fit")


def test_rws_test_runs_on_an_index_without_a_train_split(tmp_path, embedded, capsys, monkeypatch):
    prepare_split(tmp_path, "test", np.packbits(embedded["test"][:100].numpy(), axis=1), 100)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored afterwards: seed_everything sets it in-process
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(CONFIGS / "debug.yaml"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    trained = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    assert cli_main(["fit", *common, *trained, "--trainer.default_root_dir", str(tmp_path / "run")]) == 0  # embedded data
    args = ["test", *common, "--data.shards", str(tmp_path), "--ckpt_path", str(tmp_path / "run")]
    assert cli_main([*args, "--model.val_num_samples", "2"]) == 0
    assert "test/log_likelihood" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# command line


def rws(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "lightning_modules.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:  # keep what the hung run printed: its stderr is the diagnosis
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        pytest.fail(f"rws {' '.join(args[:2])} ran past 300 s; its stderr ends with:\n{stderr[-4000:]}")


def test_rws_data_prepare_command(tmp_path, embedded, capsys):
    source = tmp_path / "small.npz"
    np.savez(source, train=np.packbits(embedded["train"][:2500].numpy(), axis=1), valid=embedded["valid"][:300].numpy())
    first = rws("data", "prepare", "--input", str(source), "--output", str(tmp_path / "out"), "--shard-size", "1000", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"train: 2500 samples in 3 shards: {tmp_path}/out/train-{{000000..000002}}.tar (written)" in first.stdout
    assert "valid: 300 samples in 1 shards" in first.stdout
    assert "rws data prepare train" in first.stderr, "progress bar on stderr"
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [1000, 1000, 500]
    # In-process from here (each subprocess pays seconds of imports): errors, re-runs, --help.
    assert cli_main(["data", "prepare", "--input", str(tmp_path / "nope.npz"), "--output", "x", "--shard-size", "5"]) == 2
    assert "rws data: error:" in capsys.readouterr().err.replace("\n", " ")
    # checked before reading the input: the missing file is not what it reports
    assert cli_main(["data", "prepare", "--input", str(tmp_path / "nope.npz"), "--output", "x", "--shard-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rws data: error: --shard-size must be >= 1, got 0"
    assert data_main(["prepare", "--input", str(source), "--output", str(tmp_path / "out"), "--shard-size", "1000", "--quiet"]) == 0
    assert index == json.loads((tmp_path / "out" / "index.json").read_text())
    assert data_main(["prepare", "--help"]) == 0
    assert data_main(["prepare", "--input", str(source)]) == 2
    capsys.readouterr()
    # Options the source's binarization would ignore: refused rather than shards other than asked for.
    for option, value, message in [("--threshold", "0.3", "--threshold applies only with --binarize threshold"),
                                   ("--seed", "5", "--seed applies only with --binarize stochastic")]:  # fmt: skip
        assert cli_main(["data", "prepare", "--input", str(source), "--output", "y", "--shard-size", "5", option, value]) == 2
        assert capsys.readouterr().err.strip() == f"rws data: error: {message}"


def test_rws_data_prepare_reports_a_bad_output_in_one_line(tmp_path, embedded, capsys):
    source = tmp_path / "small.npz"
    np.savez(source, train=np.packbits(embedded["train"][:20].numpy(), axis=1))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bad_index = tmp_path / "bad_index"
    bad_index.mkdir()
    (bad_index / "index.json").write_text(json.dumps({"format": "rws-binarized-mnist-shards", "version": 1, "splits": {"train": [1]}}))
    for output, message in [
        (a_file, f"--output {a_file}: cannot create the shard directory there (File exists)"),
        (a_file / "sub", f"--output {a_file / 'sub'}: cannot create the shard directory there (Not a directory)"),
        (bad_index, f"{bad_index}/index.json: splits.train: expected an object with keys count,"),
    ]:
        assert cli_main(["data", "prepare", "--input", str(source), "--output", str(output), "--shard-size", "5", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"rws data: error: {message}" in err and "Traceback" not in err, err


def test_rws_data_prepare_idx(tmp_path, capsys):
    grey = np.random.default_rng(0).integers(0, 256, size=(30, 784), dtype=np.uint8)
    idx = tmp_path / "train-images-idx3-ubyte"
    idx.write_bytes((2051).to_bytes(4, "big") + (30).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + grey.tobytes())
    args = ["prepare", "--input", str(idx), "--output", str(tmp_path / "out"), "--shard-size", "8", "--quiet"]
    assert data_main([*args, "--binarize", "stochastic", "--seed", "3", "--valid-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "train: 24 samples in 3 shards" in out and "valid: 6 samples in 1 shards" in out
    dm = BinarizedMNISTDataModule(shards=str(tmp_path / "out"), batch_size=8)
    dm.setup("fit")
    assert dm.splits["valid"].shape == (6, 784) and len(list(dm.train_dataloader())) == 3


class BatchRecorder(Callback):
    """Writes to $RECORD_DIR/rank<global>.json the sha256 of every training row this rank receives,
    by batch, and how many validation rows it evaluated (sanity check excluded)."""

    def __init__(self):
        self.hashes = []
        self.valid_rows = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.hashes.append([hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in x.cpu()])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.valid_rows += len(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def on_fit_end(self, trainer, pl_module):
        path = Path(os.environ["RECORD_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"train": self.hashes, "valid_rows": self.valid_rows}))


def fit_args(shards: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "debug.yaml"), "--model.layer_sizes", "[784, 20, 5]",
        "--data.shards", shards, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "runs"), *extra,
    ]  # fmt: skip


def test_rws_fit_streams_shards(shard_dir, tmp_path):
    pattern = f"{shard_dir}/train-{{000000..000009}}.tar"
    result = rws(*fit_args(pattern, tmp_path, "--trainer.limit_train_batches", "5"), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/log_likelihood" in result.stdout + result.stderr
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert checkpoint["BinarizedMNISTDataModule"]["batches_consumed"] == 5
    assert checkpoint["datamodule_hyper_parameters"]["shards"] == pattern


def test_rws_fit_reports_a_bad_shard_in_one_line(tmp_path, embedded, capsys, monkeypatch):
    prepare_split(tmp_path, "train", np.packbits(embedded["train"][:1000].numpy(), axis=1), 500)
    (tmp_path / "train-000001.tar").write_bytes(b"garbage")
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored afterwards: seed_everything sets it in-process
    monkeypatch.chdir(tmp_path)
    # In-process is safe here: one device, and it fails in setup before any training.
    assert cli_main(fit_args(str(tmp_path), tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"rws fit: error: {tmp_path}/train-000001.tar: truncated: 7 bytes" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sample_parallel", [1, 2])
def test_two_process_ddp_fit_streams_by_data_parallel_rank(tmp_path, embedded, sample_parallel):
    """2 DDP processes on 11 train shards (not divisible by 2, the last one short).

    sample_parallel=1: 2 data-parallel ranks: equal batch counts (no hang), disjoint samples.
    sample_parallel=2: 1 data-parallel group of 2 sample ranks: identical batches on both.
    """
    directory = tmp_path / "shards"
    prepare_split(directory, "train", np.packbits(embedded["train"][:5300].numpy(), axis=1), 500)
    # 201 valid rows: 101 + 100 (2 + 1 batches) on 2 data-parallel ranks, which must not hang
    prepare_split(directory, "valid", np.packbits(embedded["valid"][:201].numpy(), axis=1), 100)
    record = tmp_path / "record"
    record.mkdir()
    result = rws(
        *fit_args(str(directory), tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                  "--data.num_workers", "1", "--model.num_samples", "4", "--model.sample_parallel", str(sample_parallel),
                  "--trainer.callbacks+=tests.lightning_modules.test_streaming.BatchRecorder"),
        cwd=ROOT, env={"MASTER_PORT": str(free_port()), "RECORD_DIR": str(record)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    ranks = [r["train"] for r in records]
    data_groups = 2 // sample_parallel
    valid_rows = [r["valid_rows"] for r in records]
    # sample_parallel=2: one data-parallel group holds all 201, of which limit_val_batches takes 2 x 100
    assert valid_rows == ([101, 100] if sample_parallel == 1 else [200, 200]), "each valid point evaluated once"
    assert len(ranks[0]) == len(ranks[1]) == 5300 // (data_groups * 100)
    source = Counter(hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in embedded["train"][:5300])
    if sample_parallel == 2:
        assert ranks[0] == ranks[1], "ranks of one sample group get identical batches"
        return
    seen = [Counter(h for batch in r for h in batch) for r in ranks]
    assert not (seen[0] + seen[1]) - source, "no sample used more often than it exists: disjoint ranks"
    assert sum((seen[0] + seen[1]).values()) == 5200


@pytest.mark.slow
def test_two_process_ddp_fit_with_a_corrupt_shard_ends_in_one_line_per_process(tmp_path, embedded):
    """The rank that reads the shard names it; the other rank, whose collective lost its peer, says so
    in one line instead of gloo's traceback, which used to print last and bury the cause."""
    directory = tmp_path / "shards"
    prepare_split(directory, "train", np.packbits(embedded["train"][:2000].numpy(), axis=1), 500)
    prepare_split(directory, "valid", np.packbits(embedded["valid"][:200].numpy(), axis=1), 100)
    corrupt = directory / "train-000002.tar"
    data = bytearray(corrupt.read_bytes())
    data[3000] ^= 1  # a bit flip inside a sample: the sha256 check finds it when the shard is read
    corrupt.write_bytes(bytes(data))
    result = rws(
        *fit_args(str(directory), tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--trainer.accelerator", "cpu"),
        cwd=ROOT, env={"MASTER_PORT": str(free_port())},
    )  # fmt: skip
    assert result.returncode in (1, 2), result.stderr[-3000:]
    assert f"rws fit: error: {corrupt}: corrupt: sha256" in result.stderr
    assert "stopped: another process of this run exited" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("split", ["train", "val"])
def test_in_memory_loaders_are_not_told_to_use_worker_processes(monkeypatch, recwarn, split):
    """Lightning advises workers for a loader with fewer than 2 on a machine with more cores (twice
    on every fit of the 16-core GPU machine); for rows sliced from memory they only cost time."""
    from pytorch_lightning.trainer.connectors import data_connector

    datamodule = BinarizedMNISTDataModule(batch_size=50)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 15)  # a 16-core machine
    data_connector._worker_check(SimpleNamespace(num_devices=1), loader, f"{split}_dataloader")
    assert not [w for w in recwarn if "does not have many workers" in str(w.message)]
