"""The `rws` command: `fit`/`validate`/`test` through LightningCLI, plus `eval` and `sample`.

    rws fit --config configs/sbn_200_200_10.yaml [--model.num_samples 10 ...]
    rws eval --checkpoint PATH --num-samples 5000 --split test [--json]
    rws sample --checkpoint PATH --num 64 --out samples.png

Other packages add commands through the `rws.commands` entry-point group (NAME = "module:main",
main(argv) -> exit code), e.g. `rws tune` from the `tune` package, which imports this one, never
the reverse.
"""

import os
import sys
from importlib.metadata import entry_points

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_modules.callbacks import CPUTimeBudget, PrintValidation, SampleGrid
from lightning_modules.checkpoint_cli import checkpoint_main
from lightning_modules.checkpointing import DistributedCheckpoint, resolve_resume
from lightning_modules.data_cli import data_main
from lightning_modules.datamodule import BinarizedMNISTDataModule
from lightning_modules.evaluate import eval_main, sample_main
from lightning_modules.module import RWSModule

TOOLS = {"eval": eval_main, "sample": sample_main, "data": data_main, "checkpoint": checkpoint_main}

USAGE = """usage: rws {fit,validate,test,eval,sample,data,checkpoint,tune} ...

Reweighted Wake-Sleep training of Helmholtz machines.

commands:
  fit        train a model (LightningCLI: --config configs/NAME.yaml, --model.*, --data.*, --trainer.*)
  validate   run validation on a checkpoint (--ckpt_path)
  test       run the test split on a checkpoint (--ckpt_path)
  eval       estimate log p(x) of a checkpoint with many importance samples
  sample     write a grid image of model samples
  data       dataset tools: `rws data prepare` writes WebDataset shards (see docs/data.md)
  checkpoint checkpoint tools: `rws checkpoint consolidate DIR OUT.pt`, `verify DIR`, `list DIR`
  tune       hyperparameter search with Ray Tune: `rws tune --config configs/tune/debug.yaml` (see docs/tune.md)

`rws COMMAND --help` shows a command's options; `rws fit ... --dry-run` prints the resolved
config and process layout without training (see docs/cluster.md)."""


class RWSLightningCLI(LightningCLI):
    """LightningCLI with the project's callbacks always present and configurable."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/log_likelihood",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(PrintValidation, "print_validation")
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(CPUTimeBudget, "cpu_time_budget")
        parser.add_lightning_class_args(DistributedCheckpoint, "dcp")
        parser.add_argument(
            "--resume", type=str | None, default=None,
            help="fit only: 'auto' (the newest complete checkpoint in --dcp.dirpath, default DEFAULT_ROOT_DIR/checkpoints; "
            "a fresh start if none) or a checkpoint directory or file",
        )  # fmt: skip

    def before_fit(self) -> None:
        """`--resume auto|PATH` -> fit's ckpt_path (on every rank: they see the same files)."""
        config = self.config_init[self.subcommand]
        if config.get("resume") is None:
            return
        if config.get("ckpt_path") is not None:
            raise ValueError("give either --resume or --ckpt_path, not both")
        callback = next(cb for cb in self.trainer.callbacks if isinstance(cb, DistributedCheckpoint))
        config["ckpt_path"] = resolve_resume(config["resume"], callback.resolve_dirpath(self.trainer))


def cli_kwargs() -> dict:
    """The constructor arguments of `rws fit/validate/test`, shared with `rws fit --dry-run`."""
    return dict(
        model_class=RWSModule,
        datamodule_class=BinarizedMNISTDataModule,
        seed_everything_default=1234,
        # The DataModule splits data by data-parallel rank itself, so Lightning must not add a sampler.
        trainer_defaults={"default_root_dir": "runs", "log_every_n_steps": 50, "use_distributed_sampler": False},
    )


def plugin_command(name: str):
    """The main(argv) of command `name` from the `rws.commands` entry-point group, or None."""
    found = entry_points(group="rws.commands", name=name)
    return next(iter(found)).load() if found else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rws` console script; `argv` defaults to the command line.

    Bad input (a wrong config value, a missing or corrupt file) ends with one line naming the key
    or file and exit code 2; set RWS_TRACEBACK=1 to see the traceback instead.
    """
    args = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if argv[0] in TOOLS:
            return TOOLS[argv[0]](argv[1:])
        plugin = plugin_command(argv[0]) if argv[0] not in ("fit", "validate", "test") else None
        if plugin is not None:
            return plugin(argv[1:])
        if argv[0] == "fit" and "--dry-run" in argv:
            from lightning_modules.launch import dry_run  # config and process layout, no training

            return dry_run(argv)
        RWSLightningCLI(args=args, **cli_kwargs())  # args None: LightningCLI reads sys.argv itself
    except (FileNotFoundError, ValueError, KeyError) as error:
        if os.environ.get("RWS_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"rws {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
