"""Softmax cross-entropy over a large vocabulary: our fused Triton kernel vs F.cross_entropy.

    python -m benchmarks.cross_entropy [--sizes 4096x50257,8192x50257] [--dtype bfloat16]

Two measurements per size: the loss alone (under no_grad: our kernel reads the logits once),
and forward + backward together (our kernel writes dlogits during the forward, so the split
the other benchmarks make does not apply). GB/s counts the bytes any implementation must
move: N * V elements for the loss, twice that (read logits, write dlogits) for
forward + backward. Our kernel actually reads the logits twice in the latter.
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import add_common_args, header, implementations, median_ms, parse_sizes, resolve, table
from kernels.cross_entropy import cross_entropy

SIZES = {"cuda": "4096x50257,8192x50257,4096x128256", "cpu": "1024x50257"}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="NxV[,NxV...] tokens x vocabulary")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    header("cross_entropy", device, dtype)
    rows = []
    for n, v in parse_sizes(args.sizes or SIZES[device.type]):
        logits = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, v, (n,), device=device)
        nbytes = n * v * logits.element_size()
        ls = args.label_smoothing
        for impl, fn in implementations(device, cross_entropy, F.cross_entropy):
            def loss_only():
                with torch.no_grad():
                    return fn(logits, targets, label_smoothing=ls)

            def forward_backward():
                return torch.autograd.grad(fn(logits, targets, label_smoothing=ls), logits)

            fwd = median_ms(loss_only, device, reps, args.warmup)
            both = median_ms(forward_backward, device, reps, args.warmup)
            rows.append({"impl": impl, "N": n, "V": v, "loss ms": fwd, "loss GB/s": nbytes / fwd / 1e6,
                         "fwd+bwd ms": both, "fwd+bwd GB/s": 2 * nbytes / both / 1e6})
    table(rows, ["impl", "N", "V", "loss ms", "loss GB/s", "fwd+bwd ms", "fwd+bwd GB/s"], args.json)


if __name__ == "__main__":
    main()
