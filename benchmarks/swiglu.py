"""SwiGLU, forward and backward: our Triton kernels vs F.silu(gate) * up, in GB/s.

    python -m benchmarks.swiglu [--sizes 8192x11008] [--dtype bfloat16]

GB/s counts the bytes a fused implementation moves: forward reads gate and up and writes y
(3 elements per output element), backward reads dy, gate and up and writes both gradients (5).
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import add_common_args, forward_backward_ms, header, implementations, parse_sizes, resolve, table
from kernels.swiglu import swiglu

SIZES = {"cuda": "8192x2816,8192x11008", "cpu": "2048x2816"}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="MxN[,MxN...] tokens x intermediate width")
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    header("swiglu forward/backward", device, dtype)
    rows = []
    for m, n in parse_sizes(args.sizes or SIZES[device.type]):
        gate = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        up = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        nbytes = gate.numel() * gate.element_size()
        for impl, fn in implementations(device, swiglu, lambda g, u: F.silu(g) * u):
            fwd, bwd = forward_backward_ms(fn, [gate, up], device, reps, args.warmup)
            rows.append({"impl": impl, "M": m, "N": n, "fwd ms": fwd, "fwd GB/s": 3 * nbytes / fwd / 1e6,
                         "bwd ms": bwd, "bwd GB/s": 5 * nbytes / bwd / 1e6})
    table(rows, ["impl", "M", "N", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"], args.json)


if __name__ == "__main__":
    main()
