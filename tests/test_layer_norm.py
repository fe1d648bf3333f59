"""LayerNorm kernels against PyTorch (interpreter on CPU-only machines).

Tolerances (outputs and every gradient): the error of ours against PyTorch in float64
must be at most twice the error of PyTorch's own computation in the same dtype (F.layer_norm
and its backward run natively in fp32/fp16/bf16) plus atol + rtol * max|reference|, with
(atol, rtol) = (1e-5, 1e-5) for float32, (1e-3, 1e-3) for float16 and (1e-2, 8e-3) for
bfloat16: about one unit in the last place, since the interpreter truncates float32 -> bf16
where a GPU rounds.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kernels.layer_norm as ln
from kernels.layer_norm import layer_norm, layer_norm_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 8e-3)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(ours, lowp, ref, dtype, what):
    atol, rtol = TOL[dtype]
    err = (ours.double() - ref).abs().max().item()
    torch_err = (lowp.double() - ref).abs().max().item()
    bound = 2 * torch_err + atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{what} ({dtype}): error {err:.3g} > bound {bound:.3g} (torch's own: {torch_err:.3g})"


def run(fn, x, w, b, dy):
    """Output and gradients of fn on fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y] + [t.grad for t in leaves if t is not None]


def check(x, w, b, eps=1e-5):
    dtype = x.dtype
    dy = torch.randn(x.shape)
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    ours = run(lambda a, c, d: layer_norm(a, c, d, eps), x, w, b, dy)
    ref = run(lambda a, c, d: F.layer_norm(a, a.shape[-1:], c, d, eps), up(x), up(w), up(b), dy)
    lowp = run(lambda a, c, d: F.layer_norm(a, a.shape[-1:], c, d, eps), x, w, b, dy)
    for name, o, r, lp in zip(("y", "dx", "dweight", "dbias"), ours, ref, lowp):
        assert o.dtype == lp.dtype and o.shape == lp.shape, name
        assert_close(o, lp, r, dtype, name)


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
