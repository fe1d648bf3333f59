"""Where a run executes: the device, precision, seeding and MFU. Several processes
(DDP, FSDP2) are distributed.py's; memory estimates memory.py's."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """The device a run asks for: auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda, cuda:N or
    mps. One asked for and not here is a ValueError naming it."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is available here (this torch {torch.__version__} "
                             f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'})")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered 0 to {torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise ValueError("--device mps: Apple's Metal (MPS) backend is not available here")
        return device
    if device.type == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device {spec}: {device.type} is not supported; expected auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_dtype(spec: str, device: torch.device, step=None, log=print) -> str:
    """The autocast dtype for --dtype spec on this device. auto: bfloat16 on CUDA GPUs with
    bfloat16 tensor cores (compute capability 8.0+), float16 with the loss scaler on older ones,
    float32 on MPS; on the CPU float32 unless `step()` (one forward and backward) is measured
    1.5x faster under bfloat16 autocast (CPUs with AMX or AVX512-BF16 can be; ones without bf16
    units are ~100x slower, and at small widths the casts cost more than they save). The margin
    covers what the probe leaves out: on an AMD EPYC with AVX512-BF16 the default run's probe
    showed bfloat16 1.2x faster, yet the whole run went 10% slower in it (float32 optimizer steps).
    float32 on CUDA lets matmuls use TF32 tensor cores."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
        elif device.type == "cpu" and step is not None:
            fp32, bf16 = step_seconds(step, device, ("float32", "bfloat16"))
            spec = "bfloat16" if bf16 < fp32 / 1.5 else "float32"  # a clear win: the run adds fp32 optimizer steps
            log(f"--dtype auto: a forward and backward takes {1e3 * fp32:.0f} ms in float32 and {1e3 * bf16:.0f} ms "
                f"under bfloat16 autocast here: {spec}")
        else:
            spec = "float32"
    if spec not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {list(DTYPES)}, got {spec!r}")
    if device.type == "mps" and spec != "float32":
        raise ValueError(f"--dtype {spec} on MPS: minillm trains in float32 there (autocast and the "
                         "float16 loss scaler are not available on MPS in every torch it supports)")
    if device.type == "cuda" and spec == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         "use --dtype float16 (with its loss scaler) or float32")
    if device.type == "cuda" and spec == "float32":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on TF32 tensor cores (~8x)
        torch.backends.cudnn.allow_tf32 = True
    return spec


def inference_placement(device: torch.device, asked: str, dtype: str, quantized: bool, ckpt: str):
    """(device, dtype) a loaded model runs in (generate, predict): as asked, except that a quantised
    copy (int8, int8-weight, int4-weight) runs on the CPU only (--device auto moves it there; a
    device named is refused)."""
    if quantized:
        if device.type != "cpu" and asked != "auto":
            raise ValueError(f"--device {asked}: {ckpt} holds a quantised copy, which runs on the CPU only")
        device = torch.device("cpu")
    return device, resolve_dtype(dtype, device)


def step_seconds(step, device: torch.device, dtypes: tuple, reps: int = 3) -> list:
    """Median seconds of step() under each dtype's autocast, after a warm-up, the dtypes taking
    turns (a shared machine's load then weighs on both alike). The random state is left as it was.
    A dtype more than 3x slower than the first one is dropped after one repetition."""
    times = {dt: [] for dt in dtypes}
    with torch.random.fork_rng(devices=[]):
        for i in range(reps + 1):  # the first round is a warm-up
            for dt in dtypes:
                if i > 1 and times[dt][-1] > 3 * times[dtypes[0]][-1]:
                    continue  # hopeless here (bfloat16 on a CPU without bf16 units): no need to measure it well
                t0 = time.perf_counter()
                with autocast(device, dt):
                    step()
                times[dt].append(time.perf_counter() - t0)
    return [sorted(times[dt][1:])[(len(times[dt]) - 1) // 2] for dt in dtypes]


def check_device_support(device: torch.device, use_kernels: bool = False, attention_backend: str = "auto") -> None:
    """What a device cannot do is refused in one line (Triton runs on CUDA GPUs only)."""
    if device.type == "mps" and use_kernels:
        raise ValueError("--use-kernels on MPS: the Triton kernels run on CUDA GPUs only; drop the flag")
    if device.type == "mps" and attention_backend == "triton":
        raise ValueError("--attention-backend triton on MPS: the Triton kernel runs on CUDA GPUs only; "
                         "use auto, sdpa or naive")


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
    torch.manual_seed(seed)  # also seeds every CUDA device


def measure_matmul_peak(device: torch.device, dtype: str, n=None, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in this dtype on this device: the denominator of MFU. On a GPU
    n = 8192 timed between CUDA events (a 1024^3 matmul mostly measures launch overhead there and
    under-states the peak); on the CPU n = 1024, which the CPU recipes' matmuls are close to."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, init) untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            if device.type == "mps":
                torch.mps.synchronize()
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def flops_per_token(model: nn.Module, block_size: int) -> float:
    """6N for the weights (forward + backward) plus the attention matmuls (Kaplan et al.; PaLM)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    n -= model.tok_emb.weight.numel()  # the embedding lookup is not a matmul
    if c.tie_embeddings:
        n += model.tok_emb.weight.numel()  # ... but the tied LM head is
    return 6 * n + 12 * c.n_layer * c.n_embd * block_size
