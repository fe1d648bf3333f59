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

Matmuls run in the inputs' dtype (or autocast's), softmax math in float32; the gradients
accumulate across chunks in float32. The loss is a float32 scalar. The per-chunk dlogits are
those of the *summed* loss: the mean's 1/N and the loss scale (grad_output) are applied
together, in float32, in the backward. In float16, 1/N first would flush the gradient of every
probability under ~5e-4 (at 8,192 tokens) to zero before a GradScaler's scale could lift it;
there the chunk's dlogits are even multiplied by 2**8 (undone in the backward), so that
probabilities down to 2.4e-7 keep float16's full precision.

Chunk size: a chunk's (chunk, V) float32 logits fit in CHUNK_BYTES: 64 MiB on the CPU,
512 MiB on a GPU (2,048 rows at GPT-2's vocabulary of 50257, 4 chunks at 8,192 tokens), where
fewer, larger matmuls keep the GPU busy and the per-chunk costs (the (V, C) weight-gradient
update, kernel launches) are paid a few times per step instead of 32. In float32 that update
is an in-place `addmm_` into the accumulator; bfloat16 needs one (V, C) temporary per chunk
(torch 2.4 has no mixed-dtype addmm), float16 a float32 product (its range could overflow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.kernels.launch import CompileSpec, refuse_double_backward
from minillm.kernels.cross_entropy import _check_targets, loss_and_dlogits

# A chunk's logits (and, for bf16/fp16 inputs, their float32 copy) stay around this size.
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
# float16 dlogits are computed times this (see the module docstring): |dlogits @ weight| stays
# under 2 * 256 * max|weight|, far from float16's 65,504.
FP16_GRAD_SCALE = 2.0**8


def default_chunk_size(n: int, v: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: the largest power of two whose float32 logits fit in the device's
    CHUNK_BYTES (the CPU's for devices not listed)."""
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"])
    rows = max(1, budget // (4 * max(v, 1)))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n, rows))


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch, or a device autocast lacks
        pass
    return None


def _forward(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, compute_dtype,
             need_h, need_w, need_b):
    """The reduced float32 loss, the float32 gradients asked for (empty tensors for the others):
    grad_hidden (N, C), grad_weight (V, C), grad_bias (V,), of the summed loss times `scale`,
    and the float32 factor (1 / scale, over N for a mean) that turns them into the gradients
    of the loss for a grad_output of 1."""
    n, c = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    scale = FP16_GRAD_SCALE if compute_dtype == torch.float16 else 1.0
    chunk_grad_scale = torch.full((), scale, dtype=torch.float32, device=device)

    def buffer(shape, wanted):
        return torch.zeros(shape if wanted else (0,), dtype=torch.float32, device=device)

    grad_hidden, grad_weight, grad_bias = buffer((n, c), need_h), buffer((v, c), need_w), buffer(v, need_b)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)

    with torch.autocast(device.type, enabled=False):
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(compute_dtype)
            logits = F.linear(h, w, b)  # (chunk, V), a fresh buffer we may overwrite
            loss_rows, dlogits = loss_and_dlogits(
                logits, targets[start:end], ignore_index=ignore_index, label_smoothing=label_smoothing,
                grad_scale=chunk_grad_scale, out=logits, write_grad=need_h or need_w or need_b)
            loss_sum += loss_rows.sum()
            if need_h:
                grad_hidden[start:end] = dlogits @ w
            if need_w:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(dlogits.t(), h)
                elif compute_dtype == torch.float16:  # one chunk's product could pass float16's 65,504
                    grad_weight.addmm_(dlogits.t().float(), h.float())
                else:  # bfloat16 (float32's range): torch 2.4 has no mixed-dtype addmm, so one (V, C) temporary
                    grad_weight += dlogits.t() @ h
            if need_b:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
            del logits, dlogits

    per_token = 1.0 / n_valid if reduction == "mean" else torch.ones((), dtype=torch.float32, device=device)
    loss = loss_sum * per_token
    return loss, grad_hidden, grad_weight, grad_bias, per_token / scale


# A torch.library custom op (see kernels/launch.py): torch.compile sees the whole chunked loop
# as one node. It returns the loss, the float32 gradients (empty where not wanted) and the factor
# the backward scales them by; the backward multiplies and casts to the inputs' dtypes.
@torch.library.custom_op("minillm::fused_linear_cross_entropy", mutates_args=(),
                         schema="(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
                                "float label_smoothing, str reduction, int chunk_size, ScalarType compute_dtype, "
                                "bool need_h, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _flce_op(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, compute_dtype,
             need_h, need_w, need_b):
    _check_targets("fused_linear_cross_entropy", targets, weight.shape[0], ignore_index)
    return _forward(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size,
                    compute_dtype, need_h, need_w, need_b)


@_flce_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, compute_dtype,
      need_h, need_w, need_b):
    def buffer(shape, wanted):
        return hidden.new_empty(shape if wanted else (0,), dtype=torch.float32)

    v = weight.shape[0]
    return (buffer((), True), buffer(hidden.shape, need_h), buffer((v, hidden.shape[1]), need_w), buffer((v,), need_b),
            buffer((), True))


def _setup_context(ctx, inputs, output):
    hidden, weight, _, bias = inputs[:4]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.needed = inputs[-3:]


def _autograd_backward(ctx, grad_output, *_):
    refuse_double_backward("fused_linear_cross_entropy")
    *grads, factor = ctx.saved_tensors
    # Out of place: AOT autograd refuses a backward that mutates what the forward saved.
    factor = grad_output.float() * factor
    grad_hidden, grad_weight, grad_bias = ((g * factor).to(dtype) if needed else None
                                           for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needed))
    return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None, None, None, None


_flce_op.register_autograd(_autograd_backward, setup_context=_setup_context)


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
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device.type)
    compute_dtype = _autocast_dtype(hidden.device.type) or hidden.dtype
    # requires_grad ignores torch.no_grad(): ask grad mode too before computing a gradient.
    need_h, need_w, need_b = (torch.is_grad_enabled() and t is not None and t.requires_grad
                              for t in (hidden, weight, bias))
    return _flce_op(hidden, weight, targets, bias, int(ignore_index), float(label_smoothing), reduction, chunk_size,
                    compute_dtype, need_h, need_w, need_b)[0]


def compile_specs() -> list[CompileSpec]:
    """No kernels of its own: the per-chunk work is matmuls plus `cross_entropy`'s kernel."""
    return []
