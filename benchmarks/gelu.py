"""GELU (tanh), forward and backward: our Triton kernels vs F.gelu(approximate="tanh"), in GB/s.

    python -m minillm.benchmarks.gelu [--sizes 8192x3072,8192x16384] [--dtype bfloat16] [--compile]

GB/s counts the bytes moved: forward reads x and writes y (2 elements per element of x),
backward reads x and dy and writes dx (3).
"""
import torch
import torch.nn.functional as F

from minillm.benchmarks.op_benchmark import OpCase, run_cli
from minillm.kernels.gelu import gelu_tanh

SIZES = {"cuda": "8192x3072,8192x16384", "cpu": "2048x3072"}


def bytes_moved(m: int, n: int, element_size: int) -> dict[str, int]:
    return {"fwd": 2 * m * n * element_size, "bwd": 3 * m * n * element_size}


def gelu_torch(x):
    return F.gelu(x, approximate="tanh")


def case(size, device, dtype) -> OpCase:
    m, n = size
    x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    return OpCase({"M": m, "N": n}, [x], gelu_tanh, gelu_torch, bytes_moved(m, n, x.element_size()))


def main(argv=None):
    return run_cli(__doc__, "gelu_tanh forward/backward", case, SIZES, argv)


if __name__ == "__main__":
    main()
