"""Rotary embedding of q and k, forward and backward: our one-launch Triton kernel vs the
"rotate half" formulation in PyTorch (as in Hugging Face Llama), in GB/s.

    python -m benchmarks.rotary [--sizes 8x32x2048x128] [--kv-heads 8] [--dtype bfloat16]

Sizes are BxHxTxD for q; k has --kv-heads heads (default: as many as q). GB/s counts the
bytes moved: q and k read and written once each (cos/sin are negligible), both ways.
"""
import argparse

import torch

from benchmarks.timing import add_common_args, forward_backward_ms, header, implementations, parse_sizes, resolve, table
from kernels.rotary import apply_rotary

SIZES = {"cuda": "8x12x1024x64,8x32x2048x128", "cpu": "4x12x512x64"}


def rotate_half_torch(q, k, cos, sin):
    """The usual PyTorch way: x * cos + rotate_half(x) * sin with full-width tables."""
    c = torch.cat([cos, cos], dim=-1).to(q.dtype)
    s = torch.cat([sin, sin], dim=-1).to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    return rot(q), rot(k)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="BxHxTxD[,...] for q")
    p.add_argument("--kv-heads", type=int, default=None, help="heads of k (default: as q)")
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    header("apply_rotary (q and k) forward/backward", device, dtype)
    rows = []
    for b, h, t, d in parse_sizes(args.sizes or SIZES[device.type]):
        hk = args.kv_heads or h
        q = torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
        angles = torch.rand(t, d // 2, device=device) * 6.3
        cos, sin = angles.cos(), angles.sin()
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
        for impl, fn in implementations(device, apply_rotary, rotate_half_torch):
            fwd, bwd = forward_backward_ms(fn, [q, k, cos, sin], device, reps, args.warmup)
            rows.append({"impl": impl, "B": b, "H": h, "Hkv": hk, "T": t, "D": d, "fwd ms": fwd,
                         "fwd GB/s": nbytes / fwd / 1e6, "bwd ms": bwd, "bwd GB/s": nbytes / bwd / 1e6})
    table(rows, ["impl", "B", "H", "Hkv", "T", "D", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"], args.json)


if __name__ == "__main__":
    main()
