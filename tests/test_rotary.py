"""Rotary embedding kernel against the Hugging Face Llama formulation written out here
(interpreter on CPU-only machines).

Tolerances (q_rot, k_rot and both gradients): FlashAttention's rule (tests/kernel_check.py):
ours against that formulation in float64 must be within twice the error of the same rotation
done by PyTorch in the inputs' dtype (cos/sin cast to it, as Hugging Face's Llama does) plus
atol + rtol * max|reference|, with (atol, rtol) = (1e-6, 1e-6) for float32, (1e-3, 1e-3) for
float16 and (1e-2, 8e-3) for bfloat16 (about one unit in the last place: the interpreter
truncates float32 -> bf16).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minillm.kernels.rotary as rotary
from minillm.kernels.rotary import apply_rotary, apply_rotary_reference
from kernel_check import DTYPES, TOL, check_op, on_device

ROTARY_TOL = {**TOL, torch.float32: (1e-6, 1e-6)}  # float32: tighter than the shared table


def tables(t, d, offset=0, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(offset, offset + t, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotate_in_dtype(q, k, cos, sin):
    """The HF Llama formulation in the inputs' own dtype: x * cos + rotate_half(x) * sin."""
    def rot(x):
        c = torch.cat([cos, cos], -1).to(x.dtype)
        s = torch.cat([sin, sin], -1).to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat([-x2, x1], -1) * s
    return rot(q), rot(k)


def check(q, k, cos, sin, dq=None, dk=None):
    """Ours against the HF formulation, on q, k, the tables and the upstream dq, dk as laid out."""
    dq = torch.randn(q.shape) if dq is None else dq
    dk = torch.randn(k.shape) if dk is None else dk
    cos, sin = on_device(cos), on_device(sin)
    check_op(lambda a, b: apply_rotary(a, b, cos, sin), lambda a, b: rotate_in_dtype(a, b, cos, sin),
             [q, k], [dq, dk], names=("q_rot", "k_rot", "q", "k"), tol=ROTARY_TOL,
             kernels=(rotary._rotary_kernel,))


@given(
    b=st.integers(1, 2),
    h=st.integers(1, 5),
    hk=st.integers(1, 3),
    t=st.integers(1, 9),
    d=st.sampled_from([2, 8, 20, 64, 128]),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    offset=st.integers(0, 100),
)
def test_matches_reference(b, h, hk, t, d, dtype, transposed, offset):
    torch.manual_seed(t * 31 + d)
    if transposed:  # (B, T, H, D) projections viewed as (B, H, T, D)
        q = torch.randn(b, t, h, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, t, hk, d).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(b, h, t, d).to(dtype), torch.randn(b, hk, t, d).to(dtype)
    cos, sin = tables(t, d, offset)
    check(q, k, cos, sin)


def test_many_heads_span_several_head_blocks():
    """Head dim 128 puts 16 heads in a block: 20 query heads need two blocks, 4 kv heads one."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 20, 3, 128), torch.randn(1, 4, 3, 128)
    check(q, k, *tables(3, 128))


def test_non_contiguous_tables_inputs_and_upstream_gradients():
    """cos/sin as strided views of a wider table, q broadcast over heads by expand() (head
    stride 0), and upstream gradients broadcast over batch and positions or transposed."""
    torch.manual_seed(2)
    cos, sin = tables(5, 32)
    q, k = torch.randn(2, 1, 5, 16).expand(2, 3, 5, 16), torch.randn(2, 1, 5, 16)
    check(q, k, cos[:, ::2], sin[:, 1::2], dq=torch.randn(3, 1, 16).expand(2, 3, 5, 16),
          dk=torch.randn(2, 1, 16, 5).transpose(-1, -2))
    check(q.half(), k.half(), cos[:, :8], sin[:, :8], dq=torch.randn(2, 3, 16, 5).transpose(-1, -2))


def test_reference_matches_hf_formulation():
    """The CPU fallback computes the same rotation."""
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)
    cos, sin = tables(5, 16)
    for got, want in zip(apply_rotary_reference(q, k, cos, sin), rotate_in_dtype(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_backward_is_rotation_by_minus_angle():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)
    cos, sin = tables(5, 16)
    qr, kr = apply_rotary(q, k, cos, sin)
    q_back, k_back = apply_rotary(qr, kr, cos, -sin)
    torch.testing.assert_close(q_back, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_back, k, atol=1e-5, rtol=1e-5)


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(rotary, "triton_usable", lambda *t: False)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = tables(3, 8)
    for got, want in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("q_shape, k_shape, t, d, match", [
    ((1, 2, 3, 7), (1, 2, 3, 7), 3, 7, "even"),
    ((1, 2, 3, 8), (1, 2, 4, 8), 3, 8, "must match q"),
    ((1, 2, 3, 8), (1, 2, 3, 8), 4, 8, "cos must be"),
    ((2, 3, 8), (2, 3, 8), 3, 8, r"\(B, H, T, D\)"),
])
def test_shape_errors(q_shape, k_shape, t, d, match):
    cos = torch.ones(t, d // 2)
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.randn(q_shape), torch.randn(k_shape), cos, cos)


@pytest.mark.parametrize("which", ["q", "cos"])
def test_integer_input_error(which):
    """Integer tensors are refused (the kernel would return truncated integers)."""
    args = {"q": torch.randn(1, 2, 3, 8), "k": torch.randn(1, 2, 3, 8),
            "cos": torch.ones(3, 4), "sin": torch.ones(3, 4)}
    args[which] = args[which].long()
    with pytest.raises(ValueError, match=f"{which} must be floating point, got torch.int64"):
        apply_rotary(**args)
