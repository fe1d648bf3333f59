"""Several processes under torchrun: PyTorch's DistributedDataParallel (DDP) or fully sharded
data parallelism (FSDP2, `fully_shard`), and what keeps the processes in step.

    setup_distributed   this process's rank, the world size and its device; joins the process group
    shard_model         --fsdp: each block, then the rest of the model, sharded over the processes
    whole_model         under FSDP, the weights gathered into an ordinary model on rank 0
    wrap_ddp            otherwise: the model the loop calls, DDP-wrapped when there are several processes
    grad_sync           gradients are reduced on the last micro-batch of a step only
    my_part, my_batches this process's part of a global batch; its evaluation batches
    all_reduce_sum, collective_any, broadcast_object, gather_objects
    full_weights        the whole model's weights on rank 0 (gathered from the shards under FSDP)
    save_sharded, load_sharded   weights and optimizer through torch.distributed.checkpoint
    finish_distributed, exit_process

The rules. Every process draws the same global batch and keeps its part, so N processes at
batch B train exactly as one process at batch N x B. A decision that changes the control flow
(stop, skip, a bad weight) is taken together, in a collective. Rank 0 alone writes files, except
the shards of a sharded checkpoint, which every process writes into the folder rank 0 made.
Evaluation is split over the processes by whole batches and gathered: the metrics are those of
one process, to the bit.

DDP keeps a whole copy of the weights, gradients and AdamW moments on each process; FSDP2 keeps
1/N of each and all-gathers one block's weights just before it runs (README: "Several GPUs").
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .device import DTYPES, resolve_device


def setup_distributed(spec: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for --device spec. Under torchrun each process takes the GPU
    of its LOCAL_RANK and joins the group: nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(spec)
    if world > 1 and device.type == "cuda":
        if spec not in ("auto", "cuda"):
            raise ValueError(f"--device {spec}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                             "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        device = resolve_device(f"cuda:{local}")
    if world > 1 and device.type == "mps":
        raise ValueError("--device mps: torch.distributed has no MPS backend; run one process on MPS")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined.append(True)
    return rank, world, device


_joined: list = []  # not empty once this process has joined a process group


def exit_process(code: int) -> None:
    """Exit with `code`. A process that has been in a process group leaves without running C++
    static destructors: after the group is destroyed they abort now and then ("terminate called
    without an active exception": one CI run of train.py under torchrun; test_accumulation.py's
    scripts saw it about one exit in 10), which turns a finished run into a failed one. Python's exit handlers (the --out lock) still run; every file is closed."""
    if not _joined:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish_distributed() -> None:
    """Leave together: a process that tears down while another still talks to it dies in gloo."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_per_process(seed: int) -> None:
    """Under torchrun every process seeded alike builds the same model; before training, ranks
    other than 0 move to their own stream, so dropout masks differ from process to process."""
    rank, world = rank_world()
    if rank > 0:
        torch.manual_seed(seed + rank)


# ---------------------------------------------------------------------------------------------
# The model each process trains


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise ValueError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.6 or newer); this is torch "
                         f"{torch.__version__}") from None
    return FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard has made `model` an FSDP2 module."""
    return any(t.__name__ == "FSDPModule" for t in type(model).__mro__)


def shard_model(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """FSDP2 in place: each transformer block is one unit (its weights all-gathered just before it
    runs, freed after; its gradients reduce-scattered), the embeddings, final norm and heads the
    root unit. Each parameter becomes a DTensor holding 1/N of its rows on `device`. Under
    --dtype bfloat16/float16 the gathered weights are cast to it for compute, and gradients are
    reduced in float32. The model may arrive on the CPU: each unit moves to `device` as it is sharded."""
    _, MixedPrecisionPolicy, fully_shard, register_forward = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--fsdp runs on CUDA GPUs (nccl) or the CPU (gloo), not on {device.type}")
    if not dist.is_initialized():  # one process: a group of one, which holds every shard
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        _joined.append(True)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == "float32" else DTYPES[dtype], reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # GPT returns its logits as a view; FSDP2 warns that an in-place op on a view would skip a
    # hook. Nothing here modifies a model's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if hasattr(model, "classify"):  # finetune.py's entry point besides forward: it uses the root's weights too
        register_forward(model, "classify")
    return model


def wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The model the loop calls: DDP-wrapped when there are several processes (an FSDP2 model
    reduces its own gradients, also inside a wrapper such as finetune.py's Logits)."""
    if world == 1 or any(is_sharded(m) for m in model.modules()):
        return model
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not beside them (4 bytes a parameter less)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool):
    """Gradients are averaged over the processes on the last micro-batch of a step only: DDP's
    no_sync before it, FSDP2's set_requires_gradient_sync."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


# ---------------------------------------------------------------------------------------------
# Collectives (each a no-op in a single process)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Summed over the processes, in place."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def collective_any(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on any."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Splitting the work


def my_part(idx: np.ndarray) -> np.ndarray:
    """This process's contiguous part of a global batch of example indices (parts differ in size
    by one at most; LengthBatches makes every batch at least one example per process)."""
    rank, world = rank_world()
    return idx if world == 1 else np.array_split(idx, world)[rank]


def my_batches(n: int, split: bool = True) -> list[tuple[int, bool]]:
    """The evaluation batches 0..n-1 this process runs, as (index, keep): every world-th one
    from its rank. Every process runs the same number (under FSDP each forward all-gathers
    weights with the others): one with a batch fewer runs its last again and drops the result.
    split=False: all of them, kept (one process evaluates alone)."""
    rank, world = rank_world() if split else (0, 1)
    mine = list(range(rank, n, world))
    rounds = -(-n // world)
    return [(i, True) for i in mine] + [((mine or [0])[-1], False)] * (rounds - len(mine))


# ---------------------------------------------------------------------------------------------
# Weights and checkpoints


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (the tied LM head): saved once."""
    first = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - first


def full_weights(model: nn.Module) -> Optional[dict]:
    """The whole model's weights, tied ones once. Under FSDP a collective (every process calls
    it) that gathers the shards onto rank 0's CPU; other ranks get None."""
    tied = tied_names(model)
    if not is_sharded(model):
        return {k: v for k, v in model.state_dict().items() if k not in tied}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in full.items() if k not in tied} if rank_world()[0] == 0 else None


def whole_model(model: nn.Module, build) -> Optional[nn.Module]:
    """A model rank 0 can run alone (sampling, export): the model itself, or under FSDP a fresh
    `build()` holding the weights gathered from the shards (a collective; None on other ranks)."""
    if not is_sharded(model):
        return model
    weights = full_weights(model)
    if weights is None:
        return None
    whole = build()
    missing, unexpected = whole.load_state_dict(weights, strict=False)
    if set(missing) - tied_names(whole) or unexpected:  # only the tied head may be absent: it is the embedding
        raise RuntimeError(f"whole_model: the gathered weights do not fit the model built (missing {missing}, "
                           f"unexpected {unexpected})")
    return whole.train(model.training)


def load_full_weights(model: nn.Module, tensors: dict) -> None:
    """Whole weights (every process has them) into a sharded model: each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def _state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": moments}


def save_sharded(folder: str, model: nn.Module, optimizer) -> None:
    """torch.distributed.checkpoint: every process writes its shards of the weights and the
    optimizer moments into `folder` (a collective), with a plan that lets any number of
    processes, sharded or not, load them back."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=folder)


def load_sharded(folder: str, model: nn.Module, optimizer) -> None:
    """What save_sharded wrote, into this run's model and optimizer (sharded over any number of
    processes, or whole in one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load({"model": state["model"]}, checkpoint_id=folder)  # every weight must be there
    # Moments only for weights that have had a gradient: a weight the saving run never reached
    # (a head the task does not use) keeps the fresh zero moments it has here.
    dcp.load({"optimizer": state["optimizer"]}, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
