"""The benchmarks' arithmetic and plumbing: the timer's statistics on a fake clock, the FLOP and
byte formulas written out, the datasheet lookup, and `python -m minillm.benchmarks.gpu_check` on a CPU."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from minillm.benchmarks import (cross_entropy, fused_linear_cross_entropy, gelu, gpu_check, layer_norm, rms_norm,
                                rotary, swiglu)
from minillm.benchmarks import flash_attention as attention_bench
from minillm.benchmarks import timing
from minillm.benchmarks.op_benchmark import measure
from minillm.benchmarks.timing import Stats, format_table, gb_per_s, jsonable, quantile, summarize, tflop_per_s

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quantiles_interpolate_linearly():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.2) == pytest.approx(1.6)  # rank 0.6 between 1 and 2
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert quantile([7.0], 0.8) == 7.0
    assert summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == Stats(median=3.0, p20=pytest.approx(1.8), p80=pytest.approx(4.2), n=5)


def test_cpu_timer_on_a_fake_clock(monkeypatch):
    # Each timed call reads the clock twice; the calls take 5, 1, 3, 2 and 4 ms.
    ticks = iter([10.0, 10.005, 11.0, 11.001, 12.0, 12.003, 13.0, 13.002, 14.0, 14.004])
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    t = timing.time_ms(lambda: calls.append(1), torch.device("cpu"), reps=5, warmup=2)
    assert len(calls) == 7  # two untimed warm-up calls, then five timed ones
    assert (t.median, t.p20, t.p80, t.n) == (pytest.approx(3.0), pytest.approx(1.8), pytest.approx(4.2), 5)
    assert next(ticks, None) is None  # the clock was read exactly twice per timed call


def test_rates_from_the_median():
    t = Stats(median=2.0, p20=1.0, p80=3.0, n=3)
    assert gb_per_s(4e9, t) == pytest.approx(2000.0)  # 4 GB in 2 ms
    assert tflop_per_s(6e12, t) == pytest.approx(3000.0)


def test_stats_in_tables_and_json():
    t = Stats(median=3.0, p20=1.8, p80=4.2, n=5)
    text = format_table([{"impl": "torch", "fwd ms": t, "tok/s": 12345.6}], ["impl", "fwd ms", "tok/s"])
    assert "3 (1.8-4.2)" in text and "12,346" in text
    assert jsonable([{"fwd ms": t}]) == [{"fwd ms": {"median": 3.0, "p20": 1.8, "p80": 4.2, "n": 5}}]


def test_flop_formulas():
    B, H, T, D = 2, 3, 128, 64
    assert attention_bench.attention_flops(B, H, T, D, causal=False) == 4 * B * H * T * T * D
    assert attention_bench.attention_flops(B, H, T, D, causal=True) == 2 * B * H * T * T * D
    assert attention_bench.FWD_BWD_FACTOR == 3.5  # backward = 2.5 forwards
    N, C, V = 8, 16, 32
    assert fused_linear_cross_entropy.flops(N, C, V) == {"loss": 2 * N * C * V, "fwd+bwd": 6 * N * C * V}


def test_byte_formulas():
    M, N, es = 4, 8, 2  # bfloat16
    assert gelu.bytes_moved(M, N, es) == {"fwd": 2 * M * N * es, "bwd": 3 * M * N * es}
    assert swiglu.bytes_moved(M, N, es) == {"fwd": 3 * M * N * es, "bwd": 5 * M * N * es}
    assert layer_norm.bytes_moved(M, N, es) == {"fwd": 2 * M * N * es, "bwd": 3 * M * N * es}
    assert rms_norm.bytes_moved(M, N, es) == {"fwd": 2 * M * N * es, "bwd": 3 * M * N * es}
    q, k = 2 * 4 * 16 * 8, 2 * 2 * 16 * 8  # (B, H, T, D) and (B, Hkv, T, D)
    assert rotary.bytes_moved(q, k, es) == {"fwd": 2 * (q + k) * es, "bwd": 2 * (q + k) * es}
    n, v = 16, 1000  # targets are int64
    assert cross_entropy.bytes_moved(n, v, es) == {"loss": n * v * es + 8 * n, "fwd+bwd": 2 * n * v * es + 8 * n}
    n, c, v = 16, 32, 1000
    assert fused_linear_cross_entropy.bytes_moved(n, c, v, es) == {
        "loss": (n * c + v * c) * es + 8 * n, "fwd+bwd": 2 * (n * c + v * c) * es + 8 * n}


@pytest.mark.parametrize("module, size", [(gelu, (4, 8)), (cross_entropy, (4, 10))])
def test_measure_fills_every_pass(module, size):
    case = module.case(size, torch.device("cpu"), torch.float32)
    row = measure(case, case.reference, torch.device("cpu"), reps=2, warmup=0)
    for name in case.passes:
        assert isinstance(row[f"{name} ms"], Stats)
        assert row[f"{name} GB/s"] == pytest.approx(gb_per_s(case.bytes[name], row[f"{name} ms"]))


def test_datasheet_bandwidth_by_device_name():
    look = gpu_check.datasheet_bandwidth_gbps
    assert look("NVIDIA H100 80GB HBM3") == 3350
    assert look("NVIDIA H100 PCIe") == 2000
    assert look("NVIDIA H200") == 4800
    assert look("NVIDIA A100-SXM4-40GB") == 1555
    assert look("NVIDIA A100 80GB PCIe") == 1935
    assert look("NVIDIA A100-SXM4-80GB") == 2039
    assert look("NVIDIA A10G") == 600
    assert look("NVIDIA L4") == 300
    assert look("NVIDIA GeForce RTX 4090") == 1008
    assert look("NVIDIA GH200 480GB") is None  # unknown: the measured copy is used


def test_pytest_counts_and_kernel_test_files():
    assert gpu_check.pytest_counts("x\n==== 3 failed, 10 passed, 1 skipped in 2.0s ====\n") == {
        "failed": 3, "passed": 10, "skipped": 1}
    assert gpu_check.pytest_counts("tests/test_gelu.py::test_x\n\n154 tests collected in 5.2s\n") == {"collected": 154}
    files = gpu_check.kernel_test_files()
    for name in ("test_gelu.py", "test_flash_attention.py", "test_fused_linear_cross_entropy.py", "test_model_kernels.py"):
        assert os.path.join("tests", name) in files
    assert os.path.join("tests", "test_train.py") not in files


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this is the full check, minutes long")
def test_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "minillm.benchmarks.gpu_check", "--out", str(out), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith("no CUDA GPU here:")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["gpu"] is False and report["ok"] is True
    for section in ("bandwidth", "tests", "attention", "kernels", "train"):
        assert section in report and "error" not in report[section], section
    assert report["tests"]["counts"]["collected"] > 0
    rows = report["attention"]["rows"]
    assert {r["status"] for r in rows if r["backend"] == "triton"} == {"n/a: Triton runs natively only on a CUDA GPU"}
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows if r["backend"] == "sdpa")
    kernel_ops = {r["op"] for r in report["kernels"]["rows"] if r["status"] == "ok"}
    assert kernel_ops == set(gpu_check.KERNEL_SIZES)
    for run in report["train"]["runs"].values():
        assert run["returncode"] == 0 and run["tok_per_s"] > 0 and run["device"] == "cpu"
