"""Pruning: zero the smallest weights, or remove whole heads, MLP neurons and blocks.

    # unstructured: the smallest 50% of the blocks' linear weights by magnitude become zeros
    python -m minillm.prune --ckpt out/sst2 --sparsity 0.5 --out out/sst2-sparse50

    # structured, then a recovery finetune: a third of the heads and 40% of the MLP neurons of every
    # block removed by importance, measured on the first batches of --train (finetune.py's flags)
    python finetune.py --init out/sst2 --train train.tsv --eval dev.tsv --prune-heads 0.33 --prune-mlp 0.4 \\
        --time-budget 120 --out out/sst2-pruned

    # a smaller student from a larger checkpoint: 3 of its 6 blocks, evenly spaced (finetune.py)
    python finetune.py --init $MINILM --student-layers 3 --teacher out/sst2 ...

Unstructured pruning keeps the shapes: the model is as large and as fast on dense kernels, only
sparser (torch.nn.utils.prune computes the mask, which is then made permanent). Structured pruning
removes rows and columns, so the model that comes out is a smaller dense one and really runs
faster. Every block keeps the same number of heads and neurons (the config stays one shape); which
ones each block keeps is its own choice, by importance.

Importance (Molchanov et al. 2019; Michel et al. 2019, "Are Sixteen Heads Really Better than
One?"): put a gate g = 1 on a head's output (or on a neuron's activation) and ask how much the loss
moves with it, |dL/dg|. The head's output reaches the residual stream only through its columns of
the output projection W, so dL/dg = sum(W[:, head] * dL/dW[:, head]): weight times gradient,
summed over the head's columns. The magnitudes are averaged over calibration batches.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from .cli import run_main
from .distributed import all_reduce_sum


# -- unstructured: magnitude ----------------------------------------------------------------------


def block_linears(model) -> list[tuple[str, nn.Linear]]:
    """The linear layers of the blocks: where the work and the weights are."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def prune_unstructured(model, sparsity: float, scope: str = "global") -> dict:
    """Zero the `sparsity` share of the blocks' linear weights with the smallest magnitude: over
    all of them together ("global": layers that matter less lose more) or layer by layer
    ("layer"). The masks are then made permanent: plain weights with zeros. Returns sparsity_report."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"--scope must be global or layer, got {scope!r}")
    layers = [m for _, m in block_linears(model)]
    if scope == "global":
        tprune.global_unstructured([(m, "weight") for m in layers], tprune.L1Unstructured, amount=sparsity)
    else:
        for m in layers:
            tprune.l1_unstructured(m, "weight", amount=sparsity)
    for m in layers:
        tprune.remove(m, "weight")  # weight_orig * weight_mask becomes the weight; the hooks go
    return sparsity_report(model)


def sparsity_report(model) -> dict:
    """Share of exact zeros in each block linear weight, in the blocks together and in the model."""
    counts = {n: (int((m.weight == 0).sum()), m.weight.numel()) for n, m in block_linears(model)}
    zeros, total = sum(z for z, _ in counts.values()), sum(size for _, size in counts.values())
    every = sum(int((p == 0).sum()) for p in model.parameters())
    return {"blocks": zeros / max(total, 1), "model": every / sum(p.numel() for p in model.parameters()),
            "layers": {n: z / size for n, (z, size) in counts.items()}}


# -- structured: heads, neurons, blocks -----------------------------------------------------------


def check_structured(config) -> None:
    """What head pruning cannot do, refused before any work."""
    if config.pos_encoding == "alibi":
        raise ValueError("--prune-heads: ALiBi gives each head a slope by its index; removing heads would change them")
    if config.kv_heads != config.n_head:
        raise ValueError("--prune-heads: grouped-query attention shares K/V between heads; prune whole groups instead "
                         "(not supported)")


def importance(model, loss_of: Callable, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (n_layer, n_head), neurons (n_layer, inner)): mean |dL/dgate| over the batches, from
    one backward each (see the module's docstring). loss_of(batch) -> scalar loss. Under torchrun
    each process holds its part of every batch: the gradients are averaged over the processes
    before their magnitude is taken, which gives the scores of the whole batch on every process."""
    blocks = list(model.blocks)
    heads = torch.zeros(len(blocks), blocks[0].attn.n_head, dtype=torch.float64)
    neurons = torch.zeros(len(blocks), blocks[0].mlp.proj.in_features, dtype=torch.float64)
    outs = [p for b in blocks for p in (b.attn.proj.weight, b.mlp.proj.weight)]
    was = [p.requires_grad for p in outs]
    for p in outs:
        p.requires_grad_(True)
    training, n = model.training, 0
    model.eval()  # no dropout: the scores of the weights as they are
    world = all_reduce_sum(torch.ones(1, dtype=torch.float64))
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        h = torch.stack([(b.attn.proj.weight * b.attn.proj.weight.grad).double().cpu()
                         .view(-1, b.attn.n_head, b.attn.head_dim).sum((0, 2)) for b in blocks])
        u = torch.stack([(b.mlp.proj.weight * b.mlp.proj.weight.grad).double().cpu().sum(0) for b in blocks])
        heads += (all_reduce_sum(h) / world).abs()  # the whole batch's dL/dgate, then its magnitude
        neurons += (all_reduce_sum(u) / world).abs()
        n += 1
    model.zero_grad(set_to_none=True)
    for p, r in zip(outs, was):
        p.requires_grad_(r)
    model.train(training)
    return heads / max(n, 1), neurons / max(n, 1)


def _sliced(layer: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new linear layer holding the given rows (outputs) and columns (inputs) of `layer`."""
    w = layer.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach()[rows] if rows is not None else layer.bias.detach())
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def keep_heads(attn, keep: torch.Tensor) -> None:
    """Keep the heads `keep` (sorted indices) of a MultiHeadAttention: their rows of q, k and v in the
    fused projection, their columns of the output projection."""
    h, d = attn.n_head, attn.head_dim
    per_head = (keep[:, None] * d + torch.arange(d)).flatten()  # the kept heads' rows within q (or k, or v)
    attn.qkv = _sliced(attn.qkv, rows=torch.cat([per_head, h * d + per_head, 2 * h * d + per_head]))
    attn.proj = _sliced(attn.proj, cols=per_head)
    attn.n_head = attn.n_kv_head = len(keep)


def keep_neurons(mlp, keep: torch.Tensor) -> None:
    """Keep the hidden neurons `keep` of an MLP: their rows of fc (both halves under SwiGLU, gate and
    up), their columns of proj."""
    inner = mlp.proj.in_features
    rows = torch.cat([keep, inner + keep]) if mlp.activation == "swiglu" else keep
    mlp.fc = _sliced(mlp.fc, rows=rows)
    mlp.proj = _sliced(mlp.proj, cols=keep)


def prune_structured(model, heads_frac: float, mlp_frac: float, head_scores: torch.Tensor,
                     neuron_scores: torch.Tensor) -> dict:
    """Remove, in place, the heads_frac least important heads and the mlp_frac least important MLP
    neurons of every block (at least one of each stays); model.config follows. Returns what went."""
    for name, frac in (("--prune-heads", heads_frac), ("--prune-mlp", mlp_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    c = model.config
    if heads_frac:
        check_structured(c)
    before = sum(p.numel() for p in model.blocks.parameters())
    n_heads = max(1, c.n_head - round(heads_frac * c.n_head))
    n_inner = max(1, c.inner - round(mlp_frac * c.inner))
    kept = {"heads": [], "neurons": []}
    for i, b in enumerate(model.blocks):
        heads = torch.sort(torch.topk(head_scores[i], n_heads).indices).values
        neurons = torch.sort(torch.topk(neuron_scores[i], n_inner).indices).values
        if n_heads < c.n_head:
            keep_heads(b.attn, heads)
        if n_inner < c.inner:
            keep_neurons(b.mlp, neurons)
        kept["heads"].append(heads.tolist())
        kept["neurons"].append(len(neurons))
    head_size = c.head_dim if n_heads * c.head_dim != c.n_embd else None
    model.config = c.replace(n_head=n_heads, n_kv_head=None if c.n_kv_head is None else n_heads,
                             head_size=head_size, n_inner=n_inner)
    after = sum(p.numel() for p in model.blocks.parameters())
    return {"heads": f"{c.n_head} -> {n_heads}", "inner": f"{c.inner} -> {n_inner}", "kept_heads": kept["heads"],
            "block_parameters": [before, after], "removed_share": 1 - after / before}


def keep_blocks(model, n: int) -> list[int]:
    """Keep n of the model's blocks, evenly spaced and always the last one (for 6 -> 3: blocks 1, 3, 5):
    the start of a student distilled from the full model (DistilBERT keeps one block in two).
    Returns the kept indices."""
    total = len(model.blocks)
    if not 0 < n <= total:
        raise ValueError(f"--student-layers {n}: the model has {total} blocks")
    if model.config.attn_scale_by_layer and n < total:
        raise ValueError("--student-layers: this model scales attention by the block's index (attn_scale_by_layer)")
    kept = [round((i + 1) * total / n) - 1 for i in range(n)]
    model.blocks = nn.ModuleList(model.blocks[i] for i in kept)
    for new_index, b in enumerate(model.blocks):
        b.attn.layer_idx = new_index  # its slot in a KV cache
    model.config = model.config.replace(n_layer=n)
    return kept


# -- the command: unstructured pruning of a checkpoint ---------------------------------------------


def main(argv=None) -> int:
    from .checkpoint import CKPT, read_config, save_checkpoint, trained_checkpoint
    from .pretrained import load_finetuned

    p = argparse.ArgumentParser(description="Magnitude (unstructured) pruning of a minillm checkpoint's blocks.")
    p.add_argument("--ckpt", required=True, help="a train.py or finetune.py output folder or checkpoint folder")
    p.add_argument("--sparsity", type=float, required=True, help="share of the blocks' linear weights set to zero")
    p.add_argument("--scope", choices=["global", "layer"], default="global",
                   help="global: the smallest weights of all blocks together; layer: the same share in each layer")
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint (<out>/checkpoint)")
    args = p.parse_args(argv)
    ckpt = trained_checkpoint(args.ckpt)
    if ckpt is None:
        raise ValueError(f"{args.ckpt}: no minillm checkpoint here (expected model.safetensors and config.json)")
    if os.path.exists(os.path.join(args.out, CKPT)):
        raise ValueError(f"--out {args.out}: already holds a checkpoint; choose another folder")
    cfg = read_config(ckpt)
    if cfg.get("quantized"):
        raise ValueError(f"{ckpt}: a quantised copy; prune the float checkpoint")
    if (cfg.get("finetune") or {}).get("method") == "lora" and not (cfg.get("finetune") or {}).get("merged"):
        raise ValueError(f"{ckpt}: LoRA adapters only; prune the merged model (finetune.py --merge)")
    model, tokenizer, cfg = load_finetuned(ckpt)
    report = prune_unstructured(model, args.sparsity, args.scope)
    extra = {k: v for k, v in cfg.items() if k != "model"}
    path = save_checkpoint(args.out, model, model.config, tokenizer,
                           extra_config={**extra, "pruned": {"sparsity": args.sparsity, "scope": args.scope}})
    worst = sorted(report["layers"].items(), key=lambda kv: -kv[1])
    print(f"{report['blocks']:.1%} of the blocks' linear weights are zero ({report['model']:.1%} of the model's "
          f"parameters); most pruned: {', '.join(f'{n} {s:.0%}' for n, s in worst[:3])}")
    print(f"wrote {path} (dense weights with zeros: as large on disk, as fast on dense kernels)")
    return 0


if __name__ == "__main__":
    run_main(main, "minillm.prune")
