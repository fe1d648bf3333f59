"""SwiGLU, forward and backward: our Triton kernels vs F.silu(gate) * up, in GB/s.

    python -m minillm.benchmarks.swiglu [--sizes 8192x11008] [--dtype bfloat16] [--compile]

Sizes are tokens x intermediate width. GB/s counts the bytes a fused implementation moves:
forward reads gate and up and writes y (3 elements per output element), backward reads dy,
gate and up and writes both gradients (5).
"""
import torch
import torch.nn.functional as F

from minillm.benchmarks.op_benchmark import OpCase, run_cli
from minillm.kernels.swiglu import swiglu

SIZES = {"cuda": "8192x2816,8192x11008", "cpu": "2048x2816"}


def bytes_moved(m: int, n: int, element_size: int) -> dict[str, int]:
    return {"fwd": 3 * m * n * element_size, "bwd": 5 * m * n * element_size}


def swiglu_torch(gate, up):
    return F.silu(gate) * up


def case(size, device, dtype) -> OpCase:
    m, n = size
    gate = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    return OpCase({"M": m, "N": n}, [gate, up], swiglu, swiglu_torch, bytes_moved(m, n, gate.element_size()))


def main(argv=None):
    return run_cli(__doc__, "swiglu forward/backward", case, SIZES, argv)


if __name__ == "__main__":
    main()
