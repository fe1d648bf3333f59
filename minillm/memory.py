"""How much memory a training run needs on each process: the estimate `check_memory` refuses a
run with before anything big is allocated, and README's table of GPT-2 and BERT sizes under DDP
and FSDP2 (`python -m minillm.memory`). Computed from the formula below, not measured.

Per parameter, an AdamW step in float32 keeps the weight (4 bytes), its gradient (4) and two
moments (4 + 4): 16 bytes. Under DDP every process keeps all of them. Under FSDP2 (--fsdp) over
P processes each keeps 16/P bytes a parameter, and while a block runs its whole weights (in the
compute dtype) and, in the backward, its whole float32 gradients are there too: two blocks at a
time (the next one is gathered while this one runs), plus the root unit (embeddings, final norm,
heads), which stays gathered through the step. Under bfloat16 autocast without FSDP, autocast
keeps a bfloat16 copy of each weight through the forward and backward (2 bytes a parameter).

Activations, per token: each block keeps about 8C + 2 x inner values for the backward (the
inputs of its matmuls and norms), in the compute dtype; the naive attention backend also keeps
two T x T matrices per head (the fused ones keep none); the logits, their float32 copy and their
gradient add 3 x vocab float32 values.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch

from .config import PRESETS, ModelConfig

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}  # auto: not resolved yet, float32 bounds it


@dataclass
class Estimate:
    """Bytes on one process at the peak of a training step."""
    states: int  # weights, gradients and AdamW moments this process keeps
    gathered: int  # FSDP2: whole weights and gradients of the units running; DDP under autocast: bf16 weight copies
    activations: int  # what the forward keeps for the backward, and the logits

    @property
    def total(self) -> int:
        return self.states + self.gathered + self.activations


def block_params(c: ModelConfig) -> int:
    """Parameters of one transformer block (attention, MLP, two norms), as config.approx_params counts them."""
    kv = c.kv_heads * c.head_dim
    return c.n_embd * (c.n_embd + 2 * kv) + c.n_embd**2 + c.n_embd * c.inner * (3 if c.activation == "swiglu" else 2) \
        + 4 * c.n_embd


def estimate(config: ModelConfig, batch: int, block: int, processes: int = 1, fsdp: bool = False,
             dtype: str = "float32", n_params: Optional[int] = None) -> Estimate:
    """The peak of one training step on one process: micro-batch `batch` x `block` tokens."""
    c, n = config, n_params or config.approx_params()
    compute = ELEMENT_BYTES[dtype]
    if fsdp:
        states = -(-16 * n // processes)
        root = max(n - c.n_layer * block_params(c), 0)
        gathered = (root + min(2, c.n_layer) * block_params(c)) * (compute + 4)
    else:
        states = 16 * n
        gathered = 2 * n if compute == 2 else 0
    attention = 2 * c.n_head * block if c.attention_backend == "naive" else 0
    per_token = c.n_layer * ((8 * c.n_embd + 2 * c.inner) * compute + attention * compute) + 3 * c.vocab_size * 4
    return Estimate(states, gathered, batch * block * per_token)


def training_bytes(n_params: int, config: ModelConfig, batch: int, block: int) -> int:
    """The float32 one-process estimate, in bytes."""
    return estimate(config, batch, block, n_params=n_params).total


def available_memory(device: torch.device):
    """Bytes free for this run on the device (CUDA: free GPU memory; CPU: MemAvailable), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check


def check_memory(config: ModelConfig, batch: int, block: int, device: torch.device, n_params=None,
                 processes: int = 1, fsdp: bool = False, dtype: str = "auto") -> int:
    """Refuse, before anything big is allocated, a run whose estimated peak does not fit. Several
    processes on the CPU share its memory: the check is on all of them together."""
    est = estimate(config, batch, block, processes, fsdp, dtype, n_params).total
    need = est * (processes if device.type == "cpu" else 1)
    free = available_memory(device)
    if free is not None and need > free:
        n = n_params or config.approx_params()
        hint = "" if fsdp or processes == 1 else ", or --fsdp to shard the training state over the processes"
        raise ValueError(f"this run needs about {need / 2**30:.1f} GiB ({n / 1e6:,.0f}M parameters, batch {batch} "
                         f"x {block} tokens{f', {processes} processes' if processes > 1 else ''}) but {device.type} "
                         f"has {free / 2**30:.1f} GiB free: use a smaller model, --batch-size or --block-size{hint}")
    return need


# The README table: GPT-2 and BERT sizes (vocabularies and contexts of the originals).
TABLE_MODELS = {
    "GPT-2 small": PRESETS["gpt2"], "GPT-2 medium": PRESETS["gpt2-medium"], "GPT-2 large": PRESETS["gpt2-large"],
    "GPT-2 XL": PRESETS["gpt2"].replace(n_layer=48, n_head=25, n_embd=1600),
    "BERT base": PRESETS["bert-base"], "BERT large": PRESETS["bert-base"].replace(n_layer=24, n_head=16, n_embd=1024),
}


def table(batch: int = 8, dtype: str = "bfloat16", processes=(1, 2, 8)) -> str:
    """A markdown table: parameters, training-state bytes per parameter, and the peak per GPU
    under DDP and FSDP2 at each number of processes."""
    head = ["model", "params", "context"] + [f"{s} {p} GPU{'s' if p > 1 else ''}" for s in ("DDP", "FSDP2") for p in processes]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in TABLE_MODELS.items():
        n = c.approx_params()
        cells = [name, f"{n / 1e6:,.0f}M", str(c.block_size)]
        for fsdp in (False, True):
            for p in processes:
                e = estimate(c, batch, c.block_size, p, fsdp, dtype)
                cells.append(f"{e.total / 2**30:.1f} GiB ({(e.states + e.gathered) / n:.1f} B/param)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Estimated peak memory per GPU of training GPT-2 and BERT sizes "
                                            "(computed from minillm.memory's formula, not measured)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per GPU (micro-batch), each a full context")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = p.parse_args(argv)
    print(f"peak per GPU, micro-batch {args.batch_size} x the full context, {args.dtype} autocast, AdamW, "
          f"no activation checkpointing; B/param: weights, gradients, moments (and gathered units) per parameter")
    print(table(args.batch_size, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
