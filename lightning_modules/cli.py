"""The `rws` command: `fit`/`validate`/`test` through LightningCLI, plus `eval` and `sample`.

    rws fit --config configs/sbn_200_200_10.yaml [--model.num_samples 10 ...]
    rws eval --checkpoint PATH --num-samples 5000 --split test [--json]
    rws sample --checkpoint PATH --num 64 --out samples.png

Other packages add commands through the `rws.commands` entry-point group (NAME = "module:main",
main(argv) -> exit code), e.g. `rws tune` from the `tune` package, which imports this one, never
the reverse.
"""

import contextlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from importlib.metadata import entry_points, version
from pathlib import Path

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_modules.callbacks import CPUTimeBudget, PrintValidation, SampleGrid
from lightning_modules.checkpoints import read_hyperparameters, resolve_checkpoint, saved_checkpoint_dirs
from lightning_modules.checkpoint_cli import checkpoint_main
from lightning_modules.checkpointing import DistributedCheckpoint, StopSignal, refuse_foreign_checkpoints, resolve_resume
from lightning_modules.data_cli import data_main
from lightning_modules.datamodule import BinarizedMNISTDataModule
from lightning_modules.evaluate import eval_main, sample_main
from lightning_modules.launch import cluster_environment, resolve_devices
from lightning_modules.module import RWSModule, check_precision, check_schedule, ignore_inductor_tf32_hint

TOOLS = {"eval": eval_main, "sample": sample_main, "data": data_main, "checkpoint": checkpoint_main}
SUBCOMMANDS = ("fit", "validate", "test")  # LightningCLI's, less `predict`: the module has no predict_step
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[.*?\])\)"
)
_MISMATCHES_LISTED = 3
ARCHITECTURE = ("layer_sizes", "p_layer", "q_layer", "nade_hidden")  # what a checkpoint's weights fix
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself ("registry:...")

USAGE = """usage: rws {fit,validate,test,eval,sample,data,checkpoint,tune} ... | rws --version

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


class ConciseParser(LightningArgumentParser):
    """A config error ends in jsonargparse's tip (`rws fit --help`) and its error line, without the
    usage of every option (about 100 lines) in front of them."""

    def print_usage(self, file=None) -> None:
        pass  # argparse calls this only on errors; --help prints the whole help, usage included


def within(path: str | Path, directory: str | Path) -> bool:
    """Whether `path` lies in `directory`, both resolved (so neither `..` nor a symlink fools it)."""
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def lightning_resolves(ckpt_path: str) -> bool:
    """Whether `--ckpt_path` is one of Lightning's own names (last, best, hpc, registry:...), not a path."""
    return str(ckpt_path).split(":")[0] in LIGHTNING_CKPT_NAMES


TENSOR_CORES = (
    "This GPU has Tensor Cores, which float32 matmuls use only with --model.matmul_precision high (TF32) "
    "or medium (bf16 products); the default, highest, keeps exact float32 products"
)


def _in_our_words(record: logging.LogRecord) -> bool:
    """Drop Lightning's tip lines; say its Tensor Core hint (which tells the user to call
    `torch.set_float32_matmul_precision`) as the option of this CLI that does it."""
    message = str(record.msg)
    if "that has Tensor Cores" in message:
        record.msg, record.args = TENSOR_CORES, ()
    return not message.startswith("💡 Tip")


def quiet_lightning() -> None:
    """Drop lines that every fit/validate/test printed and that ask nothing of the user:
    Lightning's advertisement for its hosted logger, the FutureWarning that torch 2.13 raises
    when Lightning 2.6's own pytree helper builds a `LeafSpec`, and Lightning's false alarm that a
    mid-epoch checkpoint cannot resume its data loader; and on a GPU, word Lightning's
    Tensor Core hint as this CLI's option (and drop Inductor's, which says the same for a compiled
    step). Calling it again adds nothing."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # Lightning looks for state_dict() on the DataLoader itself; the DataModule keeps the training
    # position (ResumableSampler, StreamingLoader), so a mid-epoch resume does continue the epoch.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    ignore_inductor_tf32_hint()
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_in_our_words)


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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":  # `main` takes --dry-run before any parser runs (launch.py); --help says so
            parser.epilog = (
                "--dry-run: print the resolved config and the process layout (world size, data x sample groups, "
                "each rank's environment) and exit without training (docs/cluster.md)"
            )
        return parser

    def _set_seed(self) -> None:
        """LightningCLI's seeding, refusing `seed_everything: true` in processes that torchrun or
        srun started.

        Why: `true` draws a random seed in each process. Lightning's own launcher hands its seed to
        the processes it starts (PL_GLOBAL_SEED); torchrun and srun do not, and ranks with other
        seeds shuffle the data differently: data-parallel ranks would overlap and miss points, and
        the ranks of a sample group would weigh samples of different minibatches together.
        """
        launched = cluster_environment(os.environ) != "LightningEnvironment" and "PL_GLOBAL_SEED" not in os.environ
        if launched and self._get(self.config, "seed_everything") is True:
            raise ValueError(
                "seed_everything=true draws a random seed in every process that torchrun or srun started, so "
                "their data orders would differ; give a number, e.g. --seed_everything 42"
            )
        super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path PATH`: the model's architecture (ARCHITECTURE) comes from the checkpoint, the rest from the config.

        Lightning's own version sets every model.* key from the checkpoint's hyperparameters, over
        the command line: `rws test --model.val_num_samples 5000` would silently estimate with the
        training run's K, and a fit resumed with a lower --model.p_lr would keep the old one. PATH
        may also be a sharded checkpoint directory, or a run directory, which stands for its newest
        checkpoint (as for `rws eval --checkpoint`). A truncated file is a one-line error.
        """
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if not path or lightning_resolves(path):
            return
        if not Path(path).exists():  # Lightning would say so too, but after making the run's log directory
            raise FileNotFoundError(f"--ckpt_path {path}: no such file or directory")
        path = resolve_checkpoint(path)
        self.config[subcommand]["ckpt_path"] = str(path)
        saved = read_hyperparameters(path)
        architecture = {key: saved[key] for key in ARCHITECTURE if key in saved}
        if architecture:
            self.config = self.parser.parse_object({subcommand: {"model": architecture}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Checks of the parsed config that would otherwise fail late, or be ignored; then, before the
        Trainer exists, `quiet_lightning` (here, so that every user of this CLI gets it: `rws`, tune trials)
        and the config's matmul precision (the module sets it again at setup; Lightning checks it, and
        hints at Tensor Cores, before that)."""
        if self.subcommand not in (None, "fit") and self._get(self.config, "resume") is not None:
            raise ValueError(
                f"--resume is for fit only; {self.subcommand} takes the checkpoint to load as --ckpt_path PATH"
            )
        if self.subcommand in ("validate", "test") and self._get(self.config, "ckpt_path") is None:
            # Why refuse: Lightning would score the config's freshly initialized model, a plausible-looking number.
            raise ValueError(
                f"{self.subcommand} scores a trained model: give --ckpt_path PATH (a .ckpt or .pt file, a checkpoint "
                "directory, or a run directory such as runs, for its newest checkpoint)"
            )
        trainer = self._get(self.config, "trainer")
        if trainer is not None:  # raises a LayoutError (a ValueError) naming trainer.devices
            resolve_devices(trainer.get("devices", "auto"), trainer.get("accelerator"), 1, os.environ)
            if trainer.get("precision") is not None:  # also checked at setup; here before any run directory exists
                check_precision(trainer["precision"])
        model = self._get(self.config, "model")
        if model is not None and model.get("matmul_precision") is not None:
            torch.set_float32_matmul_precision(model["matmul_precision"])
        quiet_lightning()

    def before_fit(self) -> None:
        """Check the data against the model, then `--resume auto|PATH` -> fit's ckpt_path (on every
        rank: they see the same files). The LR schedule, and a fresh run into a directory of
        checkpoints, are refused here already (the module and the callback refuse them later too),
        before the logger makes its version directory."""
        self.check_data("fit")
        check_schedule(self.model.hparams.lr_schedule, self.trainer.max_epochs)
        config = self.config_init[self.subcommand]
        callback = next(cb for cb in self.trainer.callbacks if isinstance(cb, DistributedCheckpoint))
        dirpath, ckpt_path = callback.resolve_dirpath(self.trainer), config.get("ckpt_path")
        if config.get("resume") is not None:
            if ckpt_path is not None:
                raise ValueError("give either --resume or --ckpt_path, not both")
            config["ckpt_path"] = resolve_resume(config["resume"], dirpath)
            if config["ckpt_path"] is not None:
                read_hyperparameters(Path(config["ckpt_path"]))  # Lightning's KeyError for another file names neither
        elif callback.saves and not (ckpt_path is not None and self.continues_this_run(ckpt_path, dirpath)):
            # A fresh run, or one branching from another run's checkpoint: either would mix its
            # checkpoints with those already there.
            refuse_foreign_checkpoints(dirpath)
        self.continue_checkpoint_dirs(config.get("ckpt_path"))

    def continues_this_run(self, ckpt_path: str, dirpath: Path) -> bool:
        """Whether --ckpt_path names a checkpoint of the run this fit writes: Lightning's own names
        (last, best, ...), or a path inside its root or checkpoint directory."""
        return lightning_resolves(ckpt_path) or any(within(ckpt_path, root) for root in (self.trainer.default_root_dir, dirpath))

    def before_validate(self) -> None:
        self.check_data("validate")
        self.continue_checkpoint_dirs(self.config_init[self.subcommand].get("ckpt_path"))

    def before_test(self) -> None:
        self.check_data("test")
        self.continue_checkpoint_dirs(self.config_init[self.subcommand].get("ckpt_path"))

    def continue_checkpoint_dirs(self, ckpt_path: str | None) -> None:
        """Lightning's ModelCheckpoint callbacks of a run continued from a checkpoint write where they
        wrote before, if that directory is still there, lies inside this fit's root directory, and no
        --checkpoint.dirpath says otherwise. A fit branching from another run's checkpoint (or from a
        copy of a run) writes into its own version directory, with a fresh best score.

        Why: by default they write into the new run's logger version (`lightning_logs/version_N`),
        and a callback whose directory changed restores neither its best score nor its top k, so the
        first validation after a resume was saved as the best whatever its value (and Lightning
        warned of the changed directory on every resume, validate and test).
        """
        if ckpt_path is None or lightning_resolves(ckpt_path) or not Path(ckpt_path).exists():
            return
        saved = saved_checkpoint_dirs(Path(ckpt_path))
        root = self.trainer.default_root_dir
        for callback in self.trainer.checkpoint_callbacks:
            dirpath = saved.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
            # Only a directory of this run's own: the saved path may be relative (to where that run was
            # started), and a copy of a run, or a fit branching from another run's checkpoint, must not
            # write (and prune its best) there.
            if dirpath is not None and callback.dirpath is None and Path(dirpath).is_dir() and within(dirpath, root):
                callback.dirpath = dirpath
                # Lightning's warning about a non-empty directory is meant for new runs; this one continues there.
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(dirpath)} exists and is not empty")

    def check_data(self, stage: str) -> None:
        """Set up the data now and check that the model's first layer fits its width (and, to fit,
        that every data-parallel group gets a full training batch).

        Why here: such a model fails in the first matmul with shapes that name no setting.
        Lightning's own setup call later keeps the loaded data.
        """
        self.datamodule.setup(stage)
        if stage == "fit":  # the loader checks it too, but only after the sanity check, in a new log directory
            sample_parallel = int(self.model.hparams.get("sample_parallel", 1))
            self.datamodule.check_batch_size(max(1, self.trainer.world_size // sample_parallel))
        width = next(iter(self.datamodule.splits.values()))[0].numel()
        sizes = list(self.model.hparams.layer_sizes)
        if sizes[0] != width:
            raise ValueError(
                f"model.layer_sizes={sizes} starts with {sizes[0]}, but the data has {width} pixels per point: "
                f"the first entry must be {width}"
            )

    def fit(self, model, **kwargs) -> None:
        """trainer.fit (LightningCLI runs this method for `fit`), with a checkpoint that does not fit
        the configured run reported as one line naming it."""
        with checkpoint_mismatch(kwargs.get("ckpt_path"), self.trainer):
            self.trainer.fit(model, **kwargs)


def describe_state_dict_error(error: RuntimeError) -> str:
    """torch's multi-line load_state_dict error as one line: each size mismatch as `NAME: checkpoint
    SHAPE, model SHAPE`, the first few of them; other problems (missing keys) as torch words them."""
    mismatches = [f"{name}: checkpoint {saved}, model {built}" for name, saved, built in _SIZE_MISMATCH.findall(str(error))]
    if not mismatches:
        return " ".join(str(error).split("\n", 1)[-1].split())
    more = len(mismatches) - _MISMATCHES_LISTED
    return "; ".join(mismatches[:_MISMATCHES_LISTED]) + (f" (and {more} more)" if more > 0 else "")


@contextlib.contextmanager
def checkpoint_mismatch(ckpt_path: str | None, trainer) -> Iterator[None]:
    """Turn Lightning's errors for a checkpoint that does not fit this run into ValueErrors naming it.

    Only these two are translated: any other RuntimeError is a bug and keeps its traceback.
    """
    try:
        yield
    except RuntimeError as error:
        if ckpt_path is None or not str(error).startswith("Error(s) in loading state_dict"):
            raise
        settings = ", ".join(f"model.{key}" for key in ARCHITECTURE)
        raise ValueError(
            f"checkpoint {ckpt_path} holds a model of other sizes than the configured one ({settings}): "
            f"{describe_state_dict_error(error)}; resume with the model settings it was trained with, or start a new run"
        ) from error
    except MisconfigurationException as error:
        if ckpt_path is None or not str(error).startswith("You restored a checkpoint with current_epoch"):
            raise
        raise ValueError(
            f"checkpoint {ckpt_path} is at epoch {trainer.current_epoch}, past trainer.max_epochs={trainer.max_epochs}: "
            f"to continue it, give --trainer.max_epochs greater than {trainer.current_epoch}"
        ) from error


def cli_kwargs() -> dict:
    """The constructor arguments of `rws fit/validate/test`, shared with `rws fit --dry-run`."""
    return dict(
        parser_class=ConciseParser,
        model_class=RWSModule,
        datamodule_class=BinarizedMNISTDataModule,
        seed_everything_default=1234,
        # RWSModule builds its two optimizers itself; LightningCLI's --optimizer/--lr_scheduler would
        # replace them with one (training stops at unpacking it) or be ignored.
        auto_configure_optimizers=False,
        # The DataModule splits data by data-parallel rank itself, so Lightning must not add a sampler.
        trainer_defaults={"default_root_dir": "runs", "log_every_n_steps": 50, "use_distributed_sampler": False},
    )


def plugin_command(name: str):
    """The main(argv) of command `name` from the `rws.commands` entry-point group, or None."""
    found = entry_points(group="rws.commands", name=name)
    return next(iter(found)).load() if found else None


# What gloo raises in a process whose peer exited mid-collective (a rank that stopped on bad input,
# say): the peer's own output holds the cause, so this one reports it in one line, not a traceback.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def leave_process_group() -> None:
    """Destroy the process group of a multi-process run whose ranks all finished (or stopped together).

    Why: Lightning leaves it alive until the interpreter exits, where a gloo thread can release a
    finished collective after it can no longer take the GIL and abort the process ("terminate
    called without an active exception", pytorch#190489, as `rws eval` did: lightning_modules/
    evaluate.py). A 2-process torchrun fit of the docs' command aborted so in 1 of about 15 runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peer_failure(error: RuntimeError) -> str | None:
    """One line for a process whose collective failed because another process of the run exited,
    or None for any other RuntimeError (a bug, which keeps its traceback)."""
    message = str(error)
    if "gloo" not in message or not any(marker in message for marker in _PEER_GONE):
        return None
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:  # Lightning tore the group down on its way out
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
    detail = message.split("] ", 1)[-1].split(". ", 1)[0]  # gloo's "[file:line] Connection closed by peer [addr]:port"
    return f"rank {rank} stopped: another process of this run exited (the cause is in its output); gloo: {detail}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rws` console script; `argv` defaults to the command line.

    Bad input (a wrong config value, a missing or corrupt file) ends with one line naming the key
    or file and exit code 2; set RWS_TRACEBACK=1 to see the traceback instead. In a multi-process
    run, the other processes then end with one line each (`peer_failure`) and exit code 1.
    A SIGTERM ends with one line and exit code 143 (128 + SIGTERM), as a shell reports a process
    that the signal killed: Lightning stops gracefully, and would otherwise exit 0. A first Ctrl-C
    during training likewise ends with exit code 130 (`DistributedCheckpoint`).
    """
    args = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):  # for bug reports: this package's version and the stack under it
        print(f"rws {version('rws')} (torch {version('torch')}, pytorch-lightning {version('pytorch-lightning')})")
        return 0
    try:
        if argv[0] in TOOLS:
            return TOOLS[argv[0]](argv[1:])
        plugin = plugin_command(argv[0]) if argv[0] not in SUBCOMMANDS else None
        if plugin is not None:
            return plugin(argv[1:])
        if argv[0] not in SUBCOMMANDS:
            print(f"rws: error: unknown command {argv[0]!r}; `rws --help` lists the commands", file=sys.stderr)
            return 2
        if argv[0] == "fit" and "--dry-run" in argv:
            from lightning_modules.launch import dry_run  # config and process layout, no training

            return dry_run(argv)
        RWSLightningCLI(args=args, **cli_kwargs())  # args None: LightningCLI reads sys.argv itself
        leave_process_group()
    except (OSError, ValueError, KeyError) as error:  # OSError: a path that cannot be read or written
        if os.environ.get("RWS_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"rws {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    except SIGTERMException as stop:  # a SystemExit without a code: it would exit 0
        if isinstance(stop, StopSignal):  # all ranks stopped at the same batch
            leave_process_group()
        signum = getattr(stop, "signum", signal.SIGTERM)  # Lightning's stop on SIGTERM, or our StopSignal
        resume = " (`--resume auto` continues from the newest checkpoint)" if argv[0] == "fit" else ""
        print(f"rws {argv[0]}: stopped by {signal.Signals(signum).name}{resume}", file=sys.stderr)
        return 128 + signum
    except RuntimeError as error:
        line = peer_failure(error)
        if line is None or os.environ.get("RWS_TRACEBACK"):
            raise
        print(f"rws {argv[0]}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
