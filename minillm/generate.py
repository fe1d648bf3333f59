"""Sample text from a GPT checkpoint: train.py's, or a finetune.py language model (full
weights, LoRA adapters on their base model, or a quantised copy).

    python -m minillm.generate --ckpt out/default --prompt "The for statement" --tokens 200
"""
from __future__ import annotations

import argparse

import torch

from .cli import add_inference_args, run_main
from .device import autocast, inference_placement, resolve_device
from .pretrained import load_finetuned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Sample from a minillm GPT checkpoint.")
    p.add_argument("--ckpt", required=True, help="a train.py output folder or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", help="the base model of a LoRA checkpoint, when it has moved")
    add_inference_args(p)
    args = p.parse_args(argv)
    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    if args.num_samples <= 0:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_finetuned(args.ckpt, base=args.base)
    if model.config.arch != "gpt":
        raise ValueError(f"{args.ckpt}: holds a {model.config.arch.upper()} model; generation needs a GPT")
    if model.config.num_labels or cfg.get("labels"):
        raise ValueError(f"{args.ckpt}: holds a classifier; label text with python -m minillm.predict --ckpt {args.ckpt}")
    if tokenizer is None:
        raise ValueError(f"{args.ckpt}: the checkpoint has no tokenizer file")
    device, dtype = inference_placement(device, args.device, args.dtype, bool(cfg.get("quantized")), args.ckpt)
    model.to(device)
    model.eval()
    ids = tokenizer.encode(args.prompt)
    if not ids:  # an empty prompt starts from the end-of-text token, or a newline
        ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, device=device)
    with autocast(device, dtype):
        out = model.generate(x, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             generator=gen)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(out[i].tolist()))
    return 0


if __name__ == "__main__":
    run_main(main, "minillm.generate")
