"""Faults injected into `rws tune` trials by the tests, through a trial's fit config:

    --fixed.trainer.callbacks '[{class_path: tests.tune.faults.FailOnce, init_args: {marker: PATH}}]'

Test code only: nothing in `tune/` knows about it.
"""

from pathlib import Path

import pytorch_lightning as pl


class FailOnce(pl.Callback):
    """Raise at the start of epoch `epoch`, once across all trials and attempts.

    The first process to create `marker` raises; every later one (a retry, another trial) trains on.

    Args:
        marker: a file that records that the fault happened.
        epoch: the epoch whose start fails (after the previous epochs were reported and checkpointed).
    """

    def __init__(self, marker: str, epoch: int = 1):
        self.marker = Path(marker)
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        try:
            self.marker.open("x").close()  # atomic: exactly one process wins
        except FileExistsError:
            return
        raise RuntimeError(f"injected fault at the start of epoch {self.epoch}")
