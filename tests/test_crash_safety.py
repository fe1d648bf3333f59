"""Crash safety: train.py killed with SIGKILL at random moments (inside a training step, inside
a checkpoint write, between the renames that swap a checkpoint in) and resumed each time ends
with the same loss curve and the same weights, bit for bit, as a run that was never
interrupted; no checkpoint folder is ever seen half written. Also: an unwritable --out and a
disk that fills up during a save give one clear error and leave the previous checkpoint intact.

The killed runs go through a small wrapper that runs train.py unchanged but makes every step
of a checkpoint save pause (each file written, each rename), so that kills aimed at a save
land inside it; the uninterrupted reference run is plain train.py.
"""
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from minillm.checkpoint import find_checkpoint, load_model, read_tensors, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
STEPS = 24
ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "2", "--no-progress", "--sample-tokens", "0", "--warmup-steps", "3", "--dropout", "0.1",
        "--ckpt-interval", "1", "--eval-interval", "10", "--log-interval", "1", "--max-steps", str(STEPS), "--dtype", "float32"]
FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json", "char_tokenizer.json")
PAUSE = 0.05  # seconds after each file of a save; three times that after each rename

WRAPPER = '''
import os, runpy, sys, time
import minillm.checkpoint as ckpt

PAUSE = float(os.environ["SAVE_PAUSE"])

def slow(fn, pause):
    def wrapped(*a, **k):
        result = fn(*a, **k)
        time.sleep(pause)
        return result
    return wrapped

class SlowRenames:  # the os module, as the checkpoint code sees it, with a pause after each rename
    def __getattr__(self, name):
        return getattr(os, name)
    replace = staticmethod(slow(os.replace, 3 * PAUSE))

ckpt._save_tensors = slow(ckpt._save_tensors, PAUSE)
ckpt._write_json = slow(ckpt._write_json, PAUSE)
ckpt.os = SlowRenames()
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def env(tmp_path):
    e = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
         "SAVE_PAUSE": str(PAUSE), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.pop("TRITON_INTERPRET", None)
    return e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    if os.path.exists(SHAKESPEARE):
        text = open(SHAKESPEARE, encoding="utf-8").read()[:30000]
    else:
        from minillm.data import read_corpus

        text = read_corpus(None)[0][:30000]
    path.write_text(text, encoding="utf-8")
    return str(path)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def temp_folders(out):
    """Temporary folders of saves in progress (not the renamed-away old ones on their way out)."""
    return {n for n in os.listdir(out) if n.startswith(".checkpoint.tmp-") and not n.endswith(("-old", "-stale"))}


def assert_complete(path):
    """Every file present and readable: the weights load into a model, the optimizer moments and
    the trainer state parse."""
    missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
    assert not missing, f"{path} is half written: {missing} missing"
    model, tok, _ = load_model(path)
    assert tok is not None
    assert read_tensors(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["step"]


def state_after_kill(out, before_tmp, had_checkpoint):
    """Where the kill landed, judged from what it left, after checking that every checkpoint
    folder there is complete and that the one a resume would pick is one of them."""
    ck, old = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old")
    steps = {p: assert_complete(p) for p in (ck, old) if os.path.isdir(p)}
    found = find_checkpoint(out)
    assert (found is None) == (not steps)
    if found is not None:
        assert os.path.normpath(found) == (ck if os.path.isdir(ck) else old)
    new_tmp = temp_folders(out) - before_tmp
    if not steps:
        where = "inside the first checkpoint write"
    elif os.path.isdir(old) and not os.path.isdir(ck):
        # (a run resumed from checkpoint.old has only that one until its first save is in place)
        where = "between the two renames of a save" if had_checkpoint else "inside a checkpoint write"
    elif os.path.isdir(old):
        where = "after the renames, before the old checkpoint was removed"
    elif new_tmp:
        where = "inside a checkpoint write"
    else:
        where = "inside a training step"
    return where, (steps[os.path.normpath(found)] if found else 0)


def wait_until(proc, cond, what, timeout=300.0):
    """Poll the output folder every few milliseconds until cond() holds; False if train.py ended."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if cond():
            return True
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"waiting for {what}: the moment to kill at never came")
        time.sleep(0.002)
    return False


# Where each aim must land (judged from what the kill left); a miss, possible on a loaded
# machine, is retried. Kills at random moments may land anywhere.
EXPECTED = {"first save": "inside the first checkpoint write", "writing": "inside a checkpoint write",
            "between renames": "between the two renames of a save",
            "after renames": "after the renames, before the old checkpoint was removed"}


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, corpus):
    e = env(tmp_path)
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(WRAPPER)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference run, plain train.py, alongside the killed ones
    ref = subprocess.Popen([sys.executable, TRAIN, "--data", corpus, "--out", str(ref_out), *ARGS], env=e,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rng = random.Random(7)
    ck, old = out / "checkpoint", out / "checkpoint.old"
    landed, last_step = [], 0

    def kill_once(aim, i):
        """Start (or resume) the slowed train.py, kill it at the moment aimed at; where it landed."""
        nonlocal last_step
        resume = out.exists() and find_checkpoint(str(out)) is not None
        had_checkpoint = ck.exists()
        before_tmp = temp_folders(out) if out.exists() else set()
        log = tmp_path / f"attempt{i}.log"
        proc = subprocess.Popen([sys.executable, str(wrapper), TRAIN, "--data", corpus, "--out", str(out), *ARGS,
                                 *(["--resume"] if resume else [])],
                                env=e, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT)

        def started():
            return "parameters" in log.read_text()

        def saving():  # a save of this process has written its first file
            return out.exists() and any(os.path.exists(out / t / "model.safetensors")
                                        for t in temp_folders(out) - before_tmp)

        def quiet():  # no save in progress: right after one, the next step runs
            return not old.exists() and not (temp_folders(out) - before_tmp) and not any(
                n.endswith("-old") for n in os.listdir(out))

        if aim == "first save":
            ok = wait_until(proc, lambda: saving() and not ck.exists(), aim)
        elif aim == "writing":
            ok = wait_until(proc, lambda: saving() and ck.exists(), aim)
            time.sleep(rng.uniform(0, 2 * PAUSE))  # somewhere among the files
        elif aim == "between renames":
            ok = wait_until(proc, saving, aim) and wait_until(proc, lambda: old.exists() and not ck.exists(), aim)
        elif aim == "after renames":
            ok = wait_until(proc, saving, aim) and wait_until(proc, lambda: old.exists() and ck.exists(), aim)
        elif aim == "step":
            ok = wait_until(proc, saving, aim) and wait_until(proc, quiet, aim)
        else:
            ok = wait_until(proc, started, aim)
            time.sleep(rng.uniform(0.0, 3.0))
        if not ok or proc.poll() is not None:
            assert proc.wait() == 0, log.read_text()
            return None
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        where, step = state_after_kill(str(out), before_tmp, had_checkpoint)
        assert step >= last_step, f"a kill lost finished work: checkpoint at step {step} after {last_step}"
        landed.append((aim, where, step))
        last_step = step
        return where

    plan = ["first save", "step", "writing", "between renames", "after renames", "random"]
    i = 0
    for aim in plan:
        for _ in range(3):
            i += 1
            where = kill_once(aim, i)
            if where is None or where == EXPECTED.get(aim, where) or (aim == "first save" and ck.exists()):
                break
        if where is None:
            break  # train.py finished before the moment came

    # let it finish
    proc = subprocess.run([sys.executable, TRAIN, "--data", corpus, "--out", str(out), *ARGS, "--resume"], env=e,
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref_log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_log
    print("\n".join(f"aimed at {a!r}: landed {w} (checkpoint at step {s})" for a, w, s in landed))
    wheres = {w for _, w, _ in landed}
    for must in ("inside the first checkpoint write", "inside a checkpoint write", "between the two renames of a save",
                 "after the renames, before the old checkpoint was removed"):
        assert must in wheres, (must, landed)
    assert len(landed) >= 5, landed

    # no leftovers: no temporary folder, no old checkpoint, each step once in the curve
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint.tmp-")], os.listdir(out)
    assert not old.exists()
    a, b = metrics(ref_out), metrics(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for key in ("train_loss", "lr", "val_loss"):
        assert [(r["step"], r.get(key)) for r in a] == [(r["step"], r.get(key)) for r in b], key
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa, wb = read_tensors(str(ref_out / "checkpoint" / name)), read_tensors(str(out / "checkpoint" / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert assert_complete(str(out / "checkpoint")) == STEPS


# ---------------------------------------------------------------------------------------------
# An unwritable --out, a full disk


def digest(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


def _tiny_save(out, model, step):
    from minillm.tokenizer import CharTokenizer

    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    return save_checkpoint(str(out), model, model.config, CharTokenizer.train("abc"), optimizer=opt,
                           trainer_state={"step": step})


@pytest.fixture
def tiny_model():
    from minillm import build_model
    from minillm.config import ModelConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=8))


@pytest.mark.parametrize("where", ["model.safetensors", "trainer_state.json", "swap"])
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny_model, monkeypatch, where):
    """ENOSPC half way through writing a file (or at the rename that swaps the new checkpoint in):
    the error reaches the caller, the previous checkpoint is byte for byte what it was, and no
    temporary folder is left."""
    import minillm.checkpoint as ckpt

    path = _tiny_save(tmp_path, tiny_model, 1)
    before = digest(path)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)  # the next save would differ

    def full(target, *a, **k):  # writes part of the file, then the disk is full
        with open(target, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", target)

    if where == "model.safetensors":
        monkeypatch.setattr(ckpt, "_save_tensors", lambda tensors, target, metadata=None: full(target))
    elif where == "trainer_state.json":
        real = ckpt._write_json
        monkeypatch.setattr(ckpt, "_write_json", lambda target, obj: full(target) if target.endswith(
            "trainer_state.json") else real(target, obj))
    else:
        class NoRoom:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if os.path.basename(dst) == "checkpoint":
                    raise OSError(errno.ENOSPC, "No space left on device", dst)
                os.replace(src, dst)

        monkeypatch.setattr(ckpt, "os", NoRoom())
    with pytest.raises(OSError) as info:
        _tiny_save(tmp_path, tiny_model, 2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # the previous checkpoint is there (as <name>.old when the failure came between the renames)
    found = find_checkpoint(str(tmp_path))
    assert found is not None and digest(found) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".checkpoint.tmp-")]
    # and the next save works and cleans up
    _tiny_save(tmp_path, tiny_model, 3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def run_together(cmds, env, cwd):
    """Run commands side by side (two cores); CompletedProcess for each."""
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    done = []
    for c, p in zip(cmds, procs):
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


FULL_DISK = '''
import errno, os, runpy, sys
import minillm.checkpoint as ckpt

def full(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device", path)

ckpt._save_tensors = full
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_cli_unwritable_out_and_full_disk(tmp_path, corpus):
    """Through train.py: an --out below a regular file, and a disk that fills up at the first save
    of a resumed run: one line, exit code 2, the previous checkpoint intact."""
    e = env(tmp_path)
    short = ["--data", corpus, *ARGS[:-2], "--max-steps", "4"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    procs = run_together([[sys.executable, TRAIN, *short, "--out", str(blocker / "out")],
                          [sys.executable, TRAIN, *short, "--out", str(out), "--stop-at-step", "2"]], e, tmp_path)
    _one_line_error(procs[0], "a-file")
    assert procs[1].returncode == 0, procs[1].stderr
    before = digest(out / "checkpoint")
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK)
    proc = subprocess.run([sys.executable, str(wrapper), TRAIN, *short, "--out", str(out), "--resume"], env=e,
                          cwd=tmp_path, capture_output=True, text=True)
    _one_line_error(proc, "No space left on device")
    # byte for byte the checkpoint that run 2 wrote (and that --resume just read), no leftovers
    assert digest(out / "checkpoint") == before
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.endswith((".old", ".tmp"))], os.listdir(out)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # the step whose save failed is logged, not saved


# ---------------------------------------------------------------------------------------------
# metrics.jsonl: the loss curve survives a crash while it is rewritten


def test_metrics_survive_a_crash_while_rewritten(tmp_path, monkeypatch):
    """On resume the curve is cut back to the checkpoint's step, and at the end the final
    evaluation is merged in: both rewrite metrics.jsonl. A process dying half way through
    either leaves the previous file whole (write to a temporary file, then rename)."""
    from minillm import run_dir
    from minillm.run_dir import RunDir

    run = RunDir(str(tmp_path))
    for step in range(1, 6):
        run.log({"step": step, "train_loss": 1.0 / step})
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes()
    real, calls = json.dumps, [0]

    def dies_on_the_third_row(obj, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # as good as a kill for what is on disk
        return real(obj, *a, **k)

    rewrites = {"truncate on resume": lambda: RunDir(str(tmp_path)).start(resumed_step=3),
                "merge the final evaluation": lambda: run.log({"step": 5, "val_loss": 0.5})}
    for name, rewrite in rewrites.items():
        calls[0] = 0
        monkeypatch.setattr(run_dir.json, "dumps", dies_on_the_third_row)
        with pytest.raises(KeyboardInterrupt):
            rewrite()
        monkeypatch.undo()
        assert path.read_bytes() == before, name


@pytest.mark.parametrize("tail", ['{"step": 4, "train_lo', '{"step": 3, "train_loss": 0.5}', "\x00\x00\x00"])
def test_metrics_line_cut_short_by_a_crash(tmp_path, tail):
    """The last line as a crash may leave it (cut short, or whole but without its newline, or
    zeros from a file system that extended the file first): resuming at step 3 keeps steps 1-3,
    each once, and the lines written next are whole lines."""
    from minillm.run_dir import RunDir

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (1, 2)) + tail)
    run = RunDir(str(tmp_path))
    run.start(resumed_step=3)
    run.log({"step": 4, "train_loss": 0.25})
    rows = metrics(tmp_path)
    want = [1, 2, 3, 4] if tail.startswith('{"step": 3') else [1, 2, 4]
    assert [r["step"] for r in rows] == want
