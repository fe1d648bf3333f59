"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight (+ bias), over the last dimension.

The same shape as `layer_norm.py` without the mean: one program per row in the forward,
which keeps 1/rms (float32) per row; in the backward a fixed number of programs each walk
a slab of rows, write dx, and keep running dweight/dbias sums that a `sum(0)` over a few
float32 partial rows finishes. Statistics are float32 whatever the input dtype.
"""
from __future__ import annotations

import torch

from minillm.kernels.launch import (MAX_FUSED_SIZE, CompileSpec, as_rows, contiguous, device_guard,
                                    none_as_empty, refuse_double_backward, row_grads, row_grads_like,
                                    row_launch_config, save_row_norm_inputs, tl, triton, triton_usable)


@triton.jit
def _rms_norm_fwd_kernel(
    X, Y, W, B, Rstd,
    stride_x, stride_y, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, Rstd, DX, DW_partial, DB_partial,
    stride_dy, stride_x, stride_dx, M, N, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Pointers step one row at a time; 64-bit offsets so M * N may exceed 2**31.
    start = row_start.to(tl.int64)
    x_ptr = X + start * stride_x
    dy_ptr = DY + start * stride_dy
    dx_ptr = DX + start * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = x * rstd
        wdy = w * dy
        # dx = rstd * (wdy - xhat * mean(wdy * xhat))
        c = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c) * rstd
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    if HAS_WEIGHT:
        tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * N + cols, db, mask=mask)


def _forward(x, weight, bias, eps):
    """y = rms_norm(x) for x (..., N); also returns the rows' 1/rms (M,) float32, which
    the backward needs."""
    x2 = as_rows(x)
    weight, bias = contiguous(weight), contiguous(bias)
    m, n = x2.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = row_launch_config(n)
    # Absent weight/bias: any pointer will do, the constexpr flags keep the kernel off it.
    _rms_norm_fwd_kernel[(m,)](  # rows on grid axis 0: up to 2**31 - 1
        x2, y, weight if weight is not None else x2, bias if bias is not None else x2, rstd,
        x2.stride(0), y.stride(0), n, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=warps,
    )
    return y.view(x.shape), rstd


def _backward(dy, x, weight, rstd, bias_dtype):
    """(dx (..., N), dweight, dbias) for the upstream dy (..., N). dweight is None without a
    weight, dbias None when bias_dtype is None (no bias)."""
    x2 = as_rows(x)
    m, n = x2.shape
    g = row_grads(dy, x2, weight, bias_dtype)
    _rms_norm_bwd_kernel[(g.groups,)](
        g.dy2, x2, g.weight if g.has_weight else x2, rstd, g.dx,
        g.dw_partial if g.has_weight else rstd, g.db_partial if g.has_bias else rstd,
        g.dy2.stride(0), x2.stride(0), g.dx.stride(0), m, n, g.rows_per_program,
        HAS_WEIGHT=g.has_weight, HAS_BIAS=g.has_bias, BLOCK_N=g.block, num_warps=g.warps,
    )
    dx, dw, db = g.finish(bias_dtype)
    return dx.view(x.shape), dw, db


# torch.library custom ops (see kernels/launch.py): one opaque node each for torch.compile.
@torch.library.custom_op("minillm::rms_norm", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)")
def _rms_norm_op(x, weight, bias, eps):
    with device_guard(x):
        return _forward(x, weight, bias, eps)


@torch.library.custom_op("minillm::rms_norm_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor rstd) "
                                "-> (Tensor, Tensor, Tensor)")
def _rms_norm_backward_op(dy, x, weight, bias, rstd):
    with device_guard(x):
        dx, dw, db = _backward(dy, x, weight, rstd, bias.dtype if bias is not None else None)
    return dx, none_as_empty(dw, x), none_as_empty(db, x)


@_rms_norm_op.register_fake
def _(x, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(m, dtype=torch.float32, device=x.device)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, bias, rstd):
    return row_grads_like(x, weight, bias)


def _autograd_backward(ctx, dy, *_):
    refuse_double_backward("rms_norm")
    x, weight, bias, rstd = ctx.saved_tensors
    dx, dw, db = _rms_norm_backward_op(dy, x, weight, bias, rstd)
    return dx, dw if weight is not None else None, db if bias is not None else None, None


_rms_norm_op.register_autograd(_autograd_backward, setup_context=save_row_norm_inputs)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias), in float32, cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check(x, weight, bias):
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"rms_norm: {name} must be floating point, got {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"rms_norm: {name} must have shape ({n},) to match x's last dimension, "
                             f"got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"rms_norm: {name} is on {t.device} but x is on {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension. x: (..., N); weight, bias: (N,) or None.

    Runs the Triton kernels where they can run (CUDA, or the interpreter) and the float32
    PyTorch reference otherwise.
    """
    _check(x, weight, bias)
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not triton_usable(*tensors) or x.shape[-1] > MAX_FUSED_SIZE or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, bias)
    return _rms_norm_op(x, weight, bias, float(eps))[0]


def compile_specs() -> list[CompileSpec]:
    """Forward and backward at GPT-2 (768), Llama-7B (4096) and the widest fused (MAX_FUSED_SIZE,
    Llama-70B's 8192) widths, in bf16 and fp16."""
    specs = []
    for n, dtype in ((768, "bf16"), (4096, "bf16"), (4096, "fp16"), (MAX_FUSED_SIZE, "bf16")):
        block, warps = row_launch_config(n)
        c = {"HAS_WEIGHT": True, "HAS_BIAS": False, "BLOCK_N": block}
        specs.append(CompileSpec(
            f"rms_norm_fwd[N={n},{dtype}]", _rms_norm_fwd_kernel,
            {"X": f"*{dtype}", "Y": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "Rstd": "*fp32",
             "stride_x": "i32", "stride_y": "i32", "N": "i32", "eps": "fp32"},
            c, num_warps=warps))
        specs.append(CompileSpec(
            f"rms_norm_bwd[N={n},{dtype}]", _rms_norm_bwd_kernel,
            {"DY": f"*{dtype}", "X": f"*{dtype}", "W": f"*{dtype}", "Rstd": "*fp32", "DX": f"*{dtype}",
             "DW_partial": "*fp32", "DB_partial": "*fp32", "stride_dy": "i32", "stride_x": "i32",
             "stride_dx": "i32", "M": "i32", "N": "i32", "rows_per_program": "i32"},
            c, num_warps=warps))
    return specs
