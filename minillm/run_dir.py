"""The run folder: what a training run writes beside its checkpoint.

    <out>/
        checkpoint/      weights, optimizer, trainer state (checkpoint.py)
        metrics.jsonl    one JSON row per logged step (train loss, lr, throughput, evals)
        summary.json     the final numbers
        loss.png         train and validation loss against steps (and a classifier's accuracy)
        tensorboard/     with --log tensorboard: the same rows as TensorBoard events (tracking.py)
        wandb/           with --log wandb: the same rows as a wandb run (tracking.py)

Only rank 0 writes. A resumed run keeps the rows up to its checkpoint's step and drops the rest
(steps trained after that checkpoint are trained again); a fresh run clears an earlier run's
files. Every rewrite is atomic: a crash leaves the old file or the new one.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
from typing import Callable, Optional, Sequence

from .checkpoint import find_checkpoint, read_config
from .tracking import Tracker, open_trackers


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def existing_run(out: str, resume: bool) -> Optional[dict]:
    """The saved config of the checkpoint in `out` (its path under "path"), or None.
    --resume without one is an error."""
    ckpt = find_checkpoint(out) if os.path.isdir(out) else None
    if ckpt is None:
        if resume:
            raise ValueError(f"--resume: {out} holds no checkpoint to continue")
        return None
    return {**read_config(ckpt), "path": ckpt}


def refuse_clash(out: str, given: dict, saved: dict) -> None:
    """--resume continues a run as it began: a flag that contradicts the checkpoint is refused.
    given: {flag: value} the user passed; saved: {flag: value} the checkpoint holds."""
    clash = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved.get(k)})" for k, v in given.items()
             if k in saved and saved[k] != v]
    if clash:
        raise ValueError(f"--resume: flags disagree with the checkpoint in {out}: {', '.join(clash)}")


LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed process nobody has reaped yet (a torchrun worker whose launcher died) is a zombie: dead
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # not Linux: os.kill's word



def lock(out: str) -> str:
    """Claim the output folder for this process: two runs writing one folder would corrupt each
    other. A lock left by a dead process on this host is taken over; a live owner is an error
    naming it. Released when the process exits."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    owner = json.load(f)
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, me["host"]  # unreadable: left half written by a process killed while locking
            if (pid, host) == (me["pid"], me["host"]):  # this process again (main() called twice)
                return path
            if host != me["host"] or (pid > 0 and _alive(pid)):
                raise ValueError(f"{out} is in use by another run (process {pid} on {host}); "
                                 f"wait for it to finish or choose another --out")
            print(f"note: taking over {out} from a run that is gone (process {pid})")
            os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        atexit.register(unlock, path, me["pid"])
        return path
    raise ValueError(f"{out}: cannot take the lock {path}")


def unlock(path: str, pid: int) -> None:
    if os.getpid() == pid and os.path.exists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def keep_previous(out: str) -> Optional[str]:
    """A fresh run into a folder that holds an earlier run's checkpoint: the earlier run moves to
    <out>.prev (replacing an older one there) instead of being lost. Returns that path."""
    if find_checkpoint(out) is None:
        return None
    prev = out.rstrip(os.sep) + ".prev"
    if os.path.exists(prev):
        shutil.rmtree(prev)
    os.makedirs(prev)
    for name in os.listdir(out):
        if name != LOCK:  # the lock stays: it is this run's
            os.replace(os.path.join(out, name), os.path.join(prev, name))
    return prev


class RunDir:
    """metrics.jsonl, summary.json and loss.png of one run; `history` holds the rows. Every row also
    goes to the trackers given (tracking.open_trackers; only rank 0 keeps any), which finish() closes."""

    FILES = ("metrics.jsonl", "summary.json", "loss.png")

    def __init__(self, path: str, is_main: bool = True, trackers: Sequence[Tracker] = ()):
        self.path, self.is_main = path, is_main
        self.history: list[dict] = []
        self.trackers = list(trackers) if is_main else []
        if is_main:
            os.makedirs(path, exist_ok=True)

    @classmethod
    def open(cls, path: str, is_main: bool, resumed_step: Optional[int], log_to: Optional[str] = None,
             config: Optional[dict] = None, log: Callable = print) -> "RunDir":
        """The run folder of a script, started (see start), with the trackers of --log on the main
        process, each announced with where it writes."""
        trackers = open_trackers(log_to, path, config or {}, resumed_step) if is_main else []
        for t in trackers:
            log(t.where)
        run = cls(path, is_main, trackers)
        run.start(resumed_step)
        return run

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, resumed_step: Optional[int]) -> None:
        """A resumed run keeps the rows up to its step; a fresh one removes an earlier run's files."""
        if not self.is_main:
            return
        if resumed_step is None:
            for name in self.FILES:
                if os.path.exists(self.file(name)):
                    os.remove(self.file(name))
            return
        self.history = [r for r in self._read_rows() if r["step"] <= resumed_step]
        self._rewrite()

    def _read_rows(self) -> list[dict]:
        rows = []
        if not os.path.exists(self.file("metrics.jsonl")):
            return rows
        with open(self.file("metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        rows.append(row)
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
        return rows

    def log(self, row: dict) -> None:
        """Append one row (or, at the step of the last row, merge into it: the final evaluation), and
        send it to the trackers (a merged row's new values, at that step again)."""
        if self.history and self.history[-1]["step"] == row["step"]:
            self.history[-1].update(row)
            if self.is_main:
                self._rewrite()
        else:
            self.history.append(row)
            if self.is_main:
                with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def text(self, tag: str, text: str) -> None:
        """Send a text (the generated sample) to the trackers, at the last row's step; before finish()."""
        step = self.history[-1]["step"] if self.history else 0
        for tracker in self.trackers:
            tracker.text(tag, text, step)

    def _rewrite(self) -> None:
        path = self.file("metrics.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def median(self, key: str) -> Optional[float]:
        values = sorted(r[key] for r in self.history if r.get(key))
        return values[len(values) // 2] if values else None

    def finish(self, summary: dict) -> Optional[str]:
        """Write summary.json and loss.png and close the trackers; the plot's path, or None without
        matplotlib."""
        if not self.is_main:
            return None
        try:
            write_json_atomic(self.file("summary.json"), summary)
            return plot_losses(self.history, self.file("loss.png"))
        finally:
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []  # closed: a later text() has nowhere to go


# label: the keys it is drawn from, the first one a row has (train.py's val_loss, finetune.py's eval_loss)
CURVES = {"train": ("train_loss",), "validation": ("val_loss", "eval_loss"), "accuracy": ("eval_accuracy",)}


def loss_curves(history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """What loss.png draws: {label: (steps, values)} for the CURVES the rows have."""
    curves = {}
    for label, keys in CURVES.items():
        points = []
        for row in history:
            value = next((row[k] for k in keys if isinstance(row.get(k), (int, float))), None)
            if value is not None:
                points.append((row["step"], value))
        if points:
            steps, values = zip(*points)
            curves[label] = (list(steps), list(values))
    return curves


def plot_losses(history: list[dict], path: str) -> Optional[str]:
    """loss.png: train and validation loss against steps, and a classifier's accuracy on a second
    axis. None (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = loss_curves(history)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = []
    for label, style in (("train", {"lw": 1}), ("validation", {"marker": "o", "lw": 1.5})):
        if label in curves:
            lines += ax.plot(*curves[label], label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    if "accuracy" in curves:
        right = ax.twinx()
        lines += right.plot(*curves["accuracy"], label="accuracy", color="tab:green", marker="s", lw=1.5)
        right.set_ylabel("accuracy")
    if lines:
        ax.legend(handles=lines)  # one legend for both axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
