"""Training throughput of RWS against Pyro's ReweightedWakeSleep, and against this machine's roofline.

    python benchmarks/throughput.py [--threads N] [--steps N] [--models sbn,darn,nade] [--weights RUN] [--device cuda]
        [--batch N] [--compile-mode MODE] [--nade-chunk-floats N] [--no-append]   (models: sbn, darn, nade, darn_nade)

Times the full training step as `lightning_modules/module.py` runs it (sample Q, log-probs, both
surrogates, backward of p_loss + q_loss, the module's two fused Adam steps) on batch 100 of real
binarized MNIST rows, q_update wake-sleep, K in 1, 5, 10, 50, and reports the median step time over
--steps steps after warm-up as data points x samples per second (B * K / step time). Two rws
columns: eager (`RWSModule(compile=False)`, the default) and compiled (`compile=True`:
`torch.compile(rws_surrogates)`; its compilation happens in the warm-up and is not timed).

Side by side, the same SBN 784-200-200-10 (same initial weights) is trained by Pyro's
`pyro.infer.ReweightedWakeSleep` through `pyro.infer.SVI`: model = top-down Bernoulli layers with
`pyro.module` for P, guide = bottom-up Bernoulli layers with Q, `num_particles=K`,
`vectorize_particles=True`, `insomnia=0.5` with `num_sleep_particles=1` (wake-phi + sleep-phi on
B sleep draws, the direction of RWS's wake-sleep Q update; Pyro averages where RWS adds the two,
which Adam hardly sees), `pyro.optim.Adam` lr 1e-3. Pyro's validation is disabled (its checks
are not part of the algorithm). Note: Pyro's RWS sums the log-probs over the batch before
normalizing the weights ("mini-batch training is not supported yet"), so its estimator treats the
batch as one data point; its compute per step is the same as RWS's, which is what is compared.

Roofline: the dense float32 matmul peak is measured with `torch.mm` (2048 x 2048, median of 15
runs, same threads, before and after the steps; the higher median is used) and the SBN step's
unavoidable matmul FLOPs are counted (see `sbn_step_flops`); the achieved fraction is (FLOPs / peak) / step time. RWS and Pyro steps alternate during timing, so that
both see the same machine conditions (this 2-core VM drifts by tens of percent between runs).

Weights: by default every model starts from its fresh initialization. `--weights RUN` starts the SBN
rows (rws and Pyro alike) from a trained `rws fit` checkpoint of SBN 784-200-200-10 instead (a run
directory or checkpoint, as `rws eval --checkpoint` takes).

Products of samples: on a CPU, rws multiplies Q's and P's 0/1 samples by the weights with its C
kernels (`pipeline/sample_linear.py`): AMX tiles in three exact bfloat16 parts where the CPU has
them (`pipeline/amx_linear.c`), else table lookups that add up about a quarter of the dense
products' vector operations (`pipeline/lookup_linear.c`). The roofline column still counts the
dense float32 FLOPs against the float32 `torch.mm` peak, so for rws it is an effective throughput,
not a fraction of the hardware's work. The notes say which kernel ran; RWS_NATIVE=0 in the
environment times torch's dense products instead.
NADE's hidden logits and sampler run in a C kernel on a CPU too (`pipeline/nade_hidden.c`);
RWS_NATIVE=0 switches that off as well.

Device: `--device cuda` runs rws and Pyro on the GPU (every timed step ends with a
`torch.cuda.synchronize()`), and the peak is then `torch.mm` of 8192 x 8192 float32 matrices under
the default float32 matmul precision ('highest': no TF32), which the steps run under too.

Allocator: by default both run under the C library's malloc settings, as a plain process does.
`rws fit` keeps freed memory in the heap (pipeline/allocator.py), which makes its steps faster;
--retain-freed-memory applies that to the whole benchmark process, so Pyro's steps get it too.

The table is printed and appended to benchmarks/RESULTS.md under "## Training throughput (issue 8)".
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_section, command_line, cpu_name, device_name  # noqa: E402
from lightning_modules.module import RWSModule  # noqa: E402
from pipeline import layers, nade_hidden  # noqa: E402
from pipeline.allocator import retain_freed_memory  # noqa: E402
from pipeline.data import load_binarized_mnist  # noqa: E402
from pipeline.estimators import rws_surrogates  # noqa: E402
from pipeline.models import HelmholtzMachine  # noqa: E402
from pipeline.sample_linear import KERNELS, _kernels, kernel_file, kernel_functions  # noqa: E402

BATCH = 100
KS = (1, 5, 10, 50)
SBN_SIZES = [784, 200, 200, 10]
LR = 1e-3
HEADING = "## Training throughput (issue 8)"
DATA = Path("/work/shared/data/binarized_mnist.npz")

MODELS = {
    "sbn": {"layer_sizes": SBN_SIZES, "p_layer": "sbn", "q_layer": "sbn"},
    "darn": {"layer_sizes": [784, 200], "p_layer": "darn", "q_layer": "sbn"},
    "nade": {"layer_sizes": [784, 200], "p_layer": "nade", "q_layer": "nade", "nade_hidden": 200},
    "darn_nade": {"layer_sizes": [784, 200], "p_layer": "darn", "q_layer": "nade", "nade_hidden": 200},
}
LABELS = {
    "sbn": "SBN 784-200-200-10",
    "darn": "DARN 784-200 (P darn, Q sbn)",
    "nade": "NADE 784-200 (nade/nade, hidden 200)",
    "darn_nade": "DARN/NADE 784-200 (P darn, Q nade, hidden 200: configs/darn_200.yaml)",
}


def load_batch(path: Path, batch: int) -> tuple[torch.Tensor, str]:
    """The first `batch` rows of the binarized MNIST training split (uint8 [B, 784])."""
    try:
        train = load_binarized_mnist(path, splits=("train",))["train"]
        source = str(path)
    except FileNotFoundError:
        train = load_binarized_mnist(None, splits=("train",))["train"]
        source = "embedded default subset"
    return train[:batch], source


def sbn_step_flops(sizes: list[int], batch: int, k: int) -> int:
    """Unavoidable matmul FLOPs of one RWS wake-sleep step on an SBN [D, H_1, ..., H_L].

    A matmul [rows, n_in] x [n_in, n_out] costs 2 * rows * n_in * n_out FLOPs. Elementwise work
    (sigmoid, BCE, sampling, softmax, Adam) is not counted. No input gradients are needed anywhere:
    every layer's input is data or a discrete sample, so the backward pass is weight gradients only.

    Wake phase, K x B samples h ~ Q(h | x):
      * Q: the logits of q(h_1 | x) and its weight gradient are computed once per x (B rows, not
        K x B), because x is the same for all K samples (the K-fold gradient is summed over K
        before the weight-gradient matmul); the logits computed while sampling Q are the ones its
        log-prob needs, so each Q layer's forward counts once. Layers 2..L: K x B rows forward +
        K x B rows weight gradient.
      * P: every conditional p(h_{l-1} | h_l): K x B rows forward + K x B rows weight gradient
        (the prior has no matmul).
    Sleep phase, B draws (x, h) ~ P:
      * P's ancestral sampling: B rows forward through every conditional (no gradient);
      * Q's log-prob: B rows forward + B rows weight gradient through every Q layer.
    """
    pairs = list(zip(sizes[:-1], sizes[1:]))  # (lower, upper) per latent layer, bottom-up
    mm = [2 * lo * up for lo, up in pairs]  # FLOPs per row of each layer's [lo x up] weight
    kb = k * batch
    q_wake = 2 * batch * mm[0] + sum(2 * kb * f for f in mm[1:])  # forward + weight gradient
    p_wake = sum(2 * kb * f for f in mm)  # forward + weight gradient
    p_sleep = sum(batch * f for f in mm)  # ancestral sampling, forward only
    q_sleep = sum(2 * batch * f for f in mm)  # log-prob forward + weight gradient
    return q_wake + p_wake + p_sleep + q_sleep


def matmul_peak(device: torch.device, runs: int = 15) -> float:
    """Dense float32 matmul FLOP/s: median over `runs` torch.mm of n x n by n x n (n = 2048 on a CPU,
    8192 on a GPU, where 2048 would not fill the chip)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    mm = synchronized(lambda: torch.mm(a, b, out=out), device)
    for _ in range(3):
        mm()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mm()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def synchronized(fn, device: torch.device):
    """`fn` followed by a wait for the device's queued work (GPU launches return before they run)."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def time_steps(steps_fns, steps: int, warmup: int, budget_s: float) -> list[tuple[float, int]]:
    """Median seconds of each function in `steps_fns` over up to `steps` calls (at least 3) within
    `budget_s` per function, after `warmup` calls each. With several functions the calls alternate
    (a, b, a, b, ...), so that both see the same machine conditions and drift cancels in their ratio."""
    for fn in steps_fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in steps_fns]
    begin = time.perf_counter()
    while len(times[0]) < steps and (len(times[0]) < 3 or time.perf_counter() - begin < budget_s * len(steps_fns)):
        for fn, ts in zip(steps_fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [(statistics.median(ts), len(ts)) for ts in times]


def through_kernel(kernel: str, step):
    """`step` with the products of samples through pipeline/<kernel>.c (`--also-kernel`)."""

    def call():
        with kernel_file(kernel):
            step()

    return call


def rws_step_fn(model: HelmholtzMachine, x: torch.Tensor, k: int, compile: bool, compile_mode: str | None = None):
    """The module's training step on `model`'s weights: surrogates, one backward, two Adam steps.
    `compile_mode`: torch.compile's mode for the compiled step (an experiment: the module uses the default)."""
    module = RWSModule(model.layer_sizes, num_samples=k, q_update="wake-sleep", p_lr=LR, q_lr=LR, compile=compile)
    module.model = model
    if compile and compile_mode is not None:
        module.rws_surrogates = torch.compile(rws_surrogates, dynamic=False, mode=compile_mode)
    p_opt, q_opt = module.configure_optimizers()

    def step():
        s = module.rws_surrogates(model, x, k, "wake-sleep")
        p_opt.zero_grad()
        q_opt.zero_grad()
        (s.p_loss + s.q_loss).backward()
        p_opt.step()
        q_opt.step()

    return step


def dense_logits(layer, cond: torch.Tensor) -> torch.Tensor:
    """An SBN layer's logits as the plain F.linear that Pyro users write (not rws's C kernels)."""
    return torch.nn.functional.linear(cond, layer.cond_weight.weight, layer.bias)


def load_weights(path: str) -> HelmholtzMachine:
    """The SBN 784-200-200-10 model of an `rws fit` checkpoint (run directory or checkpoint)."""
    from lightning_modules.checkpoints import load_checkpoint

    model = load_checkpoint(path)[0].model
    if model.layer_sizes != SBN_SIZES:
        raise SystemExit(f"--weights {path}: the model has layer sizes {model.layer_sizes}, the benchmark needs {SBN_SIZES}")
    return model


def pyro_step_fn(model: HelmholtzMachine, x: torch.Tensor, k: int):
    """The same SBN trained by pyro.infer.ReweightedWakeSleep through SVI."""
    import pyro
    import pyro.distributions as dist

    pyro.clear_param_store()
    p_conds, p_prior, q_conds = model.p_conditionals, model.p_prior, model.q_conditionals
    num_latent = len(q_conds)

    def pyro_model(x, observations=None):
        pyro.module("p_conditionals", p_conds)
        pyro.module("p_prior", p_prior)
        with pyro.plate("data", x.shape[0]):
            top = p_prior.bias.expand(x.shape[0], p_prior.size)
            h = pyro.sample(f"h{num_latent}", dist.Bernoulli(logits=top).to_event(1))
            for l in reversed(range(num_latent)):  # p(h_l | h_{l+1}), h_0 = x observed
                logits = dense_logits(p_conds[l], h)
                name, obs = ("x", x) if l == 0 else (f"h{l}", None)
                h = pyro.sample(name, dist.Bernoulli(logits=logits).to_event(1), obs=obs)

    def pyro_guide(x, observations=None):
        if observations is not None:  # sleep phase: x is the model's draw
            x = observations["x"]
        pyro.module("q_conditionals", q_conds)
        with pyro.plate("data", x.shape[0]):
            cond = x
            for l in range(num_latent):  # q(h_{l+1} | h_l), h_0 = x
                logits = dense_logits(q_conds[l], cond)
                cond = pyro.sample(f"h{l + 1}", dist.Bernoulli(logits=logits).to_event(1))

    loss = pyro.infer.ReweightedWakeSleep(
        num_particles=k, insomnia=0.5, num_sleep_particles=1, vectorize_particles=True, max_plate_nesting=1
    )
    svi = pyro.infer.SVI(pyro_model, pyro_guide, pyro.optim.Adam({"lr": LR}), loss=loss)
    xf = x.float()
    return lambda: svi.step(xf)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's default here)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="max seconds of timed steps per configuration")
    parser.add_argument("--models", default="sbn,darn,nade", help="comma-separated subset of sbn,darn,nade,darn_nade")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--weights", help="start the SBN rows from this `rws fit` checkpoint of SBN 784-200-200-10 "
                        "(run directory or checkpoint) instead of a fresh initialization")
    parser.add_argument("--data", default=str(DATA), help="binarized_mnist.npz (missing: the embedded default subset)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (rws and Pyro alike)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"data points per step (default {BATCH})")
    parser.add_argument("--compile-mode", default=None,
                        help="experiment: torch.compile mode of the compiled column, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--nade-chunk-floats", type=int, default=None,
                        help=f"experiment: NADE's activation floats per chunk of rows (default {layers._NADE_CHUNK_FLOATS})")
    parser.add_argument("--also-kernel", action="append", default=[], choices=KERNELS,
                        help="also time the compiled step with this C kernel for the products of samples, alternated "
                             "with the others (an A/B; the notes give its time and ratio); repeatable")
    parser.add_argument("--no-pyro", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed memory in the heap, as `rws fit` does (pipeline/allocator.py), for rws and Pyro alike")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    retained = args.retain_freed_memory and retain_freed_memory()
    ks = [int(k) for k in args.ks.split(",")]
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        parser.error(f"unknown --models {sorted(set(models) - set(MODELS))}; choose from {', '.join(MODELS)}")
    if args.also_kernel and (device.type != "cpu" or args.no_compile):
        parser.error("--also-kernel times compiled CPU steps: it needs --device cpu and no --no-compile")
    for kernel in args.also_kernel:
        if kernel_functions(kernel) is None:
            parser.error(f"--also-kernel {kernel}: pipeline/{kernel}.c does not run on this machine")
    load_before = load_average()
    batch = args.batch
    if args.nade_chunk_floats is not None:
        layers._NADE_CHUNK_FLOATS = args.nade_chunk_floats
    x, source = load_batch(Path(args.data), batch)
    x = x.to(device)
    pyro_version = "not run"
    if not args.no_pyro:
        import pyro

        pyro.enable_validation(False)
        pyro_version = pyro.__version__

    peak = matmul_peak(device)
    print(f"torch {torch.__version__}, pyro {pyro_version}, {device_name(device)}, threads {torch.get_num_threads()}, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s, data: {source}", flush=True)

    trained = load_weights(args.weights) if args.weights else None
    peak_before = peak
    rows = []  # markdown table rows; roofline cells are filled in once both peak measurements are in
    comparisons = []  # --also-kernel timings
    for name in models:
        for k in ks:
            # Each configuration compiles the frames around the step's graph breaks (NADE's chunk loop)
            # for new shapes; past 8 variants of one frame, dynamo would run it eagerly from then on.
            torch._dynamo.reset()
            torch.manual_seed(0)
            base = trained if name == "sbn" and trained is not None else HelmholtzMachine(**MODELS[name])
            base = base.to(device)
            fns = {"eager": rws_step_fn(copy.deepcopy(base), x, k, compile=False)}
            if not args.no_compile:
                fns["compiled"] = rws_step_fn(copy.deepcopy(base), x, k, compile=True, compile_mode=args.compile_mode)
                for kernel in args.also_kernel:
                    fns[kernel] = through_kernel(kernel, rws_step_fn(copy.deepcopy(base), x, k, True, args.compile_mode))
            if name == "sbn" and not args.no_pyro and k > 1:  # Pyro's RWS asserts K > 1
                fns["pyro"] = pyro_step_fn(copy.deepcopy(base), x, k)
            fns = {variant: synchronized(fn, device) for variant, fn in fns.items()}
            timings = dict(zip(fns, time_steps(list(fns.values()), args.steps, args.warmup, args.budget)))
            cells = [LABELS[name], str(k)]
            for variant in ("eager", "compiled", "pyro"):
                if variant in timings:
                    seconds, count = timings[variant]
                    cells += [f"{1e3 * seconds:.2f} (n={count})", f"{batch * k / seconds:,.0f}"]
                else:
                    cells += ["-", "-"]
            for variant in ("eager", "compiled"):
                pyro = timings.get("pyro")
                cells.append(f"{pyro[0] / timings[variant][0]:.2f}x" if pyro and variant in timings else "-")
            for kernel in args.also_kernel:
                seconds, count = timings[kernel]
                comparisons.append(f"{LABELS[name]}, K = {k}: compiled step with pipeline/{kernel}.c {1e3 * seconds:.2f} ms "
                                   f"(n={count}), {seconds / timings['compiled'][0]:.2f}x the compiled column's")
            flops = sbn_step_flops(SBN_SIZES, batch, k) if name == "sbn" else None
            rows.append((cells, flops, [timings[v][0] for v in ("eager", "compiled") if v in timings]))
            print("| " + " | ".join(cells) + " |", flush=True)

    peak_after = matmul_peak(device)
    load_after = load_average()
    peak = max(peak_before, peak_after)  # the higher median: the conservative roofline
    lines = []
    for cells, flops, seconds in rows:
        roof = " / ".join(f"{100 * flops / peak / t:.1f}%" for t in seconds) + f" ({flops / 1e9:.3f} GFLOP)" if flops else "-"
        lines.append("| " + " | ".join([*cells, roof]) + " |")
    header = (
        "| model | K | rws eager step ms (median, n) | eager points x samples/s | rws compiled step ms (median, n) "
        "| compiled points x samples/s | Pyro RWS step ms (median, n) | Pyro points x samples/s "
        "| eager speed-up over Pyro | compiled speed-up over Pyro | roofline fraction eager / compiled (step FLOPs) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(lines)
    print()
    print(table)
    kernels = _kernels() if device.type == "cpu" else None
    products = "dense (torch)" if kernels is None else f"C kernel (pipeline/{kernels.linear.__name__}.c)"
    nade_kernel = device.type == "cpu" and nade_hidden.have_kernels()
    nade = "C kernel (pipeline/nade_hidden.c)" if nade_kernel else "torch ops (NADEHiddenLogits)"
    meta = (
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_name()}\n"
        f"- device: {device_name(device)} (`--device {args.device}`)\n"
        f"- torch {torch.__version__}, pyro-ppl {pyro_version}, python {platform.python_version()}\n"
        f"- torch threads: {torch.get_num_threads()}\n"
        f"- allocator: {'glibc malloc keeping freed memory (pipeline/allocator.py, as `rws fit` sets it), for rws and Pyro alike' if retained else 'the C library default, for rws and Pyro alike (`rws fit` keeps freed memory: --retain-freed-memory)'}\n"
        f"- float32 matmul peak (torch.mm {2048 if device.type == 'cpu' else 8192}^2, median of 15 runs): {peak_before / 1e9:.1f} GFLOP/s before the "
        f"steps, {peak_after / 1e9:.1f} after; the roofline column uses the higher\n"
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after}\n"
        f"- data: batch of {batch} rows from {source}; q_update wake-sleep; Adam lr {LR} for P and Q\n"
        f"- experiments: compile mode {args.compile_mode or 'default'}; NADE chunk {layers._NADE_CHUNK_FLOATS} floats\n"
        f"- weights: {f'`{args.weights}` (trained) for the SBN rows' if args.weights else 'fresh initialization'}\n"
        f"- rws products of samples: {products}; NADE's hidden logits and sampler: {nade}\n"
        + "".join(f"- {line}\n" for line in comparisons)
        + f"- command: `{command_line(__file__, argv)}`\n"
    )
    print(meta)
    if not args.no_append:
        append_section(args.results, HEADING, meta, table)


if __name__ == "__main__":
    main()
