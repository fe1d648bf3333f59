"""The position-wise feed-forward network: GELU (exact or tanh), ReLU, or SwiGLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernel_dispatch import use_triton


class MLP(nn.Module):
    """fc -> activation -> proj. For SwiGLU (Shazeer 2020) fc produces [gate | up] and the
    activation is silu(gate) * up, so the hidden width `inner` is what proj sees."""

    def __init__(self, n_embd, inner, activation="gelu_tanh", bias=True, dropout=0.0, use_kernels=False):
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "relu", "swiglu"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.fc = nn.Linear(n_embd, inner * (2 if activation == "swiglu" else 1), bias=bias)
        self.proj = nn.Linear(inner, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.use_kernels = use_kernels

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            if use_triton(self.use_kernels, h):
                from minillm.kernels.swiglu import swiglu

                return swiglu(gate, up)
            return F.silu(gate) * up
        if self.activation == "gelu_tanh":
            if use_triton(self.use_kernels, h):
                from minillm.kernels.gelu import gelu_tanh

                return gelu_tanh(h)
            return F.gelu(h, approximate="tanh")
        if self.activation == "gelu":
            return F.gelu(h)
        return F.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))

