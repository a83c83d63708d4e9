"""One trial of `rws tune`: sampled values -> the trial's `rws fit` config -> training, reported to Tune.

A trial builds model, data and Trainer from its fit config (`SearchSpec.fit_config`) with `rws
fit`'s own LightningCLI (`RWSLightningCLI` with `cli_kwargs()`), so it trains exactly as
`rws fit --config` on that config would. Only the RUNTIME settings below are added (the trial's
directory, no progress bar, no checkpoints besides the ones handed to Ray); they are never
exported. Lightning's SaveConfigCallback writes the resolved config into the trial's log directory.

- `workers_per_trial == 1`: the Lightning Trainer runs inside the Tune trial. `ReportToRay`
  reports val/log_likelihood and a Lightning checkpoint at each epoch end (`ray.tune.report`);
  a retried trial resumes from `ray.tune.get_checkpoint()`.
- `workers_per_trial > 1`: the trial fits a Ray Train `TorchTrainer` of that many workers, each
  running the same Trainer with Ray's DDP strategy (Ray 2.60 runs Train V2, where a Tune trial
  builds and fits the TorchTrainer). The workers report with `ray.train.report`;
  `TuneReportCallback` forwards each report to Tune. A retried trial re-creates the TorchTrainer
  under the same name and storage path, which makes Ray Train restore its latest checkpoint
  (`ray.train.get_checkpoint()` in the workers).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray.train
import ray.tune
import torch
from pytorch_lightning.callbacks import Checkpoint

from lightning_modules.callbacks import METRIC, ValidationEpoch
from lightning_modules.cli import RWSLightningCLI, cli_kwargs
from lightning_modules.module import check_precision, check_schedule
from tune.space import DERIVED, SearchConfigError, SearchSpec, set_dotted

BEST_METRIC = f"best_{METRIC}"  # the trial's best METRIC so far, in each report
CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside each Ray checkpoint
ARGS_WARNING = ".*args parameter is intended to run from within Python.*"  # args is a config dict here, on purpose
COORDINATOR_CPU = 0.01  # the Tune trial of a multi-worker trial only waits on its TorchTrainer

# Trial-only fit settings: Ray keeps the checkpoints (one per reported epoch), so Lightning's own
# and the DCP checkpoints would only duplicate them.
RUNTIME = {
    "trainer.enable_progress_bar": False,
    "checkpoint.save_top_k": 0,
    "checkpoint.save_last": False,
    "dcp.every_n_epochs": 0,
}


class ReportToRay(ValidationEpoch, Checkpoint):
    """At each epoch end with a validation result of that epoch: report it, with a checkpoint to resume from.

    A Checkpoint callback, because Lightning runs those after the LightningModule's
    `on_train_epoch_end` (where the LR schedulers step): the checkpoint holds the epoch's final
    state. Under DDP every rank calls `report` (Ray Train's barrier); rank 0 writes the file.
    Epochs without validation (check_val_every_n_epoch > 1) report nothing, not the last value.

    Each report also carries the trial's best score so far and its epoch (BEST_METRIC,
    "best_epoch"; kept in the checkpoint, so a retried trial goes on from them). The results table
    reads them from the last result, which Ray saves with the experiment state: a trial's result
    history (result.json) is synced to storage later, so a search killed in between loses it.

    Args:
        report: `ray.tune.report` (in a Tune trial) or `ray.train.report` (in a Ray Train worker).
        checkpoint_type: the matching `ray.tune.Checkpoint` or `ray.train.Checkpoint`.
    """

    def __init__(self, report: Callable, checkpoint_type: type):
        super().__init__()
        self.report = report
        self.checkpoint_type = checkpoint_type
        self.best = {BEST_METRIC: -math.inf, "best_epoch": None}  # a NaN score is never the best

    def state_dict(self) -> dict[str, Any]:
        return dict(self.best)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.validated(trainer):
            return
        score = float(trainer.callback_metrics[METRIC])
        if score > self.best[BEST_METRIC]:
            self.best = {BEST_METRIC: score, "best_epoch": trainer.current_epoch}
        metrics = {METRIC: score, "epoch": trainer.current_epoch, "step": trainer.global_step, **self.best}
        with tempfile.TemporaryDirectory(prefix="rws-tune-") as directory:
            trainer.save_checkpoint(Path(directory) / CHECKPOINT_FILE)
            checkpoint = self.checkpoint_type.from_directory(directory) if trainer.is_global_zero else None
            self.report(metrics, checkpoint=checkpoint)  # copies the directory to the trial's storage


class TrialCLI(RWSLightningCLI):
    """`rws fit`'s LightningCLI on a config dict, building without running, plus trial-only extras.

    Args:
        config: the fit config (as `rws fit --config` reads it from YAML).
        trainer_kwargs: Trainer arguments that override the config (Ray's strategy, devices).
        callbacks: callbacks added to the configured ones.
    """

    def __init__(self, config: dict, trainer_kwargs: dict | None = None, callbacks: list | None = None):
        self.trial_trainer_kwargs = trainer_kwargs or {}
        kwargs = cli_kwargs()
        kwargs["trainer_defaults"] = {**kwargs["trainer_defaults"], "callbacks": callbacks or []}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=ARGS_WARNING)
            super().__init__(args=config, run=False, parser_kwargs={"exit_on_error": False}, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        return super().instantiate_trainer(**{**self.trial_trainer_kwargs, **kwargs})


class _ParseOnlyCLI(RWSLightningCLI):
    """The fit parser alone: no seeding, nothing instantiated."""

    def _set_seed(self) -> None:
        return None

    def instantiate_classes(self) -> None:
        return None


def check_fit_configs(spec: SearchSpec) -> None:
    """Parse every value of every space key (each choice, both bounds of each range) into a fit
    config and build its model, DataModule and callbacks (no Trainer, no data read): a bad key or
    value fails here, named, before Ray starts."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ARGS_WARNING)
        parser = _ParseOnlyCLI(args={}, run=False, parser_kwargs={"exit_on_error": False}, **cli_kwargs()).parser

    def error_of(sample: dict[str, Any], search: SearchSpec = spec) -> str | None:
        try:
            config = parser.parse_object(search.fit_config(sample))
            check_trial_settings(config, search)
            parser.instantiate(config)
        except (ArgumentError, ValueError, TypeError, KeyError, ImportError) as error:
            return " ".join(str(error.args[0] if isinstance(error, KeyError) else error).split())
        return None

    (_, first), *corners = spec.corner_samples()
    message = error_of(first)
    if message is not None:
        raise SearchConfigError(f"{blame(spec, first, error_of)}: {message}")
    for key, sample in corners:
        message = error_of(sample)
        if message is not None:
            raise SearchConfigError(f"space.{key} = {sample[key]!r}: {message}")


def check_trial_settings(config, spec: SearchSpec) -> None:
    """ValueError for a parsed fit config that `rws fit` would refuse at its start, or that would
    fail only inside Ray: a trial ranks by the validation it reports, and its processes are Ray's."""
    check_precision(config.trainer.precision or "32-true")
    unbounded = config.trainer.max_epochs is None and config.trainer.max_steps in (None, -1)
    check_schedule(config.model.lr_schedule, 1000 if unbounded else config.trainer.max_epochs)  # 1000: Lightning's default
    if config.trainer.limit_val_batches == 0:
        raise ValueError(f"trainer.limit_val_batches=0: a trial reports {METRIC} after each validation, and ASHA ranks by it")
    every, epochs = config.trainer.check_val_every_n_epoch, config.trainer.max_epochs
    if every is not None and epochs is not None and 0 < epochs < every:
        raise ValueError(
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={epochs}: "
            f"a trial would never report {METRIC}"
        )
    devices = config.trainer.devices
    if spec.workers_per_trial == 1 and devices not in (None, "auto", 1, "1"):
        raise ValueError(
            f"trainer.devices={devices!r}: Ray starts a trial's processes; give workers_per_trial instead"
        )
    if str(config.trainer.accelerator) in ("gpu", "cuda") and not spec.use_gpu:
        raise ValueError(f"trainer.accelerator={config.trainer.accelerator!r} needs use_gpu: true (and GPUs for the trials)")


def blame(spec: SearchSpec, first: dict[str, Any], error_of: Callable) -> str:
    """The setting that makes the first sample's fit config fail, for the error line: the
    sample_parallel setting if the sample works without it, else the base config alone, else the
    first `fixed` key that fails on its own, else the fixed keys together, else the first space key.

    Derived keys (depth, width, top_width) stay in every try: they only make sense together.
    """
    derived = {key: value for key, value in first.items() if key in DERIVED}
    fixed_derived = {key: value for key, value in spec.fixed.items() if key in DERIVED}

    def with_fixed(fixed: dict[str, Any]) -> SearchSpec:
        return SearchSpec({**spec.settings, "fixed": fixed}, spec.base)

    # The setting is in every try below (it sets model.sample_parallel): blamed first if it alone breaks the sample.
    if spec.sample_parallel > 1 and error_of(first, SearchSpec({**spec.settings, "sample_parallel": 1}, spec.base)) is None:
        return f"sample_parallel = {spec.sample_parallel}"
    if error_of(derived, with_fixed(fixed_derived)) is not None:
        return f"base_config {spec.base_config}"
    for key, value in spec.fixed.items():
        if key not in DERIVED and error_of(derived, with_fixed({**fixed_derived, key: value})) is not None:
            return f"fixed.{key} = {value!r}"
    if error_of(derived) is not None:  # fixed keys that fail only together (e.g. two trainer settings)
        return "fixed (" + ", ".join(f"{key} = {value!r}" for key, value in spec.fixed.items() if key not in DERIVED) + ")"
    for key, value in first.items():
        if key not in DERIVED and error_of({**derived, key: value}) is not None:
            return f"space.{key} = {value!r}"
    return "base_config + fixed + the first value of each space key"


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable: `config` holds the sampled values, `spec` the search (SearchSpec.to_dict())."""
    search = SearchSpec.from_dict(spec)
    fit = search.fit_config(config)
    set_dotted(fit, "trainer.default_root_dir", str(storage_dir(search)))
    for key, value in RUNTIME.items():
        set_dotted(fit, key, value)
    if search.workers_per_trial == 1:
        torch.set_num_threads(max(1, int(search.trial_cpus)))  # the trial's CPU allotment, not the machine's
        train(fit, ray.tune.get_checkpoint(), callbacks=[ReportToRay(ray.tune.report, ray.tune.Checkpoint)])
    else:
        fit_with_ray_train(fit, search)


def trial_dir_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def storage_dir(search: SearchSpec) -> Path:
    """This trial's directory in the experiment's storage (get_trial_dir() is a per-session staging
    directory, gone after a restart; Lightning's logs and the Train run must outlive it)."""
    return Path(search.storage_path) / search.name / trial_dir_name(ray.tune.get_context().get_trial_id())


def train(
    fit: dict,
    checkpoint,
    trainer_kwargs: dict | None = None,
    callbacks: list | None = None,
    prepare: Callable[[pl.Trainer], pl.Trainer] | None = None,
) -> None:
    """Build the fit config's model, data and Trainer and train, resuming from a Ray checkpoint if given."""
    cli = TrialCLI(fit, trainer_kwargs, callbacks)
    trainer = prepare(cli.trainer) if prepare is not None else cli.trainer
    if checkpoint is None:
        trainer.fit(cli.model, datamodule=cli.datamodule)
        return
    with checkpoint.as_directory() as directory:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(Path(directory) / CHECKPOINT_FILE))


def worker_resources(search: SearchSpec) -> dict[str, float]:
    """Each worker's share of the trial's resources, less what the trial itself holds."""
    workers = search.workers_per_trial
    resources = {"CPU": (search.trial_cpus - COORDINATOR_CPU) / workers}
    if search.trial_gpus:
        resources["GPU"] = search.trial_gpus / workers
    return resources


def train_worker(config: dict[str, Any]) -> None:
    """The TorchTrainer's per-worker loop: the same Trainer, with Ray's DDP strategy and environment."""
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    torch.set_num_threads(config["threads"])
    trainer_kwargs = {
        "strategy": RayDDPStrategy(),
        "plugins": [RayLightningEnvironment()],
        "devices": "auto",  # Ray assigns each worker its device; RayDDPStrategy wants Lightning's "auto"
        "accelerator": "auto",
    }
    callbacks = [ReportToRay(ray.train.report, ray.train.Checkpoint)]
    train(config["fit"], ray.train.get_checkpoint(), trainer_kwargs, callbacks, prepare=prepare_trainer)


def fit_with_ray_train(fit: dict, search: SearchSpec) -> None:
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = worker_resources(search)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"fit": fit, "threads": max(1, int(resources["CPU"]))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=search.workers_per_trial, use_gpu=search.use_gpu, resources_per_worker=resources
        ),
        # The same name and storage on every attempt: a retried trial resumes the Train run.
        run_config=ray.train.RunConfig(
            name=f"train-trial_id={ray.tune.get_context().get_trial_id()}",
            storage_path=str(storage_dir(search)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # the latest: where a retry resumes
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
