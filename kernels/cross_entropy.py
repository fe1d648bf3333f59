"""Softmax cross-entropy over a large vocabulary, with its gradient computed in the forward.

For logits x (N, V) and integer targets t (N,), with label smoothing s (torch's definition:
the target distribution is (1 - s) * onehot(t) + s / V):

    lse_i  = log sum_j exp(x_ij)
    loss_i = lse_i - (1 - s) * x_i,t_i - (s / V) * sum_j x_ij
    dx_ij  = softmax(x_i)_j - (1 - s) * [j == t_i] - s / V            (times the reduction scale)

and rows whose target is `ignore_index` contribute neither loss nor gradient. "mean" divides
by the number of rows that are not ignored (NaN when every row is ignored, as in torch).

One program handles one row in two passes over V in blocks: the first keeps an online
(running max, running sum of exponentials) pair and picks out x_t and sum(x) on the way, so
no softmax tensor is ever stored; the second re-reads the row and writes dx. Because the
gradient is ready when the forward ends, the backward only multiplies it by grad_output.

Memory: `cross_entropy` writes dlogits into a new buffer, so the caller's logits are never
modified (they may be saved by another op's backward). Callers that own their logits (the
chunked linear + cross-entropy) use `loss_and_dlogits(..., out=logits)` to overwrite them in
place, which the kernel allows: each element is read before the same program writes it.

The stored dlogits have the logits' dtype, except float16: there they are float32. They are
already divided by the number of tokens, and the loss scale (the GradScaler's grad_output,
e.g. 65,536) only arrives in the backward: softmax / 8,192 tokens is below float16's smallest
subnormal (6e-8) for every probability under 5e-4, so in float16 most of the gradient would
flush to zero before the scale could lift it. bfloat16 has float32's range.

The loss is float32 whatever the logits' dtype, as torch gives under autocast (which runs
cross-entropy in float32).

Not autotuned: the kernel streams each row twice, and an 8192-wide block at 16 warps keeps
enough loads in flight without spilling (compile report); a GPU run could still time 4096/8
against it (`python -m minillm.benchmarks.cross_entropy`) before adding `triton.autotune`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.kernels.launch import CompileSpec, device_guard, refuse_double_backward, tl, triton, triton_usable

_REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, DLogits, Targets, Loss, GradScale,
    stride_logits, stride_dlogits, V, ignore_index, label_smoothing,
    HAS_SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = Logits + row * stride_logits
    dx_ptr = DLogits + row * stride_dlogits
    target = tl.load(Targets + row)
    cols = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(Loss + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                tl.store(dx_ptr + start + cols, tl.zeros((BLOCK_V,), tl.float32).to(DLogits.dtype.element_ty),
                         mask=start + cols < V)
        return

    # Pass 1: online log-sum-exp, plus the target logit and (for smoothing) the row sum.
    m = -float("inf")
    d = 0.0
    x_target = 0.0
    x_sum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf (a masked-out block of the vocabulary), m_new is
        # -inf too: subtract 0 instead, so that exp(-inf - -inf) never makes a NaN and the
        # block adds exp(-inf) = 0 to d.
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub), axis=0)
        m = m_new
        x_target += tl.sum(tl.where(offs == target, x, 0.0), axis=0)
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(d)
    loss = lse - (1.0 - label_smoothing) * x_target
    if HAS_SMOOTHING:
        loss -= label_smoothing / V * x_sum
    tl.store(Loss + row, loss)

    # Pass 2: dx = (softmax - smoothed one-hot) * scale, written over (or beside) the logits.
    if WRITE_GRAD:
        scale = tl.load(GradScale)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == target, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= label_smoothing / V
            tl.store(dx_ptr + offs, (g * scale).to(DLogits.dtype.element_ty), mask=mask)


def grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype dlogits are stored in between forward and backward (see the module docstring)."""
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


def _launch_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 8192-wide blocks (16 values a thread at 16 warps) keep enough
    loads in flight to stream a 50k-wide row without spilling."""
    block = min(8192, triton.next_power_of_2(v))
    return block, min(max(block // 512, 4), 16)


def _loss_and_dlogits_reference(logits, targets, ignore_index, label_smoothing, grad_scale, out, write_grad):
    """The same computation in PyTorch, chunk-friendly: float32 math, at most one (N, V)
    float32 temporary, and none at all when `out` is a float32 `logits` (updated in place)."""
    n, v = logits.shape
    x = logits.float()
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - (1.0 - label_smoothing) * x.gather(1, safe_t[:, None]).squeeze(1)
    if label_smoothing > 0:
        loss = loss - label_smoothing / v * x.sum(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not write_grad:
        return loss, None
    # Overwrite x when it is our own float32 copy, or when the caller handed logits over as `out`.
    if x.data_ptr() != logits.data_ptr() or (out is not None and out.data_ptr() == logits.data_ptr()):
        g = x.sub_(lse[:, None]).exp_()
    else:
        g = torch.exp(x - lse[:, None])
    g.scatter_add_(1, safe_t[:, None], torch.full((n, 1), label_smoothing - 1.0, device=g.device))
    if label_smoothing > 0:
        g.sub_(label_smoothing / v)
    # where() rather than a multiply so that 0 * inf (all rows ignored, scale 1/0) stays 0.
    row_scale = torch.where(valid, grad_scale.to(g.dtype).expand(n), torch.zeros((), device=g.device))
    g.mul_(row_scale[:, None])
    if out is not None:
        if g.data_ptr() != out.data_ptr():
            out.copy_(g)
        return loss, out
    return loss, g.to(grad_dtype(logits.dtype))


def loss_and_dlogits(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                     label_smoothing: float = 0.0, grad_scale: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, write_grad: bool = True):
    """Per-row float32 loss (N,) and dlogits (N, V) = d(sum_i loss_i * grad_scale)/dlogits.

    The launcher of the kernel, shared with the chunked linear + cross-entropy.
    `grad_scale` is a one-element float32 tensor (1 / number of valid rows, for a mean) kept
    on the device so that no host synchronisation is needed; `out` receives dlogits and may
    be `logits` itself (otherwise dlogits are new, in `grad_dtype(logits.dtype)`). Uses the
    Triton kernel where it can run, PyTorch otherwise.
    """
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    if not triton_usable(logits, targets):
        return _loss_and_dlogits_reference(logits, targets, ignore_index, label_smoothing,
                                           grad_scale, out, write_grad)
    # The kernel takes a row stride for logits and dlogits, but reads targets[row] at offset
    # row: a strided view of targets (a column of a (N, k) tensor) must be made contiguous.
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    dlogits = None
    if write_grad:
        dlogits = out if out is not None else torch.empty((n, v), dtype=grad_dtype(logits.dtype),
                                                          device=logits.device)
    block, warps = _launch_config(v)
    if n > 0:
        with device_guard(logits):
            _launch(logits, dlogits, targets, loss, grad_scale, v, ignore_index, label_smoothing, write_grad,
                    block, warps)
    return loss, dlogits


def _grid(n: int) -> tuple[int]:
    """One program per row, on grid axis 0 (up to 2**31 - 1)."""
    return (n,)


def _launch(logits, dlogits, targets, loss, grad_scale, v, ignore_index, label_smoothing, write_grad, block, warps):
    _cross_entropy_fwd_kernel[_grid(logits.shape[0])](
        logits, dlogits if write_grad else logits, targets, loss,
        grad_scale.to(torch.float32).reshape(1),
        logits.stride(0), dlogits.stride(0) if write_grad else 0, v, ignore_index, float(label_smoothing),
        HAS_SMOOTHING=label_smoothing > 0, WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=warps,
    )


def _forward(logits, targets, ignore_index, label_smoothing, reduction, write_grad):
    """The reduced loss, and dlogits (N, V) already scaled for the reduction (None when
    write_grad is False)."""
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    if reduction == "mean":
        grad_scale = 1.0 / n_valid
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    loss, dlogits = loss_and_dlogits(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     grad_scale=grad_scale, write_grad=write_grad)
    if reduction == "mean":
        return loss.sum() / n_valid, dlogits
    if reduction == "sum":
        return loss.sum(), dlogits
    return loss, dlogits


def _backward(dlogits, grad_output, reduction, logits_dtype):
    """dlogits times grad_output (a scalar, or (N,) for reduction="none"), in the logits' dtype.

    Out of place, so the backward's peak is two (N, V) buffers, as torch's own (the saved
    log-softmax and the gradient): scaling the saved dlogits in place would save one, but AOT
    autograd (torch.compile, torch.library.opcheck) refuses a backward that mutates a tensor
    saved by the forward."""
    if reduction == "none":
        grad_output = grad_output[:, None]
    return (dlogits * grad_output.to(dlogits.dtype)).to(logits_dtype)


# A torch.library custom op (see kernels/launch.py): one opaque node for torch.compile. It
# returns the loss and the already-scaled dlogits (an empty tensor when no gradient is wanted);
# the backward only multiplies the latter by grad_output.
@torch.library.custom_op("minillm::cross_entropy", mutates_args=(),
                         schema="(Tensor logits, Tensor targets, int ignore_index, float label_smoothing, "
                                "str reduction, bool write_grad) -> (Tensor, Tensor)")
def _cross_entropy_op(logits, targets, ignore_index, label_smoothing, reduction, write_grad):
    _check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
    loss, dlogits = _forward(logits, targets, ignore_index, label_smoothing, reduction, write_grad)
    return loss, dlogits if write_grad else logits.new_empty(0)


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, reduction, write_grad):
    loss = logits.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    dlogits = logits.new_empty(logits.shape if write_grad else (0,), dtype=grad_dtype(logits.dtype))
    return loss, dlogits


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.reduction = inputs[4]
    ctx.logits_dtype = inputs[0].dtype


def _autograd_backward(ctx, grad_output, _):
    refuse_double_backward("cross_entropy")
    (dlogits,) = ctx.saved_tensors
    return _backward(dlogits, grad_output, ctx.reduction, ctx.logits_dtype), None, None, None, None, None


_cross_entropy_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy` on float32 logits (the loss is float32; gradients flow in logits' dtype)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def _check(logits, targets, ignore_index, label_smoothing, reduction):
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: targets must be ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: targets must be int64 or int32 class indices, got {targets.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: targets are on {targets.device} but logits on {logits.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_targets(name, targets, v, ignore_index):
    """Refuse targets outside [0, v) that are not ignore_index. Called inside the custom ops,
    where the values are real even under torch.compile (reading them in the traced code would
    break the graph). Cheap on the CPU; on a GPU it would cost a synchronisation, so there (as
    in torch) an out-of-range target gives an undefined loss instead."""
    if not targets.is_cuda and targets.numel() > 0:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise ValueError(f"{name}: target {int(targets[bad][0])} is out of range for {v} classes "
                             f"(and is not ignore_index={ignore_index})")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (N, V) against class indices (N,), as `F.cross_entropy`.

    The loss is float32. Runs the fused Triton kernel where it can (CUDA, or the
    interpreter) and `cross_entropy_reference` otherwise.
    """
    _check(logits, targets, ignore_index, label_smoothing, reduction)
    if not triton_usable(logits, targets):
        _check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
        return cross_entropy_reference(logits, targets, ignore_index, label_smoothing, reduction)
    # requires_grad ignores torch.no_grad(): ask grad mode too before computing a gradient.
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    return _cross_entropy_op(logits, targets, int(ignore_index), float(label_smoothing), reduction, write_grad)[0]


def compile_specs() -> list[CompileSpec]:
    """The kernel at GPT-2's vocabulary (50257) in bf16 and fp32, and at a 128k vocabulary."""
    specs = []
    for v, dtype, smoothing in ((50257, "bf16", False), (50257, "fp32", True), (128256, "bf16", False)):
        block, warps = _launch_config(v)
        specs.append(CompileSpec(
            f"cross_entropy_fwd[V={v},{dtype}{',smooth' if smoothing else ''}]", _cross_entropy_fwd_kernel,
            {"Logits": f"*{dtype}", "DLogits": f"*{dtype}", "Targets": "*i64", "Loss": "*fp32",
             "GradScale": "*fp32", "stride_logits": "i64", "stride_dlogits": "i64", "V": "i32",
             "ignore_index": "i32", "label_smoothing": "fp32"},
            {"HAS_SMOOTHING": smoothing, "WRITE_GRAD": True, "BLOCK_V": block}, num_warps=warps))
    return specs
