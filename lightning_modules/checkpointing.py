"""Lightning glue for the sharded DCP checkpoints of `pipeline.checkpoint`.

- `DistributedCheckpoint` (a Checkpoint callback, `--dcp.*` on the command line): at the end of
  every `every_n_epochs`-th training epoch (and inside epochs every `every_n_train_steps` steps,
  and where a SIGTERM or Ctrl-C stops the fit), on ALL ranks, it builds Lightning's checkpoint dict
  (model, both optimizers, LR schedulers, loops, callbacks, hyperparameters), moves the per-rank
  parts (the DataModule's stream position) next to this rank's RNG states, and saves collectively
  to `<dirpath>/epochEEEE-stepSSSSSSSSS/` (dirpath defaults to `<default_root_dir>/checkpoints`),
  keeping the last `keep_last` plus the best by `monitor`. It saves after the LightningModule's
  `on_train_epoch_end` (LR schedulers stepped), as Lightning runs Checkpoint callbacks last.
- `DCPCheckpointIO`: Lightning's CheckpointIO for `trainer.fit(ckpt_path=...)`: a checkpoint
  directory is read with DCP on all ranks (any world size: DCP reshards) back into Lightning's
  dict format; a file (`.ckpt` or a consolidated `.pt`) is read with torch.load(weights_only=True).
  Saving files (Lightning's ModelCheckpoint) is passed to the wrapped CheckpointIO. The callback
  installs it in `setup`, so no `--trainer.plugins` is needed.
- `resolve_resume(...)`: `rws fit --resume auto|PATH` -> the `ckpt_path` to pass to fit.

A fresh run (no `--resume`, no `ckpt_path`) into a checkpoint directory that already holds
complete checkpoints is refused at fit start: its saves would replace the other run's same-named
checkpoints and `--resume auto` would later pick either run's.

Resuming with the same world size and layout restores every rank's RNG states when Lightning
hands the loaded checkpoint to the callbacks: after the module's `setup` (which reseeds every
rank), before the sanity check (which runs under `isolate_rng`) and before the fit loop creates
the DataLoader iterator of the resumed epoch (which draws from torch's RNG ahead of
`on_train_start`), so training continues bitwise as if never stopped. With another world size or sample-parallel layout the
model, optimizers and loops still load; each rank keeps its fresh seed and rank 0 says once that
the random streams differ (the data position is taken from the same rank if it existed, else
from rank 0).

A SIGTERM (a scheduler's preemption, `kill PID`) or a first Ctrl-C (SIGINT) during training is
noted by the callback's own handler, in place of Lightning's, which would stop each rank at the
end of whichever batch it is in (SIGTERM) or wherever it is (Ctrl-C). The ranks look at their
notes together (every batch with one process; with several, every `trainer.log_every_n_steps`
batches and at each epoch's end, one all-reduce), so they stop at the same batch, save a
checkpoint there and raise `StopSignal`. A second Ctrl-C stops at once, saving nothing.

Fault hooks, read only here and only meant for tests (values are `STEP[:...]` strings):

- `RWS_FAULT_KILL_AT_STEP=STEP[:RANK]`: SIGKILL this process (only rank RANK, if given) at the
  end of the first training batch with global_step >= STEP.
- `RWS_FAULT_KILL_IN_SAVE=STEP[:STAGE]`: SIGKILL rank 0 in the save of global_step STEP at STAGE
  ("data_written", the default, or "marker_written"; see `pipeline.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_modules.callbacks import ValidationEpoch
from pipeline import checkpoint as ckpt

log = logging.getLogger(__name__)


def _no_broadcast() -> None:
    """Stands in for Lightning's per-batch SIGTERM broadcast during training (`_note_stop_signals`)."""


class StopSignal(SIGTERMException):
    """Lightning's SIGTERMException (a SystemExit without a code), naming the signal that stopped the fit."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


_VERIFIED: set[str] = set()  # checkpoint directories sha256-checked in this process (by resolve_resume)
_RESUME_ASKED: set[str] = set()  # checkpoint directories that `rws fit --resume` was given in this process
RESUME_KEY = "rws_resume"  # added to a loaded checkpoint dict: this rank's per-rank state and the saved layout
_COMBINED_LOADER = ("loops", "fit_loop", "state_dict", "combined_loader")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}-step{step:09d}"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pop_path(tree: dict, path: tuple) -> Any:
    node = tree
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node.pop(path[-1], None) if isinstance(node, dict) else None


def _put_path(tree: dict, path: list, value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def split_per_rank(checkpoint: dict, datamodule_key: str | None) -> dict:
    """Move the per-rank entries out of Lightning's checkpoint dict (in place); returns this rank's state.

    Per rank: the DataModule's state (e.g. a data-stream position; Lightning stores it under the
    DataModule's class name), a stateful train loader's state, and the RNG states. Everything left
    is the same on every rank.
    """
    restore = []
    for path in [(datamodule_key,)] * (datamodule_key is not None) + [_COMBINED_LOADER]:
        value = _pop_path(checkpoint, path)
        if value is not None:
            restore.append([list(path), value])
    return {"rng": ckpt.rng_state(), "restore": restore}


def to_lightning(shared: dict, rank_state: dict | None, info: dict, source_rank: int | None, path: str) -> dict:
    """A checkpoint read back (shared dict + one rank's state) in Lightning's dict format.

    The per-rank entries go back where Lightning expects them (e.g. the DataModule's state under
    its class name); the RNG states and the saved layout go under RESUME_KEY for the callback.
    """
    checkpoint = dict(shared)
    rank_state = rank_state or {}
    for entry_path, value in rank_state.get("restore", []):
        _put_path(checkpoint, list(entry_path), value)
    checkpoint[RESUME_KEY] = {
        "path": path,
        "rng": rank_state.get("rng"),
        "source_rank": source_rank,
        "world_size": info.get("world_size"),
        "sample_parallel": (info.get("meta") or {}).get("sample_parallel", 1),
    }
    return checkpoint


class DCPCheckpointIO(CheckpointIO):
    """Reads DCP checkpoint directories (collectively) and files (weights_only); writes files via `inner`."""

    def __init__(self, inner: CheckpointIO | None = None):
        self.inner = inner if inner is not None else TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        rank, _ = _rank_and_world()
        if path.is_dir():
            check = str(path.resolve()) not in _VERIFIED
            marker = ckpt.verify(path) if check else ckpt.read_marker(path)
            source = rank if rank < marker["world_size"] else 0
            loaded = ckpt.load(path, ranks=[source], check=False)
            return to_lightning(loaded.shared, loaded.ranks[source], loaded.marker, source, str(path))
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        checkpoint = ckpt.read_file(path)
        ranks = checkpoint.pop(ckpt.CONSOLIDATED_RANKS, None)
        info = checkpoint.pop(ckpt.CONSOLIDATED_INFO, None)
        if ranks is None or info is None:
            return checkpoint  # a plain Lightning .ckpt: no per-rank state
        source = rank if f"rank{rank}" in ranks else 0
        return to_lightning(checkpoint, ranks.get(f"rank{source}"), info, source, str(path))


def _inside_epoch(checkpoint: dict) -> bool:
    """Whether Lightning's checkpoint dict was saved after some but not all batches of an epoch.

    Counted by the batches processed: a save from `on_train_batch_end` comes before Lightning
    counts its batch as completed."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return progress.get("current", {}).get("processed", 0) > 0 and not progress.get("is_last_batch", True)


def _env_fault(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return value.split(":") if value else None


class DistributedCheckpoint(ValidationEpoch, Checkpoint):
    """Sharded, atomic DCP checkpoints of the whole training state, written by all ranks.

    Args:
        dirpath: directory of the checkpoints (None: `<trainer.default_root_dir>/checkpoints`);
            `rws fit --resume auto` looks there.
        every_n_epochs: save at the end of every N-th training epoch (0: never).
        every_n_train_steps: also save inside epochs, whenever `trainer.global_step` passes a
            multiple of N (0: never). A batch takes two steps, P's and Q's, so N = 1000 saves every
            500 batches; for epochs too long to lose one. Not at an epoch's last batch, where the
            epoch's own checkpoint follows.
        keep_last: keep the newest written N complete checkpoints, plus the best by `monitor`
            among those saved after a validation (None: keep all).
        async_save: copy the state to CPU memory and write it in a background thread while
            training goes on; the checkpoint becomes visible when all ranks are done.
        monitor: the metric recorded with each checkpoint of an epoch that validated (the best
            one is kept).
        mode: 'max' or 'min': which value of `monitor` is best.
        save_on_sigterm: when a SIGTERM (a scheduler's preemption, `kill PID`) or a first Ctrl-C
            stops the fit, save where all ranks stopped, so that `--resume auto` loses no steps (module
            docstring). Needs every_n_epochs or every_n_train_steps > 0.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        every_n_train_steps: int = 0,
        keep_last: int | None = 3,
        async_save: bool = False,
        monitor: str = "val/log_likelihood",
        mode: str = "max",
        save_on_sigterm: bool = True,
    ):
        super().__init__()
        if every_n_epochs < 0 or every_n_train_steps < 0 or (keep_last is not None and keep_last < 1):
            raise ValueError(
                "dcp.every_n_epochs and dcp.every_n_train_steps must be >= 0 and dcp.keep_last >= 1, "
                f"got {every_n_epochs}, {every_n_train_steps}, {keep_last}"
            )
        if mode not in ("max", "min"):
            raise ValueError(f"dcp.mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = dirpath
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self._period = 0  # global_step // every_n_train_steps after the last batch (or at the start)
        self.keep_last = keep_last
        self.async_save = async_save
        self.monitor = monitor
        self.mode = mode
        self.save_on_sigterm = save_on_sigterm
        self._group = None  # a gloo group of all ranks, for saving (background thread when async)
        self._pending: ckpt.PendingSave | None = None
        self._warned_layout = False
        self._failed = False
        self._saved_step: int | None = None
        self._rng_at_first_batch: dict | None = None  # a checkpoint from inside an epoch: see on_load_checkpoint
        self._stop_signal = 0  # the signal noted by `_note_stop_signals`' handler, 0 for none
        self._replaced_handlers: dict[int, Any] = {}
        self.last_saved: Path | None = None

    @property
    def saves(self) -> bool:
        """Whether this callback writes checkpoints at all."""
        return bool(self.every_n_epochs or self.every_n_train_steps)

    # -- where and with whom

    def resolve_dirpath(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "checkpoints"

    @staticmethod
    def _layout(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        hparams = getattr(pl_module, "hparams", {}) or {}
        return {"world_size": trainer.world_size, "sample_parallel": int(hparams.get("sample_parallel", 1))}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, DCPCheckpointIO):
            strategy.checkpoint_io = DCPCheckpointIO(strategy.checkpoint_io)
        # Why a group of our own: async saves run collectives from a background thread, which must
        # not interleave with the training collectives on the default group. Collective: every
        # rank runs setup, in the same order.
        if stage == "fit" and self._group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a fresh run into a checkpoint directory that holds checkpoints (`refuse_foreign_checkpoints`)."""
        # Why here: Lightning has restored the checkpoint by now (trainer.ckpt_path is set), and
        # nothing is saved yet. Every rank sees the same files, so all raise together.
        # A run that saves nothing (e.g. an `rws tune` trial) cannot mix with the checkpoints there.
        dirpath = self.resolve_dirpath(trainer)
        key = str(dirpath.resolve())
        resume_asked = key in _RESUME_ASKED
        _RESUME_ASKED.discard(key)  # asked for this fit only
        if self.saves and trainer.ckpt_path is None and not resume_asked:
            refuse_foreign_checkpoints(dirpath)
        if self.saves:
            check_directory_path(dirpath)

    # -- resuming

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        resume = checkpoint.get(RESUME_KEY)
        if resume is None or trainer.state.fn != "fit":
            return
        saved = {"world_size": resume.get("world_size"), "sample_parallel": resume.get("sample_parallel", 1)}
        now = self._layout(trainer, pl_module)
        if saved == now and resume.get("rng") is not None:
            # Why here: Lightning restores callbacks after the module's setup() (which reseeds every
            # rank) and before the sanity check (run under isolate_rng, so it consumes nothing) and
            # before the fit loop creates the resumed epoch's DataLoader iterator (which draws a seed
            # from torch's RNG, ahead of on_train_start). That is where an uninterrupted run stood
            # after an epoch's last batch. Inside an epoch (a checkpoint of every_n_train_steps, or
            # of a SIGTERM), it had drawn that seed before the save: the states are set where the
            # first resumed batch starts instead, after the iterator's draw.
            if _inside_epoch(checkpoint):
                self._rng_at_first_batch = resume["rng"]
            else:
                ckpt.set_rng_state(resume["rng"])
            return
        if not self._warned_layout:
            self._warned_layout = True
            rank_zero_warn(
                f"resuming {resume.get('path')}: written by {saved['world_size']} rank(s) with sample_parallel="
                f"{saved['sample_parallel']}, now {now['world_size']} rank(s) with sample_parallel={now['sample_parallel']}. "
                "Model, optimizers and loops are restored (DCP reshards), but the RNG streams differ: every rank keeps "
                "its fresh seed, so this run will not repeat the random draws of an uninterrupted one."
            )

    # -- saving

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_train_steps:  # after a resume, the restored step
            self._period = trainer.global_step // self.every_n_train_steps
        self._note_stop_signals(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_at_first_batch is not None:
            ckpt.set_rng_state(self._rng_at_first_batch)
            self._rng_at_first_batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fault = _env_fault("RWS_FAULT_KILL_AT_STEP")
        if fault and trainer.global_step >= int(fault[0]) and (len(fault) < 2 or int(fault[1]) == trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)
        inside = batch_idx + 1 < trainer.num_training_batches  # at the last, the epoch's end follows
        if self.every_n_train_steps:
            period, previous = trainer.global_step // self.every_n_train_steps, self._period
            self._period = period
            if period > previous and inside:
                self.save(trainer, pl_module)  # every rank is at the same step here: the save is collective
        every = 1 if trainer.world_size == 1 else max(1, trainer.log_every_n_steps)
        if inside and (batch_idx + 1) % every == 0 and (signum := self._agreed_stop_signal(trainer, pl_module)):
            self._stop(trainer, pl_module, signum)

    def _epoch_score(self, trainer: pl.Trainer) -> float | None:
        """`monitor` of the current epoch's validation, None if it did not validate.

        Why: with check_val_every_n_epoch > 1, callback_metrics still hold an earlier epoch's
        score, which would make an unvalidated checkpoint look like (and be kept as) the best.
        """
        return float(trainer.callback_metrics[self.monitor]) if self.validated(trainer, self.monitor) else None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not trainer.sanity_checking:
            self.save(trainer, pl_module)
        if signum := self._agreed_stop_signal(trainer, pl_module):  # e.g. one that came during the validation
            self._stop(trainer, pl_module, signum)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ckpt.PendingSave:
        """Save now, collectively (every rank must call it)."""
        self.wait()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        datamodule = trainer.datamodule
        per_rank = split_per_rank(checkpoint, type(datamodule).__qualname__ if datamodule is not None else None)
        score = self._epoch_score(trainer)
        step, epoch = trainer.global_step, trainer.current_epoch
        self._saved_step = step
        self._pending = ckpt.save(
            self.resolve_dirpath(trainer),
            checkpoint_name(epoch, step),
            checkpoint,
            per_rank,
            step=step,
            epoch=epoch,
            score=score,
            meta={**self._layout(trainer, pl_module), "monitor": self.monitor},
            keep_last=self.keep_last,
            mode=self.mode,
            process_group=self._group,
            async_save=self.async_save,
            fault_hook=self._fault_hook(step, trainer.global_rank),
        )
        if not self.async_save:
            self.last_saved = self._pending.wait()
            self._pending = None
        return self._pending

    @staticmethod
    def _fault_hook(step: int, rank: int):
        fault = _env_fault("RWS_FAULT_KILL_IN_SAVE")
        if not fault or int(fault[0]) != step or rank != 0:
            return None
        stage = fault[1] if len(fault) > 1 else "data_written"

        def hook(at: str, path: Path) -> None:
            if at == stage:
                os.kill(os.getpid(), signal.SIGKILL)

        return hook

    def wait(self) -> None:
        """Block until a pending async save is committed (raises its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.last_saved = pending.wait()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_signal_handlers(trainer)
        self.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._failed:
            self.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._failed = True
        self._restore_signal_handlers(trainer)
        if self._pending is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return  # other ranks may be gone: waiting could hang; the save stays a .partial directory
        try:
            self.wait()
        except Exception as error:  # noqa: BLE001 - the original exception matters more
            log.warning("checkpoint save failed: %s", error)

    # -- stopping on SIGTERM or Ctrl-C

    def _note_stop_signals(self, trainer: pl.Trainer) -> None:
        """Handle SIGTERM and SIGINT during training by noting the signal (`on_train_end` or
        `on_exception` restores the handlers found).

        Why: Lightning's SIGTERM handler makes each rank stop at the end of the batch it is in (and
        runs a broadcast inside the handler), and Ctrl-C raises KeyboardInterrupt wherever the rank
        is, inside a step. The ranks of a multi-process fit could then stop at different batches,
        where no collective save can be made. Here the ranks act on their notes together
        (`_agreed_stop_signal`), so a signal to any one of them stops all. After a first Ctrl-C,
        the next one raises KeyboardInterrupt as usual.
        """
        self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread can set handlers (Lightning sets none there either)
        where = " within --trainer.log_every_n_steps batches" if trainer.world_size > 1 else ""
        saving = ", after a checkpoint" if self._saves_on_stop() else ""
        notice = f"\nrws fit: Ctrl-C: stopping between two batches{where}{saving}; Ctrl-C again stops at once, saving nothing\n"

        def note(signum, frame) -> None:
            self._stop_signal = self._stop_signal or signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if trainer.is_global_zero:
                    os.write(2, notice.encode())  # not print(): the handler may have interrupted a write to stderr

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._replaced_handlers.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, note)
        # Lightning broadcasts rank 0's SIGTERM flag before every batch of a multi-process fit: a
        # collective and a host sync per step (a 2-rank CPU fit of configs/debug.yaml stepped 1.22x
        # as fast without it: benchmarks/RESULTS.md, "Lightning's per-batch SIGTERM broadcast").
        # Its handler no longer runs during training, so the flag stays unset: nothing to broadcast.
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.world_size > 1 and hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = _no_broadcast

    def _restore_signal_handlers(self, trainer: pl.Trainer) -> None:
        while self._replaced_handlers:
            signum, handler = self._replaced_handlers.popitem()
            signal.signal(signum, handler)
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)  # back to the class's method

    def _saves_on_stop(self) -> bool:
        return self.save_on_sigterm and self.saves

    def _agreed_stop_signal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The signal any rank has noted (SIGTERM before SIGINT), 0 for none. Collective with several
        ranks: all call it at the same batch."""
        if trainer.world_size == 1:
            return self._stop_signal
        noted = torch.tensor([self._stop_signal], device=pl_module.device)
        dist.all_reduce(noted, op=dist.ReduceOp.MAX)
        return int(noted.item())

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, signum: int) -> None:
        """Save where the ranks agreed to stop on signal `signum` (unless saved there already), then
        raise StopSignal, which `rws` turns into exit code 128 + signum. The training state is whole
        here: between two batches."""
        step = trainer.global_step
        if self._saves_on_stop() and self._saved_step != step:
            self.save(trainer, pl_module)
            self.wait()
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            if self._saved_step == step:
                log.warning("%s at step %d: saved checkpoint %s; `--resume auto` continues from it", name, step, self.last_saved)
            else:
                reason = "--dcp.save_on_sigterm false" if self.saves else "checkpoints are off"
                newest = f"the newest is {self.last_saved}" if self.last_saved else "none was saved in this run"
                log.warning("%s at step %d: no checkpoint saved there (%s); %s", name, step, reason, newest)
        raise StopSignal(signum)

    def state_dict(self) -> dict[str, Any]:
        return {}


def check_directory_path(dirpath: Path) -> None:
    """ValueError if a file stands where `dirpath` or one of its parents must be a directory: checked
    before training, as the first save (an epoch later) would fail there."""
    for path in (dirpath, *dirpath.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"checkpoint directory {dirpath}: {path} is a file, not a directory")
            return


def refuse_foreign_checkpoints(dirpath: Path) -> None:
    """ValueError if `dirpath` holds complete checkpoints: a fresh run writing there would replace
    same-named ones and leave `--resume auto` to pick from two runs."""
    found = ckpt.list_complete(dirpath)
    if found:
        raise ValueError(
            f"checkpoint directory {dirpath} already holds {len(found)} complete checkpoint(s) (the newest: "
            f"{found[-1].path.name}); give --resume auto to continue from them, or --dcp.dirpath or "
            "--trainer.default_root_dir for a new run"
        )


def resolve_resume(resume: str | None, dirpath: Path) -> str | None:
    """The `ckpt_path` for `rws fit --resume RESUME`.

    'auto': the newest written complete checkpoint under `dirpath` that passes its sha256 check; a
    damaged newer one (its COMPLETE marker or a data file) is skipped with a warning naming the
    file; None (fresh start, with a message) when there is none. A PATH: that checkpoint directory
    (verified: a damaged one is an error naming the file), a directory of checkpoints (its newest
    written complete one, no fallback), or a checkpoint file. Either way the fit may then write
    into `dirpath` although it holds checkpoints (see `refuse_foreign_checkpoints`).
    """
    if resume is None:
        return None
    ckpt_path = _resume_path(resume, dirpath)
    _RESUME_ASKED.add(str(dirpath.resolve()))
    return ckpt_path


def _resume_path(resume: str, dirpath: Path) -> str | None:
    if resume == "auto":

        damaged = []

        def skipped(path: Path, error: ckpt.CheckpointError) -> None:
            damaged.append(path)
            rank_zero_warn(f"--resume auto: skipping damaged checkpoint {path} ({error}); trying the previous complete one")

        info = ckpt.latest_complete(dirpath, check=True, on_skip=skipped)
        if info is None:
            what = "undamaged complete checkpoint" if damaged else "complete checkpoint"
            rank_zero_info(f"--resume auto: no {what} under {dirpath}; starting fresh")
            return None
        rank_zero_info(f"--resume auto: resuming from {info.path} (epoch {info.epoch}, step {info.step})")
        _VERIFIED.add(str(info.path.resolve()))
        return str(info.path)
    path = Path(resume)
    if path.name.endswith(ckpt.PARTIAL):
        raise ValueError(f"--resume {path}: an interrupted save, not a complete checkpoint; give the checkpoint before it")
    if path.is_dir() and not (path / ckpt.MARKER).exists():
        infos = ckpt.list_complete(path) or ckpt.list_complete(path / "checkpoints")
        if not infos:
            raise FileNotFoundError(f"--resume {path}: no complete checkpoint in this directory")
        path = infos[-1].path
    if path.is_dir():
        ckpt.verify(path)
        _VERIFIED.add(str(path.resolve()))
    elif not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return str(path)
