"""Non-finite losses and gradients: the step is skipped (the weights and the optimizer state do
not move), `max_skips` bounds the skipping, and past it the run stops with a message naming the
step while the last good checkpoint stays on disk. Non-finite weights are never saved, a
non-finite validation loss fails the run, and absurd settings are refused before any step.

Faults are injected into GPT.forward of train.py's own loop (train.main in this process), at
chosen steps (1-based, as in metrics.jsonl): "nan", "inf" or "-inf" losses, or "grad" (a finite
loss whose gradients are infinite)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minillm import build_model
from minillm.checkpoint import find_checkpoint, read_tensors
from minillm.config import ModelConfig
from minillm.gpt import GPT
from minillm.training import TrainingStopped, TrainSettings, TrainState, save_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402


REAL_FORWARD = GPT.forward


class InfiniteGrad(torch.autograd.Function):
    """Identity forward; infinite gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


class Faults:
    """Wraps GPT.forward: in training mode, the last micro-batch of a faulty step gets its fault;
    `eval_fault` spoils evaluation losses."""

    def __init__(self, monkeypatch, faults: dict, grad_accum: int = 1, eval_fault=None):
        self.faults, self.grad_accum, self.calls, self.eval_fault = faults, grad_accum, 0, eval_fault
        real = REAL_FORWARD

        def forward(model, idx, targets=None, **kw):
            logits, loss = real(model, idx, targets, **kw)
            if targets is None:
                return logits, loss
            if not model.training:
                return logits, loss * float(self.eval_fault) if self.eval_fault else loss
            step, micro = self.calls // self.grad_accum + 1, self.calls % self.grad_accum
            self.calls += 1
            fault = self.faults.get(step) if micro == self.grad_accum - 1 else None
            if fault == "grad":
                return logits, InfiniteGrad.apply(loss)
            if fault in ("nan", "inf"):
                return logits, loss * float(fault)
            return logits, loss - math.inf if fault == "-inf" else loss

        monkeypatch.setattr(GPT, "forward", forward)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    return str(path)


def run(corpus, out, *extra):
    args = ["--data", corpus, "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "16", "--batch-size", "2", "--eval-iters", "1", "--no-progress", "--sample-tokens", "0",
            "--warmup-steps", "0", "--lr", "1e-2", "--max-steps", "8", "--eval-interval", "0", "--log-interval", "1",
            "--ckpt-interval", "1", "--max-skips", "2", "--dtype", "float32", *map(str, extra)]
    return train.main(args)


def saved(out):
    ckpt = find_checkpoint(str(out))
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    return read_tensors(os.path.join(ckpt, "model.safetensors")), read_tensors(os.path.join(ckpt, "optimizer.safetensors")), state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["nan", "inf", "-inf", "grad"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_non_finite_step_is_skipped(tmp_path, corpus, monkeypatch, capsys, fault, grad_accum):
    """A fault at step 3: steps 2 and 4 move the weights, step 3 leaves weights and optimizer
    state exactly as they were, and is counted and reported by its number."""
    after = {}
    for stop in (2, 3, 4):
        Faults(monkeypatch, {3: fault}, grad_accum)
        assert run(corpus, tmp_path / f"s{stop}", "--stop-at-step", stop, "--grad-accum", grad_accum) == 0
        after[stop] = saved(tmp_path / f"s{stop}")
    (w2, o2, _), (w3, o3, st3), (w4, o4, st4) = after[2], after[3], after[4]
    assert same(w2, w3) and same(o2, o3), "a skipped step changed the weights or the optimizer state"
    assert not same(w3, w4) and not same(o3, o4)
    assert st3["skips"] == st4["skips"] == 1 and st3["step"] == 3
    skipped = [line for line in capsys.readouterr().out.splitlines() if "non-finite" in line]
    assert len(skipped) == 2 and all(line.startswith("step 3: non-finite") for line in skipped)
    assert all(torch.isfinite(v).all() for v in w4.values())


def test_max_skips_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    """Steps 4 onwards diverge; max_skips=2: steps 4 and 5 are skipped (and checkpointed: the
    weights are those after step 3), step 6 stops the run with a message naming it."""
    Faults(monkeypatch, {})
    run(corpus, tmp_path / "good", "--stop-at-step", 3)
    after_3 = saved(tmp_path / "good")[0]
    Faults(monkeypatch, {s: "nan" for s in range(4, 20)})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"stopped at step 6: 3 non-finite steps exceed --max-skips 2") as info:
        run(corpus, out)
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert find_checkpoint(str(out)) == os.path.join(str(out), "checkpoint")
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint.tmp-")]
    weights, _, state = saved(out)
    assert (state["step"], state["skips"]) == (5, 2)
    assert same(weights, after_3)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [math.isfinite(r["train_loss"]) for r in rows] == [True, True, True, False, False]


def test_skips_below_the_bound_let_the_run_finish(tmp_path, corpus, monkeypatch):
    Faults(monkeypatch, {2: "nan", 5: "grad"})
    assert run(corpus, tmp_path / "out", "--max-steps", 6) == 0
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2


def test_max_skips_zero_stops_at_the_first(tmp_path, corpus, monkeypatch):
    Faults(monkeypatch, {2: "inf"})
    with pytest.raises(ValueError, match="stopped at step 2"):
        run(corpus, tmp_path / "out", "--max-skips", 0)


def test_skip_count_survives_a_resume(tmp_path, corpus, monkeypatch):
    """The count is part of the checkpoint: a resumed run cannot skip max_skips more."""
    Faults(monkeypatch, {2: "nan", 3: "nan"})
    assert run(corpus, tmp_path / "out", "--stop-at-step", 4) == 0
    faults = Faults(monkeypatch, {5: "nan"})
    faults.calls = 4  # the fault schedule continues at step 5
    with pytest.raises(ValueError, match="stopped at step 5"):
        train.main(["--out", str(tmp_path / "out"), "--resume", "--no-progress"])


def test_non_finite_validation_loss_fails_the_run(tmp_path, corpus, monkeypatch):
    Faults(monkeypatch, {}, eval_fault="nan")
    with pytest.raises(ValueError, match="non-finite validation loss"):
        run(corpus, tmp_path / "out", "--max-steps", 2)


def test_non_finite_weights_are_never_saved(tmp_path):
    """A save of weights that are no longer finite stops the run and leaves the last good checkpoint."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    s = TrainSettings()

    class NoData:
        def state(self):
            return {}

    def save():
        return save_training(str(tmp_path), model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                             TrainState(step=3), s, NoData(), config=model.config, tokenizer=None, extra={})

    good = save()
    before = read_tensors(os.path.join(good, "model.safetensors"))
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = math.inf
    with pytest.raises(TrainingStopped, match="no longer finite"):
        save()
    assert same(read_tensors(os.path.join(good, "model.safetensors")), before)


@pytest.mark.parametrize("field,value", [("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("lr", 1e30),
                                         ("weight_decay", math.nan), ("beta2", 1.5), ("beta1", -0.1),
                                         ("grad_clip", -1.0), ("min_lr_ratio", 2.0)])
def test_absurd_settings_are_refused(field, value):
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        TrainSettings(**{field: value}).validate()


WRAPPER = """
import math, runpy, sys
from minillm.gpt import GPT
real = GPT.forward
calls = [0]
def forward(model, idx, targets=None, **kw):
    logits, loss = real(model, idx, targets, **kw)
    if targets is not None and model.training:
        calls[0] += 1
        if calls[0] >= 2:
            loss = loss * math.nan
    return logits, loss
GPT.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_diverging_run_stops_with_one_line(tmp_path, corpus):
    """train.py whose losses turn non-finite from step 2: steps 2-5 are skipped (--max-skips 3),
    the fourth skip stops the run: exit code 2, one line naming the step; the checkpoint left
    holds finite weights. Absurd hyperparameters are refused before any step, also in one line."""
    wrapper = tmp_path / "diverge.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "run"
    common = [os.path.join(ROOT, "train.py"), "--data", corpus, "--out", str(out), "--n-layer", "1", "--n-head", "2",
              "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--eval-iters", "1", "--no-progress",
              "--sample-tokens", "0", "--warmup-steps", "0", "--max-steps", "20", "--eval-interval", "0",
              "--ckpt-interval", "1", "--log-interval", "1", "--max-skips", "3", "--dtype", "float32"]
    proc = subprocess.run([sys.executable, str(wrapper), *common], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "stopped at step 5: 4 non-finite steps exceed --max-skips 3" in lines[0]
    skipped = [line for line in proc.stdout.splitlines() if "step skipped" in line]
    assert [s.split(":")[0] for s in skipped] == ["step 2", "step 3", "step 4", "step 5"]
    state = json.load(open(out / "checkpoint" / "trainer_state.json"))
    assert (state["step"], state["skips"]) == (4, 3)
    weights = read_tensors(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    for flag, value in (("--lr", "1e30"), ("--weight-decay", "nan"), ("--beta2", "1.5"), ("--grad-clip", "-1")):
        proc = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "r2"), flag, value], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (flag, proc.stderr)
        assert flag in proc.stderr.strip().splitlines()[-1] and not (tmp_path / "r2" / "checkpoint").exists()


def test_float16_scaler_overflows_are_never_fatal():
    """With float16 the loss scaler starts high and halves on overflow: those skipped steps are
    how it calibrates, so they are counted but never stop the run (without a scaler they do)."""
    from minillm.training import skip_step

    s, state = TrainSettings(max_skips=0), TrainState()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    for _ in range(3):
        skip_step(state, s, math.inf, "out", log=lambda *a: None, scaler=scaler)
    assert state.skips == 3
    with pytest.raises(TrainingStopped, match="exceed --max-skips 0"):
        skip_step(state, s, math.nan, "out", log=lambda *a: None)
