"""The named pieces of a training loop. train.py and finetune.py write the loop itself.

    settings   TrainSettings: the optimisation and cadence settings both scripts share
    optimizer  make_optimizer (AdamW, SGD or Muon: minillm/optim.py), lr_at (warmup + cosine)
    state      TrainState: step, training seconds, skips, the best evaluation so far (--keep-best,
               --early-stopping); `done` and the schedule's progress
    a step     count_targets + token_share (the gradient of grad_accum micro-batches equals that
               of one big batch), clip_gradients, sync_step (the step's one host sync),
               skip_step (non-finite steps leave the weights alone, up to max_skips)
    saving     save_training / resume_training (weights, optimizer, RNG, data position; sharded
               under --fsdp); save_best (the weights of the best evaluation, <out>/best)
    watching   Meter (throughput, MFU) and ProgressBar
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .device import DTYPES
from .optim import OPTIMIZERS, build_optimizer
from .distributed import (
    all_reduce_sum, broadcast_object, collective_any, full_weights, gather_objects, is_sharded, load_sharded, rank_world,
    save_sharded,
)




class TrainingStopped(RuntimeError):
    """Raised when a run cannot go on (non-finite losses beyond --max-skips, non-finite weights)."""


@dataclass
class TrainSettings:
    """Each field is a flag of both scripts (cli.add_training_args); each script may move the
    defaults (train.py's recipes, finetune.py's FINETUNE_DEFAULTS)."""
    batch_size: int = 12  # sequences (or examples) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from ~0 to lr
    max_steps: int = 2000  # optimizer steps (the schedule's length unless time_budget ends it first)
    time_budget: Optional[float] = None  # seconds of training steps; also paces the schedule
    weight_decay: float = 0.1  # AdamW, on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    dtype: str = "auto"  # autocast dtype: auto (device.resolve_dtype) | float32 | bfloat16 | float16 (with a loss scaler)
    compile: bool = False  # torch.compile the model (its compile time is not charged to time_budget)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    fsdp: bool = False  # shard weights, gradients and optimizer moments over the processes (FSDP2)
    eval_interval: int = 250  # steps between evaluations (0: only at the end)
    eval_iters: int = 20  # language modelling: batches per evaluation
    log_interval: int = 10  # steps between metrics.jsonl rows
    ckpt_interval: int = 0  # steps between checkpoints (0: at each evaluation)
    ckpt_seconds: float = 60.0  # also checkpoint after this many training seconds without one
    seed: int = 1337
    max_skips: int = 10  # non-finite steps tolerated before the run stops
    stop_at_step: Optional[int] = None  # checkpoint and stop here, schedule unfinished (resume later)
    optimizer: str = "adamw"  # adamw | sgd | muon (minillm/optim.py)
    momentum: Optional[float] = None  # SGD's and Muon's momentum (None: 0.9 for SGD, 0.95 for Muon)
    keep_best: Optional[str] = None  # an evaluation metric: keep the weights where it was best in <out>/best
    early_stopping: Optional[int] = None  # stop after this many evaluations without a better keep_best metric

    @classmethod
    def from_options(cls, opts: dict) -> "TrainSettings":
        s = cls(**{f.name: opts[f.name] for f in fields(cls) if opts.get(f.name) is not None})
        s.validate()
        return s

    def validate(self) -> None:
        def finite(v):
            return v is not None and math.isfinite(v)

        checks = [
            (finite(self.lr) and 0 < self.lr <= 10, f"--lr must be in (0, 10], got {self.lr}"),
            (finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.time_budget is None or (finite(self.time_budget) and self.time_budget > 0),
             f"--time-budget must be positive, got {self.time_budget}"),
            (finite(self.weight_decay) and 0 <= self.weight_decay <= 10, f"--weight-decay must be in [0, 10], got {self.weight_decay}"),
            (finite(self.beta1) and 0 <= self.beta1 < 1, f"--beta1 must be in [0, 1), got {self.beta1}"),
            (finite(self.beta2) and 0 <= self.beta2 < 1, f"--beta2 must be in [0, 1), got {self.beta2}"),
            (finite(self.grad_clip) and self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.dtype == "auto" or self.dtype in DTYPES, f"--dtype must be auto or one of {list(DTYPES)}, got {self.dtype!r}"),
            (self.eval_interval >= 0, f"--eval-interval must be >= 0, got {self.eval_interval}"),
            (self.ckpt_interval >= 0, f"--ckpt-interval must be >= 0, got {self.ckpt_interval}"),
            (finite(self.ckpt_seconds) and self.ckpt_seconds > 0, f"--ckpt-seconds must be positive, got {self.ckpt_seconds}"),
            (self.max_skips >= 0, f"--max-skips must be >= 0, got {self.max_skips}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.momentum is None or (finite(self.momentum) and 0 <= self.momentum < 1),
             f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.early_stopping is None or self.early_stopping > 0,
             f"--early-stopping must be a positive number of evaluations, got {self.early_stopping}"),
            (not (self.optimizer == "muon" and self.fsdp), "--optimizer muon orthogonalises whole matrices; it does "
                                                          "not run under --fsdp (which shards them)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# The optimizer and its schedule


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """--optimizer: AdamW (weight decay on matrices only), SGD with Nesterov momentum, or Muon on
    the blocks' matrices with AdamW on the rest (minillm/optim.py). Tied weights once."""
    return build_optimizer(model, s.optimizer, lr=s.lr, weight_decay=s.weight_decay, betas=(s.beta1, s.beta2),
                           momentum=s.momentum)


def lr_at(progress: float, step: int, s: TrainSettings) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at progress 1."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    p = min(max(progress, 0.0), 1.0)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint, so a resumed run continues the schedule."""
    step: int = 0
    elapsed: float = 0.0  # seconds spent in training steps, across resumes
    items_seen: int = 0  # tokens (or examples) trained on, all processes
    skips: int = 0  # non-finite steps skipped
    compile_seconds: float = 0.0
    out_of_time: bool = False  # rank 0's clock has reached the time budget
    last_save: float = 0.0  # `elapsed` at the last checkpoint
    best_value: Optional[float] = None  # the best keep_best metric so far
    best_step: Optional[int] = None  # the step it was measured at
    evals_since_best: int = 0  # evaluations since then, for early stopping
    stopped_early: bool = False

    def progress(self, s: TrainSettings) -> float:
        """How far through the schedule: by steps, or by the time budget when that ends first."""
        p = self.step / s.max_steps
        return max(p, self.elapsed / s.time_budget) if s.time_budget else p

    def done(self, s: TrainSettings) -> bool:
        stopped_at_step = s.stop_at_step is not None and self.step >= s.stop_at_step
        return stopped_at_step or self.stopped_early or self.out_of_time or self.step >= s.max_steps

    def time_up(self, s: TrainSettings, running: float, compiling: bool = False) -> bool:
        """This process's clock says the time budget is spent, counting the step running for
        `running` seconds unless it is compiling (see advance; sync_step shares rank 0's answer)."""
        return bool(s.time_budget) and self.elapsed + (0.0 if compiling else running) >= s.time_budget

    def advance(self, seconds: float, items: int, meter: "Meter", compiling: bool = False) -> None:
        """Count a finished step. A compiled model's first step is compile time: reported, not
        charged to the time budget or the throughput."""
        if compiling:
            self.compile_seconds += seconds
        else:
            self.elapsed += seconds
            meter.add(items, seconds)
        self.step += 1
        self.items_seen += items

    def observe(self, metrics: dict, s: TrainSettings) -> bool:
        """Count an evaluation for --keep-best and --early-stopping. True when the keep_best
        metric is the best so far (strictly; NaN never is): the caller saves the best weights.
        After early_stopping evaluations without one, the run is done."""
        if s.keep_best not in metrics:
            raise ValueError(f"--keep-best {s.keep_best}: the evaluation reports no such metric; it reports "
                             + ", ".join(k for k, v in metrics.items() if isinstance(v, float)))
        value, lower = float(metrics[s.keep_best]), lower_is_better(s.keep_best)
        better = self.best_value is None or (value < self.best_value if lower else value > self.best_value)
        if better and math.isfinite(value):
            self.best_value, self.best_step, self.evals_since_best = value, self.step, 0
            return True
        self.evals_since_best += 1
        self.stopped_early = bool(s.early_stopping) and self.evals_since_best >= s.early_stopping
        return False

    def checkpoint_due(self, s: TrainSettings, evaluated: bool) -> bool:
        by_steps = s.ckpt_interval and self.step % s.ckpt_interval == 0
        return bool((evaluated and not s.ckpt_interval) or by_steps or self.elapsed - self.last_save >= s.ckpt_seconds)


def check_keep_best(s: TrainSettings, metrics: Optional[tuple], default: str, has_eval: bool) -> None:
    """--early-stopping alone watches the script's main metric (`default`); --keep-best needs an
    evaluation set and a metric the evaluation reports (`metrics`; None: known only once it runs)."""
    if s.early_stopping and not s.keep_best:
        s.keep_best = default
    if not s.keep_best:
        return
    flag = "--early-stopping" if s.early_stopping else "--keep-best"
    if not has_eval:
        raise ValueError(f"{flag} compares evaluations, and this run has no evaluation data")
    if metrics is not None and s.keep_best not in metrics:
        raise ValueError(f"--keep-best {s.keep_best}: this run does not report it; choose one of {', '.join(metrics)}")
    if s.early_stopping and not s.eval_interval:
        raise ValueError("--early-stopping counts evaluations during training; --eval-interval 0 makes none")


def final_evaluation(state: TrainState, s: TrainSettings, run, evaluate: Callable[[], dict],
                     keep: Callable[[dict], object], prefix: str) -> dict:
    """The final weights' evaluation (`evaluate()`; {} without evaluation data), logged in the
    RunDir `run` and counted for --keep-best (`keep` saves the best weights). After early stopping
    the loop has just evaluated these weights: its last row's `prefix` metrics are taken instead."""
    if state.stopped_early:
        final = {k: v for k, v in run.history[-1].items() if k.startswith(prefix)}
    else:
        final = evaluate()
        if s.keep_best and final and state.observe(final, s):
            keep(final)
    run.log({"step": state.step, **final})
    return final


def best_summary(s: TrainSettings, state: TrainState, out: str, history: list[dict]) -> dict:
    """What summary.json says of the best evaluation (its step, and every metric measured there,
    from the run's logged rows) and of early stopping."""
    if not s.keep_best or state.best_step is None:
        return {}
    row = next((r for r in reversed(history) if r["step"] == state.best_step and s.keep_best in r), {})
    measured = {k: v for k, v in extra_metric(row).items() if k.startswith(("eval_", "val_"))}
    return {"best": {"step": state.best_step, "metric": s.keep_best, "value": state.best_value, "metrics": measured,
                     "checkpoint": os.path.join(out, ckpt_io.BEST)}, "stopped_early": state.stopped_early}


def best_line(summary: dict, patience: Optional[int]) -> Optional[str]:
    """The report's line about the best evaluation, or None without --keep-best."""
    b = summary.get("best")
    if not b:
        return None
    stopped = f"; stopped early, {patience} evaluations without a better one" if summary.get("stopped_early") else ""
    return (f"best {b['metric']} {b['value']:.4f} at step {b['step']}{stopped}: {b['checkpoint']} "
            "(predict, generate and export read it; the last weights stay in checkpoint/)")


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities, errors and divergences fall as a model improves; the rest rise."""
    return metric.endswith(("loss", "ppl", "mse", "kl"))


# ---------------------------------------------------------------------------------------------
# One optimizer step


def count_targets(targets: list[torch.Tensor]) -> torch.Tensor:
    """Target tokens (labels != -100) in all of a step's micro-batches, summed over processes.
    Stays on the device: no host sync."""
    n = sum((y != -100).sum() for y in targets).float()
    return all_reduce_sum(n)


def token_share(loss: torch.Tensor, targets: torch.Tensor, n_step: torch.Tensor) -> torch.Tensor:
    """A micro-batch's part of the step's mean loss: its mean loss times its share of the step's
    target tokens. Summed over micro-batches and processes, the gradient is that of one batch
    holding all of them, however unevenly the tokens fall (masked LM, instruction tuning)."""
    n = (targets != -100).sum()
    return torch.where(n > 0, loss.float(), 0.0) * n / n_step.clamp(min=1)  # no targets: no NaN


def clip_gradients(model: nn.Module, optimizer, scaler, max_norm: float) -> torch.Tensor:
    """The global gradient norm (after unscaling), clipped to max_norm when it is positive.
    Under FSDP each process holds a shard of each gradient: the norm is reduced over them."""
    scaler.unscale_(optimizer)
    if not any(p.grad is not None for p in model.parameters()):
        return torch.zeros(())
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


def sync_step(step_loss: torch.Tensor, grad_norm: torch.Tensor, time_up: bool) -> tuple[float, float, bool, bool]:
    """The step's one host synchronisation. Returns the global mean loss, the gradient norm,
    whether both are finite, and whether rank 0's clock says the time budget is spent: every
    process takes rank 0's word, so all stop after the same step."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dev = step_loss.device
    shared = all_reduce_sum(torch.stack([step_loss.float(), torch.tensor(float(time_up and rank0), device=dev)]))
    loss, stop, gnorm = torch.cat([shared, grad_norm.float().reshape(1).to(dev)]).tolist()
    return loss, gnorm, math.isfinite(loss) and math.isfinite(gnorm), stop > 0


def skip_step(state: TrainState, s: TrainSettings, loss: float, out: str, log=print, scaler=None) -> None:
    """Count a non-finite step (its update was not applied); past max_skips, stop the run. With
    float16's loss scaler, overflowing steps are how the scale calibrates itself: counted, never fatal."""
    state.skips += 1
    log(f"step {state.step + 1}: non-finite loss or gradients (loss {loss}); step skipped "
        f"({state.skips}/{s.max_skips} skips allowed)")
    if state.skips > s.max_skips and not (scaler is not None and scaler.is_enabled()):
        raise TrainingStopped(f"stopped at step {state.step + 1}: {state.skips} non-finite steps exceed "
                              f"--max-skips {s.max_skips}; the last good checkpoint in {out} is kept")


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run: checkpoint.py's folder plus the optimizer, RNG and data position


def _to_json(data_state: dict) -> dict:
    return {k: ckpt_io.rng_to_json(v) if isinstance(v, torch.Tensor) else v for k, v in data_state.items()}


def _from_json(data_state: dict) -> dict:
    return {k: ckpt_io.rng_from_json(v) if isinstance(v, str) else v for k, v in data_state.items()}


def save_training(out: str, model, optimizer, scaler, state: TrainState, settings: TrainSettings, data, *,
                  config, tokenizer, extra: dict, tensors: Optional[Callable[[dict], dict]] = None) -> str:
    """Write <out>/checkpoint atomically; every process calls it, rank 0 writes (under FSDP each
    process also writes its shards). `tensors(weights)` picks what to save of the weights (e.g.
    the LoRA adapters). Non-finite weights are never written: the run stops and the last good
    checkpoint stays."""
    rank, world = rank_world()
    device = next(model.parameters()).device
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    if collective_any(not all(bool(torch.isfinite(p).all()) for p in local), device):
        raise TrainingStopped(f"stopped at step {state.step}: the weights are no longer finite (lower --lr?); "
                              f"the last good checkpoint in {out} is kept")
    state.last_save = state.elapsed
    rngs = gather_objects({"torch": ckpt_io.rng_to_json(torch.get_rng_state()),  # dropout: each process its own
                           **({"cuda": ckpt_io.rng_to_json(torch.cuda.get_rng_state(device))} if device.type == "cuda" else {})})
    sharded = is_sharded(model)
    tmp = broadcast_object(ckpt_io.begin_save(out) if rank == 0 else None) if sharded else None
    if sharded:
        save_sharded(os.path.join(tmp, "sharded"), model, optimizer)
    weights = full_weights(model) if sharded or rank == 0 else None  # under FSDP a collective, gathered onto rank 0
    path = os.path.join(out, ckpt_io.CKPT)
    if rank == 0:
        trainer_state = {
            **asdict(state), "settings": asdict(settings), "data": _to_json(data.state()),
            "torch_rng": rngs[0]["torch"], "python_rng": list(random.getstate()), "world_size": world,
            "scaler": {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in scaler.state_dict().items()},
            **({"cuda_rng": rngs[0]["cuda"]} if "cuda" in rngs[0] else {}), **({"process_rng": rngs} if world > 1 else {}),
        }
        path = ckpt_io.save_checkpoint(out, model, config, tokenizer, optimizer=None if sharded else optimizer,
                                       trainer_state=trainer_state, extra_config=extra, tmp=tmp,
                                       tensors=tensors(weights) if tensors is not None else weights)
    if sharded:
        dist.barrier()  # the next save's begin_save must not sweep this one's folder from under a slow process
    return path


def save_best(out: str, model, state: TrainState, metrics: dict, *, config, tokenizer, extra: dict,
              tensors: Optional[Callable[[dict], dict]] = None) -> Optional[str]:
    """Write the weights of the best evaluation so far to <out>/best, atomically (a checkpoint
    without optimizer or trainer state: predict, generate and export read it). Every process
    calls it (under FSDP the weights are gathered); rank 0 writes and gets the path."""
    rank, _ = rank_world()
    weights = full_weights(model) if is_sharded(model) or rank == 0 else None
    if rank != 0:
        return None
    best = {"step": state.step, "metrics": extra_metric(metrics)}
    return ckpt_io.save_checkpoint(out, model, config, tokenizer, name=ckpt_io.BEST, extra_config={**extra, "best": best},
                                   tensors=tensors(weights) if tensors is not None else weights)


def extra_metric(metrics: dict) -> dict:
    """The scalar metrics of an evaluation (what config.json and summary.json keep of it)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def resume_training(ckpt: str, model, optimizer, scaler, state: TrainState, data, strict: bool = True) -> None:
    """Load weights, optimizer moments, schedule position, RNG states and data position. A
    sharded checkpoint (--fsdp) loads into any number of processes, sharded or not."""
    sharded = os.path.join(ckpt, "sharded")
    if os.path.isdir(sharded):
        load_sharded(sharded, model, optimizer)
    elif is_sharded(model):
        raise ValueError(f"--fsdp: {ckpt} was saved without --fsdp (its optimizer moments are whole, not "
                         "sharded); resume it without --fsdp")
    else:
        ckpt_io.load_weights(model, ckpt_io.read_tensors(os.path.join(ckpt, "model.safetensors")), ckpt, strict=strict)
    path = os.path.join(ckpt, "trainer_state.json")
    opt_path = os.path.join(ckpt, "optimizer.safetensors")
    opt_tensors = ckpt_io.read_tensors(opt_path) if os.path.exists(opt_path) and not os.path.isdir(sharded) else None
    rank, world = rank_world()
    try:  # a damaged or foreign trainer_state.json is one clear error, not a traceback
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
        if opt_tensors is not None:
            ckpt_io.optimizer_from_tensors(optimizer, opt_tensors, st["optimizer"])
        state.step, state.elapsed = int(st["step"]), float(st["elapsed"])
        state.items_seen, state.skips = int(st.get("items_seen", 0)), int(st.get("skips", 0))
        state.compile_seconds, state.last_save = float(st.get("compile_seconds", 0.0)), state.elapsed
        state.best_value, state.best_step = st.get("best_value"), st.get("best_step")
        state.evals_since_best, state.stopped_early = int(st.get("evals_since_best", 0)), False
        rngs = st.get("process_rng") or [{"torch": st["torch_rng"], **({"cuda": st["cuda_rng"]} if st.get("cuda_rng") else {})}]
        own = rngs[rank] if len(rngs) == world else rngs[0] if rank == 0 else None
        device = next(model.parameters()).device
        if own is None:  # another number of processes: rank 0 goes on from rank 0's state, the others start anew
            torch.manual_seed(1000 * state.step + rank)
        else:
            torch.set_rng_state(ckpt_io.rng_from_json(own["torch"]))
            if device.type == "cuda" and own.get("cuda"):
                torch.cuda.set_rng_state(ckpt_io.rng_from_json(own["cuda"]), device)
        version, internal, gauss = st["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        data.load_state(_from_json(st["data"]))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{path}: cannot resume from it ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Watching a run


class Meter:
    """Throughput over the steps since the last log row, and MFU where a FLOP count is known."""

    def __init__(self, flops_per_item: float = 0.0, peak_flops: float = 0.0):
        self.flops_per_item, self.peak_flops = flops_per_item, peak_flops
        self.items, self.seconds = 0, 0.0

    def add(self, items: int, seconds: float) -> None:
        self.items, self.seconds = self.items + items, self.seconds + seconds

    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def mfu(self, rate: Optional[float] = None) -> Optional[float]:
        """None (not 0) where no FLOP count or peak is known."""
        if not (self.flops_per_item and self.peak_flops):
            return None
        return (self.rate() if rate is None else rate) * self.flops_per_item / self.peak_flops

    def row(self, state: TrainState, loss: float, lr: float, unit: str, grad_norm: Optional[float] = None) -> dict:
        """A metrics.jsonl row (grad_norm: the logged step's, before clipping); starts the next window."""
        row = {"step": state.step, "train_loss": loss, "lr": lr, f"{unit}_per_s": self.rate(), "mfu": self.mfu(),
               "grad_norm": grad_norm, "elapsed": round(state.elapsed, 3)}
        self.items, self.seconds = 0, 0.0
        return row


class ProgressBar:
    """tqdm over steps, or over training seconds when a time budget ends the run (a step count
    would show a few percent of an unreachable max_steps). Silent when disabled."""

    def __init__(self, s: TrainSettings, state: TrainState, enabled: bool):
        self.s, self.bar = s, None
        if not enabled:
            return
        if s.time_budget:
            self.bar = tqdm(total=round(s.time_budget), initial=min(round(state.elapsed), round(s.time_budget)),
                            unit="s", dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt}s [{elapsed}{postfix}]")
        else:
            self.bar = tqdm(total=s.max_steps, initial=state.step, unit="step", dynamic_ncols=True)

    def update(self, state: TrainState, loss: float, meter: Meter, unit: str) -> None:
        if self.bar is None:
            return
        left = (self.s.max_steps - state.step) / max(state.step, 1) * state.elapsed
        if self.s.time_budget:
            left = min(left, self.s.time_budget - state.elapsed)
            self.bar.update(min(state.elapsed, self.s.time_budget) - self.bar.n)
        else:
            self.bar.update(1)
        mfu = meter.mfu()
        shown = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
        self.bar.set_postfix_str(f"step {state.step} | loss {loss:.4f} | {meter.rate():,.0f} {unit}/s{shown} | "
                                 f"ETA {max(left, 0):.0f}s", refresh=False)

    def write(self, msg: str, log=print) -> None:
        (self.bar.write if self.bar is not None else log)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Tally:
    """Means of per-item statistics (rewards, margins, ...) since the last `pop`, over all
    processes: the loop logs them with its rows. Sums stay on the device until `pop` (every
    process pops at the same steps, with the same names)."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float().reshape(-1)
            s = self.sums.setdefault(k, [0.0, 0])
            s[0], s[1] = s[0] + v.sum(), s[1] + v.numel()

    def clear(self) -> None:
        self.sums = {}

    def pop(self, device=None) -> dict:
        names = sorted(self.sums)
        if not names:
            return {}
        t = torch.tensor([[float(self.sums[k][0]), float(self.sums[k][1])] for k in names], dtype=torch.float64,
                         device=device)
        t = all_reduce_sum(t)
        self.sums = {}
        return {k: (t[i, 0] / t[i, 1]).item() for i, k in enumerate(names) if t[i, 1] > 0}
