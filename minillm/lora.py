"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021).

A LoRA layer computes  y = x W^T + b + (dropout(x) A^T B^T) * alpha / r,  with W and b frozen
and only A (r x in) and B (out x r) trained. B starts at zero, so before training the model is
exactly the pretrained one. Merging folds the update into the weight, W' = W + B A * alpha / r,
and leaves a plain nn.Linear: no cost at inference.

    replaced = apply_lora(model, rank=8, alpha=16, targets=("qkv", "proj", "fc"))
    ...train...
    save_file(lora_state_dict(model), "adapters.safetensors")   # adapters (+ trainable head) only
    merge_lora(model)

A LoRALinear keeps the base layer's parameter names (`weight`, `bias`) and adds `lora_A`,
`lora_B`, so a full checkpoint of the base model loads into a LoRA model and vice versa.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("qkv", "proj", "fc")


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the given layer's weight and bias) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's, not a new one
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    """A target names the end of a module path: "qkv", "proj" (attention and MLP), "attn.proj"."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers of its transformer
    blocks in LoRALinear. Heads are left for the caller to unfreeze (model.classification_head()).
    Returns the names of the wrapped layers."""
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = getattr(model, "blocks", model)
    prefix = "blocks." if hasattr(model, "blocks") else ""
    candidates = [(n, m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear) and n]
    unmatched = [t for t in targets if not any(_matches(n, (t,)) for n, _ in candidates)]
    if unmatched:
        names = sorted({n.split(".")[-1] for n, _ in candidates} | {".".join(n.split(".")[-2:]) for n, _ in candidates})
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match no linear layer of the model's "
                         f"blocks (choose from: {', '.join(names)})")
    replaced = []
    for name, module in candidates:
        if isinstance(module, LoRALinear) or not _matches(name, targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
        replaced.append(prefix + name)
    return replaced


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put a plain nn.Linear back. Returns the count."""
    count = 0
    for name, module in lora_layers(model):
        module.weight += module.delta_weight().to(module.weight.dtype)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        count += 1
    return count


def lora_state_dict(model: nn.Module, weights: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """What a LoRA run needs to save: the adapters and every other trainable parameter (the head),
    taken from `weights` when given (e.g. gathered from FSDP's shards), else from the model."""
    keep = [(n, p) for n, p in model.named_parameters() if p.requires_grad or ".lora_" in n]
    return {n: (p.detach() if weights is None else weights[n]) for n, p in keep}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
