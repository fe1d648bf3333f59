"""GELU with the tanh approximation, forward and backward as one elementwise kernel each.

    gelu(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)

Since 0.5 (1 + tanh(u)) = sigmoid(2u), the kernels use the sigmoid form: one exp, and no
overflow for large |x| (sigmoid saturates to 0 or 1). The derivative is

    gelu'(x) = s + x s (1 - s) 2 u'(x),   s = sigmoid(2u),   u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

The backward recomputes s from x (saved by the forward) instead of storing it: an
elementwise kernel is bound by memory traffic, and recomputing costs none. Math is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.kernels.launch import CompileSpec, device_guard, refuse_double_backward, tl, triton, triton_usable

BLOCK_SIZE = 1024
NUM_WARPS = 4


# In the kernels: 0.7978845608028654 = sqrt(2 / pi), 0.044715 the tanh approximation's cubic term.
@triton.jit
def _gelu_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
    tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    s = tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x2 * x))
    du = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    dx = dy * (s + x * s * (1.0 - s) * du)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK_SIZE),)


def _forward(x):
    """gelu(x) for x of any shape, as a new contiguous tensor."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _gelu_fwd_kernel[_grid(n)](x, y, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y


def _backward(dy, x):
    """dx = dy * gelu'(x) for the upstream dy and the forward's input x (any layouts)."""
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    _gelu_bwd_kernel[_grid(n)](dy, x, dx, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return dx


# The op as torch.library custom ops: torch.compile sees one opaque node with a known output
# shape (the fake implementation) and the autograd formula below, so it traces through.
@torch.library.custom_op("minillm::gelu_tanh", mutates_args=(), schema="(Tensor x) -> Tensor")
def _gelu_op(x):
    with device_guard(x):
        return _forward(x)


@torch.library.custom_op("minillm::gelu_tanh_backward", mutates_args=(), schema="(Tensor dy, Tensor x) -> Tensor")
def _gelu_backward_op(dy, x):
    with device_guard(x):
        return _backward(dy, x)


@_gelu_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_gelu_backward_op.register_fake
def _(dy, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _autograd_backward(ctx, dy):
    refuse_double_backward("gelu_tanh")
    (x,) = ctx.saved_tensors
    return _gelu_backward_op(dy, x)


_gelu_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` in float32, cast back to x's dtype."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) of any-shaped x: the Triton kernels where they can run
    (CUDA, or the interpreter), the float32 PyTorch reference otherwise."""
    if not x.is_floating_point():
        raise ValueError(f"gelu_tanh: x must be floating point, got {x.dtype}")
    if not triton_usable(x) or x.numel() == 0:
        return gelu_tanh_reference(x)
    return _gelu_op(x)


def compile_specs() -> list[CompileSpec]:
    """Forward and backward at the default block, in bf16, fp16 and fp32."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        c = {"BLOCK": BLOCK_SIZE}
        specs.append(CompileSpec(f"gelu_fwd[{dtype}]", _gelu_fwd_kernel,
                                 {"X": f"*{dtype}", "Y": f"*{dtype}", "n": "i32"}, c, num_warps=NUM_WARPS))
        specs.append(CompileSpec(f"gelu_bwd[{dtype}]", _gelu_bwd_kernel,
                                 {"DY": f"*{dtype}", "X": f"*{dtype}", "DX": f"*{dtype}", "n": "i32"}, c,
                                 num_warps=NUM_WARPS))
    return specs
