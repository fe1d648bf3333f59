"""BERT: a bidirectional encoder with post-LN blocks (Devlin et al., 2019).

Heads: masked-LM (dense -> GELU -> LayerNorm -> tied decoder), the pooler (tanh dense on
[CLS]) and a sequence classifier on the pooled (or mean) representation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .gpt import Transformer, init_weights, lm_loss
from .norms import make_norm


class BERT(Transformer):
    def __init__(self, config: ModelConfig):
        if config.arch != "bert":
            raise ValueError(f"BERT needs config.arch='bert', got {config.arch!r}")
        super().__init__(config)
        c = config
        self.type_emb = nn.Embedding(c.type_vocab_size, c.n_embd) if c.type_vocab_size else None
        self.emb_norm = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias)
        self.pooler = nn.Linear(c.n_embd, c.n_embd)
        self.mlm_dense = nn.Linear(c.n_embd, c.n_embd)
        self.mlm_norm = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias)
        self.mlm_decoder = nn.Linear(c.n_embd, c.vocab_size, bias=True)
        self.classifier = nn.Linear(c.n_embd, c.num_labels) if c.num_labels else None
        self.cls_dropout = nn.Dropout(c.dropout)
        init_weights(self, c)
        if c.tie_embeddings:
            self.mlm_decoder.weight = self.tok_emb.weight

    def encode(self, idx, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        """idx: (B, T) ids; attention_mask: (B, T), 1 at real tokens, 0 at padding (any place).
        Returns the last hidden states (B, T, C), and the list of every layer's output
        (embeddings first) when output_hidden_states."""
        self.check_input(idx)
        x = self.embed(idx)
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(idx)
            elif token_type_ids.shape != idx.shape:
                raise ValueError(
                    f"token_type_ids shape {tuple(token_type_ids.shape)} must equal the ids' {tuple(idx.shape)}"
                )
            x = x + self.type_emb(token_type_ids)
        x = self.drop(self.emb_norm(x))
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != idx.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal the ids' {tuple(idx.shape)}"
                )
            key_padding_mask = attention_mask.bool()
        hidden = [x] if output_hidden_states else None
        x = self.run_blocks(x, causal=False, key_padding_mask=key_padding_mask, all_hidden=hidden)
        return (x, hidden) if output_hidden_states else x

    def pool(self, h, attention_mask=None):
        """The sentence vector: tanh(dense(h[:, 0])) for "cls", the masked mean for "mean"."""
        if self.config.classifier_pooling == "mean":
            if attention_mask is None:
                return h.mean(dim=1)
            m = attention_mask.to(h.dtype)[..., None]
            return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.tanh(self.pooler(h[:, 0]))

    def mlm_hidden(self, h):
        act = self.config.activation
        h = self.mlm_dense(h)
        h = F.gelu(h, approximate="tanh") if act in ("gelu_tanh", "swiglu") else F.relu(h) if act == "relu" else F.gelu(h)
        return self.mlm_norm(h)

    def forward(self, idx, targets=None, attention_mask=None, token_type_ids=None):
        """Masked-LM. targets: (B, T) with the original ids at masked positions and -100 elsewhere.
        Only the positions with a target go through the vocabulary projection during training."""
        h = self.encode(idx, attention_mask, token_type_ids)
        if targets is None:
            return self.mlm_decoder(self.mlm_hidden(h)), None
        sel = targets.reshape(-1) != -100
        hs = self.mlm_hidden(h.reshape(-1, h.shape[-1])[sel])
        t = targets.reshape(-1)[sel]
        if t.numel() == 0:  # no masked token in the batch: a zero that still has a graph
            return None, h.sum() * 0.0
        loss = lm_loss(hs, self.mlm_decoder.weight, t, self.config.chunked_ce, bias=self.mlm_decoder.bias)
        return None, loss

    def classify(self, idx, attention_mask=None, labels=None, token_type_ids=None):
        if self.classifier is None:
            raise ValueError("this BERT has no classification head: build it with config.num_labels > 0")
        h = self.encode(idx, attention_mask, token_type_ids)
        logits = self.classifier(self.cls_dropout(self.pool(h, attention_mask)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss
