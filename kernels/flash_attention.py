"""Fused flash attention (FlashAttention-2 style), forward and backward, in Triton.

    out = softmax(scale * q @ k^T + mask) @ v

The forward pass gives each program one tile of queries, streams tiles of keys and values past
it and keeps a running (online) softmax, so the (Tq, Tk) score matrix is never materialised.
It saves one number per query row, the log-sum-exp of that row's scores, so the backward pass
can recompute the probabilities tile by tile from q, k and the LSE:

    delta = rowsum(dO * O)                      (_attn_bwd_preprocess)
    dK, dV for one tile of keys, over queries   (_attn_bwd_dkdv)
    dQ for one tile of queries, over keys       (_attn_bwd_dq)

Every gradient is written by exactly one program (no atomics), so results are deterministic.

Decoding (a few new queries against a KV cache, Tq <= 16) runs the same forward kernel with a
16-row query tile (the fewest rows `tl.dot` takes) instead of a 128-row one, and, since B * H such
tiles are too few to fill a GPU, splits each tile's keys over several programs (flash-decoding):
each writes its partial output and LSE, and `_attn_fwd_combine` merges them.

What the kernels cover:
- causal or not; causal masking is aligned bottom-right: query i sees key j iff
  j <= i + (Tk - Tq), so a one-token query against a KV cache sees every key;
- any Tq and Tk (ragged tails are masked in the kernel) and Tq != Tk;
- `kv_lens` (B,): per-sequence key lengths (right padding, BERT-style batches);
- grouped-query attention: q has H heads, k and v have Hkv heads, H % Hkv == 0;
- head dims that are multiples of 8 up to 256; non-powers of two (80, 96) are padded to the
  next power of two inside the kernel with masks on the head-dim axis;
- float16, bfloat16 and float32 inputs. Float32 matmuls use three TF32 tensor-core passes
  ("tf32x3"), which keeps float32 accuracy (plain TF32 would lose about 3 decimal digits and
  differ from PyTorch's float32 default); cast to bf16 for speed.

Rows that see no key at all (Tq > Tk under causal masking, or kv_lens[b] == 0) give output 0,
LSE = -inf (the sentinel for "no visible key"), and zero gradients.

The forward and backward launchers are registered as `torch.library` custom ops, so
`torch.compile(fullgraph=True)` traces through `flash_attention` without a graph break. Double
backward (gradients of gradients) is not implemented and raises.

Shapes throughout: q (B, H, Tq, D); k, v (B, Hkv, Tk, D); lse (B, H, Tq).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from minillm.kernels.launch import INTERPRET, CompileSpec, device_guard, tl, triton, triton_usable

__all__ = ["flash_attention", "attention_reference", "compile_specs"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Scores are kept in base 2: qk_scale = softmax_scale * log2(e), so exp() becomes the cheaper
# exp2(), and the LSE is converted back to natural log (x ln 2) only when stored.
# Key ranges are split in two loops: tiles every query of the tile can fully see (no mask
# arithmetic at all), then the few tiles that need masking (the causal diagonal, the ragged
# tail, padded keys). Tiles no query can see are never visited.
# Grids are (tiles, B, heads): the tiles of one head are launched side by side, so they read
# that head's keys and values while these are still in L2; batch and head take an axis each
# (up to 65,535 on axes 1 and 2) rather than B * H one axis, which a batch of 2,048 with 32
# heads would overflow. (A 1-D grid with a division would lift every limit, but its extra
# registers make the sm_80 backward kernels, at 255 registers, spill.)


@triton.jit
def _program(BLOCK: tl.constexpr):
    """(b, head, first row of the tile) of this program in a (tiles, B, heads) grid."""
    return tl.program_id(1), tl.program_id(2), tl.program_id(0) * BLOCK


@triton.jit
def _rows(base, start, offs, stride_t, offs_d):
    """Pointers to rows start + offs (columns offs_d) of a matrix with row stride stride_t.

    start * stride_t is taken in int64: at long contexts it passes 2**31 (a row of a fused
    (B, T, 3C) qkv projection is 3C elements apart, so T * 3C does at T = 175k, C = 4096),
    while the offsets inside one tile stay small and cheap in int32."""
    return base + tl.cast(start, tl.int64) * stride_t + (offs[:, None] * stride_t + offs_d[None, :])


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, cols) tile, zero-filling rows >= n_rows (if CHECK_ROWS) and padded cols."""
    if CHECK_ROWS:
        if BLOCK_COLS == N_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if BLOCK_COLS == N_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    if BLOCK_COLS == N_COLS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _visible(offs_m, offs_n, kv_len, causal_offset, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the (query, key) pairs that attention may use."""
    vis = offs_n[None, :] < kv_len
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return vis


@triton.jit
def _kv_len(KV_LENS, b, Tk, HAS_KV_LENS: tl.constexpr):
    if HAS_KV_LENS:
        n = tl.minimum(tl.maximum(tl.load(KV_LENS + b), 0), Tk)
    else:
        n = Tk
    return n


@triton.jit
def _key_range(start_m, Tq, Tk, kv_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """For the query tile at start_m: keys [0, full_end) are visible to every query of the tile;
    keys [full_end, end) are visible to some of them and must be masked."""
    if CAUSAL:
        diag = start_m + (Tk - Tq)  # last key the tile's first query may see
        full_end = tl.minimum(tl.maximum(diag + 1, 0), kv_len) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.maximum(diag + BLOCK_M, 0), kv_len)
    else:
        full_end = kv_len // BLOCK_N * BLOCK_N
        end = kv_len
    return full_end, end


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n,
              offs_d, kv_len, causal_offset, qk_scale, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One step of the online softmax: fold the key/value tile at start_n into (acc, l_i, m_i)."""
    offs_kn = start_n + offs_n
    k = _load_tile(_rows(k_base, start_n, offs_n, stride_kt, offs_d), offs_kn, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(_rows(v_base, start_n, offs_n, stride_vt, offs_d), offs_kn, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(_visible(offs_m, offs_kn, kv_len, causal_offset, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
    p = tl.exp2(qk - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KV_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_os, stride_ob, stride_oh, stride_ot, stride_ls,
    H, Tq, Tk, qk_scale, keys_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (n_splits * cdiv(Tq, BLOCK_M), B, H): one tile of queries of one head, over the
    keys [split * keys_per_split, (split + 1) * keys_per_split) (a multiple of BLOCK_N).

    With one split, O (B, H, Tq, D) and LSE (B, H, Tq) receive the result. With several, O and
    LSE hold one partial result per split (stride_os and stride_ls apart): each is the
    attention over that split's keys alone, which `_attn_fwd_combine` merges."""
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    split = tl.program_id(0) // n_tiles
    start_m = tl.program_id(0) % n_tiles * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    causal_offset = Tk - Tq

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = _load_tile(_rows(q_base, start_m, offs_m0, stride_qt, offs_d), offs_m, Tq, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = _key_range(start_m, Tq, Tk, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    # This split's share of the keys: [lo, mid) unmasked, [mid, hi) masked; empty past `end`.
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, end)
    mid = tl.minimum(tl.maximum(full_end, lo), hi)
    for start_n in range(lo, mid, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n,
                                  offs_m, offs_n, offs_d, kv_len, causal_offset, qk_scale,
                                  HEAD_DIM, BLOCK_D, CAUSAL, False, UPCAST, PRECISION)
    for start_n in range(mid, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n,
                                  offs_m, offs_n, offs_d, kv_len, causal_offset, qk_scale,
                                  HEAD_DIM, BLOCK_D, CAUSAL, True, UPCAST, PRECISION)

    # Rows that saw no key: l = 0. Their output is 0 and their LSE the -inf sentinel.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + split.to(tl.int64) * stride_ls + bh.to(tl.int64) * Tq + offs_m, lse,
             mask=offs_m < Tq)
    o_base = O + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob \
        + h.to(tl.int64) * stride_oh
    _store_tile(_rows(o_base, start_m, offs_m0, stride_ot, offs_d), acc.to(O.dtype.element_ty),
                offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_fwd_combine(
    O_PART, LSE_PART, O, LSE, n_rows, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B * H * Tq,): one query row. Merges its partial results over key splits,
    O_PART (n_splits, B * H * Tq, HEAD_DIM) and LSE_PART (n_splits, B * H * Tq), into O and LSE
    (contiguous): lse = log sum_s exp(lse_s) and out = sum_s exp(lse_s - lse) * out_s.
    A split that saw no key has lse_s = -inf, weight 0; a row that saw none gets 0 and -inf."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    part = offs_s.to(tl.int64) * n_rows + row  # (split, row) pairs, int64 as in _rows
    lse_s = tl.load(LSE_PART + part, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_sub)
    total = tl.sum(w, 0)
    o_s = _load_tile(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], offs_s, n_splits, offs_d,
                     HEAD_DIM, BLOCK_D, True)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o_s * w[:, None], 0) / total_safe
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), m_sub + tl.log(total_safe)))
    if BLOCK_D == HEAD_DIM:
        tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))
    else:
        tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]. Grid (cdiv(Tq, BLOCK_M), B, H)."""
    b, h, start_m = _program(BLOCK_M)
    bh = b * H + h
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, start_m,
                         offs_m0, stride_ot, offs_d),
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, start_m,
                          offs_m0, stride_dot, offs_d),
                    offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                   start_m, offs_m0, offs_n, offs_d, Tq, kv_len, causal_offset, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add one tile of queries' contribution to dK and dV of a tile of keys (transposed form)."""
    offs_m = start_m + offs_m0
    q = _load_tile(_rows(q_base, start_m, offs_m0, stride_qt, offs_d), offs_m, Tq, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_rows(do_base, start_m, offs_m0, stride_dot, offs_d), offs_m, Tq, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Queries past Tq: LSE = +inf makes their probabilities exactly 0.
    lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
    qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.exp2(qkT - lse[None, :])
    if MASKED:
        # tl.where (not a multiply) also discards the inf of rows whose LSE is -inf.
        pT = tl.where(tl.trans(_visible(offs_m, offs_n, kv_len, causal_offset, CAUSAL)), pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, Tq, Tk, sm_scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(Tk, BLOCK_N), B, Hkv): dK and dV of one tile of keys of one kv head, summed
    over the GROUP query heads that share it, so grouped-query attention needs no atomics."""
    b, hk, start_n = _program(BLOCK_N)
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    causal_offset = Tk - Tq

    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(_rows(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, start_n,
                         offs_n0, stride_kt, offs_d),
                   offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(_rows(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, start_n,
                         offs_n0, stride_vt, offs_d),
                   offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query tiles [lo, mid) see part of this key tile (masked); [mid, Tq) see all of it.
    if CAUSAL:
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        mid = (full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        mid = 0
    mid = tl.where(start_n + BLOCK_N > kv_len, Tq, mid)  # tile holds padded keys: mask all
    lo = tl.where(start_n >= kv_len, Tq, lo)  # tile holds only padded keys: skip
    mid_masked = tl.minimum(mid, Tq)

    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + bh.to(tl.int64) * Tq
        delta_base = DELTA + bh.to(tl.int64) * Tq
        for start_m in range(lo, mid_masked, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                    stride_qt, stride_dot, start_m, offs_m0, offs_n, offs_d, Tq,
                                    kv_len, causal_offset, qk_scale, HEAD_DIM, BLOCK_D, CAUSAL,
                                    True, UPCAST, PRECISION)
        for start_m in range(mid, Tq, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                    stride_qt, stride_dot, start_m, offs_m0, offs_n, offs_d, Tq,
                                    kv_len, causal_offset, qk_scale, HEAD_DIM, BLOCK_D, CAUSAL,
                                    False, UPCAST, PRECISION)

    dk = dk * sm_scale  # the probabilities were taken of scale * q.k
    _store_tile(_rows(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh, start_n,
                      offs_n0, stride_dkt, offs_d),
                dk.to(DK.dtype.element_ty), offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(_rows(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh, start_n,
                      offs_n0, stride_dvt, offs_d),
                dv.to(DV.dtype.element_ty), offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m,
                 offs_n, offs_d, kv_len, causal_offset, qk_scale, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add one tile of keys' contribution to dQ of a tile of queries."""
    offs_kn = start_n + offs_n
    k = _load_tile(_rows(k_base, start_n, offs_n, stride_kt, offs_d), offs_kn, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(_rows(v_base, start_n, offs_n, stride_vt, offs_d), offs_kn, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(qk - lse[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, offs_kn, kv_len, causal_offset, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, Tq, Tk, sm_scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B, H): dQ of one tile of queries of one head."""
    b, h, start_m = _program(BLOCK_M)
    bh = b * H + h
    hk = h // GROUP
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    causal_offset = Tk - Tq

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, start_m,
                         offs_m0, stride_qt, offs_d),
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, start_m,
                          offs_m0, stride_dot, offs_d),
                    offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    lse = lse * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = _key_range(start_m, Tq, Tk, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n,
                          offs_m, offs_n, offs_d, kv_len, causal_offset, qk_scale, HEAD_DIM,
                          BLOCK_D, CAUSAL, False, UPCAST, PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n,
                          offs_m, offs_n, offs_d, kv_len, causal_offset, qk_scale, HEAD_DIM,
                          BLOCK_D, CAUSAL, True, UPCAST, PRECISION)

    dq = dq * sm_scale
    _store_tile(_rows(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, start_m,
                      offs_m0, stride_dqt, offs_d),
                dq.to(DQ.dtype.element_ty), offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
# Chosen per (head dim, arch) with `python -m minillm.kernels.report` so that every default compiles
# without register spills, within the shared memory of the smallest GPU of that family
# (sm_86/89: 101,376 bytes for the sm_80 configs), and with tensor-core MMAs (HMMA on sm_80,
# HGMMA/wgmma on sm_90; the 16-row decode tile is below wgmma's 64 rows and uses HMMA on both).
# A plain function, not @triton.autotune: the interpreter, the tests' launch counts and the
# compile report then see exactly what a GPU runs. Autotuning needs a GPU, times every config
# the first time it meets a key (so a test's first call launches each kernel many times), and
# keyed on Tq and Tk it would re-time at every decoding step (the KV cache grows by one key);
# length buckets would need extra kernel arguments only for the tuner. Measured sweeps
# (benchmarks/flash_attention.py on a GPU) are the way to change these tables.


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def launch_configs(head_dim: int, arch: int | None, dtype=torch.bfloat16) -> dict[str, LaunchConfig]:
    """Launch configuration of each kernel for a head dim and dtype on a GPU arch (80 = sm_80,
    90 = sm_90; None = the Triton interpreter, which gets small tiles so that tests cross many
    tile edges). "decode" is the forward for Tq <= its block_m; "combine" merges key splits
    (one query row per program).

    Not autotuned (see the comment above): one default per (head dim, dtype, arch).
    """
    C = LaunchConfig
    combine = C(1, 0, 4, 1)
    if arch is None:
        return {"fwd": C(32, 16, 4, 1), "decode": C(16, 16, 4, 1), "combine": combine,
                "preprocess": C(32, 0, 4, 1), "dkdv": C(16, 32, 4, 1), "dq": C(32, 16, 4, 1)}
    d = _block_d(head_dim)
    # sm_90/sm_100 class: 228 KB of shared memory per SM. Consumer parts (sm_86/89, sm_120)
    # have about 100 KB per block, which the sm_80 configurations fit.
    hopper = 90 <= arch < 120
    if dtype == torch.float32:
        # fp32 tiles take twice the registers and shared memory of 16-bit ones, and tf32x3
        # splits each operand in two: small tiles, HGMMA only where it fits (d <= 64 on sm_90).
        # float32 is the accuracy path, not the speed path: at d = 128 the sm_90 forward and at
        # d = 256 all four kernels (decode too) still spill a little (< 200 bytes) even at
        # 16x16 tiles.
        if d <= 64 and hopper:
            fwd, dkdv, dq = C(64, 32, 4, 2), C(16, 64, 8, 2), C(64, 16, 4, 2)
        elif d <= 64:
            fwd, dkdv, dq = C(32, 32, 4, 2), C(16, 32, 4, 2), C(32, 16, 4, 2)
        elif d <= 128:
            fwd, dkdv, dq = C(32, 16, 4, 2), C(16, 16, 4, 2), C(16, 32, 4, 2)
        else:
            fwd, dkdv, dq = C(16, 16, 4, 2), C(16, 16, 8, 1), C(16, 16, 8, 1)
        decode = C(16, 32, 4, 2) if d <= 128 else C(16, 16, 8, 1)
    elif hopper:
        if d <= 64:
            fwd, dkdv, dq = C(128, 64, 4, 3), C(32, 128, 8, 3), C(128, 32, 4, 3)
        elif d <= 128:
            fwd, dkdv, dq = C(128, 64, 8, 3), C(32, 128, 8, 2), C(128, 32, 8, 2)
        else:  # 256: a 64-row key tile does not fit the dK/dV kernel's registers (no HGMMA)
            fwd, dkdv, dq = C(128, 32, 8, 2), C(16, 32, 4, 2), C(128, 32, 8, 2)
        decode = C(16, 128 if d <= 64 else 64, 4, 3)
    else:
        if d <= 64:
            fwd, dkdv, dq = C(128, 64, 4, 3), C(32, 128, 4, 3), C(128, 32, 4, 3)
        elif d <= 128:
            fwd, dkdv, dq = C(128, 32, 8, 3), C(32, 64, 4, 2), C(64, 32, 4, 2)
        else:
            fwd, dkdv, dq = C(64, 32, 8, 2), C(16, 64, 8, 2), C(32, 32, 4, 2)
        decode = C(16, 128 if d <= 64 else 64 if d <= 128 else 32, 4, 3)
    return {"fwd": fwd, "decode": decode, "combine": combine, "preprocess": C(128, 0, 4, 1),
            "dkdv": dkdv, "dq": dq}


def _arch(t: torch.Tensor) -> int | None:
    if INTERPRET or not t.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


# Flash-decoding: bounds on the number of programs that share one query tile's keys.
_MIN_TILES_PER_SPLIT = 2  # the software pipeline overlaps one key tile's loads with another's math
_MAX_KEY_SPLITS = 16  # 8 heads x 16 splits about fill a 132-SM H100; the combine holds all
#                       splits of a row in registers (16 x 256 fp32 over 128 threads)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a nominal few, so that the split path runs in tests too


def _key_splits(programs: int, key_tiles: int, n_sm: int) -> int:
    """Into how many splits to cut the key tiles of each of `programs` query tiles on a GPU of
    n_sm SMs: enough for about one program per SM (a decoding step has only B * H query tiles,
    too few to keep a GPU's memory system busy), none once the query tiles alone fill it."""
    if programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(n_sm, programs), key_tiles // _MIN_TILES_PER_SPLIT,
                      _MAX_KEY_SPLITS))


def _grid(n_tiles: int, batch: int, heads: int) -> tuple[int, int, int]:
    """The launch grid of a kernel over n_tiles tiles of each (sequence, head): (tiles, B, H).
    CUDA allows 2**31 - 1 programs on axis 0 and 65,535 on axes 1 and 2, so B and H may each
    go up to 65,535 (one axis for B * H would stop at B * H = 65,535)."""
    return (n_tiles, batch, heads)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_flags(q: torch.Tensor) -> dict:
    # The interpreter mishandles bf16 (tl.dot gives garbage, fp32->bf16 casts truncate), so
    # there bf16 tiles are upcast to fp32 as soon as they are loaded, and results are written
    # to fp32 buffers that PyTorch rounds back to bf16.
    upcast = INTERPRET and q.dtype == torch.bfloat16
    return {
        "UPCAST": upcast,
        "PRECISION": "tf32x3" if q.dtype == torch.float32 else "tf32",  # tf32: unused for 16-bit
        "HEAD_DIM": q.shape[-1],
        "BLOCK_D": _block_d(q.shape[-1]),
    }


def _forward(q, k, v, causal: bool, scale: float, kv_lens):
    """(out, lse). The kernels take strides for every dimension of q, k and v but the last,
    which must be contiguous (the public op sees to it), and read kv_lens (int32) densely."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    flags = _kernel_flags(q)
    cfgs = launch_configs(D, _arch(q), q.dtype)
    # A decoding step (Tq of 1 to a few tokens) takes the 16-row tile, and splits its keys.
    decode = Tq <= cfgs["decode"].block_m
    cfg = cfgs["decode"] if decode else cfgs["fwd"]
    n_tiles = triton.cdiv(Tq, cfg.block_m)
    key_tiles = triton.cdiv(Tk, cfg.block_n)
    n_splits = _key_splits(B * H * n_tiles, key_tiles, _sm_count(q.device)) if decode else 1
    tiles_per_split = triton.cdiv(key_tiles, n_splits)
    n_splits = triton.cdiv(key_tiles, tiles_per_split)  # no split left without keys

    o = torch.empty(q.shape, device=q.device, dtype=torch.float32 if flags["UPCAST"] else q.dtype)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if n_splits == 1:
        o_part, lse_part = o[None], lse[None]  # the kernel writes the result directly
    else:
        o_part = torch.empty((n_splits, B, H, Tq, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((n_splits, B, H, Tq), device=q.device, dtype=torch.float32)
    with device_guard(q):
        _attn_fwd[_grid(n_splits * n_tiles, B, H)](
            q, k, v, o_part, lse_part, kv_lens if kv_lens is not None else lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o_part.stride()[:4],
            lse_part.stride(0), H, Tq, Tk, scale * math.log2(math.e), tiles_per_split * cfg.block_n,
            GROUP=H // Hkv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
            HAS_KV_LENS=kv_lens is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **flags,
        )
        if n_splits > 1:
            c = cfgs["combine"]
            _attn_fwd_combine[(B * H * Tq,)](
                o_part, lse_part, o, lse, B * H * Tq, n_splits,
                HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_S=triton.next_power_of_2(n_splits),
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
    return o.to(q.dtype), lse


def _backward(do, q, k, v, o, lse, dlse, causal: bool, scale: float, kv_lens):
    """(dq, dk, dv) for the upstream gradients of out (do) and of the LSE (dlse); either may
    be None (that output took no part in the loss). The kernels take strides for every
    dimension of do but the last."""
    if do is None:
        do = torch.zeros_like(o)
    do = _last_dim_contiguous(do)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    flags = _kernel_flags(q)
    cfgs = launch_configs(D, _arch(q), q.dtype)
    kv_lens_arg = kv_lens if kv_lens is not None else lse

    delta = torch.empty_like(lse)
    buf_dtype = torch.float32 if flags["UPCAST"] else q.dtype
    dq = torch.empty(q.shape, device=q.device, dtype=buf_dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=buf_dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=buf_dtype)
    common = dict(GROUP=H // Hkv, CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, **flags)
    qk_scale = scale * math.log2(math.e)
    with device_guard(q):
        pre = cfgs["preprocess"]
        _attn_bwd_preprocess[_grid(triton.cdiv(Tq, pre.block_m), B, H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
            HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre.block_m,
            num_warps=pre.num_warps, num_stages=pre.num_stages,
        )
        if dlse is not None:
            # d lse / d s_ij = p_ij, so a gradient on the LSE enters dS = P * (dP - delta) as
            # delta - dlse. Rows without visible keys have P = 0 and are unaffected.
            delta = delta - torch.nan_to_num(dlse.float())

        c = cfgs["dkdv"]
        _attn_bwd_dkdv[_grid(triton.cdiv(Tk, c.block_n), B, Hkv)](
            q, k, v, do, lse, delta, dk, dv, kv_lens_arg,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            H, Tq, Tk, scale, qk_scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
            **common,
        )
        c = cfgs["dq"]
        _attn_bwd_dq[_grid(triton.cdiv(Tq, c.block_m), B, H)](
            q, k, v, do, lse, delta, dq, kv_lens_arg,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            H, Tq, Tk, scale, qk_scale,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
            **common,
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# The op as PyTorch sees it
# ----------------------------------------------------------------------------------------------
# Forward and backward are torch.library custom ops: torch.compile keeps each as one opaque
# node of its graph (with shapes from the fake implementations) instead of breaking the graph
# at every attention layer, as it does at Triton launches inside an autograd.Function.
# The schemas are spelled out rather than inferred from type annotations, which
# `from __future__ import annotations` turns into strings.


@torch.library.custom_op(
    "minillm::flash_attention_forward", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? kv_lens) "
           "-> (Tensor, Tensor)")
def _forward_op(q, k, v, causal, scale, kv_lens):
    return _forward(q, k, v, causal, scale, kv_lens)


@_forward_op.register_fake
def _forward_fake(q, k, v, causal, scale, kv_lens):
    B, H, Tq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op(
    "minillm::flash_attention_backward", mutates_args=(),
    schema="(Tensor? dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
           "bool causal, float scale, Tensor? kv_lens) -> (Tensor, Tensor, Tensor)")
def _backward_op(dout, q, k, v, out, lse, dlse, causal, scale, kv_lens):
    return _backward(dout, q, k, v, out, lse, dlse, causal, scale, kv_lens)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, dlse, causal, scale, kv_lens):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, kv_lens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens)
    ctx.causal, ctx.scale = causal, scale


def _grads(ctx, dout, dlse):
    q, k, v, out, lse, kv_lens = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, kv_lens)
    return dq, dk, dv, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("flash_attention: double backward (gradients of gradients) is not "
                       "implemented; use the 'naive' or 'sdpa' attention backend for it")


_forward_op.register_autograd(_grads, setup_context=_setup_context)
# A second backward (after create_graph=True) reaches the backward op's own formula, which
# says what is missing and what to use instead.
_backward_op.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# Reference, input checks, public API
# ----------------------------------------------------------------------------------------------


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, kv_lens=None):
    """Plain float32 PyTorch attention with the same conventions as `flash_attention`.

    Returns (out, lse): out (B, H, Tq, D) float32, lse (B, H, Tq) float32 with -inf for rows that
    see no key (their output is 0). Differentiable; the gradients of such rows are 0.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    qf, kf, vf = q.float(), k.float(), v.float()
    if Hkv != H:
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        visible = j <= i + (Tk - Tq)
    visible = visible.expand(B, 1, Tq, Tk)
    if kv_lens is not None:
        keys = torch.arange(Tk, device=q.device)
        visible = visible & (keys[None, :] < kv_lens.to(q.device).long()[:, None])[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN on rows with no visible key; subtracting 0 there gives p = 0.
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - lse_safe[..., None])
    return p @ vf, lse


def _check_inputs(q, k, v, softmax_scale, kv_lens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"flash_attention: batch size of q ({B}) and k/v ({k.shape[0]}) differ")
    if k.shape[3] != D:
        raise ValueError(f"flash_attention: head dim of q ({D}) and k/v ({k.shape[3]}) differ")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"flash_attention: number of query heads ({H}) must be a multiple of the "
                         f"number of key/value heads ({Hkv})")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported "
                         "(float16, bfloat16 or float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if D % 8 != 0 or not 8 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} is not supported "
                         f"(a multiple of 8, at most {_MAX_HEAD_DIM})")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
                or not math.isfinite(softmax_scale):
            raise ValueError(f"flash_attention: softmax_scale must be a finite number, "
                             f"got {softmax_scale!r}")
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor):
            raise ValueError("flash_attention: kv_lens must be an integer tensor of shape (batch,)")
        if kv_lens.dtype.is_floating_point or kv_lens.dtype.is_complex or kv_lens.dtype == torch.bool:
            raise ValueError(f"flash_attention: kv_lens must hold integers, got {kv_lens.dtype}")
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"flash_attention: kv_lens must have shape ({B},), "
                             f"got {tuple(kv_lens.shape)}")


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, kv_lens=None, return_lse=False):
    """Fused attention: softmax(softmax_scale * q @ k^T + mask) @ v.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0 (grouped-query attention).
    causal: query i sees key j iff j <= i + (Tk - Tq) (bottom-right aligned).
    softmax_scale: defaults to 1 / sqrt(D).
    kv_lens: optional integer tensor (B,); keys j >= kv_lens[b] are masked (values are clamped
        to [0, Tk]).
    Returns out (B, H, Tq, D) in q's dtype, and with return_lse=True also lse (B, H, Tq) float32,
    the natural-log log-sum-exp of each row's scaled, masked scores; -inf marks rows that see no
    key, whose output is 0 and whose gradients are 0. Differentiable in q, k and v (and through
    the returned LSE).

    Runs the Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1); elsewhere it
    falls back to `attention_reference` in float32 and casts back to q's dtype.
    """
    _check_inputs(q, k, v, softmax_scale, kv_lens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    empty = q.numel() == 0 or k.shape[2] == 0
    if empty or not triton_usable(q, k, v):
        out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=scale, kv_lens=kv_lens)
        out = out.to(q.dtype)
    else:
        if kv_lens is not None:
            kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _forward_op(q, k, v, bool(causal), scale, kv_lens)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Compile report
# ----------------------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton signature of `fn`: pointer types given, every other runtime argument an i32
    (strides, sizes) except the fp32 scales; constexprs marked as such."""
    sig = {}
    for name in inspect.signature(getattr(fn, "fn", fn)).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_specs(arch: int = 90) -> list[CompileSpec]:
    """Every kernel at its default launch configuration on `arch` (80 or 90; the report asks for
    each target), for head dims 64 and 128 in float16 and bfloat16, the decode configuration
    and the combine of key splits (at the largest number of splits) included. Causal masking and
    kv_lens are on: the masked code paths contain the unmasked ones."""
    return _compile_specs(arch, head_dims=(64, 128), dtypes=(torch.float16, torch.bfloat16))


def _compile_specs(arch: int, head_dims, dtypes) -> list[CompileSpec]:
    specs = []
    for dtype in dtypes:
        ptr = _PTR[dtype]
        tag = ptr[1:]
        for head_dim in head_dims:
            cfgs = launch_configs(head_dim, arch, dtype)
            common = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), UPCAST=False,
                          PRECISION="tf32x3" if dtype == torch.float32 else "tf32", GROUP=1,
                          CAUSAL=True, HAS_KV_LENS=True)
            fwd_pointers = dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", KV_LENS="*i32")
            for key, fn, pointers in (
                ("fwd", _attn_fwd, fwd_pointers),
                # Decoding writes fp32 partial results per key split.
                ("decode", _attn_fwd, dict(fwd_pointers, O="*fp32")),
                ("dkdv", _attn_bwd_dkdv, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32",
                                              DK=ptr, DV=ptr, KV_LENS="*i32")),
                ("dq", _attn_bwd_dq, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32",
                                          DQ=ptr, KV_LENS="*i32")),
            ):
                c = cfgs[key]
                constexprs = dict(common, BLOCK_M=c.block_m, BLOCK_N=c.block_n)
                specs.append(CompileSpec(
                    name=f"flash_attention.{key}[d{head_dim},{tag}]", fn=fn,
                    signature=_signature(fn, pointers, constexprs), constexprs=constexprs,
                    num_warps=c.num_warps, num_stages=c.num_stages, min_arch=80,
                    # wgmma (HGMMA) takes tiles of 64+ rows: the 16-row decode tile uses HMMA on sm_90 too
                    tensor_core_op="HMMA" if key == "decode" else None,
                ))
            c = cfgs["combine"]
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                              BLOCK_S=_MAX_KEY_SPLITS)
            specs.append(CompileSpec(
                name=f"flash_attention.combine[d{head_dim},{tag}]", fn=_attn_fwd_combine,
                signature=_signature(_attn_fwd_combine, dict(O_PART="*fp32", LSE_PART="*fp32",
                                                             O=ptr, LSE="*fp32"), constexprs),
                constexprs=constexprs, num_warps=c.num_warps, num_stages=c.num_stages, min_arch=80,
            ))
            c = cfgs["preprocess"]
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=c.block_m)
            specs.append(CompileSpec(
                name=f"flash_attention.preprocess[d{head_dim},{tag}]", fn=_attn_bwd_preprocess,
                signature=_signature(_attn_bwd_preprocess, dict(O=ptr, DO=ptr, DELTA="*fp32"),
                                     constexprs),
                constexprs=constexprs, num_warps=c.num_warps, num_stages=c.num_stages, min_arch=80,
            ))
    return specs
