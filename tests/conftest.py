"""Shared test set-up: the Triton interpreter on CPU-only machines, and bounded hypothesis profiles."""
import os

import torch

# Kernels are decorated at import time, so the interpreter must be chosen before any
# `kernels.*` module is imported. On a machine with a GPU the real kernels are tested.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" keeps the whole suite within minutes on a 2-core machine; "dev" digs deeper.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Test shapes are tiny: one thread is faster than two fighting over a loaded 2-core machine.
torch.set_num_threads(1)
