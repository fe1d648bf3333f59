"""A transformer block: attention and MLP, each in a residual branch with a norm.

pre-LN (GPT-2):  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
post-LN (BERT):  x = norm1(x + attn(x));  x = norm2(x + mlp(x))
"""
from __future__ import annotations

import torch.nn as nn

from .attention import MultiHeadAttention
from .config import ModelConfig
from .mlp import MLP
from .norms import make_norm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        self.norm1 = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.attn = MultiHeadAttention(
            c.n_embd, c.n_head, c.n_kv_head, bias=c.bias, dropout=c.dropout, attn_dropout=c.attn_dropout,
            backend=c.attention_backend, layer_idx=layer_idx, use_kernels=c.use_kernels,
        )
        self.norm2 = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.mlp = MLP(c.n_embd, c.inner, c.activation, bias=c.bias, dropout=c.dropout, use_kernels=c.use_kernels)

    def forward(self, x, **attn_kwargs):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), **attn_kwargs)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_kwargs))
        return self.norm2(x + self.mlp(x))
