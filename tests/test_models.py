"""Invariants of whole GPT and BERT models (tiny configs, eval mode) and of generation.

- Causality: changing tokens at positions >= t never changes GPT's logits before t
  (exactly up to 1e-6), for every positional encoding and the naive and sdpa backends.
- Padding invariance: BERT's outputs at real tokens do not depend on the pad ids or on how
  many pads follow (atol 1e-5), for every positional encoding and both backends.
- KV-cache decoding in chunks equals the full forward pass (atol 1e-5), with grouped-query
  attention.
- generate(): shape, greedy == step-by-step argmax of full forward passes (also past
  block_size, where it slides a window), top_k=1 == greedy; sample_next's top-k / top-p filters.
- Classification: one classify() signature for both models; add_classifier keeps a head of the
  right size and makes a fresh one otherwise; classification_head() names what trains with it.
- The config's shape fields are exactly the fields that change the weights' names and shapes.
- Bad input raises ValueError naming the offending thing.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import minillm
from minillm import BERT, GPT, ModelConfig, preset
from minillm import generate as generate_cli
from minillm.checkpoint import model_tensors, save_checkpoint
from minillm.gpt import sample_next
from minillm.tokenizer import CharTokenizer

POS = ["learned", "sinusoidal", "rope", "alibi"]
BACKENDS = ["naive", "sdpa"]
V = 64  # vocabulary of the tiny models


def tiny_gpt(pe="learned", backend="sdpa", **overrides) -> GPT:
    cfg = preset("gpt-cpu", n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=V, pos_encoding=pe,
                 attention_backend=backend, init_std=0.1, **overrides)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def tiny_bert(pe="learned", backend="sdpa", **overrides) -> BERT:
    cfg = preset("bert-tiny", n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=V, pos_encoding=pe,
                 attention_backend=backend, init_std=0.1, **overrides)
    torch.manual_seed(0)
    model = BERT(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


_models: dict = {}


def cached(kind, pe, backend, **overrides):
    key = (kind, pe, backend, tuple(sorted(overrides.items())))
    if key not in _models:
        _models[key] = (tiny_gpt if kind == "gpt" else tiny_bert)(pe, backend, **overrides)
    return _models[key]


# ---------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", POS)
@given(t=st.integers(1, 15), seed=st.integers(0, 2**31 - 1))
def test_gpt_future_tokens_do_not_change_past_logits(pe, backend, t, seed):
    model = cached("gpt", pe, backend, n_kv_head=2)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (2, 16), generator=g)
    changed = idx.clone()
    changed[:, t:] = (idx[:, t:] + torch.randint(1, V, idx[:, t:].shape, generator=g)) % V  # every one differs
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(b[:, :t], a[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(b[:, t], a[:, t], atol=1e-3)  # the changed position itself does change


@pytest.mark.parametrize("pe", POS)
def test_bert_is_bidirectional(pe):
    """BERT, unlike GPT, lets the last token change the first position's output."""
    model = cached("bert", pe, "sdpa")
    idx = torch.randint(1, V, (1, 10))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % V
    with torch.no_grad():
        assert not torch.allclose(model.encode(idx)[:, 0], model.encode(changed)[:, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Padding


def _pad(seqs, length, pad_ids):
    ids = torch.stack([torch.cat([s, pad_ids[: length - len(s)]]) for s in seqs])
    mask = torch.stack([torch.arange(length) < len(s) for s in seqs]).long()
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", POS)
def test_bert_real_tokens_ignore_padding(pe, backend):
    model = cached("bert", pe, backend)
    torch.manual_seed(1)
    seqs = [torch.randint(1, V, (7,)), torch.randint(1, V, (4,)), torch.randint(1, V, (1,))]
    short_ids, short_mask = _pad(seqs, 7, torch.zeros(20, dtype=torch.long))
    long_ids, long_mask = _pad(seqs, 20, torch.randint(1, V, (20,)))  # junk pad ids, more pads
    with torch.no_grad():
        short = model.encode(short_ids, short_mask)
        long = model.encode(long_ids, long_mask)
        unmasked = model.encode(long_ids)
        for i, s in enumerate(seqs):
            n = len(s)
            alone = model.encode(s[None])[0]
            torch.testing.assert_close(short[i, :n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(long[i, :n], alone, atol=1e-5, rtol=1e-5)
    # without the mask the junk pads do leak in: the mask is what makes the test pass
    assert not torch.allclose(unmasked[1, :4], long[1, :4], atol=1e-3)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_classifier_ignores_padding(pooling):
    model = tiny_bert(num_labels=3, classifier_pooling=pooling)
    torch.manual_seed(2)
    seqs = [torch.randint(1, V, (5,)), torch.randint(1, V, (2,))]
    ids, mask = _pad(seqs, 9, torch.randint(1, V, (9,)))
    with torch.no_grad():
        logits, _ = model.classify(ids, mask)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], model.classify(s[None])[0][0], atol=1e-5, rtol=1e-5)


def test_gpt_classifier_reads_last_real_token():
    model = tiny_gpt(num_labels=3)
    torch.manual_seed(3)
    seqs = [torch.randint(1, V, (6,)), torch.randint(1, V, (3,))]
    ids, mask = _pad(seqs, 8, torch.randint(1, V, (8,)))
    with torch.no_grad():
        logits, loss = model.classify(ids, mask, labels=torch.tensor([0, 2]))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], model.classify(s[None])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 2])))


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_one_classify_signature(kind):
    model = (tiny_gpt if kind == "gpt" else tiny_bert)(num_labels=3)
    ids, mask = _pad([torch.randint(1, V, (5,)), torch.randint(1, V, (3,))], 6, torch.zeros(6, dtype=torch.long))
    types = (torch.arange(6) >= 2).long().expand(2, 6) * mask
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        logits, loss = model.classify(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        plain, none = model.classify(ids, attention_mask=mask)
    assert logits.shape == (2, 3) and none is None
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    if kind == "gpt":  # a GPT has no segments: token types change nothing
        assert torch.equal(logits, plain)
    else:
        assert not torch.allclose(logits, plain, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_add_classifier_keeps_a_head_of_that_size(kind):
    model = tiny_gpt() if kind == "gpt" else tiny_bert()
    name = "score" if kind == "gpt" else "classifier"
    assert model.classification_head() == []
    assert model.add_classifier(3) is True
    head = getattr(model, name)
    assert model.config.num_labels == 3 and head.weight.shape == (3, 32)
    assert (head.bias is None) == (kind == "gpt")
    if head.bias is not None:
        assert not head.bias.any()
    assert model.add_classifier(3) is False and getattr(model, name) is head
    assert model.add_classifier(5) is True and getattr(model, name).weight.shape == (5, 32)
    assert model.classification_head()[0] is getattr(model, name)
    logits, _ = model.classify(torch.randint(1, V, (2, 4)))
    assert logits.shape == (2, 5)


def test_add_classifier_pooling_and_the_modules_that_train():
    gpt = tiny_gpt()
    gpt.add_classifier(2, pooling="mean")  # a GPT always reads its last token
    assert gpt.classification_head() == [gpt.score]
    bert = tiny_bert()
    bert.add_classifier(2)
    assert bert.config.classifier_pooling == "cls"
    assert bert.classification_head() == [bert.classifier, bert.pooler]
    assert bert.add_classifier(2, pooling="mean") is False  # the head stays, the pooling changes
    assert bert.config.classifier_pooling == "mean"
    assert bert.classification_head() == [bert.classifier]


def test_a_fresh_head_is_initialised_like_the_model():
    torch.manual_seed(0)
    model = GPT(preset("gpt-cpu", n_layer=1, n_embd=256, n_head=4, vocab_size=V))
    model.add_classifier(64)
    assert abs(model.score.weight.std().item() - model.config.init_std) < 0.002


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", POS)
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_kv_cache_decoding_equals_full_forward(pe, backend, n_kv_head):
    model = cached("gpt", pe, backend, n_kv_head=n_kv_head)
    assert model.blocks[0].attn.n_kv_head == n_kv_head < model.config.n_head
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        full, _ = model(idx)
        pieces, start = [], 0
        for n in (4, 1, 1, 3, 1, 2, 1, 1, 1, 1):  # prefill, single tokens, and small chunks
            logits, _ = model(idx[:, start : start + n], kv_cache=cache)
            pieces.append(logits)
            start += n
    assert start == 16 and cache.pos == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_cannot_go_past_block_size():
    model = tiny_gpt()
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"17 tokens .*block_size=16"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# Generation


def greedy_by_hand(model, idx, n):
    """Argmax of a fresh full forward pass over (at most) the last block_size tokens, n times."""
    block = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -block:])
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def test_generate_shape_and_prompt():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (3, 5))
    out = model.generate(prompt, 7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert out.min() >= 0 and out.max() < V
    assert not model.training


def test_generate_restores_training_mode():
    model = tiny_gpt().train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0)
    assert model.training


@pytest.mark.parametrize("pe", POS)
def test_greedy_generation_equals_argmax_of_full_forward(pe):
    """21 new tokens after a 5-token prompt with block_size 16: the KV cache fills up and the
    model slides its window; every token must still be the full forward pass's argmax."""
    model = cached("gpt", pe, "sdpa", n_kv_head=2)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 21, temperature=0)
    assert out.shape == (2, 26)
    assert torch.equal(out, greedy_by_hand(model, prompt, 21))


def test_top_k_1_equals_greedy():
    model = cached("gpt", "rope", "sdpa", n_kv_head=2)
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 10, temperature=0)
    for temperature in (1.0, 0.5):
        out = model.generate(prompt, 10, temperature=temperature, top_k=1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, greedy)


def test_sampling_is_reproducible_and_not_greedy():
    model = tiny_gpt()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(prompt, 12, temperature=0))


def test_generate_stops_at_eos():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(8))
    greedy = model.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 5])  # the third generated token
    first = int((greedy[0, 3:] == eos).nonzero()[0])  # it may already appear earlier
    out = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    assert torch.equal(out[0], greedy[0, : 3 + first + 1])


def test_generate_eos_pads_finished_rows():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(9))
    greedy = model.generate(prompt, 6, temperature=0)
    eos = int(greedy[0, 3])  # row 0 finishes at once
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert (out[0, 3:] == eos).all()
    row1 = greedy[1, 3:]
    hits = (row1 == eos).nonzero()
    n = int(hits[0]) + 1 if len(hits) else len(row1)
    assert torch.equal(out[1, 3 : 3 + n], row1[:n])


def test_generate_keeps_a_prompt_longer_than_block_size():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (1, 20))
    out = model.generate(prompt, 3, temperature=0)
    assert out.shape == (1, 23)
    assert torch.equal(out[:, :20], prompt)


def test_generate_from_a_prompt_longer_than_block_size_conditions_on_its_end():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(10))
    out = model.generate(prompt, 4, temperature=0)
    assert torch.equal(out[:, -4:], greedy_by_hand(model, prompt, 4)[:, -4:])


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
     (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(top_p=float("nan")), "top_p"), (dict(top_k=0), "top_k")],
)
def test_generate_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt().generate(torch.zeros(1, 1, dtype=torch.long), 2, **kwargs)


@pytest.mark.parametrize("shape", [(2, 0), (0,), (4,)])
def test_generate_needs_a_batch_of_non_empty_prompts(shape):
    with pytest.raises(ValueError, match=r"prompt must be \(batch, time\) token ids with at least one token"):
        tiny_gpt().generate(torch.zeros(shape, dtype=torch.long), 2)


def test_generate_cli_refuses_nan_temperature(tmp_path):
    """python -m minillm.generate --temperature nan: a ValueError, which the CLI prints as one line."""
    tok = CharTokenizer.train("abc")
    model = GPT(preset("gpt-cpu", n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size))
    save_checkpoint(str(tmp_path), model, model.config, tok)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        generate_cli.main(["--ckpt", str(tmp_path), "--prompt", "ab", "--tokens", "3", "--temperature", "nan",
                           "--device", "cpu"])


def _frequencies(logits_row, n=6000, seed=0, **kw):
    logits = logits_row[None].expand(n, -1)
    ids = sample_next(logits, generator=torch.Generator().manual_seed(seed), **kw)
    assert ids.shape == (n, 1)
    return torch.bincount(ids[:, 0], minlength=logits_row.numel()).float() / n


def test_sample_next_greedy_and_temperature():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]
    probs = torch.softmax(logits[0], dim=-1)
    torch.testing.assert_close(_frequencies(logits[0]), probs, atol=0.03, rtol=0)
    hot = torch.softmax(logits[0] / 2.0, dim=-1)
    torch.testing.assert_close(_frequencies(logits[0], temperature=2.0), hot, atol=0.03, rtol=0)


def test_sample_next_top_k():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0])
    f = _frequencies(logits, top_k=2)
    assert f[[0, 2, 4]].sum() == 0
    expected = torch.softmax(torch.tensor([2.0, 1.5]), dim=0)
    torch.testing.assert_close(f[[1, 3]], expected, atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "top_p,nucleus",
    [(0.4, [2]), (0.7, [2, 1]), (0.85, [2, 1, 3]), (0.97, [2, 1, 3, 0]), (1.0, [2, 1, 3, 0, 4])],
)
def test_sample_next_top_p_restricts_to_the_nucleus(top_p, nucleus):
    """Probabilities 0.03, 0.3, 0.5, 0.15, 0.02 (unsorted): the nucleus is the smallest set of
    most likely tokens holding top_p of the mass; sampling renormalises inside it."""
    probs = torch.tensor([0.03, 0.3, 0.5, 0.15, 0.02])
    logits = probs.log()
    f = _frequencies(logits, top_p=top_p)
    outside = [i for i in range(5) if i not in nucleus]
    assert f[outside].sum() == 0, f
    expected = probs[nucleus] / probs[nucleus].sum()
    torch.testing.assert_close(f[nucleus], expected, atol=0.03, rtol=0)
    if top_p == 1.0:
        assert (f > 0).all()


def test_sample_next_top_p_per_row():
    """Each row gets its own nucleus (the filter is scattered back to each row's order)."""
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]]).log().repeat(3000, 1)
    ids = sample_next(logits, top_p=0.65, generator=torch.Generator().manual_seed(0))[:, 0]
    assert set(ids[0::2].tolist()) == {0, 1}
    assert set(ids[1::2].tolist()) == {2, 1}


# ---------------------------------------------------------------------------------------------
# Losses


def test_gpt_loss_is_next_token_cross_entropy():
    model = tiny_gpt()
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(11))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[1, 2] = -100
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    keep = targets != -100
    expected = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_chunked_loss_equals_the_plain_loss(kind):
    """config.chunked_ce changes how the loss is computed (no (N, V) logits), not its value."""
    plain = tiny_gpt() if kind == "gpt" else tiny_bert()
    chunked = type(plain)(plain.config.replace(chunked_ce=True)).eval()
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(13))
    targets = idx.roll(-1, dims=1) if kind == "gpt" else torch.full_like(idx, -100)
    targets[:, -1] = -100
    targets[1, 3] = idx[1, 3]
    with torch.no_grad():
        logits, a = plain(idx, targets)
        none, b = chunked(idx, targets)
    assert none is None and (logits is None) == (kind == "bert")
    assert abs(a.item() - b.item()) < 1e-5


def test_bert_mlm_loss_on_masked_positions_only():
    model = tiny_bert()
    idx = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(12))
    targets = torch.full_like(idx, -100)
    targets[0, 1], targets[1, 5], targets[1, 6] = 3, 7, 9
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep].double(), targets[keep])
    assert abs(loss.item() - expected.item()) < 1e-5


def test_bert_hidden_states():
    model = tiny_bert()
    idx = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        last, hidden = model.encode(idx, output_hidden_states=True)
    assert len(hidden) == model.config.n_layer + 1
    assert torch.equal(hidden[-1], last)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match=r"17 tokens .*block_size=16"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"25 tokens .*block_size=24"):
        tiny_bert().encode(torch.zeros(1, 25, dtype=torch.long))


def test_token_ids_must_be_2d():
    with pytest.raises(ValueError, match="token ids must have shape"):
        tiny_gpt()(torch.zeros(5, dtype=torch.long))


def test_attention_mask_of_wrong_shape():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\)"):
        tiny_gpt()(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask shape \(5,\)"):
        tiny_bert().encode(ids, attention_mask=torch.ones(5))
    with pytest.raises(ValueError, match="token_type_ids"):
        tiny_bert().encode(ids, token_type_ids=torch.zeros(2, 6, dtype=torch.long))


def test_head_count_must_divide_width():
    with pytest.raises(ValueError, match="n_head=5 does not divide n_embd=32"):
        ModelConfig(n_embd=32, n_head=5)
    with pytest.raises(ValueError, match="n_head=3 does not divide n_embd=128"):
        preset("gpt-cpu", n_head=3)


@pytest.mark.parametrize("n_kv_head", [3, 0, -2, 8])
def test_kv_heads_must_divide_heads(n_kv_head):
    with pytest.raises(ValueError, match=f"n_kv_head={n_kv_head}"):
        preset("gpt-cpu", n_head=4, n_kv_head=n_kv_head)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        preset("gpt5")


def test_unknown_config_field():
    with pytest.raises(ValueError, match=r"unknown model config field.*'n_layers'"):
        preset("gpt-cpu", n_layers=2)
    with pytest.raises(ValueError, match=r"unknown model config field.*'heads'"):
        ModelConfig.from_dict({"n_layer": 2, "heads": 4})
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    "field,value",
    [("pos_encoding", "xpos"), ("norm", "batchnorm"), ("activation", "tanh"), ("attention_backend", "flash"),
     ("arch", "t5"), ("norm_position", "middle"), ("classifier_pooling", "max")],
)
def test_unknown_choice(field, value):
    with pytest.raises(ValueError, match=f"config.{field}={value!r}"):
        preset("gpt-cpu", **{field: value})


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("vocab_size", -1), ("block_size", 2.5), ("n_embd", True)])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"config.{field} must be a positive integer"):
        preset("gpt-cpu", **{field: value})


def test_other_config_errors():
    with pytest.raises(ValueError, match="RoPE needs an even head dimension"):
        preset("gpt-cpu", n_embd=36, n_head=4, pos_encoding="rope")
    with pytest.raises(ValueError, match="dropout"):
        preset("gpt-cpu", dropout=1.0)
    with pytest.raises(ValueError, match="num_labels"):
        preset("gpt-cpu", num_labels=-1)


def test_absurd_config_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="parameters"):
        preset("gpt-cpu", n_layer=10**6, n_embd=10**6, n_head=8)
    assert time.perf_counter() - t0 < 1.0


def test_wrong_architecture_and_missing_heads():
    with pytest.raises(ValueError, match="GPT needs config.arch='gpt'"):
        GPT(preset("bert-tiny"))
    with pytest.raises(ValueError, match="BERT needs config.arch='bert'"):
        BERT(preset("gpt-cpu", n_layer=1))
    with pytest.raises(ValueError, match="no classification head"):
        tiny_gpt().classify(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no classification head"):
        tiny_bert().classify(torch.zeros(1, 3, dtype=torch.long))


# every field with another valid value, starting from BASE_SHAPE
BASE_SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=V)
OTHER_VALUE = dict(
    arch="bert", vocab_size=V + 1, n_layer=3, n_head=8, n_kv_head=4, n_embd=64, head_size=6, n_inner=48, block_size=20,
    pos_encoding="rope", rope_base=500.0, norm="rmsnorm", norm_eps=1e-6, norm_position="post", activation="swiglu",
    bias=False, dropout=0.1, attn_dropout=0.1, tie_embeddings=False, attn_scale=1.0, attn_scale_by_layer=True,
    attention_backend="naive", use_kernels=True, chunked_ce=True, type_vocab_size=3, pad_token_id=1,
    num_labels=2, classifier_pooling="mean", init_std=0.05, pooler=False,
)


def weight_shapes(config):
    """What a checkpoint of the model holds: names and shapes, tied weights once."""
    return {k: tuple(v.shape) for k, v in model_tensors(minillm.build_model(config)).items()}


def test_shape_fields_are_the_fields_that_change_the_weights():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(OTHER_VALUE) == fields  # the table below covers every field
    assert set(ModelConfig.shape_fields) <= fields and set(ModelConfig.runtime_fields) <= fields
    assert not set(ModelConfig.shape_fields) & set(ModelConfig.runtime_fields)
    for arch in ("gpt", "bert"):
        base = ModelConfig(arch=arch, **BASE_SHAPE)
        for name, value in OTHER_VALUE.items():
            if name == "arch" or name in ("type_vocab_size", "pooler") and arch == "gpt":  # BERT's only
                continue
            other = base.replace(**{name: value})
            changed = weight_shapes(other) != weight_shapes(base)
            assert changed == (name in ModelConfig.shape_fields), (arch, name)
            assert (other.shape() != base.shape()) == changed, (arch, name)


def test_config_shape_fills_in_defaults_and_describe():
    a = preset("gpt-cpu", n_kv_head=None, n_inner=None)
    b = preset("gpt-cpu", n_kv_head=a.n_head, n_inner=4 * a.n_embd)
    assert a.shape() == b.shape() and a != b
    assert preset("gpt-cpu", head_size=32).shape() == a.shape()  # 128 / 4: the head size None stands for
    assert a.describe() == "gpt 4x128, 4 heads, vocab 256, context 128"
    assert preset("gpt-cpu", n_head=3, head_size=16).describe() == "gpt 4x128, 3 heads of 16, vocab 256, context 128"
    assert "type_vocab_size" in preset("bert-cpu").shape() and "type_vocab_size" not in a.shape()


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_attn_scale_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match="config.attn_scale must be a positive number"):
        preset("gpt-cpu", attn_scale=value)


def test_attn_scale_multiplies_the_scores():
    """attn_scale=1/sqrt(head_dim) is the default; attn_scale_by_layer divides block i's by i + 1."""
    model = tiny_gpt()
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(14))
    explicit = GPT(model.config.replace(attn_scale=model.config.head_dim**-0.5)).eval()
    explicit.load_state_dict(model.state_dict())
    by_layer = GPT(model.config.replace(attn_scale_by_layer=True)).eval()
    by_layer.load_state_dict(model.state_dict())
    assert [b.attn.scale for b in by_layer.blocks] == [8**-0.5, 8**-0.5 / 2]
    with torch.no_grad():
        torch.testing.assert_close(explicit(idx)[0], model(idx)[0], atol=1e-6, rtol=0)
        assert not torch.allclose(by_layer(idx)[0], model(idx)[0], atol=1e-3)


def test_build_model_picks_the_architecture():
    assert isinstance(minillm.build_model(preset("gpt-cpu", n_layer=1)), GPT)
    assert isinstance(minillm.build_model(preset("bert-tiny", n_layer=1)), BERT)


# ---------------------------------------------------------------------------------------------
# The GPU paths, checked on the CPU (issue 13)


def test_attention_mask_covers_the_cached_keys():
    """With a KV cache the mask covers every key: the cached positions and the new ones, as in
    Hugging Face. A (B, T) mask over the new tokens alone is refused, naming the shape expected."""
    model = tiny_gpt()
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4), kv_cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask shape \(2, 1\) must be \(batch, 4 cached \+ 1 new "
                                             r"tokens\) = \(2, 5\)"):
            model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), kv_cache=cache)
        model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 5), kv_cache=cache)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
@pytest.mark.parametrize("pe", POS)
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_sdpa_equals_naive_with_and_without_padding(kind, pe, n_kv_head):
    """The sdpa backend (which hands torch small boolean masks, ALiBi's bias without a batch
    dimension, enable_gqa) against the attention written out: logits and every gradient."""
    seqs = [torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 6, 3)]
    ids, mask = _pad(seqs, 9, torch.zeros(9, dtype=torch.long))
    targets = torch.where(mask.bool(), torch.roll(ids, 1, 1), -100)
    for attention_mask in (None, mask):
        results = []
        for backend in ("naive", "sdpa"):
            model = (tiny_gpt if kind == "gpt" else tiny_bert)(pe, backend, n_kv_head=n_kv_head).train()
            logits = model(ids, attention_mask=attention_mask)[0]
            _, loss = model(ids, targets, attention_mask=attention_mask)
            loss.backward()
            results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (a, ga), (b, gb) = results
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert ga.keys() == gb.keys() and ga
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def _no_host_sync_step(model, ids, targets, mask):
    """Forward and backward on the meta device: its tensors hold no data, so anything that reads
    values on the host (.item(), bool(t), torch.equal, boolean indexing, nonzero) raises."""
    model = model.to("meta").train()
    _, loss = model(ids.to("meta"), targets.to("meta"), attention_mask=mask.to("meta"))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "naive"])
@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_no_host_sync_in_a_training_step_with_padding(kind, backend, pe):
    """No layer reads the padding mask on the host (torch.equal per layer was a sync and a
    graph break), nor does BERT's masked-LM head select its rows (a data-dependent shape)."""
    ids, mask = _pad([torch.randint(1, V, (n,)) for n in (8, 5)], 8, torch.zeros(8, dtype=torch.long))
    targets = torch.full_like(ids, -100)
    targets[0, 2], targets[1, 4] = 5, 6
    build = tiny_gpt if kind == "gpt" else tiny_bert
    _no_host_sync_step(build(pe, backend, pooler=False) if kind == "bert" else build(pe, backend), ids, targets, mask)
    if torch.cuda.is_available():  # the real thing: CUDA refuses any synchronising call
        model = build(pe, backend).cuda().train()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, loss = model(ids.cuda(), targets.cuda(), attention_mask=mask.cuda())
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_the_meta_device_catches_a_host_sync():
    """The check above can fail: a mask read on the host raises there."""
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.equal(mask, mask)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.randn(6, 4, device="meta")[mask.reshape(-1)]


@pytest.mark.parametrize("chunked_ce", [False, True])
def test_bert_mlm_loss_and_grads_equal_the_masked_rows_alone(chunked_ce):
    """The head now runs on every position and the loss ignores the unmasked ones; the previous
    math, written out: the head on the masked rows alone, their mean cross-entropy."""
    model = tiny_bert(chunked_ce=chunked_ce).train()
    idx = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(3))
    targets = torch.full_like(idx, -100)
    targets[0, 1], targets[1, 5], targets[1, 6] = 3, 7, 9
    _, loss = model(idx, targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    h = model.encode(idx).reshape(-1, model.config.n_embd)
    keep = targets.reshape(-1) != -100
    logits = model.mlm_decoder(model.mlm_hidden(h[keep]))
    expected = F.cross_entropy(logits.float(), targets.reshape(-1)[keep])
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5
    for name, g in ours.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bert_mlm_loss_without_a_masked_token_is_a_zero_with_a_graph():
    model = tiny_bert().train()
    idx = torch.randint(1, V, (2, 5))
    _, loss = model(idx, torch.full_like(idx, -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bert_for_masked_lm_has_no_unused_weights(tmp_path):
    """DDP (find_unused_parameters=False) needs a gradient for every weight that trains: a BERT
    built with pooler=False has no pooler the masked-LM loss leaves without one. Finetuning
    from its checkpoint adds a fresh pooler for "cls" pooling."""
    from minillm.pretrained import load_pretrained

    idx = torch.randint(1, V, (2, 6))
    targets = torch.where(torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.5, idx, -100)
    targets[0, 0] = idx[0, 0]
    unused = {}
    for pooler in (True, False):
        model = tiny_bert(pooler=pooler).train()
        model(idx, targets)[1].backward()
        unused[pooler] = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == {True: ["pooler.weight", "pooler.bias"], False: []}  # the check can fail
    assert model.pooler is None
    with pytest.raises(ValueError, match="built without a pooler"):
        model.pool(model.encode(idx))

    save_checkpoint(str(tmp_path), model, model.config, CharTokenizer.train("abc"))
    loaded, _, _ = load_pretrained(str(tmp_path))
    assert loaded.pooler is None
    torch.testing.assert_close(loaded.encode(idx), model.encode(idx))
    loaded.add_classifier(2, "mean")
    assert loaded.pooler is None and loaded.classification_head() == [loaded.classifier]
    loaded.add_classifier(2, "cls")
    assert loaded.config.pooler and loaded.classification_head() == [loaded.classifier, loaded.pooler]
    assert abs(loaded.pooler.weight.std().item() - loaded.config.init_std) < 0.02
    logits, loss = loaded.classify(idx, labels=torch.tensor([0, 1]))
    assert logits.shape == (2, 2) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="needs config.pooler=true"):
        loaded.config.replace(pooler=False)
