"""GELU (tanh), forward and backward: our Triton kernels vs F.gelu(approximate="tanh"), in GB/s.

    python -m benchmarks.gelu [--sizes 8192x3072,8192x16384] [--dtype bfloat16]

GB/s counts the bytes moved: forward reads x and writes y (2 elements per element of x),
backward reads x and dy and writes dx (3).
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import add_common_args, forward_backward_ms, header, implementations, parse_sizes, resolve, table
from kernels.gelu import gelu_tanh

SIZES = {"cuda": "8192x3072,8192x16384", "cpu": "2048x3072"}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="MxN[,MxN...]")
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    header("gelu_tanh forward/backward", device, dtype)
    rows = []
    for m, n in parse_sizes(args.sizes or SIZES[device.type]):
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        nbytes = x.numel() * x.element_size()
        for impl, fn in implementations(device, gelu_tanh, lambda x: F.gelu(x, approximate="tanh")):
            fwd, bwd = forward_backward_ms(fn, [x], device, reps, args.warmup)
            rows.append({"impl": impl, "M": m, "N": n, "fwd ms": fwd, "fwd GB/s": 2 * nbytes / fwd / 1e6,
                         "bwd ms": bwd, "bwd GB/s": 3 * nbytes / bwd / 1e6})
    table(rows, ["impl", "M", "N", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"], args.json)


if __name__ == "__main__":
    main()
