"""One command that proves minillm on a GPU: kernel tests, attention, kernels, training.

    python -m minillm.benchmarks.gpu_check                 # about 10 minutes on one H100 (not yet measured)
    python -m minillm.benchmarks.gpu_check --quick         # a shorter sweep and 20 s training runs
    python -m minillm.benchmarks.gpu_check --out DIR --skip-tests --skip-train

It runs, in order, and writes DIR/gpu_check.json after each section (so an interrupted run
keeps what it measured), then DIR/gpu_check.png (needs matplotlib, the `[plot]` extra):

1. tests: the kernel test files (tests/test_<kernel>*.py, test_model_kernels.py, and
   test_custom_ops.py / test_kernel_fallback.py where present) under pytest in a subprocess,
   natively on the GPU (TRITON_INTERPRET unset); passed/failed counts, the log in DIR.
2. attention: our Triton flash attention against torch SDPA held to its flash and cuDNN
   backends (a backend absent from this torch or refusing the inputs gets a status), bfloat16,
   T = 512..16k with 16k tokens per batch and model width 2048 (FlashAttention's benchmark),
   head dims 64 and 128, causal and not; TFLOP/s, forward and forward + backward
   (FLOPs: 4*B*H*T*T*D forward, halved when causal; forward + backward 3.5x forward).
3. kernels: each other kernel against its PyTorch reference and torch.compile of it, at one
   large size, in GB/s (bytes: inputs read + outputs written, as each op's benchmark module
   states) and as a share of the GPU's memory bandwidth: the datasheet figure for the device's
   name where known, else a measured large device-to-device copy (both are reported).
4. train: `train.py` for 60 s without and with `--use-kernels` (the default recipe, which
   picks a GPU recipe on a GPU); tokens/s and MFU (against the bf16 matmul peak train.py
   reports) read from each run's summary.json.

Timings: benchmarks/timing.py (CUDA events, warm-up, L2 flushed before each repetition,
median with 20%/80% quantiles).

Without a CUDA GPU it says so in one line and runs the same plumbing on the CPU with tiny
shapes and a tiny budget: the kernel tests are only collected, the attention and kernel rows
are PyTorch's (Triton runs natively only on a GPU), train.py runs 3 steps. Those figures are
CPU figures and labelled so. Exit status: 0 when every section ran and no kernel test failed.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import time
import traceback

import torch

from minillm.benchmarks import flash_attention as attention_bench
from minillm.benchmarks.op_benchmark import implementations, measure
from minillm.benchmarks.timing import ROOT, device_name, format_table, gb_per_s, jsonable, time_ms

NO_GPU_LINE = ("no CUDA GPU here: running the plumbing on the CPU with tiny shapes and a tiny budget "
               "(PyTorch paths only; no figure below is a GPU figure)")

# Test files of the kernels beyond tests/test_<kernel module>*.py (taken where they exist).
EXTRA_KERNEL_TESTS = ("model_kernels", "custom_ops", "kernel_fallback")

# op benchmark module: (size on a GPU, size for the CPU plumbing run)
KERNEL_SIZES = {
    "gelu": ((8192, 16384), (256, 256)),
    "swiglu": ((8192, 11008), (256, 256)),
    "layer_norm": ((16384, 4096), (256, 256)),
    "rms_norm": ((16384, 4096), (256, 256)),
    "rotary": ((8, 32, 2048, 128), (1, 2, 64, 32)),
    "cross_entropy": ((8192, 128256), (64, 1000)),
    "fused_linear_cross_entropy": ((8192, 4096, 128256), (64, 64, 1000)),
}
CPU_COMPILED_OP = "gelu"  # compiling every op on a CPU would take minutes: one proves the path

# Datasheet memory bandwidth in GB/s, matched in order against torch.cuda.get_device_name().
DATASHEET_GBPS = [
    (r"\bH200\b", 4800),
    (r"\bH100\b.*\bPCIe\b", 2000),
    (r"\bH100\b.*\bNVL\b", 3900),
    (r"\bH100\b", 3350),            # SXM5
    (r"\bA100\b.*\b40GB\b", 1555),
    (r"\bA100\b.*\bPCIe\b", 1935),  # 80GB PCIe
    (r"\bA100\b", 2039),            # 80GB SXM4
    (r"\bL40S?\b", 864),
    (r"\bL4\b", 300),
    (r"\bA10G?\b", 600),
    (r"\bRTX 4090\b", 1008),
    (r"\bRTX 3090 Ti\b", 1008),
    (r"\bRTX 3090\b", 936),
    (r"\bRTX A6000\b", 768),
    (r"\bV100\b", 900),
    (r"\bT4\b", 320),
]


def datasheet_bandwidth_gbps(name: str) -> float | None:
    for pattern, gbps in DATASHEET_GBPS:
        if re.search(pattern, name, re.IGNORECASE):
            return float(gbps)
    return None


def measured_copy_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Bandwidth of a device-to-device copy: nbytes read and nbytes written per copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, reps, warmup=2)
    return gb_per_s(2 * nbytes, t)


def bandwidth(device: torch.device, gpu: bool) -> dict:
    measured = measured_copy_gbps(device, 2**30 if gpu else 2**26, 10 if gpu else 3)
    sheet = datasheet_bandwidth_gbps(device_name(device)) if gpu else None
    return {"datasheet_gbps": sheet, "measured_copy_gbps": measured,
            "peak_gbps": sheet or measured, "peak_source": "datasheet" if sheet else "measured copy"}


# -- 1. the kernel tests ----------------------------------------------------------------------------

def kernel_test_files() -> list[str]:
    ops = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "kernels", "*.py"))]
    ops = [op for op in ops if op not in ("__init__", "report")]
    chosen = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        name = os.path.basename(path)[len("test_"):-len(".py")]
        if name in EXTRA_KERNEL_TESTS or any(name == op or name.startswith(op + "_") for op in ops):
            chosen.append(os.path.relpath(path, ROOT))
    return chosen


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": 12, "failed": 1, ...} from pytest's closing line ("N tests collected" too)."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|tests? collected)", line)
        if found:
            for n, what in found:
                what = {"error": "errors", "test collected": "collected", "tests collected": "collected"}.get(what, what)
                counts[what] = int(n)
            break
    return counts


def run_kernel_tests(gpu: bool, out: str, timeout: float) -> dict:
    files = kernel_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    env = dict(os.environ)
    if gpu:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run natively
    else:
        cmd.append("--collect-only")  # under the interpreter they take minutes: the full suite runs them
    log_path = os.path.join(out, "kernel_tests.log")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, rc = output + f"\n(timed out after {timeout:.0f} s)", None
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(output)
    result = {"files": files, "mode": "run natively on the GPU" if gpu else "collected only (no GPU)",
              "command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
              "counts": pytest_counts(output), "log": log_path}
    result["ok"] = rc == 0
    return result


def print_tests(r: dict) -> None:
    counts = ", ".join(f"{n} {what}" for what, n in r["counts"].items()) or "no counts"
    status = "ok" if r["ok"] else ("TIMED OUT" if r["returncode"] is None else f"FAILED (exit {r['returncode']})")
    print(f"kernel tests ({r['mode']}, {len(r['files'])} files, {r['seconds']:.0f} s): {counts}: {status}; "
          f"log {r['log']}")


# -- 2. attention ---------------------------------------------------------------------------------

def run_attention(device: torch.device, gpu: bool, quick: bool) -> dict:
    if gpu:
        seq_lens = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        head_dims, dtype, reps = [64, 128], torch.bfloat16, (10 if quick else 20)
        backends = ["triton", "sdpa-flash", "sdpa-cudnn"]
    else:
        seq_lens, head_dims, dtype, reps = [64, 128], [64], torch.float32, 3
        backends = ["triton", "sdpa", "sdpa-flash", "sdpa-cudnn"]
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for t in seq_lens:
                batch, heads = (max(1, 16384 // t), 2048 // d) if gpu else (1, 2)
                for backend in backends:
                    rows.append(attention_bench.bench_one(backend, batch, heads, t, d, causal, dtype, device,
                                                          reps, warmup=3 if gpu else 1))
    return {"dtype": str(dtype).replace("torch.", ""), "reps": reps, "rows": rows,
            "flops": "forward 4*B*H*T*T*D (half when causal); forward+backward 3.5x forward"}


# -- 3. the other kernels -------------------------------------------------------------------------

def run_kernels(device: torch.device, gpu: bool, quick: bool, peak_gbps: float) -> dict:
    dtype = torch.bfloat16 if gpu else torch.float32
    reps, warmup = (10 if quick else 30, 3) if gpu else (3, 1)
    rows = []
    for op, (gpu_size, cpu_size) in KERNEL_SIZES.items():
        module = importlib.import_module(f"minillm.benchmarks.{op}")
        size = gpu_size if gpu else cpu_size
        case = module.case(size, device, dtype)
        for impl, fn in implementations(case, device, compiled=gpu or op == CPU_COMPILED_OP):
            role = ("compiled" if impl.endswith("compiled") else "reference" if impl == case.reference_name
                    else "ours")
            base = {"op": op, "impl": impl, "role": role, "size": "x".join(map(str, size))}
            try:
                measured = measure(case, fn, device, reps, warmup)
            except Exception as e:  # e.g. torch.compile without a working compiler: a status, not a crash
                rows.append({**base, "pass": "-", "status": f"error: {type(e).__name__}: {str(e).strip()[:80]}"})
                continue
            for name in case.passes:
                gbps = measured[f"{name} GB/s"]
                rows.append({**base, "pass": name, "ms": measured[f"{name} ms"], "GB/s": gbps,
                             "% of peak BW": 100 * gbps / peak_gbps, "TFLOP/s": measured.get(f"{name} TFLOP/s"),
                             "bytes": case.bytes[name], "status": "ok"})
        del case
        if gpu:
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).replace("torch.", ""), "reps": reps, "rows": rows}


# -- 4. training ----------------------------------------------------------------------------------

def run_train(gpu: bool, quick: bool, out: str) -> dict:
    script = os.path.join(ROOT, "train.py")
    if not os.path.exists(script):
        return {"skipped": f"{script} not found (train.py ships with the repository, not the package)"}
    budget = (20 if quick else 60) if gpu else 5
    runs, dtype = {}, []
    # Natively on a GPU; on a CPU --use-kernels means the PyTorch references (never the interpreter, hours slow).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for name, kernels_on in (("plain", "false"), ("kernels", "true")):
        run_out = os.path.join(out, f"train_{name}")
        cmd = [sys.executable, script, "--time-budget", str(budget), "--out", run_out, "--no-progress",
               "--sample-tokens", "0", "--use-kernels", kernels_on, *dtype]
        if not gpu:
            cmd += ["--device", "cpu", "--max-steps", "3", "--eval-iters", "2"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget * 3 + 900)
        log_path = os.path.join(out, f"train_{name}.log")
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(proc.stdout + proc.stderr)
        run = {"command": " ".join(["python", "train.py", *cmd[2:]]), "returncode": proc.returncode, "log": log_path}
        summary_path = os.path.join(run_out, "summary.json")
        if proc.returncode == 0 and os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            run.update({k: summary.get(k) for k in ("tok_per_s", "mfu", "device", "dtype", "matmul_peak_flops",
                                                    "steps", "val_loss", "train_seconds", "compile_seconds")})
            dtype = ["--dtype", summary["dtype"]]  # the second run computes in the dtype the first chose
        runs[name] = run
    return {"time_budget": budget, "runs": runs, "ok": all(r["returncode"] == 0 for r in runs.values())}


def print_train(r: dict) -> None:
    rows = []
    for name, run in r["runs"].items():
        peak = run.get("matmul_peak_flops")
        rows.append({"run": name, "device": run.get("device"), "dtype": run.get("dtype"), "steps": run.get("steps"),
                     "tok/s": run.get("tok_per_s"), "MFU %": None if run.get("mfu") is None else 100 * run["mfu"],
                     "matmul peak TFLOP/s": None if peak is None else peak / 1e12,
                     "status": "ok" if run["returncode"] == 0 else f"exit {run['returncode']}, see {run['log']}"})
    print(format_table(rows, ["run", "device", "dtype", "steps", "tok/s", "MFU %", "matmul peak TFLOP/s", "status"]))


# -- 5. the plot ----------------------------------------------------------------------------------

def plot(report: dict, path: str) -> str | None:
    """Draw the figures; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is missing (pip install -e '.[plot]')"
    fig = plt.figure(figsize=(20, 9))
    grid = fig.add_gridspec(2, 4)
    attention = [r for r in report.get("attention", {}).get("rows", []) if r["status"] == "ok"]
    panels = sorted({(r["head_dim"], r["causal"]) for r in attention})[:4]
    for i, (d, causal) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for backend in sorted({r["backend"] for r in attention}):
            pts = [r for r in attention if r["backend"] == backend and (r["head_dim"], r["causal"]) == (d, causal)]
            line, = ax.plot([r["seq_len"] for r in pts], [r["fwd_bwd_tflops"] for r in pts], marker="o",
                            label=f"{backend} fwd+bwd")
            ax.plot([r["seq_len"] for r in pts], [r["fwd_tflops"] for r in pts], marker=".", linestyle="--",
                    color=line.get_color(), label=f"{backend} fwd")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length", ylabel="TFLOP/s",
               title=f"attention, head dim {d}, {'causal' if causal else 'not causal'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)

    ax = fig.add_subplot(grid[1, :3])
    kernel_rows = [r for r in report.get("kernels", {}).get("rows", []) if r.get("status") == "ok"]
    label = lambda r: f"{r['op'].replace('fused_linear_cross_entropy', 'linear+CE')}\n{r['pass']}"
    groups = list(dict.fromkeys(label(r) for r in kernel_rows))
    roles = {"ours": "ours (Triton; chunked for linear+CE)", "reference": "PyTorch", "compiled": "torch.compile"}
    width = 0.8 / len(roles)
    for i, (role, legend) in enumerate(roles.items()):
        share = {label(r): r["% of peak BW"] for r in kernel_rows if r["role"] == role}
        xs = [g for g, name in enumerate(groups) if name in share]
        ax.bar([x + i * width for x in xs], [share[groups[x]] for x in xs], width, label=legend)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    source = report.get("bandwidth", {}).get("peak_source", "?")
    ax.set(ylabel=f"% of peak memory bandwidth ({source})", title="kernels: GB/s as a share of the memory bandwidth")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)

    ax = fig.add_subplot(grid[1, 3])
    runs = report.get("train", {}).get("runs", {})
    names = [n for n, r in runs.items() if r.get("tok_per_s")]
    bars = ax.bar(names, [runs[n]["tok_per_s"] for n in names])
    for bar, n in zip(bars, names):
        if runs[n].get("mfu") is not None:
            ax.annotate(f"MFU {100 * runs[n]['mfu']:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="tokens/s", title="train.py: without and with --use-kernels")
    where = report["device"] if report["gpu"] else f"{report['device']}: CPU plumbing run, not GPU figures"
    fig.suptitle(f"minillm gpu_check on {where}, torch {report['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- the command ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("out", "gpu_check"), help="folder for the JSON, PNG and logs")
    p.add_argument("--quick", action="store_true", help="fewer sequence lengths and repetitions, 20 s training runs")
    p.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests")
    p.add_argument("--skip-train", action="store_true", help="do not run train.py")
    p.add_argument("--tests-timeout", type=float, default=420.0, help="seconds the kernel tests may take")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        print(NO_GPU_LINE)
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "gpu_check.json"), os.path.join(args.out, "gpu_check.png")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"gpu": gpu, "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": triton_version, "quick": args.quick, "timing": (
                  "CUDA events, L2 flushed before each repetition" if gpu else "wall clock") +
              "; median with 20%/80% quantiles, in ms", "notes": []}
    print(f"gpu_check on {report['device']}, torch {report['torch']}, triton {triton_version}")

    def save():
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(jsonable(report), f, indent=1)

    ok = True

    def section(name: str, skip: bool, fn, show) -> None:
        nonlocal ok
        if skip:
            report[name] = {"skipped": f"--skip-{name}"}
        else:
            print(f"\n== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                report[name] = fn()
                report[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
                show(report[name])
                ok = ok and report[name].get("ok", True)
            except Exception as e:  # one broken section must not hide the others' results
                traceback.print_exc()
                report[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name}: failed ({type(e).__name__}: {e})")
                ok = False
        save()

    section("bandwidth", False, lambda: bandwidth(device, gpu), lambda r: print(
        f"memory bandwidth: datasheet {'%.0f GB/s' % r['datasheet_gbps'] if r['datasheet_gbps'] else 'unknown here'}, "
        f"measured copy {r['measured_copy_gbps']:.0f} GB/s; the shares below are of the {r['peak_source']} figure"))
    section("tests", args.skip_tests, lambda: run_kernel_tests(gpu, args.out, args.tests_timeout), print_tests)
    section("attention", False, lambda: run_attention(device, gpu, args.quick), lambda r: print(
        attention_bench.format_table(r["rows"])))
    peak = report["bandwidth"].get("peak_gbps") or float("nan")
    section("kernels", False, lambda: run_kernels(device, gpu, args.quick, peak), lambda r: print(format_table(
        r["rows"], ["op", "impl", "size", "pass", "ms", "GB/s", "% of peak BW", "TFLOP/s", "status"])))
    if not gpu:
        report["notes"].append(f"torch.compile rows: only {CPU_COMPILED_OP} without a GPU (compiling each op on a "
                               "CPU takes most of a minute)")
    section("train", args.skip_train, lambda: run_train(gpu, args.quick, args.out), print_train)

    note = plot(report, png_path)
    if note:
        report["notes"].append(note)
    report["ok"] = ok
    save()
    print()
    for n in report["notes"]:
        print(f"note: {n}")
    print(f"wrote {json_path}" + ("" if note else f" and {png_path}") + f"; {'all ok' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
