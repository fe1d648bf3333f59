"""Prediction from a finetuned classifier, and the loaders it stands on.

- `python -m minillm.predict` (its main(), in process): a table on standard input is read as a
  table when --format says so (not line by line, which would make the header an example); an
  explicit --text-col that the table lacks is an error naming the columns it has, while the
  column the model was trained on falls back to a usual name.
- `predict_logits` returns each example's logits in input order, whatever the batching.
- `load_finetuned` rebuilds full, LoRA (on their base) and int8 checkpoints with the logits they
  were saved with; `load_pretrained` merges a LoRA run's adapters, refuses the int8 copy, and
  reports the heads a Hugging Face directory lacks.
"""
from __future__ import annotations

import io
import json

import pytest
import torch

from minillm import GPT, preset
from minillm.checkpoint import save_checkpoint
from minillm.classification_data import collate, predict_logits
from minillm.hf_import import save_hf
from minillm.lora import LoRALinear, apply_lora, lora_state_dict
from minillm.predict import main
from minillm.pretrained import load_finetuned, load_pretrained
from minillm.quantize import quantize_model, quantized_tensors
from minillm.tokenizer import CharTokenizer

TOK = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,!")
LABELS = ["neg", "pos"]
FINETUNE = {"task": "classify", "method": "full", "merged": False, "text_col": "sentence", "max_len": 32}


def tiny_classifier(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=TOK.vocab_size, **overrides)
    model = GPT(cfg)
    model.add_classifier(len(LABELS))
    return model.eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    model = tiny_classifier()
    out = tmp_path_factory.mktemp("classifier")
    save_checkpoint(str(out), model, model.config, TOK, extra_config={"labels": LABELS, "finetune": FINETUNE})
    return str(out)


def predict(capsys, monkeypatch, *args, stdin=None) -> list[str]:
    """The printed lines of the predict command (header first)."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(list(args)) == 0
    return capsys.readouterr().out.splitlines()


def texts(lines: list[str]) -> list[str]:
    return [line.split("\t")[-1] for line in lines[1:]]


# ---------------------------------------------------------------------------------------------
# The command


def test_stdin_lines(classifier_dir, capsys, monkeypatch):
    lines = predict(capsys, monkeypatch, "--ckpt", classifier_dir, "--input", "-", stdin="a good film\n\nbad\n")
    assert lines[0] == "label\tp(neg)\tp(pos)\ttext"
    assert texts(lines) == ["a good film", "bad"]


@pytest.mark.parametrize("fmt,table", [
    ("tsv", "sentence\tlabel\na good film\tpos\nbad, really\tneg\n"),
    ("csv", 'label,sentence\npos,a good film\nneg,"bad, really"\n'),
    ("jsonl", '{"sentence": "a good film", "label": "pos"}\n{"sentence": "bad, really"}\n'),
])
def test_stdin_with_format_is_a_table(classifier_dir, capsys, monkeypatch, fmt, table):
    lines = predict(capsys, monkeypatch, "--ckpt", classifier_dir, "--input", "-", "--format", fmt, stdin=table)
    assert texts(lines) == ["a good film", "bad, really"]


def test_explicit_text_column_that_is_missing_is_an_error(classifier_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "new.tsv"
    path.write_text("sentence\tlabel\na good film\tpos\n")
    with pytest.raises(ValueError, match=r"no text column 'review' \(the columns are: sentence, label\)"):
        main(["--ckpt", classifier_dir, "--input", str(path), "--text-col", "review"])
    monkeypatch.setattr("sys.stdin", io.StringIO("sentence\na good film\n"))
    with pytest.raises(ValueError, match=r"'review' \(the columns are: sentence\)"):
        main(["--ckpt", classifier_dir, "--input", "-", "--format", "tsv", "--text-col", "review"])


def test_the_trained_column_falls_back_to_a_usual_name(classifier_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps({"id": 7, "text": "a good film"}) + "\n")
    assert texts(predict(capsys, monkeypatch, "--ckpt", classifier_dir, "--input", str(path))) == ["a good film"]


def test_json_output_and_text_flags(classifier_dir, capsys, monkeypatch):
    lines = predict(capsys, monkeypatch, "--ckpt", classifier_dir, "--text", "fine", "--text", "awful", "--json")
    rows = [json.loads(line) for line in lines]
    assert [r["text"] for r in rows] == ["fine", "awful"]
    assert all(r["label"] in LABELS and abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


# ---------------------------------------------------------------------------------------------
# predict_logits and the loaders


def encoded(n=7):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [(torch.randint(3, TOK.vocab_size, (k,), generator=g).tolist(), [0] * k) for k in lengths]


def test_predict_logits_in_input_order():
    model = tiny_classifier()
    enc = encoded()
    got = predict_logits(model, enc, pad_id=0, batch_size=3)
    with torch.no_grad():
        for i in range(len(enc)):
            ids, _, _ = collate(enc, [i], 0)
            torch.testing.assert_close(got[i], model.classify(ids)[0][0], atol=1e-5, rtol=1e-5)


def test_full_and_int8_checkpoints_load_back(classifier_dir, tmp_path):
    model = tiny_classifier()
    enc = encoded()
    want = predict_logits(model, enc, 0)
    loaded, tok, cfg = load_finetuned(classifier_dir)
    assert cfg["labels"] == LABELS and tok.fingerprint() == TOK.fingerprint()
    torch.testing.assert_close(predict_logits(loaded, enc, 0), want)

    qmodel = quantize_model(model, "int8")
    path = save_checkpoint(str(tmp_path), qmodel, model.config, TOK, name="quantized", tensors=quantized_tensors(qmodel),
                           extra_config={"labels": LABELS, "finetune": FINETUNE, "quantized": "int8"})
    qloaded, _, _ = load_finetuned(path)
    assert torch.equal(predict_logits(qloaded, enc, 0), predict_logits(qmodel, enc, 0))  # bit for bit
    with pytest.raises(ValueError, match=r"quantised \(int8\) inference copy cannot be trained further"):
        load_pretrained(path)


def test_lora_checkpoint_is_rebuilt_on_its_base(tmp_path):
    base = tiny_classifier()
    base.score = None
    base.config = base.config.replace(num_labels=0)
    base_dir = save_checkpoint(str(tmp_path / "base"), base, base.config, TOK)
    model, _, info = load_pretrained(base_dir)
    assert info["source"] == "minillm" and info["missing_heads"] == []
    model.add_classifier(2)
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv", "fc"]}
    apply_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
    for m in model.classification_head():  # trains beside the adapters, so it is saved with them
        m.requires_grad_(True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    ft = {**FINETUNE, "method": "lora", "init": base_dir, "lora": lora}
    out = save_checkpoint(str(tmp_path / "lora"), model, model.config, TOK, tensors=lora_state_dict(model),
                          extra_config={"labels": LABELS, "finetune": ft})
    enc = encoded()
    want = predict_logits(model, enc, 0)
    rebuilt, _, _ = load_finetuned(out)
    torch.testing.assert_close(predict_logits(rebuilt, enc, 0), want)
    merged, _, _ = load_pretrained(out)  # the start of a further run: adapters folded in
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(predict_logits(merged, enc, 0), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds LoRA adapters only"):
        load_finetuned(out, base=str(tmp_path / "moved"))


def test_load_pretrained_reports_the_heads_a_hf_directory_lacks(tmp_path):
    model = tiny_classifier()
    save_hf(model, str(tmp_path / "cls"))
    loaded, tok, info = load_pretrained(str(tmp_path / "cls"))
    assert info["source"] == "hf" and info["missing_heads"] == [] and tok is None
    lm = tiny_classifier(num_labels=0)
    lm.score = None
    lm.config = lm.config.replace(num_labels=0)
    save_hf(lm, str(tmp_path / "lm"))  # GPT2LMHeadModel: no classification head
    _, _, info = load_pretrained(str(tmp_path / "lm"), num_labels=2)
    assert info["missing_heads"] == ["score"]
    enc = encoded()
    torch.testing.assert_close(predict_logits(loaded, enc, 0), predict_logits(model, enc, 0), atol=1e-5, rtol=1e-5)
