"""The compile report (`python -m minillm.kernels.report`): every kernel in kernels/ (`minillm.kernels`),
compiled for sm_80 and sm_90 at its default launch configuration without a GPU, must have no
register spills, fit the target's per-block shared memory, and, where its source calls
`tl.dot`, use tensor-core instructions (HMMA on sm_80, HGMMA/wgmma on sm_90).

Compiling takes a minute or so on two cores (Triton caches the results on disk afterwards);
the report is built once per test session.
"""
import inspect

import pytest

pytest.importorskip("triton")

from minillm.kernels import report  # noqa: E402


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
        for kernel in ("fwd", "decode", "combine", "preprocess", "dkdv", "dq"):
            for d in (64, 128):
                for dtype in ("fp16", "bf16"):
                    assert (f"flash_attention.{kernel}[d{d},{dtype}]", arch) in names
    # the preprocess (a row sum) and the combine of key splits (a weighted sum) have no matmul
    assert all(r.uses_dot == (".preprocess[" not in r.kernel and ".combine[" not in r.kernel)
               for r in rows if r.module == "flash_attention")
    # a 16-row decode tile is below wgmma's 64 rows: HMMA is what it should use on sm_90 too
    assert all(r.tensor_core_op == "HMMA" for r in rows if ".decode[" in r.kernel)


def test_uses_dot_follows_jit_helpers():
    from minillm.kernels import flash_attention as fa

    # _attn_fwd calls tl.dot only through its @triton.jit helper _fwd_tile.
    assert "tl.dot(" not in inspect.getsource(report._python_fn(fa._attn_fwd))
    assert report.uses_dot(fa._attn_fwd)
    assert not report.uses_dot(fa._attn_bwd_preprocess)


# Launch configurations, checked without compiling or running anything.


def test_grids_put_large_counts_on_axis_0():
    """CUDA allows 2**31 - 1 programs on grid axis 0 but only 65,535 on axes 1 and 2: a grid
    with rows (or batch x heads) on axis 1 fails to launch past that. Every launcher here puts
    its large count on axis 0; checked at 70,000 rows and at a million."""
    import torch

    from minillm.kernels import cross_entropy, gelu, rotary, swiglu
    from minillm.kernels.launch import GRID_LIMITS, num_partials

    for rows in (70_000, 1_000_000):
        grids = {
            "gelu": gelu._grid(rows * 4096),
            "swiglu": swiglu._grid(rows, 11008),
            "rotary": rotary._grid(8, rows),
            "cross_entropy": cross_entropy._grid(rows),
            # The norms: one program per row forward, a few per SM backward.
            "norm forward": (rows,),
            "norm backward": (num_partials(torch.device("cpu"), rows),),
        }
        for name, grid in grids.items():
            assert all(0 < g <= limit for g, limit in zip(grid, GRID_LIMITS)), f"{name}: grid {grid}"


def test_row_offsets_are_64_bit():
    """row * stride passes 2**31 at long contexts (e.g. 8,192 rows of a 50257 vocabulary, or
    T * 3C of a fused QKV): every kernel that offsets by a program id times a stride takes the
    program id (or the row it derives) as int64 before multiplying."""
    from minillm.kernels import cross_entropy, gelu, layer_norm, rms_norm, rotary, swiglu

    for kernel in (gelu._gelu_fwd_kernel, gelu._gelu_bwd_kernel, swiglu._swiglu_fwd_kernel,
                   swiglu._swiglu_bwd_kernel, layer_norm._layer_norm_fwd_kernel, layer_norm._layer_norm_bwd_kernel,
                   rms_norm._rms_norm_fwd_kernel, rms_norm._rms_norm_bwd_kernel, rotary._rotary_kernel,
                   rotary._rotate_heads, cross_entropy._cross_entropy_fwd_kernel):
        src = inspect.getsource(report._python_fn(kernel))
        assert ".to(tl.int64)" in src, f"{kernel.__name__}: no 64-bit offsets"


def test_fused_norm_width_is_capped_below_spilling(rows):
    """The norms spill at 16,384 columns (sm_90: 192 bytes rms_norm, 440 layer_norm backward),
    so the widest fused row is 8,192 and the report compiles the norms there without spills."""
    from minillm.kernels.launch import MAX_FUSED_SIZE

    assert MAX_FUSED_SIZE == 8192
    for module in ("layer_norm", "rms_norm"):
        widest = [r for r in rows if r.module == module and f"N={MAX_FUSED_SIZE}," in r.kernel]
        assert {r.arch for r in widest} == set(report.TARGETS) and len(widest) == 2 * len(report.TARGETS)
        assert all(r.ok for r in widest), [r for r in widest if not r.ok]
