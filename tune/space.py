"""The search YAML of `rws tune`: a base `rws fit` config, fixed overrides, a search space, a budget.

    base_config: ../debug.yaml          # a config that `rws fit --config` accepts (relative to this file)
    fixed: {trainer.max_epochs: 3}      # dotted `rws fit` keys set in every trial
    space:                              # dotted `rws fit` keys (or depth/width/top_width) -> a distribution
      depth: {choice: [1, 2, 3, 4]}     # latent layers
      width: {choice: [50, 100, 200]}   # units per latent layer -> model.layer_sizes
      model.p_lr: {loguniform: [1.0e-4, 3.0e-2]}
    num_trials: 8

A trial's fit config is the base config, then `fixed`, then the sampled values (`fit_config`):
the exported best config is exactly what that trial trained with. Every key of SETTINGS below
can be overridden from the command line as `--KEY VALUE` (VALUE is YAML), with dotted keys for
the sections: `--space.model.p_lr '{loguniform: [1e-4, 1e-2]}'`, `--fixed.trainer.max_epochs 5`,
`--scheduler.grace_period 2`; `--space.KEY null` drops a key from the space.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SearchConfigError(ValueError):
    """A bad search YAML or setting; `rws` prints it as one line and exits with code 2."""


# Derived keys: they set model.layer_sizes = [D, width, ..., width, top_width] (`depth` latent layers).
DERIVED = ("depth", "width", "top_width")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")  # randint: both bounds included
DATA_KEYS = ("data.path", "data.shards")  # relative paths in them are made absolute (`absolute_data`)
EPOCH_KEYS = ("trainer.max_epochs", "trainer.check_val_every_n_epoch")  # set ASHA's rungs: the same in every trial
SECTIONS = ("fixed", "space")  # their keys are whole dotted fit keys, not nested YAML paths

# Every top-level key of the search YAML, with its default.
SETTINGS: dict[str, Any] = {
    "name": None,  # the experiment directory under storage_path (default: the YAML file's stem)
    "storage_path": "runs/tune",  # where experiments live; a shared filesystem on a cluster
    "base_config": None,  # the `rws fit` YAML every trial starts from
    "fixed": {},
    "space": None,
    "num_trials": None,
    "searcher": "optuna",  # 'optuna' (TPE) or 'random'
    "seed": 0,  # of the searcher
    "scheduler": {"grace_period": 1, "reduction_factor": 2},  # ASHA on val/log_likelihood, in epochs
    "max_concurrent_trials": None,  # None: as many as the resources allow
    "resources_per_trial": {"cpu": 1, "gpu": 0},  # a trial's total, split evenly over its workers
    "workers_per_trial": 1,  # >1: data-parallel training processes per trial (Ray Train TorchTrainer)
    "sample_parallel": 1,  # model.sample_parallel: workers that share each minibatch's K samples
    "use_gpu": False,  # train on GPUs: one per worker unless resources_per_trial.gpu says otherwise
    "max_failures": 2,  # retries of a failed trial, each from its last checkpoint
}
REQUIRED = ("base_config", "space", "num_trials")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b', creating the intermediate dicts."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def get_dotted(tree: dict, key: str, default: Any = None) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def plain(value: Any) -> Any:
    """A numpy scalar (as Ray's random sampler draws them) as the Python value YAML can write."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _number(value: Any, key: str) -> float:
    # Why float(): YAML 1.1 reads `1e-4` (no dot) as a string.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SearchConfigError(f"space.{key}: bounds must be numbers, got {value!r}") from None
    if not math.isfinite(number):
        raise SearchConfigError(f"space.{key}: bounds must be finite, got {value!r}")
    return number


def parse_distribution(key: str, spec: Any) -> tuple[str, list]:
    """A space entry {KIND: ARGS} -> (KIND, checked ARGS): choice values, or [low, high] bounds."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SearchConfigError(f"space.{key}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SearchConfigError(f"space.{key}: choice needs a non-empty list, got {args!r}")
        if any(isinstance(value, (list, dict)) for value in args):
            raise SearchConfigError(
                f"space.{key}: choice values must be scalars (the searcher needs them), got {args!r}"
            )
        return kind, list(args)
    if not isinstance(args, list) or len(args) != 2:
        raise SearchConfigError(f"space.{key}: {kind} needs [low, high], got {args!r}")
    low, high = (_number(value, key) for value in args)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise SearchConfigError(
            f"space.{key}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, got {args!r}"
        )
    if kind == "randint":
        if not (low.is_integer() and high.is_integer()):
            raise SearchConfigError(f"space.{key}: randint bounds must be integers, got {args!r}")
        return kind, [int(low), int(high)]
    return kind, [low, high]


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _positive_int(raw: dict, key: str, section: str = "") -> int:
    value = raw[key]
    if not _is_positive_int(value):
        raise SearchConfigError(f"{section}{key} must be a positive integer, got {value!r}")
    return value


@dataclass
class SearchSpec:
    """A checked search YAML (plus command-line overrides), the base fit config read in."""

    settings: dict[str, Any]  # SETTINGS keys -> values
    base: dict[str, Any]  # the base fit config's content
    space: dict[str, tuple[str, list]] = field(init=False)  # key -> (distribution, args)

    def __post_init__(self):
        self.space = {key: parse_distribution(key, spec) for key, spec in self.settings["space"].items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["settings"][name]
        except KeyError:
            raise AttributeError(name) from None

    def fit_config(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The `rws fit` config of a trial: base, then `fixed`, then the sampled values."""
        config = copy.deepcopy(self.base)
        values = {**self.settings["fixed"], **{key: plain(value) for key, value in sampled.items()}}
        derived = {key: values.pop(key) for key in DERIVED if key in values}
        for key, value in values.items():
            set_dotted(config, key, value)
        if derived:
            top = derived.get("top_width", derived["width"])
            input_size = get_dotted(config, "model.layer_sizes", [784])[0]
            set_dotted(config, "model.layer_sizes", [input_size] + [derived["width"]] * (derived["depth"] - 1) + [top])
        if self.sample_parallel > 1:
            set_dotted(config, "model.sample_parallel", self.sample_parallel)
        if self.workers_per_trial > 1:
            # What the trial ran as, on one node: `rws fit --config best.yaml` repeats it.
            set_dotted(config, "trainer.devices", self.workers_per_trial)
            set_dotted(config, "trainer.strategy", "ddp")
        if self.use_gpu:
            set_dotted(config, "trainer.accelerator", "gpu")
        return config

    def corner_samples(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(key, sample) pairs that together visit every choice and both bounds of every range.

        The first sample takes each key's first value (key None); each next one changes one key.
        """
        first = {key: args[0] for key, (kind, args) in self.space.items()}
        samples: list[tuple[str | None, dict[str, Any]]] = [(None, first)]
        for key, (kind, args) in self.space.items():
            samples += [(key, {**first, key: value}) for value in args[1:]]
        return samples

    @property
    def trial_cpus(self) -> float:
        """CPUs one trial uses in all (its workers' and, with several workers, its coordinator's)."""
        return self.resources_per_trial.get("cpu", 1)

    @property
    def trial_gpus(self) -> float:
        """GPUs one trial uses in all: resources_per_trial.gpu, or with use_gpu one per worker."""
        return self.resources_per_trial.get("gpu", 0) or (self.workers_per_trial if self.use_gpu else 0)

    def fixed_setting(self, key: str) -> Any:
        """The value of fit key `key` in every trial: from `fixed`, else from the base config (None if neither)."""
        return self.settings["fixed"].get(key, get_dotted(self.base, key))

    @property
    def max_epochs(self) -> int | None:
        epochs = self.fixed_setting("trainer.max_epochs")
        return epochs if isinstance(epochs, int) and epochs > 0 else None

    @property
    def validation_interval(self) -> int:
        """trainer.check_val_every_n_epoch of every trial (1 where unset)."""
        every = self.fixed_setting("trainer.check_val_every_n_epoch")
        return every if _is_positive_int(every) else 1

    @property
    def last_rung(self) -> int:
        """ASHA's max_t: the reports of a full trial, one per validated epoch (trainer.max_epochs /
        trainer.check_val_every_n_epoch), or 100 where max_epochs is unset."""
        return max(1, self.max_epochs // self.validation_interval) if self.max_epochs else 100

    def to_dict(self) -> dict[str, Any]:
        """Self-contained (the base config inlined): stored with an experiment, compared on --resume."""
        return {"settings": self.settings, "base": self.base}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> SearchSpec:
        return cls(stored["settings"], stored["base"])


def apply_override(raw: dict, key: str, value: Any) -> None:
    """One `--KEY VALUE` from the command line; `space.`/`fixed.` keys keep their dotted rest whole."""
    section, _, rest = key.partition(".")
    if section not in SETTINGS:
        raise SearchConfigError(f"--{key}: unknown setting {section!r}; known: {', '.join(SETTINGS)}")
    if section in SECTIONS and rest:
        entries = dict(raw.get(section) or {})
        if value is None and section == "space":  # no longer searched: the base config's value
            entries.pop(rest, None)
        else:  # `--fixed.KEY null` sets null, as `fixed: {KEY: null}` in the file does
            entries[rest] = value
        raw[section] = entries
    elif rest:
        set_dotted(raw, key, value)
    else:
        raw[key] = value


def load_spec(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> SearchSpec:
    """Read and check a search YAML, apply `--KEY VALUE` overrides, read its base fit config.

    A relative `base_config` in the file is relative to the file; one given on the command line
    is relative to the working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search config not found: {path}")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SearchConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise SearchConfigError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    if isinstance(raw.get("base_config"), str):
        raw["base_config"] = str(path.parent / raw["base_config"])
    raw.setdefault("name", path.stem)
    for key, value in overrides:
        apply_override(raw, key, value)
    settings = {key: copy.deepcopy(default) for key, default in SETTINGS.items()}
    for key, value in raw.items():
        settings[key] = (
            {**settings[key], **value} if isinstance(settings[key], dict) and isinstance(value, dict) else value
        )
    settings = check_settings(settings, path)
    if not isinstance(settings["storage_path"], str):
        raise SearchConfigError(f"storage_path must be a directory path, got {settings['storage_path']!r}")
    # Absolute: trials run in other directories; on a cluster it must be a shared filesystem.
    settings["storage_path"] = str(Path(settings["storage_path"]).expanduser().resolve())
    if Path(settings["storage_path"]).exists() and not Path(settings["storage_path"]).is_dir():
        raise SearchConfigError(f"storage_path {settings['storage_path']} is a file, not a directory")
    for key in DATA_KEYS:  # fixed, and the choices of a searched data set (the base config's: read_base_config)
        if key in settings["fixed"]:
            settings["fixed"][key] = absolute_data(key, settings["fixed"][key], f"fixed.{key}")
        _map_choices(settings["space"], key, lambda value, key=key: absolute_data(key, value, f"space.{key}"))
    spec = SearchSpec(settings, read_base_config(settings["base_config"]))
    every = spec.validation_interval
    if spec.max_epochs and every < spec.max_epochs and spec.max_epochs % every:
        raise SearchConfigError(
            f"trainer.max_epochs ({spec.max_epochs}) must be a multiple of trainer.check_val_every_n_epoch ({every}) "
            "in a search: ASHA counts validations, and would stop every trial at the last one"
        )
    if settings["scheduler"]["grace_period"] > spec.last_rung:  # Ray would only assert it once the search started
        raise SearchConfigError(
            f"scheduler.grace_period ({settings['scheduler']['grace_period']}) must be <= ASHA's last rung, "
            f"{spec.last_rung}: the validated epochs of a trial (trainer.max_epochs / check_val_every_n_epoch)"
        )
    return spec


def _map_choices(space: dict, key: str, function) -> None:
    """Apply `function` to the values of `space[key]`'s choice list, if it has one."""
    entry = space.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("choice"), list):
        entry["choice"] = [function(value) for value in entry["choice"]]


def absolute_data(key: str, value: Any, where: str) -> Any:
    """A `data.path` or `data.shards` value (DATA_KEYS) as an absolute path, as `rws fit` would read it
    from here; other values (null, a URL) as given. Why: trials run in their own directories."""
    if not isinstance(value, str):
        return value
    return absolute_data_path(value, where) if key == "data.path" else absolute_shards(value)


def parse_yaml(text: str, where: str) -> Any:
    """`text` as YAML; a syntax error is a SearchConfigError naming `where` (a file, an option) and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SearchConfigError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from error


def read_yaml(path: Path) -> Any:
    """The YAML file at `path` (`parse_yaml`)."""
    return parse_yaml(path.read_text(), str(path))


def absolute_shards(shards: str) -> str:
    """A local `data.shards` (a directory, an index or a brace pattern of files) as an absolute path;
    URLs and `pipe:` commands as given. Why: trials run in their own directories."""
    if "://" in shards or shards.startswith("pipe:"):
        return shards
    return str(Path(shards).expanduser().absolute())


def check_settings(settings: dict, path: Path) -> dict:
    missing = [key for key in REQUIRED if settings[key] is None]
    if missing:
        raise SearchConfigError(f"{path}: missing setting {missing[0]!r}")
    name = settings["name"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise SearchConfigError(f"name must be a directory name (no '/'), got {name!r}")
    for section in SECTIONS:
        if not isinstance(settings[section], dict):
            raise SearchConfigError(f"{section} must be a mapping of dotted rws fit keys, got {settings[section]!r}")
    if not settings["space"]:
        raise SearchConfigError("space is empty: nothing to search")
    for key, value in settings["fixed"].items():
        if "." not in key and isinstance(value, dict):  # set_dotted would replace the base config's whole section
            raise SearchConfigError(
                f"fixed.{key}: give dotted keys, e.g. fixed: {{{key}.{next(iter(value), 'KEY')}: ...}}; a mapping would "
                f"replace the base config's whole {key!r} section"
            )
    for key in EPOCH_KEYS:
        if key in settings["space"]:
            raise SearchConfigError(
                f"space.{key}: not searchable, as ASHA needs the same number of validated epochs in every trial; "
                "put it in fixed"
            )
    both = sorted(set(settings["fixed"]) & set(settings["space"]))
    if both:
        raise SearchConfigError(f"{both[0]!r} is both in fixed and in space")
    keys = set(settings["fixed"]) | set(settings["space"])
    if keys & set(DERIVED):
        if not {"depth", "width"} <= keys:
            raise SearchConfigError("depth and width go together (in fixed or space): they set model.layer_sizes")
        if "model.layer_sizes" in keys:
            raise SearchConfigError("give either depth/width or model.layer_sizes, not both")
    for key in ("num_trials", "workers_per_trial", "sample_parallel"):
        _positive_int(settings, key)
    if isinstance(settings["seed"], bool) or not isinstance(settings["seed"], int) or settings["seed"] < 0:
        raise SearchConfigError(f"seed must be an integer >= 0, got {settings['seed']!r}")
    if settings["searcher"] not in ("optuna", "random"):
        raise SearchConfigError(f"searcher must be 'optuna' or 'random', got {settings['searcher']!r}")
    if settings["workers_per_trial"] % settings["sample_parallel"]:
        raise SearchConfigError(
            f"sample_parallel ({settings['sample_parallel']}) must divide workers_per_trial ({settings['workers_per_trial']})"
        )
    check_scheduler(settings["scheduler"])
    check_derived(settings)
    resources = settings["resources_per_trial"]
    if not isinstance(resources, dict) or set(resources) - {"cpu", "gpu"} or not all(isinstance(v, (int, float)) and v >= 0 for v in resources.values()):
        raise SearchConfigError(f"resources_per_trial must be {{cpu: N, gpu: N}} with N >= 0, got {resources!r}")
    if resources.get("gpu", 0) > 0 and not settings["use_gpu"]:
        raise SearchConfigError("resources_per_trial.gpu > 0 needs use_gpu: true")
    if settings["max_concurrent_trials"] is not None:
        _positive_int(settings, "max_concurrent_trials")
    if isinstance(settings["max_failures"], bool) or not isinstance(settings["max_failures"], int):
        raise SearchConfigError(
            f"max_failures must be an integer (-1: retry forever), got {settings['max_failures']!r}"
        )
    return settings


def check_scheduler(scheduler: Any) -> None:
    """ASHA's settings, checked here: Ray only asserts them once the search has started."""
    if not isinstance(scheduler, dict):
        raise SearchConfigError(f"scheduler must be {{grace_period: N, reduction_factor: N}}, got {scheduler!r}")
    unknown = sorted(set(scheduler) - set(SETTINGS["scheduler"]))
    if unknown:
        raise SearchConfigError(f"scheduler.{unknown[0]}: unknown setting; known: {', '.join(SETTINGS['scheduler'])}")
    _positive_int(scheduler, "grace_period", "scheduler.")
    factor = scheduler["reduction_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise SearchConfigError(f"scheduler.reduction_factor must be a number > 1, got {factor!r}")


def check_derived(settings: dict) -> None:
    """depth, width and top_width count layers and units: positive integers, in fixed or as every
    choice or randint bound of the space (fit_config would build a layer list from any number)."""
    for key in DERIVED:
        if key in settings["fixed"]:
            where, values = f"fixed.{key}", [settings["fixed"][key]]
        elif key in settings["space"]:
            kind, values = parse_distribution(key, settings["space"][key])
            if kind not in ("choice", "randint"):
                raise SearchConfigError(f"space.{key}: {kind} draws fractions; a count needs choice or randint")
            where = f"space.{key}"
        else:
            continue
        bad = [value for value in values if not _is_positive_int(value)]
        if bad:
            raise SearchConfigError(f"{where}: {key} must be a positive integer, got {bad[0]!r}")


def read_base_config(path: Any) -> dict:
    if not isinstance(path, str):
        raise SearchConfigError(f"base_config must be the path of an rws fit YAML, got {path!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"base_config not found: {path}")
    base = read_yaml(Path(path)) or {}
    if not isinstance(base, dict):
        raise SearchConfigError(
            f"base_config {path}: expected a mapping (an rws fit config), got {type(base).__name__}"
        )
    for key in DATA_KEYS:
        if isinstance(get_dotted(base, key), str):
            set_dotted(base, key, absolute_data(key, get_dotted(base, key), f"{path}: {key}"))
    return base


def absolute_data_path(data_path: str, where: str) -> str:
    """The data file `rws fit` would read from here, as an absolute path; it must exist.

    Why absolute: trials run in their own directories (and, on a cluster, on other nodes).
    """
    resolved = Path(data_path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"{where}: data not found: {data_path}")
    return str(resolved)
