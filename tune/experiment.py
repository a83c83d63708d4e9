"""Ray start-up and the Tuner of `rws tune`: ASHA, Optuna's TPE, retries, resuming, progress lines.

- Ray: a local instance with this machine's CPUs by default, or an existing cluster (`address`).
- Search: `SearchSpec.space` as Ray domains, sampled by Optuna's TPE (or at random), trials run by
  `trial.run_trial` with `resources_per_trial`, stopped early by ASHA on val/log_likelihood
  (one report per validated epoch: ASHA's time unit, up to `SearchSpec.last_rung`).
- Faults: a failed trial is retried up to `max_failures` times from its last checkpoint
  (FailureConfig). Ray saves the experiment's state (trials, searcher, scheduler) under
  `storage_path/name`; `resume=True` continues it with `Tuner.restore`: finished trials stay
  finished, unfinished and errored ones continue from their last checkpoint (a checkpoint that the
  interruption left named but deleted is first replaced: `recover_lost_checkpoints`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import ray
import yaml
from ray import tune

from tune.space import SearchConfigError, SearchSpec
from tune.trial import CHECKPOINT_FILE, COORDINATOR_CPU, METRIC, run_trial, trial_dir_name

SEARCH_FILE = "search.yaml"  # the search (base config inlined) an experiment was started with


def experiment_dir(spec: SearchSpec) -> Path:
    return Path(spec.storage_path) / spec.name


def init_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start Ray on this machine with all its CPUs (and GPUs)."""
    # ProgressLines prints one line per trial event: no Ray tables (its newer output engine ignores
    # verbose=0), no warning about frequent state snapshots (num_to_keep=1 forces one per report,
    # which keeps the saved state current for --resume), trial output only in Ray's logs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The dashboard (on 127.0.0.1) stays on: Ray Train V2 frees a stopped trial's workers only after
    # its state API confirms that the trial's TorchTrainer is gone. "local": a new instance, never
    # one that `ray start` left running (or dead) on this machine.
    try:
        ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as error:  # --address auto with no cluster on this machine, for one
        raise SearchConfigError(f"--address {address}: {error}") from None


def trainable(spec: SearchSpec):
    """run_trial with the search bound and the resources that one trial holds."""
    if spec.workers_per_trial > 1:
        held = {"CPU": COORDINATOR_CPU}  # the workers get the rest: trial.worker_resources
    else:
        held = {"CPU": spec.trial_cpus, "GPU": spec.trial_gpus}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec.to_dict()), held)


def param_space(spec: SearchSpec) -> dict:
    """The space as Ray domains, keyed by the YAML's (dotted) keys."""
    domains = {
        "choice": tune.choice,
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": lambda low, high: tune.randint(low, high + 1),  # Ray excludes the upper bound
    }
    return {
        key: domains[kind](args) if kind == "choice" else domains[kind](*args)
        for key, (kind, args) in spec.space.items()
    }


def searcher(spec: SearchSpec, max_concurrent: int | None):
    if spec.searcher == "random":
        # Tune ignores TuneConfig.max_concurrent_trials for this searcher (with a warning): it takes its own.
        return tune.search.BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE models the results once it has a few; Optuna's default of 10 random trials first would
    # leave a small search purely random.
    startup = max(2, min(10, spec.num_trials // 3))
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup))


def trial_dirname(trial) -> str:
    return trial_dir_name(trial.trial_id)  # Ray's default name lists every sampled value


class ProgressLines(tune.Callback):
    """One line per trial event (start, each epoch's result, end, failure), not Ray's tables."""

    def __init__(self, num_trials: int):
        self.num_trials = num_trials

    def _status(self, trials) -> str:
        finished = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        best = [
            (trial.metric_analysis[METRIC]["max"], trial.trial_id)
            for trial in trials
            if METRIC in trial.metric_analysis
        ]
        text = f"[{finished}/{self.num_trials} done"
        return text + (f", best {max(best)[0]:.2f} ({max(best)[1]})]" if best else "]")

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in trial.config.items()
        )
        print(f"{self._status(trials)} trial {trial.trial_id} started: {values}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if METRIC in result:
            print(
                f"{self._status(trials)} trial {trial.trial_id} epoch {result.get('epoch')}: {METRIC} {result[METRIC]:.2f}",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        # The epoch, not training_iteration, which counts reports (one per validated epoch).
        epoch = trial.last_result.get("epoch")
        epochs = epoch + 1 if isinstance(epoch, int) else 0
        print(f"{self._status(trials)} trial {trial.trial_id} finished after {epochs} epoch(s)", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(
            f"{self._status(trials)} trial {trial.trial_id} failed ({trial.path}/error.txt); "
            "retrying from its last checkpoint, if it saved one",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._status(trials)} trial {trial.trial_id} failed for good: see {trial.path}/error.txt", flush=True)


def concurrent_trials(spec: SearchSpec) -> int | None:
    """`max_concurrent_trials`, capped for multi-worker trials at what the cluster holds at once.

    A multi-worker trial holds only its coordinator's 0.01 CPU, so Tune would start more trials
    than the cluster can hold workers for, and their TorchTrainers would wait for each other until
    they time out. Ray's advice is this cap (computed from the cluster as it is now: an
    autoscaling cluster's later nodes do not count).
    """
    if spec.workers_per_trial == 1:
        return spec.max_concurrent_trials
    cluster = ray.cluster_resources()
    need = {"CPU": spec.trial_cpus, "GPU": spec.trial_gpus}
    fit = max(1, int(min(cluster.get(name, 0) / amount for name, amount in need.items() if amount > 0)))
    return min(fit, spec.max_concurrent_trials or fit)


def new_tuner(spec: SearchSpec) -> tune.Tuner:
    max_concurrent = concurrent_trials(spec)
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.last_rung,
        grace_period=spec.scheduler["grace_period"],
        reduction_factor=spec.scheduler["reduction_factor"],
    )
    return tune.Tuner(
        trainable(spec),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher(spec, max_concurrent),
            scheduler=scheduler,
            num_samples=spec.num_trials,
            max_concurrent_trials=None if spec.searcher == "random" else max_concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(experiment_dir(spec).parent),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest: where a retry resumes
            callbacks=[ProgressLines(spec.num_trials)],
            verbose=0,
        ),
    )


def prepare(spec: SearchSpec, resume: bool) -> Path:
    """Check that the experiment can start (new) or resume (same search); returns its directory."""
    directory = experiment_dir(spec)
    stored = directory / SEARCH_FILE
    if not resume:
        # A directory without Ray's state (a start that failed before the search began) is reused.
        if tune.Tuner.can_restore(str(directory)):
            raise SearchConfigError(f"experiment {directory} exists: add --resume to continue it, or give a new --name")
        directory.mkdir(parents=True, exist_ok=True)
        stored.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        return directory
    if not stored.is_file() or not tune.Tuner.can_restore(str(directory)):
        raise FileNotFoundError(f"--resume: no experiment to resume at {directory}")
    before, now = yaml.safe_load(stored.read_text()), spec.to_dict()
    if before != now:
        changed = [key for key in now["settings"] if before["settings"].get(key) != now["settings"][key]]
        what = f"setting {changed[0]!r}" if changed else "base config"
        raise SearchConfigError(f"--resume: the {what} differs from the one {directory} was started with ({stored})")
    return directory


def checkpoint_index(path: Path) -> int | None:
    """NNNNNN of Ray's trial checkpoint directory `checkpoint_NNNNNN` (None for other names)."""
    digits = path.name.removeprefix("checkpoint_")
    return int(digits) if path.name.startswith("checkpoint_") and digits.isdigit() else None


def recover_lost_checkpoints(directory: Path) -> None:
    """Before a resume: where the saved state names a trial checkpoint that is gone, put the next
    one in its place.

    Ray's Tune deletes a trial's previous checkpoint as soon as it registers a new one, and saves
    the experiment state (which names the checkpoint a resumed trial restores) a moment later, in
    the background. An experiment killed in between names a deleted checkpoint, and Ray would fail
    that trial on every resume ("Could not recover from checkpoint as it does not exist on storage
    anymore"). The checkpoint that replaced it is complete (Ray registers a checkpoint only once it
    is written, and deletes it only when the next one is registered): the oldest one after the lost
    one is copied to the lost one's name. The trial then goes on from one epoch later than Ray's
    state records: it skips no work, though Ray counts one iteration fewer than the epochs trained.
    """
    for trial in tune.ExperimentAnalysis(str(directory)).trials:
        if trial.checkpoint is None or Path(trial.checkpoint.path).exists():
            continue
        lost = Path(trial.checkpoint.path)
        lost_index = checkpoint_index(lost)
        later = [
            path
            for path in lost.parent.glob("checkpoint_*")
            if (index := checkpoint_index(path)) is not None
            and index > lost_index
            and (path / CHECKPOINT_FILE).is_file()
        ]
        if not later:
            print(
                f"trial {trial.trial_id}: its last checkpoint {lost} is missing, and no later one: Ray will fail it",
                flush=True,
            )
            continue
        replacement = min(later, key=checkpoint_index)
        shutil.copytree(replacement, lost)
        print(
            f"trial {trial.trial_id}: the interruption left its saved state naming {lost.name}, already "
            f"replaced by {replacement.name}: resuming from {replacement.name}",
            flush=True,
        )


class RayLines(logging.Filter):
    """Ray Tune's own lines that `rws tune` says in its words: notes a Ctrl-C (after which Ray marks
    the unfinished trials TERMINATED, so their count cannot tell) and drops Ray's hint to resume
    with `Tuner.restore`, a failed trial's traceback (ProgressLines says where its error.txt is) and
    "Trials did not complete" (`rws tune` counts the failed trials)."""

    LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller")
    INTERRUPTED = "Stop signal received"  # Ray's line for a Ctrl-C
    DROPPED = (INTERRUPTED, "Experiment has been interrupted", "Trials did not complete", "Trial task failed")

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        self.interrupted |= message.startswith(self.INTERRUPTED)
        return not message.startswith(self.DROPPED)


def run(spec: SearchSpec, directory: Path, address: str | None, resume: bool) -> tuple[tune.ResultGrid, bool]:
    """Run (or resume) the search in `directory` (from `prepare`) to its end; Ctrl-C stops it with
    its state saved. Returns the results and whether it was interrupted."""
    ray_lines = RayLines()
    for name in RayLines.LOGGERS:
        logging.getLogger(name).addFilter(ray_lines)
    init_ray(address)
    try:
        if resume:
            recover_lost_checkpoints(directory)
            tuner = tune.Tuner.restore(
                str(directory), trainable=trainable(spec), resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = new_tuner(spec)
        return tuner.fit(), ray_lines.interrupted
    finally:
        ray.shutdown()
        for name in RayLines.LOGGERS:
            logging.getLogger(name).removeFilter(ray_lines)
