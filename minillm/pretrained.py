"""Where a run starts from, and what a finished run loads back.

    model, tokenizer, info = load_pretrained("gpt2-dir")   # a Hugging Face GPT-2/BERT directory,
    model, tokenizer, info = load_pretrained("out/run")    # or a train.py / finetune.py checkpoint
    model, tokenizer, cfg = load_finetuned("out/sst2")     # a finetune.py result, as it was saved

A finetune.py checkpoint holds full weights, a quantised copy (int8, int8-weight or int4-weight),
or only LoRA adapters (and the head): those are rebuilt on top of the base model the run started from, recorded in the
checkpoint (or passed as `base` when it has moved), which is itself loaded by load_pretrained.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .checkpoint import load_weights, read_config, read_tensors, read_tokenizer, trained_checkpoint
from .config import ModelConfig
from .hf_import import load_hf
from .lora import apply_lora, merge_lora
from .model import build_model
from .quantize import load_quantized
from .tokenizer import load_tokenizer


def is_hf_dir(path: str) -> bool:
    """A directory whose config.json names a model_type: the Hugging Face layout."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def load_pretrained(path: str, **overrides):
    """(model, tokenizer or None, info) to start a run from: a minillm checkpoint (train.py's,
    or finetune.py's, with LoRA adapters merged in) or a Hugging Face GPT-2 / BERT directory.
    overrides: ModelConfig fields that do not change the weights (ModelConfig.runtime_fields).

    info: "source" ("hf" or "minillm"), "path", "missing_heads" (heads the starting point lacks,
    which start fresh, e.g. ["cls"] for a bare BertModel), and a checkpoint's saved config."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint or directory")
    if os.path.isdir(path) and is_hf_dir(path):
        model, missing_heads = load_hf(path, **overrides)
        try:
            tokenizer = load_tokenizer(path)
        except ValueError:  # HF directories often keep their tokenizer elsewhere: the caller asks for one
            tokenizer = None
        return model, tokenizer, {"source": "hf", "path": os.path.abspath(path), "missing_heads": missing_heads}
    ckpt = trained_checkpoint(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise ValueError(f"{path}: neither a minillm checkpoint (model.safetensors + config.json) nor a Hugging "
                         "Face GPT-2/BERT directory (config.json with a model_type)")
    cfg = read_config(ckpt)
    if cfg.get("quantized"):
        raise ValueError(f"{ckpt}: a quantised ({cfg['quantized']}) inference copy cannot be trained further; "
                         "start from the float checkpoint")
    model, tokenizer = _from_checkpoint(ckpt, cfg, None, overrides)
    merge_lora(model)  # a LoRA run's adapters become part of the weights the new run starts from
    return model, tokenizer, {**cfg, "source": "minillm", "path": os.path.abspath(ckpt), "missing_heads": []}


def load_finetuned(path: str, base: Optional[str] = None, **overrides):
    """(model, tokenizer, config dict) from a finetune.py checkpoint: full weights, a quantised copy,
    or LoRA adapters (rebuilt on the base model recorded in the checkpoint, or `base`)."""
    ckpt = trained_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: no minillm checkpoint here (expected model.safetensors and config.json)")
    cfg = read_config(ckpt)
    model, tokenizer = _from_checkpoint(ckpt, cfg, base, overrides)
    return model, tokenizer, cfg


def _from_checkpoint(ckpt: str, cfg: dict, base: Optional[str], overrides: dict):
    """(model, tokenizer or None) for any kind of minillm checkpoint, as saved."""
    config = ModelConfig.from_dict(cfg["model"]).replace(**overrides)
    tensors = read_tensors(os.path.join(ckpt, "model.safetensors"))  # a damaged file fails before a model is built
    tokenizer = read_tokenizer(ckpt)
    ft = cfg.get("finetune") or {}
    if cfg.get("quantized"):  # the kind finetune.py --quantize wrote; load_quantized refuses one it does not know
        return load_quantized(config, tensors, ckpt, cfg["quantized"]), tokenizer
    if ft.get("method") != "lora" or ft.get("merged"):
        model = build_model(config)
        load_weights(model, tensors, ckpt)
        return model, tokenizer
    base = base or ft.get("init")
    if not base or not os.path.exists(base):
        raise ValueError(f"{ckpt}: holds LoRA adapters only; their base model {base!r} is not there "
                         "(pass it with --base, or finetune with --merge to save full weights)")
    model, base_tokenizer, _ = load_pretrained(base, **{k: getattr(config, k) for k in ModelConfig.runtime_fields})
    if config.num_labels:
        model.add_classifier(config.num_labels, config.classifier_pooling)
    lora = ft["lora"]
    apply_lora(model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["targets"])
    load_weights(model, tensors, ckpt, strict=False)
    return model, tokenizer or base_tokenizer
