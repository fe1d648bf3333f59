"""LM head + loss: the chunked fused linear + cross-entropy vs the plain path, in TFLOP/s.

    python -m benchmarks.fused_linear_cross_entropy [--sizes 8192x768x50257] [--dtype bfloat16]

Sizes are NxCxV (tokens x hidden x vocabulary). The plain path is
`F.cross_entropy(F.linear(hidden, weight).float(), targets)`; the chunked path is
`kernels.fused_linear_cross_entropy` (on CUDA its per-chunk softmax is our Triton kernel; on
the CPU it is plain PyTorch too, so both CPU rows are PyTorch). TFLOP/s counts the three
matmuls, 6 * N * C * V for forward + backward (the chunked path does them all in its forward)
and 2 * N * C * V for the loss alone. On CUDA the peak memory of forward + backward is also
shown; for the CPU memory comparison run `python -m benchmarks.ce_memory`.
"""
import argparse

import torch

from benchmarks.timing import add_common_args, header, median_ms, parse_sizes, resolve, table
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

SIZES = {"cuda": "8192x768x50257,8192x4096x128256", "cpu": "1024x768x50257"}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--sizes", help="NxCxV[,...] tokens x hidden x vocabulary")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    args = p.parse_args(argv)
    device, dtype, reps = resolve(args)
    if args.reps is None and device.type == "cpu":
        reps, args.warmup = 3, 1  # seconds per repetition on a CPU
    header("fused linear + cross-entropy (chunked) vs plain", device, dtype)
    if device.type != "cuda":
        print("(On the CPU the chunked path runs in plain PyTorch: both rows are PyTorch.)")
    rows = []
    cuda = device.type == "cuda"
    for n, c, v in parse_sizes(args.sizes or SIZES[device.type]):
        hidden = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(v, c, device=device, dtype=dtype) * c**-0.5).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device)
        flops = 2 * n * c * v
        impls = [("chunked" + ("" if cuda else " (torch)"),
                  lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=args.chunk_size)),
                 ("plain", fused_linear_cross_entropy_reference)]
        for impl, fn in impls:
            def loss_only():
                with torch.no_grad():
                    return fn(hidden, weight, targets)

            def forward_backward():
                return torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))

            fwd = median_ms(loss_only, device, reps, args.warmup)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            both = median_ms(forward_backward, device, reps, args.warmup)
            row = {"impl": impl, "N": n, "C": c, "V": v, "loss ms": fwd, "loss TFLOP/s": flops / fwd / 1e9,
                   "fwd+bwd ms": both, "fwd+bwd TFLOP/s": 3 * flops / both / 1e9}
            if cuda:
                row["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append(row)
    columns = ["impl", "N", "C", "V", "loss ms", "loss TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"]
    table(rows, columns + (["peak MiB"] if cuda else []), args.json)


if __name__ == "__main__":
    main()
