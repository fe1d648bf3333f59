"""BERT: a bidirectional encoder with post-LN blocks (Devlin et al., 2019).

Heads: masked-LM (dense -> GELU -> LayerNorm -> tied decoder), the pooler (tanh dense on
[CLS]) and a sequence classifier on the pooled (or mean) representation. A BERT for masked-LM
pretraining alone is built without the pooler (config.pooler=False): a weight that gets no
gradient breaks DistributedDataParallel; add_classifier adds it when finetuning needs it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .norms import make_norm
from .transformer import Transformer, init_weights, lm_loss


class BERT(Transformer):
    head_name, head_bias = "classifier", True

    def __init__(self, config: ModelConfig):
        if config.arch != "bert":
            raise ValueError(f"BERT needs config.arch='bert', got {config.arch!r}")
        super().__init__(config)
        c = config
        self.type_emb = nn.Embedding(c.type_vocab_size, c.n_embd) if c.type_vocab_size else None
        self.emb_norm = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias)
        self.pooler = nn.Linear(c.n_embd, c.n_embd) if c.pooler else None
        self.mlm_dense = nn.Linear(c.n_embd, c.n_embd)
        self.mlm_norm = make_norm(c.norm, c.n_embd, c.norm_eps, bias=c.bias)
        self.mlm_decoder = nn.Linear(c.n_embd, c.vocab_size, bias=True)
        self.classifier = self.new_head(c.num_labels)
        self.cls_dropout = nn.Dropout(c.dropout)
        init_weights(self, c)
        if c.tie_embeddings:
            self.mlm_decoder.weight = self.tok_emb.weight

    def encode(self, idx, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        """idx: (B, T) ids; attention_mask: (B, T), 1 at real tokens, 0 at padding (any place).
        Returns the last hidden states (B, T, C), and the list of every layer's output
        (embeddings first) when output_hidden_states."""
        self.check_input(idx)
        key_padding_mask = self.padding_mask(idx, attention_mask)
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
        if self.pooler is None:
            raise ValueError("this BERT was built without a pooler (config.pooler=false, as for masked-LM "
                             "pretraining): add_classifier(num_labels, 'cls') adds one, or pool the 'mean'")
        return torch.tanh(self.pooler(h[:, 0]))

    def mlm_hidden(self, h):
        """The MLM head's transform: dense, the activation, the norm."""
        h = self.mlm_dense(h)
        act = self.config.activation
        if act == "relu":
            h = F.relu(h)
        elif act == "gelu":
            h = F.gelu(h)
        else:  # gelu_tanh, and swiglu, whose gated form needs two matrices the head does not have
            h = F.gelu(h, approximate="tanh")
        return self.mlm_norm(h)

    def forward(self, idx, targets=None, attention_mask=None, token_type_ids=None):
        """Masked-LM. targets: (B, T) with the original ids at masked positions and -100 elsewhere.
        Returns (logits (B, T, V), None) without targets, (None, mean loss over the masked
        positions) with them. Every position goes through the head and the unmasked ones are
        ignored by the loss (as Hugging Face does): picking the masked rows out would give a
        tensor whose size only the data knows, a host sync each step."""
        h = self.encode(idx, attention_mask, token_type_ids)
        if targets is None:
            return self.mlm_decoder(self.mlm_hidden(h)), None
        hs = self.mlm_hidden(h.reshape(-1, h.shape[-1]))
        _, loss = lm_loss(hs, self.mlm_decoder.weight, targets.reshape(-1), self.config, bias=self.mlm_decoder.bias)
        return None, loss

    def sentence_vector(self, idx, attention_mask=None, token_type_ids=None):
        h = self.encode(idx, attention_mask, token_type_ids)
        return self.cls_dropout(self.pool(h, attention_mask))

    def add_classifier(self, num_labels: int, pooling=None) -> bool:
        """As Transformer.add_classifier; "cls" pooling on a BERT built without a pooler (one
        pretrained on masked LM alone) adds a fresh one, initialised like the model."""
        if num_labels and (pooling or self.config.classifier_pooling) == "cls" and self.pooler is None:
            w = self.tok_emb.weight
            self.pooler = nn.Linear(self.config.n_embd, self.config.n_embd, device=w.device, dtype=w.dtype)
            nn.init.normal_(self.pooler.weight, std=self.config.init_std)
            nn.init.zeros_(self.pooler.bias)
            self.config = self.config.replace(pooler=True)
        return super().add_classifier(num_labels, pooling)

    def classification_head(self) -> list[nn.Module]:
        """The classifier, and the pooler when it makes the sentence vector ("cls" pooling)."""
        if self.classifier is None:
            return []
        return [self.classifier] + ([self.pooler] if self.config.classifier_pooling == "cls" else [])
