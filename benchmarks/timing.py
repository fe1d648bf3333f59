"""How every benchmark times a call, and what the benchmarks share: the command-line options,
the statistics (median with 20% and 80% quantiles), the device header and a plain-text table
(optionally JSON too).

On CUDA a call is timed the way `triton.testing.do_bench` does it: warm-up calls first, then
each timed call between two CUDA events, with the L2 cache flushed before it (a write into a
256 MB buffer, larger than any GPU's L2), so that a small memory-bound kernel does not read its
inputs from the cache the previous repetition left warm. The events are read after one final
synchronisation, so the host never stalls the GPU between repetitions. On the CPU a call is
timed by the wall clock (`time.perf_counter`), with the same statistics.

Every benchmark compares our Triton kernel with its PyTorch reference in the same run, on
the same inputs, so the ratio survives a noisy machine. Without a CUDA device the Triton
rows are not run (the interpreter is a correctness tool, far too slow to time) and the
benchmark says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from minillm.device import DTYPES

CPU_NOTICE = ("No CUDA device here: the Triton rows need a GPU, so only the PyTorch reference "
              "path(s) are timed below, on the CPU.")

# Larger than the L2 cache of any GPU we know (A100: 40 MB, H100: 50 MB, H200: 60 MB); the
# size triton.testing.do_bench flushes with.
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Stats:
    """The median and the 20%/80% quantiles of n measurements (milliseconds, for a timing)."""
    median: float
    p20: float
    p80: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.3g} ({self.p20:.3g}-{self.p80:.3g})"


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between the two nearest ranks,
    as numpy.quantile and torch.quantile compute it by default."""
    if not values:
        raise ValueError("quantile of no values")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> Stats:
    return Stats(quantile(values, 0.5), quantile(values, 0.2), quantile(values, 0.8), len(values))


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """One 256 MB buffer per GPU, allocated once: zeroing it evicts everything from L2."""
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _flush_buffers[device]


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> Stats:
    """Time fn() reps times after warmup untimed calls; the statistics are in milliseconds.

    CUDA: events around each call, L2 flushed before each. CPU: wall clock around each call."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)

    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    with torch.cuda.device(device):
        flush = _l2_flush_buffer(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_forward_backward(fn: Callable, inputs: list, device: torch.device, reps: int,
                          warmup: int = 3) -> tuple[Stats, Stats]:
    """(forward, backward) timings of fn(*inputs); the backward is timed on one retained graph,
    against random output gradients."""
    fwd = time_ms(lambda: fn(*inputs), device, reps, warmup)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = time_ms(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), device, reps, warmup)
    return fwd, bwd


def gb_per_s(nbytes: float, t: Stats) -> float:
    """Bytes moved in the median time, in GB/s (1 GB = 1e9 bytes)."""
    return nbytes / (t.median * 1e-3) / 1e9


def tflop_per_s(flops: float, t: Stats) -> float:
    """FLOPs done in the median time, in TFLOP/s."""
    return flops / (t.median * 1e-3) / 1e12


# -- the command line and the printout -----------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (median and 20/80%% quantiles reported; default 50 CUDA, 5 CPU)")
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


# The repository's root: this file's folder resolved through the minillm/benchmarks link, then
# one up. The whole-run benchmarks run its scripts (train.py, finetune.py) and read the data
# beside it (../shared/data), so they need a checkout, not only the installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def run_step(name: str, cmd: list[str], out: str, reuse: bool) -> str:
    """Run one command of a whole-run benchmark's recipe (a script and its flags, from the
    repository root), or keep its earlier output in `out` (a summary.json there) with --reuse."""
    if reuse and os.path.exists(os.path.join(out, "summary.json")):
        print(f"== {name}: kept {out} (--reuse)")
        return out
    print(f"== {name}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit code {proc.returncode}")
    print(f"== {name}: {time.time() - t0:.0f} s wall", flush=True)
    return out


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"


def header(title: str, device: torch.device, dtype: torch.dtype) -> None:
    how = "CUDA events, L2 flushed" if device.type == "cuda" else "wall clock"
    print(f"{title} on {device_name(device)}, {str(dtype).replace('torch.', '')}; "
          f"median (20%-80%) in ms, {how}")
    if device.type != "cuda":
        print(CPU_NOTICE)


def jsonable(value):
    """Rows as JSON: a Stats becomes {"median": ..., "p20": ..., "p80": ..., "n": ...}."""
    if isinstance(value, Stats):
        return asdict(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows (dicts) as a fixed-width table: floats with 3 significant digits (whole numbers from
    1,000 up), a Stats as "median (p20-p80)", a missing value as "-"; text columns to the left."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    text = [all(isinstance(r.get(c), str) for r in rows) for c in columns]
    align = lambda v, w, left: v.ljust(w) if left else v.rjust(w)
    lines = ["  ".join(align(c, w, t) for c, w, t in zip(columns, widths, text)).rstrip()]
    lines += ["  ".join(align(v, w, t) for v, w, t in zip(row, widths, text)).rstrip() for row in cells]
    return "\n".join(lines)


def table(rows: list[dict], columns: list[str], json_path: str | None = None) -> None:
    print(format_table(rows, columns))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(jsonable(rows), f, indent=2)


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    """"4096x768,8192x4096" -> [(4096, 768), (8192, 4096)]."""
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
