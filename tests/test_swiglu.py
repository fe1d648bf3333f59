"""SwiGLU kernels against F.silu(gate) * up (interpreter on CPU-only machines).

Tolerances (output, dgate, dup): FlashAttention's rule (tests/kernel_check.py): ours against
F.silu(gate) * up in float64 must be within twice the error of torch's own F.silu(gate) * up
(and its backward) in the same dtype plus atol + rtol * max|ref|, with (atol, rtol) =
(1e-5, 1e-6) for float32, (1e-3, 1e-3) for float16 and (1e-2, 8e-3) for bfloat16 (about one
unit in the last place: the interpreter truncates float32 -> bf16 where a GPU rounds).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minillm.kernels.swiglu as swiglu_mod
from minillm.kernels.swiglu import swiglu, swiglu_reference
from kernel_check import DTYPES, TOL, check_op

SWIGLU_TOL = {**TOL, torch.float32: (1e-5, 1e-6)}  # float32: a tighter rtol than the shared table
KERNELS = (swiglu_mod._swiglu_fwd_kernel, swiglu_mod._swiglu_bwd_kernel)


def check(gate, up, dy=None):
    """Ours against F.silu(gate) * up, on gate, up and the upstream dy as laid out."""
    dy = torch.randn(gate.shape) if dy is None else dy
    with warnings.catch_warnings():  # numpy's exp overflows to inf for very negative gates: harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        check_op(swiglu, lambda g, u: F.silu(g) * u, [gate, up], dy, names=("y", "gate", "up"), tol=SWIGLU_TOL,
                 kernels=KERNELS)


@given(
    rows=st.integers(1, 20),
    n=st.one_of(st.integers(1, 300), st.sampled_from([1024, 1500, 2752])),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1.0, 4.0, 30.0]),
    fused_projection=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(rows, n, dtype, scale, fused_projection, seed):
    torch.manual_seed(seed)
    if n > 300:
        rows = min(rows, 4)
    if fused_projection:  # gate and up as the two halves of one (rows, 2n) projection: strided views
        gate, up = (torch.randn(rows, 2 * n) * scale).to(dtype).chunk(2, dim=-1)
    else:
        gate, up = (torch.randn(2, rows, n) * scale).to(dtype).unbind(0)
    check(gate, up)


def test_leading_dims():
    torch.manual_seed(0)
    check(torch.randn(2, 3, 70), torch.randn(2, 3, 70))


def test_non_contiguous_inputs_and_upstream_gradient():
    """The upstream gradient broadcast over the rows by expand() (row stride 0) or transposed;
    gate and up broadcast over the rows, or with a strided last dimension (copied)."""
    torch.manual_seed(0)
    gate, up = torch.randn(2, 5, 70).unbind(0)
    check(gate, up, dy=torch.randn(70).expand(5, 70))
    check(gate.half(), up.half(), dy=torch.randn(70, 5).t())
    check(torch.randn(70).expand(5, 70), torch.randn(5, 140)[:, ::2])


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "triton_usable", lambda *t: False)
    g, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(swiglu(g, u), swiglu_reference(g, u))


@pytest.mark.parametrize("gate, up, match", [
    (torch.randn(3, 5), torch.randn(3, 6), "same shape"),
    (torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64), "float64"),
    (torch.arange(4), torch.arange(4), "floating point"),
])
def test_input_errors(gate, up, match):
    with pytest.raises(ValueError, match=match):
        swiglu(gate, up)
