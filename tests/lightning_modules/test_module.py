"""Construction details of the LightningModule and DataModule that end-to-end tests would only catch by chance."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.datamodule import BinarizedMNISTDataModule
from lightning_modules.module import NonFiniteError, RWSModule


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


def test_momentum_optimizer_takes_the_authors_steps():
    # jbornschein/reweighted-ws, learning/training.py: d <- m d + (1 - m) lr g, theta <- theta + d,
    # with d starting at zero (g ascends log p; here gradients descend the loss, hence the signs).
    lr, m = 0.1, 0.9
    module = RWSModule(layer_sizes=[6, 4, 2], optimizer="momentum", momentum=m, p_lr=lr, q_lr=lr)
    p_optimizer, q_optimizer = module.configure_optimizers()
    parameters = list(module.model.parameters())
    expected = [parameter.detach().clone() for parameter in parameters]
    step = [torch.zeros_like(parameter) for parameter in parameters]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for parameter, param_step, param_expected in zip(parameters, step, expected, strict=True):
            parameter.grad = torch.randn(parameter.shape, generator=generator)
            param_step.mul_(m).add_((1 - m) * lr * parameter.grad)
            param_expected.sub_(param_step)
        p_optimizer.step()
        q_optimizer.step()
    for parameter, param_expected in zip(parameters, expected, strict=True):
        torch.testing.assert_close(parameter.detach(), param_expected)


def test_resuming_with_another_optimizer_is_refused():
    """By fit only: validate, test and load_from_checkpoint (no trainer) load no optimizer state."""
    module = RWSModule(layer_sizes=[6, 4, 2], optimizer="momentum")
    for stage in ("validate", "test", None):
        module._trainer = stage and SimpleNamespace(state=SimpleNamespace(fn=stage), ckpt_path="last.ckpt")
        module.on_load_checkpoint({"hyper_parameters": {"optimizer": "adam"}})
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), ckpt_path="last.ckpt")
    with pytest.raises(ValueError, match=r"model.optimizer='momentum'.*trained with 'adam'.*--model.optimizer adam"):
        module.on_load_checkpoint({"hyper_parameters": {"optimizer": "adam"}})
    with pytest.raises(ValueError, match="trained with 'adam'"):  # checkpoints from before the option: Adam
        module.on_load_checkpoint({"hyper_parameters": {}})
    module.on_load_checkpoint({"hyper_parameters": {"optimizer": "momentum"}})


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_momentum_outside_0_1_is_refused(momentum):
    with pytest.raises(ValueError, match="model.momentum must be in"):
        RWSModule(layer_sizes=[6, 4, 2], optimizer="momentum", momentum=momentum)


def test_nan_losses_stop_training_before_any_checkpoint_is_written(tmp_path):
    module = RWSModule(layer_sizes=[784, 8, 4], num_samples=2, val_num_samples=2)
    with torch.no_grad():
        module.model.q_conditionals[0].bias[0] = float("nan")  # every log-weight of the first batch is NaN
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=1, log_every_n_steps=50,
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
    )
    # Checked on the epoch's last batch (4 < log_every_n_steps), and reported from the first.
    with pytest.raises(NonFiniteError, match=r"epoch 0, batch 0: the training losses are NaN.*q_conditionals\.0\.bias"):
        trainer.fit(module, BinarizedMNISTDataModule(batch_size=20))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_checkpoint_of_nan_parameters_is_refused():
    module = RWSModule(layer_sizes=[6, 4, 2])
    module.on_save_checkpoint({})
    with torch.no_grad():
        module.model.p_prior.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameters p_prior\.bias are NaN or infinite"):
        module.on_save_checkpoint({})
