"""DataModule for binarized MNIST: held in memory (embedded default, `.amat`, `.npz`) or streamed from shards.

With `shards` unset, every split is loaded whole into memory, as before. With `shards` set (a
directory written by `rws data prepare`, a brace pattern, or URLs), training streams WebDataset
shards through `pipeline.stream.StreamingLoader`; validation and test read their `valid`/`test`
shards into memory (they are small and must see every point), or fall back to `path`.
"""

import hashlib
import inspect
import logging
import os
import warnings
from typing import Literal

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipeline.data import load_binarized_mnist
from pipeline.shards import ShardError, ShardLocation, check_local_shards, locate_shards, read_split
from pipeline.stream import StreamingLoader, batches_per_rank, loader_generator, warn_if_order_changed

log = logging.getLogger(__name__)

_EVAL_SPLITS = {"fit": ("valid",), "validate": ("valid",), "test": ("test",), "predict": (), None: ("valid", "test")}
# Why not validate/test: they read only their own split, so an index without a train split (or
# with a damaged one) must not stop them. None means every stage, training included.
_TRAIN_STAGES = ("fit", None)
_POSITION_KEYS = ("epoch", "batches_consumed")


def sampler_seed(seed: int) -> int:
    """The in-memory training sampler's seed for the run seed: 63 bits of a sha256 of it.

    Why not the run seed itself: DistributedSampler shuffles epoch e with `seed + e`, so seed s+1
    would replay seed s's orders one epoch behind. Why 63 bits: `+ e` must stay below 2**64, the
    largest seed torch.Generator accepts.
    """
    digest = hashlib.sha256(f"rws in-memory sampler, run seed {int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ResumableSampler(DistributedSampler):
    """The in-memory training order (DistributedSampler, shuffled, drop_last) that can continue an epoch.

    Like StreamingLoader for shards: `position()` is {epoch, batches_consumed, ...}, counted by
    `mark_consumed` (the DataModule calls it when a batch reaches the step, so batches Lightning
    prefetched do not count), and after `resume(position)` the epoch of that number skips its
    consumed batches. It does so each time that epoch is iterated, because Lightning may start an
    iterator before it sets the epoch; later epochs are whole.
    """

    def __init__(self, dataset: TensorDataset, num_replicas: int, rank: int, *, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.consumed = 0  # batches of the current epoch that reached the step
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip)

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's share of the epoch, in order
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            if self.epoch == epoch:
                skip = batches
            elif self.epoch > epoch:
                self._resume = None
        self.consumed = skip
        return iter(indices[skip * self.batch_size :])

    def mark_consumed(self) -> None:
        self.consumed += 1

    def position(self) -> dict:
        return {
            "epoch": int(self.epoch),
            "batches_consumed": self.consumed,
            "batches_per_epoch": self.num_samples // self.batch_size,
            "batch_size": self.batch_size,
            "dp_size": self.num_replicas,
            "seed": self.seed,
        }

    def resume(self, position: dict) -> None:
        """Continue from `position` (from `position()`): skip its consumed batches of its epoch."""
        current = self.position()
        warn_if_order_changed(position, current, ("batch_size", "dp_size", "seed", "batches_per_epoch"), "training sampler")
        epoch, consumed = int(position["epoch"]), int(position["batches_consumed"])
        # A finished epoch needs no skip: Lightning goes on with the next one.
        self._resume = (epoch, consumed) if 0 < consumed < current["batches_per_epoch"] else None


def read_splits(
    location: ShardLocation | None, path: str | None, splits: list[str], on_error: str = "raise"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`splits` read whole: each from its shards where `location` (a shard index) has them, else from
    `path` (None: the embedded default). Returns ({split: uint8 rows}, {skipped shard url: reason})."""
    data, skipped, fallback = {}, {}, []
    for split in splits:
        shards = location.split(split) if location is not None else None
        if shards is None:
            fallback.append(split)
            continue
        data[split], skipped_here = read_split(shards, on_error)
        skipped.update(skipped_here)
    if fallback:
        data.update(load_binarized_mnist(path, fallback))
    return data, skipped


class BinarizedMNISTDataModule(pl.LightningDataModule):
    """Binarized MNIST, loaded whole into memory or streamed from WebDataset shards.

    Args:
        path: a directory with Larochelle's `binarized_mnist_{train,valid,test}.amat`, or an `.npz`
            with arrays `train`, `valid`, `test` (packed with np.packbits or 0/1). None: the small
            subset of the standard binarization embedded in the package (10k/1k/1k). With `shards`
            set, used only for a validation/test split that has no shards.
        batch_size: training minibatch size.
        eval_batch_size: minibatch size of validation and test (their K samples multiply it).
        num_workers: DataLoader worker processes.
        shards: stream training data from WebDataset shards written by `rws data prepare`: their
            directory (holding index.json), an index URL, or a brace pattern such as
            `DIR/train-{000000..000049}.tar`; `file://`, `http(s)://` and `pipe:COMMAND` URLs work
            too (the index must sit next to the shards). Each data-parallel rank gets exactly
            floor(N / (ranks * batch_size)) batches per epoch; validation/test use the `valid`/
            `test` shards of the same index if present, else `path`. None: in-memory data.
        shuffle_buffer: streaming only: samples held by each loader's shuffle buffer (after the
            shards are shuffled); larger mixes better and costs ~130 bytes per sample.
        on_error: streaming only: what a missing, truncated or corrupt shard does. 'raise': stop
            with an error naming the shard and the reason. 'skip': skip it, count it and log it,
            and fill its batches from the following shards, so training goes on.
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 100,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        shards: str | None = None,
        shuffle_buffer: int = 10_000,
        on_error: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        if shuffle_buffer < 0 or num_workers < 0:
            raise ValueError(f"data.shuffle_buffer and data.num_workers must be >= 0, got {shuffle_buffer}, {num_workers}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.save_hyperparameters(frame=inspect.currentframe())  # no reference cycle: see RWSModule.__init__
        self.splits: dict[str, torch.Tensor] = {}
        self._location: ShardLocation | None = None
        self._train_loader: StreamingLoader | None = None
        self._train_sampler: ResumableSampler | None = None  # in-memory training
        self._resume: dict | None = None  # a stream position loaded from a checkpoint
        self.skipped_shards: dict[str, str] = {}  # url -> reason, for validation/test shards (training: see below)

    @property
    def streaming(self) -> bool:
        return self.hparams.shards is not None

    def setup(self, stage: str | None = None):
        if not self.streaming:
            if not self.splits:
                self.splits = load_binarized_mnist(self.hparams.path)
            return
        if self._location is None:
            self._location = locate_shards(self.hparams.shards)
        if stage in _TRAIN_STAGES:
            self._check_train_shards()
        missing = [split for split in _EVAL_SPLITS.get(stage, ("valid", "test")) if split not in self.splits]
        splits, skipped = read_splits(self._location, self.hparams.path, missing, self.hparams.on_error)
        self.splits.update(splits)
        self.skipped_shards.update(skipped)

    def _check_train_shards(self) -> None:
        # Every rank runs this cheap check before training, so a missing or truncated local shard
        # fails on all ranks at once (a failure inside one rank's epoch would leave the others
        # waiting in DDP's all-reduce).
        problems = check_local_shards(self._location.train())
        if not problems:
            return
        if self.hparams.on_error == "raise":
            url, reason = problems[0]
            more = f" (and {len(problems) - 1} more bad shard(s))" if len(problems) > 1 else ""
            raise ShardError(f"{url}: {reason}{more}; pass --data.on_error skip to train without it")
        for url, reason in problems:
            log.warning("bad shard, will be skipped: %s: %s", url, reason)

    def data_parallel_layout(self) -> tuple[int, int]:
        """(rank, size) of this process among the data-parallel groups.

        Ranks of one sample group must see the same minibatches, so data is split by data-parallel
        rank, never by global rank; the LightningModule owns the process layout.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        layout = getattr(trainer.lightning_module, "data_parallel_layout", None)
        return layout() if layout is not None else (trainer.global_rank, trainer.world_size)

    @staticmethod
    def _seed() -> int:
        # Why the global seed, not torch's: every rank must shuffle alike, and rank RNGs may differ.
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def check_batch_size(self, dp_size: int) -> None:
        """ValueError unless each of `dp_size` data-parallel groups gets a full training batch: an
        epoch without one would train nothing and exit 0. After `setup("fit")`."""
        total = self._location.train().total if self.streaming else len(self.splits["train"])
        batch_size = self.hparams.batch_size
        if batches_per_rank(total, dp_size, batch_size) == 0:
            raise ValueError(
                f"data.batch_size={batch_size} is larger than the {total // dp_size} training points of each "
                f"of the {dp_size} data-parallel group(s) ({total} in all): no full training batch"
            )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        rank, size = self.data_parallel_layout()
        if shuffle:
            dataset = TensorDataset(self.splits[split])
            self.check_batch_size(size)
            # Why a seeded sampler even for one data-parallel group: DataLoader(shuffle=True) draws
            # from the rank's torch RNG, which differs between the ranks of a sample group (each
            # draws its own importance samples), but they must see the same minibatches.
            # Lightning calls its set_epoch, so each epoch has its own order.
            sampler = ResumableSampler(dataset, size, rank, seed=sampler_seed(self._seed()), batch_size=batch_size)
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                # Lightning starts the first epoch's iterator before it sets the epoch, and worker
                # processes prefetch from it at once: a fit resumed at epoch 1 trained on epoch 0's order.
                sampler.set_epoch(trainer.current_epoch)
            if self._resume is not None:
                sampler.resume(self._resume)
                self._resume = None
            self._train_sampler = sampler
        else:
            dataset, sampler = TensorDataset(self._rank_share(split, rank, size)), None
        # Lightning advises worker processes for a loader with fewer than 2 on a machine with more cores
        # (on every fit on a GPU machine). Rows sliced from a tensor in memory come faster without: on
        # the 2-core VM, beside 11 ms of work per batch, 0.4 ms per batch of 100 in-process, 1.2-1.4 ms
        # through 1 or 2 workers.
        warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers", category=PossibleUserWarning)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,  # equal batch shapes in training; evaluation keeps every point
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            generator=loader_generator(self._seed()),
        )

    def _rank_share(self, split: str, rank: int, size: int) -> torch.Tensor:
        """Rows rank, rank + size, ... of an evaluation split: every point on exactly one rank.

        Why not DistributedSampler: it pads the ranks to equal length by repeating up to size - 1
        points, which then count twice. Unequal shares are harmless: the module logs the metric
        with its batch size and sync_dist, which Lightning reduces to the mean over all points.
        """
        data = self.splits[split]
        if len(data) < size:
            # A rank without a batch would never log the metric, and the others would wait for it.
            raise ValueError(f"the {split} split has {len(data)} rows, fewer than the {size} data-parallel ranks")
        return data[rank::size]

    def train_dataloader(self):
        if not self.streaming:
            return self._loader("train", self.hparams.batch_size, shuffle=True)
        if self._location is None:
            self.setup("fit")
        rank, size = self.data_parallel_layout()
        trainer = getattr(self, "trainer", None)
        self._train_loader = StreamingLoader(
            self._location.train(),
            batch_size=self.hparams.batch_size,
            dp_rank=rank,
            dp_size=size,
            seed=self._seed(),
            shuffle_buffer=self.hparams.shuffle_buffer,
            num_workers=self.hparams.num_workers,
            on_error=self.hparams.on_error,
            # Under a trainer the epoch is the trainer's (right after a resume too), and a batch
            # counts as consumed when it reaches the step, not when Lightning prefetches it.
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
            count_on_yield=trainer is None,
        )
        if self._resume is not None:
            self._train_loader.resume(self._resume)
            self._resume = None
        return self._train_loader

    def val_dataloader(self):
        return self._loader("valid", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    @property
    def _train_position(self) -> StreamingLoader | ResumableSampler | None:
        """What counts the training batches consumed: the stream, or the in-memory sampler."""
        return self._train_loader if self.streaming else self._train_sampler

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if self._train_position is not None and trainer is not None and trainer.training:
            self._train_position.mark_consumed()
        return batch

    @property
    def training_skipped_shards(self) -> dict[str, str]:
        """url -> reason of every training shard this rank skipped so far (on_error='skip')."""
        return dict(self._train_loader.skipped) if self._train_loader is not None else {}

    def state_dict(self) -> dict:
        """The training position {epoch, batches_consumed, ...} of the stream or the in-memory sampler.

        Lightning stores it in checkpoints; `load_state_dict` makes the next epoch of that number
        skip the batches already consumed, so a mid-epoch resume continues the same sample order.
        {} for in-memory data before training.
        """
        if self._train_position is not None:
            return self._train_position.position()
        if self._resume is not None:
            return dict(self._resume)
        return {"epoch": 0, "batches_consumed": 0} if self.streaming else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        missing = [key for key in _POSITION_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"data state_dict lacks {', '.join(missing)}; expected a stream position {_POSITION_KEYS}")
        if self._train_position is not None:
            self._train_position.resume(state_dict)
        else:
            self._resume = dict(state_dict)
