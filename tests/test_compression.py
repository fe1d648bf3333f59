"""Pruning (minillm/prune.py) and distillation (minillm/distill.py), and their finetune.py flags.

References: the distillation loss against torch's own KL divergence and a formula written out;
a structurally pruned model against the original with the same heads and neurons masked by hooks
(an independent route to the same function); head importance against autograd's gradient of an
explicit gate; the student against a model built at its size from the kept blocks' weights."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minillm import preset
from minillm.distill import kd_loss, mix
from minillm.model import build_model
from minillm.prune import importance, keep_blocks, prune_structured, prune_unstructured

from test_finetune import QUICK, bert_dir, data, gpt_ckpt, run, summary  # noqa: F401 (fixtures)

import finetune  # noqa: E402 (test_finetune puts the repository on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- distillation loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_hintons_kl_times_t_squared(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(5, 3) * 3, torch.randn(5, 3) * 3
    ref = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, temperature), ref * temperature**2, atol=1e-6)
    # the formula by hand, row 0: sum_c p_t log(p_t / p_s) * T^2
    pt = [math.exp(v / temperature) for v in t[0].tolist()]
    ps = [math.exp(v / temperature) for v in s[0].tolist()]
    pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
    row0 = sum(a * math.log(a / b) for a, b in zip(pt, ps)) * temperature**2
    assert kd_loss(s[:1], t[:1], temperature).item() == pytest.approx(row0, rel=1e-5)


def test_kd_loss_masked_rows_and_mix():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    ref = F.kl_div(F.log_softmax(s[mask] / 2, -1), F.softmax(t[mask] / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(kd_loss(s, t, 2.0, mask=mask), ref, atol=1e-6)
    assert kd_loss(s, t, 2.0, mask=torch.zeros_like(mask)).item() == 0.0
    assert kd_loss(s, s, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert mix(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)


# -- structured pruning ---------------------------------------------------------------------------


def tiny(arch="bert", **kw):
    base = dict(vocab_size=50, n_layer=3, n_head=4, n_embd=32, n_inner=48, block_size=32, dropout=0.0,
                attn_dropout=0.0)
    torch.manual_seed(0)
    return build_model(preset("bert-tiny" if arch == "bert" else "gpt-cpu", **{**base, **kw})).eval()


def masked_forward(model, ids, heads, neurons):
    """The original model's logits with every head not in heads[i] and every MLP neuron not in
    neurons[i] zeroed at the input of its block's output projections (forward pre-hooks)."""
    hooks = []
    for i, b in enumerate(model.blocks):
        d = b.attn.head_dim
        head_mask = torch.zeros(b.attn.n_head * d)
        for h in heads[i]:
            head_mask[h * d:(h + 1) * d] = 1
        neuron_mask = torch.zeros(b.mlp.proj.in_features)
        neuron_mask[neurons[i]] = 1
        hooks.append(b.attn.proj.register_forward_pre_hook(lambda m, a, k=head_mask: (a[0] * k,)))
        hooks.append(b.mlp.proj.register_forward_pre_hook(lambda m, a, k=neuron_mask: (a[0] * k,)))
    with torch.no_grad():
        out = model(ids)[0]
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("arch,kw", [("bert", {}), ("gpt", {"pos_encoding": "rope", "activation": "swiglu"}),
                                     ("gpt", {"norm": "rmsnorm", "bias": False})])
def test_pruned_dense_model_equals_masked_original(arch, kw):
    model = tiny(arch, **kw)
    ids = torch.randint(0, 50, (2, 9))
    g = torch.Generator().manual_seed(3)
    head_scores, neuron_scores = torch.rand(3, 4, generator=g), torch.rand(3, 48, generator=g)
    want_heads = [sorted(torch.topk(head_scores[i], 2).indices.tolist()) for i in range(3)]
    want_neurons = [sorted(torch.topk(neuron_scores[i], 36).indices.tolist()) for i in range(3)]
    expected = masked_forward(model, ids, want_heads, want_neurons)
    done = prune_structured(model, 0.5, 0.25, head_scores, neuron_scores)
    assert done["kept_heads"] == want_heads  # exactly the chosen heads, in order
    c = model.config
    assert (c.n_head, c.head_dim, c.inner) == (2, 8, 36) and c.head_size == 8
    for b in model.blocks:
        assert b.attn.qkv.weight.shape == (3 * 2 * 8, 32) and b.attn.proj.weight.shape == (32, 16)
        assert b.mlp.proj.weight.shape == (32, 36)
        assert b.mlp.fc.weight.shape[0] == 36 * (2 if c.activation == "swiglu" else 1)
    with torch.no_grad():
        got = model(ids)[0]
    assert (got - expected).abs().max() < 1e-5
    # the same config builds the same shapes: the checkpoint of a pruned model loads back
    rebuilt = build_model(model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids)[0], got)
    assert done["removed_share"] == pytest.approx(
        1 - sum(p.numel() for p in model.blocks.parameters()) / done["block_parameters"][0])


def test_pruned_gpt_generates_with_its_kv_cache():
    model = tiny("gpt", pos_encoding="rope")
    prune_structured(model, 0.25, 0.5, torch.rand(3, 4), torch.rand(3, 48))
    ids = torch.randint(0, 50, (2, 5))
    out = model.generate(ids, 6, temperature=0.0)
    # greedy decoding with the cache equals argmax of full forwards, token by token
    x = ids
    for _ in range(6):
        with torch.no_grad():
            x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)


def test_importance_is_the_gradient_of_a_gate_on_each_head_and_neuron():
    model = tiny("bert", num_labels=2)
    ids, y = torch.randint(0, 50, (4, 7)), torch.tensor([0, 1, 1, 0])
    loss_of = lambda b: F.cross_entropy(model.classify(b[0])[0], b[1])  # noqa: E731
    heads, neurons = importance(model, loss_of, [(ids, y)])
    # reference: explicit gates (ones) multiplying each head's output / each neuron, d loss / d gate
    gates_h = [torch.ones(4, requires_grad=True) for _ in model.blocks]
    gates_n = [torch.ones(48, requires_grad=True) for _ in model.blocks]
    hooks = []
    for b, gh, gn in zip(model.blocks, gates_h, gates_n):
        hooks.append(b.attn.proj.register_forward_pre_hook(
            lambda m, a, g=gh: ((a[0].unflatten(-1, (4, 8)) * g[:, None]).flatten(-2),)))
        hooks.append(b.mlp.proj.register_forward_pre_hook(lambda m, a, g=gn: (a[0] * g,)))
    loss_of((ids, y)).backward()
    for h in hooks:
        h.remove()
    assert torch.allclose(heads.float(), torch.stack([g.grad.abs() for g in gates_h]), rtol=1e-4, atol=1e-7)
    assert torch.allclose(neurons.float(), torch.stack([g.grad.abs() for g in gates_n]), rtol=1e-4, atol=1e-7)


def test_structured_refusals():
    with pytest.raises(ValueError, match="ALiBi"):
        m = tiny("gpt", pos_encoding="alibi")
        prune_structured(m, 0.5, 0.0, torch.rand(3, 4), torch.rand(3, 48))
    with pytest.raises(ValueError, match="grouped-query"):
        m = tiny("gpt", n_kv_head=2)
        prune_structured(m, 0.5, 0.0, torch.rand(3, 4), torch.rand(3, 48))
    m = tiny("gpt", n_kv_head=2)  # GQA: the MLP alone can be pruned
    prune_structured(m, 0.0, 0.5, torch.rand(3, 4), torch.rand(3, 48))
    assert m.config.inner == 24


def test_keep_blocks_equals_a_model_built_from_the_kept_blocks():
    model = tiny("gpt", n_layer=6)
    state = model.state_dict()
    ids = torch.randint(0, 50, (2, 8))
    assert keep_blocks(model, 3) == [1, 3, 5]
    small = build_model(model.config)  # n_layer 3
    renamed = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new, old in enumerate([1, 3, 5]):
        renamed.update({k.replace(f"blocks.{old}.", f"blocks.{new}.", 1): v for k, v in state.items()
                        if k.startswith(f"blocks.{old}.")})
    small.load_state_dict(renamed)
    with torch.no_grad():
        assert torch.equal(small.eval()(ids)[0], model(ids)[0])
    assert [b.attn.layer_idx for b in model.blocks] == [0, 1, 2]
    assert model.generate(ids, 3, temperature=0.0).shape == (2, 11)  # the KV cache has 3 layers
    with pytest.raises(ValueError, match="blocks"):
        keep_blocks(model, 4)


# -- unstructured pruning -------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_zeroes_the_smallest_weights(scope):
    model = tiny("bert")
    layers = [(n, m.weight.detach().clone()) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    keys = set(model.state_dict())
    report = prune_unstructured(model, 0.3, scope)
    assert set(model.state_dict()) == keys and not any(m._forward_pre_hooks for m in model.modules())
    new = dict(model.named_modules())
    if scope == "global":
        everything = torch.cat([w.abs().flatten() for _, w in layers])
        k = round(0.3 * everything.numel())
        cut = everything.kthvalue(k).values
        for n, w in layers:  # zero exactly where the magnitude is below the global cut
            zero = new[n].weight == 0
            assert torch.equal(zero, w.abs() <= cut) or (zero == (w.abs() <= cut)).float().mean() > 0.999
        assert report["blocks"] == pytest.approx(0.3, abs=1e-3)
    else:
        for n, w in layers:
            assert report["layers"][n] == pytest.approx(round(0.3 * w.numel()) / w.numel())
            kept = new[n].weight != 0
            assert torch.equal(new[n].weight[kept], w[kept])
            assert w.abs()[~kept].max() <= w.abs()[kept].min()


def test_prune_command(tmp_path, data, bert_dir):  # noqa: F811
    run(["--init", bert_dir, "--train", data["train"], "--max-steps", "2", "--out", tmp_path / "ft", *QUICK])
    cmd = [sys.executable, "-m", "minillm.prune", "--ckpt", str(tmp_path / "ft"), "--sparsity", "0.5",
           "--out", str(tmp_path / "sparse")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "50.0% of the blocks' linear weights are zero" in proc.stdout
    from minillm.pretrained import load_finetuned
    model, _, cfg = load_finetuned(str(tmp_path / "sparse"))
    assert cfg["labels"] and cfg["pruned"]["sparsity"] == 0.5
    w = torch.cat([m.weight.flatten() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and n.startswith("blocks.")])
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # nothing overwritten
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    bad = subprocess.run(cmd[:5] + ["--sparsity", "1.5", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--sparsity must be in [0, 1)" in bad.stderr


# -- through finetune.py --------------------------------------------------------------------------


def test_finetune_prunes_heads_and_neurons_then_recovers(tmp_path, data, bert_dir):  # noqa: F811
    out = tmp_path / "pruned"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--max-steps", "3",
         "--prune-heads", "0.5", "--prune-mlp", "0.5", "--prune-calibration", "2", "--out", out, *QUICK])
    cfg = json.load(open(out / "checkpoint" / "config.json"))
    assert (cfg["model"]["n_head"], cfg["model"]["head_size"], cfg["model"]["n_inner"]) == (1, 16, 32)
    assert cfg["finetune"]["pruned"]["heads"] == "2 -> 1"
    assert 0 <= summary(out)["eval_accuracy"] <= 1
    from minillm.pretrained import load_finetuned
    model, _, _ = load_finetuned(str(out))
    assert model.blocks[0].attn.qkv.weight.shape == (48, 32)
    with pytest.raises(ValueError, match="pruned heads"):
        run(["--init", bert_dir, "--train", data["train"], "--max-steps", "1", "--prune-heads", "0.5",
             "--export-hf", tmp_path / "hf", "--out", tmp_path / "p2", *QUICK])


def test_finetune_distils_a_student_from_a_teacher(tmp_path, data, bert_dir):  # noqa: F811
    teacher = tmp_path / "teacher"
    run(["--init", bert_dir, "--train", data["train"], "--max-steps", "4", "--lr", "1e-3", "--out", teacher, *QUICK])
    out = tmp_path / "student"
    run(["--init", bert_dir, "--student-layers", "1", "--teacher", teacher, "--distill-alpha", "0.7",
         "--train", data["train"], "--eval", data["eval"], "--max-steps", "2", "--out", out, *QUICK])
    cfg = json.load(open(out / "checkpoint" / "config.json"))
    assert cfg["model"]["n_layer"] == 1 and cfg["finetune"]["student_layers"] == 1
    assert cfg["finetune"]["distill_alpha"] == 0.7 and cfg["finetune"]["teacher"] == str(teacher)


def test_distillation_loss_in_the_loop_is_the_mix(tmp_path, data, bert_dir):  # noqa: F811
    """The first step's logged loss equals (1 - a) CE + a T^2 KL computed here from the two models."""
    teacher = tmp_path / "teacher"
    run(["--init", bert_dir, "--train", data["train"], "--max-steps", "4", "--lr", "1e-3", "--out", teacher, *QUICK])
    args = finetune.build_parser().parse_args(
        ["--init", bert_dir, "--teacher", str(teacher), "--distill-alpha", "0.3", "--distill-temperature", "3",
         "--train", data["train"], "--dropout", "0", *QUICK])
    opts = finetune.resolve(args)
    model, tok, _ = finetune.start_model(args, opts, None)
    task = finetune.build_task(args, opts, model, tok, torch.device("cpu"), None)
    model.eval()
    ids, types, mask, y = batch = finetune.first_batch(task)
    got = task.loss(task.forward, batch)[0]
    from minillm.pretrained import load_finetuned
    t_model = load_finetuned(str(teacher))[0].eval()
    with torch.no_grad():
        s = model.classify(ids, attention_mask=mask, token_type_ids=types)[0]
        t = t_model.classify(ids, attention_mask=mask, token_type_ids=types)[0]
    p_t = F.softmax(t / 3, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3, -1))).sum(-1).mean() * 9
    assert got.item() == pytest.approx((0.7 * F.cross_entropy(s, y) + 0.3 * kl).item(), rel=1e-5)


def test_lm_distillation_gpt(tmp_path, gpt_ckpt):  # noqa: F811
    text = tmp_path / "t.txt"
    text.write_text("the good film was fine and the bad plot was poor\n" * 30)
    out = tmp_path / "lm"
    run(["--init", gpt_ckpt, "--task", "lm", "--train", text, "--teacher", gpt_ckpt, "--student-layers", "1",
         "--max-steps", "2", "--max-len", "32", "--out", out, *QUICK])
    assert summary(out)["eval_loss"] > 0


def test_teacher_refusals(tmp_path, data, bert_dir, gpt_ckpt):  # noqa: F811
    base = ["--init", bert_dir, "--train", data["train"], "--max-steps", "1", "--out", tmp_path / "o", *QUICK]
    with pytest.raises(ValueError, match="holds no classifier"):
        run(base + ["--teacher", gpt_ckpt])
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\ngood\tyes\nbad\tno\n" * 8)
    run(["--init", bert_dir, "--train", other, "--max-steps", "1", "--out", tmp_path / "t2", *QUICK])
    with pytest.raises(ValueError, match="its labels"):
        run(base + ["--teacher", tmp_path / "t2"])
    run(["--init", gpt_ckpt, "--train", data["train"], "--max-steps", "1", "--out", tmp_path / "g", *QUICK])
    with pytest.raises(ValueError, match="a GPT, the student is a BERT"):
        run(base + ["--teacher", tmp_path / "g"])
    with pytest.raises(ValueError, match="--distill-alpha"):
        run(base + ["--teacher", tmp_path / "g", "--distill-alpha", "2"])
    with pytest.raises(ValueError, match="--task classify or lm"):
        run(["--init", gpt_ckpt, "--task", "dpo", "--train", data["train"], "--teacher", gpt_ckpt, "--out",
             tmp_path / "d", *QUICK])
    with pytest.raises(ValueError, match="--student-layers 5"):
        run(base + ["--student-layers", "5"])



def test_resume_of_a_pruned_student_keeps_its_shape(tmp_path, data, bert_dir):  # noqa: F811
    out = tmp_path / "r"
    flags = ["--init", bert_dir, "--train", data["train"], "--prune-heads", "0.5", "--prune-calibration", "1",
             "--max-steps", "4", "--out", out, *QUICK]
    run(flags + ["--stop-at-step", "2"])
    run(flags + ["--resume"])
    assert summary(out)["steps"] == 4
    with pytest.raises(ValueError, match="--prune-heads 0.0 .checkpoint: 0.5."):
        run(["--init", bert_dir, "--train", data["train"], "--max-steps", "6", "--out", out, "--resume", *QUICK])


@pytest.mark.slow
def test_compression_benchmark_end_to_end_tiny(tmp_path, data, bert_dir):  # noqa: F811
    """minillm.benchmarks.compression on a tiny BERT and tiny SST-2-shaped files: every row is there and
    the figures hold together (the structured and student rows are smaller, int8 shrinks the
    linear weights 4x less its scales, the exported programs reproduce the eager logits)."""
    d = tmp_path / "sst2"
    d.mkdir()
    shutil.copy(data["train"], d / "train.tsv")
    shutil.copy(data["eval"], d / "dev.tsv")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "minillm.benchmarks.compression", "--init", bert_dir, "--data", str(d),
                           "--out", str(out), "--budget", "2", "--recovery-budget", "1", "--student-layers", "1",
                           "--prune-heads", "0.5", "--prune-mlp", "0.5", "--repeats", "2", "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.load(open(out / "compression.json"))["rows"]
    assert len(rows) == 12 and os.path.exists(out / "compression.png")

    def row(start):
        found = [r for r in rows if r["model"].startswith(start)]
        assert len(found) == 1, (start, [r["model"] for r in rows])
        return found[0]

    teacher = row("teacher: 2 layers")
    assert row("int8 dynamic (torchao")["linear_mb"] < teacher["linear_mb"] / 3
    assert row("int8 dynamic (torch.ao)")["linear_mb"] < teacher["linear_mb"] / 3
    assert row("int4-weight")["linear_mb"] < row("int8-weight")["linear_mb"]
    assert row("structured")["linear_mb"] < teacher["linear_mb"] * 0.6
    assert row("student: 1 layers, distilled")["size_mb"] < teacher["size_mb"]
    assert row("student: 1 layers, no teacher")["linear_mb"] == row("student: 1 layers, distilled")["linear_mb"]
    for name in ("torch.export program", "AOTInductor package"):
        assert row(name)["accuracy"] == teacher["accuracy"]
        assert float(row(name)["note"].split("eager ")[1].split(";")[0]) <= 1e-5
    assert all(r["ms_b1"] > 0 and r["ms_b32"] > 0 for r in rows)
    assert "| AOTInductor package |" in proc.stdout
