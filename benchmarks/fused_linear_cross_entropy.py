"""LM head + loss: the chunked fused linear + cross-entropy vs the plain path, in TFLOP/s.

    python -m minillm.benchmarks.fused_linear_cross_entropy [--sizes 8192x768x50257] [--dtype bfloat16]

Sizes are NxCxV (tokens x hidden x vocabulary). The plain path is
`F.cross_entropy(F.linear(hidden, weight).float(), targets)`; the chunked path is
`minillm.kernels.fused_linear_cross_entropy` (on CUDA its per-chunk softmax is our Triton kernel; on
the CPU it is plain PyTorch too, so both CPU rows are PyTorch). The op is compute-bound, so
TFLOP/s is the figure to read: it counts the three matmuls, 6 * N * C * V for forward +
backward (the chunked path does them all in its forward) and 2 * N * C * V for the loss alone.
GB/s counts what an implementation that never writes the logits must move: hidden and weight
read and the int64 targets (loss), plus dhidden and dweight written (forward + backward).
On CUDA the peak memory of forward + backward is also shown; for the CPU memory comparison
run `python -m minillm.benchmarks.ce_memory`.
"""
import torch

from minillm.benchmarks.op_benchmark import FUSED, OpCase, run_cli
from minillm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

SIZES = {"cuda": "8192x768x50257,8192x4096x128256", "cpu": "1024x768x50257"}


def flops(n: int, c: int, v: int) -> dict[str, float]:
    return {"loss": 2.0 * n * c * v, "fwd+bwd": 6.0 * n * c * v}


def bytes_moved(n: int, c: int, v: int, element_size: int) -> dict[str, int]:
    tensors, targets = (n * c + v * c) * element_size, n * 8
    return {"loss": tensors + targets, "fwd+bwd": 2 * tensors + targets}


def case(size, device, dtype, chunk_size=None) -> OpCase:
    n, c, v = size
    hidden = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, device=device, dtype=dtype) * c**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    return OpCase({"N": n, "C": c, "V": v}, [hidden, weight, targets],
                  lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size),
                  fused_linear_cross_entropy_reference, bytes_moved(n, c, v, hidden.element_size()),
                  passes=FUSED, flops=flops(n, c, v), peak_memory=True,
                  kernel_name="chunked", reference_name="plain", kernel_on_cpu=True)


def main(argv=None):
    return run_cli(__doc__, "fused linear + cross-entropy (chunked) vs plain", case, SIZES,
                   argv, cpu_reps=3,
                   add_args=lambda p: p.add_argument("--chunk-size", type=int, help="tokens per chunk (default: automatic)"),
                   options=lambda args: {"chunk_size": args.chunk_size})


if __name__ == "__main__":
    main()
