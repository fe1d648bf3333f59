"""The training loop shared by train.py and finetune.py.

A `Trainer` owns the optimizer, the learning-rate schedule, mixed precision, gradient
accumulation and clipping, checkpoints (atomic, resumable), metrics and the progress bar.
The scripts give it four callables: get_batch(), loss_fn(model, batch) -> (loss, n_items),
evaluate(model) -> dict, and optionally the data position to save and restore.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingStopped(RuntimeError):
    """Raised when a run cannot go on (non-finite losses beyond --max-skips)."""


@dataclass
class TrainSettings:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 5000
    time_budget: Optional[float] = None  # seconds of training; also paces the schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: str = "float32"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_interval: int = 250
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: only at the end (and at each eval when resumable)
    seed: int = 1337
    max_skips: int = 10  # non-finite steps tolerated before the run stops
    stop_at_step: Optional[int] = None  # checkpoint and stop here, schedule unfinished (resume later)
    # time_budget counts seconds spent in training steps; evaluation, checkpoints and the
    # one-time compile of the first step are reported separately (summary.json)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive and finite, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.time_budget is None or self.time_budget > 0, f"--time-budget must be positive, got {self.time_budget}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}"),
            (self.eval_interval >= 0, f"--eval-interval must be >= 0, got {self.eval_interval}"),
            (self.max_skips >= 0, f"--max-skips must be >= 0, got {self.max_skips}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# Devices, precision, processes


def setup_distributed():
    """(rank, world_size, device). Under torchrun: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


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


def flops_per_token(model: nn.Module, block_size: int) -> float:
    """6N for the weights (forward + backward) plus the attention matmuls (Kaplan et al.; PaLM)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    n -= model.tok_emb.weight.numel()  # the embedding lookup is not a matmul
    if c.tie_embeddings:
        n += model.tok_emb.weight.numel()  # ... but the tied LM head is
    return 6 * n + 12 * c.n_layer * c.n_embd * block_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def make_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8)
    try:  # the fused implementation exists for CPU and CUDA in recent PyTorch
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def lr_at(progress: float, step: int, s: TrainSettings) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at progress 1."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    p = min(max(progress, 0.0), 1.0)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, model: nn.Module, settings: TrainSettings, out_dir: str, *,
                 get_batch: Callable, loss_fn: Callable, evaluate: Optional[Callable] = None,
                 data_state: Optional[Callable] = None, load_data_state: Optional[Callable] = None,
                 config=None, tokenizer=None, extra_config: Optional[dict] = None,
                 save_tensors: Optional[Callable] = None, rank: int = 0, world: int = 1,
                 device: Optional[torch.device] = None, tokens_per_item: int = 1, log: Callable = print):
        settings.validate()
        self.s = settings
        self.out = out_dir
        self.model = model
        self.get_batch, self.loss_fn, self.evaluate_fn = get_batch, loss_fn, evaluate
        self.data_state, self.load_data_state = data_state, load_data_state
        self.config = config if config is not None else model.config
        self.tokenizer, self.extra_config = tokenizer, extra_config or {}
        self.save_tensors = save_tensors  # e.g. LoRA: only the adapters
        self.rank, self.world = rank, world
        self.device = device or next(model.parameters()).device
        self.log = log if rank == 0 else (lambda *a, **k: None)
        self.is_main = rank == 0
        self.step = 0
        self.elapsed = 0.0  # training seconds so far, carried across resumes
        self.items_seen = 0
        self.skips = 0
        self.history: list[dict] = []

        if settings.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        self.optimizer = make_optimizer(model, settings, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.dtype == "float16")
        self.fwd_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.fwd_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compile_seconds = 0.0
        if settings.compile:
            self.fwd_model = torch.compile(self.fwd_model)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        st = {
            "step": self.step, "elapsed": self.elapsed, "items_seen": self.items_seen, "skips": self.skips,
            "torch_rng": ckpt_io.rng_to_json(torch.get_rng_state()),
            "python_rng": repr(random.getstate()),
            "scaler": {k: (v if not isinstance(v, torch.Tensor) else v.item()) for k, v in self.scaler.state_dict().items()},
            "settings": asdict(self.s),
        }
        if self.data_state is not None:
            ds = self.data_state()
            st["data"] = {k: (ckpt_io.rng_to_json(v) if isinstance(v, torch.Tensor) else v) for k, v in ds.items()}
        return st

    def save(self, name: str = ckpt_io.CKPT) -> Optional[str]:
        if not self.is_main:
            return None
        tensors = self.save_tensors() if self.save_tensors is not None else None
        return ckpt_io.save_checkpoint(
            self.out, self.model, self.config, self.tokenizer, optimizer=self.optimizer,
            trainer_state=self.state_dict(), extra_config=self.extra_config, name=name, tensors=tensors,
        )

    def resume(self, path: Optional[str] = None) -> bool:
        """Load <out>/checkpoint (weights, optimizer, schedule, RNG, data position). False if none."""
        found = ckpt_io.find_checkpoint(path or self.out)
        if found is None:
            return False
        tensors = ckpt_io.read_tensors(os.path.join(found, "model.safetensors"))
        ckpt_io.load_weights(self.model, tensors, found, strict=self.save_tensors is None)
        state_path = os.path.join(found, "trainer_state.json")
        try:
            with open(state_path, encoding="utf-8") as f:
                st = json.load(f)
        except (OSError, ValueError) as e:  # missing, not JSON, not UTF-8
            raise ValueError(f"{state_path}: cannot resume from it ({e})") from None
        opt_path = os.path.join(found, "optimizer.safetensors")
        opt_tensors = ckpt_io.read_tensors(opt_path) if os.path.exists(opt_path) else None
        try:  # a damaged or foreign trainer_state.json is one clear error, not a traceback
            if not isinstance(st, dict):
                raise TypeError(f"expected a JSON object, got {type(st).__name__}")
            if opt_tensors is not None and "optimizer" in st:
                ckpt_io.optimizer_from_tensors(self.optimizer, opt_tensors, st["optimizer"])
            self.step, self.elapsed = int(st["step"]), float(st["elapsed"])
            self.items_seen, self.skips = int(st.get("items_seen", 0)), int(st.get("skips", 0))
            torch.set_rng_state(ckpt_io.rng_from_json(st["torch_rng"]))
            random.setstate(_literal(st["python_rng"]))
            if st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            if self.load_data_state is not None and "data" in st:
                self.load_data_state({k: (ckpt_io.rng_from_json(v) if isinstance(v, str) else v)
                                      for k, v in st["data"].items()})
        except (KeyError, TypeError, ValueError, RuntimeError, SyntaxError, RecursionError, AttributeError) as e:
            raise ValueError(f"{state_path}: cannot resume from it ({type(e).__name__}: {e})") from None
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step, so the curve has no duplicates."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not self.is_main or not os.path.exists(path):
            return
        keep = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    if row["step"] <= self.step:
                        keep.append(row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
        self.history = keep
        self._rewrite_metrics()

    def write_metrics(self, row: dict) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # -- the loop ---------------------------------------------------------------------------

    def progress(self) -> float:
        p = self.step / self.s.max_steps
        if self.s.time_budget:
            p = max(p, self.elapsed / self.s.time_budget)
        return p

    def done(self) -> bool:
        if self.s.stop_at_step is not None and self.step >= self.s.stop_at_step:
            return True
        return self.step >= self.s.max_steps or bool(self.s.time_budget and self.elapsed >= self.s.time_budget)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, items)."""
        s, model = self.s, self.fwd_model
        lr = lr_at(self.progress(), self.step, s)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        model.train()
        total, items = 0.0, 0
        for micro in range(s.grad_accum):
            batch = self.get_batch()
            sync = micro == s.grad_accum - 1 or self.world == 1
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with ctx, autocast(self.device, s.dtype):
                loss, n = self.loss_fn(model, batch)
            self.scaler.scale(loss / s.grad_accum).backward()
            total += loss.detach().float().item()
            items += n
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if s.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip, foreach=True)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.tensor(0.0)
        mean_loss = total / s.grad_accum
        if self.world > 1:  # the global batch's loss; the same number (and decision) on every rank
            t = torch.tensor([mean_loss], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            mean_loss = t.item() / self.world
        finite = math.isfinite(mean_loss) and bool(torch.isfinite(gnorm))  # gradients are already synced
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the fp16 scaler skips non-finite steps itself
            self.scaler.update()
        if not finite:
            self.skips += 1
            self.log(f"step {self.step + 1}: non-finite loss or gradients (loss {mean_loss}); step skipped "
                     f"({self.skips}/{s.max_skips} skips allowed)")
            if self.skips > s.max_skips and not self.scaler.is_enabled():
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingStopped(
                    f"stopped at step {self.step + 1}: {self.skips} non-finite steps exceed --max-skips {s.max_skips}; "
                    f"the last good checkpoint in {self.out} is kept"
                )
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, items

    def run_eval(self) -> dict:
        if self.evaluate_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.s.dtype):
            metrics = self.evaluate_fn(self.model)
        self.model.train()
        return metrics

    def fit(self, flops_per_item: float = 0.0, peak_flops: float = 0.0, unit: str = "tok") -> dict:
        """Train until max_steps or the time budget; evaluate and save at intervals and at the end."""
        s = self.s
        bar = None
        if s.progress and self.is_main:
            from tqdm import tqdm

            # With a time budget the bar fills with training seconds (a step count would show a few
            # percent of an unreachable max_steps); otherwise with steps.
            by_time = bool(s.time_budget)
            bar = tqdm(total=round(s.time_budget) if by_time else s.max_steps,
                       initial=min(round(self.elapsed), round(s.time_budget)) if by_time else self.step,
                       dynamic_ncols=True, unit="s" if by_time else "step", disable=not s.progress,
                       bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt}s [{elapsed}{postfix}]" if by_time else None)
        last_eval: dict = {}
        window_items, window_time = 0, 0.0
        wall0 = time.perf_counter()
        first = True
        while not self.done():
            t0 = time.perf_counter()
            loss, items = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if first and s.compile:
                # the first step compiles the graph: report it, don't charge it to the budget
                self.compile_seconds, first = dt, False
            else:
                self.elapsed += dt
                window_items += items * self.world
                window_time += dt
            first = False
            self.step += 1
            self.items_seen += items * self.world
            rate = window_items / window_time if window_time > 0 else 0.0
            # MFU only where a FLOP count and a measured peak are known (finetune.py has neither): None, not 0.
            mfu = rate * flops_per_item / peak_flops if peak_flops and flops_per_item else None
            if bar is not None:
                left = (s.max_steps - self.step) / max(self.step, 1) * self.elapsed
                if s.time_budget:
                    left = min(left, s.time_budget - self.elapsed)
                    bar.update(min(self.elapsed, s.time_budget) - bar.n)
                else:
                    bar.update(1)
                shown = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
                bar.set_postfix_str(f"step {self.step} | loss {loss:.4f} | {rate:,.0f} {unit}/s{shown} | ETA {max(left, 0):.0f}s",
                                    refresh=False)
            evaluating = s.eval_interval and self.step % s.eval_interval == 0 and not self.done()
            if self.step % s.log_interval == 0 or evaluating or self.done():
                row = {"step": self.step, "train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                       f"{unit}_per_s": rate, "mfu": mfu, "elapsed": round(self.elapsed, 3)}
                if evaluating:
                    last_eval = self.run_eval()
                    row.update(last_eval)
                    if bar is not None:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                                      if isinstance(v, float)))
                self.write_metrics(row)
                window_items, window_time = 0, 0.0
            if (evaluating and s.ckpt_interval == 0) or (s.ckpt_interval and self.step % s.ckpt_interval == 0):
                self.save()
        if bar is not None:
            bar.close()
        final = self.run_eval()
        if final:
            if self.history and self.history[-1]["step"] == self.step:
                self.history[-1].update(final)
                if self.is_main:
                    self._rewrite_metrics()
            else:
                self.write_metrics({"step": self.step, **final})
        path = self.save()
        wall = time.perf_counter() - wall0
        rates = [r[f"{unit}_per_s"] for r in self.history if r.get(f"{unit}_per_s")]
        summary = {
            "steps": self.step, "train_seconds": round(self.elapsed, 2), "wall_seconds": round(wall, 2),
            "compile_seconds": round(self.compile_seconds, 2),
            f"{unit}_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
            "mfu": None, "skipped_steps": self.skips, "checkpoint": path,
            **{f"final_{k}" if not k.startswith(("eval_", "val_")) else k: v for k, v in final.items()},
        }
        if summary[f"{unit}_per_s"] and flops_per_item and peak_flops:
            summary["mfu"] = round(summary[f"{unit}_per_s"] * flops_per_item / peak_flops, 4)
        return summary

    def _rewrite_metrics(self) -> None:
        """Atomically: a crash while rewriting must not lose the curve."""
        path = os.path.join(self.out, "metrics.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def _literal(s: str):
    import ast

    return ast.literal_eval(s)


def plot_losses(history: list[dict], path: str, unit: str = "step") -> Optional[str]:
    """loss.png: train and validation loss against steps. None (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tr = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), label="validation", marker="o", lw=1.5)
    ax.set_xlabel(unit)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
