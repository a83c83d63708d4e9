"""Architecture rules that a refactor could silently break."""

import subprocess
import sys


def test_pipeline_imports_neither_lightning_nor_ray():
    code = (
        "import sys, pipeline.models, pipeline.estimators, pipeline.data, pipeline.distributed, pipeline.images\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'ray'))\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"pipeline pulled in: {result.stdout}"


def test_lightning_modules_import_neither_tune_nor_ray():
    # `rws tune` plugs into the rws command through an entry point; the dependency goes one way.
    code = (
        "import sys, lightning_modules.cli, lightning_modules.module, lightning_modules.datamodule, "
        "lightning_modules.checkpointing, lightning_modules.callbacks, lightning_modules.evaluate\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tune', 'ray', 'optuna'))\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"lightning_modules pulled in: {result.stdout}"


def test_tune_is_an_rws_command_through_its_entry_point():
    from lightning_modules.cli import plugin_command
    from tune.cli import main

    assert plugin_command("tune") is main
    assert plugin_command("no-such-command") is None
