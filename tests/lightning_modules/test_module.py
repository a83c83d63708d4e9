"""Construction details of the LightningModule and DataModule that end-to-end tests would only catch by chance."""

import gc
import weakref

import pytest

from lightning_modules.datamodule import BinarizedMNISTDataModule
from lightning_modules.module import RWSModule


class _Local:
    """Something held only by a caller's local variable."""


def _locals_outlive_the_call(build) -> bool:
    """Whether a local of the function that calls `build()` is still alive after that function
    returned, before any garbage collection (reference counting alone)."""

    def caller():
        local = _Local()
        build()
        return weakref.ref(local)

    gc.collect()
    gc.disable()
    try:
        return caller()() is not None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "build",
    [lambda: RWSModule(layer_sizes=[6, 4, 2]), lambda: BinarizedMNISTDataModule(batch_size=10)],
    ids=["RWSModule", "BinarizedMNISTDataModule"],
)
def test_building_frees_the_callers_locals_without_a_gc_pass(build):
    # Lightning's save_hyperparameters looks up its caller's frame and, left to find it itself,
    # keeps it in a reference cycle: the caller's locals (`rws eval`'s data and process group)
    # then live until a gc pass, as late as interpreter exit, where gloo's threads abort.
    assert not _locals_outlive_the_call(build)
