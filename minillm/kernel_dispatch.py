"""The one rule for when a layer calls a Triton kernel from kernels/ instead of its PyTorch code.

A layer built with use_kernels=True asks `use_triton(enabled, *tensors)` on every call, and on
yes imports its kernel by name at the call site (`from minillm.kernels.rms_norm import rms_norm`): the
dependency is visible to readers and tools, and a renamed kernel raises instead of quietly
falling back. minillm never needs Triton: without it `use_triton` says no.

The kernels live in the repository's top-level kernels/ folder and are imported as
`minillm.kernels` (minillm/kernels is a link to that folder), so no name outside minillm's own
is installed.
"""
from __future__ import annotations

import torch

from minillm.kernels import launch


def triton_available() -> bool:
    """Whether the Triton kernels can run at all here (Triton installed)."""
    return launch.HAS_TRITON


def use_triton(enabled: bool, *tensors: torch.Tensor) -> bool:
    """True when a layer should run its Triton kernel on these tensors: kernels are switched on,
    and the tensors are on CUDA, or TRITON_INTERPRET=1 runs the kernels on the CPU (the tests).
    Elsewhere on a CPU PyTorch's own ops are faster."""
    if not enabled:
        return False
    if not (launch.INTERPRET or all(t.is_cuda for t in tensors)):
        return False
    return launch.triton_usable(*tensors)
