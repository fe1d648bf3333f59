"""Look-up of the optional Triton ops in kernels/, used when a config switches kernels on.

minillm never needs Triton: when it is missing, or the tensors are on the CPU, the layers
use their plain PyTorch code and this returns None.
"""
from __future__ import annotations

import importlib


def fused_op(module: str, name: str, *tensors, enabled: bool = True):
    """kernels.<module>.<name> if enabled and runnable on these tensors, else None."""
    if not enabled:
        return None
    try:
        from kernels import INTERPRET, triton_usable

        # On the CPU only under TRITON_INTERPRET=1 (the tests); elsewhere PyTorch is faster there.
        if not (INTERPRET or all(t.is_cuda for t in tensors)):
            return None

        if not triton_usable(*tensors):
            return None
        return getattr(importlib.import_module(f"kernels.{module}"), name)
    except (ImportError, AttributeError):
        return None
