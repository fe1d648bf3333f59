"""Softmax cross-entropy over a large vocabulary: our fused Triton kernel vs F.cross_entropy.

    python -m minillm.benchmarks.cross_entropy [--sizes 4096x50257,8192x50257] [--dtype bfloat16] [--compile]

Sizes are tokens x vocabulary. Two measurements per size: the loss alone (under no_grad: our
kernel reads the logits once), and forward + backward together (our kernel writes dlogits
during the forward, so the split the other benchmarks make does not apply). GB/s counts the
bytes any implementation must move: the logits read (N * V elements) and the targets (int64)
for the loss; for forward + backward the dlogits written too (another N * V elements). Our
kernel actually reads the logits twice in the latter.
"""
import torch
import torch.nn.functional as F

from minillm.benchmarks.op_benchmark import FUSED, OpCase, run_cli
from minillm.kernels.cross_entropy import cross_entropy

SIZES = {"cuda": "4096x50257,8192x50257,4096x128256", "cpu": "1024x50257"}


def bytes_moved(n: int, v: int, element_size: int) -> dict[str, int]:
    logits, targets = n * v * element_size, n * 8
    return {"loss": logits + targets, "fwd+bwd": 2 * logits + targets}


def case(size, device, dtype, label_smoothing=0.0) -> OpCase:
    n, v = size
    logits = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=device)
    return OpCase({"N": n, "V": v}, [logits, targets],
                  lambda x, t: cross_entropy(x, t, label_smoothing=label_smoothing),
                  lambda x, t: F.cross_entropy(x, t, label_smoothing=label_smoothing),
                  bytes_moved(n, v, logits.element_size()), passes=FUSED)


def main(argv=None):
    return run_cli(__doc__, "cross_entropy", case, SIZES, argv,
                   add_args=lambda p: p.add_argument("--label-smoothing", type=float, default=0.0),
                   options=lambda args: {"label_smoothing": args.label_smoothing})


if __name__ == "__main__":
    main()
