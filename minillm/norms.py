"""LayerNorm and RMSNorm, statistics in float32 whatever the input dtype."""
from __future__ import annotations

import torch
import torch.nn as nn

from .kernel_dispatch import use_triton


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, use_kernels: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.use_kernels, x):
            from minillm.kernels.layer_norm import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps)
        xf = x.float()
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as in the paper and torch
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring (Zhang & Sennrich)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False, use_kernels: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.use_kernels, x):
            from minillm.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, bias=self.bias)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, use_kernels: bool = False) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias=bias, use_kernels=use_kernels)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, use_kernels=use_kernels)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
