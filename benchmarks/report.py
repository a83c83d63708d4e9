"""What every benchmark script writes: the command that reproduces it, and its section in RESULTS.md."""

import shlex
import sys
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script> <args>` as the user typed it (argv None: this process's arguments)."""
    return "python " + shlex.join([f"benchmarks/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def append_section(path: str | Path, heading: str, meta: str, table: str) -> None:
    """Append `heading`, then the metadata lines, then the table, at the end of RESULTS.md."""
    with open(path, "a") as f:
        f.write(f"\n{heading}\n\n{meta}\n{table}\n")
    print(f"appended to {path}")
