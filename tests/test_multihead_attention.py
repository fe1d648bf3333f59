"""MultiHeadAttention against torch.nn.MultiheadAttention with the same weights.

Our fused `qkv` Linear is laid out [q | k | v] like torch's in_proj_weight, and our `proj` is
torch's out_proj. Key padding masks are opposite conventions: ours is True at real tokens,
torch's key_padding_mask is True at padding. Causal masking is torch's boolean attn_mask with
True above the diagonal (= not allowed).

Tolerance: float32, atol=rtol=1e-5 on outputs and on the gradients w.r.t. the input and the
projection weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm.attention import KVCache, MultiHeadAttention

BACKENDS = ["naive", "sdpa"]


def torch_twin(ours: MultiHeadAttention, bias: bool) -> nn.MultiheadAttention:
    e = ours.proj.in_features
    theirs = nn.MultiheadAttention(e, ours.n_head, bias=bias, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.out_proj.weight.copy_(ours.proj.weight)
        if bias:
            theirs.in_proj_bias.copy_(ours.qkv.bias)
            theirs.out_proj.bias.copy_(ours.proj.bias)
    return theirs


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 8),
    n_head=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 4, 8]),
    bias=st.booleans(),
    causal=st.booleans(),
    padding=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_torch_multihead_attention(backend, b, t, n_head, head_dim, bias, causal, padding, seed):
    torch.manual_seed(seed)
    e = n_head * head_dim
    ours = MultiHeadAttention(e, n_head, bias=bias, backend=backend)
    if bias:  # nn.Linear's default bias init is random already; make sure it is not zero
        assert ours.qkv.bias.abs().sum() > 0
    theirs = torch_twin(ours, bias)
    x = torch.randn(b, t, e)
    # torch.nn.MultiheadAttention gives NaN for a query that sees no key; keep key 0 real
    real = torch.rand(b, t) < 0.6
    real[:, 0] = True
    kpm = real if padding else None

    x1 = x.clone().requires_grad_(True)
    y1 = ours(x1, is_causal=causal, key_padding_mask=kpm)
    x2 = x.clone().requires_grad_(True)
    attn_mask = torch.ones(t, t, dtype=torch.bool).triu(1) if causal else None
    y2, _ = theirs(x2, x2, x2, key_padding_mask=None if kpm is None else ~kpm, attn_mask=attn_mask,
                   need_weights=False)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.qkv.weight.grad, theirs.in_proj_weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.proj.weight.grad, theirs.out_proj.weight.grad, atol=1e-5, rtol=1e-5)


def gqa_reference(mha: MultiHeadAttention, x, causal, kpm=None):
    """Grouped-query attention from the weights: slice the fused projection, repeat each
    key/value head for its group of query heads, and use torch's attention."""
    b, t, e = x.shape
    h, hkv, d = mha.n_head, mha.n_kv_head, mha.head_dim
    w, bias = mha.qkv.weight, mha.qkv.bias
    q = F.linear(x, w[: h * d], bias[: h * d]).view(b, t, h, d).transpose(1, 2)
    k = F.linear(x, w[h * d : (h + hkv) * d], bias[h * d : (h + hkv) * d]).view(b, t, hkv, d).transpose(1, 2)
    v = F.linear(x, w[(h + hkv) * d :], bias[(h + hkv) * d :]).view(b, t, hkv, d).transpose(1, 2)
    k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    allowed = torch.ones(t, t, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return mha.proj(y.transpose(1, 2).reshape(b, t, e))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_attention(backend, n_head, n_kv_head):
    torch.manual_seed(0)
    e = n_head * 4
    mha = MultiHeadAttention(e, n_head, n_kv_head, backend=backend)
    assert mha.qkv.out_features == (n_head + 2 * n_kv_head) * 4
    x = torch.randn(2, 6, e, requires_grad=True)
    kpm = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    y = mha(x, is_causal=True, key_padding_mask=kpm)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = gqa_reference(mha, x_ref, causal=True, kpm=kpm)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_matches_full_causal_pass(backend, n_kv_head):
    """Feeding the sequence in chunks through a KV cache gives the full causal pass's outputs."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, n_kv_head, backend=backend).eval()
    x = torch.randn(2, 7, 32)
    full = mha(x, is_causal=True)
    cache = KVCache(n_layer=1, batch=2, n_kv_head=n_kv_head, max_len=10, head_dim=8)
    outs, start = [], 0
    for n in (3, 1, 2, 1):
        outs.append(mha(x[:, start : start + n], is_causal=True, kv_cache=cache))
        cache.advance(n)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 7


def test_kv_cache_overflow():
    cache = KVCache(n_layer=1, batch=1, n_kv_head=2, max_len=4, head_dim=8)
    mha = MultiHeadAttention(16, 2)
    mha(torch.randn(1, 3, 16), is_causal=True, kv_cache=cache)
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        mha(torch.randn(1, 2, 16), is_causal=True, kv_cache=cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_not_ignored(backend):
    """Sanity: the key padding mask changes what real tokens see (so the parity test can fail)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, backend=backend)
    x = torch.randn(1, 5, 16)
    kpm = torch.tensor([[True, True, True, False, False]])
    y_masked = mha(x, key_padding_mask=kpm)
    torch.testing.assert_close(y_masked[:, :3], mha(x[:, :3])[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_masked[:, :3], mha(x)[:, :3], atol=1e-4)


def test_head_count_must_divide_width():
    with pytest.raises(ValueError, match="n_head=3 does not divide n_embd=16"):
        MultiHeadAttention(16, 3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="n_kv_head=3 does not divide n_head=4"):
        MultiHeadAttention(16, 4, n_kv_head=3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend 'cuda'"):
        MultiHeadAttention(16, 4, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask_of_wrong_shape(backend):
    mha = MultiHeadAttention(16, 4, backend=backend)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
