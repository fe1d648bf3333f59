"""Fused softmax cross-entropy against F.cross_entropy (interpreter on CPU-only machines).

Tolerances, against F.cross_entropy in float64 on the same logits. The loss is computed in
float32 from logits that are exact in float32 whatever their dtype, so it must match to
atol 1e-5 + rtol 1e-5 in every dtype. dlogits are stored in the logits' dtype and held to
FlashAttention's rule (tests/kernel_check.py): their error must be within twice the error of
torch's own cross-entropy gradient in that dtype plus atol + rtol * max|reference|, with
(atol, rtol) = (1e-6, 1e-5) for float32, (1e-4, 1e-3) for float16 and (1e-3, 8e-3) for
bfloat16 (about one unit in the last place: the interpreter truncates float32 -> bf16 where
a GPU rounds).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minillm.kernels.cross_entropy as ce
from minillm.kernels.cross_entropy import cross_entropy, cross_entropy_reference, loss_and_dlogits
from kernel_check import DEVICE, DTYPES, assert_fa2, launches, outputs_and_grads

GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-4, 1e-3), torch.bfloat16: (1e-3, 8e-3)}


def make(n, v, dtype, ignore_frac=0.25, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return logits, targets


def torch_cross_entropy(logits, targets, **kw):
    return F.cross_entropy(logits, targets.long(), **kw)  # torch takes int64 targets only


def loss_and_grad(fn, logits, targets, upstream=None, **kw):
    """fn's loss and dlogits, on a fresh copy of logits with its layout kept."""
    upstream = torch.tensor(1.0) if upstream is None else upstream
    return outputs_and_grads(lambda x, t: fn(x, t, **kw), [logits, targets], upstream)


def check(logits, targets, label_smoothing=0.0, reduction="mean", ignore_index=-100, upstream=None):
    dtype = logits.dtype
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    if upstream is None:
        upstream = torch.randn(logits.shape[0]) if reduction == "none" else torch.tensor(1.7)
    with launches(ce._cross_entropy_fwd_kernel) as counts:
        loss, grad = loss_and_grad(cross_entropy, logits, targets, upstream, **kw)
    assert counts[ce._cross_entropy_fwd_kernel.__name__] > 0, "the kernel did not run (a fallback took over)"
    ref_loss, ref_grad = loss_and_grad(torch_cross_entropy, logits.double(), targets, upstream, **kw)
    _, lowp_grad = loss_and_grad(torch_cross_entropy, logits, targets, upstream, **kw)

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss.float(), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert grad.dtype == dtype
    assert_fa2(f"dlogits ({dtype})", grad, ref_grad, lowp_grad, *GRAD_TOL[dtype])


@given(
    n=st.integers(1, 9),
    v=st.one_of(st.integers(2, 300), st.sampled_from([1000, 8193, 20000])),
    dtype=st.sampled_from(DTYPES),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(n, v, dtype, label_smoothing, reduction, seed):
    logits, targets = make(n, v, dtype, seed=seed)
    check(logits, targets, label_smoothing, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_vocab(dtype):
    """V = 50257: six full 8192-wide blocks and a ragged seventh."""
    logits, targets = make(3, 50257, dtype, ignore_frac=0.0)
    targets[1] = -100
    targets[2] = 50256  # the last class, in the ragged block
    check(logits, targets, label_smoothing=0.1 if dtype == torch.float32 else 0.0)


def test_ignore_index_inside_the_vocabulary():
    logits, targets = make(6, 40, torch.float32, ignore_frac=0.0)
    targets[::2] = 0
    check(logits, targets, ignore_index=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_contiguous_targets(reduction):
    """Targets as a column of an (N, 2) tensor (stride 2): the kernel used to read targets[row]
    at offset row, i.e. other rows' targets (off by 1.47 against torch, reduction="none")."""
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    targets = torch.randint(0, 11, (6, 2))[:, 0]
    assert not targets.is_contiguous()
    check(logits, targets, reduction=reduction)
    check(logits, torch.randint(0, 11, (6, 3), dtype=torch.int32)[:, 1], reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_logits_and_upstream_gradient(dtype):
    """Logits with strided rows, or a strided vocabulary (copied), and a (N,) upstream gradient
    broadcast by expand() or strided."""
    logits, targets = make(6, 80, dtype)
    check(logits[:, :40], targets % 40, reduction="none", upstream=torch.randn(1).expand(6))
    check(logits[:, ::2], targets % 40, reduction="none", upstream=torch.randn(6, 2)[:, 1])
    check(logits.t().contiguous().t(), targets, reduction="sum")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_leading_block_of_minus_inf_logits(label_smoothing):
    """A whole leading 8192-wide block of -inf logits (a masked-out part of the vocabulary),
    targets in the finite part: the online log-sum-exp used to compute exp(-inf - -inf) = NaN
    there, giving a NaN loss and NaN gradients where torch gives about 10."""
    logits, targets = make(3, 9000, torch.float32, ignore_frac=0.0)
    logits[:, :8192] = -float("inf")
    targets = 8192 + targets % 808
    check(logits, targets, label_smoothing=label_smoothing)
    check(logits, targets, label_smoothing=label_smoothing, reduction="none")


def test_every_row_ignored_gives_nan_loss_and_zero_grad():
    logits, _ = make(4, 33, torch.float32)
    targets = torch.full((4,), -100)
    loss, grad = loss_and_grad(cross_entropy, logits, targets)
    assert math.isnan(loss.item())
    assert torch.equal(grad, torch.zeros_like(grad))


def test_extreme_logits_stay_finite():
    logits, targets = make(5, 3000, torch.float32, ignore_frac=0.0, scale=1e4)
    check(logits, targets)


def test_logits_are_not_modified_and_in_place_agrees():
    logits, targets = make(5, 700, torch.float32)
    before = logits.clone()
    check(logits, targets)
    assert torch.equal(logits, before)
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    scale = torch.tensor(0.25, device=DEVICE)
    loss_a, grad_a = loss_and_dlogits(logits, targets, grad_scale=scale)
    buf = logits.clone()
    loss_b, grad_b = loss_and_dlogits(buf, targets, grad_scale=scale, out=buf)
    assert grad_b.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_pytorch_path_of_loss_and_dlogits_agrees_with_kernel(monkeypatch, dtype, in_place):
    """The chunked linear + CE uses this helper on both paths: they must agree."""
    logits, targets = (t.to(DEVICE) for t in make(7, 500, dtype))
    scale = torch.tensor(1 / 5, device=DEVICE)
    with launches(ce._cross_entropy_fwd_kernel) as counts:
        kernel = loss_and_dlogits(logits, targets, grad_scale=scale, label_smoothing=0.1)
    assert counts[ce._cross_entropy_fwd_kernel.__name__] > 0, "the kernel did not run (a fallback took over)"
    monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    buf = logits.clone()
    torch_path = loss_and_dlogits(buf, targets, grad_scale=scale, label_smoothing=0.1,
                                  out=buf if in_place else None)
    torch.testing.assert_close(kernel[0], torch_path[0], atol=1e-5, rtol=1e-5)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(kernel[1].float(), torch_path[1].float(), atol=2 * atol, rtol=2 * rtol)


def test_no_grad_forward_skips_the_gradient(monkeypatch):
    logits, targets = make(4, 100, torch.float32)
    logits.requires_grad_()
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["write_grad"])
        return loss_and_dlogits(*args, **kwargs)

    monkeypatch.setattr(ce, "loss_and_dlogits", spy)
    with torch.no_grad():
        loss = cross_entropy(logits, targets)
    assert calls == [False]
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), targets))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_gradient_is_not_flushed_to_zero(reduction):
    """float16 logits, a GradScaler-like loss scale (2**14) and a mean over 512 tokens: the
    kernel used to store dlogits in float16 already divided by the token count, so every
    probability under ~1.5e-5 was 0 before the scale applied (most of the non-target entries;
    94-100% at 8,192 tokens). Ours may have no more zeros than torch's own float16 path."""
    logits, targets = make(512, 512, torch.float16, ignore_frac=0.0)
    upstream = torch.tensor(2.0**14) if reduction == "mean" else torch.full((512,), 2.0**14 / 512)
    kw = dict(reduction=reduction)
    with launches(ce._cross_entropy_fwd_kernel) as counts:
        _, grad = loss_and_grad(cross_entropy, logits, targets, upstream, **kw)
    assert counts[ce._cross_entropy_fwd_kernel.__name__] > 0, "the kernel did not run (a fallback took over)"
    _, lowp_grad = loss_and_grad(torch_cross_entropy, logits, targets, upstream, **kw)
    _, ref_grad = loss_and_grad(torch_cross_entropy, logits.double(), targets, upstream, **kw)
    non_target = torch.ones(logits.shape, dtype=torch.bool, device=grad.device)
    non_target[torch.arange(512), targets] = False
    zeros = (grad[non_target] == 0).float().mean().item()
    torch_zeros = (lowp_grad[non_target] == 0).float().mean().item()
    assert zeros <= torch_zeros, f"{zeros:.1%} of non-target dlogits are 0, torch's float16: {torch_zeros:.1%}"
    assert grad.dtype == torch.float16
    assert_fa2("dlogits (float16)", grad, ref_grad, lowp_grad, *GRAD_TOL[torch.float16])


def test_backward_twice_with_retain_graph():
    """The stored gradient is not consumed by the first backward: a second one adds the same."""
    logits, targets = make(3, 10, torch.float32, ignore_frac=0.0)
    x = logits.to(DEVICE).requires_grad_()
    loss = cross_entropy(x, targets.to(DEVICE))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, atol=0, rtol=0)


def test_create_graph_is_refused():
    """The gradient is computed by the kernel, not by differentiable torch ops: a second-order
    gradient (create_graph=True) raises instead of silently coming back detached."""
    logits, targets = make(3, 10, torch.float32, ignore_frac=0.0)
    x = logits.to(DEVICE).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(cross_entropy(x, targets.to(DEVICE)), x, create_graph=True)


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    logits, targets = make(5, 17, torch.float32)
    torch.testing.assert_close(cross_entropy(logits, targets, label_smoothing=0.2),
                               cross_entropy_reference(logits, targets, label_smoothing=0.2), atol=0, rtol=0)


@pytest.mark.parametrize("logits_shape, targets, match", [
    ((4, 10), torch.zeros(3, dtype=torch.long), "targets must be"),
    ((2, 4, 10), torch.zeros(4, dtype=torch.long), "logits must be"),
    ((4, 10), torch.zeros(4), "int64"),
    ((4, 10), torch.tensor([0, 1, 10, 2]), "out of range"),
])
def test_input_errors(logits_shape, targets, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(torch.randn(logits_shape), targets)


def test_integer_logits_error():
    with pytest.raises(ValueError, match="logits must be floating point, got torch.int64"):
        cross_entropy(torch.arange(8).reshape(2, 4), torch.tensor([0, 1]))


def test_option_errors():
    logits, targets = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, targets, label_smoothing=1.5)
