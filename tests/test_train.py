"""train.py end to end on tiny models: resume equivalence, DDP equivalence, the token cache,
outputs, and the bad-input paths (one line, exit code 2, nothing overwritten)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from minillm.data import Batches, LMData, mask_tokens, read_corpus, split, tokenize_corpus
from minillm.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "2", "--no-progress", "--sample-tokens", "0", "--warmup-steps", "2", "--dtype", "float32"]


def run_train(args, tmp_path, check=True, env_extra=None, launcher=None):
    env = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "train.py")] + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real-text corpus: the first 60k characters of Tiny Shakespeare when present,
    else Python's docs."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    if os.path.exists(SHAKESPEARE):
        text = open(SHAKESPEARE, encoding="utf-8").read()[:60000]
    else:
        text = read_corpus(None)[0][:60000]
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_default_run_writes_every_output(tmp_path, corpus):
    out = tmp_path / "run"
    proc = run_train(["--data", corpus, "--out", str(out), "--max-steps", "8", "--eval-interval", "4",
                      *TINY, "--sample-tokens", "20"], tmp_path)
    for name in ("metrics.jsonl", "summary.json", "checkpoint/model.safetensors", "checkpoint/config.json",
                 "checkpoint/char_tokenizer.json", "checkpoint/optimizer.safetensors",
                 "checkpoint/trainer_state.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["val_loss"] > 0 and summary["tok_per_s"] > 0
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert "--- sample ---" in proc.stdout
    # the checkpoint samples through the documented command
    gen = subprocess.run([sys.executable, "-m", "minillm.generate", "--ckpt", str(out), "--prompt", "KING",
                          "--tokens", "10", "--temperature", "0"], capture_output=True, text=True, cwd=ROOT)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("KING")


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_resume_continues_exactly(tmp_path, corpus, model):
    """Stopping at step 6 and resuming gives the same later losses and final weights, bit for
    bit, as one uninterrupted run (CPU, float32)."""
    common = ["--data", corpus, "--model", model, "--max-steps", "12", "--eval-interval", "4",
              "--log-interval", "1", "--dropout", "0.1", *TINY]
    run_train([*common, "--out", str(tmp_path / "a")], tmp_path)
    run_train([*common, "--out", str(tmp_path / "b"), "--stop-at-step", "6"], tmp_path)
    run_train([*common, "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    a = {r["step"]: r["train_loss"] for r in metrics(tmp_path / "a")}
    b = {r["step"]: r["train_loss"] for r in metrics(tmp_path / "b")}
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_match_one(tmp_path, corpus):
    """torchrun with 2 CPU processes (gloo) at batch 4 each equals one process at batch 8."""
    common = ["--data", corpus, "--max-steps", "6", "--eval-interval", "0", "--log-interval", "1",
              *[a for a in TINY if a not in ("--batch-size", "4")]]
    run_train([*common, "--batch-size", "8", "--out", str(tmp_path / "one")], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_train([*common, "--batch-size", "4", "--out", str(tmp_path / "two")], tmp_path, launcher=launcher)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-5, (r1, r2)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_ddp_bert_pretraining_runs(tmp_path, corpus):
    """Masked-LM pretraining under torchrun: every weight gets a gradient (no pooler is built, which
    the MLM loss would never reach), so DDP does not stop at step 2 (issue 13.4)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "bert"
    run_train(["--model", "bert", "--data", corpus, "--max-steps", "3", "--eval-interval", "0", *TINY, "--out", str(out)],
              tmp_path, launcher=launcher)
    assert metrics(out)[-1]["step"] == 3
    assert not any(k.startswith("pooler") for k in weights(out))


def test_token_cache_is_keyed_by_content_and_tokenizer(tmp_path):
    docs = ["hello world, " * 50, "second document"]
    tok = CharTokenizer.train("".join(docs))
    a = tokenize_corpus(docs, tok, cache=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and isinstance(a, np.memmap)
    a = np.array(a)  # a copy: the file is damaged on purpose below
    assert tok.decode(a[: len(docs[0])].tolist()) == docs[0]
    b = tokenize_corpus(docs, tok, cache=str(tmp_path))  # read back, not rebuilt
    assert os.listdir(tmp_path) == files and np.array_equal(a, b)
    tokenize_corpus(docs + ["more"], tok, cache=str(tmp_path))  # other content, other entry
    tokenize_corpus(docs, CharTokenizer.train("".join(docs) + "xyz"), cache=str(tmp_path))  # other tokenizer
    assert len(os.listdir(tmp_path)) == 3
    # a damaged entry is rebuilt rather than trusted
    with open(tmp_path / files[0], "wb") as f:
        f.write(b"garbage")
    c = tokenize_corpus(docs, tok, cache=str(tmp_path))
    assert np.array_equal(a, c)


def test_batches_and_masking():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, 16, seed=0)
    x, y = b.causal_lm(8)
    assert x.shape == (8, 16) and torch.equal(y, x + 1)
    tok = CharTokenizer.train("abcdefghij")
    # under torchrun each process keeps its slice of the global batch, masks included: two processes
    # at batch 4 see, batch after batch, what one process at batch 8 sees
    for mask_with in (None, tok):
        one = LMData(tokens, tokens, 16, 8, 3, torch.device("cpu"), mask_with=mask_with)
        parts = [LMData(tokens, tokens, 16, 4, 3, torch.device("cpu"), mask_with=mask_with, rank=r, world=2) for r in (0, 1)]
        for _ in range(3):
            x, y = one.next()
            (x0, y0), (x1, y1) = parts[0].next(), parts[1].next()
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    x = torch.randint(3, 13, (64, 64))
    inp, tgt = mask_tokens(x, tok, tok.vocab_size, torch.Generator().manual_seed(0))
    chosen = tgt != -100
    assert 0.12 < chosen.float().mean() < 0.18
    assert torch.equal(tgt[chosen], x[chosen])
    masked = (inp == tok.mask_id) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert torch.equal(inp[~chosen], x[~chosen])


def test_split_errors():
    with pytest.raises(ValueError, match="fewer than one context window"):
        split(np.arange(20), 0.1, 32)


def _expect_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_inputs_exit_2(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("to be or not")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    cases = [
        (["--data", str(empty)], ["empty"]),
        (["--data", str(short)], ["context window"]),
        (["--data", str(latin)], ["latin1.txt", "UTF-8"]),
        (["--data", str(tmp_path / "missing.txt")], ["missing.txt"]),
        (["--preset", "gpt-nonsense"], ["unknown preset"]),
        (["--n-head", "3", "--data", corpus], ["n_head=3", "n_embd"]),
        (["--val-fraction", "1.5", "--data", corpus], ["--val-fraction"]),
        (["--lr", "-1", "--data", corpus], ["--lr"]),
    ]
    for args, words in cases:
        _expect_error(run_train([*TINY, *args, "--max-steps", "1", "--out", str(tmp_path / "x")], tmp_path,
                                check=False), *words)
    for args in (["--dtype", "float64"], ["--compile", "maybe"], ["--max-steps", "0"]):
        proc = run_train([*args, "--out", str(tmp_path / "x")], tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_out_with_other_shape_is_refused_and_untouched(tmp_path, corpus):
    out = tmp_path / "run"
    run_train(["--data", corpus, "--out", str(out), "--max-steps", "2", "--eval-interval", "0", *TINY], tmp_path)
    before = {p: hashlib.sha256((out / p).read_bytes()).hexdigest()
              for p in ("checkpoint/model.safetensors", "metrics.jsonl", "summary.json")}
    proc = run_train(["--data", corpus, "--out", str(out), "--max-steps", "2", *TINY, "--n-embd", "64"],
                     tmp_path, check=False)
    _expect_error(proc, "another shape")
    proc = run_train(["--data", corpus, "--out", str(out), "--max-steps", "4", *TINY, "--resume",
                      "--block-size", "64"], tmp_path, check=False)
    _expect_error(proc, "--block-size 64 (checkpoint: 32)", "--max-steps 4 (checkpoint: 2)")
    after = {p: hashlib.sha256((out / p).read_bytes()).hexdigest() for p in before}
    assert before == after
    _expect_error(run_train(["--data", corpus, "--out", str(tmp_path / "none"), "--resume", *TINY], tmp_path,
                            check=False), "--resume", "no checkpoint")


def test_no_validation_split(tmp_path, corpus):
    """--val-fraction 0: no evaluation, no NaN printed, and the end-of-run sample starts from the
    training text instead of crashing on an empty validation split."""
    out = tmp_path / "run"
    proc = run_train(["--data", corpus, "--out", str(out), "--max-steps", "3", "--val-fraction", "0",
                      *[a for a in TINY if a not in ("--sample-tokens", "0")], "--sample-tokens", "10"], tmp_path)
    assert "--- sample ---" in proc.stdout and "nan" not in proc.stdout.lower()
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 3 and "val_loss" not in summary


def test_compile_without_a_compiler_runs_eagerly(tmp_path, corpus):
    """torch.compile on the CPU needs a C++ compiler: without one, a one-line notice and an eager run
    (not a 157-line InvalidCxxCompiler traceback)."""
    proc = run_train(["--data", corpus, "--out", str(tmp_path / "run"), "--max-steps", "2", "--compile", *TINY],
                     tmp_path, env_extra={"CXX": str(tmp_path / "no-such-compiler")})
    assert "note: --compile needs a C++ compiler" in proc.stdout and "Traceback" not in proc.stderr
    assert json.load(open(tmp_path / "run" / "summary.json"))["compile_seconds"] == 0


def test_ddp_with_a_time_budget_stops_together(tmp_path, corpus):
    """Each process has its own clock; the stop is rank 0's decision, shared in the step's one
    collective, so both processes stop after the same step and exit 0 (they used to crash in gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_train(["--data", corpus, "--out", str(tmp_path / "run"), "--time-budget", "4", "--max-steps", "100000",
                      "--eval-interval", "0", *TINY], tmp_path, launcher=launcher)
    assert "Traceback" not in proc.stderr
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] > 1 and 4 <= summary["train_seconds"] < 8


def test_torch_floor_has_every_api_called():
    """pyproject's torch floor is at least the release that brought each API the package calls."""
    import re

    floor = re.search(r'"torch>=([0-9.]+)"', open(os.path.join(ROOT, "pyproject.toml")).read()).group(1)
    needs = {"torch.amp.GradScaler": (2, 3), "fused=": (2, 4)}  # GradScaler(device); fused AdamW on the CPU
    source = "".join(open(os.path.join(ROOT, f)).read() for f in ("train.py", "finetune.py", "minillm/training.py",
                                                                           "minillm/optim.py"))
    for api, version in needs.items():
        if api in source:
            assert tuple(map(int, floor.split(".")[:2])) >= version, (api, floor)


def test_one_host_sync_per_optimizer_step(tmp_path, corpus, monkeypatch):
    """The loop reads a tensor's value on the host (item, tolist, bool, int, float) once per
    optimizer step, whatever grad_accum is: on a GPU every such read stalls the pipeline.
    Steps that log, evaluate or checkpoint may read more; this run does none of those mid-run."""
    sys.path.insert(0, ROOT)
    import train as script

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    reads = []
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    real_loop = script.train

    def counting_loop(*args, **kw):
        originals = {n: getattr(torch.Tensor, n) for n in names}

        def counted(name):
            def read(self, *a, **k):
                reads.append(name)
                return originals[name](self, *a, **k)
            return read

        for n in names:
            monkeypatch.setattr(torch.Tensor, n, counted(n))
        try:
            return real_loop(*args, **kw)
        finally:
            for n in names:
                monkeypatch.setattr(torch.Tensor, n, originals[n])

    monkeypatch.setattr(script, "train", counting_loop)
    args = ["--data", corpus, "--out", str(tmp_path / "run"), *TINY, "--max-steps", "6", "--grad-accum", "3",
            "--log-interval", "100", "--eval-interval", "0", "--ckpt-seconds", "1e9"]
    assert script.main(args) == 0
    assert len(reads) == 6, reads


def test_run_that_cannot_fit_is_refused_before_allocating(tmp_path, corpus):
    """--n-embd 16384 is a 13-billion-parameter model: refused in one line with the estimate and the
    free memory, before the weights exist (the process stays small), instead of exhausting the machine."""
    proc = run_train(["--data", corpus, "--out", str(tmp_path / "run"), "--n-embd", "16384", "--max-steps", "1"],
                     tmp_path, check=False)
    _expect_error(proc, "needs about", "GiB free")
    from minillm.config import preset
    from minillm.memory import training_bytes

    small = training_bytes(10**6, preset("gpt-cpu", vocab_size=100), batch=16, block=128)
    assert 16 * 10**6 < small < 2**30  # the recipes' models are estimated at well under a GiB


def test_device_and_dtype_flags(tmp_path, corpus):
    """--device cpu --dtype auto runs and says what it chose and why; a device that is not here
    is one line and exit code 2, before anything is written."""
    out = tmp_path / "run"
    proc = run_train([*TINY, "--data", corpus, "--device", "cpu", "--dtype", "auto", "--max-steps", "5",
                      "--out", str(out)], tmp_path)
    chosen = json.load(open(out / "summary.json"))["dtype"]
    assert chosen in ("float32", "bfloat16") and "--dtype auto: a forward and backward takes" in proc.stdout
    assert json.load(open(out / "summary.json"))["device"] == "cpu"
    saved = json.load(open(out / "checkpoint" / "config.json"))["train"]
    assert saved["dtype"] == chosen  # a resumed run keeps the dtype auto chose, it does not choose again
    missing = ["cuda:99"] if torch.cuda.is_available() else ["cuda", "cuda:1"]
    for spec in [*missing, "tpu"]:
        proc = run_train([*TINY, "--data", corpus, "--device", spec, "--out", str(tmp_path / spec)], tmp_path, check=False)
        _expect_error(proc, "--device", spec)
        assert not (tmp_path / spec).exists()
