"""The device and precision a run asks for: --device parsing and refusals, --dtype auto's choice
(timed, not assumed, on the CPU), the GPU recipes, and what MPS cannot do."""
import time

import pytest
import torch

import train
from minillm.device import check_device_support, measure_matmul_peak, resolve_device, resolve_dtype, step_seconds

CUDA = torch.cuda.is_available()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "mps" if torch.backends.mps.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "", "meta"):
        with pytest.raises(ValueError, match="--device"):
            resolve_device(bad)
    if CUDA:
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="numbered 0 to"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA GPU"):
                resolve_device(spec)


def _fake_step(seconds: dict):
    """A step whose duration depends on the autocast dtype it runs under."""
    def step():
        on = torch.is_autocast_enabled("cpu")
        time.sleep(seconds[torch.get_autocast_dtype("cpu") if on else torch.float32])
    return step


@pytest.mark.parametrize("fp32, bf16, expected", [(0.02, 0.004, "bfloat16"), (0.004, 0.02, "float32"),
                                                  (0.01, 0.0095, "float32")])  # a near tie is no reason to switch
def test_auto_dtype_on_the_cpu_is_measured(fp32, bf16, expected):
    seconds = {torch.float32: fp32, torch.bfloat16: bf16}
    lines = []
    assert resolve_dtype("auto", torch.device("cpu"), _fake_step(seconds), log=lines.append) == expected
    assert "float32" in lines[0] and "bfloat16" in lines[0] and lines[0].endswith(expected)
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"  # nothing to time: float32
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"  # asked for: kept
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("float64", torch.device("cpu"))


def test_timing_a_step_leaves_the_random_state_alone():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(64, requires_grad=True)
    before = torch.get_rng_state()
    t = step_seconds(lambda: drop(x).sum().backward(), torch.device("cpu"), ("float32", "bfloat16"), reps=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(t) == 2 and all(s > 0 for s in t)


def test_what_mps_cannot_do_is_refused():
    mps = torch.device("mps")
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="MPS"):
            resolve_dtype(dtype, mps)
    assert resolve_dtype("auto", mps) == "float32"
    with pytest.raises(ValueError, match="--use-kernels on MPS"):
        check_device_support(mps, use_kernels=True)
    with pytest.raises(ValueError, match="triton on MPS"):
        check_device_support(mps, attention_backend="triton")
    check_device_support(mps, attention_backend="sdpa")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_dtype_on_a_gpu():
    device = torch.device("cuda")
    want = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    assert resolve_dtype("auto", device) == want
    assert resolve_dtype("float32", device) == "float32" and torch.backends.cuda.matmul.allow_tf32


def _resolved(flags, device):
    return train.resolve(train.build_parser().parse_args(flags), None, torch.device(device))


def test_gpu_recipes_replace_the_cpu_ones_on_cuda():
    cpu, gpu = _resolved([], "cpu"), _resolved([], "cuda")
    assert (cpu["n_layer"], cpu["n_embd"], cpu["recipe"]) == (4, 128, "default")
    assert (gpu["n_layer"], gpu["n_head"], gpu["n_embd"], gpu["block_size"]) == (6, 6, 384, 256)
    assert gpu["compile"] and gpu["recipe"] == "default (gpu)" and gpu["time_budget"] == cpu["time_budget"]
    char = _resolved(["--preset", "shakespeare-char"], "cuda")
    assert (char["max_steps"], char["time_budget"], char["dropout"]) == (5000, None, 0.2)
    assert _resolved(["--preset", "shakespeare-char"], "cpu")["n_layer"] == 2
    assert _resolved(["--n-layer", "2", "--compile", "false"], "cuda")["n_layer"] == 2  # flags still win
    assert not _resolved(["--compile", "false"], "cuda")["compile"]
    assert _resolved(["--preset", "gpt2"], "cuda")["recipe"] == "gpt2"  # model presets have no GPU recipe


def test_matmul_peak_is_measured():
    flops = measure_matmul_peak(torch.device("cpu"), "float32", n=128, reps=3)
    assert 1e7 < flops < 1e14
