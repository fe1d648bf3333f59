"""What every Triton op in this folder shares: whether Triton runs here, and how ops launch.

This folder is imported as `minillm.kernels` (minillm/kernels is a link to it), never as a
top-level `kernels`: that name belongs to Hugging Face's package, which `transformers` imports.
It has no `__init__.py`, so from the repository's root a bare `import kernels` still finds
Hugging Face's package rather than this folder.

Every module in this folder imports on any machine: where Triton is missing
(macOS, Windows, a CPU-only container) the `@triton.jit` functions are defined
but never launched, and each op's plain-PyTorch reference is used instead.

Kernels are checked without a GPU in two ways (see README): numerically under
``TRITON_INTERPRET=1`` and by compiling them for sm_80/sm_90 (``python -m minillm.kernels.report``).
Each kernel module exposes ``compile_specs()``, a list of :class:`CompileSpec`
describing its kernels at their default launch configuration, which the report compiles.

Every op file has one layout: the ``@triton.jit`` kernels, module-level launchers
(``_forward``/``_backward``: allocate outputs, pick the launch configuration, launch), the
custom ops that call them (below), the plain-PyTorch reference, the input checks, the public op
(which falls back to the reference where Triton cannot run) and ``compile_specs``. What several
ops share (row launches, the row view, the device guard) lives here.

Each op is registered with ``torch.library.custom_op`` (namespace ``minillm``), with a fake
(shape-only) implementation and its autograd formula, so ``torch.compile`` traces a model that
uses the kernels as one graph instead of breaking at every layer; `minillm::<op>` appears in
its graph as one opaque node.

Launch configurations: one reasoned default per kernel (and width or dtype where it matters),
checked by the compile report. No kernel here is autotuned: the elementwise and row kernels
are bound by memory traffic, where the configuration that keeps enough loads in flight without
spilling (what the report checks) is the one to have; `@triton.autotune` needs a GPU to
measure, and the interpreter can only run one configuration.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

try:  # Triton ships for Linux only; everything here must still import elsewhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without Triton
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for the `triton` module so kernel files still import."""

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << (max(int(n), 1) - 1).bit_length()

    triton = _NoTriton()

    class _NoTL:
        constexpr = Any

    tl = _NoTL()

# The interpreter runs kernels on the CPU through numpy; tests use it when no GPU is present.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# MINILLM_FORCE_FALLBACK=1 makes every op take its PyTorch reference, as on a machine where
# Triton cannot run: tests/test_kernel_fallback.py runs the kernel tests so, to prove that they
# notice a silent fallback.
FORCE_FALLBACK = os.environ.get("MINILLM_FORCE_FALLBACK", "0") == "1"


def triton_usable(*tensors) -> bool:
    """True when the Triton kernels can run on these tensors (CUDA, or the interpreter)."""
    if not HAS_TRITON or FORCE_FALLBACK:
        return False
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)


def device_guard(t: torch.Tensor):
    """The context to launch a kernel on t in: Triton launches on the *current* CUDA device, so a
    tensor on cuda:1 would hand GPU 1 pointers to a kernel running on GPU 0. A no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def refuse_double_backward(op: str):
    """Raise when autograd runs a backward with create_graph=True (grad mode is on only then):
    the kernels' backward is not differentiable, and without this the second-order gradient
    would silently be missing or wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported by the Triton "
                           f"kernel; use the PyTorch reference for higher-order gradients")


def none_as_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return t if t is not None else like.new_empty(0)


# The largest grid CUDA launches: 2**31 - 1 programs on axis 0, 65,535 on axes 1 and 2. Every
# launcher here puts its large count (rows, elements) on axis 0.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# Row kernels (one program per row, as the norms) hold a whole row in registers, and their
# backward keeps five row vectors live: up to 8,192 columns (16 values a thread at 16 warps)
# that fits without spilling on sm_80/sm_90 (the compile report checks this width); at 16,384
# it spills. Wider rows use the op's PyTorch reference.
MAX_FUSED_SIZE = 8192


def row_launch_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one program per row of n elements: about 8 elements per
    thread, so the norms' backward keeps its five live row vectors in registers (no spills up
    to N = 4096, checked by the compile report)."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 4), 16)


def num_partials(device: torch.device, m: int) -> int:
    """How many programs share a reduction over m rows (the norms' dweight/dbias): two per SM
    on a GPU, enough to fill it while the final sum over the partial rows stays small."""
    if device.type == "cuda":
        return max(1, min(m, torch.cuda.get_device_properties(device).multi_processor_count * 2))
    return max(1, min(m, 4))


@dataclass
class RowGrads:
    """What a row-norm backward (LayerNorm, RMSNorm) launches with: the upstream gradient as rows,
    the weight laid out contiguously, dx, and per-program partial sums of dweight/dbias (None
    where the norm has no such parameter), each program taking rows_per_program rows."""
    dy2: torch.Tensor
    weight: torch.Tensor | None
    dx: torch.Tensor
    dw_partial: torch.Tensor | None
    db_partial: torch.Tensor | None
    groups: int
    rows_per_program: int
    block: int
    warps: int

    @property
    def has_weight(self) -> bool:
        return self.dw_partial is not None

    @property
    def has_bias(self) -> bool:
        return self.db_partial is not None

    def finish(self, bias_dtype) -> tuple:
        """(dx, dweight, dbias) once the kernel ran: the partial sums reduced."""
        dw = self.dw_partial.sum(0).to(self.weight.dtype) if self.has_weight else None
        db = self.db_partial.sum(0).to(bias_dtype) if self.has_bias else None
        return self.dx, dw, db


def row_grads(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None, bias_dtype) -> RowGrads:
    """The buffers and launch configuration of a row-norm backward for upstream dy (..., N) over the
    saved input rows x2 (M, N); bias_dtype is None when the norm has no bias."""
    m, n = x2.shape
    rows_per_program = -(-m // num_partials(x2.device, m))
    groups = -(-m // rows_per_program)

    def partial(wanted):
        return torch.empty((groups, n), dtype=torch.float32, device=x2.device) if wanted else None

    dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    return RowGrads(as_rows(dy), contiguous(weight), dx, partial(weight is not None), partial(bias_dtype is not None),
                    groups, rows_per_program, *row_launch_config(n))


def row_grads_like(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """Empty (dx, dweight, dbias) shaped as a row norm's backward op returns them, for its fake
    (shape-only) implementation; an absent weight or bias has an empty gradient."""
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if weight is not None else x.new_empty(0)
    db = torch.empty(bias.shape, dtype=bias.dtype, device=x.device) if bias is not None else x.new_empty(0)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dw, db


def save_row_norm_inputs(ctx, inputs, output) -> None:
    """A row norm's autograd context: x, weight and bias, and the per-row statistics its op
    returns after y (mean and rstd, or rstd), which take no gradient."""
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t laid out contiguously (no copy when it already is); None for an absent weight or bias."""
    return t.contiguous() if t is not None else None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as (M, N) rows with a contiguous last dimension: a view where possible (the
    kernels take a row stride), a copy otherwise."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@dataclass
class CompileSpec:
    """One kernel at one launch configuration, for the ahead-of-time compile report.

    `signature` maps every non-constexpr argument name to a Triton type string
    ("*fp16", "*fp32", "i32", "fp32", ...); `constexprs` maps constexpr argument
    names to values. `min_arch` skips targets the kernel is not meant for. `tensor_core_op`
    names the tensor-core instruction the report expects when it is not the target's usual one
    (sm_90's wgmma, HGMMA, needs tiles of at least 64 rows: a 16-row decode tile uses HMMA).
    """

    name: str
    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    min_arch: int = 80
    tensor_core_op: Optional[str] = None
