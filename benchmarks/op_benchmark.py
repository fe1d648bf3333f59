"""What the per-op kernel benchmarks share: a case (one op at one size: its inputs, our kernel,
the PyTorch reference, the bytes each pass moves), its measurement, and the command line.

Each `benchmarks/<op>.py` defines `case(size, device, dtype) -> OpCase` and calls `run_cli`;
`python -m minillm.benchmarks.gpu_check` measures the same cases.

A case is measured in one of two ways:
- passes ("fwd", "bwd"): the forward, then the backward on one retained graph (elementwise
  ops and norms);
- passes ("loss", "fwd+bwd"): the loss alone under no_grad, then forward and backward together
  (the cross-entropies, whose kernels write the gradient during the forward).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

from minillm.benchmarks.timing import (
    add_common_args, gb_per_s, header, parse_sizes, resolve, table, tflop_per_s, time_forward_backward,
    time_ms,
)

SPLIT = ("fwd", "bwd")
FUSED = ("loss", "fwd+bwd")


@dataclass
class OpCase:
    """One op at one size. bytes (and flops, for a compute-bound op) are per pass."""
    size: dict                       # the row's size columns, e.g. {"M": 4096, "N": 768}
    inputs: list                     # what each implementation is called with
    kernel: Callable                 # ours: the Triton kernel on CUDA
    reference: Callable              # plain PyTorch
    bytes: dict[str, int]            # pass -> bytes read + written
    passes: tuple[str, str] = SPLIT
    flops: dict[str, float] = field(default_factory=dict)
    peak_memory: bool = False        # also report the CUDA peak memory of the last pass
    kernel_name: str = "triton"
    reference_name: str = "torch"
    kernel_on_cpu: bool = False      # the kernel's op also runs, in plain PyTorch, without a GPU


def triton_timeable(device: torch.device) -> bool:
    """Our kernels are timed only where they run natively: CUDA, Triton, no interpreter."""
    from minillm.kernels import launch

    return device.type == "cuda" and launch.HAS_TRITON and not launch.INTERPRET


def implementations(case: OpCase, device: torch.device, compiled: bool = False) -> list[tuple[str, Callable]]:
    """[("triton", kernel) where it runs natively, ("torch", reference), ("torch.compile", ...)]."""
    impls = []
    if triton_timeable(device):
        impls.append((case.kernel_name, case.kernel))
    elif case.kernel_on_cpu:
        impls.append((f"{case.kernel_name} (torch)", case.kernel))
    impls.append((case.reference_name, case.reference))
    if compiled:
        impls.append((f"{case.reference_name} compiled", torch.compile(case.reference, dynamic=False)))
    return impls


def measure(case: OpCase, fn: Callable, device: torch.device, reps: int, warmup: int) -> dict:
    """The row of one implementation: pass -> Stats, GB/s (and TFLOP/s where flops are given)."""
    first, last = case.passes
    if case.passes == SPLIT:
        timings = dict(zip(SPLIT, time_forward_backward(fn, case.inputs, device, reps, warmup)))
    else:
        leaves = [t for t in case.inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def loss_only():
            with torch.no_grad():
                return fn(*case.inputs)

        timings = {first: time_ms(loss_only, device, reps, warmup)}
        if case.peak_memory and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        timings[last] = time_ms(lambda: torch.autograd.grad(fn(*case.inputs), leaves), device, reps, warmup)
    row = dict(case.size)
    for name, t in timings.items():
        row[f"{name} ms"] = t
        row[f"{name} GB/s"] = gb_per_s(case.bytes[name], t)
        if name in case.flops:
            row[f"{name} TFLOP/s"] = tflop_per_s(case.flops[name], t)
    if case.peak_memory and device.type == "cuda" and case.passes == FUSED:
        row["peak MiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def columns(case: OpCase, device: torch.device) -> list[str]:
    cols = ["impl", *case.size]
    for name in case.passes:
        cols += [f"{name} ms", f"{name} GB/s"] + ([f"{name} TFLOP/s"] if name in case.flops else [])
    if case.peak_memory and device.type == "cuda":
        cols.append("peak MiB")
    return cols


def run_cli(doc: str, title: str, make_case: Callable[..., OpCase], sizes: dict[str, str], argv=None,
            add_args: Callable[[argparse.ArgumentParser], None] | None = None,
            options: Callable[[argparse.Namespace], dict] | None = None, cpu_reps: int | None = None) -> int:
    """The per-op command: parse the common flags, measure each size and implementation, print
    one table. options(args) -> extra keyword arguments for make_case."""
    p = add_common_args(argparse.ArgumentParser(description=doc.split("\n\n")[0]))
    p.add_argument("--sizes", help="comma-separated sizes, e.g. " + sizes["cuda"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    if add_args:
        add_args(p)
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    warmup = args.warmup
    if cpu_reps and args.reps is None and device.type == "cpu":
        reps, warmup = cpu_reps, 1  # seconds per repetition on a CPU
    header(title, device, dtype)
    rows, cols = [], ["impl"]
    for size in parse_sizes(args.sizes or sizes[device.type]):
        case = make_case(size, device, dtype, **(options(args) if options else {}))
        cols = columns(case, device)
        for impl, fn in implementations(case, device, args.compile):
            rows.append({"impl": impl, **measure(case, fn, device, reps, warmup)})
    table(rows, cols, args.json)
    return 0

