"""Positional encodings against their formulas, computed independently in plain Python.

- Sinusoidal: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
- RoPE ("rotate half" layout): pair (x[i], x[i + D/2]) is rotated by p * base^(-2i/D);
  after rotation the score q_m . k_n depends only on the offset m - n.
- ALiBi (Press et al.): slopes 2^(-8/n) * ... (for 8 heads 1/2, 1/4, ..., 1/256), bias -slope*(i-j).

Tolerances: tables 1e-6 (float32 rounding of float64 values); RoPE scores atol 1e-4 (float32
dot products of 16 terms with magnitudes up to ~10).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.positional import (
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    rotate,
    sinusoidal_table,
)



# ---------------------------------------------------------------------------------------------
# Sinusoidal


@pytest.mark.parametrize("n_pos,dim", [(12, 8), (7, 6), (5, 5), (3, 2)])
def test_sinusoidal_table_matches_formula(n_pos, dim):
    table = sinusoidal_table(n_pos, dim)
    assert table.shape == (n_pos, dim) and table.dtype == torch.float32
    expected = torch.zeros(n_pos, dim)
    for p in range(n_pos):
        for c in range(dim):
            i = c // 2
            angle = p / 10000 ** (2 * i / dim)
            expected[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)


def test_sinusoidal_embedding_looks_up_positions():
    emb = SinusoidalPositionalEmbedding(16, 8)
    pos = torch.tensor([3, 0, 15])
    out = emb(pos)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0] * 4))
    torch.testing.assert_close(out[0, :2], torch.tensor([math.sin(3.0), math.cos(3.0)]))
    angle = 15 / 10000 ** (2 / 8)
    torch.testing.assert_close(out[2, 2:4], torch.tensor([math.sin(angle), math.cos(angle)]))
    assert "table" not in emb.state_dict()  # derived from the formula, never stored


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_by_hand(x: list, p: int, base: float = 10000.0) -> list:
    d = len(x)
    half = d // 2
    out = [0.0] * d
    for i in range(half):
        theta = p * base ** (-2 * i / d)
        c, s = math.cos(theta), math.sin(theta)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_tables_and_rotation_match_formula(base):
    torch.manual_seed(0)
    d, n = 8, 20
    rope = RotaryEmbedding(d, n, base)
    cos, sin = rope(0, n)
    assert cos.shape == sin.shape == (n, d // 2)
    for p in (0, 1, 7, 19):
        for i in range(d // 2):
            assert abs(cos[p, i].item() - math.cos(p * base ** (-2 * i / d))) < 1e-6
            assert abs(sin[p, i].item() - math.sin(p * base ** (-2 * i / d))) < 1e-6
    x = torch.randn(1, 2, n, d)
    out = rotate(x, cos, sin)
    for h in range(2):
        for p in (0, 3, 19):
            expected = torch.tensor(rope_by_hand(x[0, h, p].tolist(), p, base))
            torch.testing.assert_close(out[0, h, p], expected, atol=1e-5, rtol=1e-5)


def test_rotary_slices_start_at_offset():
    rope = RotaryEmbedding(8, 16)
    cos_all, sin_all = rope(0, 16)
    cos, sin = rope(5, 3)
    assert torch.equal(cos, cos_all[5:8]) and torch.equal(sin, sin_all[5:8])


def _score(rope, q, k, m, n):
    """q rotated to position m, k to position n, dotted."""
    qm = rotate(q.view(1, 1, 1, -1), *rope(m, 1)).flatten()
    kn = rotate(k.view(1, 1, 1, -1), *rope(n, 1)).flatten()
    return torch.dot(qm, kn).item()


@given(
    m=st.integers(0, 60),
    n=st.integers(0, 60),
    shift=st.integers(1, 60),
    d=st.sampled_from([2, 4, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_score_depends_only_on_offset(m, n, shift, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rope = RotaryEmbedding(d, 128)
    a = _score(rope, q, k, m, n)
    b = _score(rope, q, k, m + shift, n + shift)
    assert abs(a - b) <= 1e-4 * (1 + abs(a)), (a, b)


def test_rope_score_does_change_with_offset():
    """The property above is not vacuous: the score does depend on the offset."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(16), torch.randn(16)
    scores = [_score(rope, q, k, 10, 10 - off) for off in range(6)]
    assert max(scores) - min(scores) > 0.5, scores
    # and position 0 is the identity
    torch.testing.assert_close(rotate(q.view(1, 1, 1, -1), *rope(0, 1)).flatten(), q)


def test_rope_preserves_norm_and_dtype():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 32)
    x = torch.randn(2, 3, 32, 16)
    out = rotate(x, *rope(0, 32))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert rotate(x.bfloat16(), *rope(0, 32)).dtype == torch.bfloat16


def test_rope_errors():
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(7, 16)
    rope = RotaryEmbedding(8, 16)
    with pytest.raises(ValueError, match="beyond the RoPE table of 16"):
        rope(10, 7)


# ---------------------------------------------------------------------------------------------
# ALiBi


def paper_slopes(n):
    """The ALiBi authors' reference recipe (github.com/ofirpress/attention_with_linear_biases)."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_for_8_heads():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


@pytest.mark.parametrize("n", [1, 2, 4, 6, 12, 16, 20])
def test_alibi_slopes_match_paper_recipe(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(paper_slopes(n), dtype=torch.float32))


def test_alibi_slopes_for_12_heads_by_hand():
    expected = [2.0 ** -e for e in range(1, 9)] + [2.0 ** -e for e in (0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))


@pytest.mark.parametrize("tq,tk", [(5, 5), (2, 6), (1, 4)])
def test_alibi_causal_bias(tq, tk):
    slopes = alibi_slopes(8)
    bias = alibi_bias(slopes, tq, tk, causal=True)
    assert bias.shape == (8, tq, tk)
    for h in range(8):
        for i in range(tq):
            qpos = i + tk - tq  # a query sits after the cached keys
            for j in range(qpos + 1):  # the keys it may see
                assert abs(bias[h, i, j].item() - (-slopes[h].item() * (qpos - j))) < 1e-6


def test_alibi_bidirectional_bias():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 4, 4, causal=False)
    for h in range(4):
        for i in range(4):
            for j in range(4):
                assert abs(bias[h, i, j].item() - (-slopes[h].item() * abs(i - j))) < 1e-6
