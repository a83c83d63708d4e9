"""Every shipped YAML config must load: a config that does not parse is a bug."""

from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main
from lightning_modules.module import RWSModule

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"debug", "sbn_200_200_10", "wake_sleep", "darn_200", "nade_200", "sbn_deep"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_parses_and_builds(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(config.read_text())["model"]
    assert {key: printed["model"][key] for key in expected} == expected
    RWSModule(**printed["model"])  # builds the model: catches bad layer types and sizes


def test_wake_sleep_preset_is_classical_wake_sleep():
    model = yaml.safe_load((Path(__file__).parents[2] / "configs" / "wake_sleep.yaml").read_text())["model"]
    assert model["num_samples"] == 1 and model["q_update"] == "sleep"
