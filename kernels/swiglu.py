"""SwiGLU: silu(gate) * up, the gated MLP activation of Llama-style models.

    y   = g * s * u,                  s = sigmoid(g)
    dg  = dy * u * s * (1 + g (1 - s))
    du  = dy * g * s

The forward reads gate and up once and writes y; the backward reads dy, gate and up and
writes both gradients in one pass, recomputing s instead of storing it. gate and up may be
strided views (e.g. the two halves of one fused gate/up projection) as long as the last
dimension is contiguous, so no copy is made for them. Math is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.kernels.launch import CompileSpec, as_rows, device_guard, refuse_double_backward, tl, triton, triton_usable

BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, N,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def _grid(m: int, n: int) -> tuple[int, int]:
    """Rows on axis 0 (up to 2**31 - 1), column blocks on axis 1 (n / 1024, far below 65,535)."""
    return (m, triton.cdiv(n, BLOCK_SIZE))


def _forward(gate, up):
    """silu(gate) * up for gate, up (..., N), as a new contiguous tensor."""
    g2, u2 = as_rows(gate), as_rows(up)
    m, n = g2.shape
    y = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    _swiglu_fwd_kernel[_grid(m, n)](
        g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y.view(gate.shape)


def _backward(dy, gate, up):
    """(dgate, dup), each a new contiguous (..., N) tensor, for the upstream dy (..., N)."""
    g2, u2, dy2 = as_rows(gate), as_rows(up), as_rows(dy)
    m, n = g2.shape
    dg = torch.empty((m, n), dtype=g2.dtype, device=g2.device)
    du = torch.empty((m, n), dtype=u2.dtype, device=u2.device)
    _swiglu_bwd_kernel[_grid(m, n)](
        dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), n,
        BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return dg.view(gate.shape), du.view(up.shape)


# torch.library custom ops (see kernels/launch.py): one opaque node each for torch.compile.
@torch.library.custom_op("minillm::swiglu", mutates_args=(), schema="(Tensor gate, Tensor up) -> Tensor")
def _swiglu_op(gate, up):
    with device_guard(gate):
        return _forward(gate, up)


@torch.library.custom_op("minillm::swiglu_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)")
def _swiglu_backward_op(dy, gate, up):
    with device_guard(gate):
        return _backward(dy, gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, dy):
    refuse_double_backward("swiglu")
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


_swiglu_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` in float32, cast back to gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shaped gate and up (..., N): the Triton kernels where they
    can run (CUDA, or the interpreter), the float32 PyTorch reference otherwise."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}")
    if not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must be floating point, got {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")
    if not triton_usable(gate, up) or gate.numel() == 0 or gate.dim() == 0:
        return swiglu_reference(gate, up)
    return _swiglu_op(gate, up)


def compile_specs() -> list[CompileSpec]:
    """Forward and backward at the default block, in bf16, fp16 and fp32."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        c = {"BLOCK": BLOCK_SIZE}
        specs.append(CompileSpec(
            f"swiglu_fwd[{dtype}]", _swiglu_fwd_kernel,
            {"G": f"*{dtype}", "U": f"*{dtype}", "Y": f"*{dtype}", "stride_g": "i32", "stride_u": "i32",
             "stride_y": "i32", "N": "i32"}, c, num_warps=NUM_WARPS))
        specs.append(CompileSpec(
            f"swiglu_bwd[{dtype}]", _swiglu_bwd_kernel,
            {"DY": f"*{dtype}", "G": f"*{dtype}", "U": f"*{dtype}", "DG": f"*{dtype}", "DU": f"*{dtype}",
             "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32",
             "N": "i32"}, c, num_warps=NUM_WARPS))
    return specs
