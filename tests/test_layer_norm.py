"""LayerNorm kernels against torch.nn.functional.layer_norm (interpreter on CPU-only machines).

Tolerances (outputs and every gradient): FlashAttention's rule (tests/kernel_check.py): the
error of ours against F.layer_norm in float64 must be at most twice the error of PyTorch's
own computation in the same dtype (F.layer_norm and its backward run natively in
fp32/fp16/bf16) plus atol + rtol * max|reference|, with (atol, rtol) = (1e-5, 1e-5) for
float32, (1e-3, 1e-3) for float16 and (1e-2, 8e-3) for bfloat16: about one unit in the last
place, since the interpreter truncates float32 -> bf16 where a GPU rounds.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minillm.kernels.layer_norm as ln
from minillm.kernels.layer_norm import layer_norm, layer_norm_reference
from kernel_check import DTYPES, check_op

KERNELS = (ln._layer_norm_fwd_kernel, ln._layer_norm_bwd_kernel)


def check(x, w, b, eps=1e-5, dy=None):
    """Ours against F.layer_norm, on x, weight, bias and the upstream dy as laid out."""
    dy = torch.randn(x.shape) if dy is None else dy
    check_op(lambda a, c, d: layer_norm(a, c, d, eps), lambda a, c, d: F.layer_norm(a, a.shape[-1:], c, d, eps),
             [x, w, b], dy, names=("y", "x", "weight", "bias"), kernels=KERNELS)


@given(
    rows=st.integers(1, 40),
    n=st.one_of(st.integers(1, 300), st.sampled_from([768, 1000, 4096])),
    dtype=st.sampled_from(DTYPES),
    has_weight=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(rows, n, dtype, has_weight, has_bias, seed):
    torch.manual_seed(seed)
    if n >= 768:
        rows = min(rows, 6)  # keep wide rows cheap under the interpreter
    x = (torch.randn(rows, n) * 2 + 0.5).to(dtype)
    w = (torch.randn(n) + 1).to(dtype) if has_weight else None
    b = torch.randn(n).to(dtype) if has_bias else None
    check(x, w, b)


def test_leading_dims_and_strided_input():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 7).transpose(1, 2)  # (3, 7, 50), last dim strided: copied
    check(x, torch.randn(50), torch.randn(50))
    x = torch.randn(2, 5, 64)[:, 1:4]  # rows strided, last dim contiguous: used as is
    check(x, torch.randn(64), None, eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_weight_bias_and_upstream_gradient(dtype):
    """Strided weight and bias (every other element of a longer vector), an upstream gradient
    broadcast over the rows by expand() (row stride 0) or transposed, and an input broadcast
    over the rows: every tensor the kernels read through a pointer."""
    torch.manual_seed(2)
    x = torch.randn(6, 40).to(dtype)
    w, b = torch.randn(80).to(dtype)[::2], torch.randn(120).to(dtype)[1::3]
    check(x, w, b, dy=torch.randn(40).expand(6, 40))
    check(x, w, b, dy=torch.randn(40, 6).t())
    check(torch.randn(1, 40).to(dtype).expand(5, 40), w, b)


def test_many_rows_share_the_weight_reduction():
    """More rows than programs in the backward, and a row count that does not divide evenly."""
    torch.manual_seed(1)
    check(torch.randn(203, 33), torch.randn(33), torch.randn(33))


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(ln, "triton_usable", lambda *t: False)
    x = torch.randn(4, 10, requires_grad=True)
    w, b = torch.randn(10), torch.randn(10)
    y = layer_norm(x, w, b)
    assert torch.equal(y, layer_norm_reference(x, w, b))
    y.sum().backward()
    assert x.grad is not None


def test_reference_matches_torch_in_float32():
    x, w, b = torch.randn(5, 12, dtype=torch.bfloat16), torch.randn(12), torch.randn(12)
    expected = F.layer_norm(x.float(), (12,), w, b).to(torch.bfloat16)
    assert torch.equal(layer_norm_reference(x, w, b), expected)


@pytest.mark.parametrize("w_shape, b_shape, match", [((10,), (9,), "bias"), ((10, 1), None, "weight")])
def test_shape_errors(w_shape, b_shape, match):
    x = torch.randn(3, 10)
    w = torch.randn(w_shape)
    b = torch.randn(b_shape) if b_shape else None
    with pytest.raises(ValueError, match=match):
        layer_norm(x, w, b)


def test_empty_last_dim_error():
    with pytest.raises(ValueError, match="last dimension"):
        layer_norm(torch.randn(3, 0), None, None)


@pytest.mark.parametrize("x, w, match", [
    (torch.arange(12).reshape(3, 4), None, "x must be floating point, got torch.int64"),
    (torch.randn(3, 4), torch.ones(4, dtype=torch.int32), "weight must be floating point, got torch.int32"),
])
def test_integer_input_error(x, w, match):
    """Integer tensors are refused (the kernel would return truncated integers)."""
    with pytest.raises(ValueError, match=match):
        layer_norm(x, w, None)


def test_rows_wider_than_the_fused_limit_use_the_reference():
    """Past MAX_FUSED_SIZE columns the one-row-per-program kernels would spill: the reference runs."""
    from minillm.kernels.launch import MAX_FUSED_SIZE

    from kernel_check import DEVICE, launches

    x, w, b = (torch.randn(2, MAX_FUSED_SIZE + 1).to(DEVICE), torch.randn(MAX_FUSED_SIZE + 1).to(DEVICE),
               torch.randn(MAX_FUSED_SIZE + 1).to(DEVICE))
    with launches(*KERNELS) as counts:
        y = layer_norm(x, w, b)
    assert not counts
    assert torch.equal(y, layer_norm_reference(x, w, b))
