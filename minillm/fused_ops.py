"""Look-up of the optional Triton ops in kernels/, used when a config switches kernels on.

minillm never needs Triton: when it is missing, or the tensors are on the CPU, the layers
use their plain PyTorch code and this returns None.
"""
from __future__ import annotations

import importlib


def fused_op(module: str, name: str, *tensors, enabled: bool = True):
    """kernels.<module>.<name> if enabled and runnable on these tensors, else None."""
    if not enabled or not all(t.is_cuda for t in tensors):
        return None
    try:
        from kernels import triton_usable

        if not triton_usable(*tensors):
            return None
        return getattr(importlib.import_module(f"kernels.{module}"), name)
    except (ImportError, AttributeError):
        return None
