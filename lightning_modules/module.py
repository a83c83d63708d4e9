"""The LightningModule: Reweighted Wake-Sleep training of a Helmholtz machine.

Thin glue around `pipeline`: one shared step computes the RWS surrogates, P and Q have their own
optimizers and learning rates, and metrics are logged as `split/metric`.
"""

import inspect
import math
import os
import warnings
from collections.abc import Iterable
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from pipeline.allocator import retain_freed_memory
from pipeline.distributed import agrees_across, fingerprint, init_sample_parallel_mesh, rank_seed
from pipeline.estimators import log_likelihood, rws_surrogates
from pipeline.models import HelmholtzMachine


class NonFiniteError(ValueError):
    """Training produced NaN or infinite losses or parameters."""


class SampleGroupSplitError(ValueError):
    """The ranks of a sample group trained on different minibatches."""


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors (e.g. `model.named_parameters()`) that hold a NaN or an infinity."""
    return [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_schedule(lr_schedule: str, max_epochs: int | None) -> None:
    """ValueError for a cosine schedule without a positive `trainer.max_epochs`, the length it anneals over.

    Why: CosineAnnealingLR over 1 epoch (what a run bounded by max_steps or max_time would get)
    repeats every 2, so every other epoch would run at lr 0.
    """
    if lr_schedule == "cosine" and (max_epochs is None or max_epochs < 1):
        raise ValueError(
            f"model.lr_schedule='cosine' anneals to 0 over trainer.max_epochs, which is {max_epochs} in this run "
            "(bounded by max_steps or max_time instead): set --trainer.max_epochs, or choose another schedule"
        )


def check_precision(precision) -> None:
    """ValueError unless `trainer.precision` keeps the log-weights in float32 or float64."""
    precision = str(precision)
    if not precision.startswith(("32", "64")):
        raise ValueError(
            f"trainer.precision={precision!r}: RWS needs float32 (or 64) log-probabilities; for faster GPU "
            "matmuls use --model.matmul_precision high (TF32) instead"
        )


# Inductor's own hint that float32 matmuls could use TF32, printed when a compiled step or `rws eval
# --compile` chunk runs on a GPU at the 'highest' precision. In rws that precision is a choice:
# --model.matmul_precision in training (Lightning's hint, reworded by the CLI, names it), and exact
# float32 for rws eval's estimates.
INDUCTOR_TF32_HINT = "TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled"


def ignore_inductor_tf32_hint() -> None:
    warnings.filterwarnings("ignore", message=INDUCTOR_TF32_HINT)


def rescale_learning_rates(checkpoint: dict, configured: dict[str, float]) -> None:
    """Scale a checkpoint's optimizer and LR-scheduler states to the configured base learning rates:
    P's optimizer (the first) by p_lr / the saved p_lr, Q's (the second) by q_lr / the saved q_lr.

    Why: Lightning restores each optimizer's param_groups, lr included, over the optimizer the
    module built, so a resumed fit silently kept the old rates whatever --model.p_lr said. Scaling
    rather than setting keeps a schedule's progress: it continues as new base x its factor so far.
    """
    saved = checkpoint.get("hyper_parameters", {})
    optimizer_states = checkpoint.get("optimizer_states") or []
    scheduler_states = checkpoint.get("lr_schedulers") or []
    for index, name in enumerate(("p_lr", "q_lr")):
        if not saved.get(name) or saved[name] == configured[name] or index >= len(optimizer_states):
            continue
        ratio = configured[name] / saved[name]
        for group in optimizer_states[index].get("param_groups", []):
            for key in ("lr", "initial_lr"):  # initial_lr: where a scheduler starts from
                if key in group:
                    group[key] = group[key] * ratio
        if index < len(scheduler_states):
            for key in ("base_lrs", "_last_lr"):
                if key in scheduler_states[index]:
                    scheduler_states[index][key] = [lr * ratio for lr in scheduler_states[index][key]]


class RWSModule(pl.LightningModule):
    """Reweighted Wake-Sleep on a Helmholtz machine with separate optimizers for P and Q.

    Args:
        layer_sizes: units per layer, data first: [D, H_1, ..., H_L].
        p_layer: layer type of P ('sbn', 'darn', 'nade'), or a list of L + 1 types bottom-up
            [p(x|h_1), ..., p(h_L)].
        q_layer: layer type of Q, or a list of L types bottom-up [q(h_1|x), ..., q(h_L|h_{L-1})].
        nade_hidden: hidden units of each NADE layer.
        num_samples: K, samples from Q per data point in training.
        q_update: Q's update: 'wake', 'sleep' or 'wake-sleep'. K=1 with 'sleep' is classical wake-sleep.
        p_lr: learning rate of P.
        q_lr: learning rate of Q (its wake and sleep updates).
        optimizer: 'adam', or 'momentum': the update of the authors' code (jbornschein/reweighted-ws),
            a moving average of gradients started at zero, buf <- m * buf + (1 - m) * grad and
            param <- param - lr * buf. Their gradient is of the sum over the batch where ours is of
            the mean, so their lr at batch size B is lr * B here: 1e-3 at B = 100 is 0.1.
        momentum: m, the moving average's factor for optimizer='momentum' (the authors' 0.95).
        lr_schedule: 'constant', 'exponential' (times `lr_decay` each epoch) or 'cosine' (to 0 over
            the trainer's max_epochs, which must then be set; a resumed run keeps the length it started with).
        lr_decay: per-epoch factor of the exponential schedule.
        val_num_samples: K for the validation log-likelihood estimate.
        val_chunk_size: samples per chunk in validation, >= 1 (None: chosen from a memory budget).
        sample_parallel: S, ranks that share each minibatch and split its K samples (and the
            validation samples) between them; the world size must be a multiple of S, and the
            remaining factor is data parallelism. K must be divisible by S.
        compile: run the training step's `rws_surrogates` through `torch.compile`, which fuses its
            elementwise passes (and their backward) around the matmuls: on a 2-core CPU an SBN
            784-200-200-10 step is about 1.4-1.7x faster (benchmarks/RESULTS.md). The first step pays
            the compilation (about 15 s there), so short runs and tests leave it off.
        matmul_precision: `torch.set_float32_matmul_precision` for the run: 'high' lets GPUs use
            TF32 for the matmuls (float32 accumulation; the log-probs stay float32), in validation as
            in training, so `val/log_likelihood` may differ slightly from `rws eval`'s, which always
            multiplies in full float32. Lower-precision
            trainer settings (`--trainer.precision bf16-mixed`, ...) are refused: a log-weight of
            about -100 nats has a resolution of 0.5 nats in bfloat16.
    """

    def __init__(
        self,
        layer_sizes: list[int] = [784, 200, 200, 10],  # noqa: B006 - read-only default, shown by --help
        p_layer: str | list[str] = "sbn",
        q_layer: str | list[str] = "sbn",
        nade_hidden: int = 100,
        num_samples: int = 5,
        q_update: Literal["wake", "sleep", "wake-sleep"] = "wake-sleep",
        p_lr: float = 1e-3,
        q_lr: float = 1e-3,
        optimizer: Literal["adam", "momentum"] = "adam",
        momentum: float = 0.95,
        lr_schedule: Literal["constant", "exponential", "cosine"] = "constant",
        lr_decay: float = 0.99,
        val_num_samples: int = 100,
        val_chunk_size: int | None = None,
        sample_parallel: int = 1,
        compile: bool = False,
        matmul_precision: Literal["highest", "high", "medium"] = "highest",
    ):
        super().__init__()
        if num_samples < 1 or val_num_samples < 1:
            raise ValueError(f"model.num_samples and model.val_num_samples must be >= 1, got {num_samples}, {val_num_samples}")
        for name, lr in (("model.p_lr", p_lr), ("model.q_lr", q_lr)):
            # Below float32's largest value: the optimizers' float32 state cannot hold a larger step.
            if not 0 < lr <= torch.finfo(torch.float32).max:
                raise ValueError(f"{name} must be a positive number within float32's range, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"model.momentum must be in [0, 1), got {momentum}")
        if not (lr_decay > 0 and math.isfinite(lr_decay)):
            raise ValueError(f"model.lr_decay must be a positive number (the per-epoch LR factor), got {lr_decay}")
        for name, value in (("model.nade_hidden", nade_hidden), ("model.val_chunk_size", val_chunk_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if sample_parallel < 1:
            raise ValueError(f"model.sample_parallel must be >= 1, got {sample_parallel}")
        if num_samples % sample_parallel:
            raise ValueError(
                f"model.num_samples ({num_samples}) must be divisible by model.sample_parallel ({sample_parallel}), "
                "so that every rank of a sample group draws the same number of samples"
            )
        # Handed this frame (never held in a local), Lightning does not look it up itself, which leaves
        # a reference cycle that keeps every caller's locals (`rws eval`'s process group) alive until a
        # gc pass, as late as interpreter exit, where gloo's threads then abort.
        self.save_hyperparameters(frame=inspect.currentframe())
        self.mesh = None  # the ("data", "sample") DeviceMesh, built in setup() once the processes exist
        self.model = HelmholtzMachine(layer_sizes, p_layer, q_layer, nade_hidden)
        self.automatic_optimization = False  # two optimizers, one backward: the losses touch disjoint parameters
        # Static shapes: training batches all have one size (the DataModule drops the ragged tail).
        self.rws_surrogates = torch.compile(rws_surrogates, dynamic=False) if compile else rws_surrogates

    def setup(self, stage: str):
        check_precision(self.trainer.precision)
        torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        retain_freed_memory()  # each rank: its steps' temporaries stay mapped (pipeline/allocator.py)
        world_size = self.trainer.world_size
        if world_size > 1:
            self.mesh = init_sample_parallel_mesh(self.hparams.sample_parallel, self.trainer.strategy.root_device.type)
        elif self.hparams.sample_parallel != 1:
            raise ValueError(f"model.sample_parallel={self.hparams.sample_parallel} needs that many ranks; this run has 1")
        # Why reseed: Lightning seeds every rank alike, but each rank must draw its own samples.
        # Parameters are already initialized (and DDP broadcasts rank 0's), so only sampling changes.
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        torch.manual_seed(rank_seed(seed, self.trainer.global_rank))

    @property
    def sample_group(self):
        """The process group of this rank's sample group, or None without sample parallelism."""
        return self.mesh["sample"].get_group() if self.mesh is not None and self.hparams.sample_parallel > 1 else None

    def data_parallel_layout(self) -> tuple[int, int]:
        """(rank, size) among data-parallel groups: the DataModule splits data by it."""
        if self.mesh is None:
            return 0, 1
        return self.mesh["data"].get_local_rank(), self.mesh["data"].size()

    def _optimizer(self, parameters, lr: float) -> torch.optim.Optimizer:
        parameters = list(parameters)
        if self.hparams.optimizer == "adam":
            # fused: one kernel per parameter group instead of a dozen elementwise ops per tensor
            return torch.optim.Adam(parameters, lr=lr, fused=True)
        m = self.hparams.momentum
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=m, dampening=m)
        # SGD would start its buffer at the first gradient; the authors' average starts at zero.
        for parameter in parameters:
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
        return optimizer

    def configure_optimizers(self):
        optimizers = [
            self._optimizer(self.model.p_parameters(), self.hparams.p_lr),
            self._optimizer(self.model.q_parameters(), self.hparams.q_lr),
        ]
        if self.hparams.lr_schedule == "constant":
            return optimizers
        if self.hparams.lr_schedule == "exponential":
            schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt, self.hparams.lr_decay) for opt in optimizers]
        else:
            check_schedule("cosine", self.trainer.max_epochs)
            schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs) for opt in optimizers]
        return optimizers, schedulers

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Why: validate/test would report nan and exit 0, and fit would stop at its first batch
        # blaming the learning rates.
        nonfinite = nonfinite_names(checkpoint.get("state_dict", {}).items())
        if nonfinite:
            where = f"checkpoint {self._trainer.ckpt_path}" if self._trainer is not None else "the checkpoint"
            raise NonFiniteError(f"{where}: parameters {', '.join(nonfinite)} hold NaN or inf values; load an earlier checkpoint")
        # Lightning would load one optimizer's state into the other without a word (Adam's moments
        # into the momentum optimizer's buffers); validate and test load no optimizer state.
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        saved = checkpoint.get("hyper_parameters", {}).get("optimizer", "adam")
        if fitting and saved != self.hparams.optimizer:
            raise ValueError(
                f"model.optimizer={self.hparams.optimizer!r}, but the checkpoint was trained with {saved!r}, whose "
                f"state cannot continue another optimizer: resume with --model.optimizer {saved}, or start a new run"
            )
        if fitting:
            rescale_learning_rates(checkpoint, {"p_lr": self.hparams.p_lr, "q_lr": self.hparams.q_lr})

    def _data(self, batch) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return x.to(self.dtype).flatten(1)  # [B, D]

    def training_step(self, batch, batch_idx):
        x = self._data(batch)
        if self.sample_group is not None:  # compared across the group with the notes, not every step
            self._batches_seen = self._batches_seen + fingerprint(x)
        surrogates = self.rws_surrogates(self.model, x, self.hparams.num_samples, self.hparams.q_update, self.sample_group)
        p_optimizer, q_optimizer = self.optimizers()
        p_optimizer.zero_grad()
        q_optimizer.zero_grad()
        self.manual_backward(surrogates.p_loss + surrogates.q_loss)
        p_optimizer.step()
        q_optimizer.step()
        finite = torch.isfinite(surrogates.p_loss.detach()) & torch.isfinite(surrogates.q_loss.detach())
        self._note_first(~finite, "nonfinite", batch_idx)
        losses = torch.stack([surrogates.p_loss.detach(), surrogates.q_loss.detach()])
        if self.sample_group is not None:  # each rank holds S x its share: the group's sum / S is the loss
            dist.all_reduce(losses, group=self.sample_group)
            losses = losses / self.hparams.sample_parallel
        metrics = {
            "train/log_likelihood": surrogates.log_likelihood.mean(),
            "train/ess": surrogates.ess.mean(),
            "train/p_loss": losses[0],
            "train/q_loss": losses[1],
        }
        # Each step logs this rank's values as they are (a collective per step would cost a sync);
        # the epoch's means are over all ranks, reduced once at the epoch's end. The ranks of a
        # sample group log the same values (their group's), so every data group weighs the same.
        self.log_dict({f"{name}_step": value for name, value in metrics.items()}, on_step=True, on_epoch=False)
        self.log_dict({f"{name}_epoch": value for name, value in metrics.items()}, on_step=False, on_epoch=True, sync_dist=True)

    # What `_note_first` records: the epoch's first batch whose losses were NaN or infinite, and the
    # first by which the ranks of a sample group had not shared every batch (their log-weights were
    # then pooled across different images: with --data.on_error skip, a shard that one rank failed
    # to read). The latter compares the sum of the epoch's batch fingerprints when the notes are read.
    _NOTES = ("nonfinite", "split")

    def on_train_epoch_start(self):
        self._first_bad_batch = torch.full((len(self._NOTES),), -1, device=self.device)
        self._batches_seen = torch.zeros((), dtype=torch.float64, device=self.device)

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch continues it without on_train_epoch_start

    def _note_first(self, bad: torch.Tensor, note: str, batch_idx: int) -> None:
        """Note batch `batch_idx` under `note` if `bad` (a 0-dim bool tensor) and none is noted yet this
        epoch, on the device: the step never waits for the host; `on_train_batch_end` looks now and then."""
        index = self._NOTES.index(note)
        first = self._first_bad_batch[index]
        self._first_bad_batch[index] = torch.where(bad & (first < 0), batch_idx, first)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # When Lightning logs anyway, and on the epoch's last batch: before the epoch-end checkpoints.
        every = max(1, self.trainer.log_every_n_steps)
        if (batch_idx + 1) % every == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            self._raise_if_noted(batch_idx)

    def _raise_if_noted(self, batch_idx: int) -> None:
        """Raise if this epoch's notes name a batch, on every rank alike (collective: all call it at
        batch `batch_idx`, the last one trained)."""
        if self.sample_group is not None:
            self._note_first(~agrees_across(self._batches_seen, self.sample_group), "split", batch_idx)
        first = self._first_bad_batch
        if dist.is_available() and dist.is_initialized():  # every rank stops together, or DDP would hang
            first = first.clone()
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        nonfinite, split = first.tolist()
        where = f"epoch {self.current_epoch}, batch"
        if split >= 0:
            raise SampleGroupSplitError(
                f"{where} {split} or before: the ranks of a sample group trained on different minibatches, so their "
                "log-weights were normalized across different images (with --data.on_error skip: a shard that one "
                "rank could not read); training stopped before writing a checkpoint of this state. Resume with "
                "--data.on_error raise"
            )
        if nonfinite >= 0:
            parameters = nonfinite_names(self.model.named_parameters())
            raise NonFiniteError(
                f"{where} {nonfinite}: the training losses are NaN or infinite"
                + (f" and so are parameters {', '.join(parameters)}" if parameters else "")
                + "; training stopped before writing a checkpoint of this state. Lower --model.p_lr and "
                "--model.q_lr, or resume from an earlier checkpoint"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints can come between the notes' looks (--dcp.every_n_train_steps, a SIGTERM, a
        # validation inside the epoch): a state the notes condemn is never written. Every rank saves.
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and getattr(self, "_first_bad_batch", None) is not None:
            self._raise_if_noted(trainer.fit_loop.epoch_loop.batch_idx)
        parameters = nonfinite_names(self.model.named_parameters())
        if parameters:
            raise NonFiniteError(f"not writing a checkpoint: parameters {', '.join(parameters)} are NaN or infinite")

    def on_train_epoch_end(self):
        for scheduler in self.lr_schedulers() or []:
            scheduler.step()

    def _evaluate(self, batch, split: str):
        x = self._data(batch)
        estimate = log_likelihood(
            self.model, x, self.hparams.val_num_samples, self.hparams.val_chunk_size, self.sample_group
        )
        self.log(f"{split}/log_likelihood", estimate.mean(), prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")
