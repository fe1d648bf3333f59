"""Hostile files: checkpoints and Hugging Face directories are read without unpickling
(safetensors, JSON, torch.load(weights_only=True)). A truncated or corrupted safetensors file,
a config.json asking for absurd sizes, a tokenizer file that does not parse: each is a one-line
ValueError naming the file, raised before any large allocation; a pickle that would run code
is refused without running it. The command-line tools turn these into one line and exit code 2."""
import ast
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from minillm.model import build_model
from minillm.checkpoint import load_model, read_config, save_checkpoint
from minillm.config import ModelConfig
from minillm.hf_import import load_hf, save_hf
from minillm.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(arch="gpt"):
    torch.manual_seed(0)
    post = dict(norm_position="post", activation="gelu") if arch == "bert" else {}
    return build_model(ModelConfig(arch=arch, vocab_size=300, n_layer=2, n_head=2, n_embd=16, block_size=16, **post))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A minillm checkpoint (weights, config, character tokenizer, optimizer, trainer state)."""
    out = tmp_path_factory.mktemp("ckpt")
    model = tiny()
    return save_checkpoint(str(out), model, model.config, CharTokenizer.train("hello world"),
                           optimizer=torch.optim.AdamW(model.parameters()), trainer_state={"step": 0})


@pytest.fixture(scope="module", params=["gpt", "bert"])
def hf_dir(request, tmp_path_factory):
    """A Hugging Face-format directory (config.json + model.safetensors) of a tiny GPT-2 or BERT."""
    d = str(tmp_path_factory.mktemp("hf") / request.param)
    save_hf(tiny(request.param), d)
    return d


def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def expect_error(fn, *names, seconds=1.0, grow_mb=200):
    """fn() raises one ValueError whose single line names each of `names`, quickly and without
    allocating much (the process's peak memory grows by less than grow_mb)."""
    rss, t0 = peak_rss_mb(), time.perf_counter()
    with pytest.raises(ValueError) as info:
        fn()
    took = time.perf_counter() - t0
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)
    assert took < seconds, f"{took:.2f}s: {msg}"
    assert peak_rss_mb() - rss < grow_mb, msg
    return msg


def safetensors_bytes(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


# the ways a downloaded weights file can be damaged or forged
CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "header cut": lambda b: b[:20],
    "one byte": lambda b: b[:1],
    "empty": lambda b: b"",
    "garbage": lambda b: bytes(range(256)) * 64,
    "header length 10^12": lambda b: struct.pack("<Q", 10**12) + b[8:],
    "header not JSON": lambda b: struct.pack("<Q", 16) + b"{not json at all" + b[24:],
    "header a list": lambda b: safetensors_bytes([1, 2, 3]),
    "huge tensor, no data": lambda b: safetensors_bytes(
        {"tok_emb.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}),
    "offsets past the end": lambda b: safetensors_bytes(
        {"tok_emb.weight": {"dtype": "F32", "shape": [300, 16], "data_offsets": [0, 19200]}}, b"\0" * 64),
    "shape and size disagree": lambda b: safetensors_bytes(
        {"tok_emb.weight": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 64]}}, b"\0" * 64),
    "unknown dtype": lambda b: safetensors_bytes(
        {"tok_emb.weight": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
}


def corrupt(path, how):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(CORRUPTIONS[how](data))


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_damaged_safetensors_in_a_checkpoint(ckpt_dir, tmp_path, how):
    d = copy(ckpt_dir, tmp_path / "c")
    corrupt(os.path.join(d, "model.safetensors"), how)
    expect_error(lambda: load_model(d), os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_damaged_safetensors_in_a_hf_directory(hf_dir, tmp_path, how):
    d = copy(hf_dir, tmp_path / "h")
    corrupt(os.path.join(d, "model.safetensors"), how)
    expect_error(lambda: load_hf(d), os.path.join(d, "model.safetensors"))


def test_resume_from_damaged_optimizer_or_state(ckpt_dir, tmp_path):
    from minillm.data import LMData
    from minillm.training import TrainSettings, TrainState, make_optimizer, resume_training

    def resume(d):
        model = tiny()
        tokens = np.arange(64, dtype=np.int64) % 60
        data = LMData(tokens, tokens, 8, 2, 0, torch.device("cpu"))
        resume_training(d, model, make_optimizer(model, TrainSettings()), torch.amp.GradScaler("cpu", enabled=False),
                        TrainState(), data)

    d = copy(ckpt_dir, tmp_path / "c1")
    corrupt(os.path.join(d, "optimizer.safetensors"), "truncated")
    expect_error(lambda: resume(d), "optimizer.safetensors")
    for i, bad in enumerate(("{", "[]", '{"step": 1}', '{"step": "x", "elapsed": 0}', "\xff")):
        d = copy(ckpt_dir, tmp_path / f"s{i}")
        with open(os.path.join(d, "trainer_state.json"), "w", encoding="latin-1") as f:
            f.write(bad)
        expect_error(lambda: resume(d), "trainer_state.json")


# -- config.json asking for absurd or ill-typed things ------------------------------------------

HUGE = 10**6  # n_layer = n_embd = 10^6: about 10^19 parameters


@pytest.mark.parametrize("change", [
    dict(n_layer=HUGE, n_embd=HUGE, n_head=1),  # ~10^19 parameters
    dict(n_layer=1000, n_embd=8192 * 4, n_head=32),  # ~1.3 x 10^13: past the cap, still a plain size
    dict(vocab_size=10**12),
    dict(n_inner=10**12),
    dict(num_labels=10**12),
    dict(n_embd="16"), dict(n_layer=2.0), dict(n_layer=True), dict(n_layer=-1), dict(n_inner="x" * 100),
    dict(n_kv_head=[1]), dict(dropout="0.1"), dict(norm_eps=None), dict(rope_base=float("nan")),
    dict(bias="yes"), dict(arch="llama"), dict(surprise=1), dict(n_layer=10**400), dict(dropout=10**400),
], ids=lambda c: ",".join(f"{k}={str(v)[:12]}" for k, v in c.items()))
def test_absurd_or_mistyped_checkpoint_config(ckpt_dir, tmp_path, change):
    d = copy(ckpt_dir, tmp_path / "c")
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg["model"].update(change)
    json.dump(cfg, open(path, "w"))
    expect_error(lambda: load_model(d), path)
    expect_error(lambda: read_config(d), path)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"train": {}}', '{"model": 3}', "\udcff"])
def test_unreadable_checkpoint_config(ckpt_dir, tmp_path, content):
    d = copy(ckpt_dir, tmp_path / "c")
    path = os.path.join(d, "config.json")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(content)
    expect_error(lambda: load_model(d), path)


GPT2_HUGE = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_layer": 10**6, "n_embd": 10**6,
             "n_head": 8}


@pytest.mark.parametrize("change", [
    dict(GPT2_HUGE),
    {**GPT2_HUGE, "n_layer": 2, "n_embd": 16, "n_head": 2, "n_inner": 10**13},
    {**GPT2_HUGE, "n_layer": 2, "n_embd": 16, "n_head": 2, "n_inner": "64"},
    {**GPT2_HUGE, "n_layer": 2, "n_embd": 16, "n_head": 2, "layer_norm_epsilon": [1e-5]},
    {**GPT2_HUGE, "n_layer": 2, "n_embd": 16, "n_head": 2, "resid_pdrop": "lots"},
    {**GPT2_HUGE, "n_layer": 2, "n_head": 2, "architectures": ["GPT2ForSequenceClassification"],
     "id2label": {str(i): str(i) for i in range(10**5)}, "vocab_size": 10**6, "n_embd": 10**5},
    {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "num_hidden_layers": 2,
     "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 64, "type_vocab_size": 10**12},
    {"model_type": "t5"}, [1, 2], "a string",
], ids=lambda c: str(c)[:40])
def test_absurd_or_mistyped_hf_config(hf_dir, tmp_path, change):
    d = copy(hf_dir, tmp_path / "h")
    path = os.path.join(d, "config.json")
    json.dump(change, open(path, "w"))
    expect_error(lambda: load_hf(d), path)


def test_unparsable_hf_config(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "h")
    path = os.path.join(d, "config.json")
    for content in (b"", b"{", b"\xff\xfe{}", b"null"):
        with open(path, "wb") as f:
            f.write(content)
        expect_error(lambda: load_hf(d), path)


# -- pickles -------------------------------------------------------------------------------------


class Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "plain pickle", "inside a tensor dict"])
def test_malicious_pickle_is_refused_without_running(hf_dir, tmp_path, how):
    d = copy(hf_dir, tmp_path / "h")
    os.remove(os.path.join(d, "model.safetensors"))
    marker = str(tmp_path / "PWNED")
    evil = Exploit()
    evil.marker = marker
    bin_path = os.path.join(d, "pytorch_model.bin")
    if how == "plain pickle":
        with open(bin_path, "wb") as f:
            pickle.dump(evil, f)
    elif how == "torch.save":
        torch.save(evil, bin_path)
    else:
        torch.save({"wte.weight": torch.zeros(2), "evil": evil}, bin_path)
    # the payload works when unpickled the unsafe way (so the test can tell)
    probe = str(tmp_path / "probe")
    evil.marker = probe
    pickle.loads(pickle.dumps(evil))
    assert os.path.exists(probe)
    expect_error(lambda: load_hf(d), bin_path)
    assert not os.path.exists(marker), "unpickling ran the file's code"


def test_checkpoint_code_never_unpickles():
    """Every torch.load in the library and the scripts passes weights_only=True; nothing calls
    pickle or np.load(allow_pickle=True)."""
    files = [os.path.join(ROOT, "minillm", f) for f in sorted(os.listdir(os.path.join(ROOT, "minillm")))
             if f.endswith(".py")] + [os.path.join(ROOT, f) for f in ("train.py", "finetune.py")
                                      if os.path.exists(os.path.join(ROOT, f))]
    for path in files:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if fn.endswith("torch.load") or fn == "load" and "weights_only" in kw:
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno}: {ast.unparse(node)}"
            if fn.endswith("np.load") or fn.endswith("numpy.load"):
                assert kw.get("allow_pickle", "False") == "False", f"{path}:{node.lineno}"


# -- tokenizer files -----------------------------------------------------------------------------

TOKENIZER_FILES = {
    "tokenizer.json": [b"", b"{", b"not json", b"[]", b'{"a": 1}', b'{"model": {"type": "Nope"}}', b"\xff\xfe\x00",
                       b'{"version": "1.0", "model": {"type": "BPE", "vocab": 3, "merges": []}}'],
    "char_tokenizer.json": [b"", b"{", b"[]", b"{}", b'{"chars": 5}', b'{"chars": ["ab", "c"]}',
                            b'{"chars": null}', b"\xff\xfe", b'"chars"'],
    "vocab.txt": [b"a\nb\nc\n", b"\xff\xfe[UNK]\n"],
}


@pytest.mark.parametrize("name,content", [(n, c) for n, cs in TOKENIZER_FILES.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else repr(v)[:24])
def test_bad_tokenizer_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(lambda: load_tokenizer(str(path)), str(path))
    expect_error(lambda: load_tokenizer(str(tmp_path)), str(path))  # found in its folder


def test_damaged_tokenizer_in_a_checkpoint_is_an_error(ckpt_dir, tmp_path):
    """Not silently dropped: a checkpoint whose tokenizer file is damaged does not load."""
    d = copy(ckpt_dir, tmp_path / "c")
    path = os.path.join(d, "char_tokenizer.json")
    with open(path, "w") as f:
        f.write('{"chars": ')
    expect_error(lambda: load_model(d), path)


def test_good_files_still_load(ckpt_dir, hf_dir, tmp_path):
    """The checks above do not refuse what is fine (so they can be told apart from a loader
    that refuses everything)."""
    model, tok, cfg = load_model(ckpt_dir)
    assert tok.decode(tok.encode("hello")) == "hello" and cfg["model"]["n_layer"] == 2
    model, _ = load_hf(hf_dir)
    assert model.config.n_layer == 2
    t = HFTokenizer.train_bpe(["some text to learn from " * 20], 300)
    t.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).decode(t.encode("some text")) == "some text"


# -- through the command-line tools ---------------------------------------------------------------


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_cli_tools_on_damaged_checkpoints(tmp_path):
    """train.py --resume and `python -m minillm.generate` on damaged checkpoints: one line each,
    exit code 2, no traceback."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))
    (tmp_path / "c.txt").write_text(text)
    env = {**os.environ, "MINILLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    train_args = ["--data", str(tmp_path / "c.txt"), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                  "--block-size", "16", "--batch-size", "2", "--eval-iters", "1", "--no-progress",
                  "--sample-tokens", "0", "--max-steps", "4", "--eval-interval", "0"]
    good = tmp_path / "good"  # a checkpoint as train.py writes it, stopped before the end of its schedule
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--stop-at-step", "2", "--out", str(good)],
                   env=env, cwd=tmp_path, check=True, capture_output=True)
    saved = json.load(open(good / "checkpoint" / "config.json"))
    absurd = {**saved, "model": {**saved["model"], "n_layer": HUGE, "n_embd": HUGE, "n_head": 1}}
    damages = {"weights": lambda d: corrupt(os.path.join(d, "model.safetensors"), "truncated"),
               "config": lambda d: json.dump(absurd, open(os.path.join(d, "config.json"), "w")),
               "state": lambda d: open(os.path.join(d, "trainer_state.json"), "w").write("{}")}
    for name, damage in damages.items():
        shutil.copytree(good, tmp_path / name)
        damage(str(tmp_path / name / "checkpoint"))
    train = [sys.executable, os.path.join(ROOT, "train.py"), *train_args, "--resume", "--out"]
    generate = [sys.executable, "-m", "minillm.generate", "--tokens", "2", "--ckpt"]
    cmds = {"train weights": train + [str(tmp_path / "weights")],
            "generate config": generate + [str(tmp_path / "config")],
            "train state": train + [str(tmp_path / "state")]}
    with ThreadPoolExecutor(2) as pool:  # two cores
        done = dict(zip(cmds, pool.map(lambda c: subprocess.run(c, env=env, cwd=tmp_path, capture_output=True,
                                                                  text=True, timeout=300), cmds.values())))
    _one_line_error(done["train weights"], "model.safetensors", "not a readable safetensors file")
    _one_line_error(done["generate config"], "config.json", "parameters")
    _one_line_error(done["train state"], "trainer_state.json")
