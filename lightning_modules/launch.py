"""`rws fit --dry-run`: the resolved config and the process layout of a launch, without training.

    rws fit --config configs/sbn_200_200_10.yaml --trainer.num_nodes 2 --trainer.devices 4 \\
        --trainer.strategy ddp --model.sample_parallel 2 --model.num_samples 10 --dry-run

parses the command line exactly as `rws fit` does (same LightningCLI, same defaults), builds the
model and the DataModule (so their argument checks run) but neither the Trainer nor any process
group, and prints:

- the resolved config, as YAML (what `--print_config` shows);
- the world layout: num_nodes x devices = world size, data-parallel groups x sample-parallel
  groups (S = model.sample_parallel) and the global ranks of each sample group, r = d * S + s;
- per rank: the minibatch (every rank of a sample group sees the same data.batch_size points) and
  K = model.num_samples / S importance samples; the effective global batch is data.batch_size
  times the number of data-parallel groups.

A layout that cannot run (world size or K not divisible by S, devices that disagree with the
SLURM or torchrun environment) is one line `rws fit: error: ...` and exit code 2. Under torchrun
or srun every process checks the layout; only global rank 0 prints it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from pipeline.distributed import split_evenly

DRY_RUN_FLAG = "--dry-run"
SUBCOMMANDS = ("fit", "validate", "test")
_MAX_GROUPS_LISTED = 8
_ENVIRONMENTS = {
    "TorchElasticEnvironment": " (torchrun started the processes)",
    "SLURMEnvironment": " (srun started the processes, one task per device)",
    "LightningEnvironment": " (no torchrun/SLURM variables: Lightning starts the processes of this node itself;"
    " several nodes need MASTER_ADDR, MASTER_PORT, NODE_RANK)",
}


class LayoutError(ValueError):
    """A launch whose process layout cannot run."""


@dataclass(frozen=True)
class WorldLayout:
    """How the ranks of a launch split into data-parallel and sample-parallel groups."""

    num_nodes: int
    devices: int  # processes (devices) per node
    sample_parallel: int  # S: ranks that share a minibatch and split its K samples
    devices_source: str  # how `devices` was resolved, for the printout

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.sample_parallel

    def sample_group(self, d: int) -> list[int]:
        """Global ranks of data-parallel group d: r = d * S + s, s < S (consecutive ranks)."""
        return [d * self.sample_parallel + s for s in range(self.sample_parallel)]


def cluster_environment(env: Mapping[str, str]) -> str:
    """The Lightning ClusterEnvironment that `env` selects, in Lightning's order of precedence."""
    if "TORCHELASTIC_RUN_ID" in env:  # torch.distributed.is_torchelastic_launched()
        return "TorchElasticEnvironment"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "SLURMEnvironment"
    return "LightningEnvironment"


def _slurm_tasks_per_node(env: Mapping[str, str], num_nodes: int) -> int | None:
    value = env.get("SLURM_NTASKS_PER_NODE")
    if value:
        return int(value.split("(")[0])  # SLURM may write "4(x2)"
    if env.get("SLURM_NTASKS"):
        return max(1, int(env["SLURM_NTASKS"]) // max(1, num_nodes))
    return None


def resolve_devices(devices, accelerator, num_nodes: int, env: Mapping[str, str]) -> tuple[int, str]:
    """Processes per node from Trainer(devices=...): an int, a list of device ids, "0,1", "4" or "auto".

    "auto" (and -1) take the launcher's numbers when there is one (torchrun: LOCAL_WORLD_SIZE or
    WORLD_SIZE / num_nodes; SLURM: SLURM_NTASKS_PER_NODE), else 1 on a CPU and the visible GPUs on
    a GPU machine (as Lightning does). Device ids (a list, "0,1") need GPUs: on a CPU they are
    an error, as in Lightning. Returns (devices, how it was resolved).
    """
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise LayoutError("trainer.devices is an empty list")
        _check_device_ids(devices, accelerator)
        return len(devices), f"devices {list(devices)}"
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        text = devices.strip()
        if "," in text:
            _check_device_ids(text, accelerator)
            ids = [part for part in text.split(",") if part.strip()]
            return len(ids), f"devices {text!r}"
        try:
            devices = int(text)
        except ValueError as error:
            raise LayoutError(f"trainer.devices must be an int, a list or 'auto', got {devices!r}") from error
    if isinstance(devices, int) and devices != -1:
        if devices < 1:
            raise LayoutError(f"trainer.devices must be >= 1, got {devices}")
        return devices, "trainer.devices"
    # "auto" or -1
    if "TORCHELASTIC_RUN_ID" in env and env.get("WORLD_SIZE"):
        local = env.get("LOCAL_WORLD_SIZE")
        per_node = int(local) if local else int(env["WORLD_SIZE"]) // max(1, num_nodes)
        return per_node, "auto: torchrun LOCAL_WORLD_SIZE / WORLD_SIZE"
    slurm = _slurm_tasks_per_node(env, num_nodes) if cluster_environment(env) == "SLURMEnvironment" else None
    if slurm is not None:
        return slurm, "auto: SLURM_NTASKS_PER_NODE"
    accelerator = accelerator if isinstance(accelerator, str) else "auto"
    if accelerator == "cpu":
        return 1, "auto: 1 on CPU"
    import torch

    gpus = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 0
    if gpus:
        return gpus, f"auto: {gpus} visible GPU(s)"
    return 1, "auto: no GPU visible, 1"


def _runs_on_cpu(accelerator) -> bool:
    """Whether Lightning picks the CPU for `accelerator`: 'cpu', or 'auto'/None with no GPU visible."""
    if accelerator == "cpu":
        return True
    if accelerator not in (None, "auto"):
        return False
    import torch

    return torch.cuda.device_count() == 0


def _check_device_ids(devices, accelerator) -> None:
    """Lightning's CPU accelerator takes a number of processes, never device ids (its TypeError
    comes only once the Trainer is built, after a dry run said the launch was fine)."""
    if _runs_on_cpu(accelerator):
        raise LayoutError(
            f"trainer.devices={devices!r} lists device ids, which need GPUs, but the accelerator is the CPU "
            f"(trainer.accelerator={accelerator!r}): give the number of processes, e.g. --trainer.devices 2"
        )


def check_environment(layout: WorldLayout, environment: str, env: Mapping[str, str]) -> None:
    """The checks Lightning's cluster environments make when the Trainer starts."""
    if environment == "TorchElasticEnvironment" and env.get("WORLD_SIZE"):
        world = int(env["WORLD_SIZE"])
        if layout.world_size != world:
            raise LayoutError(
                f"trainer.num_nodes x trainer.devices = {layout.num_nodes} x {layout.devices} = {layout.world_size}, "
                f"but torchrun started WORLD_SIZE={world} processes"
            )
    if environment == "SLURMEnvironment":
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        if per_node and int(per_node.split("(")[0]) != layout.devices:
            raise LayoutError(
                f"trainer.devices={layout.devices}, but SLURM runs SLURM_NTASKS_PER_NODE={per_node} tasks per node "
                "(one task per device)"
            )
        nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
        if nodes and int(nodes) != layout.num_nodes:
            raise LayoutError(f"trainer.num_nodes={layout.num_nodes}, but the SLURM job has {nodes} nodes")


def check_layout(layout: WorldLayout, num_samples: int) -> None:
    """World size and K must both be divisible by S (what RWSModule checks once the processes exist)."""
    s = layout.sample_parallel
    if s < 1:
        raise LayoutError(f"model.sample_parallel must be >= 1, got {s}")
    if layout.world_size % s:
        raise LayoutError(
            f"world size {layout.world_size} (trainer.num_nodes {layout.num_nodes} x trainer.devices {layout.devices}) "
            f"is not divisible by model.sample_parallel {s}"
        )
    if num_samples % s:
        raise LayoutError(f"model.num_samples (K = {num_samples}) is not divisible by model.sample_parallel {s}")


def world_layout(config: Mapping, environment: str, env: Mapping[str, str]) -> WorldLayout:
    """The checked layout of a resolved `fit` config (a dict with trainer, model, ...)."""
    trainer, model = config["trainer"], config["model"]
    num_nodes = 1 if trainer.get("num_nodes") is None else int(trainer["num_nodes"])
    if num_nodes < 1:
        raise LayoutError(f"trainer.num_nodes must be >= 1, got {num_nodes}")
    devices, source = resolve_devices(trainer.get("devices", "auto"), trainer.get("accelerator"), num_nodes, env)
    layout = WorldLayout(num_nodes, devices, int(model.get("sample_parallel", 1)), source)
    check_layout(layout, int(model["num_samples"]))
    check_environment(layout, environment, env)
    return layout


def _per_rank(total: int, parts: int) -> str:
    sizes = sorted({split_evenly(total, parts, i) for i in range(parts)}, reverse=True)
    return " or ".join(str(size) for size in sizes)


def describe(layout: WorldLayout, config: Mapping, environment: str) -> str:
    """The human-readable layout report of a resolved `fit` config."""
    model, data, trainer = config["model"], config["data"], config["trainer"]
    s, dp = layout.sample_parallel, layout.data_parallel
    k, val_k = model["num_samples"], model["val_num_samples"]
    batch, eval_batch = data["batch_size"], data["eval_batch_size"]
    lines = [
        "# world layout",
        f"nodes x devices:   {layout.num_nodes} x {layout.devices} = {layout.world_size} ranks"
        f"  ({layout.devices_source}; accelerator {trainer.get('accelerator')}, strategy {trainer.get('strategy')})",
        f"environment:       {environment}{_ENVIRONMENTS[environment]}",
        f"data x sample:     {dp} data-parallel groups x {s} ranks per sample group (model.sample_parallel = {s})",
        "sample groups:     ranks r = d * S + s",
    ]
    for d in range(min(dp, _MAX_GROUPS_LISTED)):
        ranks = layout.sample_group(d)
        nodes = sorted({r // layout.devices for r in ranks})
        lines.append(f"  d={d}: ranks {ranks} on node {', '.join(map(str, nodes))}")
    if dp > _MAX_GROUPS_LISTED:
        lines.append(f"  ... ({dp - _MAX_GROUPS_LISTED} more, up to d={dp - 1}: ranks {layout.sample_group(dp - 1)})")
    if s > 1 and layout.devices % s:
        lines.append("  note: some sample groups span nodes; they reduce log-weights every step, keep S | devices")
    lines += [
        "# per rank",
        f"batch:             {batch} data points (data.batch_size; the {s} ranks of a sample group see the same minibatch)",
        f"K (train):         {k // s} of K = {k} importance samples (model.num_samples / S)",
    ]
    if model.get("q_update") in ("sleep", "wake-sleep") and s > 1:
        lines.append(f"sleep dreams:      {_per_rank(batch, s)} of {batch} (split over the sample group)")
    lines += [
        f"K (validation):    {_per_rank(val_k, s)} of {val_k} (model.val_num_samples), eval batch {eval_batch}",
        "# global",
        f"effective batch:   {batch} x {dp} data-parallel groups = {batch * dp} data points per optimizer step",
        f"samples per step:  {batch * dp} points x K = {k} -> {batch * dp * k} importance samples",
        "dry run: nothing was trained, no process group was started.",
    ]
    return "\n".join(lines)


def _dump(parser, config) -> str:
    """The config as YAML, None values included (`skip_unset` replaced `skip_none` in jsonargparse 4.49)."""
    try:
        return parser.dump(config, skip_unset=False, skip_link_targets=False)
    except TypeError:
        return parser.dump(config, skip_none=False, skip_link_targets=False)


class _ConfigDumper(yaml.SafeDumper):
    """Block-style YAML like `--print_config`, with lists of scalars on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)


def _strip(argv: list[str]) -> tuple[str, list[str]]:
    """('fit', args without the subcommand and --dry-run) from `rws fit ... --dry-run`."""
    args = [arg for arg in argv if arg != DRY_RUN_FLAG]
    subcommand = "fit"
    if args and args[0] in SUBCOMMANDS:
        subcommand, args = args[0], args[1:]
    return subcommand, args


def dry_run(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run `rws fit ... --dry-run`: print the resolved config and the layout, train nothing.

    `argv` is the `rws` command line with or without the leading subcommand and `--dry-run`.
    Returns 0, or 2 after one `rws fit: error: ...` line for a layout that cannot run.
    """
    from lightning_modules.cli import RWSLightningCLI, cli_kwargs

    env = os.environ if env is None else env
    subcommand, args = _strip(list(argv))

    class DryRunCLI(RWSLightningCLI):
        """Parses like `rws fit` and checks the layout, then builds model and data (their own checks
        run) but never the Trainer, and runs nothing."""

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            dumped = yaml.safe_load(_dump(self.parser, self.config))
            self.resolved = dumped[subcommand]
            self.layout = world_layout(self.resolved, environment, env)  # raises LayoutError

        def _set_seed(self) -> None:
            return None  # no global side effect; the config shows seed_everything as given

        def instantiate_trainer(self, **kwargs):
            return None

        def _run_subcommand(self, name: str) -> None:
            return None

    environment = cluster_environment(env)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            cli = DryRunCLI(args=[subcommand, *args], **cli_kwargs())
    except LayoutError as error:
        print(f"rws {subcommand}: error: {error}", file=sys.stderr)
        return 2
    rank = env.get("RANK") or env.get("SLURM_PROCID") or "0"
    if rank != "0":
        return 0  # every process validated the layout; rank 0 prints it once
    print(f"# rws {subcommand} --dry-run: resolved config")
    print(yaml.dump(cli.resolved, Dumper=_ConfigDumper, sort_keys=False).rstrip())
    print("---")
    print(describe(cli.layout, cli.resolved, environment))
    sys.stdout.flush()
    return 0
