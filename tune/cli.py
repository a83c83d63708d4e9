"""`rws tune`: hyperparameter search over `rws fit` configs with Ray Tune (see docs/tune.md).

    rws tune --config configs/tune/debug.yaml [--address HOST:6379] [--resume] [--num-trials N]
             [--name NAME] [--space.model.p_lr '{loguniform: [1e-4, 1e-2]}'] [--fixed.trainer.max_epochs 5] ...

Registered as the `tune` command of the `rws.commands` entry-point group; `rws` turns a
ValueError/FileNotFoundError/KeyError into one line `rws tune: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from tune.space import SearchConfigError, load_spec, parse_yaml

EPILOG = """Any setting of the search YAML can be overridden as --KEY VALUE (VALUE is YAML; a name or path as given), with dotted
keys inside sections: --space.depth '{choice: [1, 2]}', --space.model.q_lr null (drop from the
space), --fixed.trainer.max_epochs 5, --scheduler.grace_period 2, --searcher random."""


# Settings that are names and paths, taken as given: as YAML, `--name 2024` would be a number.
TEXT_SETTINGS = ("name", "storage_path", "base_config")


def parse_overrides(rest: list[str]) -> list[tuple[str, Any]]:
    """`--KEY VALUE` pairs after the known options -> [(KEY, YAML value, or the text for TEXT_SETTINGS)]."""
    overrides = []
    items = iter(rest)
    for item in items:
        if not item.startswith("--") or len(item) == 2:
            raise SearchConfigError(f"unexpected argument {item!r}: settings are given as --KEY VALUE")
        key, _, value = item[2:].partition("=")
        if not _:
            value = next(items, None)
            if value is None:
                raise SearchConfigError(f"--{key} needs a value")
        key = key.replace("-", "_")  # --storage-path = --storage_path
        overrides.append((key, value if key in TEXT_SETTINGS else parse_yaml(value, f"--{key} {value!r}")))
    return overrides


# How long `check_address` waits for a TCP connection to the cluster's head.
ADDRESS_TIMEOUT_S = 10.0


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse an `--address` where nothing answers, before Ray is asked to join it.

    Why: Ray 2.60's `ray.init` retries an unreachable GCS without end (five-second attempts, one
    warning line each; still waiting after two minutes), so a typo in the host or port looked like
    a hung search. HOST:PORT and ray://HOST:PORT are tried with one TCP connection; 'auto' (the
    cluster that `ray start` left on this machine) and 'local' are left to Ray.
    """
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SearchConfigError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, e.g. 6379) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise SearchConfigError(
            f"--address {address}: nothing answers at {host}:{port} ({reason}); is the cluster's head "
            f"running (`ray start --head --port {port}` there)? Without --address, rws tune starts Ray on this machine"
        ) from None


def main(argv: list[str]) -> int:
    """`rws tune ARGV`; returns the exit code: 0, 1 (no trial finished), 2 (bad input, raised), 130 (interrupted)."""
    try:
        return search(argv)
    except KeyboardInterrupt:  # while Ray's own Ctrl-C handler is not installed: imports, Ray's start, its cleanup
        print("rws tune: interrupted; continue with --resume (if the search had not begun, start it again)", flush=True)
        return 130


def search(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rws tune",
        usage="rws tune --config SEARCH.yaml [--address HOST:PORT] [--resume] [--num-trials N] [--KEY VALUE ...]",
        description=__doc__.split("\n")[0],
        epilog=EPILOG,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the search YAML (e.g. configs/tune/debug.yaml)")
    parser.add_argument("--address", help="join the Ray cluster at HOST:PORT (default: start Ray on this machine)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    parser.add_argument("--num-trials", type=int, help="trials to run (overrides num_trials)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.num_trials is not None:
        overrides.append(("num_trials", args.num_trials))
    spec = load_spec(args.config, overrides)
    check_address(args.address)

    # Imported here: Ray takes seconds to import, and --help and the checks of the YAML need none of it.
    from tune.experiment import prepare, run
    from tune.results import COLUMNS, markdown_table, trial_rows, write_results
    from tune.trial import check_fit_configs

    check_fit_configs(spec)
    directory = prepare(spec, args.resume)  # refuses a new search into an existing experiment, and so on
    print(f"rws tune: experiment {directory}, {spec.num_trials} trials", flush=True)
    results, interrupted = run(spec, directory, args.address, args.resume)
    rows = trial_rows(results, spec)
    if not rows:
        print("rws tune: no trial started; continue with --resume", flush=True)
        return 130
    paths = write_results(rows, spec, directory)
    print("\n" + markdown_table(rows[:5], [*COLUMNS, *spec.space]), end="")
    for name, path in paths.items():
        print(f"{name}: {path}")
    # Failed trials (ERROR) ran out of retries: they count as done here, though --resume retries them.
    unfinished = spec.num_trials - results.num_terminated - results.num_errors
    if interrupted or unfinished:
        print(
            "rws tune: interrupted before the search's end (the files above are partial); continue with --resume",
            flush=True,
        )
        return 130
    return report_failures(results.num_terminated, results.num_errors, directory)


def report_failures(finished: int, failed: int, directory: Path) -> int:
    """The exit code of a search that ran to its end, with a line about its failed trials.

    Why not 0 when every trial failed: there is no result and no best.yaml, and scripts that
    chain `rws tune` and `rws fit --config best.yaml` must stop here.
    """
    if not failed:
        return 0
    where = f"their errors are in {directory}/trial_*/error.txt; --resume retries them"
    if finished:
        print(f"rws tune: {failed} trial(s) failed ({where})", flush=True)
        return 0
    print(f"rws tune: error: no trial finished: all {failed} failed, so there is no best.yaml ({where})", file=sys.stderr)
    return 1
