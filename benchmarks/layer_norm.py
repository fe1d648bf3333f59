"""LayerNorm, forward and backward: our Triton kernels vs torch.nn.functional.layer_norm, in GB/s.

    python -m benchmarks.layer_norm [--sizes 4096x768,4096x4096] [--dtype bfloat16]

GB/s counts the bytes a fused implementation must move: forward reads x and writes y
(2 * M * N elements), backward reads x and dy and writes dx (3 * M * N elements); the
weight, bias and per-row statistics are negligible.
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import add_common_args, forward_backward_ms, header, implementations, parse_sizes, resolve, table
from kernels.layer_norm import layer_norm

SIZES = {"cuda": "4096x768,4096x4096,16384x4096", "cpu": "2048x768,2048x4096"}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="MxN[,MxN...] rows x width")
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    header("layer_norm forward/backward", device, dtype)
    rows = []
    for m, n in parse_sizes(args.sizes or SIZES[device.type]):
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        nbytes = m * n * x.element_size()
        for impl, fn in implementations(device, layer_norm, lambda x, w, b: F.layer_norm(x, (n,), w, b)):
            fwd, bwd = forward_backward_ms(fn, [x, w, b], device, reps, args.warmup)
            rows.append({"impl": impl, "M": m, "N": n, "fwd ms": fwd, "fwd GB/s": 2 * nbytes / fwd / 1e6,
                         "bwd ms": bwd, "bwd GB/s": 3 * nbytes / bwd / 1e6})
    table(rows, ["impl", "M", "N", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"], args.json)


if __name__ == "__main__":
    main()
