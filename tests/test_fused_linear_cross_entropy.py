"""Chunked linear + cross-entropy against F.cross_entropy(F.linear(...)).

Tolerances. float32, on the plain-PyTorch path that CPU training uses and on the Triton
path (interpreter): the loss agrees with the plain float32 path to 1e-5 (absolute and
relative); the gradients of hidden, weight and bias are within 1e-5 of the float64 plain
path, plus twice the plain float32 path's own error where that is larger (with few tokens
and a 50257-wide softmax, torch's float32 dlogits are off by ~5e-6 themselves, and ours,
which subtract the one-hot from exp(x - lse) directly, are closer to float64 than that).
bfloat16: the logits and all matmuls are bf16 on both sides, so ours is held against the
float32 plain path with a bound of twice the bf16 plain path's own error plus
atol + rtol * max|reference| = 1e-3 + 8e-3 * max|reference|.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kernels.cross_entropy as ce
import kernels.fused_linear_cross_entropy as flce
from kernels.cross_entropy import loss_and_dlogits
from kernels.fused_linear_cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)


def make(n, c, v, dtype=torch.float32, bias=False, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).to(dtype)
    weight = (torch.randn(v, c, generator=g) / c**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, targets, b


def loss_and_grads(fn, hidden, weight, targets, bias, upstream=2.0, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss = fn(h, w, targets, b, **kw)
    (loss * upstream).backward()
    return [loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])


def exact(hidden, weight, targets, bias=None, **kw):
    """The plain path in float64: the yardstick both float32 paths are measured against."""
    kw.pop("chunk_size", None)
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, **kw)


def check_float32(hidden, weight, targets, bias, **kw):
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, bias, **kw)
    plain_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    plain = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, targets, bias, **plain_kw)
    ref = loss_and_grads(exact, hidden.double(), weight.double(), targets,
                         bias.double() if bias is not None else None, **kw)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], plain[0], atol=1e-5, rtol=1e-5, equal_nan=True)
    for name, o, p, r in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[1:], plain[1:], ref[1:]):
        assert o.dtype == p.dtype, name
        err = (o.double() - r).abs().max().item()
        plain_err = (p.double() - r).abs().max().item()
        assert err <= 1e-5 + 2 * plain_err, f"{name}: error {err:.3g} (plain float32 path: {plain_err:.3g})"


@pytest.fixture
def pytorch_path(monkeypatch):
    """Force the plain-PyTorch per-chunk softmax, as on a CPU without the interpreter."""
    monkeypatch.setattr(ce, "triton_usable", lambda *t: False)


@given(
    n=st.integers(1, 70),
    c=st.integers(1, 48),
    v=st.one_of(st.integers(2, 400), st.just(50257)),
    chunk_size=st.one_of(st.none(), st.integers(1, 40)),
    bias=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_pytorch_path_matches_plain_path_float32(n, c, v, chunk_size, bias, label_smoothing, reduction, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ce, "triton_usable", lambda *t: False)
        hidden, weight, targets, b = make(n, c, v, bias=bias, seed=seed)
        check_float32(hidden, weight, targets, b, chunk_size=chunk_size, label_smoothing=label_smoothing,
                      reduction=reduction)


@given(
    n=st.integers(1, 24),
    c=st.integers(1, 32),
    v=st.integers(2, 600),
    chunk_size=st.integers(1, 16),
    bias=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_triton_path_matches_plain_path_float32(n, c, v, chunk_size, bias, label_smoothing, seed):
    hidden, weight, targets, b = make(n, c, v, bias=bias, seed=seed)
    check_float32(hidden, weight, targets, b, chunk_size=chunk_size, label_smoothing=label_smoothing)


def test_triton_path_gpt2_vocab():
    hidden, weight, targets, b = make(5, 16, 50257, bias=True)
    check_float32(hidden, weight, targets, b, chunk_size=2, label_smoothing=0.1)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_bfloat16(monkeypatch, use_kernel):
    if not use_kernel:
        monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    hidden, weight, targets, b = make(30, 32, 300, dtype=torch.bfloat16, bias=True)
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, b, chunk_size=8)
    lowp = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, targets, b)
    up = [t.float() for t in (hidden, weight, targets, b)]
    up[2] = targets
    ref = loss_and_grads(fused_linear_cross_entropy_reference, *up)
    for name, o, lp, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, lowp, ref):
        assert o.dtype == lp.dtype, name
        err = (o.float() - r).abs().max().item()
        bound = 2 * (lp.float() - r).abs().max().item() + 1e-3 + 8e-3 * r.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_frozen_weight_and_frozen_hidden(pytorch_path):
    hidden, weight, targets, _ = make(20, 8, 50, seed=3)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, chunk_size=6)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    fused_linear_cross_entropy_reference(h_ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=0)

    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets, chunk_size=6).backward()
    w_ref = weight.clone().requires_grad_()
    fused_linear_cross_entropy_reference(hidden, w_ref, targets).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=0)


def test_no_grad_and_chunk_size_invariance(pytorch_path, monkeypatch):
    hidden, weight, targets, b = make(37, 12, 90, bias=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["write_grad"])
        return loss_and_dlogits(*args, **kwargs)

    monkeypatch.setattr(flce, "loss_and_dlogits", spy)
    expected = fused_linear_cross_entropy_reference(hidden, weight, targets, b)
    with torch.no_grad():
        for chunk in (1, 5, 37, 100, None):
            got = fused_linear_cross_entropy(hidden, weight, targets, b, chunk_size=chunk)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls and not any(calls)  # no gradient work under no_grad


def test_autocast_bfloat16_on_cpu(pytorch_path):
    hidden, weight, targets, _ = make(16, 32, 100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, targets, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = fused_linear_cross_entropy_reference(hidden, weight, targets)
    torch.testing.assert_close(loss, ref, atol=5e-2, rtol=2e-2)


def test_double_backward_is_refused(pytorch_path):
    hidden, weight, targets, _ = make(4, 4, 10)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_default_chunk_size():
    assert default_chunk_size(8192, 50257) == 256  # 256 x 50257 float32 logits = 49 MiB
    assert default_chunk_size(10, 50257) == 10
    assert default_chunk_size(10**6, 10**9) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=torch.randn(4, 8, 2)), "hidden must be"),
    (dict(weight=torch.randn(10, 7)), "weight must be"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), "targets must be"),
    (dict(targets=torch.tensor([0, 1, 2, 10])), "out of range"),
    (dict(bias=torch.randn(9)), "bias must be"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "float64"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(reduction="none"), "reduction"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_input_errors(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args)
