"""GPT: a decoder-only transformer trained as a causal language model (Radford et al., 2019)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import KVCache
from .block import Block
from .config import ModelConfig
from .fused_ops import fused_op
from .norms import make_norm
from .positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)


def lm_loss(hidden, weight, targets, chunked: bool, bias=None, ignore_index=-100):
    """Cross-entropy of next-token logits. hidden: (N, C); weight: (V, C); targets: (N,).
    `chunked` walks the tokens in chunks so the (N, V) logits never exist at once."""
    if chunked:
        from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index)
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


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


class Transformer(nn.Module):
    """What GPT and BERT share: token embeddings, positions and a stack of blocks."""

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

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, without the position table by default (as GPT-2's paper counts them)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and isinstance(self.pos_emb, nn.Embedding):
            n -= self.pos_emb.weight.numel()
        return n

    def check_input(self, idx: torch.Tensor, start: int = 0) -> None:
        if idx.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, time), got {tuple(idx.shape)}")
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {start + idx.shape[1]} tokens is longer than the model's context "
                f"(block_size={self.config.block_size})"
            )

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            pos = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = x + self.pos_emb(pos)
        return x

    def run_blocks(self, x, causal, key_padding_mask=None, kv_cache: Optional[KVCache] = None, start=0,
                   all_hidden=None):
        t = x.shape[1]
        tk = start + t
        kw = dict(is_causal=causal, key_padding_mask=key_padding_mask, kv_cache=kv_cache)
        if self.rotary is not None:
            kw["rotary"] = self.rotary(start, t)
        if self.config.pos_encoding == "alibi":
            kw["attn_bias"] = alibi_bias(self.alibi_slopes, t, tk, causal=causal).to(x.dtype)
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


class GPT(Transformer):
    """Decoder-only causal LM with a tied language-model head, and an optional
    classification head that reads the last real token."""

    def __init__(self, config: ModelConfig):
        if config.arch != "gpt":
            raise ValueError(f"GPT needs config.arch='gpt', got {config.arch!r}")
        super().__init__(config)
        c = config
        self.norm_f = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.score = nn.Linear(c.n_embd, c.num_labels, bias=False) if c.num_labels else None
        init_weights(self, c)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def hidden_states(self, idx, attention_mask=None, kv_cache: Optional[KVCache] = None):
        """Final (normed) hidden states, (B, T, C). attention_mask: (B, T) with 1 at real tokens
        (padding must be on the right for causal models)."""
        start = kv_cache.pos if kv_cache is not None else 0
        self.check_input(idx, start)
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != idx.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal the ids' {tuple(idx.shape)}"
                )
            key_padding_mask = attention_mask.bool()
        x = self.drop(self.embed(idx, start))
        x = self.run_blocks(x, causal=True, key_padding_mask=key_padding_mask, kv_cache=kv_cache, start=start)
        return self.norm_f(x)

    def forward(self, idx, targets=None, attention_mask=None, kv_cache: Optional[KVCache] = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None); targets (B, T) use -100
        to skip positions. With config.chunked_ce and targets, logits are not built (None)."""
        h = self.hidden_states(idx, attention_mask, kv_cache)
        if targets is None:
            return self.lm_head(h), None
        if self.config.chunked_ce:
            loss = lm_loss(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), chunked=True)
            return None, loss
        logits = self.lm_head(h)
        flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        fused = fused_op("cross_entropy", "cross_entropy", flat, enabled=self.config.use_kernels)
        if fused is not None:  # Triton: loss and dlogits in one pass, no softmax tensor
            return logits, fused(flat, t, ignore_index=-100)
        return logits, F.cross_entropy(flat.float(), t, ignore_index=-100)

    def classify(self, idx, attention_mask=None, labels=None):
        """Sequence classification from the hidden state of the last real token."""
        if self.score is None:
            raise ValueError("this GPT has no classification head: build it with config.num_labels > 0")
        h = self.hidden_states(idx, attention_mask)
        if attention_mask is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        else:
            last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
        logits = self.score(h[torch.arange(idx.shape[0], device=idx.device), last])
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss

    def new_kv_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        c = self.config
        p = self.tok_emb.weight
        return KVCache(c.n_layer, batch, c.kv_heads, max_len or c.block_size, c.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T). Uses the KV cache while the
        sequence fits the context; beyond it, slides a window and recomputes."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        block = self.config.block_size
        was_training = self.training
        self.eval()
        cache = self.new_kv_cache(idx.shape[0])
        logits, _ = self(idx[:, -block:], kv_cache=cache)  # a longer prompt is seen through its last window
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
            if cache.pos < block:
                logits, _ = self(nxt, kv_cache=cache)
            else:  # context full: recompute over the last block_size tokens
                logits, _ = self(idx[:, -block:])
        self.train(was_training)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) -> (B, 1) token ids. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
