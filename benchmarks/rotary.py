"""Rotary embedding of q and k, forward and backward: our one-launch Triton kernel vs the
"rotate half" formulation in PyTorch (as in Hugging Face Llama), in GB/s.

    python -m minillm.benchmarks.rotary [--sizes 8x32x2048x128] [--kv-heads 8] [--dtype bfloat16] [--compile]

Sizes are BxHxTxD for q; k has --kv-heads heads (default: as many as q). GB/s counts the
bytes moved: q and k read and written once each, both ways (the cos/sin tables, T x D/2
each, are negligible and not counted).
"""
import torch

from minillm.benchmarks.op_benchmark import OpCase, run_cli
from minillm.kernels.rotary import apply_rotary

SIZES = {"cuda": "8x12x1024x64,8x32x2048x128", "cpu": "4x12x512x64"}


def bytes_moved(q_numel: int, k_numel: int, element_size: int) -> dict[str, int]:
    both_ways = 2 * (q_numel + k_numel) * element_size
    return {"fwd": both_ways, "bwd": both_ways}


def rotate_half_torch(q, k, cos, sin):
    """The usual PyTorch way: x * cos + rotate_half(x) * sin with full-width tables."""
    c = torch.cat([cos, cos], dim=-1).to(q.dtype)
    s = torch.cat([sin, sin], dim=-1).to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    return rot(q), rot(k)


def case(size, device, dtype, kv_heads=None) -> OpCase:
    b, h, t, d = size
    hk = kv_heads or h
    q = torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(t, d // 2, device=device) * 6.3
    return OpCase({"B": b, "H": h, "Hkv": hk, "T": t, "D": d}, [q, k, angles.cos(), angles.sin()],
                  apply_rotary, rotate_half_torch, bytes_moved(q.numel(), k.numel(), q.element_size()))


def main(argv=None):
    return run_cli(__doc__, "apply_rotary (q and k) forward/backward", case, SIZES, argv,
                   add_args=lambda p: p.add_argument("--kv-heads", type=int, help="heads of k (default: as q)"),
                   options=lambda args: {"kv_heads": args.kv_heads})


if __name__ == "__main__":
    main()
