"""GPT: a decoder-only transformer trained as a causal language model (Radford et al., 2019)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .attention import KVCache
from .config import ModelConfig
from .norms import make_norm
from .transformer import Transformer, init_weights, lm_loss


class GPT(Transformer):
    """Decoder-only causal LM with a tied language-model head, and an optional
    classification head that reads the last real token."""

    head_name, head_bias = "score", False

    def __init__(self, config: ModelConfig):
        if config.arch != "gpt":
            raise ValueError(f"GPT needs config.arch='gpt', got {config.arch!r}")
        super().__init__(config)
        c = config
        self.norm_f = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias, use_kernels=c.use_kernels)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.score = self.new_head(c.num_labels)
        init_weights(self, c)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def hidden_states(self, idx, attention_mask=None, kv_cache: Optional[KVCache] = None):
        """Final (normed) hidden states, (B, T, C). attention_mask: 1 at real tokens, 0 at padding,
        over every position attended to: (B, T), or (B, start + T) after `start` tokens in the
        KV cache. Padding on the right is what the triton backend takes; the others take any."""
        start = kv_cache.pos if kv_cache is not None else 0
        self.check_input(idx, start)
        key_padding_mask = self.padding_mask(idx, attention_mask, start)
        x = self.drop(self.embed(idx, start))
        x = self.run_blocks(x, causal=True, key_padding_mask=key_padding_mask, kv_cache=kv_cache, start=start)
        return self.norm_f(x)

    def forward(self, idx, targets=None, attention_mask=None, kv_cache: Optional[KVCache] = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None); targets (B, T) use -100
        to skip positions. With config.chunked_ce and targets, logits are not built (None)."""
        h = self.hidden_states(idx, attention_mask, kv_cache)
        if targets is None:
            return self.lm_head(h), None
        logits, loss = lm_loss(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), self.config)
        return (logits.view(*h.shape[:2], -1) if logits is not None else None), loss

    def sentence_vector(self, idx, attention_mask=None, token_type_ids=None):
        """The hidden state of the last real token: causal attention has let it read the whole text."""
        h = self.hidden_states(idx, attention_mask)
        if attention_mask is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        else:
            last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
        return h[torch.arange(idx.shape[0], device=idx.device), last]

    def new_kv_cache(self, batch: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        """dtype None: the dtype the layers compute in, autocast's under autocast (see KVCache)."""
        c = self.config
        return KVCache(c.n_layer, batch, c.kv_heads, max_len or c.block_size, c.head_dim,
                       dtype=dtype, device=device or self.tok_emb.weight.device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T). Uses the KV cache while the
        sequence fits the context; beyond it, slides a window and recomputes."""
        if not 0 <= temperature < math.inf:  # nan fails this too
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        if idx.dim() != 2 or idx.shape[1] == 0:  # a longer prompt than the context is fine: see below
            raise ValueError(f"the prompt must be (batch, time) token ids with at least one token, "
                             f"got shape {tuple(idx.shape)}")
        block = self.config.block_size
        was_training = self.training
        self.eval()
        cache = self.new_kv_cache(idx.shape[0])
        logits, _ = self(idx[:, -block:], kv_cache=cache)  # a longer prompt is seen through its last window
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            idx = torch.cat([idx, nxt], dim=1)
            if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                break  # (no forward for a token that will not be sampled)
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
