"""Rotary position embedding (RoPE) applied to q and k in one kernel launch.

The "rotate half" convention of GPT-NeoX and Hugging Face Llama: a head vector x of size D
is split into halves x1 = x[:D/2], x2 = x[D/2:], and pair i is rotated by angle theta_t,i:

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin            cos, sin: (T, D/2), float32

The backward is the rotation by the opposite angle (the transpose of a rotation), so it is
the same kernel with sin negated. One program takes one (batch, position) pair, loads that
position's cos/sin once and rotates every head of q and then every head of k (which may have
fewer heads, as in grouped-query attention). q and k may be strided views (e.g. a transposed
(B, T, H, D) projection) as long as the head dimension is contiguous; outputs are new
contiguous tensors. The math is float32 whatever the inputs' dtype.
"""
from __future__ import annotations

import torch

from minillm.kernels.launch import CompileSpec, device_guard, tl, triton, triton_usable


@triton.jit
def _rotate_heads(X, Out, stride_xh, stride_oh, n_heads, cos, sin, d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads [0, n_heads) of one (batch, position); X and Out point at head 0."""
    heads = tl.arange(0, BLOCK_H)
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + heads).to(tl.int64)  # h * stride_xh may pass 2**31 at very long T
        mask = (h < n_heads)[:, None] & d_mask[None, :]
        x_ptr = X + h[:, None] * stride_xh + d[None, :]
        o_ptr = Out + h[:, None] * stride_oh + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
        tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, QOut, KOut, Cos, Sin,
    T, H, HK,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot, stride_cos,
    HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    cos = tl.load(Cos + t * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sin = -sin
    _rotate_heads(Q + b * stride_qb + t * stride_qt, QOut + b * stride_qob + t * stride_qot,
                  stride_qh, stride_qoh, H, cos, sin, d, d_mask, HALF, BLOCK_H)
    _rotate_heads(K + b * stride_kb + t * stride_kt, KOut + b * stride_kob + t * stride_kot,
                  stride_kh, stride_koh, HK, cos, sin, d, d_mask, HALF, BLOCK_H)


def _launch_config(half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): a tile of about 1024 pairs, 8 per thread at 4 warps."""
    block_d = triton.next_power_of_2(half)
    return max(1, 1024 // block_d), block_d, 4


def _grid(b: int, t: int) -> tuple[int]:
    """One program per (batch, position), on grid axis 0 (up to 2**31 - 1)."""
    return (b * t,)


def _rotate(q, k, cos, sin, backward: bool):
    """One launch rotating q (B, H, T, D) and k (B, HK, T, D); returns new contiguous tensors.
    The kernel takes strides for every dimension of q and k but the last, and for the rows of
    the (T, D/2) tables."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    b, h, t, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_h, block_d, warps = _launch_config(d // 2)
    if b * t > 0:
        _rotary_kernel[_grid(b, t)](
            q, k, q_out, k_out, cos, sin,
            t, h, hk,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2), cos.stride(0),
            HALF=d // 2, BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
        )
    return q_out, k_out


# A torch.library custom op (see kernels/launch.py): one opaque node for torch.compile. The
# backward is the same op rotating the other way, so it is differentiable again (a rotation is
# linear): double backward works.
@torch.library.custom_op("minillm::rotary", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward) -> (Tensor, Tensor)")
def _rotary_op(q, k, cos, sin, backward):
    with device_guard(q):
        return _rotate(q, k, cos, sin, backward)


@_rotary_op.register_fake
def _(q, k, cos, sin, backward):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _autograd_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _rotary_op(dq_out, dk_out, cos, sin, not ctx.backward)
    return dq, dk, None, None, None


_rotary_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The rotation in float32 PyTorch, cast back to each input's dtype."""
    c, s = cos.float(), sin.float()

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q and k must be (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, t, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, "
                         f"length and head dim")
    if d % 2:
        raise ValueError(f"apply_rotary: the head dim must be even, got {d}")
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not x.is_floating_point():
            raise ValueError(f"apply_rotary: {name} must be floating point, got {x.dtype}")
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(x.shape) != (t, d // 2):
            raise ValueError(f"apply_rotary: {name} must be (T, D/2) = ({t}, {d // 2}), got {tuple(x.shape)} "
                             f"(slice the table for the positions in use)")
        if x.device != q.device:
            raise ValueError(f"apply_rotary: {name} is on {x.device} but q is on {q.device}")
    if k.device != q.device:
        raise ValueError(f"apply_rotary: k is on {k.device} but q is on {q.device}")


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, H, T, D) and k (B, HK, T, D) by the angles whose cos/sin are (T, D/2).

    Returns (q_rot, k_rot). One Triton launch handles both where the kernels can run (CUDA,
    or the interpreter); the float32 PyTorch reference runs otherwise. cos and sin are
    treated as constants (no gradient flows to them).
    """
    _check(q, k, cos, sin)
    if not triton_usable(q, k, cos, sin):
        return apply_rotary_reference(q, k, cos, sin)
    return _rotary_op(q, k, cos, sin, False)


def compile_specs() -> list[CompileSpec]:
    """Forward and backward at head dims 64 (GPT-2) and 128 (Llama), bf16/fp16, fp32 tables."""
    specs = []
    for d, dtype in ((64, "bf16"), (128, "bf16"), (128, "fp16")):
        block_h, block_d, warps = _launch_config(d // 2)
        sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "QOut": f"*{dtype}", "KOut": f"*{dtype}",
               "Cos": "*fp32", "Sin": "*fp32", "T": "i32", "H": "i32", "HK": "i32"}
        for s in ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt", "stride_qob",
                  "stride_qoh", "stride_qot", "stride_kob", "stride_koh", "stride_kot", "stride_cos"):
            sig[s] = "i32"
        for backward in (False, True):
            specs.append(CompileSpec(
                f"rotary_{'bwd' if backward else 'fwd'}[D={d},{dtype}]", _rotary_kernel, dict(sig),
                {"HALF": d // 2, "BACKWARD": backward, "BLOCK_H": block_h, "BLOCK_D": block_d}, num_warps=warps))
    return specs
