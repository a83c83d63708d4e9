"""DataModule for binarized MNIST held in memory (the embedded default, `.amat` files or `.npz`)."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

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

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(self.splits[split]),
            batch_size=batch_size,
            shuffle=shuffle,
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
