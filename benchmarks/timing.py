"""What the per-op kernel benchmarks share: the command-line options, a median timer that
synchronises CUDA, and a plain-text table (optionally JSON too).

Every benchmark compares our Triton kernel with its PyTorch reference in the same run, on
the same inputs, so the ratio survives a noisy machine. Without a CUDA device the Triton
rows are not run (the interpreter is a correctness tool, far too slow to time) and the
benchmark says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from minillm.device import DTYPES
CPU_NOTICE = ("No CUDA device here: the Triton rows need a GPU, so only the PyTorch reference "
              "path(s) are timed below, on the CPU.")


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def resolve(args) -> tuple[torch.device, torch.dtype, int]:
    """(device, dtype, reps) from the common options."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    reps = args.reps or (50 if device.type == "cuda" else 5)
    return device, dtype, reps


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, waiting for the GPU around each call."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def implementations(device: torch.device, triton_fn, reference_fn) -> list[tuple[str, Callable]]:
    """[("triton", ...), ("torch", ...)] on CUDA; just the reference elsewhere."""
    impls = [("torch", reference_fn)]
    if device.type == "cuda":
        impls.insert(0, ("triton", triton_fn))
    return impls


def cpu_name() -> str:
    """The processor's model name (Linux), for the record: figures differ between CPU kinds."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(title: str, device: torch.device, dtype: torch.dtype) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{title} on {name}{threads}, {str(dtype).replace('torch.', '')}; medians")
    if device.type != "cuda":
        print(CPU_NOTICE)


def table(rows: list[dict], columns: list[str], json_path: str | None = None) -> None:
    """Print rows (dicts) as a fixed-width table; floats with 3 significant digits."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)


def forward_backward_ms(fn: Callable, inputs: list[torch.Tensor], device: torch.device, reps: int,
                        warmup: int = 3) -> tuple[float, float]:
    """(forward ms, backward ms) of fn(*inputs); the backward is timed on one retained graph."""
    fwd = median_ms(lambda: fn(*inputs), device, reps, warmup)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = median_ms(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), device, reps, warmup)
    return fwd, bwd


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """"4096x768,8192x4096" -> [(4096, 768), (8192, 4096)]."""
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
