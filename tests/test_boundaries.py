"""Architecture rules that a refactor could silently break."""

import subprocess
import sys


def imported_top_level_packages(modules: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of `packages` that a fresh interpreter has loaded after importing `modules`."""
    code = f"import sys, {modules}\nprint(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [name for name in result.stdout.strip().split(",") if name]


def test_pipeline_imports_neither_lightning_nor_ray():
    modules = "pipeline.models, pipeline.estimators, pipeline.data, pipeline.distributed, pipeline.images"
    bad = imported_top_level_packages(modules, ("lightning", "pytorch_lightning", "ray"))
    assert not bad, f"pipeline pulled in: {bad}"


def test_lightning_modules_import_neither_tune_nor_ray():
    # `rws tune` plugs into the rws command through an entry point; the dependency goes one way.
    modules = (
        "lightning_modules.cli, lightning_modules.module, lightning_modules.datamodule, "
        "lightning_modules.checkpointing, lightning_modules.callbacks, lightning_modules.evaluate"
    )
    bad = imported_top_level_packages(modules, ("tune", "ray", "optuna"))
    assert not bad, f"lightning_modules pulled in: {bad}"


def test_tune_is_an_rws_command_through_its_entry_point():
    from lightning_modules.cli import plugin_command
    from tune.cli import main

    assert plugin_command("tune") is main
    assert plugin_command("no-such-command") is None
