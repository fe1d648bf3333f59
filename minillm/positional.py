"""Positional encodings: learned absolute, sinusoidal, rotary (RoPE) and ALiBi.

Learned and sinusoidal encodings are added to the token embeddings; RoPE rotates queries
and keys inside attention; ALiBi adds a distance penalty to the attention scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .kernel_dispatch import use_triton


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table from "Attention Is All You Need":
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table.float()


class SinusoidalPositionalEmbedding(nn.Module):
    def __init__(self, n_pos: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_pos, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Embedding):
    """One trained vector per position (GPT-2, BERT)."""


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for rotary position embeddings (Su et al., RoFormer).

    Uses the "rotate half" layout: the head dimension is split into two halves x1, x2 and
    pair (x1[i], x2[i]) is rotated by angle p * base^(-2i/D).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start: int, length: int):
        """cos, sin: (length, head_dim / 2) for positions start .. start + length - 1."""
        if start + length > self.cos.shape[0]:
            raise ValueError(f"position {start + length - 1} is beyond the RoPE table of {self.cos.shape[0]}")
        return self.cos[start : start + length], self.sin[start : start + length]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def apply_rotary(q, k, cos, sin, use_kernels: bool = True):
    """Rotate queries and keys; on GPU through the fused Triton kernel when available."""
    if use_triton(use_kernels, q, k):
        from minillm.kernels.rotary import apply_rotary as rotary_kernel

        return rotary_kernel(q, k, cos, sin)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes from Press et al. (ALiBi): a geometric sequence starting at 2^(-8/n).
    For head counts that are not powers of two, the paper's recipe interleaves the slopes
    of the next power of two."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, tq: int, tk: int, causal: bool = True) -> torch.Tensor:
    """(H, Tq, Tk) additive scores bias: -slope * distance between query and key positions.
    Query i sits at absolute position i + (Tk - Tq), as in a KV-cached decode."""
    qpos = torch.arange(tq, device=slopes.device)[:, None] + (tk - tq)
    kpos = torch.arange(tk, device=slopes.device)[None, :]
    dist = (qpos - kpos).abs() if not causal else (qpos - kpos).clamp(min=0)
    return -slopes[:, None, None] * dist[None].float()
