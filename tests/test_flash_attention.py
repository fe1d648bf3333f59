"""Fused flash attention (kernels/flash_attention.py) against attention written out in PyTorch.

On a machine without a GPU these run the Triton kernels under TRITON_INTERPRET=1 (set by
conftest.py), so shapes stay small.

Tolerance (FlashAttention's rule, tests/kernel_check.py): for every checked tensor (out, lse,
dq, dk, dv),

    max|ours - ref| <= 2 * max|torch_lowp - ref| + eps,   eps = ulp(dtype) * max(1, max|ref|)

where ref is `torch_attention` below (matmul, masked softmax, matmul, and PyTorch's autograd)
in float64, torch_lowp is the same computation in the input dtype (matmuls, softmax and
autograd in float16 / bfloat16), and ulp(dtype) is the spacing of numbers at 1.0: 2**-10 for
float16, 2**-7 for bfloat16. For float32 inputs the kernels' matmuls keep float32 accuracy on
a GPU too (three TF32 passes, "tf32x3", error ~1e-6 relative; plain TF32 would not be held to
this), so the bound is a fixed eps = 1e-4 * max(1, max|ref|), which covers the different
summation order and holds under the interpreter (exact fp32 dots) and on a GPU alike.

Rows that see no key must give output 0, LSE -inf, and zero gradients: no NaN anywhere.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.kernels import launch
import minillm.kernels.flash_attention as fa
from minillm.kernels.flash_attention import attention_reference, flash_attention
from kernel_check import DEVICE, assert_fa2, launches, outputs_and_grads

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-4}
KERNELS = (fa._attn_fwd, fa._attn_bwd_preprocess, fa._attn_bwd_dkdv, fa._attn_bwd_dq)


def torch_attention(q, k, v, *, causal, softmax_scale, kv_lens):
    """Attention done by PyTorch in the inputs' own dtype: the float64 reference, and the
    low-precision baseline."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    keys, queries = torch.arange(Tk, device=q.device), torch.arange(Tq, device=q.device)
    visible = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (keys[None, :] <= queries[:, None] + (Tk - Tq))
    if kv_lens is not None:
        visible = visible & (keys[None, :] < kv_lens.to(q.device)[:, None])[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    # PyTorch keeps no low-precision LSE: at least float32.
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return p @ v, lse


def make_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    do = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    return q, k, v, do


def assert_close(name, ours, ref, lowp, dtype):
    finite = torch.isfinite(ref)
    ref_max = ref[finite].abs().max().item() if finite.any() else 0.0
    # float32: a fixed bound (PyTorch's float32 error is no yardstick for tf32x3), so the
    # baseline is the reference itself.
    baseline = ref if dtype == torch.float32 else lowp
    assert_fa2(name, ours, ref, baseline, atol=EPS[dtype] * max(1.0, ref_max), rtol=0.0)


def check(B, H, Hkv, Tq, Tk, D, dtype, causal, kv_lens=None, softmax_scale=None, seed=0, do=None):
    q, k, v, do_ = make_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed)
    do = do_ if do is None else do
    kv = torch.tensor(kv_lens, dtype=torch.int32) if kv_lens is not None else None
    kw = dict(causal=causal, softmax_scale=softmax_scale, kv_lens=kv)

    with launches(*KERNELS) as counts:
        out, lse, *grads = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **kw),
                                             [q, k, v], [do, None])
    assert all(counts[kernel.__name__] == 1 for kernel in KERNELS), f"kernels launched: {dict(counts)}"
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    ref_out, ref_lse, *ref_grads = outputs_and_grads(lambda q, k, v: torch_attention(q, k, v, **kw),
                                                     [q, k, v], [do, None], dtype=torch.float64)
    low_out, low_lse, *low_grads = outputs_and_grads(lambda q, k, v: torch_attention(q, k, v, **kw),
                                                     [q, k, v], [do, None])

    assert_close("out", out, ref_out, low_out, dtype)
    assert_close("lse", lse, ref_lse, low_lse, dtype)
    for name, ours, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert ours.dtype == dtype
        assert_close(name, ours, ref, low, dtype)

    # Rows that see no key: exactly zero output and zero dq (the reference agrees on which).
    empty = torch.isinf(ref_lse)
    assert torch.all(out[empty] == 0)
    assert torch.all(grads[0][empty] == 0)
    return out, lse, grads


# (B, H, Hkv, Tq, Tk, D, dtype, causal, kv_lens, softmax_scale)
CASES = [
    (1, 2, 2, 37, 37, 64, torch.float32, True, None, None),
    (2, 2, 1, 45, 29, 32, torch.float16, False, [29, 7], None),
    (1, 4, 2, 50, 50, 64, torch.bfloat16, True, [33], None),
    (2, 1, 1, 1, 70, 32, torch.float16, True, [70, 0], None),  # decoding step; one empty row
    (1, 2, 1, 60, 20, 16, torch.float32, True, None, 0.3),  # Tq > Tk: early rows see nothing
    (1, 1, 1, 33, 47, 80, torch.float16, True, None, None),  # head dim padded to 128
    (1, 2, 2, 19, 40, 96, torch.bfloat16, False, [0], 0.125),  # a batch with no keys at all
    (2, 4, 4, 17, 17, 16, torch.bfloat16, False, None, None),
    (1, 2, 2, 26, 26, 8, torch.float16, True, [19], None),  # head dim padded from 8 to 16
]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,dtype,causal,kv_lens,scale", CASES)
def test_matches_reference(B, H, Hkv, Tq, Tk, D, dtype, causal, kv_lens, scale):
    check(B, H, Hkv, Tq, Tk, D, dtype, causal, kv_lens, scale)


@st.composite
def attention_cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    Tq = draw(st.integers(1, 80))
    Tk = Tq if draw(st.booleans()) else draw(st.integers(1, 80))
    D = draw(st.sampled_from([8, 16, 24, 32, 64, 80]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    causal = draw(st.booleans())
    kv_lens = draw(st.none() | st.lists(st.integers(0, Tk), min_size=B, max_size=B))
    scale = draw(st.none() | st.floats(0.05, 1.0))
    return B, H, Hkv, Tq, Tk, D, dtype, causal, kv_lens, scale


@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_matches_reference_hypothesis(case, seed):
    check(*case, seed=seed)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("D,dtype,causal", [(64, torch.float16, True), (128, torch.float16, False),
                                            (64, torch.float32, True)])
def test_gpu_default_tiles(monkeypatch, arch, D, dtype, causal):
    """The tile sizes a GPU launches (not the interpreter's small ones), with ragged lengths
    spanning several tiles, so the tile-skipping arithmetic of the real configs is checked."""
    monkeypatch.setattr(fa, "_arch", lambda t: arch)
    check(1, 2, 1, 150, 200 if causal else 130, D, dtype, causal, [170] if causal else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_upstream_gradient(dtype):
    """dO broadcast over positions by expand() (stride 0) or transposed from (B, T, H, D): the
    backward kernels take dO's strides, and only its last dimension must be contiguous."""
    B, H, T, D = 2, 2, 21, 32
    check(B, H, 1, T, T, D, dtype, True, [21, 9], do=torch.randn(B, H, 1, D).to(dtype).expand(B, H, T, D))
    check(B, H, 1, T, T, D, dtype, False, do=torch.randn(B, T, H, D).to(dtype).transpose(1, 2))
    check(B, H, 1, T, T, D, dtype, False, do=torch.randn(B, H, T, 2 * D).to(dtype)[..., ::2])


def test_reference_matches_torch_attention():
    """`attention_reference` (the CPU fallback) against PyTorch's attention in float64,
    with padded keys, a batch with no keys, grouped heads and causal rows that see nothing."""
    q, k, v, do = make_inputs(2, 4, 2, 13, 9, 16, torch.float32)
    kv = torch.tensor([9, 0])
    kw = dict(causal=True, softmax_scale=0.3, kv_lens=kv)
    ours = outputs_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw), [q, k, v], [do, None])
    ref = outputs_and_grads(lambda q, k, v: torch_attention(q, k, v, **kw), [q, k, v], [do, None],
                            dtype=torch.float64)
    for name, o, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        assert_fa2(name, o, r, r, atol=1e-5, rtol=1e-5)


def test_lse_gradient():
    """Gradients flow through the returned log-sum-exp too (as in a z-loss or a merge of
    attention over key chunks), with an LSE gradient as laid out or broadcast by expand()."""
    q, k, v, do = make_inputs(1, 2, 1, 23, 31, 32, torch.float32)
    kw = dict(causal=True, softmax_scale=None, kv_lens=torch.tensor([20], dtype=torch.int32))
    for dlse in (torch.randn(1, 2, 23), torch.randn(23).expand(1, 2, 23)):
        ours = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **kw),
                                 [q, k, v], [do, dlse])
        ref = outputs_and_grads(lambda q, k, v: torch_attention(q, k, v, **kw), [q, k, v], [do, dlse],
                                dtype=torch.float64)
        for o, r in zip(ours[2:], ref[2:]):
            torch.testing.assert_close(o, r.float(), atol=1e-4, rtol=1e-4)


def test_strided_inputs_and_determinism():
    """q as a transposed (B, T, H, D) activation and k, v as a prefix of a longer KV cache:
    no copies needed, same numbers as contiguous inputs, and bitwise-repeatable gradients."""
    B, T, H, D = 2, 21, 2, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, D, generator=g).half().to(DEVICE).transpose(1, 2)
    cache = torch.randn(2, B, H, 64, D, generator=g).half().to(DEVICE)
    k, v = cache[0, :, :, :40], cache[1, :, :, :40]
    assert not q.is_contiguous() and not k.is_contiguous()

    def run(q, k, v):
        ins = [t.detach().clone() if t.is_contiguous() else t.detach() for t in (q, k, v)]
        ins = [t.requires_grad_() for t in ins]
        out = flash_attention(*ins, causal=True)
        return (out, *torch.autograd.grad(out.float().square().sum(), ins))

    with launches(fa._attn_fwd, fa._attn_bwd_dq) as counts:
        strided = run(q, k, v)
        contiguous = run(q.contiguous(), k.contiguous(), v.contiguous())
        again = run(q, k, v)
    assert counts["_attn_fwd"] == 3 and counts["_attn_bwd_dq"] == 3, dict(counts)
    for a, b, c in zip(strided, contiguous, again):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_zero_length_keys():
    q, k, v, _ = make_inputs(1, 2, 2, 5, 0, 16, torch.float16)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


def test_cpu_fallback(monkeypatch):
    """Without Triton (or without CUDA and the interpreter) the float32 reference runs and the
    result comes back in the input dtype, differentiable."""
    monkeypatch.setattr(fa, "triton_usable", lambda *t: False)
    q, k, v, do = make_inputs(2, 4, 2, 9, 12, 16, torch.bfloat16)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    kv = torch.tensor([12, 3])
    out, lse = flash_attention(*ins, causal=True, kv_lens=kv, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, kv_lens=kv)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert torch.equal(lse, ref_lse)
    grads = torch.autograd.grad(out, ins, do)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_triton_usable_on_cpu_only_under_interpreter():
    t = torch.zeros(1)
    assert launch.triton_usable(t) == (launch.HAS_TRITON and launch.INTERPRET)


def _t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,message", [
    ((_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), {}, "q must be 4-D"),
    ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16)), {}, "k and v must have the same shape"),
    ((_t(1, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 2, 8, 16)), {}, "batch size"),
    ((_t(1, 2, 8, 16), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, "head dim of q"),
    ((_t(1, 3, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {}, "multiple of the number of key/value heads"),
    ((_t(1, 2, 8, 16, dtype=torch.float64),) * 3, {}, "dtype torch.float64 is not supported"),
    ((_t(1, 2, 8, 16), _t(1, 2, 8, 16, dtype=torch.float32), _t(1, 2, 8, 16)), {}, "share a dtype"),
    ((_t(1, 2, 8, 12),) * 3, {}, "head dim 12 is not supported"),
    ((_t(1, 2, 8, 264),) * 3, {}, "head dim 264 is not supported"),
    ((_t(1, 2, 8, 16),) * 3, {"softmax_scale": float("nan")}, "softmax_scale"),
    ((_t(1, 2, 8, 16),) * 3, {"kv_lens": torch.tensor([1.0])}, "kv_lens must hold integers"),
    ((_t(1, 2, 8, 16),) * 3, {"kv_lens": torch.tensor([1, 2])}, r"kv_lens must have shape \(1,\)"),
    ((_t(1, 2, 8, 16),) * 3, {"kv_lens": [3]}, "kv_lens must be an integer tensor"),
])
def test_rejects_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*args, **kwargs)


def test_compile_specs_cover_head_dims_and_dtypes():
    names = {s.name for s in fa.compile_specs(80)} | {s.name for s in fa.compile_specs(90)}
    for kernel in ("fwd", "decode", "combine", "preprocess", "dkdv", "dq"):
        for d in (64, 128):
            for dtype in ("fp16", "bf16"):
                assert f"flash_attention.{kernel}[d{d},{dtype}]" in names


def test_torch_compile_traces_without_graph_break():
    """flash_attention is a torch.library custom op (forward and backward): torch.compile with
    fullgraph=True (which raises at any graph break) traces through it, and the compiled
    function still runs the kernels, forward and backward, and matches PyTorch."""
    q, k, v, do = make_inputs(1, 2, 1, 20, 20, 16, torch.float32)
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True), fullgraph=True,
                             backend="aot_eager")
    with launches(*KERNELS) as counts:
        out, *grads = outputs_and_grads(compiled, [q, k, v], do)
    assert all(counts[kernel.__name__] == 1 for kernel in KERNELS), f"kernels launched: {dict(counts)}"
    kw = dict(causal=True, softmax_scale=None, kv_lens=None)
    ref = outputs_and_grads(lambda q, k, v: torch_attention(q, k, v, **kw)[0], [q, k, v], do,
                            dtype=torch.float64)
    for name, ours, r in zip(("out", "dq", "dk", "dv"), [out, *grads], ref):
        assert_close(name, ours, r, r, torch.float32)


def test_custom_op_fake_and_autograd_registration():
    """The fake (meta) implementations give the real outputs' shapes, dtypes and strides, and the
    autograd registration is what PyTorch expects of a custom op."""
    q, k, v, _ = make_inputs(1, 2, 1, 5, 7, 16, torch.float16)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    kv = torch.tensor([6], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(fa._forward_op, (q, k, v, True, 0.25, kv),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_double_backward_raises():
    """Gradients of gradients are not implemented: asking for them raises (rather than treating
    the first gradients as constants)."""
    q, k, v, _ = make_inputs(1, 1, 1, 9, 9, 16, torch.float32)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    dq, = torch.autograd.grad(flash_attention(q, k, v, causal=True).square().sum(), q,
                              create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def test_grid_fits_cuda_limits():
    """Batch x heads past 65,535 (the limit of a CUDA grid's axes 1 and 2): each axis of every
    launch grid stays within its limit, and the grid still has a program per (tile, b, h)."""
    B, H, T = 2048, 48, 4096
    for block in (16, 128):
        tiles = math.ceil(T / block)
        grid = fa._grid(tiles, B, H)
        assert grid[0] <= 2**31 - 1 and grid[1] <= 65535 and grid[2] <= 65535
        assert math.prod(grid) == tiles * B * H


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on GPU 1 (launched on
    GPU 0 they would be handed another GPU's pointers)."""
    q, k, v, do = make_inputs(1, 2, 2, 33, 33, 32, torch.float16)
    q, k, v, do = (t.to("cuda:1") for t in (q, k, v, do))
    with torch.cuda.device(0), launches(*KERNELS) as counts:
        qs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*qs, causal=True)
        grads = torch.autograd.grad(out, qs, do)
        torch.cuda.synchronize(1)
    assert all(counts[kernel.__name__] == 1 for kernel in KERNELS)
    ref_out, _ = torch_attention(q.double(), k.double(), v.double(), causal=True, softmax_scale=None,
                                 kv_lens=None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-3, rtol=2e-3)
    assert all(torch.isfinite(g).all() and g.device == q.device for g in grads)
