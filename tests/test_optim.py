"""minillm/optim.py against independent references: torch.optim.AdamW, SGD and Muon set up by
hand, the SGD formula written out, the SVD for Newton-Schulz; which weights go to which part on
real GPTs and BERTs; the checkpoint round trip; and short training runs that must lower the loss."""
import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from minillm.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from minillm.config import ModelConfig
from minillm.lora import apply_lora
from minillm.model import build_model
from minillm.optim import (
    NS_COEFFICIENTS, OPTIMIZERS, SHARDED_MUON, Muon, build_optimizer, describe_optimizer, newton_schulz,
)

HAS_TORCH_MUON = hasattr(torch.optim, "Muon")  # torch >= 2.9; pyproject allows torch >= 2.4
needs_torch_muon = pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon (the reference) needs torch >= 2.9")
VOCAB, BLOCK = 32, 16


def tiny(arch: str = "gpt", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                                   **overrides))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One random 16-token sequence, four times: (inputs, next-token targets)."""
    seq = torch.randint(0, VOCAB, (1, BLOCK + 1), generator=torch.Generator().manual_seed(seed)).repeat(4, 1)
    return seq[:, :-1], seq[:, 1:]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    """`steps` optimizer steps of the language-model loss on batches seeded seed, seed + 1, ..."""
    losses = []
    for i in range(steps):
        x, y = batch(seed + i)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def names_by_group(model: nn.Module, opt: torch.optim.Optimizer) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in opt.param_groups]


def matrices_with_grads(shapes, steps: int, seed: int = 0):
    """Initial weights and `steps` gradients for each shape, seeded."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    return init, grads


def run_on_matrices(make_optimizer, init, grads) -> list[torch.Tensor]:
    """Apply `grads` step by step to parameters starting at `init`; the final weights."""
    params = [nn.Parameter(t.clone()) for t in init]
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


# -- adamw -----------------------------------------------------------------------------------------


def test_adamw_is_torch_adamw_with_decay_on_matrices_only():
    model = tiny()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    params = list(reference.parameters())  # parameters() yields the tied embedding / LM head once
    by_hand = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert names_by_group(model, ours) == names_by_group(reference, by_hand)
    assert "lm_head.weight" not in set.union(*names_by_group(model, ours))  # tied to tok_emb.weight: once
    for g, h in zip(ours.param_groups, by_hand.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    train_steps(model, ours, 3)
    train_steps(reference, by_hand, 3)
    assert_same_weights(model, reference)


def test_adamw_refuses_momentum_and_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="beta1"):
        build_optimizer(tiny(), "adamw", momentum=0.9)
    with pytest.raises(ValueError, match="adamw, sgd, muon"):
        build_optimizer(tiny(), "lion")


# -- sgd -------------------------------------------------------------------------------------------


def test_sgd_is_torch_sgd_with_nesterov_momentum():
    model = tiny()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, "sgd", lr=0.05, weight_decay=0.01)
    params = list(reference.parameters())
    by_hand = torch.optim.SGD([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=0.05, momentum=0.9, nesterov=True)
    assert names_by_group(model, ours) == names_by_group(reference, by_hand)
    assert [g["momentum"] for g in ours.param_groups] == [0.9, 0.9]  # the default
    train_steps(model, ours, 3)
    train_steps(reference, by_hand, 3)
    assert_same_weights(model, reference)


def test_sgd_steps_follow_the_nesterov_formula():
    lr, wd, mu = 0.1, 0.01, 0.8
    layer = nn.Linear(4, 3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = build_optimizer(layer, "sgd", lr=lr, weight_decay=wd, momentum=mu)
    grads = [(torch.randn(3, 4), torch.randn(3)) for _ in range(2)]
    for gw, gb in grads:
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
    # L2 decay on the weight only: d = g + wd * w; buf = mu * buf + d (buf_1 = d_1); step = d + mu * buf
    (gw1, gb1), (gw2, gb2) = grads
    d1 = gw1 + wd * w0
    w1 = w0 - lr * (d1 + mu * d1)
    d2 = gw2 + wd * w1
    w2 = w1 - lr * (d2 + mu * (mu * d1 + d2))
    b1 = b0 - lr * (1 + mu) * gb1
    b2 = b1 - lr * (gb2 + mu * (mu * gb1 + gb2))
    torch.testing.assert_close(layer.weight.detach(), w2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach(), b2, rtol=1e-6, atol=1e-6)


# -- Newton-Schulz ---------------------------------------------------------------------------------


@settings(deadline=None, max_examples=8)
@given(rows=st.integers(2, 48), aspect=st.sampled_from([2, 3, 5]), tall=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_newton_schulz_orthogonalises_keeping_the_singular_vectors(rows, aspect, tall, seed, dtype):
    # Rectangular Gaussian matrices (aspect >= 2) have no tiny singular values: after 5 steps all
    # land near 1. (A singular value s/|G|_F below ~a^-5 = 0.002 is still on its way up; see below.)
    shape = (rows * aspect, rows) if tall else (rows, rows * aspect)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = newton_schulz(g, dtype=dtype).float()
    assert out.shape == g.shape and out.dtype == torch.float32
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    singular_values = torch.linalg.svdvals(out)
    assert 0.6 < singular_values.min() and singular_values.max() < 1.3
    # in g's own singular bases the output is diagonal: same singular vectors, new values
    in_g_bases = u.T @ out @ vh.T
    off_diagonal = in_g_bases - torch.diag(torch.diagonal(in_g_bases))
    assert off_diagonal.abs().max() < (1e-4 if dtype == torch.float32 else 0.05)
    polar = u @ vh  # the orthogonal factor, U V^T
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.95  # singular values spread over [0.68, 1.2]: >= 0.96 even with just two of them


def test_newton_schulz_applies_the_quintic_to_each_singular_value():
    # An exact spectrum, tiny values included: the output's singular values are the scalar
    # iteration s -> a s + b s^3 + c s^5, five times, from s / |G|_F.
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 12, generator=gen, dtype=torch.float64))
    spectrum = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 1e-3, 1e-4], dtype=torch.float64)
    g = (u * spectrum) @ v.T  # 12 x 20
    expected = spectrum / spectrum.norm()
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        expected = a * expected + b * expected**3 + c * expected**5
    got = (u.T @ newton_schulz(g.float()).double() @ v).diagonal()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected[:10].min() > 0.6 and expected.max() < 1.3  # the band, down to s/|G|_F ~ 0.002
    assert expected[-1] < 0.1  # a singular value 1e-4 of the largest has not yet arrived


def test_newton_schulz_of_zero_is_zero():
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))


# -- muon: the Muon part against torch.optim.Muon ---------------------------------------------------

MUON_SHAPES = [(16, 32), (32, 16), (24, 24), (8, 40)]


@needs_torch_muon
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjustment", ["match_rms_adamw", "original"])
def test_muon_matches_torch_muon(nesterov, adjustment):
    init, grads = matrices_with_grads(MUON_SHAPES, steps=5)
    settings_ = dict(lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_coefficients=NS_COEFFICIENTS,
                     eps=1e-7, ns_steps=5)
    reference = run_on_matrices(lambda ps: torch.optim.Muon(ps, adjust_lr_fn=adjustment, **settings_), init, grads)
    ours = {"lr_adjustment": adjustment, **{k: v for k, v in settings_.items() if k != "eps"}, "ns_eps": 1e-7}
    # torch.optim.Muon iterates in bfloat16 on every device: ours, told to, agrees bit for bit
    bf16 = run_on_matrices(lambda ps: Muon([{"params": ps, "muon": True}], ns_dtype=torch.bfloat16, **ours),
                           init, grads)
    for r, b in zip(reference, bf16):
        assert torch.equal(r, b)
    # Our CPU default, float32, differs by bfloat16's rounding of each update. The weights move by
    # up to ~0.02 over the 5 steps; the two runs end within 3e-4 of each other: tolerance 1e-3.
    f32 = run_on_matrices(lambda ps: Muon([{"params": ps, "muon": True}], **ours), init, grads)
    for r, f, start in zip(reference, f32, init):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-3)
        assert (r - start).abs().max() > 0.015  # a real move, not lost in the tolerance


def test_muon_step_written_out():
    # one step from zero momentum: B = (1 - mu) G; Nesterov U = (1 - mu) G + mu B; the update
    # direction is newton_schulz(U) = newton_schulz(G) (the scale divides out)
    lr, wd, shape = 0.02, 0.1, (8, 18)
    init, grads = matrices_with_grads([shape], steps=1)
    (got,) = run_on_matrices(lambda ps: Muon([{"params": ps, "muon": True}], lr=lr, weight_decay=wd), init, grads)
    expected = init[0] * (1 - lr * wd) - lr * 0.2 * math.sqrt(18) * newton_schulz(grads[0][0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- muon: the AdamW part against torch.optim.AdamW --------------------------------------------------


def test_muons_adamw_part_is_torch_adamw():
    shapes = [(10, 6), (6,), (1, 6), (4,)]  # an embedding-like matrix, gains, a 1-row matrix
    init, grads = matrices_with_grads(shapes, steps=6)
    settings_ = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]

    reference = run_on_matrices(lambda ps: torch.optim.AdamW(groups(ps), foreach=False, **settings_), init, grads)
    ours = run_on_matrices(lambda ps: Muon([{**g, "muon": False} for g in groups(ps)], **settings_), init, grads)
    for r, o in zip(reference, ours):
        assert torch.equal(r, o)


# -- muon: which weights go where -------------------------------------------------------------------


def split(model: nn.Module, opt: Muon) -> tuple[set[str], set[str]]:
    groups = names_by_group(model, opt)
    hidden = set.union(*(n for n, g in zip(groups, opt.param_groups) if g["muon"]))
    others = set.union(*(n for n, g in zip(groups, opt.param_groups) if not g["muon"]))
    return hidden, others


def test_muon_takes_the_block_matrices_of_a_gpt():
    model = tiny(activation="swiglu")
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    hidden, others = split(model, opt)
    matrices = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    assert hidden == {f"blocks.{i}.{m}.weight" for i in range(2) for m in matrices}
    trainable = {n for n, _ in model.named_parameters()}  # named_parameters() names the tied weight once
    assert hidden | others == trainable and not hidden & others
    assert {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "blocks.1.mlp.proj.bias"} <= others
    decayed = set.union(*(n for n, g in zip(names_by_group(model, opt), opt.param_groups) if g["weight_decay"]))
    assert decayed == hidden | {"tok_emb.weight", "pos_emb.weight"}  # never norms or biases
    assert [g["momentum"] for g in opt.param_groups] == [0.95] * 3
    assert re.fullmatch(r"Muon \(momentum 0\.95\) on 8 hidden matrices \(0\.\d\dM params\), "
                        r"AdamW on \d+ others \(0\.\d\dM\)", describe_optimizer(opt))


def test_muon_leaves_a_berts_classifier_to_adamw():
    model = tiny("bert", num_labels=3)
    hidden, others = split(model, build_optimizer(model, "muon"))
    assert {"classifier.weight", "classifier.bias", "pooler.weight"} <= others
    assert all(name.startswith("blocks.") for name in hidden) and len(hidden) == 8


def test_muon_takes_loras_adapters_not_its_frozen_weights():
    model = tiny()
    apply_lora(model, rank=4)  # freezes everything, then adds A and B to each block linear
    hidden, others = split(model, build_optimizer(model, "muon"))
    assert hidden == {n for n, _ in model.named_parameters() if ".lora_" in n} and len(hidden) == 16
    assert others == set()


def test_muon_refuses_what_it_cannot_orthogonalise():
    class Sharded(nn.Parameter):
        """Stands in for FSDP's DTensor, which holds a slice of the matrix (to_local)."""

        def to_local(self):
            return self

    model = tiny()
    model.blocks[0].attn.qkv.weight = Sharded(model.blocks[0].attn.qkv.weight.detach())
    with pytest.raises(ValueError, match=re.escape(SHARDED_MUON)):
        build_optimizer(model, "muon")
    with pytest.raises(ValueError, match="model.blocks"):
        build_optimizer(nn.Linear(3, 3), "muon")
    with pytest.raises(ValueError, match='"muon": True'):
        Muon([{"params": [nn.Parameter(torch.ones(2, 2))]}])
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [nn.Parameter(torch.ones(2))], "muon": True}])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        build_optimizer(tiny(), "muon", momentum=1.0)


# -- every kind: the loop's learning rate, checkpoints, training --------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_set_lr_moves_every_groups_step(kind):
    # set_lr writes g["lr"] into every group: the run then steps exactly as one built with that lr
    # (Muon's adjusted lr is taken from the group's lr at each step, not fixed at construction)
    built_low, set_high, built_high = tiny(), tiny(), tiny()
    opts = [build_optimizer(m, kind, lr=lr) for m, lr in ((built_low, 1e-3), (set_high, 1e-3), (built_high, 4e-3))]
    for g in opts[1].param_groups:
        g["lr"] = 4e-3
    for model, opt in zip((built_low, set_high, built_high), opts):
        train_steps(model, opt, 2)
    assert_same_weights(set_high, built_high)
    differ = [n for (n, p), q in zip(set_high.named_parameters(), built_low.parameters()) if not torch.equal(p, q)]
    assert "blocks.0.attn.qkv.weight" in differ and "tok_emb.weight" in differ and "norm_f.weight" in differ


def through_a_checkpoint(opt: torch.optim.Optimizer, fresh: torch.optim.Optimizer) -> None:
    """Save `opt` as a checkpoint does (safetensors + JSON) and load it into `fresh`."""
    tensors, meta = optimizer_to_tensors(opt)
    saved = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    optimizer_from_tensors(fresh, load_safetensors(saved), json.loads(json.dumps(meta)))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_resumed_optimizer_continues_bit_for_bit(kind):
    uninterrupted = tiny()
    opt = build_optimizer(uninterrupted, kind, lr=3e-3)
    train_steps(uninterrupted, opt, 3)
    resumed = copy.deepcopy(uninterrupted)
    fresh = build_optimizer(resumed, kind, lr=3e-3)
    through_a_checkpoint(opt, fresh)
    train_steps(uninterrupted, opt, 3, seed=10)
    train_steps(resumed, fresh, 3, seed=10)
    assert_same_weights(uninterrupted, resumed)


@pytest.mark.parametrize("kind, lr", [("adamw", 1e-2), ("muon", 1e-2), ("sgd", 0.1)])
def test_each_kind_trains_a_tiny_gpt(kind, lr):
    # memorising one sequence: from ln(32) ~ 3.5 to near 0 within 150 steps; Muon with AdamW's lr
    model = tiny()
    opt = build_optimizer(model, kind, lr=lr, weight_decay=0.0 if kind == "sgd" else 0.1)
    x, y = batch()
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.0 and max(losses[-10:]) < 0.05, losses[::15]
