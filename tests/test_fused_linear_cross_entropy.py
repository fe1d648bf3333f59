"""Chunked linear + cross-entropy against F.cross_entropy(F.linear(...)).

Tolerances. float32, on the plain-PyTorch path that CPU training uses and on the Triton
path (interpreter): the loss agrees with the plain float32 path (`plain` below, written out
with torch ops) to 1e-5 (absolute and relative); the gradients of hidden, weight and bias are
within 1e-5 of the float64 plain path, plus twice the plain float32 path's own error where
that is larger (with few tokens and a 50257-wide softmax, torch's float32 dlogits are off by
~5e-6 themselves, and ours, which subtract the one-hot from exp(x - lse) directly, are closer
to float64 than that).
bfloat16: the logits and all matmuls are bf16 on both sides, so ours is held against the
float32 plain path with a bound of twice the bf16 plain path's own error plus
atol + rtol * max|reference| = 1e-3 + 8e-3 * max|reference|.
float16 (with a GradScaler-like upstream gradient of 2**14): FlashAttention's rule against the
float64 plain path, with the plain float16 path (float32 softmax, as under autocast) as the
baseline and (atol, rtol) = (1e-3, 1e-3).

Every test of the Triton path counts the cross-entropy kernel's launches, so that a silent
fallback to the PyTorch path fails.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minillm.kernels.cross_entropy as ce
import minillm.kernels.fused_linear_cross_entropy as flce
from minillm.kernels.cross_entropy import loss_and_dlogits
from minillm.kernels.fused_linear_cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from kernel_check import assert_fa2, launches, outputs_and_grads


def make(n, c, v, dtype=torch.float32, bias=False, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).to(dtype)
    weight = (torch.randn(v, c, generator=g) / c**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, targets, b


def plain(hidden, weight, targets, bias=None, chunk_size=None, **kw):
    """The plain path: full (N, V) logits, softmax in at least float32 (as under autocast)."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, **kw)


def loss_and_grads(fn, hidden, weight, targets, bias, upstream=2.0, dtype=None, **kw):
    """[loss, grad_hidden, grad_weight, (grad_bias)] of fn on fresh copies of the inputs
    (cast to dtype if given) with their layouts kept."""
    return outputs_and_grads(lambda h, w, t, b: fn(h, w, t, b, **kw), [hidden, weight, targets, bias],
                             torch.tensor(upstream), dtype=dtype)


@contextlib.contextmanager
def kernel_runs():
    """Assert that the cross-entropy kernel runs inside the block (the per-chunk softmax)."""
    with launches(ce._cross_entropy_fwd_kernel) as counts:
        yield counts
    assert counts[ce._cross_entropy_fwd_kernel.__name__] > 0, \
        "_cross_entropy_fwd_kernel did not run (a fallback took over)"


def check_float32(hidden, weight, targets, bias, kernel=False, **kw):
    """Ours against the plain path in float32; kernel: the Triton path must run."""
    with kernel_runs() if kernel else contextlib.nullcontext():
        ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, bias, **kw)
    plain32 = loss_and_grads(plain, hidden, weight, targets, bias, **kw)
    ref = loss_and_grads(plain, hidden, weight, targets, bias, dtype=torch.float64, **kw)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], plain32[0], atol=1e-5, rtol=1e-5, equal_nan=True)
    for name, o, p, r in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[1:], plain32[1:], ref[1:]):
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
    check_float32(hidden, weight, targets, b, kernel=True, chunk_size=chunk_size, label_smoothing=label_smoothing)


def test_triton_path_gpt2_vocab():
    hidden, weight, targets, b = make(5, 16, 50257, bias=True)
    with launches(ce._cross_entropy_fwd_kernel) as counts:
        check_float32(hidden, weight, targets, b, chunk_size=2, label_smoothing=0.1)
    launched = counts[ce._cross_entropy_fwd_kernel.__name__]
    assert launched > 0, "_cross_entropy_fwd_kernel did not run (a fallback took over)"
    assert launched == 3  # one launch per chunk of 2 rows


@pytest.mark.parametrize("use_kernel", [False, True])
def test_non_contiguous_inputs(monkeypatch, use_kernel):
    """Targets as a column of an (N, 2) tensor (the kernel used to read other rows' targets:
    off by 0.36 against torch), hidden with strided rows, weight transposed, bias strided."""
    if not use_kernel:
        monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    hidden, weight, _, _ = make(6, 16, 11)
    targets = torch.randint(0, 11, (6, 2), generator=torch.Generator().manual_seed(1))[:, 0]
    assert not targets.is_contiguous()
    check_float32(hidden, weight, targets, None, kernel=use_kernel, chunk_size=4)
    check_float32(torch.randn(6, 32)[:, :16], weight.t().contiguous().t(), targets, torch.randn(22)[::2],
                  kernel=use_kernel, chunk_size=4, reduction="sum")


def test_leading_block_of_minus_inf_logits():
    """A bias of -inf over a whole leading 8192-wide block of the vocabulary (masked-out
    classes): the per-chunk softmax used to make NaN there (exp(-inf - -inf))."""
    hidden, weight, targets, _ = make(3, 4, 9000, ignore_frac=0.0)
    bias = torch.zeros(9000)
    bias[:8192] = -float("inf")
    targets = 8192 + targets % 808
    with kernel_runs():
        ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, bias, chunk_size=2)
    ref = loss_and_grads(plain, hidden, weight, targets, bias, dtype=torch.float64)
    lowp = loss_and_grads(plain, hidden, weight, targets, bias)
    for name, o, r, lp in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, ref, lowp):
        assert_fa2(name, o, r, lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_bfloat16(monkeypatch, use_kernel):
    if not use_kernel:
        monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    hidden, weight, targets, b = make(30, 32, 300, dtype=torch.bfloat16, bias=True)
    with kernel_runs() if use_kernel else contextlib.nullcontext():
        ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, b, chunk_size=8)
    lowp = loss_and_grads(plain, hidden, weight, targets, b)
    ref = loss_and_grads(plain, hidden, weight, targets, b, dtype=torch.float32)
    for name, o, lp, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, lowp, ref):
        assert o.dtype == lp.dtype, name
        err = (o.float() - r).abs().max().item()
        bound = 2 * (lp.float() - r).abs().max().item() + 1e-3 + 8e-3 * r.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("use_kernel", [False, True])
def test_float16_gradient_is_not_flushed_to_zero(monkeypatch, use_kernel):
    """float16 with a GradScaler-like loss scale (grad_output 2**14), a mean over 512 tokens,
    and a bias spreading the classes' probabilities down to ~1e-9: the chunk's dlogits used to
    be stored in float16 already divided by the token count, so every probability under
    ~1.5e-5 became 0 before the scale applied: 31% of grad_weight's entries were exactly 0
    where torch's plain float16 path has none."""
    if not use_kernel:
        monkeypatch.setattr(ce, "triton_usable", lambda *t: False)
    hidden, weight, targets, _ = make(512, 16, 512, dtype=torch.float16, ignore_frac=0.0)
    bias = torch.linspace(0, -14, 512).half()
    targets = targets % 64
    with kernel_runs() if use_kernel else contextlib.nullcontext():
        ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, bias, upstream=2.0**14)
    lowp = loss_and_grads(plain, hidden, weight, targets, bias, upstream=2.0**14)
    ref = loss_and_grads(plain, hidden, weight, targets, bias, upstream=2.0**14, dtype=torch.float64)
    for name, o, lp, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, lowp, ref):
        assert o.dtype == lp.dtype, name
        zeros, torch_zeros = (o == 0).float().mean().item(), (lp == 0).float().mean().item()
        assert zeros <= torch_zeros, f"{name}: {zeros:.1%} of entries are 0, torch's float16: {torch_zeros:.1%}"
        assert_fa2(name, o, r, lp, atol=1e-3, rtol=1e-3)


def test_frozen_weight_and_frozen_hidden(pytorch_path):
    hidden, weight, targets, _ = make(20, 8, 50, seed=3)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, chunk_size=6)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    plain(h_ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=0)

    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets, chunk_size=6).backward()
    w_ref = weight.clone().requires_grad_()
    plain(hidden, w_ref, targets).backward()
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
    expected = plain(hidden, weight, targets, b)
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
    ref = plain(hidden, weight, targets)
    torch.testing.assert_close(loss, ref, atol=5e-2, rtol=2e-2)


def test_backward_twice_with_retain_graph(pytorch_path):
    """The stored gradients are not consumed by the first backward: a second one adds the same."""
    hidden, weight, targets, _ = make(4, 4, 10)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * first, atol=0, rtol=0)


def test_reference_is_the_plain_path():
    """The benchmarks time `fused_linear_cross_entropy_reference` as the plain path."""
    hidden, weight, targets, b = make(9, 8, 30, bias=True)
    for dtype in (torch.float32, torch.bfloat16):
        args = (hidden.to(dtype), weight.to(dtype), targets, b.to(dtype))
        torch.testing.assert_close(fused_linear_cross_entropy_reference(*args, label_smoothing=0.1),
                                   plain(*args, label_smoothing=0.1), atol=0, rtol=0)


def test_default_chunk_size():
    assert default_chunk_size(8192, 50257) == 256  # 256 x 50257 float32 logits = 49 MiB
    assert default_chunk_size(8192, 50257, "cuda") == 2048  # 393 MiB: few, large matmuls on a GPU
    assert default_chunk_size(8192, 50257, "mps") == 256
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
    (dict(hidden=torch.ones(4, 8, dtype=torch.long)), "hidden must be floating point, got torch.int64"),
    (dict(weight=torch.ones(10, 8, dtype=torch.int32)), "weight must be floating point, got torch.int32"),
])
def test_input_errors(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args)
