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

from kernels import CompileSpec, tl, triton, triton_usable

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


def _forward(x):
    """gelu(x) for x of any shape, and x as the flat contiguous buffer the kernels read (the
    backward needs it)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _gelu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, y, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y, x


def _backward(dy, x):
    """dx = dy * gelu'(x) for the upstream dy (any layout); x as `_forward` returned it."""
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    _gelu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dy, x, dx, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return dx


class _GeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, x = _forward(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _backward(dy, x)


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
    return _GeluFunction.apply(x)


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
