"""Streaming binarized MNIST shards for training: the epoch plan, `ShardStream` and `StreamingLoader`.

`StreamingLoader` reads the shards that `pipeline.shards` located (a directory, a brace pattern or
URLs) and yields uint8 batches [B, 784] of 0/1, one fresh DataLoader per epoch.

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

Errors: every shard is read whole and checked before any of its samples is used
(`pipeline.shards.read_shard`), so a corrupt shard either raises `ShardError` naming the shard and
the reason, or (on_error="skip") contributes nothing; its quota is then filled from the shards that
follow in the epoch order, so batch counts stay equal.

Nothing here imports Lightning; torch is used for the IterableDataset/DataLoader plumbing and the batches.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import OnError, ShardError, ShardSet, read_shard, unpack_rows

log = logging.getLogger(__name__)


def _mix(*numbers: int) -> int:
    """A 64-bit seed from several integers (so (seed, epoch, rank, worker) streams are independent)."""
    digest = hashlib.sha256(",".join(str(int(n)) for n in numbers).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard permutation: a function of (seed, epoch) only, so every rank agrees."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng(_mix(seed, epoch)).permutation(num_shards).tolist()


def warn_if_order_changed(saved: dict, current: dict, keys: tuple[str, ...], what: str) -> None:
    """Log a warning naming the `keys` whose value differs between a saved position and this loader:
    after such a resume, the rest of the epoch is not the sample order the saved run would have seen."""
    changed = [key for key in keys if key in saved and saved[key] != current[key]]
    if changed:
        log.warning(
            "resuming the %s with different %s than when it was saved: the remaining batches of the "
            "epoch will not be the ones the saved run would have seen", what, ", ".join(changed)
        )


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator, seeded: the base seed of its worker processes comes from it.

    Why: without one, every iterator a DataLoader starts draws that seed from torch's global RNG, the
    one the importance samples come from, so a resumed fit, which starts its iterators at other
    points, drew other samples than the fit it continues. The workers here only read and slice data,
    so their seed changes nothing.
    """
    return torch.Generator().manual_seed(seed)


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
            "shuffle_buffer": self.shuffle_buffer,
        }

    def resume(self, position: dict) -> None:
        """Continue from `position` (from `position()`): skip its consumed batches of its epoch."""
        epoch, consumed = int(position["epoch"]), int(position["batches_consumed"])
        if consumed >= self.num_batches:  # that epoch was finished: start the next one
            epoch, consumed = epoch + 1, 0
        keys = ("batch_size", "dp_size", "num_workers", "seed", "shuffle_buffer", "batches_per_epoch")  # the last: the shard set
        warn_if_order_changed(position, self.position(), keys, "shard stream")
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
        loader = DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_no_collate, generator=loader_generator(self.seed)
        )
        skipped_this_epoch, remaining = 0, self.num_batches - skip
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
            remaining -= 1
            if remaining == 0 and skipped_this_epoch:
                # Before the epoch's last batch, not after the loop: Lightning takes len(loader)
                # batches and never resumes this generator, so code after the loop does not run.
                log.warning(
                    "rank %d, epoch %d: %d bad shard read(s) skipped; their samples were replaced by samples of the "
                    "following shards",
                    self.dp_rank, epoch, skipped_this_epoch,
                )  # fmt: skip
            yield unpack_rows(packed)  # [B, 784]
