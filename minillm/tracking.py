"""Experiment trackers: a run's metrics, as RunDir logs them, also sent to TensorBoard or Weights &
Biases (--log tensorboard, --log wandb, or both: --log tensorboard,wandb).

    <out>/tensorboard/   event files: tensorboard --logdir <out>/tensorboard
    <out>/wandb/         the wandb run, offline unless WANDB_MODE=online: wandb sync <its folder>

Both name a row's numbers alike: train/loss, train/lr, train/tok_per_s, train/mfu, eval/loss (val_loss
or eval_loss), eval/accuracy, ... (train_<x> -> train/<x>, eval_<x> -> eval/<x>); values that are not
numbers (eval_confusion, None) are left out. Texts (the config, the generated sample) go as text.

metrics.jsonl stays the record and a tracker only a view of it: a tracker that fails after it has
opened (a full disk, a dead wandb service) warns once on stderr and turns itself off; the run goes on.
The libraries are imported only when asked for: minillm needs neither.
"""
from __future__ import annotations

import html
import importlib
import json
import numbers
import os
import sys
from typing import Callable, Optional

TRACKERS = ("tensorboard", "wandb")
# the modules each tracker imports (torch's TensorBoard writer is importable without the package
# once an earlier import cached it: the package itself is checked too)
MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def tracker_tag(key: str) -> str:
    """The tracker tag of a metrics key: train_loss -> train/loss, val_loss -> eval/loss,
    eval_f1 -> eval/f1, and a key without a group (lr, tok_per_s, mfu) -> train/<key>."""
    group, _, name = key.partition("_")
    if name and group in ("train", "val", "eval"):
        return f"{'train' if group == 'train' else 'eval'}/{name}"
    return f"train/{key}"


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row by tag, without its step."""
    return {tracker_tag(key): value for key, value in row.items() if key != "step" and isinstance(value, numbers.Real)}


def code_block(text: str) -> str:
    """Markdown that shows `text` as it is (TensorBoard renders text as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class Tracker:
    """One tracker of one run. `where` is a line telling the user where it writes. Subclasses
    implement _log, _text and _close; a failure in any of them turns the tracker off."""

    name = ""

    def __init__(self, where: str):
        self.where, self.failed = where, False

    def log(self, row: dict) -> None:
        """A metrics row ({"step": ..., key: value, ...}): its numbers, at its step."""
        values = scalars(row)
        if values and not self.failed:
            self._guard(self._log, row["step"], values)

    def text(self, tag: str, text: str, step: int) -> None:
        if not self.failed:
            self._guard(self._text, tag, text, step)

    def close(self) -> None:
        self._guard(self._close)  # after a failure too: what was written is flushed

    def _guard(self, call: Callable, *args) -> None:
        try:
            call(*args)
        except Exception as e:  # whatever a tracker does wrong, the run goes on: metrics.jsonl is the record
            if not self.failed:
                print(f"warning: --log {self.name} failed ({type(e).__name__}: {e}); it is off for the rest of "
                      f"the run (metrics.jsonl is still written)", file=sys.stderr)
            self.failed = True

    def _log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in <out>/tensorboard. A fresh run removes an earlier run's; a resumed run hides the
    events the earlier run wrote after its checkpoint's step (those steps are trained again), as
    metrics.jsonl drops their rows."""

    name = "tensorboard"

    def __init__(self, out: str, config: dict, resumed_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(out, "tensorboard")
        if resumed_step is None:
            remove_event_files(log_dir)
        # TensorBoard's readers drop earlier events at steps >= purge_step; the checkpoint's own step stays
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=None if resumed_step is None else resumed_step + 1)
        super().__init__(f"tensorboard: {log_dir} (view it: tensorboard --logdir {log_dir})")
        self._text("config", json.dumps(config, indent=2, default=str), resumed_step or 0)

    def _log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        # rows are seconds apart: write the queue out now, so that a crash loses none of them (as in
        # metrics.jsonl) and a write error surfaces at its row
        self.writer.flush()

    def _text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, code_block(text), step)
        self.writer.flush()

    def _close(self) -> None:
        self.writer.close()


def remove_event_files(log_dir: str) -> None:
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(log_dir, name))


def wandb_mode() -> str:
    """offline, unless the user set WANDB_MODE to online (or disabled): nothing leaves the machine
    unasked."""
    mode = os.environ.get("WANDB_MODE", "")
    return mode if mode in ("online", "disabled") else "offline"


class WandbTracker(Tracker):
    """A wandb run in <out>/wandb, named after the run folder, with the config as its config. Each
    process run is its own wandb run (a resumed one says so in its notes); its steps are the training
    steps. Texts are logged as HTML."""

    name = "wandb"

    def __init__(self, out: str, config: dict, resumed_step: Optional[int]):
        import wandb

        self.wandb, mode = wandb, wandb_mode()
        try:
            self.run = wandb.init(
                mode=mode, dir=out, project=os.environ.get("WANDB_PROJECT", "minillm"),
                name=os.path.basename(os.path.abspath(out)), config=config,
                notes=None if resumed_step is None else f"resumed from the checkpoint at step {resumed_step}",
                reinit="create_new",  # a new run even when an earlier main() in this process left one open
                settings=wandb.Settings(silent=True, console="off"))  # minillm prints what the user needs
        except Exception as e:  # no login for online mode, an unwritable folder, a service that won't start
            raise ValueError(f"--log wandb: cannot start a run: {e}") from e
        if mode == "offline":
            folder = self.run.settings.sync_dir
            super().__init__(f"wandb: offline run in {folder} (upload it: wandb sync {folder})")
        elif mode == "online":
            super().__init__(f"wandb: {self.run.url}")
        else:
            super().__init__("wandb: disabled (WANDB_MODE=disabled)")

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def _text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def _close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def tracker_names(spec: Optional[str]) -> list[str]:
    """The trackers --log names: "tensorboard", "wandb", both comma-separated, or none (None, "")."""
    names = list(dict.fromkeys(name.strip() for name in (spec or "").split(",") if name.strip()))
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"--log {spec}: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} "
                         f"(several comma-separated)")
    return names


def require(name: str) -> None:
    try:
        for module in MODULES[name]:
            importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--log {name} needs the {name} package: pip install 'minillm[{name}]'") from None


def open_trackers(spec: Optional[str], out: str, config: dict, resumed_step: Optional[int] = None) -> list[Tracker]:
    """The trackers --log names, opened on the run folder `out` (after keep_previous has moved an
    earlier run away). config: the run's resolved settings, recorded with it. resumed_step: the step
    of the checkpoint a resumed run continues (None for a fresh run). Call on rank 0 only."""
    names = tracker_names(spec)
    for name in names:  # every library before any tracker opens: a missing one leaves nothing half made
        require(name)
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(OPENERS[name](out, config, resumed_step))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
