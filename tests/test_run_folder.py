"""The output folder of a run, as a user meets it: one run at a time (a lock naming the owner,
taken over from a dead one), an earlier run kept as <out>.prev, a checkpoint within a bounded
time even when the recipe never evaluates (kill -9, then --resume), Ctrl-C saving before it exits,
and --resume continuing the saved settings."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from minillm.checkpoint import find_checkpoint, read_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
        "--eval-iters", "1", "--no-progress", "--sample-tokens", "0", "--eval-interval", "0", "--dtype", "float32"]


def setup(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    env = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    return str(corpus), env


def start(args, env, cwd, log):
    return subprocess.Popen([sys.executable, TRAIN, *args], env=env, cwd=cwd, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait_for(proc, cond, what, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"train.py ended before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def run(args, env, cwd):
    return subprocess.run([sys.executable, TRAIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_two_runs_into_one_folder(tmp_path):
    """The second run exits 2 naming the folder and the first run's process; after the first is
    killed, its stale lock is taken over with a note."""
    corpus, env = setup(tmp_path)
    out = tmp_path / "run"
    first = start(["--data", corpus, "--out", str(out), *TINY, "--time-budget", "120", "--max-steps", "100000"],
                  env, tmp_path, tmp_path / "first.log")
    try:
        wait_for(first, lambda: "parameters" in (tmp_path / "first.log").read_text(), "the first run to start")
        second = run(["--data", corpus, "--out", str(out), *TINY, "--max-steps", "2"], env, tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and str(out) in lines[0] and f"process {first.pid}" in lines[0], lines
    finally:
        first.kill()
        first.wait()
    third = run(["--data", corpus, "--out", str(out), *TINY, "--max-steps", "2"], env, tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"taking over {out} from a run that is gone (process {first.pid})" in third.stdout
    assert not (out / ".lock").exists()


def test_fresh_run_keeps_the_earlier_one(tmp_path):
    corpus, env = setup(tmp_path)
    out = tmp_path / "run"
    assert run(["--data", corpus, "--out", str(out), *TINY, "--max-steps", "3"], env, tmp_path).returncode == 0
    first = read_tensors(str(out / "checkpoint" / "model.safetensors"))
    proc = run(["--data", corpus, "--out", str(out), *TINY, "--max-steps", "2"], env, tmp_path)
    assert proc.returncode == 0 and f"it is kept in {out}.prev" in proc.stdout, proc.stdout + proc.stderr
    kept = read_tensors(str(tmp_path / "run.prev" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(first[k], kept[k]) for k in first)
    assert json.load(open(tmp_path / "run.prev" / "summary.json"))["steps"] == 3
    assert json.load(open(out / "summary.json"))["steps"] == 2


def test_kill_9_before_any_evaluation_leaves_a_checkpoint(tmp_path):
    """A recipe that never evaluates (eval_interval 0) still checkpoints every --ckpt-seconds of
    training: kill -9, then --resume continues from there."""
    corpus, env = setup(tmp_path)
    out = tmp_path / "run"
    proc = start(["--data", corpus, "--out", str(out), *TINY, "--time-budget", "60", "--max-steps", "100000",
                  "--ckpt-seconds", "1"], env, tmp_path, tmp_path / "log")
    try:
        wait_for(proc, lambda: (out / "checkpoint" / "trainer_state.json").exists(), "a timed checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = find_checkpoint(str(out))
    step = json.load(open(os.path.join(ckpt, "trainer_state.json")))["step"]
    assert step > 0
    resumed = run(["--out", str(out), "--resume", "--stop-at-step", str(step + 2), "--no-progress"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed {out} at step {step}" in resumed.stdout


def test_ctrl_c_saves_before_it_exits(tmp_path):
    corpus, env = setup(tmp_path)
    out = tmp_path / "run"
    log = tmp_path / "log"
    proc = start(["--data", corpus, "--out", str(out), *TINY, "--time-budget", "60", "--max-steps", "100000"],
                 env, tmp_path, log)
    try:
        wait_for(proc, lambda: "parameters" in log.read_text(), "the run to start")
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and "train.py: interrupted" in text, text
    state = json.load(open(out / "checkpoint" / "trainer_state.json"))
    assert state["step"] > 0 and f"saved {out}/checkpoint at step {state['step']}" in text, text
    assert not (out / ".lock").exists()


def test_resume_restores_the_saved_settings(tmp_path):
    """Resuming with only --out continues on the same data, recipe and lr; a contradicting flag
    is refused by name and nothing is written."""
    corpus, env = setup(tmp_path)
    out = tmp_path / "run"
    assert run(["--data", corpus, "--out", str(out), *TINY, "--lr", "1e-4", "--batch-size", "3", "--max-steps", "8",
                "--stop-at-step", "4"], env, tmp_path).returncode == 0
    os.makedirs(tmp_path / "elsewhere")
    proc = run(["--out", str(out), "--resume", "--no-progress"], env, tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = json.load(open(out / "checkpoint" / "config.json"))["train"]
    assert (cfg["lr"], cfg["batch_size"], cfg["data"], cfg["max_steps"]) == (1e-4, 3, corpus, 8)
    assert json.load(open(out / "summary.json"))["steps"] == 8
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert max(r["lr"] for r in rows if "lr" in r) <= 1e-4
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    for flag, value in (("--lr", "1e-3"), ("--batch-size", "4"), ("--data", str(tmp_path / "other.txt"))):
        proc = run(["--out", str(out), "--resume", flag, value], env, tmp_path)
        assert proc.returncode == 2 and flag in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
