"""AdamW, Muon and SGD on the shakespeare-char recipe, at the same time budget.

    python -m minillm.benchmarks.optimizers                       # adamw and muon, 100 s each (about 5 minutes)
    python -m minillm.benchmarks.optimizers --runs adamw,muon,muon:6e-3,sgd:0.3 --out out/optimizers --reuse

Each run is `python train.py --preset shakespeare-char --data <Tiny Shakespeare>` with
`--optimizer KIND` (and `--lr LR` when the run is written KIND:LR; otherwise the recipe's lr, which
Muon shares with AdamW through its RMS-matching step size: minillm/optim.py), float32, the
recipe's 100-second budget. Prints the validation loss of each, the steps taken and the
throughput, as a markdown table; writes <out>/optimizers.json.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from minillm.benchmarks.timing import ROOT, cpu_name, run_step

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")


def parse_run(spec: str) -> tuple[str, list[str]]:
    """"muon:6e-3" -> ("muon-lr6e-3", ["--optimizer", "muon", "--lr", "6e-3"])."""
    kind, _, lr = spec.partition(":")
    return (kind + (f"-lr{lr}" if lr else ""), ["--optimizer", kind, *(["--lr", lr] if lr else [])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHAKESPEARE, help="the corpus (default: Tiny Shakespeare in ../shared/data)")
    p.add_argument("--runs", default="adamw,muon", help="comma-separated KIND or KIND:LR (default: adamw,muon)")
    p.add_argument("--budget", type=float, default=100.0, help="seconds of training a run (default: 100)")
    p.add_argument("--out", default="out/optimizers")
    p.add_argument("--reuse", action="store_true", help="keep runs whose output folder has a summary.json")
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"{args.data}: no such corpus")
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    rows = []
    for spec in args.runs.split(","):
        name, flags = parse_run(spec)
        out = os.path.abspath(os.path.join(args.out, name))
        run_step(name, ["train.py", "--preset", "shakespeare-char", "--data", os.path.abspath(args.data), *flags,
                        "--time-budget", str(args.budget), "--dtype", "float32", "--sample-tokens", "0",
                        "--no-progress", "--out", out], out, args.reuse)
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            s = json.load(f)
        with open(os.path.join(out, "checkpoint", "config.json"), encoding="utf-8") as f:
            lr = json.load(f)["train"]["lr"]
        rows.append({"run": name, "lr": lr, "val_loss": s["val_loss"], "steps": s["steps"], "tok_per_s": s["tok_per_s"]})
    print("| optimizer | lr | validation loss | steps | tok/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['lr']:g} | {r['val_loss']:.4f} | {r['steps']:,} | {r['tok_per_s']:,.0f} |")
    with open(os.path.join(args.out, "optimizers.json"), "w", encoding="utf-8") as f:
        json.dump({"cpu": cpu_name(), "budget": args.budget, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
