"""Each kernel test notices a silent fallback to the PyTorch reference.

MINILLM_FORCE_FALLBACK=1 makes `launch.triton_usable` answer no, as on a machine where Triton
cannot run (or a dispatch condition gone wrong): every public op then quietly returns its
reference, which matches torch. One fast test of each kernel test file is run so in a
subprocess; each must fail, and fail because the launch count says the kernel did not run,
not for some other reason. One pytest process for all eight keeps this to seconds.
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from minillm.kernels import launch

TESTS = os.path.dirname(os.path.abspath(__file__))

# One fast test per kernel test file, each of which counts its kernels' launches.
NODES = [
    "test_gelu.py::test_several_blocks_and_a_ragged_tail",
    "test_swiglu.py::test_leading_dims",
    "test_layer_norm.py::test_leading_dims_and_strided_input",
    "test_rms_norm.py::test_leading_dims_and_strided_input",
    "test_rotary.py::test_many_heads_span_several_head_blocks",
    "test_cross_entropy.py::test_ignore_index_inside_the_vocabulary",
    "test_fused_linear_cross_entropy.py::test_triton_path_gpt2_vocab",
    "test_flash_attention.py::test_non_contiguous_upstream_gradient",
]
# What a launch-count assertion says: kernel_check.check_op and the per-file checks say
# "did not run"; flash attention's check lists the launches it saw.
NOT_RUN = ("did not run", "kernels launched")


@pytest.mark.skipif(not launch.HAS_TRITON, reason="Triton is not installed")
def test_every_kernel_test_fails_when_the_op_falls_back(tmp_path):
    report = tmp_path / "report.xml"
    env = dict(os.environ, MINILLM_FORCE_FALLBACK="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           *(os.path.join(TESTS, node) for node in NODES)]
    run = subprocess.run(cmd, env=env, cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=600)
    assert report.exists(), f"pytest wrote no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    # Test cases by file (a parametrized node runs several cases; each must fail).
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failure = case.find("failure")
        message = "" if failure is None else (failure.get("message", "") + (failure.text or ""))
        results.setdefault(case.get("classname").rsplit(".", 1)[-1] + ".py", []).append((case.get("name"), failure,
                                                                                        message))
    for node in NODES:
        file = node.split("::")[0]
        assert results.get(file), f"{node} did not run at all:\n{run.stdout[-3000:]}"
        for name, failure, message in results[file]:
            assert failure is not None, f"{file}::{name} passed although every op fell back to its reference"
            assert any(m in message for m in NOT_RUN), \
                f"{file}::{name} failed, but not on its launch count:\n{message[-1500:]}"
    assert run.returncode == 1
