"""DataModule for binarized MNIST held in memory (the embedded default, `.amat` files or `.npz`)."""

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipeline.data import load_binarized_mnist


class BinarizedMNISTDataModule(pl.LightningDataModule):
    """Binarized MNIST, loaded whole into memory.

    Args:
        path: a directory with Larochelle's `binarized_mnist_{train,valid,test}.amat`, or an `.npz`
            with arrays `train`, `valid`, `test` (packed with np.packbits or 0/1). None: the small
            subset of the standard binarization embedded in the package (10k/1k/1k).
        batch_size: training minibatch size.
        eval_batch_size: minibatch size of validation and test (their K samples multiply it).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str | None = None, batch_size: int = 100, eval_batch_size: int = 100, num_workers: int = 0):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        self.save_hyperparameters()
        self.splits: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None):
        if not self.splits:
            self.splits = load_binarized_mnist(self.hparams.path)

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

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(self.splits[split])
        rank, size = self.data_parallel_layout()
        sampler = None
        if size > 1:
            # Why the global seed, not torch's: every rank must shuffle alike, and rank RNGs may differ.
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = DistributedSampler(dataset, size, rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle,  # equal batch shapes in training; evaluation keeps every point
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("valid", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
