"""What every benchmark script writes: the CPU it ran on, the command that reproduces it, and its section
in RESULTS.md."""

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, family and model numbers, and the vector instructions torch's CPU kernels
    use on it: "AMD EPYC (family 25, model 17), AVX512". `cpuinfo`: /proc/cpuinfo's text (read if None).

    Why all three: the development VM has run on several CPUs under one name. On an AVX2 "AMD EPYC"
    (2026-12-03) the Philox draws of a compiled step took 4.1 ns each against 0.8 ns before, and the
    speed-ups over Pyro moved with it; an "Intel(R) Xeon(R) Processor" with AVX-512 (2026-12-05) has
    1.7x the EPYC's matmul peak (benchmarks/RESULTS.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device ("NVIDIA H200"), "CPU" for the CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script> <args>` as the user typed it (argv None: this process's arguments)."""
    return "python " + shlex.join([f"benchmarks/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def append_section(path: str | Path, heading: str, meta: str, table: str) -> None:
    """Append `heading`, then the metadata lines, then the table, at the end of RESULTS.md."""
    with open(path, "a") as f:
        f.write(f"\n{heading}\n\n{meta}\n{table}\n")
    print(f"appended to {path}")


def publish(script: str, argv: list[str] | None, heading: str, details: list[str], table: str, results: str | Path | None):
    """Print a section (its date, the `details` lines, the command, then the table) and append it to
    `results` unless that is None (--no-append)."""
    meta = "".join(
        [f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"]
        + [f"- {line}\n" for line in details]
        + [f"- command: `{command_line(script, argv)}`\n"]
    )
    print()
    print(meta)
    print(table)
    if results is not None:
        append_section(results, heading, meta, table)


def kernel_benchmark_args(doc: str, repeats: int, argv: list[str] | None) -> argparse.Namespace:
    """The options of the kernel benchmarks (--threads, --repeats, --no-append, --results), parsed; sets the threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args
