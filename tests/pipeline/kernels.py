"""Builds of the C kernels (pipeline/*.c) for each vector width this CPU can run.

A kernel's vector width follows the compiler's target (pipeline/vectors.h, LANES), and a CI machine
builds only its own (-march=native). Tests build every width this CPU can run and check each one.
"""

import ctypes
import os
import platform
import subprocess
from pathlib import Path

import pytest

from pipeline import native

# -march targets and the CPU flag each needs: 4, 8 and 16 floats per vector.
VECTOR_WIDTHS = pytest.mark.parametrize(
    ("march", "flag"),
    [("x86-64", "sse2"), ("x86-64-v3", "avx2"), ("x86-64-v4", "avx512f")],
    ids=["4-lanes", "8-lanes", "16-lanes"],
)


def cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def build_for(name: str, march: str, flag: str, directory: Path) -> ctypes.CDLL:
    """pipeline/<name>.c built with native.FLAGS but -march=`march`; skips the test where the CPU lacks `flag`."""
    if platform.machine() != "x86_64" or not cpu_has(flag):
        pytest.skip(f"this CPU cannot run -march={march}")
    library = directory / f"{name}_{march}.so"
    source = Path(native.__file__).with_name(f"{name}.c")
    flags = [f"-march={march}" if option == "-march=native" else option for option in native.FLAGS]
    subprocess.run([os.environ.get("CC", "cc"), *flags, str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))
