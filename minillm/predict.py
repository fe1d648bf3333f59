"""Labels and probabilities for new text, from a checkpoint written by finetune.py.

    python -m minillm.predict --ckpt out/sst2 --input new.tsv          # TSV/CSV/JSONL: its text column
    python -m minillm.predict --ckpt out/sst2 --input sentences.txt    # plain text: one example a line
    python -m minillm.predict --ckpt out/sst2 --text "a gorgeous film" --text "a dull mess"
    echo "a gorgeous film" | python -m minillm.predict --ckpt out/sst2 --input -

Prints one tab-separated line per example: the predicted label, then the probability of
every label (the header names them), then the text. --json prints JSON lines instead.

The module also holds what finetune.py shares with prediction: loading a starting point
(a minillm checkpoint or a Hugging Face GPT-2/BERT directory), loading a finetuned checkpoint
(full weights, or LoRA adapters on top of the base model they were trained on, or the int8
copy), the classification forward pass, and dynamic int8 quantisation.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import find_checkpoint, load_model, load_weights, read_config, read_tensors
from .cli import run_main
from .config import ModelConfig
from .tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------
# Loading


def is_hf_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def load_pretrained(path: str, **overrides):
    """(model, tokenizer or None, saved config dict) from a minillm checkpoint (train.py's, or
    finetune.py's) or a Hugging Face GPT-2 / BERT directory. overrides: ModelConfig fields that
    do not change the weights (attention_backend, dropout, classifier_pooling, ...)."""
    from .hf_import import load_hf

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint or directory")
    if os.path.isdir(path) and is_hf_dir(path):
        model = load_hf(path, **overrides)
        try:
            tokenizer = load_tokenizer(path)
        except ValueError:
            tokenizer = None
        return model, tokenizer, {"source": "hf", "path": os.path.abspath(path)}
    if os.path.isdir(path) and find_checkpoint(path) is not None:
        ckpt = find_checkpoint(path)
        cfg = read_config(ckpt)
        if cfg.get("quantized"):
            raise ValueError(f"{ckpt}: an int8 inference copy cannot be trained further; start from the float checkpoint")
        if (cfg.get("finetune") or {}).get("method") == "lora":
            from .lora import merge_lora

            model, tokenizer, cfg = load_finetuned(ckpt, **overrides)
            merge_lora(model)  # start the new run from the adapted weights
        else:
            model, tokenizer, cfg = load_model(ckpt, **overrides)
        return model, tokenizer, {**cfg, "source": "minillm", "path": os.path.abspath(ckpt)}
    raise ValueError(f"{path}: neither a minillm checkpoint (model.safetensors + config.json) nor a Hugging Face "
                     "GPT-2/BERT directory (config.json with a model_type)")


def attach_head(model, num_labels: int, pooling: Optional[str] = None) -> bool:
    """Give the model a classification head for num_labels classes (BERT: classifier on the pooled
    vector; GPT: score on the last real token). An existing head of that size is kept.
    Returns True when a fresh head was made."""
    c = model.config
    changes = {}
    if pooling is not None and c.arch == "bert":
        changes["classifier_pooling"] = pooling
    fresh = c.num_labels != num_labels or getattr(model, "classifier" if c.arch == "bert" else "score") is None
    if fresh:
        changes["num_labels"] = num_labels
    if changes:
        model.config = c.replace(**changes)
    if fresh:
        w = next(model.parameters())
        head = nn.Linear(c.n_embd, num_labels, bias=c.arch == "bert", device=w.device, dtype=w.dtype)
        nn.init.normal_(head.weight, std=c.init_std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        setattr(model, "classifier" if c.arch == "bert" else "score", head)
    return fresh


def load_finetuned(path: str, base: Optional[str] = None, **overrides):
    """(model, tokenizer, config dict) from a finetune.py checkpoint: full weights, LoRA adapters
    (rebuilt on the base model recorded in the checkpoint, or `base`), or the int8 copy."""
    from .lora import apply_lora

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path}: no minillm checkpoint here (expected model.safetensors and config.json)")
    cfg = read_config(ckpt)
    ft = cfg.get("finetune") or {}
    tensors = read_tensors(os.path.join(ckpt, "model.safetensors"))
    config = ModelConfig.from_dict(cfg["model"])
    if overrides:
        config = config.replace(**overrides)
    try:
        tokenizer = load_tokenizer(ckpt)
    except ValueError:
        tokenizer = None
    if cfg.get("quantized"):
        return load_quantized(config, tensors, ckpt), tokenizer, cfg
    if ft.get("method") != "lora" or ft.get("merged"):
        from . import build_model

        model = build_model(config)
        load_weights(model, tensors, ckpt)
        return model, tokenizer, cfg
    base = base or ft.get("init")
    if not base or not os.path.exists(base):
        raise ValueError(f"{ckpt}: holds LoRA adapters only; their base model {base!r} is not there "
                         "(pass it with --base, or finetune with --merge to save full weights)")
    model, base_tok, _ = load_pretrained(base, **{k: getattr(config, k) for k in
                                                  ("attention_backend", "dropout", "attn_dropout")})
    if config.num_labels:
        attach_head(model, config.num_labels, config.classifier_pooling)
    lora = ft["lora"]
    apply_lora(model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["targets"])
    load_weights(model, tensors, ckpt, strict=False)
    return model, tokenizer or base_tok, cfg


# ---------------------------------------------------------------------------------------------
# The classification forward pass


def classify_logits(model, ids, types, mask):
    """(B, num_labels) logits. mask: (B, T), 1 at real tokens, or None when nothing is padded."""
    if model.config.arch == "bert":
        logits, _ = model.classify(ids, mask, None, types)
    else:
        logits, _ = model.classify(ids, mask)
    return logits


@torch.no_grad()
def predict_logits(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64,
                   device=None) -> torch.Tensor:
    """Float32 logits (N, num_labels) for encoded examples, in their order. Batches of similar
    length, so padding costs little."""
    from .classification_data import collate, eval_order

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [None] * len(encoded)
    for idx in eval_order([len(ids) for ids, _ in encoded], batch_size):
        ids, types, mask = collate(encoded, idx, pad_id)
        mask = None if bool(mask.all()) else mask.to(device)  # no padding: attention needs no mask
        logits = classify_logits(model, ids.to(device), types.to(device), mask).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    model.train(was_training)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Dynamic int8 quantisation (CPU inference)


def quantizable_layers(model) -> list[str]:
    """The linear layers that carry the work of classification: the blocks and the head.
    The (tied) LM heads stay float: quantising them would add an int8 copy of the embeddings."""
    keep = ("blocks.", "pooler", "classifier", "score")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(keep)]


def quantize_int8(model) -> nn.Module:
    """A copy whose linear layers hold int8 weights (one scale per output channel) and quantise
    their inputs on the fly: torch's dynamic quantisation, for CPU inference."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    float_copy = copy.deepcopy(model).cpu().float().eval()
    spec = {name: per_channel_dynamic_qconfig for name in quantizable_layers(float_copy)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensors as deprecated
        return quantize_dynamic(float_copy, qconfig_spec=spec, dtype=torch.qint8)


def _quantized_modules(qmodel):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, DynamicLinear)]


def quantized_tensors(qmodel) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each int8 layer as <name>.weight (int8), .weight_scale,
    .weight_zero_point and .bias; every other weight as it is (tied ones once)."""
    out: dict[str, torch.Tensor] = {}
    qnames = set()
    for name, m in _quantized_modules(qmodel):
        w = m.weight()
        out[f"{name}.weight"] = w.int_repr()
        out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
        out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64)
        if m.bias() is not None:
            out[f"{name}.bias"] = m.bias().detach()
        qnames.add(name + ".")
    seen = set()
    for k, v in qmodel.state_dict().items():
        if not isinstance(v, torch.Tensor) or k.startswith(tuple(qnames)):
            continue
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def load_quantized(config: ModelConfig, tensors: dict, source: str) -> nn.Module:
    """Rebuild the int8 model saved by quantized_tensors."""
    from . import build_model

    qmodel = quantize_int8(build_model(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, m in _quantized_modules(qmodel):
            try:
                q = tensors.pop(f"{name}.weight")
                scale, zp = tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.weight_zero_point")
            except KeyError:
                raise ValueError(f"{source}: the int8 weights of {name} are missing") from None
            dequant = (q.float() - zp[:, None].float()) * scale[:, None]
            qw = torch.quantize_per_channel(dequant, scale.double(), zp, 0, torch.qint8)
            m.set_weight_bias(qw, tensors.pop(f"{name}.bias", None))
    # the float rest (embeddings, norms, unquantised heads), copied in place: load_state_dict would
    # also ask the int8 layers for their packed weights, which were set above
    own = {**dict(qmodel.named_parameters()), **dict(qmodel.named_buffers())}
    unexpected = [k for k in tensors if k not in own]
    mis_shaped = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if unexpected or mis_shaped:
        raise ValueError(f"{source}: tensors that do not fit the int8 model: {', '.join((unexpected + mis_shaped)[:5])}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return qmodel.eval()


# ---------------------------------------------------------------------------------------------
# The command


def read_inputs(args, default_col: Optional[str]):
    """[(text, pair or None)] from --text, or --input (TSV/CSV/JSONL by column, else lines)."""
    from .classification_data import FORMATS, read_table, to_examples

    if args.text:
        return [(t, None) for t in args.text]
    if args.input == "-":
        return [(line.rstrip("\n"), None) for line in sys.stdin if line.strip()]
    ext = os.path.splitext(args.input)[1].lower()
    if args.format or ext in FORMATS:
        table = read_table(args.input, args.format)
        col = args.text_col or default_col
        if col not in table.columns:
            col = next((c for c in ("text", "sentence", "sentence1") if c in table.columns), col)
        examples = to_examples(table, col, None, args.text_pair_col)
        return [(e.text, e.text_pair) for e in examples]
    from .classification_data import read_text

    return [(line, None) for line in read_text(args.input).splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Labels and probabilities from a finetune.py classifier.")
    p.add_argument("--ckpt", required=True, help="a finetune.py output folder or checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="TSV/CSV/JSONL (its text column) or a text file (one example a line); - for stdin")
    src.add_argument("--text", action="append", help="an example to classify (repeatable)")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl"], help="the input's format when its extension does not say")
    p.add_argument("--text-col", help="text column of a table (default: the one the model was trained on)")
    p.add_argument("--text-pair-col", help="second text column, for sentence pairs")
    p.add_argument("--base", help="the base model of a LoRA checkpoint, when it has moved")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="JSON lines instead of tab-separated columns")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")

    model, tokenizer, cfg = load_finetuned(args.ckpt, base=args.base)
    if not model.config.num_labels or not cfg.get("labels"):
        raise ValueError(f"{args.ckpt}: holds no classifier (for a language model use python -m minillm.generate)")
    if tokenizer is None:
        raise ValueError(f"{args.ckpt}: the checkpoint has no tokenizer file")
    if not cfg.get("quantized"):
        model.to(args.device)
    labels = cfg["labels"]
    ft = cfg.get("finetune") or {}
    if args.text_pair_col is None:
        args.text_pair_col = ft.get("text_pair_col")
    inputs = read_inputs(args, ft.get("text_col"))
    if not inputs:
        raise ValueError("no input text")
    from .classification_data import Example, encode_examples

    encoded = encode_examples(tokenizer, [Example(t, b, None, i) for i, (t, b) in enumerate(inputs)],
                              ft.get("max_len", model.config.block_size))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    probs = F.softmax(predict_logits(model, encoded, pad, args.batch_size), dim=-1)
    if not args.json:
        print("\t".join(["label"] + [f"p({name})" for name in labels] + ["text"]))
    for (text, pair), pr in zip(inputs, probs):
        best = labels[int(pr.argmax())]
        if args.json:
            print(json.dumps({"text": text, **({"text_pair": pair} if pair is not None else {}), "label": best,
                              "probabilities": {n: round(float(v), 6) for n, v in zip(labels, pr)}}))
        else:
            shown = text if pair is None else f"{text} ||| {pair}"
            print("\t".join([best] + [f"{float(v):.4f}" for v in pr] + [shown.replace("\t", " ")]))
    return 0


if __name__ == "__main__":
    run_main(main, "minillm.predict")
