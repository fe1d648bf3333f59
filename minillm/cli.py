"""What the command-line entry points share: flag types, the training flags, and the one-line
error exit.

train.py, finetune.py, minillm.generate and minillm.predict end with `run_main(main, "name")`:
bad input (a ValueError), an unwritable folder or a full disk (an OSError) print one line naming
the problem and exit with code 2; Ctrl-C exits with 130. Checkpoints are written atomically, so
the last good one is intact in each case.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Callable, Optional

from .device import DTYPES
from .distributed import exit_process
from .training import OPTIMIZERS, TrainSettings


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def finite_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def add_bool(group, flag: str, help: str) -> None:
    """`--flag`, `--flag true|false`: an on/off switch that also reads a value."""
    group.add_argument(flag, type=parse_bool, nargs="?", const=True, metavar="BOOL", help=help)


# The help of each training flag (TrainSettings' fields). A flag left out is None: the script's
# recipe or defaults decide, and --resume can tell what the user asked for from what it inherits.
TRAINING_HELP = {
    "batch_size": "sequences (finetuning: examples) per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step (gradients weighed by target tokens)",
    "lr": "peak learning rate",
    "min_lr_ratio": "the cosine schedule ends at lr x this",
    "warmup_steps": "linear warmup steps",
    "max_steps": "optimizer steps (the schedule's length)",
    "time_budget": "seconds of training steps, then evaluate and save; paces the schedule",
    "weight_decay": "AdamW weight decay on matrices",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "max global gradient norm (0: no clipping)",
    "dtype": "autocast dtype; auto: bfloat16 on CUDA GPUs (float16 before compute capability 8.0), float32 on "
             "MPS, and on the CPU float32 unless a timed forward and backward is 1.5x faster in bfloat16",
    "compile": "torch.compile the model (compile time is not charged to --time-budget)",
    "activation_checkpointing": "recompute each block in the backward pass (less memory)",
    "fsdp": "FSDP2: shard weights, gradients and AdamW moments over the torchrun processes, one block at a "
            "time gathered to run (for models whose training state does not fit one device)",
    "eval_interval": "steps between evaluations (0: only at the end)",
    "eval_iters": "language modelling: validation batches per evaluation",
    "log_interval": "steps between metrics.jsonl rows",
    "ckpt_interval": "steps between checkpoints (0: at each evaluation)",
    "ckpt_seconds": "also checkpoint after this many training seconds without one",
    "seed": "random seed (init, data order, dropout)",
    "max_skips": "non-finite steps skipped before the run stops",
    "stop_at_step": "checkpoint and stop after this step, schedule unfinished (continue with --resume)",
    "optimizer": "adamw; sgd (momentum, Nesterov); muon (Muon on the blocks' weight matrices, AdamW on the rest, "
                 "one --lr for both: README, Optimizers)",
    "momentum": "SGD's and Muon's momentum (default: 0.9 for sgd, 0.95 for muon)",
    "keep_best": "an evaluation metric (e.g. val_loss, eval_loss, eval_accuracy, eval_f1): also keep the weights "
                 "of its best evaluation in <out>/best, which predict, generate and export then read",
    "early_stopping": "stop after this many evaluations without a better --keep-best metric (default metric: "
                      "the script's main one)",
}


DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (default: auto: CUDA, then MPS, then CPU)"


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype of the scripts that run a trained model (generate, predict)."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="autocast dtype (default: auto: bfloat16 on CUDA GPUs, float16 on ones before compute "
                             "capability 8.0, float32 elsewhere)")


def add_training_args(parser: argparse.ArgumentParser, defaults: dict, out_default: Optional[str]) -> None:
    """The flags train.py and finetune.py share, declared once. `defaults`: the script's own
    (shown in --help; a recipe may move them again)."""
    g = parser.add_argument_group("training (shared by train.py and finetune.py)")
    for f in fields(TrainSettings):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        shown = TRAINING_HELP[f.name] + (f" (default: {default})" if default is not None else "")
        shown = shown.replace("%", "%%")  # argparse formats help with %
        if f.type in ("bool", bool):
            add_bool(g, flag, shown)
        elif f.name == "dtype":
            g.add_argument(flag, choices=["auto", "float32", "bfloat16", "float16"], help=shown)
        elif f.name == "optimizer":
            g.add_argument(flag, choices=OPTIMIZERS, help=shown)
        elif f.name == "keep_best":
            g.add_argument(flag, metavar="METRIC", help=shown)
        elif f.type in ("int", "Optional[int]", int):
            g.add_argument(flag, type=positive_int if f.name in ("batch_size", "grad_accum", "max_steps",
                                                                 "stop_at_step", "eval_iters", "log_interval",
                                                                 "early_stopping") else int,
                           metavar="N", help=shown)
        else:
            g.add_argument(flag, type=finite_float, metavar="X", help=shown)
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=out_default, help=f"output folder (default: {out_default or 'out/<preset>'})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log", metavar="TRACKERS", help="also log to tensorboard, wandb or tensorboard,wandb (<out>/tensorboard; "
                                                      "wandb runs offline in <out>/wandb unless WANDB_MODE=online)")


def given_training_flags(args: argparse.Namespace) -> dict:
    """The training settings the user passed on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name, None) is not None}


def run_main(main: Callable[[], int], prog: str) -> None:
    """Run a script's main(); turn expected failures into one line on stderr and an exit code."""
    try:
        code = main()
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:  # an unwritable --out, a full disk: the previous checkpoint is intact
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    exit_process(code)
