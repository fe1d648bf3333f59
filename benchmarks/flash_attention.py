"""Attention speed: naive vs PyTorch SDPA vs our Triton flash attention.

    python -m minillm.benchmarks.flash_attention                               # the full sweep
    python -m minillm.benchmarks.flash_attention --seq-lens 1024 4096 --head-dims 128 --causal true
    python -m minillm.benchmarks.flash_attention --json attn.json --plot attn.png

For each backend, sequence length, head dim and causal flag it times the forward pass and the
forward + backward pass (median and 20%/80% quantiles over --reps runs; on CUDA between CUDA
events with the L2 cache flushed before each, see benchmarks/timing.py) and converts the
median to TFLOP/s:

    forward FLOPs = 4 * B * H * T * T * D (halved when causal: half the scores are masked)
    forward + backward = 3.5 x forward (the backward pass does 2.5x the forward's matmul work)

On CUDA the defaults follow FlashAttention's benchmark: bfloat16, 16k tokens per batch
(batch = 16384 / T) and 2048 model width (heads = 2048 / D). Without CUDA only the CPU backends
run (float32, batch 1, 4 heads, sequence lengths up to 2048 unless asked), and the Triton rows
are reported as needing a GPU: the interpreter's timings would mean nothing.

Backends: `naive` = minillm's step-by-step attention (matmul, softmax, matmul, the full score
matrix in memory); `sdpa` = torch.nn.functional.scaled_dot_product_attention with PyTorch's own
dispatch (FlashAttention-2 for bf16 on recent GPUs); `sdpa-flash`, `sdpa-cudnn` = the same
call held to one of PyTorch's backends (`torch.nn.attention.sdpa_kernel`; a backend that is
absent or refuses the inputs gets a status, not a figure); `triton` = minillm.kernels.flash_attention.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import torch
import torch.nn.functional as F

from minillm.benchmarks.op_benchmark import triton_timeable
from minillm.benchmarks.timing import Stats, device_name, time_ms

BACKENDS = ("naive", "sdpa", "sdpa-flash", "sdpa-cudnn", "triton")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SEQ_LENS = [2 ** i for i in range(7, 15)]  # 128 .. 16384
CPU_SEQ_LENS = [2 ** i for i in range(7, 12)]  # 128 .. 2048


def _naive_local(q, k, v, is_causal):
    """Plain matmul-softmax-matmul, used if minillm.attention is not importable."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_fn(backend: str):
    """(q, k, v, causal) -> out for one backend."""
    if backend == "naive":
        try:
            from minillm.attention import scaled_dot_product_attention
        except ImportError:
            return _naive_local
        return lambda q, k, v, causal: scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "sdpa":
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend in SDPA_BACKENDS:
        return sdpa_held_to(SDPA_BACKENDS[backend])
    if backend == "triton":
        from minillm.kernels.flash_attention import flash_attention

        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def sdpa_held_to(name: str):
    """SDPA allowed only one of PyTorch's backends; raises where this torch lacks it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not hasattr(SDPBackend, name):
        raise ValueError(f"this torch ({torch.__version__}) has no SDPBackend.{name}")
    backend = getattr(SDPBackend, name)

    def attend(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def attention_flops(batch, heads, seq_len, head_dim, causal) -> float:
    """Forward FLOPs: two (T x T x D) matmuls per head, 2 FLOPs a multiply-add; half when causal."""
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    return flops / 2 if causal else flops


FWD_BWD_FACTOR = 3.5  # forward + backward = 1 + 2.5 forwards of matmul work


def _put(row: dict, key: str, t: Stats) -> None:
    row[key], row[key + "_p20"], row[key + "_p80"] = t.median, t.p20, t.p80


def bench_one(backend, batch, heads, seq_len, head_dim, causal, dtype, device, reps, warmup):
    """Times one configuration; returns a result row (status 'ok', 'OOM' or 'n/a: why')."""
    row = dict(backend=backend, seq_len=seq_len, head_dim=head_dim, causal=causal,
               dtype=str(dtype).replace("torch.", ""), batch=batch, heads=heads,
               fwd_ms=None, fwd_tflops=None, fwd_bwd_ms=None, fwd_bwd_tflops=None, status="ok")
    if backend == "sdpa-cudnn" and device.type != "cuda":
        row["status"] = "n/a: cuDNN attention needs a CUDA GPU"
        return row
    if backend == "triton" and not triton_timeable(device):  # else it would time the reference fallback
        row["status"] = "n/a: Triton runs natively only on a CUDA GPU"
        return row
    # An SDPA backend that refuses the inputs says why in warnings, then raises "no viable backend".
    with warnings.catch_warnings(record=True) as refusals:
        try:
            _time_attention(row, attention_fn(backend), dtype, device, reps, warmup)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except (RuntimeError, ValueError) as e:
            reason = next((str(w.message) for w in refusals), str(e)).strip()
            row["status"] = f"n/a: {reason.splitlines()[0][:70]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def _time_attention(row, fn, dtype, device, reps, warmup) -> None:
    """Fills row's timings and TFLOP/s for fn at row's shape."""
    batch, heads, seq_len, head_dim, causal = (row[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal"))
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            fn(q, k, v, causal)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, causal).backward(do)

    flops = attention_flops(batch, heads, seq_len, head_dim, causal)
    _put(row, "fwd_ms", time_ms(forward, device, reps, warmup))
    row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
    _put(row, "fwd_bwd_ms", time_ms(forward_backward, device, reps, warmup))
    row["fwd_bwd_tflops"] = FWD_BWD_FACTOR * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12


def format_table(rows) -> str:
    """The rows as a table; times are "median (20%-80%)" in ms."""
    header = ["backend", "T", "D", "causal", "B", "H", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
              "fwd+bwd TFLOP/s", "status"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    def ms(r, key):
        return "-" if r[key] is None else f"{r[key]:.3f} ({r[key + '_p20']:.3f}-{r[key + '_p80']:.3f})"

    lines = [[r["backend"], str(r["seq_len"]), str(r["head_dim"]), "yes" if r["causal"] else "no",
              str(r["batch"]), str(r["heads"]), ms(r, "fwd_ms"), num(r["fwd_tflops"], ".4g"),
              ms(r, "fwd_bwd_ms"), num(r["fwd_bwd_tflops"], ".4g"), r["status"]]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 10) else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def plot(rows, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install matplotlib)")
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        for backend in BACKENDS:
            pts = [r for r in rows if r["backend"] == backend and r["head_dim"] == d
                   and r["causal"] == causal and r["status"] == "ok"]
            if not pts:
                continue
            xs = [r["seq_len"] for r in pts]
            line, = ax.plot(xs, [r["fwd_bwd_tflops"] for r in pts], marker="o", label=f"{backend} fwd+bwd")
            ax.plot(xs, [r["fwd_tflops"] for r in pts], marker=".", linestyle="--",
                    color=line.get_color(), label=f"{backend} fwd")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"head dim {d}, {'causal' if causal else 'not causal'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.benchmarks.flash_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        help="sequence lengths (default 128..16384 on CUDA, 128..2048 on CPU)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batch", type=int, help="default 16384 // T on CUDA, 1 on CPU")
    parser.add_argument("--heads", type=int, help="default 2048 // D on CUDA, 4 on CPU")
    parser.add_argument("--reps", type=int,
                        help="timed runs per figure (median, 20%%/80%% quantiles; default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default cuda when available")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw TFLOP/s against sequence length")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    seq_lens = args.seq_lens or (GPU_SEQ_LENS if on_gpu else CPU_SEQ_LENS)
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    reps = args.reps or (20 if on_gpu else 5)
    for name, values in (("--seq-lens", seq_lens), ("--head-dims", args.head_dims)):
        if any(x <= 0 for x in values):
            parser.error(f"{name} must be positive")

    backends = list(args.backends)
    notes = []
    if "triton" in backends:
        from minillm.kernels import launch

        if not on_gpu or not launch.HAS_TRITON:
            backends.remove("triton")
            notes.append("triton: not run. The Triton rows need a CUDA GPU (and Triton); this "
                         "machine has none, so no Triton figures are reported.")
        elif launch.INTERPRET:
            backends.remove("triton")
            notes.append("triton: not run under TRITON_INTERPRET=1 (interpreter timings mean nothing).")

    name = device_name(device)
    how = "CUDA events, L2 flushed" if on_gpu else "wall clock"
    print(f"# attention benchmark on {name}, {str(dtype).replace('torch.', '')}, "
          f"median (20%-80%) of {reps} runs ({how}), torch {torch.__version__}")
    for note in notes:
        print(f"# {note}")

    rows = []
    for d in args.head_dims:
        for causal in causals:
            for t in seq_lens:
                batch = args.batch or (max(1, 16384 // t) if on_gpu else 1)
                heads = args.heads or (max(1, 2048 // d) if on_gpu else 4)
                for backend in backends:
                    rows.append(bench_one(backend, batch, heads, t, d, causal, dtype, device,
                                          reps, args.warmup))
                    r = rows[-1]
                    print(f"  {backend:6s} T={t:<6d} D={d:<4d} causal={causal!s:5s} "
                          f"fwd+bwd {r['fwd_bwd_tflops'] or 0:.4g} TFLOP/s {r['status']}",
                          file=sys.stderr, flush=True)
    print(format_table(rows))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": str(dtype).replace("torch.", ""),
                       "torch": torch.__version__, "reps": reps, "notes": notes, "rows": rows},
                      f, indent=1)
    if args.plot:
        plot(rows, args.plot, f"attention, {name}, {str(dtype).replace('torch.', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
