"""benchmarks/report.py: the machine line that tells RESULTS.md's CPUs apart."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "report.py"
spec = importlib.util.spec_from_file_location("report", SCRIPT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

CAPABILITY = torch.backends.cpu.get_cpu_capability()


def test_cpu_name_carries_the_first_processors_family_and_model():
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 167\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    )
    assert report.cpu_name(cpuinfo) == f"AMD EPYC (family 25, model 17), {CAPABILITY}"


def test_cpu_name_without_family_numbers_is_the_model_name():
    assert report.cpu_name("model name\t: Neoverse-V2\n") == f"Neoverse-V2, {CAPABILITY}"
