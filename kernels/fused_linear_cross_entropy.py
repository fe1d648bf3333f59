"""The language-model head and its loss in one pass over token chunks: logits never exist whole.

    loss = cross_entropy(hidden @ weight.T + bias, targets)        hidden: (N, C), weight: (V, C)

The plain path stores the (N, V) logits, the (N, V) log-softmax that cross-entropy saves
for its backward, and one or two more (N, V) gradients during the backward: at GPT-2's
vocabulary (50257) and 8,192 tokens, each is 1.6 GB in float32. Here the forward walks over
chunks of `chunk_size` tokens; for each chunk it computes the logits, turns them in place
into d(loss)/d(logits) (the Triton cross-entropy kernel where it can run, the same math in
PyTorch otherwise), and at once folds that into the gradients of hidden, weight and bias:

    grad_hidden[chunk] = dlogits @ weight
    grad_weight       += dlogits.T @ hidden[chunk]
    grad_bias         += dlogits.sum(0)

Only those gradients are kept for the backward, which multiplies them by grad_output. The
peak is then one chunk's logits plus the gradients, whatever N is. The matmuls are the same
three as the plain path's, so the FLOPs are too; the price is that the gradients are computed
even if backward is never called (under `torch.no_grad()`, nothing is).

Matmuls run in the inputs' dtype (or autocast's), softmax math in float32; weight and bias
gradients accumulate across chunks in float32. The loss is a float32 scalar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import CompileSpec
from kernels.cross_entropy import loss_and_dlogits

# A chunk's logits (and, for bf16/fp16 inputs, their float32 copy) stay around this size.
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(n: int, v: int) -> int:
    """Tokens per chunk: the largest power of two whose float32 logits fit in CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (4 * max(v, 1)))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n, rows))


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch, or a device autocast lacks
        pass
    return None


def _forward(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size,
             need_h, need_w, need_b):
    """The reduced float32 loss and the gradients asked for (None for the others):
    grad_hidden (N, C) in hidden's dtype, grad_weight (V, C) and grad_bias (V,) in weight's
    and bias's dtypes, each for a grad_output of 1."""
    n, c = hidden.shape
    v = weight.shape[0]
    need_any = need_h or need_w or need_b
    device_type = hidden.device.type
    compute_dtype = _autocast_dtype(device_type) or hidden.dtype

    n_valid = (targets != ignore_index).sum().to(torch.float32)
    if reduction == "mean":
        grad_scale = 1.0 / n_valid
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)

    grad_hidden = torch.empty((n, c), dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_weight = torch.zeros((v, c), dtype=torch.float32, device=weight.device) if need_w else None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

    with torch.autocast(device_type, enabled=False):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(compute_dtype)
            logits = F.linear(h, w, b)  # (chunk, V), a fresh buffer we may overwrite
            loss_rows, dlogits = loss_and_dlogits(
                logits, targets[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing,
                grad_scale=grad_scale, out=logits, write_grad=need_any)
            loss_sum += loss_rows.sum()
            if need_h:
                grad_hidden[start:end] = dlogits @ w
            if need_w:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(dlogits.t(), h)
                else:
                    grad_weight += dlogits.t() @ h
            if need_b:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
            del logits, dlogits

    loss = loss_sum / n_valid if reduction == "mean" else loss_sum
    return (loss, grad_hidden, grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None)


def _backward(grads, grad_output):
    """The forward's gradients times the scalar grad_output, in place: grad_weight alone is
    V x C, no need for a second copy."""
    return [g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in grads]


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size,
                grad_enabled):
        # needs_input_grad ignores torch.no_grad(), so the caller passes whether grad mode is on.
        need_h, need_w, _, need_b = (grad_enabled and needed for needed in ctx.needs_input_grad[:4])
        loss, *grads = _forward(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction,
                                chunk_size, need_h, need_w, need_b)
        ctx.save_for_backward(*grads)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: the stored gradients are scaled in place by "
                               "the first backward, so backward through it twice (retain_graph) is not "
                               "supported")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = _backward(ctx.saved_tensors, grad_output)
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None


def fused_linear_cross_entropy_reference(hidden, weight, targets, bias=None, ignore_index=-100,
                                         label_smoothing=0.0, chunk_size=None, reduction="mean"):
    """The plain path: full (N, V) logits, then `F.cross_entropy` in float32."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def _check(hidden, weight, targets, bias, ignore_index, label_smoothing, chunk_size, reduction):
    name = "fused_linear_cross_entropy"
    if hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be (N, C), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: weight must be (V, {hidden.shape[1]}) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{name}: targets must be ({hidden.shape[0]},) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets must be int64 or int32 class indices, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    for other_name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name}: {other_name} must be floating point, got {t.dtype}")
    for other_name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {other_name} is on {t.device} but hidden is on {hidden.device}")
    if _autocast_dtype(hidden.device.type) is None:
        for other_name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != hidden.dtype:
                raise ValueError(f"{name}: {other_name} is {t.dtype} but hidden is {hidden.dtype} "
                                 f"(cast one of them, or run under torch.autocast)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not targets.is_cuda and targets.numel() > 0:
        # Cheap on the CPU; on a GPU it would cost a synchronisation (torch asserts there instead).
        v = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise ValueError(f"{name}: target {int(targets[bad][0])} is out of range for {v} classes "
                             f"(and is not ignore_index={ignore_index})")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, chunk_size: int | None = None,
                               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, without (N, V) logits.

    hidden: (N, C); weight: (V, C) as in nn.Linear (e.g. the tied embedding); targets: (N,);
    bias: (V,) or None. Returns the float32 mean (or sum) loss; gradients reach hidden, weight
    and bias (any of which may be frozen). Works on any device; the per-chunk softmax uses the
    Triton kernel where it can run.
    """
    _check(hidden, weight, targets, bias, ignore_index, label_smoothing, chunk_size, reduction)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0])
    return _FusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets, bias, int(ignore_index), float(label_smoothing), reduction, chunk_size,
        torch.is_grad_enabled())


def compile_specs() -> list[CompileSpec]:
    """No kernels of its own: the per-chunk work is matmuls plus `cross_entropy`'s kernel."""
    return []
