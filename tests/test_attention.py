"""Scaled dot-product attention: our hand-written ("naive") implementation and the `sdpa`
dispatch against torch.nn.functional.scaled_dot_product_attention.

The reference spells every mask out explicitly (causal bottom-right via `tril`, key padding,
boolean or additive masks), repeats key/value heads with `repeat_interleave` for grouped-query
attention, and zeroes rows whose every key is masked (torch would give NaN there).

Tolerances:
- float32: outputs and gradients (dq, dk, dv) within atol=1e-5, rtol=1e-5 of torch in float32.
- bfloat16: inputs are bfloat16 values; the reference is torch in float32 on those same values.
  Our error against it must be at most 2x PyTorch's own bfloat16 error plus eps, where
  PyTorch's error is the larger of F.scaled_dot_product_attention in bfloat16 and plain torch
  ops (matmul, softmax, matmul) in bfloat16, and eps = 2^-6 * max|reference| + 1e-5
  (four bfloat16 rounding steps at the reference's scale). Measured over 3000 random cases:
  the sdpa backend never exceeds 2x torch's error; the naive one exceeds it by at most
  1.7 * 2^-8 * max|reference| (dq with head_dim 1), 1.0 * 2^-8 with head_dim >= 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import minillm.attention as attn_module
from minillm.attention import attention, auto_backend, causal_mask, kernel_device, scaled_dot_product_attention
from kernel_check import DEVICE, launches

NEG_INF = float("-inf")


def _sdpa_dispatch(q, k, v, **kw):
    return attention(q, k, v, backend="sdpa", **kw)


IMPLS = {"naive": scaled_dot_product_attention, "sdpa": _sdpa_dispatch}


# ---------------------------------------------------------------------------------------------
# Cases drawn by hypothesis, and the reference.


@dataclass(frozen=True)
class Case:
    b: int
    hkv: int
    rep: int  # query heads per key/value head
    tq: int
    tk: int
    d: int
    causal: bool
    mask_kind: str  # "none" | "bool" | "additive"
    mask_shape: str  # "tq_tk" | "b1_tq_tk" | "h_tq_tk" | "1_tk"
    padding: bool
    scale: Optional[float]
    seed: int

    @property
    def h(self):
        return self.hkv * self.rep


@st.composite
def cases(draw):
    return Case(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 2)),
        rep=draw(st.sampled_from([1, 2, 3])),
        tq=draw(st.integers(1, 9)),
        tk=draw(st.integers(1, 9)),
        d=draw(st.sampled_from([1, 4, 8, 16])),
        causal=draw(st.booleans()),
        mask_kind=draw(st.sampled_from(["none", "bool", "additive"])),
        mask_shape=draw(st.sampled_from(["tq_tk", "b1_tq_tk", "h_tq_tk", "1_tk"])),
        padding=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Cases worth running every time, whatever hypothesis draws.
GQA_CAUSAL_PADDED = Case(2, 2, 2, 3, 7, 8, True, "bool", "b1_tq_tk", True, None, 1)
MORE_QUERIES_THAN_KEYS = Case(1, 1, 3, 6, 4, 4, True, "additive", "h_tq_tk", False, 0.3, 2)  # dead rows
DECODE_STEP = Case(2, 1, 4, 1, 9, 16, True, "none", "tq_tk", True, None, 3)


def make_inputs(c: Case, dtype=torch.float32):
    """q, k, v, upstream grad, attn_mask, key_padding_mask (all on CPU), rounded to dtype."""
    g = torch.Generator().manual_seed(c.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = randn(c.b, c.h, c.tq, c.d), randn(c.b, c.hkv, c.tk, c.d), randn(c.b, c.hkv, c.tk, c.d)
    grad = randn(c.b, c.h, c.tq, c.d)
    shape = {"tq_tk": (c.tq, c.tk), "b1_tq_tk": (c.b, 1, c.tq, c.tk), "h_tq_tk": (c.h, c.tq, c.tk),
             "1_tk": (1, c.tk)}[c.mask_shape]
    mask = None
    if c.mask_kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.75
    elif c.mask_kind == "additive":
        mask = (2 * torch.randn(shape, generator=g)).to(dtype).float()
        mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.2, NEG_INF)
    kpm = (torch.rand(c.b, c.tk, generator=g) < 0.7) if c.padding else None
    return q, k, v, grad, mask, kpm


def reference_bias(b, h, tq, tk, mask, kpm, causal):
    """(B, H, Tq, Tk) float32 additive mask built from scratch, and the rows with no visible key."""
    bias = torch.zeros(b, h, tq, tk)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask, NEG_INF)
        else:
            bias = bias + mask
    if kpm is not None:
        bias = bias.masked_fill(~kpm[:, None, None, :], NEG_INF)
    if causal:  # query i sits at absolute position i + tk - tq (bottom-right alignment)
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        bias = bias.masked_fill(~allowed, NEG_INF)
    dead = (bias == NEG_INF).all(dim=-1, keepdim=True)
    return bias.masked_fill(dead, 0.0), dead


def torch_reference(q, k, v, mask=None, kpm=None, causal=False, scale=None, eager=False):
    """torch's attention on explicit masks; `eager` uses plain matmul/softmax in the input dtype."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    bias, dead = reference_bias(q.shape[0], q.shape[1], q.shape[2], k.shape[2], mask, kpm, causal)
    bias = bias.to(q.dtype)
    if eager:
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        out = torch.softmax(q @ k.transpose(-2, -1) * s + bias, dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.masked_fill(dead, 0.0)


def run_with_grads(fn, q, k, v, grad, dtype):
    """fn's output and (dq, dk, dv), computed in dtype, returned in float32."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(dtype))
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


NAMES = ("out", "dq", "dk", "dv")


# ---------------------------------------------------------------------------------------------
# Property tests against torch.


@pytest.mark.parametrize("impl", sorted(IMPLS))
@given(c=cases())
@example(c=GQA_CAUSAL_PADDED)
@example(c=MORE_QUERIES_THAN_KEYS)
@example(c=DECODE_STEP)
def test_matches_torch_float32(impl, c):
    """Outputs and dq, dk, dv within atol=rtol=1e-5 of torch's float32 attention."""
    q, k, v, grad, mask, kpm = make_inputs(c)
    kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=c.causal, scale=c.scale)
    ours = run_with_grads(lambda q, k, v: IMPLS[impl](q, k, v, **kw), q, k, v, grad, torch.float32)
    ref = run_with_grads(
        lambda q, k, v: torch_reference(q, k, v, mask, kpm, c.causal, c.scale), q, k, v, grad, torch.float32
    )
    for name, a, b in zip(NAMES, ours, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", sorted(IMPLS))
@given(c=cases())
@example(c=GQA_CAUSAL_PADDED)
@example(c=MORE_QUERIES_THAN_KEYS)
def test_matches_torch_bfloat16(impl, c):
    """bfloat16 error vs a float32 reference <= 2 x PyTorch's own bfloat16 error + eps
    (eps = 2^-6 * max|reference| + 1e-5), for outputs and dq, dk, dv."""
    q, k, v, grad, mask, kpm = make_inputs(c, torch.bfloat16)
    kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=c.causal, scale=c.scale)
    ours = run_with_grads(lambda q, k, v: IMPLS[impl](q, k, v, **kw), q, k, v, grad, torch.bfloat16)
    assert ours[0].dtype == torch.float32  # (converted by run_with_grads)

    def ref_fn(eager):
        return lambda q, k, v: torch_reference(q, k, v, mask, kpm, c.causal, c.scale, eager=eager)

    ref = run_with_grads(ref_fn(False), q, k, v, grad, torch.float32)
    torch_fused = run_with_grads(ref_fn(False), q, k, v, grad, torch.bfloat16)
    torch_eager = run_with_grads(ref_fn(True), q, k, v, grad, torch.bfloat16)
    for name, a, r, tf, te in zip(NAMES, ours, ref, torch_fused, torch_eager):
        assert torch.isfinite(a).all(), name
        torch_err = max((tf - r).abs().max().item(), (te - r).abs().max().item())
        err = (a - r).abs().max().item()
        bound = 2 * torch_err + 2**-6 * r.abs().max().item() + 1e-5
        assert err <= bound, f"{name}: bf16 error {err:.3g} > bound {bound:.3g} (torch's own {torch_err:.3g})"


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bfloat16_output_dtype(impl):
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    assert IMPLS[impl](q, q, q, is_causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("t", [1, 5])
def test_square_causal_equals_torch_is_causal(impl, t):
    """When Tq == Tk both alignments coincide: ours must equal torch's own is_causal=True."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(IMPLS[impl](q, k, v, is_causal=True), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_gqa_matches_torch_enable_gqa(impl):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(IMPLS[impl](q, k, v, is_causal=True), ref, atol=1e-5, rtol=1e-5)
    # and the grouping is not "every head sees kv head 0": changing kv head 1 changes heads 3..5 only
    k2 = k.clone()
    k2[:, 1] += torch.randn_like(k2[:, 1])
    out1, out2 = IMPLS[impl](q, k, v, is_causal=True), IMPLS[impl](q, k2, v, is_causal=True)
    assert torch.equal(out1[:, :3], out2[:, :3])
    assert not torch.allclose(out1[:, 3:], out2[:, 3:])


# ---------------------------------------------------------------------------------------------
# Conventions checked without torch's attention: uniform scores over one-hot values.


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("tq,tk", [(2, 5), (4, 4), (1, 6), (3, 1)])
def test_causal_is_bottom_right_aligned(impl, tq, tk):
    """Query i sees keys j <= i + Tk - Tq. With q = 0 every visible key gets the same weight,
    and v = identity makes row i of the output the attention weights themselves."""
    q = torch.zeros(1, 1, tq, tk)
    k = torch.randn(1, 1, tk, tk)
    v = torch.eye(tk)[None, None]
    out = IMPLS[impl](q, k, v, is_causal=True)[0, 0]
    for i in range(tq):
        visible = [j for j in range(tk) if j <= i + tk - tq]
        expected = [1.0 / len(visible) if j in visible else 0.0 for j in range(tk)] if visible else [0.0] * tk
        torch.testing.assert_close(out[i], torch.tensor(expected), atol=1e-6, rtol=0)


def test_causal_mask_helper():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_scale_argument(impl):
    """scale=0 makes every score 0: the output is the mean of the visible values."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 4) * 10, torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    kpm = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    out = IMPLS[impl](q, k, v, key_padding_mask=kpm, scale=0.0)
    torch.testing.assert_close(out[0], v[0].mean(dim=1, keepdim=True).expand(2, 3, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], v[1][:, [0, 1, 3]].mean(dim=1, keepdim=True).expand(2, 3, 4),
                               atol=1e-6, rtol=0)
    # an explicit scale is not ignored: scale=2/sqrt(D) differs from the default
    assert not torch.allclose(IMPLS[impl](q, k, v, scale=2.0 / math.sqrt(4)), IMPLS[impl](q, k, v))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_boolean_and_additive_masks_agree(impl):
    """A boolean mask and the additive mask with -inf at its False entries are the same mask."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keep = torch.rand(4, 6) < 0.6
    keep[:, 2] = True
    additive = torch.zeros(4, 6).masked_fill(~keep, NEG_INF)
    torch.testing.assert_close(IMPLS[impl](q, k, v, attn_mask=keep), IMPLS[impl](q, k, v, attn_mask=additive),
                               atol=1e-6, rtol=0)
    assert not torch.allclose(IMPLS[impl](q, k, v, attn_mask=keep), IMPLS[impl](q, k, v))


# ---------------------------------------------------------------------------------------------
# Rows that can see no key at all.


DEAD_ROW_MASKS = {
    # name: (attn_mask, key_padding_mask, is_causal, tq, tk) with batch 2
    "bool": (torch.tensor([[True, True, False], [False, False, False], [True, False, True]]), None, False, 3, 3),
    "additive": (torch.tensor([[0.0, NEG_INF, 1.0], [NEG_INF] * 3, [NEG_INF, -2.0, 0.5]]), None, False, 3, 3),
    "padding": (None, torch.tensor([[True, False, True], [False, False, False]]), False, 3, 3),
    "causal_tq_gt_tk": (None, None, True, 4, 2),
    "causal_and_padding": (None, torch.tensor([[False, True, True], [True, True, True]]), True, 3, 3),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(DEAD_ROW_MASKS))
def test_fully_masked_rows_give_zeros_without_nan(impl, dtype, kind):
    mask, kpm, causal, tq, tk = DEAD_ROW_MASKS[kind]
    torch.manual_seed(0)
    q = torch.randn(2, 2, tq, 4, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 1, tk, 4, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 1, tk, 4, dtype=dtype, requires_grad=True)
    out = IMPLS[impl](q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=causal)
    _, dead = reference_bias(2, 2, tq, tk, mask, kpm, causal)
    assert dead.any() and not dead.all()  # the case really has dead and live rows
    dead_rows = dead.expand_as(out)
    assert torch.isfinite(out).all()
    assert (out[dead_rows] == 0).all()
    assert (out[~dead_rows].abs() > 0).any()
    out.float().pow(2).sum().backward()
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert torch.isfinite(t.grad).all(), f"{name} has NaN/inf"
    assert (q.grad[dead_rows] == 0).all()  # a dead row's query gets no gradient
    # live rows still agree with torch
    ref = torch_reference(q.detach().float(), k.detach().float(), v.detach().float(), mask, kpm, causal)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.detach().float(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# Dispatch and bad input.


def test_auto_backend_is_sdpa_off_a_gpu():
    q = torch.zeros(1, 2, 3, 64)
    assert auto_backend(q, q) == "sdpa"
    assert not kernel_device(torch.device("cpu"))


@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_kernel_device_needs_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(attn_module, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kernel_device(torch.device("cuda")) is expected
    monkeypatch.setattr(attn_module, "triton_available", lambda: False)  # Triton not installed
    assert not kernel_device(torch.device("cuda"))


def _flash_kernels():
    """Every @triton.jit kernel of kernels/flash_attention.py (a device function is never
    launched, so counting them all counts the launches of whichever forward kernel runs)."""
    import minillm.kernels.flash_attention as fa

    return [f for f in vars(fa).values() if hasattr(f, "pre_run_hooks")]


def _right_padded(lengths, tk):
    return torch.arange(tk)[None, :] < torch.tensor(lengths)[:, None]


# name: (inputs, attention kwargs, what `auto` runs on a GPU of compute capability >= 8.0).
# Inputs: (B, H, Hkv, Tq, Tk, D, dtype). Tq < Tk is a chunk of queries after cached keys.
AUTO_CASES = {
    "causal": ((2, 4, 2, 5, 5, 16, torch.float32), dict(is_causal=True), "triton"),
    "decode step": ((2, 4, 2, 1, 6, 16, torch.float16), dict(is_causal=True), "triton"),
    "right padding with lengths": ((2, 2, 2, 3, 6, 16, torch.float32),
                                   dict(key_padding_mask=_right_padded([6, 4], 6), kv_lens=torch.tensor([6, 4]),
                                        is_causal=True), "triton"),
    "right padding, no lengths": ((2, 2, 2, 4, 4, 16, torch.float32),
                                  dict(key_padding_mask=_right_padded([4, 2], 4)), "sdpa"),
    "left padding": ((2, 2, 2, 4, 4, 16, torch.float32),
                     dict(key_padding_mask=torch.tensor([[True] * 4, [False, False, True, True]])), "sdpa"),
    "holes": ((2, 2, 1, 1, 5, 16, torch.float32),  # a decode step after a right-padded prompt
              dict(key_padding_mask=torch.tensor([[True] * 5, [True, True, False, False, True]]),
                   is_causal=True), "sdpa"),
    "head dim 12": ((1, 2, 2, 3, 3, 12, torch.float32), dict(is_causal=True), "sdpa"),
    "head dim 264": ((1, 1, 1, 2, 2, 264, torch.float32), dict(), "sdpa"),
    "float64": ((1, 2, 2, 3, 3, 16, torch.float64), dict(is_causal=True), "sdpa"),
    "dropout": ((1, 2, 2, 3, 3, 16, torch.float32), dict(dropout_p=0.5), "sdpa"),
    "additive mask (ALiBi)": ((1, 2, 2, 3, 3, 16, torch.float32),
                              dict(attn_mask=-torch.arange(3.0)[None, None, :].expand(2, 3, 3).contiguous(),
                                   is_causal=True), "sdpa"),
    "boolean mask": ((1, 2, 2, 3, 3, 16, torch.float32),
                     dict(attn_mask=torch.tensor([[True, False, True]] * 3)), "sdpa"),
}


@pytest.mark.parametrize("capability", [8, 7])
@pytest.mark.parametrize("case", sorted(AUTO_CASES))
def test_auto_never_raises_and_matches_naive(monkeypatch, case, capability):
    """On a GPU, `auto` runs our kernel only on what it supports and gives everything else to SDPA:
    it never raises where the CPU works. Here a GPU of compute capability 8.0 (or 7.x, which
    gets SDPA throughout) is pretended; the kernel runs under the interpreter, or natively on a
    GPU machine."""
    (b, h, hkv, tq, tk, d, dtype), kw, expected = AUTO_CASES[case]
    if capability < 8:
        expected = "sdpa"
    monkeypatch.setattr(attn_module, "kernel_device", lambda device: capability >= 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE, dtype)
               for shape in ((b, h, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))
    kw = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    assert auto_backend(q, k, kw.get("attn_mask"), kw.get("key_padding_mask"), kw.get("dropout_p", 0.0),
                        kw.get("kv_lens")) == expected
    with launches(*_flash_kernels()) as counts:
        out = attention(q, k, v, backend="auto", **kw)
    assert (sum(counts.values()) > 0) == (expected == "triton"), dict(counts)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    if "dropout_p" in kw:  # random: the two backends draw different dropout masks
        return
    naive_kw = {name: t for name, t in kw.items() if name != "kv_lens"}
    ref = scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                       **{n: t.double() if n == "attn_mask" and t.is_floating_point() else t
                                          for n, t in naive_kw.items()})
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_sdpa_gets_a_small_mask(monkeypatch):
    """The SDPA backend hands torch no (B, H, Tq, Tk) float bias: is_causal where torch's own
    causal mask is ours, a boolean mask without the head dimension for padding, an additive
    bias without the batch dimension for ALiBi; and enable_gqa (torch >= 2.5) instead of copied
    key/value heads when there is no mask."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(dict(mask=attn_mask, k_heads=k.shape[1], **kw))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    b, h, hkv, t, d = 3, 4, 2, 5, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pad = _right_padded([5, 3, 4], t)

    attention(q, k, v, backend="sdpa", is_causal=True)
    assert seen[-1]["mask"] is None and seen[-1]["is_causal"]
    assert seen[-1]["k_heads"] == (hkv if attn_module.SDPA_HAS_GQA else h)
    assert seen[-1].get("enable_gqa", False) == attn_module.SDPA_HAS_GQA

    attention(q[:, :, -1:], k, v, backend="sdpa", is_causal=True)  # a decode step
    assert seen[-1]["mask"] is None and not seen[-1]["is_causal"]  # one query sees every key

    attention(q, k, v, backend="sdpa", is_causal=True, key_padding_mask=pad)
    m = seen[-1]["mask"]
    assert m.dtype == torch.bool and tuple(m.shape) == (b, 1, t, t)

    alibi = -torch.rand(h, t, t)
    attention(q, k, v, backend="sdpa", is_causal=True, attn_mask=alibi)
    m = seen[-1]["mask"]
    assert m.is_floating_point() and m.numel() == h * t * t, tuple(m.shape)  # not expanded to the batch


def _qkv(b=2, h=4, hkv=2, tq=3, tk=5, d=8):
    return torch.randn(b, h, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("shape", [(4, 5), (3, 4), (3,), (2, 1, 1, 3, 5)])
def test_attn_mask_of_wrong_shape(backend, shape):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, backend=backend, attn_mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_attn_mask_with_wrong_batch_dim(backend):
    q, k, v = _qkv(b=2)
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, backend=backend, attn_mask=torch.ones(5, 1, 3, 5, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("shape", [(2, 4), (1, 5), (2, 5, 1), (5,)])
def test_key_padding_mask_of_wrong_shape(backend, shape):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, backend=backend, key_padding_mask=torch.ones(shape, dtype=torch.bool))


def test_kv_heads_must_divide_query_heads():
    q, k, v = _qkv(h=4, hkv=3)
    with pytest.raises(ValueError, match="key/value heads"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="key/value heads"):
        attention(q, k, v, backend="sdpa")


def test_bad_qkv_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        attention(q[0], k, v, backend="naive")
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, v[:, :, :4], backend="naive")
    with pytest.raises(ValueError, match="head dimension"):
        attention(q[..., :4], k, v, backend="sdpa")


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend 'flash'"):
        attention(q, k, v, backend="flash")
