"""`retain_freed_memory`: a step's large temporaries must stop page-faulting once it is applied."""

import platform
import subprocess
import sys

import pytest

# Allocates, touches and frees a step's temporaries 40 times, then prints the page faults
# of the last 30 rounds; with argument 1, after retain_freed_memory().
_ROUNDS = """
import resource, sys, torch
from pipeline.allocator import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
def step():  # like a K = 50 step's [K, B, 784] logits and gradients: 16 MB each, 96 MB in all
    temporaries = [torch.empty(4 << 20) for _ in range(6)]
    for t in temporaries:
        t.fill_(1.0)
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(retain: bool) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _ROUNDS, "1" if retain else "0"], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_retained_memory_stops_the_page_faults():
    default, retained = page_faults(False), page_faults(True)
    assert retained * 10 < default, f"page faults over 30 rounds: {default} by default, {retained} retained"


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    from pipeline.allocator import retain_freed_memory

    monkeypatch.setenv("RWS_KEEP_FREED_MEMORY", "0")
    assert retain_freed_memory() is False
