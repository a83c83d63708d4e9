"""The results of a search: a table of trials sorted by val/log_likelihood, and the best config.

In the experiment directory: `trials.csv` and `trials.md` (one row per trial, best first), and
`best.yaml`, the fit config of the best trial, which `rws fit --config best.yaml` trains again.
A trial's score is its best reported val/log_likelihood (ASHA stops some trials after fewer
epochs, so the table also gives the epoch of that value and the epochs the trial trained).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from tune.space import SearchSpec, plain
from tune.trial import BEST_METRIC, CHECKPOINT_FILE, METRIC

COLUMNS = ("rank", "trial", "status", METRIC, "best_epoch", "epochs")


def checkpoint_dir(result: tune.Result) -> str | None:
    """The trial's last checkpoint: Tune's own, or (multi-worker trials) the one Ray Train kept,
    whose path TuneReportCallback puts into each result."""
    if result.checkpoint is not None:
        return result.checkpoint.path
    return (result.metrics or {}).get(CHECKPOINT_PATH_KEY)


def trial_rows(results: tune.ResultGrid, spec: SearchSpec) -> list[dict[str, Any]]:
    """One row per started trial: score, epochs, status, sampled values, checkpoint; best first,
    then the failed trials (best first: a trial that diverged may have scored well before), then
    the trials without a score.

    All from each trial's last result (`ReportToRay` puts the best so far into each report):
    Ray saves it with the experiment state, while the result history is synced to storage later
    and an interrupted search may have lost it.
    """
    rows = []
    for result in results:
        if result.config is None:
            continue  # never started (the search was interrupted first)
        metrics = result.metrics or {}
        best_epoch = metrics.get("best_epoch")
        row = {
            "trial": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
            "status": "error" if result.error else "ok",
            METRIC: float(metrics[BEST_METRIC]) if best_epoch is not None else math.nan,
            "best_epoch": best_epoch,
            "epochs": metrics["epoch"] + 1 if "epoch" in metrics else 0,
            **{key: plain(result.config.get(key)) for key in spec.space},
            "checkpoint": str(Path(checkpoint) / CHECKPOINT_FILE) if (checkpoint := checkpoint_dir(result)) else "",
        }
        rows.append(row)
    rows.sort(key=lambda row: (math.isnan(row[METRIC]), row["status"] == "error", -row[METRIC]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return [{key: row[key] for key in (*COLUMNS, *spec.space, "checkpoint")} for row in rows]


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}" if key == METRIC else f"{value:.3g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or [key for key in rows[0] if key != "checkpoint"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(key, row[key]) for key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], spec: SearchSpec, directory: Path) -> dict[str, Path]:
    """Write trials.csv, trials.md and, when a trial that did not fail reported a score, best.yaml
    (else remove an earlier one); returns their paths."""
    paths = {"csv": directory / "trials.csv", "markdown": directory / "trials.md"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")  # not csv's \r\n: cut and awk read it
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(markdown_table(rows))
    best = rows[0]
    if math.isnan(best[METRIC]) or best["status"] == "error":
        (directory / "best.yaml").unlink(missing_ok=True)  # from before a --resume: no trial stands behind it now
    else:
        sampled = {key: best[key] for key in spec.space}
        header = (
            f"# Best of {len(rows)} trials of `rws tune` experiment {spec.name!r}: trial {best['trial']},\n"
            f"# {METRIC} {best[METRIC]:.3f} at epoch {best['best_epoch']}. Sampled: {sampled}\n"
            f"# rws fit --config {directory / 'best.yaml'}\n"
        )
        paths["best"] = directory / "best.yaml"
        paths["best"].write_text(header + yaml.safe_dump(spec.fit_config(sampled), sort_keys=False))
    return paths
