"""GELU (tanh) kernels against F.gelu(approximate="tanh") (interpreter on CPU-only machines).

Tolerances (output and dx): FlashAttention's rule (tests/kernel_check.py): ours against
F.gelu in float64 must be within twice the error of torch's own F.gelu (and its backward) in
the same dtype plus atol + rtol * max|ref|,
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

import minillm.kernels.gelu as gelu_mod
from minillm.kernels.gelu import gelu_tanh, gelu_tanh_reference
from kernel_check import DTYPES, check_op

KERNELS = (gelu_mod._gelu_fwd_kernel, gelu_mod._gelu_bwd_kernel)


def check(x, dy=None):
    """Ours against F.gelu(approximate="tanh"), on x and the upstream dy as laid out."""
    dy = torch.randn(x.shape) if dy is None else dy
    with warnings.catch_warnings():  # numpy's exp overflows to inf for very negative x: harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        check_op(gelu_tanh, lambda a: F.gelu(a, approximate="tanh"), [x], dy, names=("y", "x"), kernels=KERNELS)


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


def test_non_contiguous_upstream_gradient():
    """The upstream gradient broadcast by expand() (stride 0) or transposed, and an input
    broadcast the same way."""
    torch.manual_seed(0)
    check(torch.randn(7, 30), dy=torch.randn(30).expand(7, 30))
    check(torch.randn(7, 30).half(), dy=torch.randn(30, 7).t())
    check(torch.randn(30).expand(7, 30))


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(gelu_mod, "triton_usable", lambda *t: False)
    x = torch.randn(50)
    assert torch.equal(gelu_tanh(x), gelu_tanh_reference(x))


def test_integer_input_error():
    with pytest.raises(ValueError, match="floating point"):
        gelu_tanh(torch.arange(4))
