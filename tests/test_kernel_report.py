"""The compile report (`python -m kernels.report`): every kernel of the `kernels` package,
compiled for sm_80 and sm_90 at its default launch configuration without a GPU, must have no
register spills, fit the target's per-block shared memory, and, where its source calls
`tl.dot`, use tensor-core instructions (HMMA on sm_80, HGMMA/wgmma on sm_90).

Compiling takes a minute or so on two cores (Triton caches the results on disk afterwards);
the report is built once per test session.
"""
import inspect

import pytest

pytest.importorskip("triton")

from kernels import report  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return report.build_report()


def _describe(bad):
    return "; ".join(f"{r.kernel} sm_{r.arch}" + (f" ({r.error})" if r.error else "") for r in bad)


def test_every_module_with_compile_specs_is_reported(rows):
    modules = {m.split(".")[-1] for m in report.kernel_modules()
               if any(report.specs_for(m, arch) for arch in report.TARGETS)}
    assert "flash_attention" in modules
    assert {r.module for r in rows} == modules
    assert {r.arch for r in rows} == set(report.TARGETS)


def test_every_kernel_compiles(rows):
    bad = [r for r in rows if r.error]
    assert not bad, f"failed to compile: {_describe(bad)}"


def test_no_register_spills(rows):
    bad = [r for r in rows if r.spill_bytes != 0 or r.spill_ops != 0]
    assert not bad, f"spills (local/stack memory) at the default configuration: {_describe(bad)}"


def test_shared_memory_within_per_block_limit(rows):
    assert report.SHARED_LIMIT[80] == 166_912 and report.SHARED_LIMIT[90] == 232_448
    bad = [r for r in rows if not 0 <= r.shared_bytes <= r.shared_limit]
    assert not bad, f"shared memory over the per-block limit: {_describe(bad)}"


def test_tensor_cores_used_by_kernels_with_tl_dot(rows):
    bad = [r for r in rows if r.uses_dot and r.tensor_core_ops == 0]
    assert not bad, f"tl.dot compiled without tensor-core instructions: {_describe(bad)}"


def test_flash_attention_kernels_all_covered(rows):
    names = {(r.kernel, r.arch) for r in rows if r.module == "flash_attention"}
    for arch in report.TARGETS:
        for kernel in ("fwd", "preprocess", "dkdv", "dq"):
            for d in (64, 128):
                for dtype in ("fp16", "bf16"):
                    assert (f"flash_attention.{kernel}[d{d},{dtype}]", arch) in names
    assert all(r.uses_dot for r in rows if r.module == "flash_attention"
               and ".preprocess[" not in r.kernel)


def test_uses_dot_follows_jit_helpers():
    from kernels import flash_attention as fa

    # _attn_fwd calls tl.dot only through its @triton.jit helper _fwd_tile.
    assert "tl.dot(" not in inspect.getsource(report._python_fn(fa._attn_fwd))
    assert report.uses_dot(fa._attn_fwd)
    assert not report.uses_dot(fa._attn_bwd_preprocess)
