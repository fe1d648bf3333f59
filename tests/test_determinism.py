"""Determinism: the same seed and config give bit-identical losses and weights on the CPU across
two separate train.py runs (float32, dropout on, so the random streams matter); another seed
gives other losses."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from minillm.checkpoint import read_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "2", "--no-progress", "--sample-tokens", "0", "--warmup-steps", "2", "--dropout", "0.1",
        "--max-steps", "10", "--eval-interval", "5", "--log-interval", "1", "--dtype", "float32"]


def test_same_seed_same_bits_other_seed_other_losses(tmp_path):
    if os.path.exists(SHAKESPEARE):
        text = open(SHAKESPEARE, encoding="utf-8").read()[:20000]
    else:
        from minillm.data import read_corpus

        text = read_corpus(None)[0][:20000]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)

    def run(name, seed):
        # separate token caches too: nothing is shared between the runs but the inputs
        e = {**env, "MINILLM_CACHE": str(tmp_path / f"cache-{name}")}
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "c.txt"),
                               "--out", str(tmp_path / name), "--seed", str(seed), *ARGS],
                              env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return rows, read_tensors(str(tmp_path / name / "checkpoint" / "model.safetensors"))

    with ThreadPoolExecutor(2) as pool:  # two cores
        (a, wa), (b, wb), (c, _) = pool.map(lambda r: run(*r), [("a", 1234), ("b", 1234), ("c", 4321)])
    losses = [[(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows] for rows in (a, b, c)]
    assert [s for s, _, _ in losses[0]] == list(range(1, 11))
    assert losses[0] == losses[1]  # exact float equality, every step
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the seed matters: another gives other losses from the first step (init, batches, dropout)
    assert all(x[1] != y[1] for x, y in zip(losses[0], losses[2]))
