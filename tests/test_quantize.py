"""Quantised copies (minillm/quantize.py), each checked against a reference written out here:

- each kind's layer against its formula: int8 weights times their per-channel scales (and, for
  dynamic int8, activations quantised per token by hand); int4 nibbles unpacked by hand;
- a whole classifier against the float model (stated tolerances), and the size of its weights;
- save -> load is exact, bit for bit; damaged files and unknown kinds are named;
- predict and generate (KV cache) run on quantised checkpoints; finetune.py --quantize end to end;
- without torchao: int8 falls back to torch.ao, the weight-only kinds say what to install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minillm import BERT, GPT, preset
from minillm.checkpoint import save_checkpoint
from minillm.pretrained import load_finetuned, load_pretrained
from minillm.quantize import (
    QUANT_KINDS,
    Int4Linear,
    load_quantized,
    pack_int4,
    quantizable_layers,
    quantize_backend,
    quantize_model,
    quantized_tensors,
    unpack_int4,
)
from minillm.tokenizer import CharTokenizer
from test_finetune import QUICK, ROOT, bert_dir, data, probs_of, run, summary  # noqa: F401  (fixtures)

TOK = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,!\n")
LABELS = ["neg", "pos", "meh"]
FINETUNE = {"task": "classify", "method": "full", "merged": False, "text_col": "sentence", "max_len": 32}
LAYER = "blocks.0.mlp.fc"  # a quantised layer: 64 -> 128
ONE_LINE_EXTRA = r"^--quantize int8-weight needs torchao >= 0\.15: pip install -e '\.\[quantize\]'$"


def tiny_bert() -> BERT:
    """Widths that are multiples of 32, so int4 uses its groups of 32 everywhere."""
    torch.manual_seed(0)
    cfg = preset("bert-tiny", n_layer=2, n_head=2, n_embd=64, n_inner=128, block_size=32, vocab_size=TOK.vocab_size,
                 dropout=0.0, attn_dropout=0.0, num_labels=len(LABELS))
    return BERT(cfg).eval()


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("gpt-cpu", n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=TOK.vocab_size)).eval()


def ids(n=32, t=12, seed=1):
    return torch.randint(0, TOK.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def layer_io(qmodel, width=64):
    """(x, the quantised layer's output, its saved tensors) for LAYER."""
    x = torch.randn(5, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = qmodel.get_submodule(LAYER)(x)
    saved = {k[len(LAYER) + 1:]: v for k, v in quantized_tensors(qmodel).items() if k.startswith(LAYER + ".")}
    return x, y, saved


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


# ---------------------------------------------------------------------------------------------
# each kind's layer against its formula


def check_int8_weights(w_float, q, scale):
    """Symmetric int8, one scale per output row, each weight rounded to the nearest step."""
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0],)
    assert (q.float().abs().amax(dim=1) >= 127).all()  # the row's largest weight uses the whole range
    err = (w_float - q.float() * scale[:, None]).abs()
    # half a step (the largest positive weight, at 127.5 steps, is clamped to 127), plus float rounding
    assert (err <= scale[:, None] / 2 + w_float.abs() * 1e-6).all()


def test_int8_weight_layer_is_its_dequantised_weight(bert):
    qmodel = quantize_model(bert, "int8-weight")
    x, y, saved = layer_io(qmodel)
    check_int8_weights(bert.get_submodule(LAYER).weight.detach(), saved["weight"], saved["weight_scale"])
    dequantised = saved["weight"].float() * saved["weight_scale"][:, None]
    # float rounding only: torchao scales x @ q^T afterwards, the formula scales q first
    torch.testing.assert_close(y, F.linear(x, dequantised, saved["bias"]), rtol=1e-5, atol=1e-6)


def test_int8_dynamic_layer_quantises_each_token_by_hand(bert):
    qmodel = quantize_model(bert, "int8")
    x, y, saved = layer_io(qmodel)
    check_int8_weights(bert.get_submodule(LAYER).weight.detach(), saved["weight"], saved["weight_scale"])
    # each row of x (each token): symmetric int8 with the scale that maps its largest |value| to 127.5
    sx = x.abs().amax(dim=1, keepdim=True) / 127.5
    xq = (x / sx).round().clamp(-128, 127)
    acc = xq @ saved["weight"].float().t()  # integers below 2^24: exact in float32, as in int32
    want = acc * sx * saved["weight_scale"] + saved["bias"]
    # float rounding only; a product whose rounding falls on a tie could still differ by one step
    # sx * scale * |w_q| <= 127 sx scale: such a row is allowed that, none was seen
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_int4_layer_from_nibbles_unpacked_by_hand(bert):
    qmodel = quantize_model(bert, "int4-weight")
    x, y, saved = layer_io(qmodel)
    packed, scale, low = saved["weight"], saved["weight_scale"].float(), saved["weight_min"].float()
    assert packed.dtype == torch.uint8 and packed.shape == (128, 32) and scale.shape == low.shape == (128, 2)
    q = torch.empty(128, 64)
    q[:, 0::2] = (packed & 15).float()  # even columns in the low nibble
    q[:, 1::2] = (packed >> 4).float()
    w = low.repeat_interleave(32, dim=1) + scale.repeat_interleave(32, dim=1) * q  # groups of 32 along a row
    torch.testing.assert_close(y, F.linear(x, w, saved["bias"]), rtol=1e-5, atol=1e-6)
    # every weight within half a step of its float value (plus the float16 rounding of the minimum)
    w_float = bert.get_submodule(LAYER).weight.detach()
    bound = scale.repeat_interleave(32, dim=1) / 2 * (1 + 1e-3) + low.abs().repeat_interleave(32, dim=1) * 2**-11
    assert ((w - w_float).abs() <= bound).all()


@pytest.mark.parametrize("k", [2, 7, 33])
def test_int4_packing_round_trip_and_odd_widths(k):
    q = torch.randint(0, 16, (3, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, (k + 1) // 2)
    assert int(packed[0, 0]) == int(q[0, 0]) + 16 * int(q[0, 1])
    assert torch.equal(unpack_int4(packed, k), q)
    layer = Int4Linear.from_linear(torch.nn.Linear(k, 16))  # not a multiple of 32: one group a row
    assert layer.group_size == k and layer.weight_scale.shape == (16, 1)


# ---------------------------------------------------------------------------------------------
# the whole model


# Relative error of the logits. int8: a weight's rounding error is at most half a step of
# max|w_row| / 127.5, about 0.7% of a weight's size on average, a few % after the layers.
# int4: a step is a group's range / 15, about 8% of a weight's size: 10% measured, 20% allowed.
TOLERANCE = {"int8": 0.05, "int8-weight": 0.05, "int4-weight": 0.2}


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_classifier_close_to_float_and_smaller(bert, kind):
    qmodel = quantize_model(bert, kind)
    x = ids(64)
    with torch.no_grad():
        want, got = bert.classify(x)[0], qmodel.classify(x)[0]
    assert ((got - want).norm() / want.norm()).item() < TOLERANCE[kind]
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.9
    assert bert.blocks[0].mlp.fc.weight.dtype == torch.float32  # the float model is left as it was
    # the linear layers' weights (with their scales and minimums) against their float32 weights
    layers, saved = set(quantizable_layers(bert)), quantized_tensors(qmodel)
    float_w = {k: v for k, v in bert.state_dict().items() if k.endswith(".weight") and k[:-len(".weight")] in layers}
    quant_w = {k: v for k, v in saved.items() if not k.endswith(".bias") and k.rsplit(".", 1)[0] in layers}
    ratio = nbytes(float_w) / nbytes(quant_w)
    assert ratio >= (6 if kind == "int4-weight" else 3), ratio
    # and the float rest as it was, the tied MLM decoder once (as the embedding)
    assert set(saved) - set(quant_w) == set(bert.state_dict()) - set(float_w) - {"mlm_decoder.weight"}


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def drop(tensors, name):
    return {k: v for k, v in tensors.items() if k != name}


# ---------------------------------------------------------------------------------------------
# save -> load


def save_quantized(directory, qmodel, kind, labels=LABELS):
    return save_checkpoint(str(directory), qmodel, qmodel.config, TOK, name="quantized",
                           tensors=quantized_tensors(qmodel),
                           extra_config={"labels": labels, "finetune": FINETUNE, "quantized": kind})


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_save_load_is_exact(bert, tmp_path, kind):
    qmodel = quantize_model(bert, kind)
    path = save_quantized(tmp_path, qmodel, kind)
    loaded, tok, cfg = load_finetuned(path)  # built on a freshly initialised model: only the file can make it equal
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded.classify(x)[0], qmodel.classify(x)[0])
    assert cfg["quantized"] == kind and tok.fingerprint() == TOK.fingerprint()
    with pytest.raises(ValueError, match=rf"quantised \({kind}\) inference copy cannot be trained further"):
        load_pretrained(path)  # finetune.py --init refuses it with this message


def test_damaged_files_and_unknown_kinds_are_named(bert, tmp_path):
    qmodel = quantize_model(bert, "int4-weight")
    tensors = quantized_tensors(qmodel)
    source = "somewhere/model.safetensors"
    weight = tensors[f"{LAYER}.weight"]
    for damaged, message in [
        (drop(tensors, f"{LAYER}.weight_min"), rf"{source}: .*missing {LAYER}.weight_min"),
        ({**tensors, f"{LAYER}.weight": weight[:, :5]}, rf"mis-shaped {LAYER}.weight \(128, 5\)"),
        ({**tensors, f"{LAYER}.weight": weight.float()}, rf"mis-shaped {LAYER}.weight .*torch.float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_quantized(bert.config, damaged, source, "int4-weight")
    int8 = quantized_tensors(quantize_model(bert, "int8-weight"))
    with pytest.raises(ValueError, match=rf"missing {LAYER}.weight_scale"):
        load_quantized(bert.config, drop(int8, f"{LAYER}.weight_scale"), source, "int8-weight")
    path = save_quantized(tmp_path, qmodel, "int4-weight")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "quantized": "int3"}, f)
    with pytest.raises(ValueError, match=r"unknown quantised kind 'int3'"):
        load_finetuned(path)


# ---------------------------------------------------------------------------------------------
# predict and generate on quantised checkpoints


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_predict_on_quantised_checkpoints(bert, tmp_path, capsys, kind):
    from minillm.predict import main as predict

    path = save_quantized(tmp_path, quantize_model(bert, kind), kind)
    assert predict(["--ckpt", path, "--text", "a fine film", "--text", "dull"]) == 0
    header, rows = probs_of(capsys.readouterr().out)
    assert header[1:4] == [f"p({name})" for name in LABELS] and [r[0] in LABELS for r in rows] == [True, True]
    if kind == "int8":  # once through the command, in a fresh process: torchao's import must say nothing
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "minillm.predict", "--ckpt", path, "--text", "a fine film"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert probs_of(proc.stdout)[1][0][1:4] == rows[0][1:4]  # the same probabilities


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_generate_with_the_kv_cache_on_quantised_gpt(tmp_path, capsys, kind):
    from minillm.generate import main as generate

    qmodel = quantize_model(tiny_gpt(), kind)
    prompt = ids(2, 5)
    out = qmodel.generate(prompt, 6, temperature=0)  # greedy, through the KV cache, under no_grad
    # the reference: each next token from a full forward over the whole sequence, no cache
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, qmodel(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    path = save_checkpoint(str(tmp_path), qmodel, qmodel.config, TOK, name="quantized",
                           tensors=quantized_tensors(qmodel), extra_config={"quantized": kind})
    assert generate(["--ckpt", path, "--prompt", "ab", "--tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


# ---------------------------------------------------------------------------------------------
# finetune.py --quantize


@pytest.mark.parametrize("kind", ["int8-weight", "int4-weight"])
def test_finetune_weight_only_reports_and_predicts(tmp_path, data, bert_dir, kind):  # noqa: F811
    out = tmp_path / "q"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--max-steps", "3", "--lr", "1e-2",
         "--quantize", kind, "--out", out, *QUICK])
    s = summary(out)
    q = s["quantized"]
    assert q["kind"] == kind and q["backend"] == quantize_backend(kind) and os.path.exists(q["checkpoint"])
    assert q["quantized_bytes"] < q["float_bytes"] and q["quantized_file_bytes"] > 0
    assert 0 <= q["quantized_eval_accuracy"] <= 1 and q["float_eval_accuracy"] == pytest.approx(s["eval_accuracy"])
    float_model, _, _ = load_finetuned(str(out))
    qmodel, _, cfg = load_finetuned(q["checkpoint"])
    assert cfg["quantized"] == kind
    x = torch.randint(5, 20, (8, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = F.softmax(float_model.classify(x)[0], -1), F.softmax(qmodel.classify(x)[0], -1)
    assert (got - want).abs().max().item() < 0.1  # probabilities of a barely trained model: near its float's
    with pytest.raises(ValueError, match="cannot be trained further"):
        run(["--init", q["checkpoint"], "--train", data["train"], "--max-steps", "1", "--out", tmp_path / "2", *QUICK])


# ---------------------------------------------------------------------------------------------
# without torchao


def test_without_torchao_int8_falls_back_to_torch_ao(bert, tmp_path, monkeypatch):
    x = ids()
    with monkeypatch.context() as patch:  # torchao as it was (imported or not) after the block
        patch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError
        qmodel = quantize_model(bert, "int8")
        assert quantize_backend("int8") == "torch.ao (fallback)"
        with torch.no_grad():
            want, got = bert.classify(x)[0], qmodel.classify(x)[0]
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE["int8"]
        saved = quantized_tensors(qmodel)
        w_float = bert.get_submodule(LAYER).weight.detach()
        check_int8_weights(w_float, saved[f"{LAYER}.weight"], saved[f"{LAYER}.weight_scale"])
        assert not saved[f"{LAYER}.weight_zero_point"].any()
        path = save_quantized(tmp_path, qmodel, "int8")
        for call in (lambda: quantize_model(bert, "int8-weight"), lambda: quantize_backend("int8-weight")):
            with pytest.raises(ValueError, match=ONE_LINE_EXTRA):
                call()
        with pytest.raises(ValueError, match=r"an int8-weight copy made with torchao; loading it needs torchao >= 0\.15"):
            load_quantized(bert.config, {}, "x.safetensors", "int8-weight")
        assert quantize_backend("int4-weight") == "minillm"  # minillm's own: no torchao needed
        assert isinstance(quantize_model(bert, "int4-weight").get_submodule(LAYER), Int4Linear)
    # with torchao: the torch.ao file (zero points in it) still loads through torch.ao, exactly
    loaded, _, _ = load_finetuned(path)
    with torch.no_grad():
        assert torch.equal(loaded.classify(x)[0], got)


def test_a_torch_ao_file_without_torch_ao_loads_through_torchao(bert, monkeypatch):
    """A future torch without torch.ao: an old int8 file's weights are read into torchao's layers."""
    import minillm.quantize as quantize

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torchao", None)
        old = quantize_model(bert, "int8")  # torch.ao's
    tensors = quantized_tensors(old)
    monkeypatch.setattr(quantize, "_torch_ao_dynamic", lambda: None)
    loaded = load_quantized(bert.config, tensors, "old.safetensors", "int8")
    assert torch.equal(quantized_tensors(loaded)[f"{LAYER}.weight"], tensors[f"{LAYER}.weight"])
    x = ids()
    with torch.no_grad():
        want, got = old.classify(x)[0], loaded.classify(x)[0]
    assert ((got - want).norm() / want.norm()).item() < TOLERANCE["int8"]  # activations now per token: close, not equal
