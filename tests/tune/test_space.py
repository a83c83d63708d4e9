"""The search YAML of `rws tune`: parsing, command-line overrides, a trial's fit config, and the
checks that reject a bad search before Ray starts (one line naming the key or file, exit code 2)."""

import socket
from pathlib import Path

import pytest
import ray
import yaml

from lightning_modules.cli import main
from tune.cli import check_address, parse_overrides
from tune.experiment import param_space
from tune.space import apply_override, load_spec, parse_distribution
from tune.trial import check_fit_configs

CONFIGS = Path(__file__).parents[2] / "configs"
SEARCHES = sorted((CONFIGS / "tune").glob("*.yaml"))


def write_search(tmp_path: Path, **settings) -> Path:
    search = {
        "base_config": str(CONFIGS / "debug.yaml"),
        "fixed": {"trainer.max_epochs": 3},
        "space": {
            "depth": {"choice": [1, 3]},
            "width": {"choice": [16, 32]},
            "model.p_lr": {"loguniform": ["1e-4", 0.01]},
        },
        "num_trials": 4,
        **settings,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def test_fit_config_is_base_then_fixed_then_sampled(tmp_path):
    spec = load_spec(write_search(tmp_path, fixed={"trainer.max_epochs": 3, "top_width": 8, "model.q_lr": 0.02}))
    config = spec.fit_config({"depth": 3, "width": 32, "model.p_lr": 0.005})
    base = yaml.safe_load((CONFIGS / "debug.yaml").read_text())
    assert config["model"]["layer_sizes"] == [784, 32, 32, 8]  # depth latent layers, the top one top_width wide
    assert config["model"]["p_lr"] == 0.005 and config["model"]["q_lr"] == 0.02
    assert config["trainer"]["max_epochs"] == 3
    assert config["model"]["q_update"] == base["model"]["q_update"]  # untouched keys come from the base
    assert spec.base == base  # building a trial's config leaves the base alone
    assert spec.fit_config({"depth": 1, "width": 16, "model.p_lr": 0.005})["model"]["layer_sizes"] == [784, 8]


def test_bounds_written_without_a_dot_are_numbers(tmp_path):
    spec = load_spec(write_search(tmp_path))  # YAML 1.1 reads `1e-4` as a string
    assert spec.space["model.p_lr"] == ("loguniform", [1e-4, 0.01])


def test_corner_samples_visit_every_choice_and_both_bounds(tmp_path):
    spec = load_spec(write_search(tmp_path))
    samples = [sample for _, sample in spec.corner_samples()]
    assert {s["depth"] for s in samples} == {1, 3} and {s["width"] for s in samples} == {16, 32}
    assert {s["model.p_lr"] for s in samples} == {1e-4, 0.01}
    assert len(samples) == 4  # the first sample, then one change per other value


def test_command_line_overrides(tmp_path):
    spec = load_spec(
        write_search(tmp_path),
        [
            ("space.model.p_lr", None),  # drops it from the space
            ("space.model.num_samples", {"choice": [1, 5]}),
            ("fixed.trainer.max_epochs", 5),
            ("scheduler.grace_period", 3),
            ("num_trials", 7),
        ],
    )
    assert set(spec.space) == {"depth", "width", "model.num_samples"}
    assert spec.fixed == {"trainer.max_epochs": 5} and spec.max_epochs == 5
    assert spec.scheduler == {"grace_period": 3, "reduction_factor": 2}  # merged with the defaults
    assert spec.num_trials == 7
    # `--fixed.KEY null` sets null (here: the embedded data instead of the base config's file), as in the file.
    nulled = load_spec(write_search(tmp_path), [("fixed.data.path", None)])
    assert nulled.fixed["data.path"] is None and nulled.fit_config({})["data"]["path"] is None


def test_names_and_paths_on_the_command_line_are_text():
    """As YAML, `--name 2024` was the number 2024, refused as "not a directory name", and `--name yes` was True."""
    overrides = parse_overrides(["--name", "2024", "--storage-path", "0755", "--num-trials", "3", "--name=yes"])
    assert overrides == [("name", "2024"), ("storage_path", "0755"), ("num_trials", 3), ("name", "yes")]


def test_randint_includes_its_upper_bound(tmp_path):
    spec = load_spec(write_search(tmp_path, space={"model.num_samples": {"randint": [1, 3]}}))
    domain = param_space(spec)["model.num_samples"]
    assert {domain.sample() for _ in range(200)} == {1, 2, 3}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"lognormal": [1, 2]}, "expected one of"),
        ({"choice": []}, "non-empty list"),
        ({"choice": [[1, 2]]}, "scalars"),
        ({"uniform": [2, 1]}, "low < high"),
        ({"loguniform": [0, 1]}, "0 < low < high"),
        ({"uniform": ["a", 1]}, "numbers"),
        ({"randint": [1, 2.5]}, "integers"),
        (0.1, "expected one of"),
    ],
)
def test_bad_distribution_names_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_distribution("model.p_lr", spec)
    assert "space.model.p_lr" in str(error.value)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown setting 'serach'"):
        apply_override({}, "serach", "random")


@pytest.mark.parametrize("search", SEARCHES, ids=lambda path: path.stem)
def test_shipped_searches_build_every_corner(search):
    # data.path null: the embedded data, so that the full-MNIST search checks without its file.
    spec = load_spec(search, [("fixed.data.path", None)])
    check_fit_configs(spec)


def tune_error(capsys, *args: str) -> str:
    """Run `rws tune` in-process (every error here comes before Ray starts); returns its stderr."""
    assert main(["tune", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rws tune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_fit_key_in_the_space(tmp_path, capsys):
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--space.model.dropout", "{choice: [0.1]}")
    assert "space.model.dropout" in err and "dropout" in err


def test_bad_value_in_the_space_names_key_and_value(tmp_path, capsys):
    err = tune_error(
        capsys, "--config", str(write_search(tmp_path)), "--space.model.q_update", "{choice: [wake, dream]}"
    )
    assert "space.model.q_update = 'dream'" in err


def test_missing_base_config_names_the_file(tmp_path, capsys):
    err = tune_error(capsys, "--config", str(write_search(tmp_path, base_config="nowhere/fit.yaml")))
    assert "nowhere/fit.yaml" in err


def test_missing_search_config_names_the_file(tmp_path, capsys):
    assert "missing.yaml" in tune_error(capsys, "--config", str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_wrong_number_of_trials(tmp_path, capsys, value):
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--num-trials", value)
    assert "num_trials must be a positive integer" in err


def test_depth_without_width(tmp_path, capsys):
    err = tune_error(capsys, "--config", str(write_search(tmp_path, space={"depth": {"choice": [1, 2]}})))
    assert "depth and width" in err


def test_resume_without_an_experiment(tmp_path, capsys):
    err = tune_error(
        capsys, "--config", str(write_search(tmp_path)), "--storage-path", str(tmp_path / "runs"), "--resume"
    )
    assert "no experiment to resume" in err and str(tmp_path / "runs") in err


def test_existing_experiment_needs_resume_or_a_new_name(tmp_path, capsys):
    (tmp_path / "runs" / "search").mkdir(parents=True)
    (tmp_path / "runs" / "search" / "tuner.pkl").write_bytes(b"")  # what Ray writes when a search starts
    assert main(["tune", "--config", str(write_search(tmp_path)), "--storage-path", str(tmp_path / "runs")]) == 2
    out, err = capsys.readouterr()
    assert "--resume" in err and "--name" in err
    assert out == "", "an experiment that cannot start was announced first"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space.depth", "{choice: [0, 1]}"], "space.depth: depth must be a positive integer, got 0"),
        (["--space.depth", "{randint: [-1, 2]}"], "space.depth: depth must be a positive integer, got -1"),
        (["--space.width", "{uniform: [8, 16]}"], "space.width: uniform draws fractions"),
        (["--fixed.top_width", "0"], "fixed.top_width: top_width must be a positive integer, got 0"),
        (["--scheduler", "5"], "scheduler must be {grace_period: N, reduction_factor: N}, got 5"),
        (["--scheduler.grace_period", "0"], "scheduler.grace_period must be a positive integer, got 0"),
        (["--scheduler.reduction_factor", "1"], "scheduler.reduction_factor must be a number > 1, got 1"),
        (["--scheduler.grace_perod", "2"], "scheduler.grace_perod: unknown setting"),
        (["--resources-per-trial", "3"], "resources_per_trial must be {cpu: N, gpu: N}"),
        # what Ray only asserts, or a trial only hits, once the search has started
        (["--scheduler.grace_period", "4"], "scheduler.grace_period (4) must be <= ASHA's last rung, 3"),
        (
            ["--scheduler.grace_period", "2", "--fixed.trainer.max_epochs", "4", "--fixed.trainer.check_val_every_n_epoch", "4"],
            "scheduler.grace_period (2) must be <= ASHA's last rung, 1",  # one report per validated epoch
        ),
        (["--space.width", "{choice: [1,"], "--space.width '{choice: [1,': not valid YAML"),
        # ASHA's rungs: a searched or non-dividing number of epochs silently cut trials short
        (["--space.trainer.max_epochs", "{choice: [3, 4]}"], "space.trainer.max_epochs: not searchable"),
        (
            ["--fixed.trainer.max_epochs", "5", "--fixed.trainer.check_val_every_n_epoch", "2"],
            "trainer.max_epochs (5) must be a multiple of trainer.check_val_every_n_epoch (2)",
        ),
        # a mapping replaced the base config's whole section
        (["--fixed.model", "{val_num_samples: 20}"], "fixed.model: give dotted keys, e.g. fixed: {model.val_num_samples: ...}"),
        (["--fixed.trainer.limit_val_batches", "0"], "fixed.trainer.limit_val_batches = 0: trainer.limit_val_batches=0"),
        (["--fixed.trainer.check_val_every_n_epoch", "4"], "trainer.check_val_every_n_epoch=4 is more than trainer.max_epochs=3"),
        (["--fixed.trainer.devices", "2"], "fixed.trainer.devices = 2: trainer.devices=2: Ray starts a trial's processes"),
        (["--fixed.trainer.precision", "16-mixed"], "fixed.trainer.precision = '16-mixed': trainer.precision='16-mixed'"),
        (["--fixed.trainer.accelerator", "gpu"], "trainer.accelerator='gpu' needs use_gpu: true"),
        (  # K does not split over 2 ranks: the setting is named (the base config alone is fine)
            ["--workers-per-trial", "2", "--sample-parallel", "2"],
            "sample_parallel = 2: model.num_samples (5) must be divisible by model.sample_parallel (2)",
        ),
        (
            ["--workers-per-trial", "2", "--sample-parallel", "2", "--fixed.model.num_samples", "3"],
            "sample_parallel = 2: model.num_samples (3) must be divisible by model.sample_parallel (2)",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(tmp_path, capsys, args, message):
    assert message in tune_error(capsys, "--config", str(write_search(tmp_path)), *args)


def test_bad_yaml_and_a_file_as_storage_path_are_one_line_naming_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {p_lr: [1,\n")
    assert f"{broken}: not valid YAML" in tune_error(capsys, "--config", str(write_search(tmp_path, base_config=str(broken))))
    assert f"{broken}: not valid YAML" in tune_error(capsys, "--config", str(broken))
    (tmp_path / "afile").touch()
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--storage-path", str(tmp_path / "afile"))
    assert f"storage_path {tmp_path / 'afile'} is a file, not a directory" in err


def test_relative_shards_are_made_absolute_for_the_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_search(tmp_path), [("fixed.data.shards", "shards"), ("fixed.data.path", None)])
    assert spec.fixed["data.shards"] == str(tmp_path / "shards")  # trials run in their own directories
    url = load_spec(write_search(tmp_path), [("fixed.data.shards", "pipe:cat x/train-{0..3}.tar")])
    assert url.fixed["data.shards"] == "pipe:cat x/train-{0..3}.tar"
    # In the base config and in the space too: each trial looked for them in its own directory.
    base = tmp_path / "fit.yaml"
    base.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / "debug.yaml").read_text()), "data": {"shards": "shards"}}))
    assert load_spec(write_search(tmp_path, base_config=str(base))).base["data"]["shards"] == str(tmp_path / "shards")
    (tmp_path / "a.npz").touch()
    searched = load_spec(write_search(tmp_path), [("space.data.path", {"choice": ["a.npz", None]})])
    assert searched.space["data.path"] == ("choice", [str(tmp_path / "a.npz"), None])


def test_bad_fixed_key_is_blamed_not_the_first_space_key(tmp_path, capsys):
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--fixed.trainer.bogus", "3")
    assert "fixed.trainer.bogus = 3: " in err and "space." not in err


def test_bad_base_config_is_blamed(tmp_path, capsys):
    base = tmp_path / "fit.yaml"
    base.write_text(yaml.safe_dump({"model": {"dropout": 0.5}}))
    err = tune_error(capsys, "--config", str(write_search(tmp_path, base_config=str(base))))
    assert f"base_config {base}: " in err


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_address_where_nothing_answers_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, scheme):
    def join(**settings):
        raise AssertionError(f"ray.init({settings}) was called: for an unreachable GCS it retries without end")

    monkeypatch.setattr(ray, "init", join)
    port = unused_port()
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--address", f"{scheme}127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in err and "nothing answers" in err and "connection refused" in err.lower()


@pytest.mark.parametrize("address", ["headnode", "headnode:port", ":6379"])
def test_address_without_a_port_is_refused(tmp_path, capsys, address):
    err = tune_error(capsys, "--config", str(write_search(tmp_path)), "--address", address)
    assert repr(address) in err and "HOST:PORT" in err


def test_address_that_answers_passes_the_check():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        check_address(f"127.0.0.1:{listener.getsockname()[1]}")  # raises if refused
    check_address("auto")
    check_address(None)


def test_address_auto_without_a_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    def join(**settings):  # what Ray 2.60 raises when no `ray start` cluster runs on this machine
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", join)
    search = str(write_search(tmp_path))
    err = tune_error(capsys, "--config", search, "--storage-path", str(tmp_path / "runs"), "--address", "auto")
    assert "--address auto: Could not find any running Ray instance." in err
