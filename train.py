"""Pretrain a GPT (causal LM) or a BERT (masked LM) on a text corpus.

    python train.py                                   # small GPT on Python's own docs, ~3 min on a CPU
    python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare/input.txt
    python train.py --model bert --preset bert-cpu --tokenizer bpe --vocab-size 4096
    torchrun --nproc_per_node=2 train.py --max-steps 200   # DistributedDataParallel

Reads top to bottom: settings -> data -> model -> training -> sample. The output folder gets the
checkpoint (safetensors + JSON, resumable with --resume), metrics.jsonl, summary.json, loss.png.
"""
from __future__ import annotations

import argparse
import os

import torch

from minillm import build_model
from minillm.checkpoint import find_checkpoint, read_config
from minillm.cli import parse_bool, positive_int, run_main
from minillm.config import ACTIVATIONS, BACKENDS, NORMS, POS_ENCODINGS, PRESETS, ModelConfig
from minillm.data import Batches, mask_tokens, read_corpus, split, tokenize_corpus
from minillm.tokenizer import CharTokenizer, HFTokenizer, check_vocab, load_tokenizer
from minillm.training import (
    TrainingStopped, Trainer, TrainSettings, flops_per_token, measure_matmul_peak, plot_losses,
    seed_everything, setup_distributed, write_json_atomic,
)

# Recipes: a model preset plus training settings. Every value can be overridden by its flag.
RECIPES = {
    # The main job: a small GPT on the interpreter's bundled docs, about three minutes on a CPU.
    "default": dict(model="gpt", base="gpt-cpu", n_layer=4, n_head=4, n_embd=128, block_size=128,
                    batch_size=16, lr=2e-3, warmup_steps=50, max_steps=100000, time_budget=150.0,
                    eval_interval=200, eval_iters=20, dropout=0.0, compile=False),
    # Character-level Tiny Shakespeare with a 100 s budget (measured: README, "Measured here"). At
    # this budget a small, fast model wins: on a quiet 2-core Xeon (AVX-512), 100 s runs of the
    # 4x128 GPT-2-style model got val 1.675 (batch 8, lr 2e-3); RoPE 1.640; lr 3e-3, batch 16 1.626;
    # RMSNorm + SwiGLU 1.617; no biases 1.613; 3 layers 1.604; 2 layers 1.555 (49k tok/s).
    "shakespeare-char": dict(model="gpt", base="gpt-cpu", n_layer=2, n_head=4, n_embd=128, block_size=64,
                             pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                             batch_size=16, lr=3e-3, warmup_steps=30, max_steps=100000, time_budget=100.0,
                             eval_interval=0, eval_iters=40, dropout=0.0, compile=True, weight_decay=0.1,
                             beta2=0.99, min_lr_ratio=0.05),
}
for name in PRESETS:
    RECIPES.setdefault(name, dict(model=PRESETS[name].arch, base=name))

BASE = dict(batch_size=12, grad_accum=1, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, max_steps=2000,
            time_budget=None, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, dtype="float32",
            compile=False, activation_checkpointing=False, eval_interval=250, eval_iters=20, log_interval=10,
            ckpt_interval=0, seed=1337, max_skips=10, stop_at_step=None, tokenizer="char", vocab_size=4096, val_fraction=0.1,
            sample_tokens=300, out=None)
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "block_size", "pos_encoding", "norm",
               "activation", "attention_backend", "dropout", "bias", "use_kernels", "chunked_ce")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="default", help=f"recipe or model preset: {', '.join(sorted(RECIPES))}")
    a("--model", choices=["gpt", "bert"], help="causal LM (gpt) or masked LM (bert)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file or folder of text files (default: Python's bundled docs)")
    g.add_argument("--tokenizer", help="char | bpe | path to a tokenizer.json / vocab.txt / checkpoint folder")
    g.add_argument("--vocab-size", type=positive_int, help="BPE vocabulary size")
    g.add_argument("--val-fraction", type=float, help="share of the tokens held out for validation")
    g = p.add_argument_group("model (overrides the preset)")
    for f, kw in [("n_layer", {}), ("n_head", {}), ("n_kv_head", {}), ("n_embd", {}), ("n_inner", {}),
                  ("block_size", {})]:
        g.add_argument("--" + f.replace("_", "-"), type=positive_int, **kw)
    g.add_argument("--pos-encoding", choices=POS_ENCODINGS)
    g.add_argument("--norm", choices=NORMS)
    g.add_argument("--activation", choices=ACTIVATIONS)
    g.add_argument("--attention-backend", choices=BACKENDS)
    g.add_argument("--dropout", type=float)
    g.add_argument("--bias", type=parse_bool)
    g.add_argument("--use-kernels", type=parse_bool, help="Triton kernels for norms/activations/RoPE on CUDA")
    g.add_argument("--chunked-ce", type=parse_bool, help="fused linear + cross-entropy over token chunks")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, help="sequences per step per process")
    g.add_argument("--grad-accum", type=positive_int)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--max-steps", type=positive_int)
    g.add_argument("--time-budget", type=float, help="seconds of training, then evaluate and save")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--compile", type=parse_bool)
    g.add_argument("--activation-checkpointing", type=parse_bool)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-skips", type=int, help="non-finite steps skipped before the run stops")
    g.add_argument("--stop-at-step", type=positive_int,
                   help="checkpoint and stop after this step, leaving the schedule unfinished (continue with --resume)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, help="steps between validations (0: only at the end)")
    g.add_argument("--eval-iters", type=positive_int)
    g.add_argument("--log-interval", type=positive_int)
    g.add_argument("--ckpt-interval", type=int, help="steps between checkpoints (0: at each validation)")
    g.add_argument("--out", help="output folder (default: out/<preset>)")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    g.add_argument("--sample-tokens", type=int, help="tokens to generate at the end (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(args) -> dict:
    """Flags over the recipe over the defaults."""
    if args.preset not in RECIPES:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[args.preset]
    opts = {**BASE, **{k: v for k, v in recipe.items() if k not in ("model", "base")}}
    opts.update({k: v for k, v in vars(args).items() if v is not None and k in BASE or
                 (k in MODEL_FLAGS and v is not None)})
    opts["model"] = args.model or recipe["model"]
    base = recipe["base"]
    if PRESETS[base].arch != opts["model"]:
        base = "gpt-cpu" if opts["model"] == "gpt" else "bert-cpu"
    opts["base"] = base
    opts["out"] = opts["out"] or os.path.join("out", args.preset if args.model is None else f"{args.preset}-{args.model}")
    if not 0.0 <= opts["val_fraction"] < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {opts['val_fraction']}")
    return opts


def make_tokenizer(spec: str, docs: list[str], vocab_size: int):
    if spec == "char":
        return CharTokenizer.train("".join(docs))
    if spec == "bpe":
        return HFTokenizer.train_bpe(docs, vocab_size)
    return load_tokenizer(spec)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = resolve(args)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    out = opts["out"]
    seed_everything(opts["seed"])

    # -- an existing run in --out: continue it (--resume) or refuse to clobber another shape ----
    existing = find_checkpoint(out) if os.path.isdir(out) else None
    if args.resume and existing is None:
        raise ValueError(f"--resume: {out} holds no checkpoint to continue")
    saved = read_config(existing) if existing else None

    # -- data ------------------------------------------------------------------------------------
    docs = read_corpus(args.data)
    if args.resume:
        tokenizer = load_tokenizer(existing)
    else:
        tokenizer = make_tokenizer(opts["tokenizer"], docs, opts["vocab_size"])
    tokens = tokenize_corpus(docs, tokenizer)
    block = opts.get("block_size") or PRESETS[opts["base"]].block_size
    train_tokens, val_tokens = split(tokens, opts["val_fraction"], block)

    # -- model -----------------------------------------------------------------------------------
    overrides = {k: opts[k] for k in MODEL_FLAGS if k in opts and opts[k] is not None}
    overrides["vocab_size"] = tokenizer.vocab_size
    config = PRESETS[opts["base"]].replace(**overrides)
    if saved is not None:
        old = ModelConfig.from_dict(saved["model"])
        if args.resume:
            given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
            if "block_size" in given and given["block_size"] > old.block_size:
                raise ValueError(f"--block-size {given['block_size']} is longer than the checkpoint's context "
                                 f"of {old.block_size} positions")
            clash = [f"--{k.replace('_', '-')} {v} (checkpoint: {getattr(old, k)})" for k, v in given.items()
                     if getattr(old, k) != v and k not in ("dropout", "attention_backend", "use_kernels", "chunked_ce")]
            if clash:
                raise ValueError(f"--resume: flags disagree with the checkpoint in {out}: {', '.join(clash)}")
            config = old.replace(**{k: v for k, v in given.items() if k in ("dropout", "attention_backend",
                                                                           "use_kernels", "chunked_ce")})
        elif _shape(old) != _shape(config):
            raise ValueError(f"{out} holds a checkpoint of another shape ({_describe(old)}, not {_describe(config)}); "
                             "pass --resume to continue it or choose another --out")
    check_vocab(tokenizer, config.vocab_size)
    model = build_model(config).to(device)
    if world > 1:
        torch.distributed.barrier()

    settings = TrainSettings(**{k: opts[k] for k in TrainSettings.__dataclass_fields__ if k in opts},
                             progress=not args.no_progress and rank == 0)
    batch, world_batch = opts["batch_size"], opts["batch_size"] * world
    train_batches = Batches(train_tokens, config.block_size, seed=opts["seed"], rank=rank, world=world)
    mask_gen = torch.Generator().manual_seed(opts["seed"] + 1)

    def get_batch():
        x, y = train_batches.causal_lm(world_batch)
        if config.arch == "bert":
            x, y = mask_tokens(x, tokenizer, tokenizer.vocab_size, mask_gen)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss_fn(m, b):
        x, y = b
        _, loss = m(x, y)
        return loss, x.numel()

    def evaluate(m):
        # the same validation windows (and masks) at every evaluation, so the numbers compare
        vb = Batches(val_tokens, config.block_size, seed=0)
        vgen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(opts["eval_iters"]):
            x, y = vb.causal_lm(batch)
            if config.arch == "bert":
                x, y = mask_tokens(x, tokenizer, tokenizer.vocab_size, vgen)
            _, loss = m(x.to(device), y.to(device))
            losses.append(loss.float().item())
        return {"val_loss": sum(losses) / len(losses)} if losses else {}

    def data_state():
        return {"train": train_batches.state(), "mask": mask_gen.get_state()}

    def load_data_state(st):
        train_batches.load_state(st["train"])
        mask_gen.set_state(st["mask"])

    os.makedirs(out, exist_ok=True)
    extra = {"train": {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))},
             "task": "causal_lm" if config.arch == "gpt" else "masked_lm"}
    trainer = Trainer(model, settings, out, get_batch=get_batch, loss_fn=loss_fn,
                      evaluate=evaluate if opts["val_fraction"] > 0 else None,
                      data_state=data_state, load_data_state=load_data_state, config=config,
                      tokenizer=tokenizer, extra_config=extra, rank=rank, world=world, device=device, log=log)
    if args.resume:
        trainer.resume(existing)
        log(f"resumed {out} at step {trainer.step}")
    else:  # a fresh run; an earlier one's outputs (even one killed before its first checkpoint) go
        if existing:
            log(f"{out} holds an earlier run of the same shape: starting afresh and replacing it")
        for name in ("metrics.jsonl", "summary.json", "loss.png"):
            if rank == 0 and os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))

    n_params = sum(p.numel() for p in model.parameters())
    peak = measure_matmul_peak(device, settings.dtype)
    fpt = flops_per_token(model, config.block_size)
    log(f"{config.arch.upper()}: {n_params / 1e6:.2f}M parameters, {config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, context {config.block_size}, {config.pos_encoding} positions | "
        f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens, vocab {tokenizer.vocab_size} | "
        f"device {device}, {settings.dtype}, {world} process(es), matmul peak {peak / 1e9:.0f} GFLOP/s")

    try:
        summary = trainer.fit(flops_per_item=fpt, peak_flops=peak, unit="tok")
    except TrainingStopped as e:
        raise ValueError(str(e)) from None
    if rank == 0:
        summary.update(parameters=n_params, preset=args.preset, device=str(device), dtype=settings.dtype,
                       world_size=world, matmul_peak_flops=round(peak))
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        plot = plot_losses(trainer.history, os.path.join(out, "loss.png"))
        log(f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s of training "
            f"({summary['wall_seconds']:.0f}s wall), val loss {summary.get('val_loss', float('nan')):.4f}, "
            f"{summary['tok_per_s'] or 0:,.0f} tok/s, MFU {100 * (summary['mfu'] or 0):.1f}%")
        if opts["sample_tokens"] > 0:
            log("--- sample ---")
            log(sample(model, tokenizer, val_tokens, opts["sample_tokens"], device))
            log("--------------")
        log(f"wrote {summary['checkpoint']}, {os.path.join(out, 'metrics.jsonl')}, "
            f"{os.path.join(out, 'summary.json')}" + (f", {plot}" if plot else " (no loss.png: matplotlib is not installed)"))
        log(f"sample more: python -m minillm.generate --ckpt {out} --prompt \"...\"")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def sample(model, tokenizer, val_tokens, n, device) -> str:
    """GPT: a continuation of the start of the validation text. BERT: a filled-in masked snippet."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.tensor(val_tokens[: min(32, model.config.block_size // 2)].astype("int64"), device=device)[None]
    if model.config.arch == "gpt":
        out = model.generate(prompt, n, temperature=0.8, top_k=50, generator=gen)
        return tokenizer.decode(out[0].tolist())
    x = prompt.clone()
    pos = torch.arange(1, x.shape[1], 4, device=device)
    x[0, pos] = tokenizer.mask_id
    with torch.no_grad():
        logits, _ = model(x)
    filled = x.clone()
    filled[0, pos] = logits[0, pos].argmax(-1)
    return f"masked: {tokenizer.decode(x[0].tolist())!r}\nfilled: {tokenizer.decode(filled[0].tolist())!r}"


def _shape(c: ModelConfig):
    return (c.arch, c.vocab_size, c.n_layer, c.n_head, c.kv_heads, c.n_embd, c.inner, c.block_size,
            c.pos_encoding, c.norm, c.activation, c.bias)


def _describe(c: ModelConfig) -> str:
    return f"{c.arch} {c.n_layer}x{c.n_embd}, {c.n_head} heads, vocab {c.vocab_size}, context {c.block_size}"


if __name__ == "__main__":
    run_main(main, "train.py")
