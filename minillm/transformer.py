"""The trunk GPT and BERT share: blocks, the embeddings and block stack, the classification
head, GPT-2's initialisation and the language-model loss.

A block is attention and an MLP, each in a residual branch with a norm:

    pre-LN (GPT-2):  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    post-LN (BERT):  x = norm1(x + attn(x));  x = norm2(x + mlp(x))

A classification head maps one vector per sequence to num_labels logits. What the vector is
belongs to each model (`sentence_vector`): GPT's last real token, BERT's pooled [CLS] or mean.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, MultiHeadAttention, right_padded_lengths
from .config import ModelConfig
from .kernel_dispatch import use_triton
from .mlp import MLP
from .norms import make_norm
from .positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)


class Block(nn.Module):
    """One pre-LN or post-LN block (config.norm_position), as the formulas above."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        scale = c.attn_scale  # None: attention's own 1/sqrt(head_dim)
        if c.attn_scale_by_layer:
            scale = (scale if scale is not None else c.head_dim**-0.5) / (layer_idx + 1)
        self.pre_norm = c.norm_position == "pre"
        self.norm1 = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.attn = MultiHeadAttention(
            c.n_embd, c.n_head, c.n_kv_head, bias=c.bias, dropout=c.dropout, attn_dropout=c.attn_dropout,
            backend=c.attention_backend, layer_idx=layer_idx, use_kernels=c.use_kernels, scale=scale,
            head_dim=c.head_dim,
        )
        self.norm2 = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.mlp = MLP(c.n_embd, c.inner, c.activation, bias=c.bias, dropout=c.dropout, use_kernels=c.use_kernels)

    def forward(self, x, **attn_kwargs):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), **attn_kwargs)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_kwargs))
        return self.norm2(x + self.mlp(x))


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2's initialisation: N(0, 0.02) everywhere, and the projections that write into the
    residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = config.init_std
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                std = config.init_std / math.sqrt(2 * config.n_layer)
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith("weight"):  # norms
            nn.init.ones_(p)


def lm_loss(hidden, weight, targets, config: ModelConfig, bias=None, ignore_index: int = -100):
    """(logits or None, loss): the mean cross-entropy of the logits hidden @ weight^T + bias over
    the tokens with a target, 0 when none has one (a masked-LM batch with no masked token).
    hidden: (N, C); weight: (V, C); targets: (N,), ignore_index where nothing is predicted.

    The mean is the summed loss over the token count kept on the device: reading the count on
    the host (or selecting the predicted rows, whose number is data-dependent) would stall the
    GPU every step.

    config.chunked_ce walks the tokens in chunks, so the (N, V) logits never exist (None is
    returned for them). Otherwise the logits are built, and with config.use_kernels the Triton
    cross-entropy computes the loss and its gradient in one pass, with no softmax tensor."""
    count = (targets != ignore_index).sum().clamp(min=1)
    if config.chunked_ce:
        from minillm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        total = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                           reduction="sum")
        return None, total / count
    logits = F.linear(hidden, weight, bias)
    if use_triton(config.use_kernels, logits):
        from minillm.kernels.cross_entropy import cross_entropy

        return logits, cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / count
    return logits, F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / count


class Transformer(nn.Module):
    """What GPT and BERT share: token embeddings, positions, a stack of blocks, and the
    classification head, kept in the attribute `head_name` (with a bias where `head_bias`)."""

    head_name: str
    head_bias: bool

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        if c.pos_encoding == "learned":
            self.pos_emb = LearnedPositionalEmbedding(c.block_size, c.n_embd)
        elif c.pos_encoding == "sinusoidal":
            self.pos_emb = SinusoidalPositionalEmbedding(c.block_size, c.n_embd)
        else:
            self.pos_emb = None
        self.rotary = RotaryEmbedding(c.head_dim, c.block_size, c.rope_base) if c.pos_encoding == "rope" else None
        if c.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(c.n_head), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c, i) for i in range(c.n_layer)])
        self.gradient_checkpointing = False

    # -- input ------------------------------------------------------------------------------------

    def check_input(self, idx: torch.Tensor, start: int = 0) -> None:
        if idx.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, time), got {tuple(idx.shape)}")
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {start + idx.shape[1]} tokens is longer than the model's context "
                f"(block_size={self.config.block_size})"
            )

    @staticmethod
    def padding_mask(idx: torch.Tensor, attention_mask: Optional[torch.Tensor], start: int = 0) -> Optional[torch.Tensor]:
        """attention_mask, 1 at real tokens, as the boolean key-padding mask attention takes. It
        covers every key the new tokens attend to: (B, start + T) after `start` cached tokens,
        as Hugging Face's models take it."""
        if attention_mask is None:
            return None
        expected = (idx.shape[0], start + idx.shape[1])
        if tuple(attention_mask.shape) != expected:
            keys = f"{start} cached + {idx.shape[1]} new tokens" if start else "tokens"
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must be (batch, {keys}) = {expected}")
        return attention_mask.bool()

    # -- the trunk --------------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            pos = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = x + self.pos_emb(pos)
        return x

    def run_blocks(self, x, causal, key_padding_mask=None, kv_cache: Optional[KVCache] = None, start=0,
                   all_hidden=None):
        t = x.shape[1]
        kv_lens = None
        if key_padding_mask is not None and self.config.attention_backend == "triton":
            # The kernel takes padding as lengths; proving the mask right-padded is a host sync,
            # paid here once per forward rather than in every layer. (`auto` keeps padded
            # inputs on SDPA, with no sync at all.)
            kv_lens = right_padded_lengths(key_padding_mask)
        kw = dict(is_causal=causal, key_padding_mask=key_padding_mask, kv_cache=kv_cache, kv_lens=kv_lens)
        if self.rotary is not None:
            kw["rotary"] = self.rotary(start, t)
        if self.config.pos_encoding == "alibi":
            kw["attn_bias"] = alibi_bias(self.alibi_slopes, t, start + t, causal=causal).to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, use_reentrant=False, **kw)
            else:
                x = block(x, **kw)
            if all_hidden is not None:
                all_hidden.append(x)
        if kv_cache is not None:
            kv_cache.advance(t)
        return x

    # -- classification ---------------------------------------------------------------------------

    def new_head(self, num_labels: int) -> Optional[nn.Linear]:
        """A fresh (n_embd -> num_labels) layer beside the model's weights, or None for 0 labels."""
        if not num_labels:
            return None
        w = self.tok_emb.weight
        return nn.Linear(self.config.n_embd, num_labels, bias=self.head_bias, device=w.device, dtype=w.dtype)

    def add_classifier(self, num_labels: int, pooling: Optional[str] = None) -> bool:
        """Give the model a head for num_labels classes, initialised N(0, init_std); a head of that
        size already there is kept. pooling: BERT's sentence vector ("cls" or "mean"); a GPT always
        reads its last real token and ignores it. Returns True when a fresh head was made."""
        c = self.config
        fresh = c.num_labels != num_labels or getattr(self, self.head_name) is None
        changes = {"num_labels": num_labels} if fresh else {}
        if pooling is not None and c.arch == "bert":
            changes["classifier_pooling"] = pooling
        if changes:
            self.config = c.replace(**changes)
        if fresh:
            head = self.new_head(num_labels)
            nn.init.normal_(head.weight, std=c.init_std)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
            setattr(self, self.head_name, head)
        return fresh

    def classification_head(self) -> list[nn.Module]:
        """The modules that must train when only the head does (or LoRA's adapters with it); [] without a head."""
        head = getattr(self, self.head_name)
        return [head] if head is not None else []

    def sentence_vector(self, idx, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(B, n_embd): what the classification head reads."""
        raise NotImplementedError

    def classify(self, idx, attention_mask=None, token_type_ids=None, labels=None):
        """Sequence classification: (logits (B, num_labels), mean cross-entropy against labels or None).
        attention_mask: (B, T), 1 at real tokens; token_type_ids: BERT's segments (a GPT has none)."""
        head = getattr(self, self.head_name)
        if head is None:
            raise ValueError(f"this {self.config.arch.upper()} has no classification head: build it with "
                             "config.num_labels > 0 or add_classifier(num_labels)")
        logits = head(self.sentence_vector(idx, attention_mask, token_type_ids))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss
