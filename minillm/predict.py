"""Labels and probabilities for new text, from a checkpoint written by finetune.py.

    python -m minillm.predict --ckpt out/sst2 --input new.tsv          # TSV/CSV/JSONL: its text column
    python -m minillm.predict --ckpt out/sst2 --input sentences.txt    # plain text: one example a line
    python -m minillm.predict --ckpt out/sst2 --text "a gorgeous film" --text "a dull mess"
    echo "a gorgeous film" | python -m minillm.predict --ckpt out/sst2 --input -
    cat new.tsv | python -m minillm.predict --ckpt out/sst2 --input - --format tsv

Prints one tab-separated line per example: the predicted label, then the probability of
every label (the header names them), then the text; for --task multilabel the labels predicted
(comma-separated) and each label's probability; for --task regress the number. --json prints JSON lines instead. The
label is the likeliest one, or for a model finetuned with --threshold, the second label when its
probability reaches the saved threshold. An output folder with a best/ checkpoint (--keep-best)
is read from there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch.nn.functional as F

from .classification_data import (
    FORMATS,
    Example,
    Table,
    encode_examples,
    parse_table,
    predict_logits,
    read_table,
    read_text,
    to_examples,
)
from .cli import add_inference_args, run_main
from .device import autocast, inference_placement, resolve_device
from .pretrained import load_finetuned

# Where the model's training column is missing from a table, the first of these found is read.
TEXT_COLUMNS = ("text", "sentence", "sentence1")


def read_inputs(args, trained_col: Optional[str]) -> list[tuple[str, Optional[str]]]:
    """[(text, pair or None)] from --text, or --input: a table (TSV/CSV/JSONL, by --format or the
    extension; from standard input with --format) read by column, else one example a line."""
    if args.text:
        return [(t, None) for t in args.text]
    stdin = args.input == "-"
    if args.format or (not stdin and os.path.splitext(args.input)[1].lower() in FORMATS):
        table = parse_table(sys.stdin.read(), "<stdin>", args.format) if stdin else read_table(args.input, args.format)
        examples = to_examples(table, text_column(table, args.text_col, trained_col), None, args.text_pair_col)
        return [(e.text, e.text_pair) for e in examples]
    if stdin:
        return [(line.rstrip("\n"), None) for line in sys.stdin if line.strip()]
    return [(line, None) for line in read_text(args.input).splitlines() if line.strip()]


def text_column(table: Table, asked: Optional[str], trained: Optional[str]) -> Optional[str]:
    """The column to read: --text-col as given (to_examples names the columns if it is missing),
    else the one the model was trained on, else a usual name the table has."""
    if asked is not None:
        return asked
    if trained in table.columns:
        return trained
    return next((c for c in TEXT_COLUMNS if c in table.columns), trained)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Labels and probabilities from a finetune.py classifier.")
    p.add_argument("--ckpt", required=True, help="a finetune.py output folder or checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="TSV/CSV/JSONL (its text column) or a text file (one example a line); - for stdin")
    src.add_argument("--text", action="append", help="an example to classify (repeatable)")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl"],
                   help="the input's format when its extension does not say (with --input -: a table, not lines)")
    p.add_argument("--text-col", help="text column of a table (default: the one the model was trained on)")
    p.add_argument("--text-pair-col", help="second text column, for sentence pairs")
    p.add_argument("--base", help="the base model of a LoRA checkpoint, when it has moved")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="JSON lines instead of tab-separated columns")
    add_inference_args(p)
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_finetuned(args.ckpt, base=args.base)
    task = cfg.get("task") or "classify"
    if not model.config.num_labels or not (cfg.get("labels") or task == "regress"):
        raise ValueError(f"{args.ckpt}: holds no classifier (for a language model use python -m minillm.generate)")
    if tokenizer is None:
        raise ValueError(f"{args.ckpt}: the checkpoint has no tokenizer file")
    device, dtype = inference_placement(device, args.device, args.dtype, bool(cfg.get("quantized")), args.ckpt)
    model.to(device)
    ft = cfg.get("finetune") or {}
    if args.text_pair_col is None:
        args.text_pair_col = ft.get("text_pair_col")
    inputs = read_inputs(args, ft.get("text_col"))
    if not inputs:
        raise ValueError("no input text")
    encoded = encode_examples(tokenizer, [Example(t, b, None, i) for i, (t, b) in enumerate(inputs)],
                              ft.get("max_len", model.config.block_size))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    with autocast(device, dtype):
        logits = predict_logits(model, encoded, pad, args.batch_size)  # float32
    for (text, pair), answer in zip(inputs, answers(task, logits, cfg.get("labels"), ft, args.json)):
        if args.json:
            print(json.dumps({"text": text, **({"text_pair": pair} if pair is not None else {}), **answer}))
        else:
            shown = text if pair is None else f"{text} ||| {pair}"
            print("\t".join([*answer, shown.replace("\t", " ")]))
    return 0


def answers(task: str, logits, labels, ft: dict, as_json: bool):
    """What is printed of each example before its text: a JSON dict, or the tab-separated
    columns (after a header line, printed here). classify: the label (the likeliest, or with a
    saved --threshold the second label when its probability reaches it) and every probability;
    multilabel: the labels whose probability reaches the threshold, and every probability;
    regress: the number."""
    if task == "regress":
        if not as_json:
            print("value\ttext")
        return [{"value": round(float(v), 6)} if as_json else [f"{float(v):.4f}"] for v in logits[:, 0]]
    multi = task == "multilabel"
    probs = logits.sigmoid() if multi else F.softmax(logits, dim=-1)
    threshold = ft.get("threshold") if multi or len(labels) == 2 else None  # classify: a number once chosen
    threshold = threshold if isinstance(threshold, (int, float)) else None
    if not as_json:
        print("\t".join(["labels" if multi else "label"] + [f"p({name})" for name in labels] + ["text"]))
    out = []
    for pr in probs:
        if multi:
            chosen = [n for n, v in zip(labels, pr) if float(v) >= threshold]
        else:
            chosen = labels[int(pr.argmax())] if threshold is None else labels[int(float(pr[1]) >= threshold)]
        if as_json:
            out.append({("labels" if multi else "label"): chosen,
                        "probabilities": {n: round(float(v), 6) for n, v in zip(labels, pr)},
                        **({"threshold": threshold} if threshold is not None else {})})
        else:
            shown = ft.get("label_sep", ",").join(chosen) if multi else chosen
            out.append([shown] + [f"{float(v):.4f}" for v in pr])
    return out


if __name__ == "__main__":
    run_main(main, "minillm.predict")
