"""Where a run executes: the device and the processes (DDP), precision, seeding, and MFU.

Under torchrun every process calls `setup_distributed()`; rank 0 writes the files. The
helpers at the end keep every decision that changes a loop's control flow identical on every
rank (a rank that stops alone leaves the others waiting in a collective).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The model the loop calls: DDP-wrapped when there are several processes."""
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(model: nn.Module, sync: bool):
    """DDP averages gradients on the last micro-batch of a step only (no_sync before it)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Summed over the processes, in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def finish_distributed(world: int) -> None:
    """Leave together: a process that tears down while another still talks to it dies in gloo."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def can_compile(device: torch.device, log=print) -> bool:
    """torch.compile on the CPU builds C++ and needs a compiler: without one, say so and run eagerly."""
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        log(f"note: --compile needs a C++ compiler on the CPU ({os.environ.get('CXX', 'g++')} was not found): running eagerly")
        return False
    return True


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@contextlib.contextmanager
def evaluating(model: nn.Module, device: torch.device, dtype: str):
    """Evaluation mode (no dropout), no gradients, the run's autocast; training mode again after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            yield
    finally:
        model.train(was_training)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def measure_matmul_peak(device: torch.device, dtype: str, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in this dtype on this device: the denominator of MFU."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, init) untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]


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


def approx_params(config) -> int:
    """Parameters of a transformer by the usual count: per block 4C^2 for attention and 2 or 3
    x C x inner for the MLP (3 with SwiGLU's gate), plus the token embeddings."""
    c = config
    mlp = (3 if c.activation == "swiglu" else 2) * c.n_embd * c.inner
    return c.n_layer * (4 * c.n_embd**2 + mlp) + c.vocab_size * c.n_embd


def training_bytes(n_params: int, config, batch: int, block: int) -> int:
    """A rough peak for a float32 AdamW step: weights, gradients and two moments (16 bytes a
    parameter), the activations each block keeps for backward (about 8C + 2 x inner + 2 x heads x T
    floats a token), and the logits with their float copy and gradient."""
    c = config
    per_token = c.n_layer * (8 * c.n_embd + 2 * c.inner + 2 * c.n_head * block) + 3 * c.vocab_size
    return 16 * n_params + 4 * batch * block * per_token


def check_memory(config, batch: int, block: int, device: torch.device, n_params=None) -> int:
    """Refuse, before anything big is allocated, a run whose estimated peak does not fit."""
    if n_params is None:  # before the model exists: the usual count (building even an empty one takes a second)
        n_params = approx_params(config)
    need, free = training_bytes(n_params, config, batch, block), available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"this run needs about {need / 2**30:.1f} GiB ({n_params / 1e6:,.0f}M parameters, batch {batch} "
                         f"x {block} tokens) but {device.type} has {free / 2**30:.1f} GiB free: use a smaller model, "
                         "--batch-size or --block-size")
    return need


def flops_per_token(model: nn.Module, block_size: int) -> float:
    """6N for the weights (forward + backward) plus the attention matmuls (Kaplan et al.; PaLM)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    n -= model.tok_emb.weight.numel()  # the embedding lookup is not a matmul
    if c.tie_embeddings:
        n += model.tok_emb.weight.numel()  # ... but the tied LM head is
    return 6 * n + 12 * c.n_layer * c.n_embd * block_size
