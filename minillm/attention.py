"""Scaled dot-product attention written out by hand, and multi-head attention with a KV cache.

Conventions used throughout minillm:
- q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention).
- Causal masks are aligned bottom-right: query i sits at absolute position i + (Tk - Tq),
  which is what decoding against a KV cache needs (a 1-token query sees every cached key).
- Boolean masks say True where attention is allowed; float masks are added to the scores.
- A query row that may attend to no key at all returns zeros, never NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BACKENDS
from .kernel_dispatch import triton_available
from .positional import apply_rotary


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j, aligned bottom-right."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return j <= i


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q, k, v of shape (B, H, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dimension"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{k.shape[1]} key/value heads do not divide {q.shape[1]} query heads (grouped-query attention)"
        )


def build_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
) -> Optional[torch.Tensor]:
    """Combine causal, key-padding and explicit masks into one additive float mask
    broadcastable to (B, H, Tq, Tk), or None when nothing is masked."""
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    bias = None
    if attn_mask is not None:
        target = (b, q.shape[1], tq, tk)
        try:
            fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Tq, Tk) = {target}")
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        else:
            bias = attn_mask.to(q.dtype)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, tk):
            raise ValueError(
                f"key_padding_mask must have shape (batch, key_len) = ({b}, {tk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        pad = torch.zeros((b, 1, 1, tk), dtype=q.dtype, device=q.device).masked_fill(
            ~key_padding_mask.bool()[:, None, None, :], float("-inf")
        )
        bias = pad if bias is None else bias + pad
    if is_causal:
        c = torch.zeros((tq, tk), dtype=q.dtype, device=q.device).masked_fill(
            ~causal_mask(tq, tk, q.device), float("-inf")
        )
        bias = c if bias is None else bias + c
    return bias


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, step by step.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). attn_mask: bool (True = keep) or additive float,
    broadcastable to (B, H, Tq, Tk). key_padding_mask: (B, Tk) bool, True at real tokens.
    """
    _check_qkv(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    bias = build_mask(q, k, attn_mask, key_padding_mask, is_causal)
    if bias is not None:
        scores = scores + bias
        # A row with every key masked has max -inf; softmax would give 0/0 = NaN there.
        dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
        scores = scores.masked_fill(dead, 0.0)
    # Softmax in float32 even for half inputs: the exponent sum is where precision is lost.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if bias is not None:
        probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _sdpa_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p):
    """PyTorch's fused attention, with our conventions (bottom-right causal, zeros for dead rows)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    tq, tk = q.shape[2], k.shape[2]
    if attn_mask is None and key_padding_mask is None and (not is_causal or tq == tk):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal and tq > 1, dropout_p=dropout_p, scale=scale
        )
    bias = build_mask(q, k, attn_mask, key_padding_mask, is_causal)
    bias = bias.expand(q.shape[0], q.shape[1], tq, tk)
    dead = bias.amax(dim=-1, keepdim=True) == float("-inf")
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(dead, 0.0), dropout_p=dropout_p, scale=scale
    )
    return out.masked_fill(dead, 0.0)


def _triton_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p):
    from kernels.flash_attention import flash_attention

    if attn_mask is not None:
        raise ValueError("the triton attention backend does not take arbitrary masks (e.g. ALiBi); use 'sdpa'")
    if dropout_p > 0.0:
        raise ValueError("the triton attention backend does not implement attention dropout; use 'sdpa'")
    kv_lens = None
    if key_padding_mask is not None:
        kv_lens = key_padding_mask.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(key_padding_mask.shape[1], device=q.device)[None, :] < kv_lens[:, None]
        if not torch.equal(prefix, key_padding_mask.bool()):
            raise ValueError("the triton attention backend needs right-padded key_padding_masks")
    return flash_attention(q, k, v, causal=is_causal, softmax_scale=scale, kv_lens=kv_lens)


def triton_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Inputs our flash-attention kernel runs: fp16/bf16/fp32 q, k, v of one dtype, a head dim
    that is a multiple of 8 up to 256, on a GPU of compute capability 8.0 or newer."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return False
    if d % 8 or not 8 <= d <= 256:
        return False
    return q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] >= 8


def resolve_backend(name: str, device: torch.device, needs_mask: bool = False, kernel_takes: bool = True) -> str:
    """`auto`: our Triton kernel on CUDA where it takes the inputs (no mask of any kind, no
    dropout: a padding mask would need a host sync to prove it right-padded), else SDPA, so
    `auto` never raises where another backend would run."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {list(BACKENDS)}")
    if name != "auto":
        return name
    if device.type == "cuda" and not needs_mask and kernel_takes and triton_available():
        return "triton"
    return "sdpa"


def attention(q, k, v, backend="auto", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, dropout_p=0.0):
    """Dispatch to one of the three implementations; all share the conventions above."""
    masked = attn_mask is not None or key_padding_mask is not None or dropout_p > 0
    backend = resolve_backend(backend, q.device, needs_mask=masked, kernel_takes=backend != "auto" or triton_takes(q, k))
    if backend == "naive":  # checks its own inputs
        return scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p)
    _check_qkv(q, k, v)
    fn = _sdpa_backend if backend == "sdpa" else _triton_backend
    return fn(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Buffers are allocated once for `max_len` positions; `pos` counts the tokens stored so far.
    Each layer writes its new keys/values with `update`; the model calls `advance` after all
    layers have seen the step.
    """

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype=torch.float32, device=None):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} + {t} do not fit")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]

    def advance(self, t: int) -> None:
        self.pos += t


class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-query) self-attention with one fused QKV projection.

    x: (B, T, C). The projection's output is laid out [q | k | v], matching
    torch.nn.MultiheadAttention's in_proj_weight when n_kv_head == n_head. scale multiplies the
    scores q.k (None: 1/sqrt(head_dim)).
    """

    def __init__(self, n_embd, n_head, n_kv_head=None, bias=True, dropout=0.0, attn_dropout=0.0,
                 backend="auto", layer_idx=0, use_kernels=False, scale=None):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_head={n_head} does not divide n_embd={n_embd}")
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} does not divide n_head={n_head}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout
        self.backend = backend
        self.layer_idx = layer_idx
        self.use_kernels = use_kernels
        self.scale = scale

    def forward(self, x, is_causal=False, key_padding_mask=None, attn_bias=None, rotary=None,
                kv_cache: Optional[KVCache] = None):
        """rotary: (cos, sin), each (T, D/2), already sliced to the positions of x.
        attn_bias: additive (H, Tq, Tk) or (B, H, Tq, Tk) scores bias (ALiBi)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary, use_kernels=self.use_kernels)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attention(
            q, k, v,
            backend=self.backend,
            attn_mask=attn_bias,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.proj(y))
