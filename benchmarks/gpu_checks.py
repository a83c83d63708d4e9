"""Issue 8's GPU checks and tables, in one call on a lent GPU machine.

    python benchmarks/gpu_checks.py OUT --data binarized_mnist.npz --checkpoint SBN_RUN [--seconds 560]
        [--stages tests,throughput,eval,fit]

A lent GPU comes for minutes, so everything runs in one process tree with a deadline: each stage
gets the smaller of its own limit and the time left and runs as a child, whose output is printed
once it ends (the caller keeps this process's output in a log); a stage that overruns is
interrupted and the next one starts. The stages, run in the order --stages names them:

- tests: the CUDA cases of the tests: the exact-enumeration oracles on the GPU (samplers,
  log-likelihood, P and Q gradients, the compiled step) and `rws fit` on the GPU scored by
  `rws eval` on the GPU and on the CPU;
- throughput: benchmarks/throughput.py --device cuda: SBN with eager, compiled and Pyro columns;
  DARN and NADE;
- experiments: what the first GPU run left to try: CUDA graphs for the compiled step, NADE's
  chunk size, SBN at batch 1000 (`run_experiments`);
- eval: benchmarks/eval_throughput.py --device cuda at K = 100000: three chunk sizes on 100 test
  points, then as many of the 10k test points as the time left allows with the fastest chunk;
- fit: `rws fit` of SBN 200-200-10 at K = 10 on the full MNIST data, for the time that is left.

On the machine, a call that carries `.whl` (the wheels of the packages its image lacks: pyro-ppl,
pyro-api, webdataset, braceexpand, jsonargparse, docstring-parser, typeshed-client) and `.devdata`
(the data and a trained SBN) runs, from the repository root:
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/gpu_checks.py $OUT --data .devdata/binarized_mnist.npz --checkpoint .devdata/sbn_k10`.

The tables are appended to OUT/RESULTS-gpu.md (RESULTS.md's format), for copying into RESULTS.md.
"""

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_K = 100_000
CHUNKS = (None, 500, 5000)  # None: rws eval's default (on a GPU 2^29 floats, 3347 samples per chunk for this SBN)
VERSIONS = (
    "import sys, torch, pytorch_lightning as pl; print(sys.version); "
    "print('torch', torch.__version__, 'cuda', torch.version.cuda, "
    "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'); print('pytorch-lightning', pl.__version__)"
)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def run(self, name: str, limit: float, command: list[str]) -> tuple[int | None, str]:
        """Run `command` for at most min(limit, time left) seconds, then print its output;
        (exit code, or None if it was cut short, and the output)."""
        limit = min(limit, self.left())
        if limit < 10:
            print(f"=== {name}: skipped, {self.left():.0f} s left", flush=True)
            return None, ""
        print(f"=== {name} (limit {limit:.0f} s): {' '.join(command)}", flush=True)
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as log:
            child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
            try:
                code = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)  # Lightning and pytest stop cleanly and say where they were
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                code = None
            log.seek(0)
            output = log.read()
        print(output, end="", flush=True)
        print(f"=== {name}: {'cut short' if code is None else f'exit {code}'} after {time.monotonic() - start:.0f} s", flush=True)
        return code, output


def eval_rate(output: str) -> float | None:
    """Points x samples per second from eval_throughput.py's table row, None if it did not finish."""
    rows = [line for line in output.splitlines() if line.startswith(f"| {EVAL_K} |")]
    return float(rows[-1].split("|")[10].strip().replace(",", "")) if rows else None


def run_throughput(deadline: Deadline, throughput: list[str]) -> None:
    """The issue's tables: SBN with eager, compiled and Pyro columns; DARN and NADE eager."""
    deadline.run("throughput sbn", 200, [*throughput, "--models", "sbn", "--steps", "50", "--budget", "2"])
    deadline.run("throughput darn nade", 60, [*throughput, "--models", "darn,nade", "--no-compile", "--steps", "30",
                 "--budget", "1"])  # fmt: skip


def run_experiments(deadline: Deadline, throughput: list[str]) -> None:
    """What the first GPU run left to try (benchmarks/RESULTS.md, "On a lent GPU"); each run's eager
    column is the present code, the reference its variant is read against."""
    deadline.run("sbn, CUDA graphs", 150, [*throughput, "--models", "sbn", "--ks", "5,50", "--no-pyro",
                 "--compile-mode", "reduce-overhead", "--steps", "50", "--budget", "2"])  # fmt: skip
    for floats in (2**20, 2**24, 2**26):  # 2^20: the CPU's size, today's
        deadline.run(f"nade, chunks of {floats} floats", 60, [*throughput, "--models", "nade", "--ks", "1,50", "--no-compile",
                     "--nade-chunk-floats", str(floats), "--steps", "10", "--budget", "1"])  # fmt: skip
    deadline.run("sbn, batch 1000", 150, [*throughput, "--models", "sbn", "--ks", "5,50", "--batch", "1000",
                 "--steps", "30", "--budget", "2"])  # fmt: skip


def run_eval(deadline: Deadline, evaluate: list[str]) -> None:
    """rws eval at K = 100000: the chunk sizes on 100 test points, then as many of the 10k as time
    allows (leaving a fit 150 s) with the fastest."""
    rates = {}
    for chunk in CHUNKS:
        chunk_args = [] if chunk is None else ["--chunk-size", str(chunk)]
        code, output = deadline.run(f"eval chunk {chunk or 'default'}", 60, [*evaluate, "--points", "100", *chunk_args])
        if code == 0 and (rate := eval_rate(output)):
            rates[chunk] = rate
    if rates:
        chunk, rate = max(rates.items(), key=lambda item: item[1])
        budget = deadline.left() - 150
        points = min(10_000, int(rate * budget * 0.7 / EVAL_K) // 100 * 100)  # 0.7: start-up and slack
        if points >= 100:
            chunk_args = [] if chunk is None else ["--chunk-size", str(chunk)]
            deadline.run(f"eval {points} points", budget, [*evaluate, "--points", str(points), *chunk_args])


def run_fit(deadline: Deadline, python: str, args: argparse.Namespace) -> None:
    """rws fit of SBN 200-200-10 at K = 10 on the full data, for the time that is left."""
    fit_seconds = int(deadline.left() - 30)
    if fit_seconds < 60:
        print(f"=== fit: skipped, {deadline.left():.0f} s left", flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="rws_gpu_fit_"))  # not OUT: a run's many files would crowd out the log
    code, output = deadline.run("fit", fit_seconds + 25, [
        python, "-m", "lightning_modules.cli", "fit", "--config", "configs/sbn_200_200_10.yaml",
        "--data.path", args.data, "--model.num_samples", "10", "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
        "--trainer.devices", "1", "--model.matmul_precision", "high", "--trainer.enable_progress_bar", "false",
        "--trainer.max_time", time.strftime("00:%H:%M:%S", time.gmtime(fit_seconds)),
        "--trainer.default_root_dir", str(root),
    ])  # fmt: skip
    lines = re.findall(r"^epoch \d+ step \d+: val/log_likelihood .*$", output, re.M)
    (args.out / "fit_curve.json").write_text(json.dumps({"seconds": fit_seconds, "validations": lines}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", required=True, help="binarized_mnist.npz")
    parser.add_argument("--checkpoint", required=True, help="a trained SBN 784-200-200-10 run or checkpoint")
    parser.add_argument("--seconds", type=float, default=560)
    parser.add_argument("--stages", default="tests,throughput,eval,fit",
                        help="comma-separated, run in this order: tests, throughput, experiments, eval, fit")
    parser.add_argument("--device", default="cuda", help="cpu: the same stages on the CPU, to try this script out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = str(args.out / "RESULTS-gpu.md")
    deadline = Deadline(args.seconds)
    python = sys.executable

    throughput = [python, "benchmarks/throughput.py", "--device", args.device, "--data", args.data, "--results", results]
    evaluate = [python, "benchmarks/eval_throughput.py", args.checkpoint, "--device", args.device, "--data", args.data,
                "--num-samples", str(EVAL_K), "--results", results]  # fmt: skip
    stages = {
        "tests": lambda: deadline.run("tests", 150, [
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu",
            "tests/pipeline/test_oracles.py", "tests/lightning_modules/test_cli.py",
        ]),  # fmt: skip
        "throughput": lambda: run_throughput(deadline, throughput),
        "experiments": lambda: run_experiments(deadline, throughput),
        "eval": lambda: run_eval(deadline, evaluate),
        "fit": lambda: run_fit(deadline, python, args),
    }
    for name in args.stages.split(","):
        if name not in stages:
            parser.error(f"--stages: unknown stage {name!r}; choose from {', '.join(stages)}")
    deadline.run("versions", 60, [python, "-c", VERSIONS])
    for name in args.stages.split(","):
        stages[name]()
    print(f"=== done, {deadline.left():.0f} s of the budget left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
