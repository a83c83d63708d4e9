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
