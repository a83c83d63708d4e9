"""Callbacks: readable progress lines, sample grids in TensorBoard, and a CPU-time budget."""

import math
import time

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from pipeline.images import image_grid, square_shape

METRIC = "val/log_likelihood"


class ValidationEpoch(pl.Callback):
    """Knows whether validation ran in the current epoch.

    Why not `METRIC in trainer.callback_metrics`: the metric stays there from the last validation,
    so with check_val_every_n_epoch > 1 the epochs in between would repeat a stale value.
    """

    def __init__(self):
        super().__init__()
        self.validated_epoch: int | None = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:  # the sanity check's value is no validation result
            self.validated_epoch = trainer.current_epoch

    def validated(self, trainer, metric: str = METRIC) -> bool:
        """Whether this epoch's validation result `metric` is in trainer.callback_metrics."""
        return self.validated_epoch == trainer.current_epoch and metric in trainer.callback_metrics


class PrintValidation(ValidationEpoch):
    """At each epoch end with a validation, print one line with the validation log-likelihood and the train diagnostics."""

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.validated(trainer):
            return
        metrics = trainer.callback_metrics
        line = f"epoch {trainer.current_epoch} step {trainer.global_step}: val/log_likelihood {metrics[METRIC]:.3f} nats"
        if "train/log_likelihood_epoch" in metrics:
            line += f", train/log_likelihood {metrics['train/log_likelihood_epoch']:.3f}, train/ess {metrics['train/ess_epoch']:.2f}"
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            trainer.progress_bar_callback.print(line)  # below the bar, not glued to its last line
        else:
            rank_zero_info(line)


class SampleGrid(pl.Callback):
    """After each validation, log a grid of `num` model samples x ~ P to TensorBoard.

    Args:
        num: number of samples in the grid, >= 1.
    """

    def __init__(self, num: int = 64):
        if num < 1:
            raise ValueError(f"sample_grid.num must be >= 1, got {num}")
        self.num = num

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        x, _ = pl_module.model.sample_p(self.num)
        shape = square_shape(x.shape[1])
        if shape is None:
            return  # not square images: nothing sensible to draw
        grid = image_grid(x, shape)
        trainer.logger.experiment.add_image("samples", grid, trainer.global_step, dataformats="HW")


class CPUTimeBudget(pl.Callback):
    """Stop training at the end of the first epoch after `seconds` of this process's CPU time.

    CPU time, unlike wall time, is not stretched by other jobs on the machine, so two runs given
    the same budget get the same compute. Checked at epoch ends, after validation, so the last
    epoch is validated and checkpointed. `seconds=None` disables the budget.

    Args:
        seconds: CPU seconds of training (>= 0; 0 stops after the first epoch), or None.
    """

    def __init__(self, seconds: float | None = None):
        if seconds is not None and not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"cpu_time_budget.seconds must be a number >= 0 (or null: no budget), got {seconds}")
        self.seconds = seconds
        self.start = 0.0

    def on_train_start(self, trainer, pl_module):
        self.start = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.seconds is None:
            return
        spent = time.process_time() - self.start
        if trainer.strategy.reduce_boolean_decision(spent >= self.seconds, all=False):
            rank_zero_info(f"CPU-time budget reached: {spent:.0f} s >= {self.seconds:.0f} s, stopping")
            trainer.should_stop = True
