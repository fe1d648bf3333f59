"""Decoding with flash attention: a few new queries (Tq = 1 to 3) against a KV cache of Tk keys.

The kernel takes a 16-row query tile here (not the 128-row prefill tile), and may split each
tile's keys over several programs whose partial results a second kernel merges
(flash-decoding). Checked against attention written out in this file in float64 (matmul,
masked `torch.softmax`, matmul, PyTorch's autograd), with FlashAttention's tolerance rule
(tests/kernel_check.py): ours may be at most twice as far from float64 as PyTorch's own
computation in the inputs' dtype, plus eps = 1e-4 * max(1, max|ref|) for float32 (the
kernels' tf32x3 matmuls) or 2**-10 * max(1, max|ref|) for float16.

On a machine without a GPU these run under TRITON_INTERPRET=1 (conftest.py); on a GPU natively.
"""
import math

import pytest
import torch

import minillm.kernels.flash_attention as fa
from minillm.kernels.flash_attention import flash_attention
from kernel_check import DEVICE, assert_fa2, outputs_and_grads

EPS = {torch.float32: 1e-4, torch.float16: 2.0 ** -10}


def cache_attention(q, k, v, kv_lens):
    """Causal attention of the last Tq positions of a sequence over its Tk cached keys (the
    queries' own included), keys at or past kv_lens[b] masked out. Returns (out, lse)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    query_pos = torch.arange(Tk - Tq, Tk, device=q.device)  # where the new tokens sit
    key_pos = torch.arange(Tk, device=q.device)
    visible = (key_pos[None, :] <= query_pos[:, None]).expand(B, 1, Tq, Tk)
    if kv_lens is not None:
        visible = visible & (key_pos[None, :] < kv_lens.to(q.device)[:, None])[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v, lse


class ForwardLaunches:
    """Records each launch of the forward kernel (its BLOCK_M and how many key splits its output
    buffer holds) and counts the launches of the combine kernel."""

    def __init__(self):
        self.fwd, self.combines = [], 0

    def __enter__(self):
        out_index = fa._attn_fwd.arg_names.index("O")

        def on_fwd(*args, **kwargs):
            self.fwd.append((kwargs["BLOCK_M"], args[out_index].shape[0]))

        def on_combine(*args, **kwargs):
            self.combines += 1

        self.hooks = [(fa._attn_fwd, on_fwd), (fa._attn_fwd_combine, on_combine)]
        for kernel, hook in self.hooks:
            kernel.pre_run_hooks.append(hook)
        return self

    def __exit__(self, *exc):
        for kernel, hook in self.hooks:
            kernel.pre_run_hooks.remove(hook)


# (Tq, Tk, key splits, dtype, kv_lens). 3 splits of 300 keys stay 3 at every decode BLOCK_N
# (16 to 128), so the expected launches hold under the interpreter and on a GPU alike.
CASES = [
    (1, 37, 1, torch.float32, None),
    (1, 300, 3, torch.float16, [300, 123]),
    (3, 37, 1, torch.float16, [37, 0]),  # the second sequence has no key at all
    (3, 300, 3, torch.float32, [0, 290]),  # ... and here the first
    (2, 300, 3, torch.float32, None),
]


@pytest.mark.parametrize("Tq,Tk,splits,dtype,kv_lens", CASES)
def test_decode_matches_reference(monkeypatch, Tq, Tk, splits, dtype, kv_lens):
    monkeypatch.setattr(fa, "_key_splits", lambda programs, key_tiles, n_sm: splits)
    check_decode(Tq, Tk, splits, dtype, kv_lens)


@pytest.mark.parametrize("arch", [80, 90])
def test_decode_gpu_tiles(monkeypatch, arch):
    """The decode tiles a GPU launches (64 or 128 keys, not the interpreter's 16), so that the
    split arithmetic is checked with the real configuration too."""
    monkeypatch.setattr(fa, "_arch", lambda t: arch)
    monkeypatch.setattr(fa, "_key_splits", lambda programs, key_tiles, n_sm: 3)
    check_decode(2, 300, 3, torch.float16, [300, 170])


def check_decode(Tq, Tk, splits, dtype, kv_lens):
    B, H, Hkv, D = 2, 4, 2, 32
    g = torch.Generator().manual_seed(Tq * 1000 + Tk)
    q, k, v, do = (torch.randn(*shape, generator=g).to(dtype) for shape in
                   ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D)))
    kv = torch.tensor(kv_lens, dtype=torch.int32) if kv_lens is not None else None

    with ForwardLaunches() as launched:
        out, lse, *grads = outputs_and_grads(
            lambda q, k, v: flash_attention(q, k, v, causal=True, kv_lens=kv, return_lse=True),
            [q, k, v], [do, None])
    assert launched.fwd == [(16, splits)], f"forward launches (BLOCK_M, splits): {launched.fwd}"
    assert launched.combines == (1 if splits > 1 else 0)

    ref = outputs_and_grads(lambda q, k, v: cache_attention(q, k, v, kv), [q, k, v], [do, None],
                            dtype=torch.float64)
    lowp = outputs_and_grads(lambda q, k, v: cache_attention(q, k, v, kv), [q, k, v], [do, None])
    for name, ours, r, lp in zip(("out", "lse", "dq", "dk", "dv"), [out, lse, *grads], ref, lowp):
        finite = torch.isfinite(r)
        eps = EPS[dtype] * max(1.0, r[finite].abs().max().item() if finite.any() else 0.0)
        # float32: a fixed bound (PyTorch's float32 error is no yardstick for tf32x3).
        assert_fa2(f"{name} ({dtype})", ours, r, r if dtype == torch.float32 else lp, eps, 0.0)

    # A sequence with no key: output exactly 0, LSE -inf, gradients exactly 0 (no NaN).
    for b in [i for i, n in enumerate(kv_lens or []) if n == 0]:
        assert torch.all(out[b] == 0) and torch.isneginf(lse[b]).all()
        assert all(torch.all(grad[b] == 0) for grad in grads)


def test_decode_picks_small_tile_and_splits_by_itself():
    """Without forcing: one query against a long cache with few heads takes the 16-row tile and
    splits its keys; a prefill-sized Tq takes neither."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 1, 400, 16, generator=g).to(DEVICE) for _ in range(2))
    with ForwardLaunches() as launched:
        out = flash_attention(q, k, v, causal=True)
    (block_m, splits), = launched.fwd
    assert block_m == 16 and splits > 1 and launched.combines == 1
    ref, _ = cache_attention(q.double(), k.double(), v.double(), None)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)

    q = torch.randn(1, 1, 40, 16, generator=g).to(DEVICE)
    with ForwardLaunches() as launched:
        flash_attention(q, k, v, causal=True)
    (block_m, splits), = launched.fwd
    assert block_m > 16 and splits == 1 and launched.combines == 0


@pytest.mark.parametrize("n_sm", [4, 108, 132])
def test_key_split_heuristic(n_sm):
    """Split only while the query tiles leave SMs idle; never more programs than about one per
    SM beyond what the query tiles need, and at least two key tiles per split."""
    for programs in (1, 2, 8, 32, 200):
        for key_tiles in (1, 3, 16, 1000):
            s = fa._key_splits(programs, key_tiles, n_sm)
            assert s >= 1
            if programs >= n_sm or key_tiles < 4:
                assert s == 1
            else:
                assert key_tiles // s >= 2
                assert programs * s < n_sm + programs
    assert fa._key_splits(1, 1000, n_sm) > 1  # one head over a long cache: split
