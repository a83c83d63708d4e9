"""benchmarks/extrapolate.py: the learning-curve fit that RESULTS.md quotes for the CPU-budget runs."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "extrapolate.py"
spec = importlib.util.spec_from_file_location("extrapolate", SCRIPT)
extrapolate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extrapolate)


def write_log(path: Path, epochs, values) -> Path:
    lines = ["Restored all states from the checkpoint at somewhere"]  # other lines are ignored
    lines += [f"epoch {e} step {1000 * (e + 1)}: val/log_likelihood {v:.3f} nats, train/ess 1.50" for e, v in zip(epochs, values, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_recovers_a_known_curve():
    t = np.arange(6, 150, dtype=float)
    noise = np.random.default_rng(0).normal(0, 0.02, t.shape)
    a, b, c = extrapolate.fit_saturating(t, -90 - 60 * t**-0.5 + noise)
    assert a == pytest.approx(-90, abs=0.3)
    assert c == pytest.approx(0.5, abs=0.03)
    assert extrapolate.epochs_to_within((a, b, c), 1.0) == pytest.approx(3600, rel=0.15)  # (60 / 1)^(1 / 0.5)


def test_resumed_logs_merge_by_epoch_and_the_later_log_wins(tmp_path):
    first = write_log(tmp_path / "first.log", range(0, 10), [-150 + e for e in range(10)])
    resumed = write_log(tmp_path / "resumed.log", range(8, 12), [-1.0, -2.0, -3.0, -4.0])  # epochs 8, 9 re-run
    t, v = extrapolate.read_curve([first, resumed])
    assert t.tolist() == [float(e + 1) for e in range(12)]
    assert v[7] == -143 and v[8:].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_held_out_prediction_is_reported_and_appended(tmp_path):
    epochs = range(0, 90)
    log = write_log(tmp_path / "train.log", epochs, [-88 - 70 * (e + 1) ** -0.45 for e in epochs])
    results = tmp_path / "RESULTS.md"
    assert extrapolate.main([str(log), "--fit-first", "60", "--results", str(results)]) == 0
    text = results.read_text()
    assert extrapolate.HEADING in text
    asymptote = float(re.search(r"^\| all epochs \| 6-90 \| (-[\d.]+) \|", text, re.M).group(1))
    assert asymptote == pytest.approx(-88, abs=0.1)  # the log rounds to 1e-3 nats and c lies on a grid
    held = re.search(r"^- held out: the values after 61-90 epochs \(30 points\), .* mean error ([-+][\d.]+) nats", text, re.M)
    assert abs(float(held.group(1))) < 0.01  # noiseless data: the fit on the first 60 epochs predicts the rest


def test_a_curve_that_is_not_rising_is_refused(tmp_path):
    log = write_log(tmp_path / "train.log", range(0, 30), [-90 - 0.5 * e for e in range(30)])
    with pytest.raises(SystemExit, match="not rising"):
        extrapolate.main([str(log), "--no-append"])


def test_too_short_a_log_is_refused_naming_the_file(tmp_path):
    log = write_log(tmp_path / "short.log", range(0, 3), [-100, -99, -98])
    with pytest.raises(SystemExit, match="short.log"):
        extrapolate.main([str(log), "--no-append"])
