"""Finetuning from preferences (DPO, IPO) and rewards (GRPO): the formulas against hand-written
references, log-probabilities of the response tokens only, the LoRA reference, sampling with the
KV cache against full forward passes, and `finetune.py --task dpo / --task rl` end to end on tiny
models (metrics, resume, bad input)."""
import copy
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import GPT, preset
from minillm import rl
from minillm.lora import LoRALinear, apply_lora
from minillm.preference import (
    adapters_off, distinct_n, dpo_loss, group_advantages, policy_loss, sequence_logprobs, token_logprobs,
)
from minillm.tokenizer import CharTokenizer
from minillm.training import Tally

# tests/ is on sys.path (pytest's rootdir conftest); test_finetune puts the repository root there too
from test_finetune import QUICK, VOCAB, expect_value_error, metric_rows, run, sentences, summary, write_tsv  # noqa: E402

import finetune  # noqa: E402


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def tiny_gpt(seed=0, vocab=20, block=32, n_layer=1):
    torch.manual_seed(seed)
    return GPT(preset("gpt-cpu", n_layer=n_layer, n_head=2, n_embd=16, block_size=block, vocab_size=vocab)).eval()


def direct_token_logprobs(logits, targets):
    """log_softmax(logits[b, t])[targets[b, t]], 0 where the target is -100, one position at a time (float64)."""
    out = torch.zeros(targets.shape, dtype=torch.float64)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y != -100:
                out[b, t] = torch.log_softmax(logits[b, t].double(), dim=-1)[y]
    return out


# ---------------------------------------------------------------------------------------------
# 1. DPO, conservative DPO and IPO against the written-out formulas

PC, PR, RC, RR = [-3.0, -10.0, -5.5, -1.0], [-4.0, -8.0, -5.5, -1.0], [-3.5, -9.0, -5.0, -2.0], [-3.0, -9.5, -5.0, -1.5]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("variant,eps", [("dpo", 0.0), ("dpo", 0.1), ("dpo", 0.3), ("ipo", 0.0)])
def test_dpo_loss_and_stats_match_the_formula(beta, variant, eps):
    losses, rw, rl_, acc = [], [], [], []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        if variant == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)))
        rw.append(beta * (pc - rc))
        rl_.append(beta * (pr - rr))
        acc.append(1.0 if beta * (pc - rc) > beta * (pr - rr) else 0.0)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, stats = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, variant=variant, label_smoothing=eps)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-6)
    assert stats["reward_chosen"].tolist() == pytest.approx(rw, rel=1e-5, abs=1e-6)
    assert stats["reward_rejected"].tolist() == pytest.approx(rl_, rel=1e-5, abs=1e-6)
    assert stats["reward_margin"].tolist() == pytest.approx([a - b for a, b in zip(rw, rl_)], rel=1e-5, abs=1e-6)
    assert stats["reward_accuracy"].tolist() == acc
    # pairs: chosen wins, rejected wins, a tie (not counted as right), chosen wins
    assert acc == [1.0, 0.0, 0.0, 1.0] and stats["reward_accuracy"].mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("variant,eps", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(variant, eps):
    pc, pr = torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor(RC), torch.tensor(RR), beta=0.1, variant=variant, label_smoothing=eps)
    loss.backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    assert torch.allclose(pc.grad, -pr.grad)
    # plain DPO: d loss / d policy_chosen = -beta * sigmoid(-beta h) / B
    if variant == "dpo" and eps == 0.0:
        expect = [-0.1 * sigmoid(-0.1 * ((a - c) - (b - d))) / 4 for a, b, c, d in zip(PC, PR, RC, RR)]
        assert pc.grad.tolist() == pytest.approx(expect, rel=1e-5)


def test_dpo_at_the_reference_is_log2_and_unknown_variant_is_refused():
    x = torch.tensor([-3.0, -7.0])
    loss, stats = dpo_loss(x, x - 1, x, x - 1, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["reward_margin"].abs().max().item() == 0 and stats["reward_accuracy"].sum().item() == 0
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(x, x, x, x, beta=0.1, variant="kto")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(*[st.floats(-30, 0, allow_nan=False)] * 4), min_size=1, max_size=6),
       st.floats(0.01, 5.0), st.floats(0.0, 0.49))
def test_dpo_loss_matches_formula_on_random_pairs(rows, beta, eps):
    cols = [torch.tensor([r[i] for r in rows], dtype=torch.float64) for i in range(4)]
    loss, _ = dpo_loss(*cols, beta=beta, label_smoothing=eps)
    expect = 0.0
    for pc, pr, rc, rr in rows:
        z = beta * ((pc - rc) - (pr - rr))
        # log sigmoid(z) = -log(1 + exp(-z)), written stably
        ls = lambda v: -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))  # noqa: E731
        expect += -(1 - eps) * ls(z) - eps * ls(-z)
    assert loss.item() == pytest.approx(expect / len(rows), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. log-probabilities of the response tokens only


def test_token_logprobs_match_direct_loop_and_ignore_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, :2] = -100
    targets[2, 3:] = -100
    out = token_logprobs(logits, targets)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert torch.allclose(out.double(), direct_token_logprobs(logits, targets), atol=1e-5)
    assert (out[targets == -100] == 0).all()
    # whatever the logits at a masked position hold (even inf / nan), nothing changes
    wild = logits.clone()
    wild[0, 0] = float("nan")
    wild[2, 4] = 1e30
    wild[0, 1] = float("inf")
    assert torch.equal(token_logprobs(wild, targets), out)
    # bfloat16 logits are taken in float32
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


def test_sequence_logprobs_sum_the_response_only_and_ignore_right_padding():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 20, (3, 9), generator=g)
    targets = torch.cat([ids[:, 1:], torch.randint(3, 20, (3, 1), generator=g)], dim=1)
    targets[:, :3] = -100  # the prompt
    targets[1, :5] = -100  # a longer prompt
    targets[2, 7:] = -100  # padding after a shorter response
    ids[2, 8:] = 0
    with torch.no_grad():
        got = sequence_logprobs(model, ids, targets)
        logits = model(ids)[0]
    expect = direct_token_logprobs(logits, targets).sum(dim=1)
    assert got.shape == (3,) and torch.allclose(got.double(), expect, atol=1e-5)
    # the targets are what selects: masking one more response token changes the sum
    t2 = targets.clone()
    t2[0, 3] = -100
    with torch.no_grad():
        assert not torch.allclose(sequence_logprobs(model, ids, t2), got)
    # right padding (ids: anything, targets: -100) after the sequences leaves their log-probabilities
    pad_ids = torch.cat([ids, torch.full((3, 6), 7)], dim=1)
    pad_targets = torch.cat([targets, torch.full((3, 6), -100)], dim=1)
    with torch.no_grad():
        padded = sequence_logprobs(model, pad_ids, pad_targets)
    assert torch.allclose(padded, got, atol=1e-5)
    # a prompt token changes the response's probability (it is read), while it is never scored itself
    ids3 = ids.clone()
    ids3[0, 0] = 3 if ids[0, 0] != 3 else 4
    with torch.no_grad():
        changed = sequence_logprobs(model, ids3, targets)
    assert not torch.allclose(changed[0], got[0]) and torch.allclose(changed[1:], got[1:], atol=1e-6)


def test_sequences_layout_gives_the_completion_logprob_given_the_prompt():
    """rl.sequences + token_logprobs == sum over completion tokens of log p(token | everything before),
    each computed by its own forward pass over the prefix."""
    model = tiny_gpt(seed=3)
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12], [13], [14, 15, 16, 17], [18, 19]]  # group 2
    ids, targets = rl.sequences(prompts, completions, 2, pad=0)
    assert ids.shape == targets.shape == (4, 5)
    assert targets[0].tolist() == [-100, -100, 10, 11, 12]
    assert ids[3].tolist()[:3] == [8, 9, 18] and targets[3].tolist() == [-100, 18, 19, -100, -100]
    with torch.no_grad():
        got = token_logprobs(model(ids)[0], targets).sum(dim=1)
        for k, c in enumerate(completions):
            seq, total = list(prompts[k // 2]), 0.0
            for tok in c:
                total += torch.log_softmax(model(torch.tensor([seq]))[0][0, -1].double(), -1)[tok].item()
                seq.append(tok)
            assert got[k].item() == pytest.approx(total, abs=1e-5), k


# ---------------------------------------------------------------------------------------------
# 3. the reference policy: LoRA's adapters off, or a frozen copy


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)


def ids_and_targets(seed=2, vocab=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    targets = torch.randint(0, vocab, (2, 8), generator=g)
    targets[:, :3] = -100
    return ids, targets


def test_lora_reference_equals_a_frozen_copy_and_turns_adapters_back_on():
    model = tiny_gpt(n_layer=2)
    frozen = copy.deepcopy(model)
    apply_lora(model, rank=2, alpha=4.0)
    randomize_adapters(model)
    ids, targets = ids_and_targets()
    with torch.no_grad():
        base = direct_token_logprobs(frozen(ids)[0], targets)
        before = model(ids)[0].clone()
    adapted = direct_token_logprobs(before, targets)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do change the model
    ref = rl.Reference(model, lora=True)
    got = ref(ids, targets)
    assert torch.allclose(got.double(), base, atol=1e-6)
    with torch.no_grad():
        after = model(ids)[0]
    assert torch.equal(after, before)  # adapters on again
    scalings = {m.scaling for m in model.modules() if isinstance(m, LoRALinear)}
    assert scalings == {2.0}


def test_adapters_off_restores_scaling_after_an_exception():
    model = tiny_gpt()
    apply_lora(model, rank=2, alpha=6.0)
    with pytest.raises(RuntimeError):
        with adapters_off(model):
            assert {m.scaling for m in model.modules() if isinstance(m, LoRALinear)} == {0.0}
            raise RuntimeError("boom")
    assert {m.scaling for m in model.modules() if isinstance(m, LoRALinear)} == {3.0}


def test_full_reference_keeps_the_starting_weights():
    model = tiny_gpt(n_layer=2)
    start = copy.deepcopy(model)
    ref = rl.Reference(model, lora=False)
    ids, targets = ids_and_targets(seed=4)
    with torch.no_grad():
        expect = direct_token_logprobs(start(ids)[0], targets)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        moved = direct_token_logprobs(model(ids)[0], targets)
    assert (moved - expect).abs().max() > 1e-3
    assert torch.allclose(ref(ids, targets).double(), expect, atol=1e-6)
    assert all(not p.requires_grad for p in ref.model.parameters())


# ---------------------------------------------------------------------------------------------
# 4. group advantages


def reference_advantages(rewards, group, eps=1e-4):
    out = []
    for i in range(0, len(rewards), group):
        r = rewards[i:i + group]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        out += [(x - mean) / (std + eps) for x in r]
    return out


@pytest.mark.parametrize("rewards,group", [
    ([1, 2, 3, 4, 0, 0, 0, 0], 4),
    ([0.9, 0.1, 0.5, 0.5, 0.2, 0.7], 2),
    ([0.3, 0.9, 0.1, -2.0, 5.0, 0.0], 3),
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 6),
])
def test_group_advantages_match_reference(rewards, group):
    got = group_advantages(torch.tensor(rewards, dtype=torch.float32), group)
    assert got.tolist() == pytest.approx(reference_advantages(rewards, group), rel=1e-5, abs=1e-6)
    if rewards[:8] == [1, 2, 3, 4, 0, 0, 0, 0]:
        assert got[4:].tolist() == [0.0] * 4
        s = math.sqrt(5 / 3)
        assert got[:4].tolist() == pytest.approx([(x - 2.5) / (s + 1e-4) for x in (1, 2, 3, 4)], rel=1e-6)


def test_group_advantages_refuse_incomplete_groups():
    with pytest.raises(ValueError, match="do not make groups of 4"):
        group_advantages(torch.zeros(6), 4)


# ---------------------------------------------------------------------------------------------
# 5. the clipped policy loss with the k3 KL penalty


LOGP = [[-1.0, -0.5, -2.0], [-0.7, -3.0, -0.1]]
OLD = [[-1.2, -0.5, -1.5], [-0.7, -2.0, -0.5]]
REF = [[-0.9, -0.8, -2.5], [-1.0, -2.5, -0.1]]
ADV = [1.5, -0.8]
MASK = [[0, 1, 1], [1, 1, 0]]


def reference_policy_loss(logp, old, ref, adv, mask, clip, kl_coef):
    total = kl_sum = clipped = n = 0.0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            q = ref[b][t] - logp[b][t]
            kl = math.exp(q) - q - 1
            total += -surrogate + kl_coef * kl
            kl_sum += kl
            clipped += abs(ratio - 1) > clip
            n += 1
    return total / n, kl_sum / n, clipped / n


@pytest.mark.parametrize("clip,kl_coef", [(0.2, 0.0), (0.2, 0.1), (0.05, 0.5), (10.0, 0.04)])
def test_policy_loss_matches_reference(clip, kl_coef):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    loss, stats = policy_loss(t(LOGP), t(OLD), t(REF), t(ADV), t(MASK).bool(), clip, kl_coef)
    expect, kl, clipped = reference_policy_loss(LOGP, OLD, REF, ADV, MASK, clip, kl_coef)
    assert loss.item() == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5, abs=1e-6)
    assert stats["clipped"].item() == pytest.approx(clipped, abs=1e-6)
    assert kl > 0 and (clip < 1) == (clipped > 0)


def test_policy_loss_gradient_on_policy_is_minus_advantage_over_tokens():
    """ratio 1 (logp == old) and no KL: d loss / d logp = -A / n at each response token, 0 elsewhere."""
    logp = torch.tensor(OLD, requires_grad=True)
    t = torch.tensor
    loss, stats = policy_loss(logp, t(OLD), t(REF), t(ADV), t(MASK), 0.2, 0.0)
    loss.backward()
    n = sum(map(sum, MASK))
    expect = [[-ADV[b] / n * MASK[b][t] for t in range(3)] for b in range(2)]
    assert logp.grad.tolist() == [pytest.approx(r, abs=1e-7) for r in expect]
    assert loss.item() == pytest.approx(-sum(ADV[b] * MASK[b][t] for b in range(2) for t in range(3)) / n)
    assert stats["clipped"].item() == 0


def test_policy_loss_clipped_tokens_give_no_gradient():
    # A > 0 and ratio above 1 + clip: the clipped term is the minimum, flat in logp
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2), logp.detach().clone(), torch.tensor([1.0]),
                              torch.ones(1, 2), 0.2, 0.0)
    loss.backward()
    assert logp.grad[0, 0].item() == 0 and logp.grad[0, 1].item() == pytest.approx(-0.5)
    assert stats["clipped"].item() == pytest.approx(0.5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.5), st.floats(0.0, 1.0))
def test_policy_loss_matches_reference_on_random_tensors(seed, clip, kl_coef):
    g = torch.Generator().manual_seed(seed)
    logp, old, ref = (-torch.rand(3, 4, generator=g) * 3 for _ in range(3))
    adv = torch.randn(3, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    mask[0, 0] = True
    loss, stats = policy_loss(logp, old, ref, adv, mask, clip, kl_coef)
    expect, kl, clipped = reference_policy_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                                mask.int().tolist(), clip, kl_coef)
    assert loss.item() == pytest.approx(expect, rel=1e-4, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert stats["clipped"].item() == pytest.approx(clipped, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 6. a constant reward teaches nothing


def test_constant_reward_gives_zero_policy_gradient():
    model = tiny_gpt(n_layer=2).train()
    ids, targets = ids_and_targets(seed=5)
    ids, targets = ids.repeat(2, 1), targets.repeat(2, 1)  # 4 completions, 2 groups of 2
    adv = group_advantages(torch.full((4,), 0.7), 2)
    assert adv.tolist() == [0.0] * 4
    logp = token_logprobs(model(ids)[0], targets)
    old = (logp.detach() + 0.1)  # off-policy too: ratio != 1
    loss, _ = policy_loss(logp, old, logp.detach() - 0.3, adv, targets != -100, 0.2, 0.0)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is None or (gr == 0).all() for gr in grads)
    # while a reward that differs within a group does move the weights (the test can fail)
    model.zero_grad(set_to_none=True)
    logp = token_logprobs(model(ids)[0], targets)
    adv = group_advantages(torch.tensor([0.1, 0.9, 0.4, 0.2]), 2)
    policy_loss(logp, logp.detach(), logp.detach(), adv, targets != -100, 0.2, 0.0)[0].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 7. sampling: the KV cache, and the same tokens as full forward passes


def reference_sample(model, prompts, group, max_new, temperature, seed):
    """Full forward passes over the whole sequence at every step (no cache), prompts of one length
    together in ascending length order, each repeated `group` times."""
    g = torch.Generator().manual_seed(seed)
    out = [None] * (len(prompts) * group)
    for length in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        x = torch.tensor([prompts[i] for i in idx for _ in range(group)])
        with torch.no_grad():
            for _ in range(max_new):
                logits = model(x)[0]
                nxt = torch.multinomial(torch.softmax(logits[:, -1].float() / temperature, -1), 1, generator=g)
                x = torch.cat([x, nxt], dim=1)
        for k, row in enumerate(x[:, length:].tolist()):
            out[idx[k // group] * group + k % group] = row
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_uses_the_kv_cache_and_matches_full_forward_sampling(temperature):
    model = tiny_gpt(seed=7, n_layer=2)
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15], [16, 17, 18]]
    group, max_new, seed = 3, 8, 11
    calls = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["idx"]
        calls.append((x.shape[0], x.shape[1], kwargs.get("kv_cache") is not None))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = rl.sample(model, prompts, group, max_new, temperature=temperature,
                        generator=torch.Generator().manual_seed(seed), stop=None)
    finally:
        handle.remove()
    expect = reference_sample(model, prompts, group, max_new, temperature, seed)
    assert got == expect
    assert len(got) == 12 and all(len(c) == max_new for c in got)
    # completions of the same prompt differ (sampling, not greedy)
    assert len({tuple(c) for c in got[:group]}) > 1
    # two length groups, shortest first: a prompt pass over 6 rows, then one token at a time with the cache
    starts = [i for i, (_, t, _) in enumerate(calls) if t > 1]
    assert [calls[i][:2] for i in starts] == [(6, 3), (6, 5)]
    assert all(cache for _, _, cache in calls)
    for a, b in zip(starts, starts[1:] + [len(calls)]):
        steps = calls[a + 1:b]
        assert len(steps) >= max_new - 1 and all(t == 1 and n == 6 for n, t, _ in steps)


def test_cut_and_stop_token():
    assert rl.cut([5, 3, 7, 3, 9], 3) == [5, 3]
    assert rl.cut([5, 7, 9], 3) == [5, 7, 9]
    assert rl.cut([3], 3) == [3]
    assert rl.cut([5, 3, 7], None) == [5, 3, 7]
    assert rl.cut([], 3) == []
    with_nl = CharTokenizer.train("ab\n")
    assert rl.stop_token(with_nl) == with_nl.encode("\n")[0]
    without = CharTokenizer.train("ab")  # a newline is spelled in bytes here (one byte: still one token)
    nl = without.encode("\n")
    assert rl.stop_token(without) == (nl[0] if len(nl) == 1 else without.eos_id)


def test_sample_cuts_completions_after_the_stop_token():
    model = tiny_gpt(seed=8)
    prompts = [[3, 4, 5], [6, 7, 8]]  # one length: the generator's draws line up row for row
    raw = rl.sample(model, prompts, 4, 10, generator=torch.Generator().manual_seed(3), stop=None)
    counts = {}
    for c in raw:
        for tok in set(c[1:-1]):
            counts[tok] = counts.get(tok, 0) + 1
    stop = max(counts, key=counts.get)  # a token that shows up inside several completions
    got = rl.sample(model, prompts, 4, 10, generator=torch.Generator().manual_seed(3), stop=stop)
    assert got == [rl.cut(c, stop) for c in raw]
    assert any(len(c) < 10 and c[-1] == stop for c in got)
    assert all(stop not in c[:-1] for c in got)


def test_read_prompts_keeps_the_last_tokens_and_starts_empty_prompts_from_stop(tmp_path):
    tok = CharTokenizer.train("abcdef \n")
    stop = rl.stop_token(tok)
    path = tmp_path / "p.txt"
    path.write_text("abc\n\nabcdef\r\n\n  \n")
    texts, ids = rl.read_prompts(str(path), tok, 4, stop)
    assert texts == ["abc", "", "abcdef"]
    assert ids == [tok.encode("abc"), [stop], tok.encode("cdef")]
    with pytest.raises(ValueError, match="no such prompts file"):
        rl.read_prompts(str(tmp_path / "nope.txt"), tok, 4, stop)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        rl.read_prompts(str(tmp_path / "blank.txt"), tok, 4, stop)


# ---------------------------------------------------------------------------------------------
# 8, 9. Tally and distinct-n


def test_tally_means_over_adds_and_pop_resets():
    t = Tally()
    t.add(a=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor(4.0))
    t.add(a=torch.tensor([[5.0]]))
    t.add(c=torch.tensor([1, 0, 0, 1], dtype=torch.bool))
    out = t.pop()
    assert out == pytest.approx({"a": 11 / 4, "b": 4.0, "c": 0.5})
    assert t.pop() == {}
    t.add(a=torch.tensor([10.0]))
    assert t.pop() == pytest.approx({"a": 10.0})
    t.add(a=torch.tensor([1.0]))
    t.clear()
    assert t.pop() == {}


def test_distinct_n_against_hand_count():
    texts = [["a", "b", "a", "b"], ["a", "b", "c"], ["x"]]
    # bigrams: ab ba ab | ab bc | (none) -> distinct {ab, ba, bc} = 3 of 5
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # unigrams: a b a b a b c x -> {a, b, c, x} = 4 of 8
    assert distinct_n(texts, 1) == pytest.approx(4 / 8)
    # trigrams: aba bab | abc -> 3 of 3
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n([["a"], []], 2) == 0.0 and distinct_n([], 2) == 0.0
    assert distinct_n([["the", "the", "the"]], 2) == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------
# 10. finetune.py --task dpo / --task rl end to end


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    from minillm import BERT
    from minillm.checkpoint import save_checkpoint
    from minillm.hf_import import save_hf

    torch.manual_seed(0)
    bert = d / "bert"
    save_hf(BERT(preset("bert-tiny", n_layer=1, n_head=2, n_embd=32, n_inner=64, block_size=64,
                        vocab_size=len(VOCAB), dropout=0.0, attn_dropout=0.0)), str(bert))
    (bert / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = CharTokenizer.train("".join(VOCAB) + " abcdefghijklmnopqrstuvwxyz?!:\n")
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)
    gpt = d / "gpt"
    save_checkpoint(str(gpt), GPT(cfg), cfg, tok)
    # the reward model: the tiny BERT finetuned a few steps as a sentiment classifier (labels neg, pos)
    clf = d / "clf"
    run(["--init", bert, "--train", write_tsv(d / "clf.tsv", sentences(32, 0)), "--max-steps", "8", "--lr", "1e-3",
         "--out", clf, *QUICK])
    pairs = d / "pairs.jsonl"
    rows = [{"prompt": f"review: {s}\nsentiment:", "chosen": " good", "rejected": " bad"} for s, _ in sentences(12, 1)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = d / "prompts.txt"
    prompts.write_text("the movie was\nit\n\na plot\nthe film\nwas it\n")
    eval_prompts = d / "eval_prompts.txt"
    eval_prompts.write_text("the movie\nit was\n")
    return {"bert": str(bert), "gpt": str(gpt), "clf": str(clf), "pairs": str(pairs), "prompts": str(prompts),
            "eval_prompts": str(eval_prompts), "dir": d}


def test_reward_model_probabilities_log_odds_and_hits(pref_data):
    texts = ["good good film", "bad awful plot", "the movie"]
    pos = rl.RewardModel(pref_data["clf"])
    assert pos.label == "pos" and pos.labels == ["neg", "pos"]
    p = pos.probabilities(texts)
    assert p.shape == (3, 2) and torch.allclose(p.sum(dim=1), torch.ones(3), atol=1e-5)
    r, hits = pos([t[:4] for t in texts], [t[4:] for t in texts])  # the reward reads prompt + completion
    assert torch.allclose(r, p[:, 1].clamp(1e-6, 1 - 1e-6)) and hits.tolist() == (p[:, 1] > p[:, 0]).tolist()
    odds, _ = rl.RewardModel(pref_data["clf"], kind="logodds")([""] * 3, texts)
    assert torch.allclose(odds, torch.log(r / (1 - r)), atol=1e-4)
    neg, neg_hits = rl.RewardModel(pref_data["clf"], label="neg")(texts, [""] * 3)
    assert torch.allclose(neg, 1 - r, atol=1e-5) and (neg_hits ^ hits).all()
    with pytest.raises(ValueError, match="--reward-label maybe"):
        rl.RewardModel(pref_data["clf"], label="maybe")
    with pytest.raises(ValueError, match="--reward-kind"):
        rl.RewardModel(pref_data["clf"], kind="rank")
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        rl.RewardModel(str(pref_data["dir"] / "nothing"))


def test_dpo_end_to_end_logs_reward_stats_and_starts_at_log2(tmp_path, pref_data):
    out = tmp_path / "dpo"
    run(["--init", pref_data["gpt"], "--task", "dpo", "--train", pref_data["pairs"], "--eval", pref_data["pairs"],
         "--max-steps", "6", "--lr", "3e-3", "--dpo-beta", "0.5", "--out", out, *QUICK, "--batch-size", "4"])
    rows = [r for r in metric_rows(out) if "train_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all("train_reward_accuracy" in r and "train_reward_margin" in r and "train_reward_chosen" in r
               for r in rows)
    # step 1: the policy is the reference, so the loss is log 2 and the margin 0
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(rows[0]["train_reward_margin"]) < 1e-4
    s = summary(out)
    for key in ("eval_reward_accuracy", "eval_reward_margin", "eval_loss", "eval_reward_chosen"):
        assert key in s, key
    assert s["steps"] == 6 and s["task"] == "dpo"
    # every pair prefers " good" to " bad": after a few steps the held-in pairs agree
    assert s["eval_reward_margin"] > 0 and s["eval_reward_accuracy"] == 1.0
    assert s["eval_loss"] < math.log(2)
    cfg = json.load(open(out / "checkpoint" / "config.json"))
    assert cfg["finetune"]["dpo_beta"] == 0.5 and cfg["finetune"]["task"] == "dpo"


def test_dpo_ipo_and_lora_run(tmp_path, pref_data):
    out = tmp_path / "ipo"
    run(["--init", pref_data["gpt"], "--task", "dpo", "--train", pref_data["pairs"], "--eval", pref_data["pairs"],
         "--dpo-variant", "ipo", "--method", "lora", "--lora-rank", "2", "--max-steps", "2", "--out", out, *QUICK,
         "--batch-size", "4"])
    rows = [r for r in metric_rows(out) if "train_loss" in r]
    beta = 0.1  # the default: IPO at the reference is (0 - 1 / (2 beta))^2 = 25
    assert rows[0]["train_loss"] == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-4)
    assert "eval_reward_accuracy" in summary(out)


RL = ["--group-size", "4", "--max-new-tokens", "6", "--batch-size", "2", "--no-progress", "--dtype", "float32",
      "--log-interval", "1", "--warmup-steps", "1", "--lr", "1e-3"]


def rl_args(pref_data, out, *extra):
    return ["--init", pref_data["gpt"], "--task", "rl", "--prompts", pref_data["prompts"], "--eval",
            pref_data["eval_prompts"], "--reward", pref_data["clf"], "--out", out, *RL, *extra]


def test_rl_end_to_end_logs_rewards_and_evaluates(tmp_path, pref_data):
    out = tmp_path / "rl"
    run(rl_args(pref_data, out, "--max-steps", "3"))
    s = summary(out)
    for key in ("eval_positive", "eval_kl", "eval_distinct2", "eval_reward", "eval_ref_ppl", "eval_length"):
        assert key in s, key
    assert s["steps"] == 3 and s["reward_label"] == "pos"
    assert 0 <= s["eval_positive"] <= 1 and 0 <= s["eval_reward"] <= 1 and 0 <= s["eval_distinct2"] <= 1
    assert 1 <= s["eval_length"] <= 6 and s["eval_ref_ppl"] > 1
    rows = [r for r in metric_rows(out) if "train_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("train_reward", "train_kl", "train_entropy", "train_positive", "train_length", "train_clipped"):
            assert key in r, (key, r)
        assert 0 <= r["train_reward"] <= 1 and r["train_kl"] >= 0 and r["train_entropy"] > 0
        assert 1 <= r["train_length"] <= 6
    # step 1 is on the policy that sampled and on the reference: no KL, nothing clipped
    assert rows[0]["train_kl"] == pytest.approx(0, abs=1e-6) and rows[0]["train_clipped"] == 0


@pytest.mark.parametrize("method,updates", [("full", 1), ("lora", 1), ("full", 2)])
def test_rl_resume_continues_exactly(tmp_path, pref_data, method, updates):
    """Stopped at step 2, a rollout boundary (2 updates a rollout: the second rollout starts at step 3),
    and resumed: the same rollouts, losses and final weights as the run that never stopped."""
    from safetensors.torch import load_file

    common = ["--max-steps", "4", "--rl-updates", str(updates), "--method", method]
    run(rl_args(pref_data, tmp_path / "a", *common))
    run(rl_args(pref_data, tmp_path / "b", *common, "--stop-at-step", "2"))
    run(rl_args(pref_data, tmp_path / "b", *common, "--resume"))
    def rows(out):
        return {r["step"]: (r["train_loss"], r.get("train_reward"), r["train_kl"]) for r in metric_rows(out)
                if "train_loss" in r}

    la, lb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert sorted(la) == [1, 2, 3, 4] and la == lb
    # a rollout is sampled (and its rewards logged) every `updates` steps
    assert [s for s in la if la[s][1] is not None] == [1, 2, 3, 4][::updates]
    wa = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary(tmp_path / "a")["eval_reward"] == summary(tmp_path / "b")["eval_reward"]


def test_rollouts_serve_each_rollout_updates_times_and_resume_at_its_start():
    """Rollouts: `updates` optimizer steps on each sampled rollout; state() mid-rollout is the rollout's
    start, so a resumed run samples the same prompts with the same generator again."""
    tok = CharTokenizer.train("abcdefgh \n")
    model = tiny_gpt(seed=9, vocab=tok.vocab_size, block=32)

    def reward(heads, bodies):  # the share of 'a' in the text: a deterministic stand-in for a classifier
        texts = [h + b for h, b in zip(heads, bodies)]
        r = torch.tensor([t.count("a") / max(len(t), 1) for t in texts])
        return r, r > 0.2

    prompts = [tok.encode(w) for w in ("ab", "cd", "efg", "h", "abc", "dd")]

    def make():
        return rl.Rollouts(model, prompts, reward, tok, Tally(), group=3, prompts_per_step=2, max_new=5,
                           temperature=1.0, top_k=None, updates=2, micro=1, seed=4, device=torch.device("cpu"))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))

    r = make()
    first = r.next()
    ids, targets, adv, memo, counted = first
    assert ids.shape[0] == 6 and adv.shape == (6,) and memo == {} and torch.equal(counted, targets)
    assert torch.allclose(adv.view(2, 3).mean(dim=1), torch.zeros(2), atol=1e-5)
    mid = r.state()
    assert r.next() is first  # the second update of the rollout: the same batch (and memo)
    boundary = r.state()
    third = r.next()
    assert not same(third, first)
    resumed = make()
    resumed.load_state(mid)
    assert same(resumed.next(), first)
    resumed = make()
    resumed.load_state(boundary)
    assert same(resumed.next(), third)


# ---------------------------------------------------------------------------------------------
# 11. bad input: one clear ValueError


@pytest.mark.parametrize("case", ["rl-no-reward", "dpo-bert", "group-size-1", "beta-0", "no-prompts-file",
                                  "reward-is-lm", "smoothing-half"])
def test_bad_input_messages(tmp_path, pref_data, case):
    d = pref_data
    rl_common = ["--init", d["gpt"], "--task", "rl", "--prompts", d["prompts"], "--reward", d["clf"],
                 "--out", tmp_path / "o", "--max-steps", "1", *QUICK]
    dpo_common = ["--init", d["gpt"], "--task", "dpo", "--train", d["pairs"], "--out", tmp_path / "o",
                  "--max-steps", "1", *QUICK]
    if case == "rl-no-reward":
        args = [a for a in rl_common if a not in ("--reward", d["clf"])]
        words = ["--task rl needs --prompts and --reward"]
    elif case == "dpo-bert":
        args = [d["bert"] if a == d["gpt"] else a for a in dpo_common]
        words = ["--task dpo needs a GPT"]
    elif case == "group-size-1":
        args = rl_common + ["--group-size", "1"]
        words = ["--group-size must be >= 2"]
    elif case == "beta-0":
        args = dpo_common + ["--dpo-beta", "0"]
        words = ["--dpo-beta must be positive", "got 0"]
    elif case == "smoothing-half":
        args = dpo_common + ["--dpo-label-smoothing", "0.5"]
        words = ["--dpo-label-smoothing must be in [0, 0.5)"]
    elif case == "no-prompts-file":
        args = [str(tmp_path / "missing.txt") if a == d["prompts"] else a for a in rl_common]
        words = ["missing.txt", "no such prompts file"]
    else:
        args = [d["gpt"] if a == d["clf"] else a for a in rl_common]
        words = ["--reward", "holds no sequence classifier"]
    expect_value_error(args, words)


# ---------------------------------------------------------------------------------------------
# a reward written in Python: --reward FILE.py:NAME

REWARD_FILE = r'''
import re

def exact(prompts, completions):
    return [1.0 if c.strip() == "good" else 0.0 for c in completions]

def has_good(prompts, completions):
    return [float(bool(re.search(r"\bgood\b", c))) - 0.5 for c in completions]

def short(prompts, completions):
    return [1.0]

def broken(prompts, completions):
    return [float("nan")] * len(completions)
'''


def test_function_reward_scores_exact_and_regex_matches(tmp_path):
    f = tmp_path / "rewards.py"
    f.write_text(REWARD_FILE)
    exact = rl.load_reward(f"{f}:exact")
    r, hits = exact(["p", "p", "p"], [" good", "good film", "bad"])
    assert r.tolist() == [1.0, 0.0, 0.0] and hits.tolist() == [True, False, False]
    r, hits = rl.load_reward(f"{f}:has_good")(["", ""], ["a good film", "goodness"])
    assert r.tolist() == [0.5, -0.5] and hits.tolist() == [True, False]
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        rl.load_reward(f"{f}:short")(["", ""], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        rl.load_reward(f"{f}:broken")([""], ["a"])
    with pytest.raises(ValueError, match="defines no function 'missing'"):
        rl.load_reward(f"{f}:missing")
    with pytest.raises(ValueError, match="no such Python file"):
        rl.load_reward(f"{tmp_path / 'none.py'}:exact")
    with pytest.raises(ValueError, match="--reward-label"):
        rl.load_reward(f"{f}:exact", label="pos")
    bad = tmp_path / "bad.py"
    bad.write_text("import nothing_of_that_name\n")
    with pytest.raises(ValueError, match="failed to load: ModuleNotFoundError"):
        rl.load_reward(f"{bad}:exact")


def test_rl_with_a_python_reward_runs_end_to_end(tmp_path, pref_data):
    f = tmp_path / "rewards.py"
    f.write_text(REWARD_FILE)
    out = tmp_path / "rl"
    run(["--init", pref_data["gpt"], "--task", "rl", "--prompts", pref_data["prompts"], "--eval", pref_data["eval_prompts"],
         "--reward", f"{f}:has_good", "--out", out, "--max-steps", "2", *RL])
    s = summary(out)
    assert s["reward_label"] == "reward > 0" and s["steps"] == 2
    # an untrained char-level GPT hardly ever writes the word: most rewards are the regex's -0.5
    assert -0.5 <= s["eval_reward"] <= 0.5 and 0 <= s["eval_positive"] <= 1
    rows = [r for r in metric_rows(out) if "train_reward" in r]
    assert len(rows) == 2 and all(-0.5 <= r["train_reward"] <= 0.5 for r in rows)


def test_reward_model_reads_a_hugging_face_classifier(tmp_path, pref_data):
    """The same classifier exported as a Hugging Face directory (labels in config.json's id2label,
    vocab.txt beside it) gives the same rewards as its finetune.py checkpoint."""
    from minillm.classification_data import LabelMap
    from minillm.pretrained import load_finetuned

    model, tok, cfg = load_finetuned(pref_data["clf"])
    hf = tmp_path / "hf"
    finetune.export_hf(model, str(hf), LabelMap(cfg["labels"]), tok, {"source": "minillm"})
    texts = ["good good film", "bad awful plot", "the movie"]
    ours, theirs = rl.RewardModel(pref_data["clf"]), rl.RewardModel(str(hf))
    assert theirs.labels == ["neg", "pos"] and theirs.label == "pos"
    assert torch.allclose(ours.probabilities(texts), theirs.probabilities(texts), atol=1e-5)


def test_group_advantages_without_scaling_are_rewards_minus_the_group_mean():
    rewards = torch.tensor([0.9, 0.95, 1.0, 0.2, 0.6, 0.7])
    expected = [0.9 - 0.95, 0.0, 1.0 - 0.95, 0.2 - 0.5, 0.6 - 0.5, 0.7 - 0.5]
    assert group_advantages(rewards, 3, scale=False).tolist() == pytest.approx(expected, abs=1e-6)
    # scaled, the nearly-equal first group pushes about as hard as the second; unscaled, a sixth as hard
    scaled = group_advantages(rewards, 3)
    assert scaled[:3].abs().max().item() == pytest.approx(scaled[3:].abs().max().item(), rel=0.2)


def response_logp(model, tok, row, kind):
    """(log p(response | prompt), response tokens) of a pairs row, one token at a time, in float64."""
    model.eval()
    p, r = tok.encode(row["prompt"]), tok.encode(row[kind]) + [tok.eos_id]
    logits = model(torch.tensor([p + r]))[0][0].double()
    return sum(torch.log_softmax(logits[len(p) - 1 + i], -1)[t].item() for i, t in enumerate(r)), len(r)


def test_dpo_reference_flag_supplies_the_reference_log_probs(tmp_path, pref_data):
    """--reference: DPO's reference is another checkpoint. One step over all 12 pairs at a vanishing
    lr: the first loss is the DPO formula with the policy's and that reference's sequence
    log-probabilities, computed here directly."""
    from minillm.checkpoint import save_checkpoint
    from minillm.pretrained import load_pretrained

    policy, tok, _ = load_pretrained(pref_data["gpt"])
    torch.manual_seed(5)
    other = GPT(policy.config)
    save_checkpoint(str(tmp_path / "ref"), other, policy.config, tok)
    out = tmp_path / "dpo"
    run(["--init", pref_data["gpt"], "--task", "dpo", "--train", pref_data["pairs"], "--reference", tmp_path / "ref",
         "--out", out, *QUICK, "--max-steps", "1", "--lr", "1e-12", "--batch-size", "12", "--dpo-beta", "0.5"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "train_loss" in line]
    losses = []
    for line in open(pref_data["pairs"]):
        row = json.loads(line)
        lp = {(name, kind): response_logp(model, tok, row, kind)[0] for name, model in (("pi", policy), ("ref", other))
              for kind in ("chosen", "rejected")}
        h = (lp["pi", "chosen"] - lp["ref", "chosen"]) - (lp["pi", "rejected"] - lp["ref", "rejected"])
        losses.append(-math.log(1 / (1 + math.exp(-0.5 * h))))
    assert rows[0]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert abs(rows[0]["train_loss"] - math.log(2)) > 1e-3  # not the policy as its own reference
    with pytest.raises(ValueError, match="--reference is the reference model of --task dpo"):
        run(["--init", pref_data["gpt"], "--task", "lm", "--train", pref_data["pairs"], "--reference", tmp_path / "ref",
             "--out", tmp_path / "x", "--max-steps", "1", *QUICK])


def test_dpo_nll_adds_the_chosen_responses_nll_per_token(tmp_path, pref_data):
    """--dpo-nll 0.5 (RPO): at the start (policy = reference, DPO loss log 2) the first loss over all
    12 pairs is log 2 + 0.5 x the mean over pairs of the chosen response's NLL per token."""
    from minillm.pretrained import load_pretrained

    policy, tok, _ = load_pretrained(pref_data["gpt"])
    out = tmp_path / "rpo"
    run(["--init", pref_data["gpt"], "--task", "dpo", "--train", pref_data["pairs"], "--out", out, *QUICK,
         "--max-steps", "1", "--lr", "1e-12", "--batch-size", "12", "--dpo-nll", "0.5"])
    row = [json.loads(line) for line in open(out / "metrics.jsonl") if "train_loss" in line][0]
    nll = [-lp / n for lp, n in (response_logp(policy, tok, json.loads(line), "chosen") for line in open(pref_data["pairs"]))]
    assert row["train_chosen_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert row["train_loss"] == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), rel=1e-4)


def test_preference_demo_runs_its_loop_on_tiny_data(tmp_path, pref_data):
    """minillm.benchmarks.preference_demo end to end at tiny budgets: writer, pairs, two online DPO rounds
    (the second with the writer as --reference), RL, and the table of every model."""
    from minillm.benchmarks import preference_demo

    data = tmp_path / "sst2"
    data.mkdir()
    write_tsv(data / "train.tsv", sentences(80, 3))
    write_tsv(data / "dev.tsv", sentences(12, 4))
    out = tmp_path / "demo"
    assert preference_demo.main([
        "--data", str(data), "--out", str(out), "--reward", pref_data["clf"], "--reward-label", "pos",
        "--min-words", "3", "--writer-budget", "2", "--budget", "40", "--pairs", "16", "--dpo-rounds", "2",
        "--eval-prompts", "4", "--max-new-tokens", "6", "--pair-margin", "0",
        "--dpo-flags", "--batch-size 4 --epochs 1 --dtype float32",
        "--rl-flags", "--batch-size 2 --group-size 2 --max-steps 2 --dtype float32"]) == 0
    result = json.load(open(out / "results.json"))
    assert [r["model"] for r in result["rows"]] == ["writer", "dpo", "rl"]
    assert len(result["dpo"]["rounds"]) == 2 and result["dpo"]["seconds"] <= 40
    for r in result["rows"]:
        assert 0 <= r["positive"] <= 1 and 0 <= r["distinct2"] <= 1 and r["ref_ppl"] > 1
    assert result["rows"][0]["kl"] == 0  # the writer against itself
    config = json.load(open(out / "dpo" / "round2" / "checkpoint" / "config.json"))
    assert config["finetune"]["reference"] == os.path.abspath(out / "writer")
    assert "| writer |" in (out / "results.md").read_text()
