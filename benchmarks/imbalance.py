"""Class imbalance on SST-2: no correction, class weights, balanced sampling and a moved decision
threshold, side by side at the same time budget.

    python -m minillm.benchmarks.imbalance                      # 4 runs of 120 s, about 10 minutes on a CPU
    python -m minillm.benchmarks.imbalance --budget 300 --positive-share 0.05 --out out/imbalance --reuse

The training set keeps every negative sentence of SST-2 and a random sample of the positive ones
that makes them --positive-share of it (10%: 29,780 negatives, 3,309 positives); dev is unchanged
(428 negatives, 444 positives). Each run finetunes all-MiniLM-L6-v2 with finetune.py's defaults,
float32, for the same budget:

    none        no correction
    weights     --class-weights auto (the loss weighs each class by its inverse frequency)
    balanced    --sampler balanced (each epoch draws the positives as often as the negatives)
    threshold   --threshold auto (trained as `none`; positive when p(positive) >= the threshold
                that maximises macro-F1 on dev)

The threshold is chosen on dev and scored on dev, which flatters it; the table also gives its
2-fold cross-fitted macro-F1 (chosen on one half of dev, scored on the other, both ways), the
figure to trust. Every score is computed here from the saved model's dev logits, with
scikit-learn-compatible definitions (minillm.metrics); the table is printed and written to
<out>/imbalance.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch

from minillm.benchmarks.finetune_sst2 import DATA, minilm_dir, read_tsv
from minillm.benchmarks.timing import cpu_name, run_step
from minillm.classification_data import Example, encode_examples, predict_logits
from minillm.metrics import best_threshold, classification_report
from minillm.pretrained import load_finetuned

METHODS = {"none": [], "weights": ["--class-weights", "auto"], "balanced": ["--sampler", "balanced"],
           "threshold": ["--threshold", "auto"]}


def write_imbalanced(src: str, dst: str, share: float, seed: int) -> tuple[int, int]:
    """SST-2's train.tsv with the positives sampled down to `share` of the result: (negatives, positives)."""
    texts, labels = read_tsv(src)
    neg = [t for t, y in zip(texts, labels) if y == 0]
    pos = [t for t, y in zip(texts, labels) if y == 1]
    keep = round(len(neg) * share / (1 - share))
    rng = random.Random(seed)
    rows = [(t, 0) for t in neg] + [(t, 1) for t in rng.sample(pos, keep)]
    rng.shuffle(rows)
    with open(dst, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return len(neg), keep


def dev_probabilities(ckpt: str, dev: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """p(label "1") of every dev sentence from a saved model, the labels (0/1), and its config."""
    model, tokenizer, cfg = load_finetuned(ckpt)
    texts, labels = read_tsv(dev)
    encoded = encode_examples(tokenizer, [Example(t, None, None, i) for i, t in enumerate(texts)], 128)
    with torch.no_grad():
        logits = predict_logits(model.eval(), encoded, tokenizer.pad_id or 0, 128)
    positive = cfg["labels"].index("1")
    return logits.softmax(-1)[:, positive], torch.tensor(labels), cfg


def scores(p: torch.Tensor, y: torch.Tensor, threshold: float) -> dict:
    r = classification_report(y, (p >= threshold).long(), 2)
    return {"macro_f1": r["f1"], "accuracy": r["accuracy"], "neg": per_class(r, 0), "pos": per_class(r, 1)}


def per_class(r: dict, i: int) -> dict:
    return {"precision": r["per_class_precision"][i], "recall": r["per_class_recall"][i], "f1": r["per_class_f1"][i]}


def cross_fitted_f1(p: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """Macro-F1 with the threshold chosen on one random half of dev and applied to the other, both
    ways, the two halves' predictions pooled."""
    halves = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).chunk(2)
    pred = torch.empty_like(y)
    for fit, score in ((halves[0], halves[1]), (halves[1], halves[0])):
        t = best_threshold(p[fit], y[fit], "f1")[0]
        pred[score] = (p[score] >= t).long()
    return classification_report(y, pred, 2)["f1"]


def measure(name: str, out: str, dev: str, seed: int) -> dict:
    p, y, cfg = dev_probabilities(out, dev)
    threshold = (cfg.get("finetune") or {}).get("threshold")
    row = {"method": name, "flags": " ".join(METHODS[name]), **scores(p, y, 0.5 if threshold is None else threshold),
           "threshold": threshold}
    if threshold is not None:
        row["argmax_macro_f1"] = scores(p, y, 0.5)["macro_f1"]
        row["cross_fitted_macro_f1"] = cross_fitted_f1(p, y, seed)
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    row.update(steps=s["steps"], train_seconds=s["train_seconds"], summary_macro_f1=s.get("eval_f1"))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | flags | macro-F1 | accuracy | neg P / R / F1 | pos P / R / F1 | steps | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prf = lambda c: f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f}"  # noqa: E731
        note = (f"threshold {r['threshold']:.3f} chosen on dev; argmax {r['argmax_macro_f1']:.4f}; "
                f"2-fold cross-fitted {r['cross_fitted_macro_f1']:.4f}" if r["threshold"] is not None else "")
        lines.append(f"| {r['method']} | `{r['flags']}` | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | {prf(r['neg'])} | "
                     f"{prf(r['pos'])} | {r['steps']:,} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA, help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--init", help="the model to finetune (default: all-MiniLM-L6-v2)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per run (default: 120)")
    p.add_argument("--positive-share", type=float, default=0.1, help="positives' share of the training set")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/imbalance")
    p.add_argument("--reuse", action="store_true", help="keep runs whose output folder has a summary.json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train = os.path.join(os.path.abspath(args.out), "train.tsv")
    neg, pos = write_imbalanced(os.path.join(args.data, "train.tsv"), train, args.positive_share, args.seed)
    dev = os.path.abspath(os.path.join(args.data, "dev.tsv"))
    print(f"{cpu_name()}, torch {torch.__version__}, float32 | training set: {neg:,} negatives, {pos:,} positives "
          f"({pos / (neg + pos):.1%}); dev unchanged | {args.budget:g} s a run")
    rows = []
    for name in args.methods.split(","):
        out = os.path.abspath(os.path.join(args.out, name))
        cmd = ["finetune.py", "--init", args.init or minilm_dir(), "--train", train, "--eval", dev, "--text-col",
               "sentence", "--dtype", "float32", "--no-progress", "--seed", str(args.seed), *METHODS[name],
               "--time-budget", str(args.budget), "--out", out]
        run_step(name, cmd, out, args.reuse)
        rows.append(measure(name, out, dev, args.seed))
    print(table(rows))
    with open(os.path.join(args.out, "imbalance.json"), "w", encoding="utf-8") as f:
        json.dump({"cpu": cpu_name(), "budget": args.budget, "negatives": neg, "positives": pos, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
