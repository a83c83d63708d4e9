"""Extrapolate a training run's validation curve: where would it level off, and how soon?

    python benchmarks/extrapolate.py TRAIN_LOG [TRAIN_LOG ...] [--fit-first N] [--no-append]

Reads the `epoch E step S: val/log_likelihood V nats` lines that `rws fit` prints (several logs of
one run, e.g. the first run and its `--resume` continuations, are merged by epoch) and fits the
saturating power law

    V(t) = a - b * t^(-c),    t = epochs done (E + 1),  b > 0, c > 0,

whose asymptote `a` is the validation log-likelihood the run would reach if trained forever at the
same settings. c is found on a grid, a and b by least squares for each c. The fit is checked the
honest way: it is refitted on the first N epochs only (--fit-first), and its predictions for the
later epochs, which the run did measure, are compared with them. How far the asymptote moves
between that early fit and the full fit shows how much to trust it.

The table is printed and appended to benchmarks/RESULTS.md under "## Learning-curve extrapolation
(issue 8)".
"""

import argparse
import datetime
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_section, command_line  # noqa: E402

HEADING = "## Learning-curve extrapolation (issue 8)"
LINE = re.compile(r"^epoch (\d+) step \d+: val/log_likelihood (-?[\d.]+) nats")
EXPONENTS = np.logspace(-2, 1, 600)  # the grid for c


def read_curve(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(epochs done [n], validation log-likelihood [n]) from `rws fit` logs, by epoch; a later log
    wins where two logs cover the same epoch (a resumed run re-running an unsaved epoch)."""
    by_epoch = {}
    for path in paths:
        for line in path.read_text().splitlines():
            match = LINE.match(line)
            if match:
                by_epoch[int(match.group(1))] = float(match.group(2))
    if len(by_epoch) < 4:
        raise SystemExit(f"{', '.join(map(str, paths))}: need at least 4 'epoch ... val/log_likelihood' lines, found {len(by_epoch)}")
    epochs = sorted(by_epoch)
    return np.array(epochs, dtype=float) + 1, np.array([by_epoch[e] for e in epochs])


def fit_saturating(t: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of v = a - b t^(-c) with b > 0, c on the grid EXPONENTS."""
    best = None
    for c in EXPONENTS:
        design = np.stack([np.ones_like(t), -(t**-c)], 1)  # [n, 2]
        (a, b), *_ = np.linalg.lstsq(design, v, rcond=None)
        if b <= 0:
            continue
        sse = float(((design @ np.array([a, b]) - v) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(a), float(b), float(c))
    if best is None:
        raise SystemExit("the curve is not rising towards a limit (no fit with b > 0)")
    return best[1:]


def predict(params: tuple[float, float, float], t: np.ndarray) -> np.ndarray:
    a, b, c = params
    return a - b * t**-c


def epochs_to_within(params: tuple[float, float, float], nats: float) -> float:
    """Epochs done when the fitted curve is `nats` below its asymptote: b t^-c = nats."""
    _, b, c = params
    return (b / nats) ** (1 / c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="`rws fit` logs of one run, in order")
    parser.add_argument("--fit-first", type=int, help="refit on the first N epochs only and predict the rest (default: all but the last third)")
    parser.add_argument("--skip", type=int, default=5, help="leave out the first N epochs (the fast initial rise) from every fit")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)

    t, v = read_curve(args.logs)
    keep = t > args.skip
    t, v = t[keep], v[keep]
    fit_first = args.fit_first if args.fit_first is not None else int(t[0] + 2 * (t[-1] - t[0]) / 3)
    early = t <= fit_first
    if early.sum() < 4 or (~early).sum() < 1:
        raise SystemExit(f"--fit-first {fit_first} leaves {int(early.sum())} epochs to fit and {int((~early).sum())} to predict")
    full_fit, early_fit = fit_saturating(t, v), fit_saturating(t[early], v[early])
    held_error = predict(early_fit, t[~early]) - v[~early]  # on the epochs the early fit did not see
    rows = []
    for name, params, fit_t, fit_v in (
        ("all epochs", full_fit, t, v),
        (f"the first {fit_first} epochs only", early_fit, t[early], v[early]),
    ):
        a, b, c = params
        rms = float(np.sqrt(((predict(params, fit_t) - fit_v) ** 2).mean()))
        rows.append(
            f"| {name} | {int(fit_t[0])}-{int(fit_t[-1])} | {a:.2f} | {b:.1f} | {c:.3f} | {rms:.3f} "
            f"| {epochs_to_within(params, 1.0):,.0f} | {epochs_to_within(params, 0.5):,.0f} |"
        )
    table = (
        "| fit on | epochs done | asymptote a (nats) | b | c | rms residual | epochs to 1 nat below a | to 0.5 nat below a |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    last = f"measured after {int(t[-1])} epochs: {v[-1]:.2f}"
    check = (
        f"- held out: the values after {int(t[~early][0])}-{int(t[-1])} epochs ({int((~early).sum())} points), predicted by the fit on "
        f"the first {fit_first} epochs: mean error {held_error.mean():+.3f} nats, largest {held_error[np.abs(held_error).argmax()]:+.3f}"
    )
    meta = (
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
        f"- model: V(t) = a - b t^-c over epochs done t, fitted to the validation curve (first {args.skip} epochs left out); {last}\n"
        f"{check}\n"
        f"- command: `{command_line(__file__, argv)}`\n"
    )
    print(table)
    print(meta)
    if not args.no_append:
        append_section(args.results, HEADING, meta, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
