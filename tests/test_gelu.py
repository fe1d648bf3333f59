"""GELU (tanh) kernels against F.gelu(approximate="tanh") (interpreter on CPU-only machines).

Tolerances (output and dx): ours against F.gelu in float64 must be within twice the
error of torch's own F.gelu (and its backward) in the same dtype plus atol + rtol * max|ref|,
with (atol, rtol) = (1e-5, 1e-5) for float32, (1e-3, 1e-3) for float16 and (1e-2, 8e-3) for
bfloat16 (about one unit in the last place: the interpreter truncates float32 -> bf16). The
kernel's sigmoid form of tanh differs from torch's by float32 rounding only: against a
float64 GELU, our dx is off by up to ~2e-6 where torch's float32 is off by ~1e-6.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kernels.gelu as gelu_mod
from kernels.gelu import gelu_tanh, gelu_tanh_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 8e-3)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy.to(y.dtype))
    return y, x.grad


def check(x):
    dtype = x.dtype
    dy = torch.randn(x.shape)
    with warnings.catch_warnings():  # numpy's exp overflows to inf for very negative x: harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = run(gelu_tanh, x, dy)
    ref = run(lambda a: F.gelu(a, approximate="tanh"), x.double(), dy)
    lowp = run(lambda a: F.gelu(a, approximate="tanh"), x, dy)
    atol, rtol = TOL[dtype]
    for name, o, r, lp in zip(("y", "dx"), ours, ref, lowp):
        assert o.dtype == dtype and o.shape == x.shape, name
        err = (o.double() - r).abs().max().item()
        bound = 2 * (lp.double() - r).abs().max().item() + atol + rtol * r.abs().max().item()
        assert err <= bound, f"{name} ({dtype}): error {err:.3g} > bound {bound:.3g}"


@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1.0, 4.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(shape, dtype, scale, seed):
    torch.manual_seed(seed)
    check((torch.randn(shape) * scale).to(dtype))


def test_several_blocks_and_a_ragged_tail():
    torch.manual_seed(0)
    check(torch.randn(3 * 1024 + 5) * 3)


def test_non_contiguous_input():
    torch.manual_seed(0)
    check(torch.randn(30, 20).t())


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(gelu_mod, "triton_usable", lambda *t: False)
    x = torch.randn(50)
    assert torch.equal(gelu_tanh(x), gelu_tanh_reference(x))


def test_integer_input_error():
    with pytest.raises(ValueError, match="floating point"):
        gelu_tanh(torch.arange(4))
