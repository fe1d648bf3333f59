"""LayerNorm, forward and backward: our Triton kernels vs torch.nn.functional.layer_norm, in GB/s.

    python -m minillm.benchmarks.layer_norm [--sizes 4096x768,4096x4096] [--dtype bfloat16] [--compile]

Sizes are rows x width. GB/s counts the bytes a fused implementation must move: forward reads
x and writes y (2 * M * N elements), backward reads x and dy and writes dx (3 * M * N
elements); the weight, bias and per-row statistics are negligible and not counted.
"""
import torch
import torch.nn.functional as F

from minillm.benchmarks.op_benchmark import OpCase, run_cli
from minillm.kernels.layer_norm import layer_norm

SIZES = {"cuda": "4096x768,4096x4096,16384x4096", "cpu": "2048x768,2048x4096"}


def bytes_moved(m: int, n: int, element_size: int) -> dict[str, int]:
    return {"fwd": 2 * m * n * element_size, "bwd": 3 * m * n * element_size}


def layer_norm_torch(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def case(size, device, dtype) -> OpCase:
    m, n = size
    x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    return OpCase({"M": m, "N": n}, [x, w, b], layer_norm, layer_norm_torch, bytes_moved(m, n, x.element_size()))


def main(argv=None):
    return run_cli(__doc__, "layer_norm forward/backward", case, SIZES, argv)


if __name__ == "__main__":
    main()
