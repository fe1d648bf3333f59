"""Checkpoints: a folder of safetensors and JSON, written atomically, read without unpickling.

    <out>/checkpoint/
        model.safetensors      weights
        config.json            {"model": ModelConfig fields, "train": the run's settings, ...}
        char_tokenizer.json | tokenizer.json
        optimizer.safetensors  optimizer moments, flattened ("state.<i>.<name>")
        sharded/               instead, under --fsdp: weights and moments as each process's shards
                               (torch.distributed.checkpoint); model.safetensors is then gathered whole
        trainer_state.json     step, schedule, data position, RNG states, param-group settings

A save writes everything into a temporary sibling folder, fsyncs every file, then swaps it in
with renames: a crash at any moment leaves either the old checkpoint or the new one, complete.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import build_model
from .tokenizer import load_tokenizer

CKPT = "checkpoint"
BEST = "best"  # <out>/best: the weights of the best evaluation (--keep-best)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _save_tensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)
    _fsync_file(path)


def untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors less those that view the same memory as an earlier one (same data pointer,
    shape and strides): tied weights are kept once, under their first name (the embedding)."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v
    return out


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without duplicate storage: tied weights are saved once (the embedding)."""
    return untied(model.state_dict())


def rng_to_json(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def rng_from_json(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def optimizer_to_tensors(opt: torch.optim.Optimizer):
    """(tensors, json-able param groups and scalar state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def begin_save(out_dir: str, name: str = CKPT) -> str:
    """The temporary folder a save fills before it is swapped in (save_checkpoint's `tmp`);
    clears those left by a process killed in the middle of a save."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
        if stale.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir)


def save_checkpoint(out_dir: str, model, config: ModelConfig, tokenizer=None, optimizer=None,
                    trainer_state: Optional[dict] = None, extra_config: Optional[dict] = None,
                    name: str = CKPT, tensors: Optional[dict] = None, tmp: Optional[str] = None) -> str:
    """Write <out_dir>/<name>/ atomically. `tensors` replaces the model's weights (e.g. LoRA
    adapters only, or weights gathered from shards). `tmp`: a folder from begin_save that other
    processes have already written parts into (the shards of a sharded checkpoint). Returns
    the checkpoint path."""
    final = os.path.join(out_dir, name)
    tmp = tmp or begin_save(out_dir, name)
    try:
        _save_tensors(tensors if tensors is not None else model_tensors(model), os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), {"model": config.to_dict(), **(extra_config or {})})
        if tokenizer is not None:
            tok_path = tokenizer.save(tmp)
            if tok_path:
                _fsync_file(tok_path)
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            _save_tensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
            trainer_state = {**(trainer_state or {}), "optimizer": opt_meta}
        if trainer_state is not None:
            _write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        _fsync_dir(tmp)
        # Swap: the old checkpoint becomes <name>.old until the new one is in place. A folder
        # on its way out is first renamed to a temporary name, so <name> and <name>.old are
        # always complete whenever they exist (never half deleted).
        old = final + ".old"
        if os.path.exists(final):
            if os.path.exists(old):
                _discard(old, tmp + "-stale")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        if os.path.exists(old):
            _discard(old, tmp + "-old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _discard(path: str, trash: str) -> None:
    """Rename, then delete: a crash in between leaves a temporary folder that the next save clears."""
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def find_checkpoint(path: str, name: str = CKPT) -> Optional[str]:
    """The checkpoint folder for `path`: the folder itself if it holds one, else <path>/<name>,
    or the previous one (<name>.old) left by a crash between the two renames of a save."""
    if os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "config.json")):
        return path
    for cand in (os.path.join(path, name), os.path.join(path, name + ".old")):
        if os.path.exists(os.path.join(cand, "model.safetensors")):
            return cand
    return None


def trained_checkpoint(path: str) -> Optional[str]:
    """The checkpoint to use a trained model from: <path>/best (the best evaluation, kept by
    --keep-best) when there is one, else the last (find_checkpoint). --resume reads the last."""
    return find_checkpoint(path, BEST) or find_checkpoint(path)


def read_config(ckpt: str) -> dict:
    path = os.path.join(ckpt, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"{path}: not a minillm checkpoint config (no 'model' section)")
    try:  # absurd or mistyped sizes are refused here, before anything is allocated
        ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_weights(model: torch.nn.Module, tensors: dict, source: str, strict: bool = True) -> None:
    """Copy tensors into the model, naming anything missing, unexpected or mis-shaped."""
    own = model.state_dict()
    tied = set(own) - set(untied(own))
    missing = [k for k in own if k not in tensors and k not in tied]  # a tied weight is saved once
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in tensors.items()
              if k in own and v.shape != own[k].shape]
    problems = []
    if missing and strict:
        problems.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if shapes:
        problems.append(f"mis-shaped {', '.join(shapes[:5])}" + (" ..." if len(shapes) > 5 else ""))
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)


def load_model(path: str, **overrides):
    """(model, tokenizer or None, full config dict) from a minillm checkpoint folder."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: no minillm checkpoint here (expected model.safetensors and config.json)")
    cfg = read_config(ckpt)
    config = ModelConfig.from_dict(cfg["model"])
    if overrides:
        config = config.replace(**overrides)
    tensors = read_tensors(os.path.join(ckpt, "model.safetensors"))  # a damaged file fails before the model is built
    model = build_model(config)
    load_weights(model, tensors, ckpt)
    return model, read_tokenizer(ckpt), cfg


def read_tokenizer(ckpt: str):
    """The tokenizer saved in a checkpoint folder, or None where there is no tokenizer file;
    a damaged one is an error, not silently dropped."""
    names = ("char_tokenizer.json", "tokenizer.json", "vocab.txt")
    return load_tokenizer(ckpt) if any(os.path.exists(os.path.join(ckpt, n)) for n in names) else None
