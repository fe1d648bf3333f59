"""Non-finite losses and gradients: the step is skipped (the weights and the optimizer state do
not move), `max_skips` bounds the skipping, and past it the run stops with a message naming the
step while the last good checkpoint stays on disk."""
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
from minillm.training import Trainer, TrainingStopped, TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))


class Faults:
    """loss_fn and get_batch for a Trainer, with a fault at chosen steps (1-based, as in
    metrics.jsonl): "nan", "inf" or "-inf" losses, or "grad" (a finite loss whose gradients are inf)."""

    def __init__(self, model, faults: dict, grad_accum: int = 1):
        self.faults, self.grad_accum, self.calls = faults, grad_accum, 0
        self.gen = torch.Generator().manual_seed(0)
        # a gradient hook that turns the gradients of one weight infinite when armed
        self.armed = False
        model.tok_emb.weight.register_hook(lambda g: g * math.inf if self.armed else g)

    def get_batch(self):
        x = torch.randint(0, 64, (4, 8), generator=self.gen)
        return x, torch.roll(x, -1, dims=1)

    def loss_fn(self, model, batch):
        step = self.calls // self.grad_accum + 1
        micro = self.calls % self.grad_accum
        self.calls += 1
        _, loss = model(*batch)
        fault = self.faults.get(step) if micro == self.grad_accum - 1 else None  # the last micro-batch only
        self.armed = fault == "grad"
        if fault in ("nan", "inf", "-inf"):
            loss = loss * float(fault) if fault != "-inf" else loss - math.inf
        return loss, batch[0].numel()


def make_trainer(tmp_path, model, faults, log=None, **kw):
    f = Faults(model, faults, kw.get("grad_accum", 1))
    settings = TrainSettings(**{**dict(lr=1e-2, warmup_steps=0, max_steps=8, eval_interval=0, log_interval=1,
                                       ckpt_interval=1, progress=False, max_skips=2), **kw})
    os.makedirs(tmp_path / "out", exist_ok=True)
    return Trainer(model, settings, str(tmp_path / "out"), get_batch=f.get_batch, loss_fn=f.loss_fn,
                   log=log or (lambda *a, **k: None))


def snapshot(trainer):
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    opt = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
           for st in trainer.optimizer.state.values()]
    return params, opt


def same(a, b):
    pa, oa = a
    pb, ob = b
    return all(torch.equal(pa[k], pb[k]) for k in pa) and len(oa) == len(ob) and all(
        all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(oa, ob))


@pytest.mark.parametrize("fault", ["nan", "inf", "-inf", "grad"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_non_finite_step_is_skipped(tmp_path, fault, grad_accum):
    """A fault at step 3: steps 1, 2 and 4 move the weights, step 3 leaves weights and optimizer
    state exactly as they were, and is counted and reported by its number."""
    messages = []
    trainer = make_trainer(tmp_path, tiny(), {3: fault}, log=messages.append, grad_accum=grad_accum)
    states = [snapshot(trainer)]
    for _ in range(4):
        loss, _ = trainer.train_step()
        trainer.step += 1
        states.append(snapshot(trainer))
        assert math.isfinite(loss) == (trainer.step != 3 or fault == "grad")
    assert not same(states[1], states[2]) and not same(states[3], states[4])
    assert same(states[2], states[3]), "a skipped step changed the weights or the optimizer state"
    assert trainer.skips == 1
    assert len(messages) == 1 and messages[0].startswith("step 3: non-finite")
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_max_skips_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """Steps 4 onwards diverge; max_skips=2: steps 4 and 5 are skipped (and checkpointed: the
    weights are those after step 3), step 6 stops the run with a message naming it."""
    model = tiny()
    trainer = make_trainer(tmp_path, model, {s: "nan" for s in range(4, 20)}, max_skips=2)
    after_3 = {}
    real_step = trainer.train_step

    def step_and_remember():
        out = real_step()
        if trainer.step == 2:  # step 3 just ran (trainer.step is incremented after)
            after_3.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return out

    trainer.train_step = step_and_remember
    with pytest.raises(TrainingStopped, match=r"stopped at step 6: 3 non-finite steps exceed --max-skips 2") as info:
        trainer.fit()
    assert "\n" not in str(info.value) and str(tmp_path / "out") in str(info.value)
    out = str(tmp_path / "out")
    ckpt = find_checkpoint(out)
    assert ckpt == os.path.join(out, "checkpoint")
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint.tmp-")]
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    assert (state["step"], state["skips"]) == (5, 2)
    saved = read_tensors(os.path.join(ckpt, "model.safetensors"))
    assert all(torch.equal(saved[k], after_3[k]) for k in saved)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [math.isfinite(r["train_loss"]) for r in rows] == [True, True, True, False, False]


def test_skips_below_the_bound_let_the_run_finish(tmp_path):
    trainer = make_trainer(tmp_path, tiny(), {2: "nan", 5: "grad"}, max_skips=2, max_steps=6)
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2


def test_max_skips_zero_stops_at_the_first(tmp_path):
    trainer = make_trainer(tmp_path, tiny(), {2: "inf"}, max_skips=0)
    with pytest.raises(TrainingStopped, match="stopped at step 2"):
        trainer.fit()


def test_skip_count_survives_a_resume(tmp_path):
    """The count is part of the checkpoint: a resumed run cannot skip max_skips more."""
    trainer = make_trainer(tmp_path, tiny(), {2: "nan", 3: "nan"}, max_skips=2, stop_at_step=4)
    trainer.fit()
    again = make_trainer(tmp_path, tiny(), {5: "nan"}, max_skips=2)
    assert again.resume() and again.step == 4 and again.skips == 2
    again.loss_fn.__self__.calls = 4  # the fault schedule continues at step 5
    with pytest.raises(TrainingStopped, match="stopped at step 5"):
        again.fit()


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0])
def test_non_finite_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="--lr"):
        TrainSettings(lr=lr).validate()


def test_cli_diverging_run_stops_with_one_line(tmp_path):
    """train.py with a learning rate of 1e30: the first step blows the weights up, the next ones
    are non-finite and skipped (--max-skips 3), the fourth skip stops the run: exit code 2, one
    line naming the step; the checkpoint left holds finite weights."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400))
    (tmp_path / "c.txt").write_text(text)
    env = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "c.txt"), "--out", str(out),
         "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
         "--eval-iters", "1", "--no-progress", "--sample-tokens", "0", "--warmup-steps", "0", "--max-steps", "20",
         "--eval-interval", "0", "--ckpt-interval", "1", "--log-interval", "1", "--lr", "1e30", "--max-skips", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
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
