"""A trained model as files that run without minillm: a torch.export program, an AOTInductor
package, an ONNX file.

    python -m minillm.export --ckpt out/sst2 --out sst2.pt2 --check             # classifier logits
    python -m minillm.export --ckpt out/sst2 --out sst2.pt2 --what probs        # its probabilities
    python -m minillm.export --ckpt out/default --out gpt.pt2 --aot --onnx --check
    python -m minillm.export --ckpt out/default --out step.pt2 --what decode    # one KV-cache step

Writes FILE.pt2 (torch.export.save) and FILE.json beside it: the inputs and outputs (names,
dtypes, shapes), the labels, the vocabulary and block sizes (also inside the .pt2 as the extra
file "minillm.json"). --aot adds FILE.aoti.pt2 (AOTInductor's compiled package), --onnx
FILE.onnx. --check runs every file written at three shapes in a Python process that never
imports minillm and compares it with the eager model. Loading needs torch alone:

    program = torch.export.load("sst2.pt2").module()
    logits = program(input_ids, attention_mask, token_type_ids)     # int64 (batch, seq) each
    runner = torch._inductor.aoti_load_package("sst2.aoti.pt2")     # the same inputs, contiguous

(An AOTI package reads its inputs as contiguous tensors without checking: pass `ids[:, i:i+1]`
and other slices through .contiguous().)

What is exported, batch and sequence length dynamic (the sequence up to block_size):
- a GPT language model: logits (batch, seq, vocab) from input_ids;
- a classifier (GPT or BERT): logits, or --what probs their softmax, (batch, labels) from
  input_ids, attention_mask (1 at real tokens) and, for a BERT with segment embeddings,
  token_type_ids; a BERT without a classifier: its masked-LM logits from the same inputs;
- --what decode: a GPT's one-token step against a fixed-size KV cache (DecodeStep).
Attention runs minillm's hand-written ("naive") backend: see EXPORT_BACKEND.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from torch.export import Dim

from .attention import KVCache, MultiHeadAttention
from .checkpoint import read_config, trained_checkpoint
from .cli import run_main
from .lora import merge_lora
from .pretrained import load_finetuned

KINDS = ("logits", "probs", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The "sdpa" backend does not export on its own: for a causal LM without padding mask it hands SDPA
# a symbolic is_causal (attention.py: `is_causal and tq == tk > 1`), and in a decode step it
# branches on the cache's length. The hand-written attention has no such branch.
EXPORT_BACKEND = "naive"
# max |export - eager| allowed by --check: float32 as asked; bfloat16 rounds each op's output to
# 8 bits of mantissa (2**-8 relative), and a differently fused graph (AOTI) rounds elsewhere,
# so a few ulps of the largest output, relative.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
EXTRA = "pip install -e '.[export]'"
QUANTIZED = ("is not exported: this exporter takes float32 or bfloat16 weights (torchao's int8 layers would "
             "also need torchao wherever the program is loaded); export the float checkpoint it was made from")
META_FILE = "minillm.json"  # the metadata's name inside the .pt2 (torch.export.save's extra_files)
TOKENIZER_FILES = ("tokenizer.json", "char_tokenizer.json", "vocab.txt")


# -- what is exported: the wrappers ---------------------------------------------------------------

class LanguageModel(nn.Module):
    """A GPT's logits (or probabilities) at every position: input_ids (B, T) -> (B, T, V)."""

    def __init__(self, model: nn.Module, probs: bool = False):
        super().__init__()
        self.model, self.probs = model, probs

    def forward(self, input_ids):
        logits, _ = self.model(input_ids)
        return logits.float().softmax(dim=-1) if self.probs else logits


class Encoder(nn.Module):
    """A classifier's logits (or probabilities) (B, labels), or a BERT's masked-LM logits
    (B, T, V), from input_ids and attention_mask (B, T) and, where the model has segment
    embeddings, token_type_ids (B, T)."""

    def __init__(self, model: nn.Module, task: str, probs: bool = False):
        super().__init__()
        self.model, self.task, self.probs = model, task, probs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.task == "classify":
            logits, _ = self.model.classify(input_ids, attention_mask, token_type_ids)
        else:
            logits, _ = self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return logits.float().softmax(dim=-1) if self.probs else logits


class DecodeStep(nn.Module):
    """One token of a GPT's KV-cached decoding, with plain tensors in and out.

    input_ids (B, 1); k_cache, v_cache (n_layer, B, n_kv_head, block_size, head_dim), zeros to
    begin with; position: an int64 scalar, the tokens already in the cache. Returns the logits
    (B, V) of the next token and both caches with this token's keys and values written at
    `position`. A prompt goes in one token at a time (positions 0, 1, ...); the cache never
    grows, so the shapes stay fixed but for the batch. A position past block_size - 1 fails the
    program's runtime check. Each call copies the caches (its inputs are left as they were): a
    cost of n_layer x block_size keys and values per token, small beside the weights' reads
    for the models minillm trains on a CPU."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, k_cache, v_cache, position):
        c = self.model.config
        pos = position.item()  # the model indexes its cache and positions with a Python int
        torch._check(pos >= 0)
        torch._check(pos < c.block_size)
        cache = KVCache(c.n_layer, input_ids.shape[0], c.kv_heads, c.block_size, c.head_dim)
        cache.k = [k_cache[i].clone() for i in range(c.n_layer)]  # written in place by the layers
        cache.v = [v_cache[i].clone() for i in range(c.n_layer)]
        cache.pos = pos
        logits, _ = self.model(input_ids, kv_cache=cache)
        return logits[:, -1], torch.stack(cache.k), torch.stack(cache.v)


def default_task(model) -> str:
    """"classify" for a model with a classification head, else "lm"."""
    return "classify" if model.config.num_labels else "lm"


def wrap(model, kind: str = "logits", task: Optional[str] = None) -> nn.Module:
    """The tensor-in, tensor-out module that is exported for `kind` (see KINDS)."""
    if kind == "decode":
        return DecodeStep(model).eval()
    task = task or default_task(model)
    if model.config.arch == "gpt" and task == "lm":
        return LanguageModel(model, kind == "probs").eval()
    return Encoder(model, task, kind == "probs").eval()


def signature(model, kind: str = "logits", task: Optional[str] = None) -> tuple[list, list]:
    """(inputs, outputs) of the exported module: each {"name", "dtype", "shape"}, where a shape
    names its dynamic dimensions ("batch", "seq")."""
    c, task = model.config, task or default_task(model)
    dt = str(next(model.parameters()).dtype).removeprefix("torch.")
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    if kind == "decode":
        cache = [c.n_layer, "batch", c.kv_heads, c.block_size, c.head_dim]
        inputs = [{**ids, "shape": ["batch", 1]}, {"name": "k_cache", "dtype": dt, "shape": cache},
                  {"name": "v_cache", "dtype": dt, "shape": cache}, {"name": "position", "dtype": "int64", "shape": []}]
        outputs = [{"name": "logits", "dtype": dt, "shape": ["batch", c.vocab_size]},
                   {"name": "new_k_cache", "dtype": dt, "shape": cache},
                   {"name": "new_v_cache", "dtype": dt, "shape": cache}]
        return inputs, outputs
    inputs = [ids]
    if not (c.arch == "gpt" and task == "lm"):
        inputs.append({"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]})
        if getattr(model, "type_emb", None) is not None:
            inputs.append({"name": "token_type_ids", "dtype": "int64", "shape": ["batch", "seq"]})
    shape = ["batch", c.num_labels] if task == "classify" else ["batch", "seq", c.vocab_size]
    out = {"name": "probs" if kind == "probs" else "logits", "dtype": "float32" if kind == "probs" else dt}
    return inputs, [{**out, "shape": shape}]


def dynamic_shapes(model, kind: str = "logits", task: Optional[str] = None) -> dict:
    """torch.export's dynamic_shapes: every "batch" and "seq" dimension of the inputs."""
    dims = {"batch": Dim("batch", min=1), "seq": Dim("seq", min=1, max=model.config.block_size)}
    inputs, _ = signature(model, kind, task)
    return {x["name"]: ({i: dims[d] for i, d in enumerate(x["shape"]) if isinstance(d, str)} or None)
            for x in inputs}


def example_inputs(model, kind: str = "logits", batch: int = 2, seq: int = 5, task: Optional[str] = None,
                   seed: int = 0) -> tuple:
    """Inputs for the exported module: random token ids, right-padded attention masks (the first
    row full), two segments; for "decode" empty caches and position min(seq, block_size - 1)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    dt, device = next(model.parameters()).dtype, next(model.parameters()).device
    inputs, _ = signature(model, kind, task)
    seq = min(seq, c.block_size)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    real = torch.arange(seq)[None, :] < lengths[:, None]
    out = []
    for x in inputs:
        shape = [{"batch": batch, "seq": seq}.get(d, d) for d in x["shape"]]
        if x["name"] == "input_ids":
            out.append(torch.randint(0, c.vocab_size, shape, generator=g))
        elif x["name"] == "attention_mask":
            out.append(real.long())
        elif x["name"] == "token_type_ids":
            second = (torch.arange(seq)[None, :] >= (lengths[:, None] + 1) // 2) & real
            out.append(second.long() * int(c.type_vocab_size > 1))
        elif x["name"] == "position":
            out.append(torch.tensor(min(seq, c.block_size - 1)))
        else:  # the caches
            out.append(torch.zeros(shape, dtype=dt))
    return tuple(x.to(device) for x in out)


# -- exporting ------------------------------------------------------------------------------------

def quantized_layers(model) -> list[str]:
    """Layers that hold quantised weights (torch.ao's packed int8, torchao's tensor subclasses,
    minillm's int4): their ops would tie the exported program to those libraries."""
    names = []
    for name, m in model.named_modules():
        quant_module = type(m).__module__.startswith(("torch.ao.nn.quantized", "torchao", "minillm.quantize"))
        subclass = any(type(p.data) is not torch.Tensor for p in m.parameters(recurse=False))
        if quant_module or subclass:
            names.append(name)
    return names


def refuse_unexportable(model, kind: str, task: str) -> None:
    """A one-line ValueError naming what this exporter does not take."""
    c = model.config
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "decode" and c.arch != "gpt":
        raise ValueError(f"--what decode needs a GPT (a causal LM with a KV cache); this is a {c.arch.upper()}")
    if task == "classify" and not c.num_labels:
        raise ValueError(f"this {c.arch.upper()} has no classification head")
    if quantized_layers(model):
        raise ValueError(f"a quantised model ({quantized_layers(model)[0]}, ...) {QUANTIZED}")
    if c.attention_backend not in ("naive", "sdpa"):
        raise ValueError(f"attention_backend {c.attention_backend!r} may run Triton kernels, which an exported "
                         f"graph cannot hold; load the model with attention_backend={EXPORT_BACKEND!r}")
    if c.use_kernels:
        raise ValueError("config.use_kernels routes layers through Triton kernels, which an exported graph "
                         "cannot hold; load the model with use_kernels=False")
    if c.block_size < 2:
        raise ValueError(f"block_size {c.block_size}: no sequence length to make dynamic")


def explain_failure(model, error: Exception) -> str:
    """One line naming the model feature an export failure comes from, where it can be told."""
    c, first = model.config, first_line(error)
    if "is_causal" in str(error) and c.attention_backend == "sdpa":
        return ("the sdpa attention backend gives SDPA a symbolic is_causal (attention.py), which torch.export "
                f"cannot trace; export with attention_backend={EXPORT_BACKEND!r}")
    if "data-dependent" in str(error).lower() or "GuardOnDataDependent" in type(error).__name__:
        return (f"a branch on tensor values in the model ({c.attention_backend} attention, {c.pos_encoding} "
                f"positions) stops torch.export: {first}")
    return (f"torch.export could not trace this {c.describe()} ({c.pos_encoding} positions, {c.norm}, "
            f"{c.activation}, {c.attention_backend} attention): {type(error).__name__}: {first}")


def trace_shape(model) -> tuple[int, int]:
    """The (batch, seq) the program is traced at: two sizes that differ (torch.export would take
    two dynamic dimensions of one size for one dimension), neither 0 nor 1 (it fixes those)."""
    seq = min(5, model.config.block_size)
    return (3 if seq == 2 else 2), seq


def export_program(model, kind: str = "logits", dtype: torch.dtype = torch.float32,
                   task: Optional[str] = None) -> torch.export.ExportedProgram:
    """torch.export's program of `model` (a GPT or BERT with attention_backend "naive", as
    load_for_export gives) for `kind`: "logits", "probs" or "decode". task: "classify" or "lm"
    (default: "classify" where the model has a head). A model in another dtype is copied, not
    changed. What cannot be exported is refused with a one-line ValueError naming why."""
    task = task or default_task(model)
    refuse_unexportable(model, kind, task)
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    module = wrap(model.eval(), kind, task)
    args = example_inputs(model, kind, *trace_shape(model), task=task)
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(model, kind, task))
    except Exception as e:  # torch.export raises many types; the cause is named for the user
        raise ValueError(explain_failure(model, e)) from e


def load_for_export(path: str, base: Optional[str] = None, attention: str = EXPORT_BACKEND):
    """(model in eval mode, checkpoint config + "path") from a minillm checkpoint, with the
    attention backend an exported graph can hold, no Triton kernels, and LoRA adapters merged.
    attention: "naive" (everything exports) or "sdpa" (classifiers only; see EXPORT_BACKEND)."""
    ckpt = trained_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: no minillm checkpoint here (expected model.safetensors and config.json)")
    cfg = read_config(ckpt)
    if cfg.get("quantized"):
        raise ValueError(f"{ckpt}: a quantised copy ({cfg['quantized']}) {QUANTIZED}")
    model, _, cfg = load_finetuned(path, base=base, attention_backend=attention, use_kernels=False)
    merge_lora(model)  # a plain linear layer: faster, and what the served model should be
    return model.eval(), {**cfg, "path": os.path.abspath(ckpt)}


def metadata(model, cfg: dict, kind: str, task: Optional[str] = None) -> dict:
    """What a user needs to call the exported files without minillm."""
    c, task = model.config, task or default_task(model)
    inputs, outputs = signature(model, kind, task)
    folder = cfg.get("path")
    tokenizer = next((os.path.join(folder, n) for n in TOKENIZER_FILES
                      if folder and os.path.exists(os.path.join(folder, n))), None)
    return {
        "format": "minillm.export/1", "kind": kind, "task": "decode" if kind == "decode" else task,
        "arch": c.arch, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "inputs": inputs, "outputs": outputs,
        "dims": {"batch": {"min": 1}, "seq": {"min": 1, "max": c.block_size}},
        "labels": cfg.get("labels") if task == "classify" and kind != "decode" else None,
        "vocab_size": c.vocab_size, "block_size": c.block_size, "n_layer": c.n_layer,
        "n_kv_head": c.kv_heads, "head_dim": c.head_dim, "pad_token_id": c.pad_token_id,
        "attention_backend": c.attention_backend, "checkpoint": cfg.get("path"), "tokenizer": tokenizer,
        "torch": torch.__version__, "call": call_text(inputs, outputs, kind),
    }


def call_text(inputs: list, outputs: list, kind: str) -> str:
    """One line for the metadata: how the program is called."""
    def shape(x):
        return "(" + ", ".join(map(str, x["shape"])) + ")"

    text = (f"torch.export.load(FILE).module()({', '.join(x['name'] for x in inputs)}) -> "
            + ", ".join(f"{x['name']} {shape(x)}" for x in outputs))
    if kind == "decode":
        return text + ("; caches all zeros at first, one token a call at position 0, 1, ..., each call's new "
                       "caches into the next")
    return text + ("; attention_mask 1 at real tokens, 0 at padding" if len(inputs) > 1 else "")


# -- writing the files (each to a temporary name, then renamed: a failure leaves the old file) ---

@contextmanager
def _replacing(path: str, suffix: str = ""):
    """A temporary path beside `path` that becomes `path` when the block succeeds."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_program(ep, path: str, meta: dict) -> str:
    """torch.export.save, with the metadata inside (extra file "minillm.json")."""
    with _replacing(path, ".pt2") as tmp:
        torch.export.save(ep, tmp, extra_files={META_FILE: json.dumps(meta)})
    return path


def save_json(meta: dict, path: str) -> str:
    with _replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return path


def save_aoti(ep, path: str) -> str:
    """AOTInductor's package of the program (C++ compiled here: a minute for a small model)."""
    if not path.endswith(".pt2"):
        raise ValueError(f"{path}: an AOTInductor package's name must end in .pt2")
    require_compiler()
    with _replacing(path, ".pt2") as tmp, warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):  # torch's own, from inside the compiler
            warnings.simplefilter("ignore", category)
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        except Exception as e:  # a compiler error, a missing header: one line, not a traceback
            raise ValueError(f"AOTInductor could not compile the program: {type(e).__name__}: {first_line(e)}") from e
    return path


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def require_compiler() -> None:
    compiler = os.environ.get("CXX", "g++")
    if not shutil.which(compiler):
        raise ValueError(f"--aot compiles C++: no {compiler} on PATH (install g++ or set CXX)")


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--onnx needs {', '.join(missing)}: install the export extra ({EXTRA})")


def save_onnx(ep, path: str, output_names: list[str]) -> str:
    """The program as ONNX (torch.onnx's dynamo exporter), its dynamic dimensions kept; one file."""
    require_onnx()
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _replacing(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(ep, (), tmp, dynamo=True, external_data=False, output_names=output_names,
                              verbose=False)
    except Exception as e:  # an op without an ONNX translation, a model over protobuf's 2 GB
        raise ValueError(f"torch.onnx could not export the program: {type(e).__name__}: {first_line(e)}") from e
    finally:
        quiet.setLevel(level)
    return path


# -- checking: the files, run in a process that never imports minillm, against the eager model --

# The child's script. Inputs come in and outputs go out as safetensors; decode cases feed their
# token ids one at a time, carrying the caches, as a user's loop would.
CHILD = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
tensors = load_file(spec["inputs"])
cases = [[tensors[f"{c}.{j}"] for j in range(n)] for c, n in enumerate(spec["arity"])]

def onnx_runner(path):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [x.name for x in session.get_inputs()]
    return lambda *xs: [torch.from_numpy(y) for y in session.run(None, {n: x.numpy() for n, x in zip(names, xs)})]

def load(kind, path):
    if kind == "export":
        return torch.export.load(path).module()
    return torch._inductor.aoti_load_package(path) if kind == "aoti" else onnx_runner(path)

def decode(run, ids, k, v):
    steps = []
    for i in range(ids.shape[1]):
        logits, k, v = run(ids[:, i:i + 1].contiguous(), k, v, torch.tensor(i))
        steps.append(logits)
    return torch.stack(steps, 1), k, v

out = {}
with torch.no_grad():
    for kind, path in spec["files"].items():
        run = load(kind, path)
        for c, xs in enumerate(cases):
            ys = decode(run, *xs) if spec["decode"] else run(*[x.contiguous() for x in xs])
            for j, y in enumerate([ys] if isinstance(ys, torch.Tensor) else ys):
                out[f"{kind}.{c}.{j}"] = y.contiguous()
save_file(out, spec["outputs"])
loaded = [m for m in sys.modules if m.split(".")[0] in ("minillm", "kernels")]
assert not loaded, f"the exported files pulled in {loaded}"
print("ok without minillm")
'''


def check_shapes(model, kind: str = "logits") -> list[tuple[int, int]]:
    """Three (batch, seq) shapes, none the one traced (2, 5); for "decode", (batch, steps)."""
    t = model.config.block_size
    if kind == "decode":
        return [(1, min(t, 2)), (3, min(t, 5)), (2, min(t, 9))]
    return [(1, max(1, t // 4)), (3, max(2, t // 2)), (4, t)]


def eager_decode(model, ids: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor) -> tuple:
    """The model's own KV-cache decoding of ids (B, S), one token at a time: (logits (B, S, V),
    k, v caches stacked over layers). k0, v0 (zeros) give the caches' size and dtype."""
    cache = KVCache(model.config.n_layer, *k0.shape[1:], dtype=k0.dtype)
    steps = [model(ids[:, i:i + 1], kv_cache=cache)[0][:, -1] for i in range(ids.shape[1])]
    return torch.stack(steps, 1), torch.stack(cache.k), torch.stack(cache.v)


def check_cases(model, kind: str = "logits", task: Optional[str] = None) -> list[tuple]:
    """The inputs --check runs: three shapes (for "decode": token ids and the empty caches)."""
    cases = []
    for i, (batch, seq) in enumerate(check_shapes(model, kind)):
        if kind == "decode":
            _, k, v, _ = example_inputs(model, kind, batch, seq)
            g = torch.Generator().manual_seed(i + 1)
            cases.append((torch.randint(0, model.config.vocab_size, (batch, seq), generator=g), k, v))
        else:
            cases.append(example_inputs(model, kind, batch, seq, task, seed=i + 1))
    return cases


@torch.no_grad()
def eager_outputs(model, kind: str, cases: list[tuple], task: Optional[str] = None) -> list[list[torch.Tensor]]:
    """The eager model's outputs for each case, as the exported module returns them."""
    if kind == "decode":
        return [list(eager_decode(model, *case)) for case in cases]
    module = wrap(model, kind, task)
    return [[module(*case)] for case in cases]


def run_without_minillm(files: dict[str, str], cases: list[tuple], decode: bool = False,
                        timeout: float = 900) -> dict[str, list[list[torch.Tensor]]]:
    """Each file's outputs for each case, from a fresh Python process that imports torch (and
    onnxruntime for an ONNX file) but never minillm. files: {"export" | "aoti" | "onnx": path}."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        spec = {"inputs": os.path.join(tmp, "in.safetensors"), "outputs": os.path.join(tmp, "out.safetensors"),
                "files": {k: os.path.abspath(p) for k, p in files.items()}, "arity": [len(c) for c in cases],
                "decode": decode, "threads": torch.get_num_threads()}
        save_file({f"{c}.{j}": x.contiguous() for c, case in enumerate(cases) for j, x in enumerate(case)},
                  spec["inputs"])
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tmp, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ValueError(f"the exported files failed in a process without minillm: {last}")
        got = load_file(spec["outputs"])

    def outputs(kind: str, case: int) -> list[torch.Tensor]:
        ys = []
        while f"{kind}.{case}.{len(ys)}" in got:
            ys.append(got[f"{kind}.{case}.{len(ys)}"])
        return ys

    return {kind: [outputs(kind, c) for c in range(len(cases))] for kind in files}


def max_difference(got, want) -> float:
    """max |got - want| over tensors (or arrays, or lists of them), in float64."""
    if isinstance(got, (list, tuple)):
        if len(got) != len(want):
            raise ValueError(f"{len(got)} outputs where {len(want)} were expected")
        return max((max_difference(g, w) for g, w in zip(got, want)), default=0.0)
    got, want = torch.as_tensor(got).detach(), torch.as_tensor(want).detach()
    if got.shape != want.shape:
        raise ValueError(f"output of shape {tuple(got.shape)} where {tuple(want.shape)} was expected")
    return float((got.double() - want.double()).abs().max()) if got.numel() else 0.0


def tolerance(dtype: torch.dtype, want: list) -> float:
    """--check's bound on max |export - eager| (TOLERANCE, relative to the outputs in bfloat16)."""
    if dtype == torch.float32:
        return TOLERANCE[dtype]
    scale = max(float(t.detach().float().abs().max()) for case in want for t in case)
    return TOLERANCE[dtype] * max(1.0, scale)


def latency_ms(runners: dict, args: tuple, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of each runner(*args) over `repeats` calls, after two warm-up calls;
    the runners take turns, so a shared machine's load weighs on all of them alike."""
    times = {name: [] for name in runners}
    with torch.no_grad():
        for i in range(repeats + 2):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                fn(*args)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def with_backend(model, backend: str):
    """A copy of the model whose attention runs `backend` (for eager comparisons)."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, MultiHeadAttention):
            m.backend = backend
    other.config = other.config.replace(attention_backend=backend)
    return other


def compare_latency(model, kind: str, files: dict[str, str], task: Optional[str] = None,
                    repeats: int = 20) -> dict:
    """Batch-1 latency (median ms) at this process's thread count of: the eager model (the
    exported attention backend, and SDPA's), the exported program and the AOTI package; at the
    block size's sequence (up to 128), or for "decode" one step half way into the cache."""
    c = model.config
    seq = min(c.block_size, 128) if kind != "decode" else c.block_size // 2
    args = tuple(x.contiguous() for x in example_inputs(model, kind, 1, seq, task, seed=7))
    runners = {"eager": wrap(model, kind, task)}
    if c.attention_backend != "sdpa":
        runners["eager_sdpa"] = wrap(with_backend(model, "sdpa"), kind, task)
    if "export" in files:
        runners["export"] = torch.export.load(files["export"]).module()
    if "aoti" in files:
        runners["aoti"] = torch._inductor.aoti_load_package(files["aoti"])
    shape = f"position {args[-1].item()}" if kind == "decode" else f"seq {seq}"
    return {"shape": f"batch 1, {shape}", "threads": torch.get_num_threads(), "repeats": repeats,
            "ms": latency_ms(runners, args, repeats)}


# -- the command ----------------------------------------------------------------------------------

def output_paths(out: str) -> dict[str, str]:
    """FILE.pt2 -> the program, FILE.json, FILE.aoti.pt2, FILE.onnx."""
    stem = out[: -len(".pt2")]
    return {"export": out, "json": stem + ".json", "aoti": stem + ".aoti.pt2", "onnx": stem + ".onnx"}


def check_arguments(args) -> None:
    """Bad input, refused before anything is loaded or written."""
    if not os.path.isdir(args.ckpt):
        raise ValueError(f"--ckpt {args.ckpt}: no such directory")
    if not args.out.endswith(".pt2") or os.path.basename(args.out) == ".pt2":
        raise ValueError(f"--out {args.out}: expected a FILE.pt2 name (torch.export's archive)")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {args.out}: the folder {folder} does not exist")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: a directory is there, not a file")
    if args.onnx:
        if args.dtype != "float32":
            raise ValueError("--onnx takes --dtype float32: onnxruntime is fed numpy arrays, which have no bfloat16")
        require_onnx()
    if args.aot:
        require_compiler()


def size_text(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def report_check(model, kind: str, task: str, files: dict[str, str], dtype: torch.dtype) -> bool:
    """Run the files without minillm at three shapes, print max |file - eager| at each; True when
    every one is within the tolerance."""
    cases = check_cases(model, kind, task)
    want = eager_outputs(model, kind, cases, task)
    got = run_without_minillm(files, cases, decode=kind == "decode")
    bound = tolerance(dtype, want)
    print(f"check in a process that never imports minillm: max |file - eager| (bound {bound:.2g}, {dtype})")
    print("  " + ("batch steps" if kind == "decode" else "batch   seq") + "".join(f"  {k:>9}" for k in files))
    ok = True
    for (batch, seq), case_want, c in zip(check_shapes(model, kind), want, range(len(cases))):
        diffs = [max_difference(got[k][c], case_want) for k in files]
        ok &= all(d <= bound for d in diffs)
        print(f"  {batch:5d} {seq:5d}" + "".join(f"  {d:9.2g}" for d in diffs))
    print("check passed" if ok else "check FAILED: an exported file differs from the eager model")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.export",
                                description="Export a minillm checkpoint to files that run without minillm.")
    p.add_argument("--ckpt", required=True, help="a train.py / finetune.py output folder or checkpoint folder")
    p.add_argument("--out", required=True, metavar="FILE.pt2",
                   help="the torch.export program; FILE.json (and FILE.aoti.pt2, FILE.onnx) go beside it")
    p.add_argument("--what", choices=KINDS, default="logits",
                   help="logits (default); probs: softmax probabilities; decode: a GPT's one-token KV-cache step")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the weights' dtype (default: float32)")
    p.add_argument("--aot", action="store_true", help="also compile an AOTInductor package (needs g++)")
    p.add_argument("--onnx", action="store_true", help=f"also write an ONNX file ({EXTRA})")
    p.add_argument("--check", action="store_true",
                   help="run the files at three shapes without minillm and compare with the eager model")
    p.add_argument("--base", help="the base model of a LoRA checkpoint, when it has moved")
    args = p.parse_args(argv)
    check_arguments(args)

    paths, dtype = output_paths(args.out), DTYPES[args.dtype]
    model, cfg = load_for_export(args.ckpt, base=args.base)
    task = default_task(model)
    model = model.to(dtype)
    ep = export_program(model, args.what, dtype, task)
    meta = metadata(model, cfg, args.what, task)
    print(f"exported {model.config.describe()}: {args.what} ({meta['task']}, {meta['dtype']}, "
          f"{model.config.attention_backend} attention)")
    files = {"export": save_program(ep, paths["export"], meta)}
    if args.aot:
        files["aoti"] = save_aoti(ep, paths["aoti"])
    if args.onnx:
        files["onnx"] = save_onnx(ep, paths["onnx"], [o["name"] for o in meta["outputs"]])
    save_json({**meta, "files": {k: os.path.basename(v) for k, v in files.items()}}, paths["json"])
    for path in [*files.values(), paths["json"]]:
        print(f"wrote {path} ({size_text(path)})")
    ok = report_check(model, args.what, task, files, dtype) if args.check else True
    if args.aot:
        lat = compare_latency(model, args.what, files, task)
        print(f"latency at {lat['shape']}, {lat['threads']} thread(s), median of {lat['repeats']}: "
              + ", ".join(f"{k} {v:.3g} ms" for k, v in lat["ms"].items()))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main, "minillm.export")
