"""Training throughput of train.py's step against a plain eager float32 PyTorch step on the
same model, measured side by side in one process (rounds alternate; the median and the 20%/80%
quantiles of the rounds' tokens/s are reported).

    python -m minillm.benchmarks.train_throughput --data ../shared/data/tinyshakespeare/input.txt

The default shape is the issue's: 4 layers, 4 heads, width 128, context 64, batch 12,
character-level. "eager-fp32" is the honest stand-in for a plain PyTorch GPT (no compile,
float32, our modules); the other rows are train.py's settings. On CUDA (`--device cuda`) each
round is timed by the wall clock between two synchronisations: a round is many steps, so the
clock's resolution and the launch queue do not matter. For a whole train.py run on a GPU use
`python -m minillm.benchmarks.gpu_check`.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from minillm import GPT
from minillm.benchmarks.timing import device_name, summarize
from minillm.config import preset
from minillm.data import Batches, read_corpus, tokenize_corpus
from minillm.device import flops_per_token, measure_matmul_peak
from minillm.tokenizer import CharTokenizer
from minillm.training import TrainSettings, make_optimizer


def make_step(model, opt, compile_: bool, dtype: str, device: torch.device):
    fwd = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))) if dtype != "float32" else None

    def step(x, y):
        if ctx is None:
            _, loss = fwd(x, y)
        else:
            with ctx():
                _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="text file (default: Python's bundled docs)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--steps", type=int, default=40, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["eager-fp32", "compile-fp32"],
                   help="eager-<dtype> or compile-<dtype>, dtype in float32/fp32, bfloat16/bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    text = read_corpus(args.data)[0]
    tok = CharTokenizer.train(text)
    tokens = tokenize_corpus([text], tok)
    batches = Batches(tokens, args.block_size, seed=0)
    cfg = preset("gpt-cpu", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                 block_size=args.block_size, vocab_size=tok.vocab_size, dropout=0.0)
    alias = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}
    runs = {}
    for v in args.variants:
        mode, dt = v.split("-", 1)
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        opt = make_optimizer(model, TrainSettings(lr=1e-3))
        step = make_step(model, opt, mode == "compile", alias[dt], device)
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (and compile)
            step(*(t.to(device) for t in batches.causal_lm(args.batch_size)))
        sync()
        runs[v] = {"step": step, "warmup_s": time.perf_counter() - t0, "rates": [], "model": model}
    tokens_per_step = args.batch_size * args.block_size
    for r in range(args.rounds):
        for v, run in runs.items():
            data = [[t.to(device) for t in batches.causal_lm(args.batch_size)] for _ in range(args.steps)]
            sync()
            t0 = time.perf_counter()
            for x, y in data:
                run["step"](x, y)
            sync()
            run["rates"].append(args.steps * tokens_per_step / (time.perf_counter() - t0))
    # MFU of each variant against the measured matmul peak in the dtype it computes in.
    dtypes = sorted({alias[v.split("-", 1)[1]] for v in args.variants})
    peaks = {dt: measure_matmul_peak(device, dt) for dt in dtypes}
    fpt = flops_per_token(next(iter(runs.values()))["model"], args.block_size)
    base = summarize(runs[args.variants[0]]["rates"]).median
    print(f"model: {args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, context {args.block_size}, "
          f"batch {args.batch_size}, vocab {tok.vocab_size}; {device_name(device)}; "
          "matmul peak " + ", ".join(f"{dt} {pk / 1e9:,.0f} GFLOP/s" for dt, pk in peaks.items()))
    print(f"{'variant':<16}{'tok/s (median)':>16}{'20%':>10}{'80%':>10}{'vs ' + args.variants[0]:>18}{'MFU':>8}{'warm-up s':>11}")
    out = {}
    for v, run in runs.items():
        rate = summarize(run["rates"])
        med = rate.median
        peak = peaks[alias[v.split("-", 1)[1]]]
        out[v] = {"tok_per_s": med, "tok_per_s_p20": rate.p20, "tok_per_s_p80": rate.p80, "all": run["rates"],
                  "warmup_s": run["warmup_s"], "ratio": med / base, "mfu": med * fpt / peak, "peak_flops": peak}
        print(f"{v:<16}{med:>16,.0f}{rate.p20:>10,.0f}{rate.p80:>10,.0f}{med / base:>17.2f}x"
              f"{100 * med * fpt / peak:>7.1f}%{run['warmup_s']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
