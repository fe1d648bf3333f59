"""python -m minillm.export and the functions behind it.

Every comparison is against the eager model's own outputs, computed here from the checkpoint
as minillm loads it (default attention backend, the model's own KV cache), never against
another exported file:
- a GPT language model and a BERT classifier round-trip through torch.export.save / load in a
  Python process that never imports minillm (this file's own child script), at three shapes
  none of which was traced, within 1e-5;
- the batch and sequence dimensions are dynamic (any batch, any length up to block_size; a
  longer one is refused by the program);
- the AOTInductor package, the ONNX file (through onnxruntime) and the one-token decode step
  equal the eager model;
- bad input exits with code 2 and one line, writing nothing; quantised models, a BERT decode
  step and an unexportable attention backend are refused with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from minillm import BERT, GPT, ModelConfig
from minillm.checkpoint import save_checkpoint
from minillm.cli import run_main
from minillm.export import (
    export_program,
    load_for_export,
    main,
    max_difference,
)
from minillm.lora import LoRALinear, apply_lora, lora_state_dict
from minillm.pretrained import load_finetuned
from minillm.tokenizer import CharTokenizer

TOK = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,!")
LABELS = ["neg", "neutral", "pos"]
BLOCK = 24
SHAPES = [(1, 1), (3, 11), (5, BLOCK)]  # (batch, seq): the trace used (2, 5)


def tiny_config(arch: str, **kw) -> ModelConfig:
    post = {"norm_position": "post", "activation": "gelu"} if arch == "bert" else {}
    return ModelConfig(arch=arch, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                       **post, **kw)


def spread(model: nn.Module) -> nn.Module:
    """Weights larger than the initialisation's, so that every output depends visibly on every
    input (a mask ignored, a position shifted): a test that cannot fail by rounding alone."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15).add_(1.0 if p.dim() == 1 and p.shape[0] == model.config.n_embd else 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = spread(GPT(tiny_config("gpt")))
    out = tmp_path_factory.mktemp("gpt")
    save_checkpoint(str(out), model, model.config, TOK)
    return str(out)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = spread(BERT(tiny_config("bert", num_labels=len(LABELS))))
    out = tmp_path_factory.mktemp("bert")
    save_checkpoint(str(out), model, model.config, TOK, extra_config={"labels": LABELS})
    return str(out)


def inputs(batch: int, seq: int, seed: int, mask: bool = False) -> list[torch.Tensor]:
    """Token ids, and with mask an attention mask padded on the right and two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TOK.vocab_size, (batch, seq), generator=g)
    if not mask:
        return [ids]
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = (torch.arange(seq)[None, :] >= seq // 2).long() * attn
    return [ids, attn, types]


# The child: loads what the exporter wrote with torch alone, runs it on the given inputs, and
# proves that minillm (its kernels included: minillm.kernels) never came in.
CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file

path, inp, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
extra = {"minillm.json": ""}
program = torch.export.load(path, extra_files=extra).module()
xs = load_file(inp)
with torch.no_grad():
    ys = {str(i): program(*[xs[f"{i}.{j}"] for j in range(n)]) for i in range(len(xs) // n)}
save_file(ys, out)
print(json.dumps(json.loads(extra["minillm.json"])["inputs"]))
assert not any(m.split(".")[0] == "minillm" for m in sys.modules), sorted(sys.modules)
"""


def run_without_minillm(path: str, cases: list[list[torch.Tensor]], tmp_path) -> tuple[list, list]:
    from safetensors.torch import load_file, save_file

    save_file({f"{i}.{j}": x for i, case in enumerate(cases) for j, x in enumerate(case)}, str(tmp_path / "in.st"))
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(tmp_path / "in.st"), str(tmp_path / "out.st"),
                           str(len(cases[0]))], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.st"))
    return [got[str(i)] for i in range(len(cases))], json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Round trips without minillm


def test_gpt_language_model_round_trip_without_minillm(gpt_dir, tmp_path):
    out = str(tmp_path / "gpt.pt2")
    assert main(["--ckpt", gpt_dir, "--out", out]) == 0
    model, _, _ = load_finetuned(gpt_dir)  # the eager model, as minillm loads it (sdpa attention here)
    cases = [inputs(b, t, seed=i) for i, (b, t) in enumerate(SHAPES)]
    got, described = run_without_minillm(out, cases, tmp_path)
    with torch.no_grad():
        for (ids,), logits in zip(cases, got):
            want = model(ids)[0]
            assert logits.shape == want.shape == (ids.shape[0], ids.shape[1], TOK.vocab_size)
            assert max_difference(logits, want) <= 1e-5
    assert described == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    meta = json.loads((tmp_path / "gpt.json").read_text())
    assert (meta["vocab_size"], meta["block_size"], meta["labels"]) == (TOK.vocab_size, BLOCK, None)


def test_bert_classifier_round_trip_without_minillm(bert_dir, tmp_path):
    out = str(tmp_path / "bert.pt2")
    assert main(["--ckpt", bert_dir, "--out", out, "--what", "probs"]) == 0
    model, _, cfg = load_finetuned(bert_dir)
    cases = [inputs(b, t, seed=i, mask=True) for i, (b, t) in enumerate(SHAPES)]
    got, described = run_without_minillm(out, cases, tmp_path)
    with torch.no_grad():
        for (ids, attn, types), probs in zip(cases, got):
            want = torch.softmax(model.classify(ids, attn, types)[0], dim=-1)
            assert probs.shape == (ids.shape[0], len(LABELS))
            assert max_difference(probs, want) <= 1e-5
            if not attn.all():  # the bound is tight enough to see a padding mask ignored
                unmasked = torch.softmax(model.classify(ids, torch.ones_like(attn), types)[0], dim=-1)
                assert max_difference(unmasked, want) > 1e-3
    assert [x["name"] for x in described] == ["input_ids", "attention_mask", "token_type_ids"]
    meta = json.loads((tmp_path / "bert.json").read_text())
    assert meta["labels"] == LABELS and meta["outputs"][0]["name"] == "probs"
    assert meta["outputs"][0]["shape"] == ["batch", len(LABELS)]


def test_dimensions_are_dynamic_up_to_the_block_size(bert_dir):
    model, _ = load_for_export(bert_dir)
    program = export_program(model).module()  # traced at batch 2, sequence 5
    for batch, seq in [(7, 2), (1, BLOCK), (2, 5), (9, 17)]:
        ids, attn, types = inputs(batch, seq, seed=seq, mask=True)
        with torch.no_grad():
            assert max_difference(program(ids, attn, types), model.classify(ids, attn, types)[0]) <= 1e-5
    too_long = inputs(1, BLOCK + 1, seed=0, mask=True)
    with pytest.raises(Exception, match="seq|block|range|<= 24|constraint"):
        program(*too_long)


# ---------------------------------------------------------------------------------------------
# AOTInductor, ONNX, the decode step, bfloat16, LoRA


@pytest.mark.slow
def test_aoti_package_equals_eager(gpt_dir, tmp_path, capsys):
    out = str(tmp_path / "gpt.pt2")
    assert main(["--ckpt", gpt_dir, "--out", out, "--aot", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "check passed" in printed and "latency at batch 1" in printed and "aoti" in printed
    model, _, _ = load_finetuned(gpt_dir)
    runner = torch._inductor.aoti_load_package(str(tmp_path / "gpt.aoti.pt2"))
    with torch.no_grad():
        for i, (b, t) in enumerate(SHAPES):
            (ids,) = inputs(b, t, seed=10 + i)
            got = runner(ids)
            got = got[0] if isinstance(got, (list, tuple)) else got
            assert max_difference(got, model(ids)[0]) <= 1e-5


def test_onnx_equals_eager_through_onnxruntime(bert_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[export]')")
    out = str(tmp_path / "bert.pt2")
    assert main(["--ckpt", bert_dir, "--out", out, "--onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    assert [x.name for x in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [x.name for x in session.get_outputs()] == ["logits"]
    model, _, _ = load_finetuned(bert_dir)
    with torch.no_grad():
        for i, (b, t) in enumerate(SHAPES):
            ids, attn, types = inputs(b, t, seed=20 + i, mask=True)
            (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": attn.numpy(),
                                        "token_type_ids": types.numpy()})
            assert max_difference(torch.from_numpy(got), model.classify(ids, attn, types)[0]) <= 1e-5


def test_decode_step_equals_the_models_kv_cache_decoding(gpt_dir, tmp_path):
    out = str(tmp_path / "step.pt2")
    assert main(["--ckpt", gpt_dir, "--out", out, "--what", "decode"]) == 0
    step = torch.export.load(out).module()
    meta = json.loads((tmp_path / "step.json").read_text())
    model, _, _ = load_finetuned(gpt_dir)
    c = model.config
    for batch, steps in [(1, 3), (3, 6)]:
        (ids,) = inputs(batch, steps, seed=batch)
        k = torch.zeros(c.n_layer, batch, c.kv_heads, BLOCK, c.head_dim)
        v = torch.zeros_like(k)
        cache = model.new_kv_cache(batch)
        with torch.no_grad():
            full = model(ids)[0]  # every position at once, no cache
            for i in range(steps):
                logits, k, v = step(ids[:, i:i + 1], k, v, torch.tensor(i))
                want = model(ids[:, i:i + 1], kv_cache=cache)[0][:, -1]
                assert max_difference(logits, want) <= 1e-5
                assert max_difference(logits, full[:, i]) <= 1e-5
        assert max_difference(k, torch.stack(cache.k)) <= 1e-5 and max_difference(v, torch.stack(cache.v)) <= 1e-5
    with pytest.raises(RuntimeError, match=str(BLOCK - 1)):  # the cache is full
        step(ids[:, :1], k, v, torch.tensor(BLOCK))
    assert [x["name"] for x in meta["inputs"]] == ["input_ids", "k_cache", "v_cache", "position"]
    assert meta["inputs"][1]["shape"] == [c.n_layer, "batch", c.kv_heads, BLOCK, c.head_dim]


def test_bfloat16_program_within_the_stated_tolerance(gpt_dir):
    model, _ = load_for_export(gpt_dir)
    ep = export_program(model, "logits", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    eager = load_finetuned(gpt_dir)[0].to(torch.bfloat16)
    (ids,) = inputs(3, 11, seed=3)
    with torch.no_grad():
        got, want = ep.module()(ids), eager(ids)[0]
    assert got.dtype == torch.bfloat16
    assert max_difference(got, want) <= 3e-2 * max(1.0, float(want.float().abs().max()))


def test_lora_checkpoint_is_exported_with_its_adapters(tmp_path):
    torch.manual_seed(2)
    base = GPT(tiny_config("gpt"))
    base_dir = save_checkpoint(str(tmp_path / "base"), base, base.config, TOK)
    model = GPT(tiny_config("gpt", num_labels=2))
    model.load_state_dict(base.state_dict(), strict=False)
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv", "fc"]}
    apply_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
    model.score.requires_grad_(True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    ft = {"task": "classify", "method": "lora", "init": base_dir, "lora": lora}
    out = save_checkpoint(str(tmp_path / "lora"), model, model.config, TOK, tensors=lora_state_dict(model),
                          extra_config={"labels": ["a", "b"], "finetune": ft})
    exported, _ = load_for_export(out)
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())  # merged
    program = export_program(exported).module()
    eager, _, _ = load_finetuned(out)  # adapters kept apart
    ids, attn, _ = inputs(3, 9, seed=4, mask=True)
    with torch.no_grad():
        assert max_difference(program(ids, attn), eager.classify(ids, attn)[0]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input and refusals


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(argv), "minillm.export")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("minillm.export: error: ")
    return err


def test_bad_input_is_one_line_and_writes_nothing(gpt_dir, bert_dir, tmp_path, capsys):
    out = str(tmp_path / "m.pt2")
    cases = [
        (["--ckpt", str(tmp_path / "missing"), "--out", out], "no such directory"),
        (["--ckpt", gpt_dir, "--out", str(tmp_path / "nowhere" / "m.pt2")], "does not exist"),
        (["--ckpt", gpt_dir, "--out", str(tmp_path / "m.onnx")], "expected a FILE.pt2"),
        (["--ckpt", str(tmp_path), "--out", out], "no minillm checkpoint"),
        (["--ckpt", bert_dir, "--out", out, "--what", "decode"], "decode needs a GPT"),
        (["--ckpt", gpt_dir, "--out", out, "--onnx", "--dtype", "bfloat16"], "--onnx takes --dtype float32"),
    ]
    for argv, reason in cases:
        assert reason in one_line_error(capsys, argv)
    assert sorted(os.listdir(tmp_path)) == []


def test_exit_code_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minillm.export", "--ckpt", str(tmp_path / "none"),
                           "--out", str(tmp_path / "m.pt2")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"minillm.export: error: --ckpt {tmp_path / 'none'}: no such directory"]


def test_quantised_models_are_refused_with_the_reason(gpt_dir, tmp_path, capsys):
    model, _, _ = load_finetuned(gpt_dir)
    save_checkpoint(str(tmp_path), model, model.config, TOK, name="int8", extra_config={"quantized": "int8"})
    err = one_line_error(capsys, ["--ckpt", str(tmp_path / "int8"), "--out", str(tmp_path / "q.pt2")])
    assert "a quantised copy (int8) is not exported" in err and "float checkpoint" in err
    assert not os.path.exists(tmp_path / "q.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's quantisation is deprecated
        qmodel = torch.ao.quantization.quantize_dynamic(load_for_export(gpt_dir)[0], {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"a quantised model \(blocks\.0\.attn\.qkv, \.\.\.\) is not exported"):
        export_program(qmodel)


def test_unexportable_features_are_named(gpt_dir, bert_dir):
    model, _ = load_for_export(gpt_dir, attention="sdpa")
    with pytest.raises(ValueError, match="sdpa attention backend .* symbolic is_causal"):
        export_program(model)
    model, _ = load_for_export(gpt_dir, attention="triton")
    with pytest.raises(ValueError, match="may run Triton kernels"):
        export_program(model)
    bert, _ = load_for_export(bert_dir)
    with pytest.raises(ValueError, match="decode needs a GPT"):
        export_program(bert, "decode")
    with pytest.raises(ValueError, match="unknown export kind"):
        export_program(bert, "hidden")
