"""Compile report: every Triton kernel at its default launch configuration, built for sm_80
(A100) and sm_90 (H100) without a GPU, and what the machine code says about it.

    python -m minillm.kernels.report                 # table on stdout
    python -m minillm.kernels.report --json r.json   # rows as JSON too
    python -m minillm.kernels.report --arch 90 --only flash_attention

Each module of kernels/ (`minillm.kernels`) that defines `compile_specs()` is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the cubin is then read
with the `cuobjdump` and `nvdisasm` that ship inside the Triton wheel:

- registers per thread, and spills: LOCAL + STACK bytes per thread (ptxas puts spilled
  registers in the stack frame, so LOCAL alone reads 0 for a spilling kernel) and the number
  of STL/LDL (local store/load) instructions in the SASS,
- shared memory per block: static (from the cubin) plus the dynamic amount Triton launches
  the kernel with (`metadata.shared`), against the target's per-block limit,
- tensor-core instructions in the SASS: HMMA on sm_80, HGMMA (wgmma) on sm_90. Kernels whose
  source calls `tl.dot(` (directly or through a @triton.jit helper) are expected to use them.

A `compile_specs` that accepts an `arch` argument is asked once per target, so a module can
give each target its own default configuration; one without it is compiled for every target
at or above each spec's `min_arch`.

As the JIT does for PyTorch tensors, pointer arguments and integer arguments named `stride*`
are assumed divisible by 16 (PyTorch allocations are aligned; the reported configurations
use head dims and widths that are multiples of 16).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import minillm.kernels
from minillm.kernels import launch
from minillm.kernels.launch import CompileSpec

TARGETS = (80, 90)
# Largest shared memory one block may use (opt-in), per target, in bytes.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# The SASS mnemonic of a tensor-core matrix multiply on each target.
TENSOR_CORE_OP = {80: "HMMA", 90: "HGMMA"}


@dataclass
class ReportRow:
    module: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # LOCAL + STACK bytes per thread: where ptxas puts spilled registers
    spill_ops: int  # STL/LDL instructions in the SASS
    shared_static: int
    shared_dynamic: int
    shared_bytes: int  # static + dynamic: what one block occupies
    shared_limit: int
    uses_dot: bool  # the kernel's source calls tl.dot, so tensor cores are expected
    tensor_core_op: str  # the instruction expected: HMMA (sm_80), HGMMA (sm_90), or the spec's own
    tensor_core_ops: int  # that instruction's count in the SASS
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_bytes == 0 and self.spill_ops == 0
                and self.shared_bytes <= self.shared_limit
                and (self.tensor_core_ops > 0 or not self.uses_dot))


# ----------------------------------------------------------------------------------------------
# Finding the kernels
# ----------------------------------------------------------------------------------------------


def kernel_modules() -> list[str]:
    """Names of the modules in `minillm.kernels` (this folder) that define `compile_specs`."""
    names = []
    for info in pkgutil.iter_modules(minillm.kernels.__path__):
        if info.name == "report" or info.ispkg:
            continue
        module = importlib.import_module(f"minillm.kernels.{info.name}")
        if callable(getattr(module, "compile_specs", None)):
            names.append(module.__name__)
    return sorted(names)


def specs_for(module_name: str, arch: int) -> list[CompileSpec]:
    compile_specs = importlib.import_module(module_name).compile_specs
    if "arch" in inspect.signature(compile_specs).parameters:
        specs = compile_specs(arch=arch)
    else:
        specs = compile_specs()
    return [s for s in specs if arch >= s.min_arch]


def _python_fn(fn):
    return getattr(fn, "fn", fn)


def uses_dot(fn, _seen=None) -> bool:
    """True if the kernel's source, or that of a @triton.jit helper it calls, has `tl.dot(`."""
    seen = _seen if _seen is not None else set()
    py = _python_fn(fn)
    if id(py) in seen:
        return False
    seen.add(id(py))
    try:
        src = inspect.getsource(py)
    except (OSError, TypeError):
        return False
    if "tl.dot(" in src:
        return True
    for name, value in getattr(py, "__globals__", {}).items():
        if hasattr(value, "fn") and callable(value.fn) and re.search(rf"\b{re.escape(name)}\(", src):
            if uses_dot(value, seen):
                return True
    return False


# ----------------------------------------------------------------------------------------------
# Compiling and reading the machine code
# ----------------------------------------------------------------------------------------------


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _attrs(spec: CompileSpec, arg_names: list[str]) -> dict:
    attrs = {}
    for name, ty in spec.signature.items():
        if ty.startswith("*") or (name.startswith("stride") and ty in ("i32", "i64")):
            attrs[(arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_one(spec: CompileSpec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = list(spec.fn.arg_names)
    src = ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs), _attrs(spec, arg_names))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _resource_usage(cubin_path: str) -> dict[str, int]:
    out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "LOCAL", "SHARED", "STACK"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def _sass(cubin_path: str) -> str:
    return subprocess.run([_nvidia_bin("nvdisasm"), "-c", cubin_path],
                          capture_output=True, text=True, check=True).stdout


def analyse(module_name: str, spec: CompileSpec, arch: int) -> ReportRow:
    row = dict(module=module_name.split(".")[-1], kernel=spec.name, arch=arch,
               num_warps=spec.num_warps, num_stages=spec.num_stages,
               shared_limit=SHARED_LIMIT[arch], uses_dot=uses_dot(spec.fn),
               tensor_core_op=spec.tensor_core_op or TENSOR_CORE_OP[arch])
    try:
        compiled = compile_one(spec, arch)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = _resource_usage(path)
            spill_bytes = usage["LOCAL"] + usage["STACK"]
            # Disassembly is the slow step (about a second a kernel); it is only needed to look
            # for tensor-core instructions, or for STL/LDL when there is local memory at all.
            sass = _sass(path) if row["uses_dot"] or spill_bytes else ""
    except Exception as e:  # a kernel that does not compile is a finding, not a crash
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return ReportRow(**row, registers=-1, spill_bytes=-1, spill_ops=-1, shared_static=-1,
                         shared_dynamic=-1, shared_bytes=-1, tensor_core_ops=0,
                         error=f"{type(e).__name__}: {first_line}")
    mma = len(re.findall(rf"\b{row['tensor_core_op']}\.", sass))
    dynamic = int(compiled.metadata.shared)
    spill_ops = len(re.findall(r"\b(?:STL|LDL)(?:\.|\s)", sass))
    return ReportRow(**row, registers=usage["REG"], spill_bytes=spill_bytes,
                     spill_ops=spill_ops,
                     shared_static=usage["SHARED"], shared_dynamic=dynamic,
                     shared_bytes=usage["SHARED"] + dynamic, tensor_core_ops=mma)


_CACHE: dict[tuple, list[ReportRow]] = {}


def _analyse_job(module_name: str, index: int, arch: int) -> ReportRow:
    return analyse(module_name, specs_for(module_name, arch)[index], arch)


def _report_in_subprocess(archs, only) -> list[ReportRow]:
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled, so
    the report runs in a fresh interpreter with the real JIT."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "minillm.kernels.report", "--quiet", "--json", path,
               "--arch", *map(str, archs)]
        if only:
            cmd += ["--only", *only]
        subprocess.run(cmd, env=env, check=True)
        with open(path) as f:
            return [ReportRow(**r) for r in json.load(f)]


def build_report(archs=TARGETS, only=None, jobs: int | None = None) -> list[ReportRow]:
    """Compile every kernel spec for each target and return one row per (spec, target).

    `only`: module names (e.g. ["flash_attention"]) to restrict to. Results are cached per
    process. Compilations run in parallel worker processes (`jobs`, default one per core).
    """
    archs = tuple(archs)
    only = tuple(only) if only else ()
    key = (archs, only)
    if key in _CACHE:
        return _CACHE[key]
    if not launch.HAS_TRITON:
        raise RuntimeError("the compile report needs Triton installed (Linux)")
    if launch.INTERPRET:
        rows = _report_in_subprocess(archs, only)
    else:
        jobs_list = [(module_name, i, arch)
                     for module_name in kernel_modules()
                     if not only or module_name.split(".")[-1] in only
                     for arch in archs
                     for i in range(len(specs_for(module_name, arch)))]
        workers = jobs or min(8, os.cpu_count() or 1)
        if workers == 1 or len(jobs_list) <= 1:
            rows = [_analyse_job(*j) for j in jobs_list]
        else:
            # Processes, not threads: most of a compile holds the GIL.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                rows = list(pool.map(_analyse_job, *zip(*jobs_list)))
    _CACHE[key] = rows
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def format_table(rows: list[ReportRow]) -> str:
    header = ["kernel", "sm", "warps", "stages", "regs", "spill B", "STL/LDL", "smem B", "smem limit",
              "tensor cores", "ok"]
    lines = []
    for r in rows:
        if r.error:
            tc = "-"
        elif r.tensor_core_ops:
            tc = f"{r.tensor_core_op} x{r.tensor_core_ops}"
        else:
            tc = "none (no tl.dot)" if not r.uses_dot else "NONE"
        lines.append([r.kernel, f"{r.arch}", f"{r.num_warps}", f"{r.num_stages}", f"{r.registers}",
                      f"{r.spill_bytes}", f"{r.spill_ops}", f"{r.shared_bytes:,}", f"{r.shared_limit:,}", tc,
                      "yes" if r.ok else f"NO {r.error}".strip()])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=TARGETS,
                        help="targets to compile for (default: 80 90)")
    parser.add_argument("--only", nargs="+", metavar="MODULE",
                        help="restrict to these kernel modules, e.g. flash_attention")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = parser.parse_args(argv)
    try:
        rows = build_report(args.arch, args.only, args.jobs)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if not args.quiet:
        print(format_table(rows))
        bad = [r for r in rows if not r.ok]
        print(f"\n{len(rows)} kernel builds, {len(bad)} with spills, shared memory over the "
              f"limit, missing tensor-core instructions or errors.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
