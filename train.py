"""Pretrain a GPT (causal LM) or a BERT (masked LM) on a text corpus.

    python train.py                                   # small GPT on Python's own docs, ~3 min on a CPU or a GPU
    python train.py --preset shakespeare-char --data ../shared/data/tinyshakespeare/input.txt
    python train.py --model bert --preset bert-cpu --tokenizer bpe --vocab-size 4096
    python train.py --out out/default --resume        # continue a run exactly where it stopped
    python train.py --device cpu --dtype float32      # force the CPU (default: CUDA, then MPS, then CPU)
    torchrun --nproc_per_node=2 train.py --max-steps 200   # DistributedDataParallel
    torchrun --nproc_per_node=8 train.py --fsdp ...        # FSDP2: weights, gradients, AdamW moments sharded

Reads top to bottom: settings -> data -> model and optimizer -> the training loop (`train`,
below: batch, forward, backward, clip, step, schedule, evaluate, checkpoint, log) -> sample.
The output folder gets the checkpoint (safetensors + JSON), metrics.jsonl, summary.json, loss.png.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from minillm.cli import DEVICE_HELP, add_bool, add_training_args, positive_int, run_main
from minillm.config import ACTIVATIONS, BACKENDS, NORMS, POS_ENCODINGS, PRESETS, ModelConfig
from minillm.data import DEFAULT_CORPUS, LMData, corpus_key, evaluate_lm, read_corpus, split, tokenize_corpus
from minillm.device import (
    autocast, can_compile, check_device_support, evaluating, flops_per_token, measure_matmul_peak,
    resolve_dtype, seed_everything,
)
from minillm.distributed import (
    finish_distributed, grad_sync, seed_per_process, setup_distributed, shard_model, whole_model, wrap_ddp,
)
from minillm.memory import check_memory
from minillm.model import build_model
from minillm.optim import describe_optimizer
from minillm.run_dir import RunDir, existing_run, keep_previous, lock, refuse_clash
from minillm.tokenizer import CharTokenizer, HFTokenizer, check_vocab, load_tokenizer
from minillm.training import (
    Meter, ProgressBar, TrainingStopped, TrainSettings, TrainState, best_line, best_summary, check_keep_best, clip_gradients,
    count_targets, final_evaluation, lr_at, make_optimizer, resume_training, save_best, save_training, set_lr, skip_step,
    sync_step, token_share,
)

# -- settings -------------------------------------------------------------------------------------
# A recipe is a model preset plus training settings; every value can be overridden by its flag.
# Measured results of the recipes: README, "Measured here".
RECIPES = {
    # The main job: a small GPT on the interpreter's bundled docs, about three minutes on a CPU.
    "default": dict(model="gpt", base="gpt-cpu", n_layer=4, n_head=4, n_embd=128, block_size=128,
                    batch_size=16, lr=2e-3, warmup_steps=50, max_steps=100000, time_budget=150.0,
                    eval_interval=200, eval_iters=20, dropout=0.0),
    # Character-level Tiny Shakespeare in 100 s: at this budget a small, fast model wins.
    "shakespeare-char": dict(model="gpt", base="gpt-cpu", n_layer=2, n_head=4, n_embd=128, block_size=64,
                             pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                             batch_size=16, lr=3e-3, warmup_steps=30, max_steps=100000, time_budget=100.0,
                             eval_interval=0, eval_iters=40, dropout=0.0, compile=True, weight_decay=0.1,
                             beta2=0.99, min_lr_ratio=0.05),
}
for _name in PRESETS:
    RECIPES.setdefault(_name, dict(model=PRESETS[_name].arch, base=_name))
# On a CUDA GPU these recipes replace the CPU ones of the same name: nanoGPT's character-level
# Shakespeare model (6 layers x 384, context 256, dropout 0.2), compiled, in bfloat16 (--dtype auto).
_GPU_GPT = dict(model="gpt", base="gpt-cpu", n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False,
                batch_size=64, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, beta2=0.99, weight_decay=0.1,
                dropout=0.2, compile=True, eval_interval=250, eval_iters=200)
GPU_RECIPES = {
    "default": dict(_GPU_GPT, max_steps=100000, time_budget=150.0),  # the same three minutes as on a CPU
    "shakespeare-char": dict(_GPU_GPT, max_steps=5000),  # nanoGPT's schedule: 5000 steps
}

DATA_DEFAULTS = dict(data=None, tokenizer="char", vocab_size=4096, val_fraction=0.1, sample_tokens=300)
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "block_size", "pos_encoding", "norm",
               "activation", "attention_backend", "dropout", "bias", "use_kernels", "chunked_ce")
# What may differ in a resumed run: how it runs and reports, not what it computes.
PER_INVOCATION = ("device", "attention_backend", "use_kernels", "chunked_ce", "compile", "stop_at_step", "sample_tokens",
                  "log_interval", "eval_interval", "eval_iters", "ckpt_interval", "ckpt_seconds", "fsdp", "early_stopping")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"recipe or model preset: {', '.join(sorted(RECIPES))} (default: default)")
    p.add_argument("--model", choices=["gpt", "bert"], help="causal LM (gpt) or masked LM (bert)")
    p.add_argument("--device", help=DEVICE_HELP + "; on a GPU the default and shakespeare-char recipes are GPU-sized")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file or folder of text files (default: Python's bundled docs)")
    g.add_argument("--tokenizer", help="char | bpe | path to a tokenizer.json / vocab.txt / checkpoint folder (default: char)")
    g.add_argument("--vocab-size", type=positive_int, help="BPE vocabulary size (default: 4096)")
    g.add_argument("--val-fraction", type=float, help="share of the tokens held out for validation (default: 0.1)")
    g.add_argument("--sample-tokens", type=int, help="tokens to generate at the end (0: none; default: 300)")
    g = p.add_argument_group("model (overrides the preset)")
    for f in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "block_size"):
        g.add_argument("--" + f.replace("_", "-"), type=positive_int)
    g.add_argument("--pos-encoding", choices=POS_ENCODINGS)
    g.add_argument("--norm", choices=NORMS)
    g.add_argument("--activation", choices=ACTIVATIONS)
    g.add_argument("--attention-backend", choices=BACKENDS)
    g.add_argument("--dropout", type=float)
    add_bool(g, "--bias", "biases in linear layers and norms")
    add_bool(g, "--use-kernels", "Triton kernels for norms/activations/RoPE/cross-entropy on CUDA")
    add_bool(g, "--chunked-ce", "fused linear + cross-entropy over token chunks (no full logits)")
    add_training_args(p, {}, out_default=None)
    return p


def resolve(args, saved, device: torch.device) -> dict:
    """Flags over the recipe (the GPU one on a CUDA device) over the defaults; a resumed run takes
    its saved settings, and a flag that contradicts them is refused."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("out", "resume", "no_progress", "log")}
    if given.get("data") not in (None, DEFAULT_CORPUS):  # a resumed run finds it from any folder
        given["data"] = os.path.abspath(given["data"])
    if saved is not None:
        if not isinstance(saved.get("train"), dict):
            raise ValueError(f"--resume: {saved['path']} was not written by train.py (its config.json has no train settings)")
        refuse_clash(args.out, {k: v for k, v in given.items() if k not in PER_INVOCATION}, saved["train"])
        return {**saved["train"], **{k: v for k, v in given.items() if k in PER_INVOCATION}, "stop_at_step": args.stop_at_step}
    preset = given.get("preset", "default")
    if preset not in RECIPES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(RECIPES)}")
    recipe = GPU_RECIPES[preset] if device.type == "cuda" and preset in GPU_RECIPES else RECIPES[preset]
    opts = {**vars(TrainSettings()), **DATA_DEFAULTS, **recipe, "preset": preset, **given,
            "recipe": preset + (" (gpu)" if recipe is GPU_RECIPES.get(preset) else "")}
    if PRESETS[recipe["base"]].arch != opts["model"]:  # e.g. --model bert on a GPT recipe
        opts["base"] = "gpt-cpu" if opts["model"] == "gpt" else "bert-cpu"
    if not 0.0 <= opts["val_fraction"] < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {opts['val_fraction']}")
    return opts


def make_tokenizer(spec: str, docs: list[str], vocab_size: int):
    if spec == "char":
        return CharTokenizer.train("".join(docs))
    if spec == "bpe":
        return HFTokenizer.train_bpe(docs, vocab_size)
    return load_tokenizer(spec)


def model_config(opts: dict, tokenizer, saved, resume: bool, out: str) -> ModelConfig:
    """The preset with the flags' overrides; a resumed run's saved config. A fresh run into a
    folder holding another shape of model is refused."""
    if resume:
        runtime = {k: opts[k] for k in PER_INVOCATION if k in MODEL_FLAGS and opts.get(k) is not None}
        return ModelConfig.from_dict(saved["model"]).replace(**runtime)
    overrides = {k: opts[k] for k in MODEL_FLAGS if opts.get(k) is not None}
    config = PRESETS[opts["base"]].replace(**overrides, vocab_size=tokenizer.vocab_size)
    if config.arch == "bert":  # the masked-LM loss never reaches a pooler: build none (DDP wants a gradient for every weight)
        config = config.replace(pooler=False)
    old = ModelConfig.from_dict(saved["model"]) if saved is not None else None
    if old is not None and old.shape() != config.shape():
        raise ValueError(f"{out} holds a checkpoint of another shape ({old.describe()}, not {config.describe()}); "
                         "pass --resume to continue it or choose another --out")
    return config


def probe_step(model, data: LMData):
    """One forward and backward on a batch of data's shape (random tokens; the data's position
    is untouched), for --dtype auto to time on the CPU."""
    g = torch.Generator().manual_seed(0)  # the global RNG (init, data order, dropout) stays untouched
    x = torch.randint(model.config.vocab_size, (data.batch_size, data.block_size), generator=g).to(data.device)

    def step():
        model(x, x)[1].backward()
        model.zero_grad(set_to_none=True)
    return step


def evaluate(model, data: LMData, s: TrainSettings) -> dict:
    with evaluating(model, data.device, s.dtype):
        return {"val_loss": evaluate_lm(model, data, s.eval_iters)}


def train(model, data: LMData, optimizer, scaler, state: TrainState, s: TrainSettings, run: RunDir, save, save_best,
          meter: Meter, world: int, log, show_progress: bool) -> None:
    """The training loop: optimizer steps until max_steps, the time budget, stop_at_step or
    --early-stopping; --keep-best saves the weights of each better evaluation."""
    device = data.device
    step_model = wrap_ddp(model, device, world)
    step_model = torch.compile(step_model) if s.compile else step_model
    bar, first = ProgressBar(s, state, show_progress), True
    while not state.done(s):
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_at(state.progress(s), state.step, s))
        micro = [data.next() for _ in range(s.grad_accum)]
        n_targets = count_targets([y for _, y in micro])  # the step's target tokens, all processes
        step_loss = torch.zeros((), device=device)
        for i, (x, y) in enumerate(micro):
            with grad_sync(step_model, i == len(micro) - 1), autocast(device, s.dtype):
                _, loss = step_model(x, y)
            part = token_share(loss, y, n_targets)
            scaler.scale(part * world).backward()  # DDP averages over processes: * world makes it a sum
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
        state.advance(time.perf_counter() - t0, sum(x.numel() for x, _ in micro) * world, meter, first and s.compile)
        first = False
        bar.update(state, loss, meter, "tok")
        evaluating = bool(s.eval_interval) and state.step % s.eval_interval == 0 and not state.done(s)
        if state.step % s.log_interval == 0 or evaluating or state.done(s):
            row = meter.row(state, loss, lr, "tok", grad_norm)
            if evaluating and data.val is not None and len(data.val):
                row.update(evaluate(model, data, s))
                bar.write(f"step {state.step}: val loss {row['val_loss']:.4f}", log)
                if s.keep_best and state.observe(row, s):
                    save_best(row)
            run.log(row)
        if state.checkpoint_due(s, evaluating):
            save()
    bar.close()


def prepare_data(args, opts, saved, s: TrainSettings, device, rank: int, world: int):
    """The corpus tokenised (cached), the model config for its tokenizer, and the batches:
    (tokenizer, config, LMData, the corpus key a resumed run must match)."""
    docs = read_corpus(opts["data"])
    tokenizer = load_tokenizer(saved["path"]) if args.resume else make_tokenizer(opts["tokenizer"], docs, opts["vocab_size"])
    data_key = corpus_key(docs, tokenizer)
    if args.resume and saved["train"].get("data_key") not in (None, data_key):
        raise ValueError(f"--resume: the corpus {opts['data'] or '(Python docs)'} is not the one {args.out} was trained on")
    config = model_config(opts, tokenizer, saved, args.resume, args.out)
    check_vocab(tokenizer, config.vocab_size)
    check_memory(config, s.batch_size, config.block_size, device, processes=world, fsdp=s.fsdp, dtype=s.dtype)
    train_tokens, val_tokens = split(tokenize_corpus(docs, tokenizer), opts["val_fraction"], config.block_size)
    data = LMData(train_tokens, val_tokens, config.block_size, s.batch_size, s.seed, device,
                  mask_with=tokenizer if config.arch == "bert" else None, rank=rank, world=world)
    return tokenizer, config, data, data_key


def place_model(model, data: LMData, s: TrainSettings, device, world: int, log):
    """The model on its device in the run's dtype (--dtype auto resolved, on the CPU by a timed
    step), or under --fsdp sharded over the processes (each keeps 1/world)."""
    model.gradient_checkpointing = s.activation_checkpointing
    probe = s.dtype == "auto" and world == 1 and not s.fsdp
    s.dtype = resolve_dtype(s.dtype, device, probe_step(model.to(device), data) if probe else None, log)
    return shard_model(model, device, s.dtype) if s.fsdp else model.to(device)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed(args.device or "auto")
    log = print if rank == 0 else (lambda *a, **k: None)
    args.out = args.out or os.path.join("out", (args.preset or "default") + (f"-{args.model}" if args.model else ""))
    if rank == 0:
        lock(args.out)
    saved = existing_run(args.out, args.resume)
    opts = resolve(args, saved if args.resume else None, device)
    check_device_support(device, opts.get("use_kernels") or False, opts.get("attention_backend") or "auto")
    s = TrainSettings.from_options(opts)
    check_keep_best(s, ("val_loss",), "val_loss", opts["val_fraction"] > 0)
    s.compile = s.compile and can_compile(device, log)
    seed_everything(s.seed)

    # -- data ------------------------------------------------------------------------------------
    tokenizer, config, data, data_key = prepare_data(args, opts, saved, s, device, rank, world)
    train_tokens, val_tokens = data.train, data.val

    # -- model and optimizer ---------------------------------------------------------------------
    model = place_model(build_model(config), data, s, device, world, log)
    optimizer = make_optimizer(model, s)
    scaler = torch.amp.GradScaler(device.type, enabled=s.dtype == "float16")
    state = TrainState()
    seed_per_process(s.seed)  # dropout: each process its own masks (a resumed run restores each one's RNG)
    if args.resume:
        resume_training(saved["path"], model, optimizer, scaler, state, data)
        log(f"resumed {args.out} at step {state.step}")
    elif saved is not None and rank == 0:
        log(f"note: {args.out} held an earlier run; it is kept in {keep_previous(args.out)}")
    run = RunDir.open(args.out, rank == 0, state.step if args.resume else None, args.log, opts, log)
    record = {"train": {**{k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))},
                        "dtype": s.dtype, "data_key": data_key},  # auto resolved: a resumed run keeps it
              "task": "causal_lm" if config.arch == "gpt" else "masked_lm"}
    save = functools.partial(save_training, args.out, model, optimizer, scaler, state, s, data, config=config,
                             tokenizer=tokenizer, extra=record)  # every process calls it; rank 0 writes
    keep = functools.partial(save_best, args.out, model, state, config=config, tokenizer=tokenizer, extra=record)
    n_params = sum(p.numel() for p in model.parameters())
    # MFU: the throughput of all processes over the peak of all of them (each measures its own share)
    meter = Meter(flops_per_token(model, config.block_size), measure_matmul_peak(device, s.dtype) * world)
    log(f"{config.arch.upper()}: {n_params / 1e6:.2f}M parameters, {config.describe()}, {config.pos_encoding} "
        f"positions | {len(train_tokens):,} train / {len(val_tokens):,} val tokens | device {device}, {s.dtype}, "
        f"{world} process(es){', FSDP2' if s.fsdp else ''}, matmul peak {meter.peak_flops / 1e9:.0f} GFLOP/s"
        + (f" ({meter.peak_flops / world / 1e9:.0f} a process)" if world > 1 else ""))
    log("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(record["train"].items()) if k != "data_key"))
    log(f"optimizer: {describe_optimizer(optimizer)}")

    # -- training --------------------------------------------------------------------------------
    wall0 = time.perf_counter()
    try:
        train(model, data, optimizer, scaler, state, s, run, save, keep, meter, world, log,
              not args.no_progress and rank == 0)
    except TrainingStopped as e:
        raise ValueError(str(e)) from None
    except KeyboardInterrupt:
        if state.step > 0:
            log(f"interrupted: saved {save()} at step {state.step}")
        raise
    final = final_evaluation(state, s, run, lambda: evaluate(model, data, s) if len(val_tokens) else {}, keep, "val_")
    path = save()
    summary = {"steps": state.step, "train_seconds": round(state.elapsed, 2),
               "wall_seconds": round(time.perf_counter() - wall0, 2), "compile_seconds": round(state.compile_seconds, 2),
               "tok_per_s": run.median("tok_per_s"), "mfu": meter.mfu(run.median("tok_per_s") or 0.0),
               "skipped_steps": state.skips, "checkpoint": path, **final, "parameters": n_params,
               "preset": opts["preset"], "device": str(device), "dtype": s.dtype, "world_size": world, "fsdp": s.fsdp,
               "matmul_peak_flops": round(meter.peak_flops), **best_summary(s, state, args.out, run.history)}
    # Under FSDP the weights gathered whole on rank 0, on the CPU (the model need not fit one GPU); None elsewhere
    whole = whole_model(model, lambda: build_model(config))
    text = None
    if rank == 0 and opts["sample_tokens"] > 0:  # --log: the trackers get it too
        text = sample(whole, tokenizer, val_tokens if len(val_tokens) else train_tokens, opts["sample_tokens"],
                      device if whole is model else torch.device("cpu"))
        run.text("sample", text)
    plot = run.finish(summary)
    if rank == 0:
        report(summary, plot, text, config.arch, opts, args.out, log)
    finish_distributed()
    if final and final["val_loss"] != final["val_loss"]:
        raise ValueError(f"the run ended with a non-finite validation loss ({final['val_loss']}); lower --lr?")
    return 0


def report(summary, plot, text, arch, opts, out, log) -> None:
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    compiled = f", {summary['compile_seconds']:.0f}s compiling, not counted" if summary["compile_seconds"] else ""
    log(f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s of training "
        f"({summary['wall_seconds']:.0f}s wall{compiled}){val}, {summary['tok_per_s'] or 0:,.0f} tok/s, "
        f"MFU {100 * (summary['mfu'] or 0):.1f}%")
    if text is not None:
        log("--- sample ---")
        log(text)
        log("--------------")
    log(f"wrote {summary['checkpoint']}, {os.path.join(out, 'metrics.jsonl')}, {os.path.join(out, 'summary.json')}"
        + (f", {plot}" if plot else " (no loss.png: matplotlib is not installed)"))
    if best_line(summary, opts.get("early_stopping")):
        log(best_line(summary, opts.get("early_stopping")))
    if arch == "gpt":
        log(f"sample more: python -m minillm.generate --ckpt {out} --prompt \"...\"")


def sample(model, tokenizer, text_tokens, n, device) -> str:
    """GPT: a continuation of the start of the (validation) text. BERT: a filled-in masked snippet."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.tensor(text_tokens[: min(32, model.config.block_size // 2)].astype("int64"), device=device)[None]
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


if __name__ == "__main__":
    run_main(main, "train.py")
