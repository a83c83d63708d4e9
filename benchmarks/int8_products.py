"""Exact products of 0/1 samples on int8 (VNNI) against float32: an experiment, not used by training.

    python benchmarks/int8_products.py [--threads N]

The SBN step's big products all have a 0/1 operand: the samples h times P's bottom weights (the
logits), and the output gradient times h (the weight gradient). Such a product is exact in integer
arithmetic if the other operand is fixed point: here 24 bits (float32's mantissa), split into three
balanced base-256 int8 digits, multiplied by `torch._int_mm`, and the three int32 results combined
in float64 (their sums pass 2^24). Shapes are the K = 50, batch 100 step's. Prints, per product,
the median time in ms of float32 and of the three int8 products with their digit and combine
passes, and each one's largest error against float64; then, below the table, one int8 product alone
against one bfloat16 product. Median of 30 calls after warm-up; the table is printed, not appended to
RESULTS.md.
"""

import argparse
import statistics
import time

import torch


def median_ms(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.compile
def int8_digits(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """values / scale rounded to an integer below 2^23 in magnitude, as three balanced base-256 int8 digits."""
    fixed = torch.round(values / scale)
    low = fixed - 256 * torch.floor((fixed + 128) / 256)
    fixed = (fixed - low) / 256  # exact: integers below 2^24
    middle = fixed - 256 * torch.floor((fixed + 128) / 256)
    high = (fixed - middle) / 256
    return high.to(torch.int8), middle.to(torch.int8), low.to(torch.int8)


@torch.compile
def combine(high: torch.Tensor, middle: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (((high.double() * 256 + middle) * 256 + low) * scale + bias).float()


def exact_product(samples: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """samples @ values (+ bias) for 0/1 int8 samples, exact up to rounding values to scale's grid."""
    return combine(*[torch._int_mm(samples, digit) for digit in int8_digits(values, scale)], scale, bias)


def compare(rows: int, in_units: int, out_units: int) -> str:
    """Prints the table rows of the logits and weight-gradient products; returns a line on one product alone."""
    samples = (torch.rand(rows, in_units) < 0.5).float()  # [K*B, H]
    weight = 0.1 * torch.randn(out_units, in_units)  # [O, H]
    bias = torch.randn(out_units)
    output_grad = 2 * torch.rand(rows, out_units) - 1  # [K*B, O], as w_k * (x - sigmoid(logits))
    samples_int8, samples_t_int8 = samples.to(torch.int8), samples.t().to(torch.int8)
    unit_scale = weight.abs().amax(1) / 8_000_000  # one grid per output unit
    grad_scale, zero = torch.tensor(1 / 8_000_000), torch.zeros(())
    products = {
        f"logits [{rows},{in_units}] x [{in_units},{out_units}]": (
            lambda: torch.addmm(bias, samples, weight.t()),
            lambda: exact_product(samples_int8, weight.t(), unit_scale, bias),
            torch.addmm(bias.double(), samples.double(), weight.t().double()),
        ),
        f"weight gradient [{out_units},{rows}] x [{rows},{in_units}]": (
            lambda: output_grad.t() @ samples,
            lambda: exact_product(samples_t_int8, output_grad, grad_scale, zero).t(),
            output_grad.double().t() @ samples.double(),
        ),
    }
    for name, (float32, int8, exact) in products.items():
        error32 = (float32().double() - exact).abs().max().item()
        error8 = (int8().double() - exact).abs().max().item()
        ms32, ms8 = median_ms(float32), median_ms(int8)
        print(f"| {name} | {ms32:.2f} | {ms8:.2f} | {ms32 / ms8:.2f}x | {error32:.1e} | {error8:.1e} |")
    digit = torch.randint(-128, 128, (in_units, out_units), dtype=torch.int8)
    samples_bf16, weight_bf16 = samples.bfloat16(), weight.t().bfloat16().contiguous()
    one_int8 = median_ms(lambda: torch._int_mm(samples_int8, digit))
    one_bf16 = median_ms(lambda: samples_bf16 @ weight_bf16)
    return f"one product [{rows},{in_units}] x [{in_units},{out_units}] alone: int8 {one_int8:.2f} ms, bfloat16 {one_bf16:.2f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability {capability}")
    print("| product | float32 ms | int8 x 3 ms | speed-up | float32 max error | int8 max error |")
    print("|---|---:|---:|---:|---:|---:|")
    alone = [compare(*shape) for shape in [(1000, 200, 784), (5000, 200, 784), (5000, 200, 200)]]
    print("\n" + "\n".join(alone))


if __name__ == "__main__":
    main()
