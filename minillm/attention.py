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


def check_masks(q, k, attn_mask=None, key_padding_mask=None) -> None:
    """attn_mask must broadcast to (B, H, Tq, Tk); key_padding_mask must be (B, Tk)."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    if attn_mask is not None:
        target = (b, h, tq, tk)
        try:
            fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Tq, Tk) = {target}")
    if key_padding_mask is not None and key_padding_mask.shape != (b, tk):
        raise ValueError(
            f"key_padding_mask must have shape (batch, key_len) = ({b}, {tk}), "
            f"got {tuple(key_padding_mask.shape)}"
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
    check_masks(q, k, attn_mask, key_padding_mask)
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        else:
            bias = attn_mask.to(q.dtype)
    if key_padding_mask is not None:
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


# torch 2.5 added enable_gqa: SDPA then reads each key/value head for its group of query heads
# instead of us copying them (repeat_kv).
SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p):
    """PyTorch's fused attention, with our conventions (bottom-right causal, zeros for dead rows).

    The mask handed to SDPA stays as small as the inputs allow, since SDPA keeps it for the
    backward of every layer: none with is_causal where SDPA's own (top-left) causal mask is ours,
    else a boolean (B or 1, 1, Tq, Tk) mask; only an additive attn_mask (ALiBi) makes a float
    bias, of the attn_mask's shape ((H, Tq, Tk), broadcast over the batch) unless a padding mask
    adds the batch dimension."""
    check_masks(q, k, attn_mask, key_padding_mask)
    n_rep = q.shape[1] // k.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    if attn_mask is None and key_padding_mask is None and (not is_causal or tq == tk or tq == 1):
        # Nothing to mask, or a causal mask SDPA draws itself: top-left and bottom-right alignment
        # agree on square scores, and a single query (a decode step) sees every key.
        # enable_gqa is taken only by SDPA's flash and math kernels (torch's docs, 2.5 to 2.13), so it is
        # used here, where no mask rules the flash kernel out; with a mask the heads are repeated.
        gqa = n_rep > 1 and SDPA_HAS_GQA
        if n_rep > 1 and not gqa:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        kw = dict(enable_gqa=True) if gqa else {}
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal and tq == tk > 1, dropout_p=dropout_p, scale=scale, **kw
        )
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    keep = None  # bool, True where a query may see a key
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    if is_causal:
        c = causal_mask(tq, tk, q.device)  # (Tq, Tk)
        keep = c if keep is None else keep & c
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
        attn_mask = None
    if attn_mask is None:
        # A row that sees no key would come out NaN: let it see every key, then zero it.
        dead = ~keep.any(dim=-1, keepdim=True)
        mask = keep | dead
    else:
        bias = attn_mask.to(q.dtype)
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        dead = (bias == float("-inf")).all(dim=-1, keepdim=True)
        mask = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(dead, 0.0)


def right_padded_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int32 count of real keys in each row of a (B, Tk) key_padding_mask that must be
    right-padded (each row: real keys, then padding), the form our kernel takes padding in.

    Proving the mask right-padded reads it on the host (a sync, and a graph break under
    torch.compile), so a model calls this once per forward and hands the lengths to every layer."""
    lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)
    prefix = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, key_padding_mask.bool()):
        raise ValueError(
            "the triton attention backend takes padding as lengths, so each row of the attention mask "
            "must be 1s (real tokens) then 0s (padding); use attention_backend 'sdpa' or 'auto' for "
            "padding elsewhere (left padding, holes)"
        )
    return lengths


def _triton_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, kv_lens=None):
    from minillm.kernels.flash_attention import flash_attention

    if attn_mask is not None:
        raise ValueError("the triton attention backend does not take arbitrary masks (e.g. ALiBi); use 'sdpa'")
    if dropout_p > 0.0:
        raise ValueError("the triton attention backend does not implement attention dropout; use 'sdpa'")
    check_masks(q, k, None, key_padding_mask)
    if key_padding_mask is not None and kv_lens is None:
        kv_lens = right_padded_lengths(key_padding_mask)
    return flash_attention(q, k, v, causal=is_causal, softmax_scale=scale, kv_lens=kv_lens)


def kernel_device(device: torch.device) -> bool:
    """Whether `auto` runs our kernel on this device: a CUDA GPU of compute capability 8.0 or
    newer (its launch configurations are set for sm_80 and sm_90; older GPUs lack bf16 tensor
    cores), with Triton installed."""
    return (device.type == "cuda" and triton_available()
            and torch.cuda.get_device_capability(device)[0] >= 8)


def triton_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Inputs our flash-attention kernel runs: fp16/bf16/fp32 q, k, v of one dtype and a head
    dim that is a multiple of 8 up to 256."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return False
    return d % 8 == 0 and 8 <= d <= 256


def auto_backend(q, k, attn_mask=None, key_padding_mask=None, dropout_p=0.0, kv_lens=None) -> str:
    """`auto`'s choice: our Triton kernel where it runs these inputs, else SDPA, so that `auto`
    never raises where another backend would run. The kernel takes no additive mask (ALiBi) and
    no dropout, and takes padding only as lengths (kv_lens): a bare padding mask may have left
    padding or holes, and proving it right-padded would cost a host sync."""
    takes = (
        kernel_device(q.device)
        and attn_mask is None
        and dropout_p == 0.0
        and (key_padding_mask is None or kv_lens is not None)
        and triton_takes(q, k)
    )
    return "triton" if takes else "sdpa"


def attention(q, k, v, backend="auto", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, dropout_p=0.0, kv_lens=None):
    """Dispatch to one of the three implementations; all share the conventions above.

    kv_lens: optional (B,) real-key counts, given with a key_padding_mask known to be
    right-padded (see right_padded_lengths): the Triton kernel reads the padding from them."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "naive":  # checks its own inputs
        return scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p)
    _check_qkv(q, k, v)
    if backend == "auto":
        backend = auto_backend(q, k, attn_mask, key_padding_mask, dropout_p, kv_lens)
    if backend == "triton":
        return _triton_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, kv_lens)
    return _sdpa_backend(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Buffers hold `max_len` positions; `pos` counts the tokens stored so far. Each layer writes
    its new keys/values with `update`; the model calls `advance` after all layers have seen the
    step. With dtype None a layer's buffers are allocated at its first update, in the dtype its
    keys come in: the dtype the model computes in (autocast's under autocast), since attention
    needs q, k and v of one dtype.
    """

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype=None, device=None):
        self.shape = (batch, n_kv_head, max_len, head_dim)
        self.dtype, self.device = dtype, device
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} + {t} do not fit")
        if self.k[layer] is None:
            dtype, device = self.dtype or k.dtype, self.device or k.device
            self.k[layer] = torch.zeros(self.shape, dtype=dtype, device=device)
            self.v[layer] = torch.zeros(self.shape, dtype=dtype, device=device)
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
                 backend="auto", layer_idx=0, use_kernels=False, scale=None, head_dim=None):
        super().__init__()
        if n_embd % n_head and head_dim is None:
            raise ValueError(f"n_head={n_head} does not divide n_embd={n_embd}")
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} does not divide n_head={n_head}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim or n_embd // n_head
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout
        self.backend = backend
        self.layer_idx = layer_idx
        self.use_kernels = use_kernels
        self.scale = scale

    def forward(self, x, is_causal=False, key_padding_mask=None, attn_bias=None, rotary=None,
                kv_cache: Optional[KVCache] = None, kv_lens=None):
        """x: (B, T, C). key_padding_mask: (B, Tk), True at real keys, over every key attended
        to: with a KV cache the cached positions and then the T new ones. kv_lens: (B,) real-key
        counts when that mask is right-padded (see `attention`). rotary: (cos, sin), each
        (T, D/2), already sliced to the positions of x. attn_bias: additive (H, Tq, Tk) or
        (B, H, Tq, Tk) scores bias (ALiBi)."""
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
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache made with a fixed dtype: attention needs one
        y = attention(
            q, k, v,
            backend=self.backend,
            attn_mask=attn_bias,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
            kv_lens=kv_lens,
        )
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))
