"""The DataModule streaming WebDataset shards, `rws data prepare`, and `rws fit --data.shards` end to end.

Shards are made from the embedded default data (`load_binarized_mnist(None)`: 10k/1k/1k rows).
"""

import hashlib
import json
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
from lightning_modules.datamodule import BinarizedMNISTDataModule
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
    assert dm.state_dict() == {}
    assert torch.equal(dm.splits["train"], embedded["train"])


def test_bad_training_shard_fails_at_setup_or_is_skipped(tmp_path, embedded):
    prepare_split(tmp_path, "train", np.packbits(embedded["train"][:1000].numpy(), axis=1), 250)
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001.tar: truncated: 5000 bytes.*--data.on_error skip"):
        streaming_module(tmp_path)
    dm = streaming_module(tmp_path, batch_size=50, on_error="skip")
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 and list(dm.training_skipped_shards) == [str(bad)]


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
    assert data_main(["prepare", "--input", str(source), "--output", str(tmp_path / "out"), "--shard-size", "1000", "--quiet"]) == 0
    assert index == json.loads((tmp_path / "out" / "index.json").read_text())
    assert data_main(["prepare", "--help"]) == 0
    assert data_main(["prepare", "--input", str(source)]) == 2


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
    """Writes the sha256 of every training batch this rank receives to $RECORD_DIR/rank<global>.json."""

    def __init__(self):
        self.hashes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.hashes.append([hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in x.cpu()])

    def on_train_end(self, trainer, pl_module):
        path = Path(os.environ["RECORD_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.hashes))


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
    prepare_split(directory, "valid", np.packbits(embedded["valid"][:200].numpy(), axis=1), 100)
    record = tmp_path / "record"
    record.mkdir()
    result = rws(
        *fit_args(str(directory), tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                  "--data.num_workers", "1", "--model.num_samples", "4", "--model.sample_parallel", str(sample_parallel),
                  "--trainer.callbacks+=tests.lightning_modules.test_streaming.BatchRecorder"),
        cwd=ROOT, env={"MASTER_PORT": str(free_port()), "RECORD_DIR": str(record)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    data_groups = 2 // sample_parallel
    assert len(ranks[0]) == len(ranks[1]) == 5300 // (data_groups * 100)
    source = Counter(hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in embedded["train"][:5300])
    if sample_parallel == 2:
        assert ranks[0] == ranks[1], "ranks of one sample group get identical batches"
        return
    seen = [Counter(h for batch in r for h in batch) for r in ranks]
    assert not (seen[0] + seen[1]) - source, "no sample used more often than it exists: disjoint ranks"
    assert sum((seen[0] + seen[1]).values()) == 5200
