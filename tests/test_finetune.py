"""finetune.py end to end on tiny models and tiny data: every task and method, LoRA merge, resume,
the Hugging Face round trip, the int8 copy, prediction, and bad input (one line, exit code 2).

Most runs call finetune.main() in this process (fast); the command-line contract (exit code 2,
one line on stderr) is checked through subprocesses."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from minillm import BERT, GPT, preset
from minillm.checkpoint import save_checkpoint
from minillm.hf_import import save_hf
from minillm.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune  # noqa: E402

POS, NEG, FILL = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "movie", "was", "a", "plot", "it", "film"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILL, "neutral", ",", "."]
QUICK = ["--no-progress", "--batch-size", "8", "--log-interval", "1", "--warmup-steps", "2", "--dtype", "float32"]


def sentences(n, seed, labels=("pos", "neg")):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        word = rng.choice(POS if label in ("pos", "1") else NEG if label in ("neg", "0") else ["neutral"])
        words = rng.choices(FILL, k=rng.randint(1, 8)) + [word] + rng.choices(FILL, k=rng.randint(0, 4))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"train": write_tsv(d / "train.tsv", sentences(48, 0)), "eval": write_tsv(d / "dev.tsv", sentences(16, 1)),
            "dir": d}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT in Hugging Face format (config.json, model.safetensors, vocab.txt)."""
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = BERT(preset("bert-tiny", n_layer=2, n_head=2, n_embd=32, n_inner=64, block_size=64,
                        vocab_size=len(VOCAB), dropout=0.0, attn_dropout=0.0))
    save_hf(model, str(d))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(d)


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory):
    """A tiny GPT checkpoint as train.py writes it (character tokenizer)."""
    d = tmp_path_factory.mktemp("gpt")
    tok = CharTokenizer.train("".join(VOCAB) + " abcdefghijklmnopqrstuvwxyz?!\n")
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)
    save_checkpoint(str(d), GPT(cfg), cfg, tok)
    return str(d)


def run(args, tmp_path=None):
    assert finetune.main([str(a) for a in args]) == 0


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def metric_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def predict(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minillm.predict", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def probs_of(stdout):
    lines = stdout.strip().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


# ---------------------------------------------------------------------------------------------
# classification


def test_classify_full_bert_outputs_metrics_and_predicts(tmp_path, data, bert_dir):
    out = tmp_path / "run"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--max-steps", "6",
         "--eval-interval", "3", "--lr", "1e-3", "--out", out, *QUICK])
    s = summary(out)
    for key in ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "eval_confusion", "ex_per_s"):
        assert key in s, key
    assert s["steps"] == 6 and 0 <= s["eval_accuracy"] <= 1 and sum(map(sum, s["eval_confusion"])) == 16
    evals = [r for r in metric_rows(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("eval_confusion" in r for r in evals)
    cfg = json.load(open(out / "checkpoint" / "config.json"))
    assert cfg["labels"] == ["neg", "pos"] and cfg["model"]["num_labels"] == 2
    assert os.path.exists(out / "checkpoint" / "tokenizer.json")
    header, rows = probs_of(predict("--ckpt", out, "--text", "good good film", "--text", "bad plot"))
    assert header == ["label", "p(neg)", "p(pos)", "text"]
    assert [r[3] for r in rows] == ["good good film", "bad plot"]
    for r in rows:
        assert r[0] in ("neg", "pos") and abs(float(r[1]) + float(r[2]) - 1) < 1e-3
        assert r[0] == ("pos" if float(r[2]) > float(r[1]) else "neg")
    # a file of the training format (its text column), as JSON lines
    lines = predict("--ckpt", out, "--input", data["eval"], "--json").strip().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])["probabilities"]) == {"neg", "pos"}


def test_classify_gpt_pairs_csv_integer_labels_class_weights(tmp_path, gpt_ckpt):
    rows = [(a, b, int(la == "pos")) for (a, la), (b, _) in zip(sentences(30, 2), sentences(30, 3))]
    rows += [(a, "x", 2) for a, _ in sentences(6, 4)]  # a rare third class
    train = tmp_path / "pairs.csv"
    train.write_text("first,second,y\n" + "\n".join(f'"{a}","{b}",{y}' for a, b, y in rows) + "\n")
    out = tmp_path / "gpt"
    run(["--init", gpt_ckpt, "--train", train, "--eval", train, "--text-col", "first", "--text-pair-col", "second",
         "--label-col", "y", "--class-weights", "auto", "--max-steps", "3", "--eval-interval", "0", "--out", out,
         *QUICK])
    s = summary(out)
    assert len(s["eval_confusion"]) == 3
    cfg = json.load(open(out / "checkpoint" / "config.json"))
    assert cfg["labels"] == ["0", "1", "2"] and cfg["finetune"]["text_pair_col"] == "second"
    header, rows = probs_of(predict("--ckpt", out, "--input", train))
    assert header[:4] == ["label", "p(0)", "p(1)", "p(2)"] and len(rows) == 36 and " ||| " in rows[0][-1]


def test_head_and_frozen_layers_train_only_what_they_say(tmp_path, data, bert_dir):
    from safetensors.torch import load_file

    base = load_file(os.path.join(bert_dir, "model.safetensors"))
    common = ["--init", bert_dir, "--train", data["train"], "--max-steps", "3", "--lr", "1e-2", *QUICK]
    run([*common, "--method", "head", "--out", tmp_path / "head"])
    w = load_file(tmp_path / "head" / "checkpoint" / "model.safetensors")
    assert torch.equal(w["blocks.1.mlp.fc.weight"], base["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(w["tok_emb.weight"], base["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(w["pooler.weight"], base["bert.pooler.dense.weight"])  # the pooler is part of the head
    run([*common, "--freeze-layers", "1", "--out", tmp_path / "frozen"])
    w = load_file(tmp_path / "frozen" / "checkpoint" / "model.safetensors")
    assert torch.equal(w["tok_emb.weight"], base["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(w["blocks.0.attn.proj.weight"], base["bert.encoder.layer.0.attention.output.dense.weight"])
    assert not torch.equal(w["blocks.1.attn.proj.weight"], base["bert.encoder.layer.1.attention.output.dense.weight"])


def test_init_from_pytorch_model_bin(tmp_path, data, bert_dir):
    """A Hugging Face directory with pytorch_model.bin (read with weights_only) instead of safetensors."""
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "bin"
    d.mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copy(os.path.join(bert_dir, name), d / name)
    torch.save(load_file(os.path.join(bert_dir, "model.safetensors")), d / "pytorch_model.bin")
    run(["--init", d, "--train", data["train"], "--max-steps", "1", "--out", tmp_path / "o", *QUICK])
    assert summary(tmp_path / "o")["steps"] == 1


def test_lora_saves_adapters_merges_and_predicts_the_same(tmp_path, data, bert_dir):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--method", "lora", "--lora-rank", "4",
         "--lora-targets", "qkv,fc", "--max-steps", "4", "--lr", "1e-2", "--merge", "--pooling", "mean",
         "--out", out, *QUICK])
    adapters = load_file(out / "checkpoint" / "model.safetensors")
    assert all(".lora_" in k or k.startswith("classifier.") for k in adapters)  # mean pooling: no pooler
    assert len([k for k in adapters if ".lora_" in k]) == 2 * 2 * 2
    s = summary(out)
    assert s["trainable_parameters"] < s["parameters"] / 5 and os.path.isdir(s["merged_checkpoint"])
    # adapters on the recorded base, and the merged weights, give the same probabilities
    texts = ["--text", "good film", "--text", "the plot was awful"]
    _, a = probs_of(predict("--ckpt", out, *texts))
    _, m = probs_of(predict("--ckpt", out / "merged", *texts))
    for ra, rm in zip(a, m):
        assert ra[0] == rm[0] and all(abs(float(x) - float(y)) < 1e-4 for x, y in zip(ra[1:3], rm[1:3]))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_continues_exactly(tmp_path, data, bert_dir, method):
    from safetensors.torch import load_file

    common = ["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--method", method,
              "--max-steps", "8", "--eval-interval", "4", "--dropout", "0.1", "--lr", "1e-3", *QUICK]
    run([*common, "--out", tmp_path / "a"])
    run([*common, "--out", tmp_path / "b", "--stop-at-step", "5"])
    run([*common, "--out", tmp_path / "b", "--resume"])
    la = {r["step"]: r.get("train_loss") for r in metric_rows(tmp_path / "a")}
    lb = {r["step"]: r.get("train_loss") for r in metric_rows(tmp_path / "b")}
    assert la == lb and sorted(la) == list(range(1, 9))
    wa = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# export: transformers reproduces the finetuned model; the int8 copy


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_export_hf_round_trip(tmp_path, data, bert_dir, gpt_ckpt, arch):
    from transformers import BertForSequenceClassification, GPT2ForSequenceClassification

    from minillm.checkpoint import find_checkpoint
    from minillm.predict import load_finetuned

    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    init = bert_dir if arch == "bert" else gpt_ckpt
    method = ["--method", "lora", "--lora-rank", "2"] if arch == "bert" else []
    run(["--init", init, "--train", data["train"], "--max-steps", "3", "--lr", "1e-2", "--out", out,
         "--export-hf", hf_dir, *method, *QUICK])
    cls = BertForSequenceClassification if arch == "bert" else GPT2ForSequenceClassification
    theirs = cls.from_pretrained(hf_dir, attn_implementation="eager").eval()
    assert theirs.config.id2label == {0: "neg", 1: "pos"}
    ours, tok, _ = load_finetuned(find_checkpoint(str(out)))
    ours.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, tok.vocab_size, (3, 9), generator=g)
    with torch.no_grad():
        a = ours.classify(x)[0]
        b = theirs(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-5
    if arch == "bert":  # padding too, and the tokenizer files travel with the weights
        mask = torch.ones_like(x)
        mask[1, 5:] = 0
        with torch.no_grad():
            assert (ours.classify(x, mask)[0] - theirs(input_ids=x, attention_mask=mask).logits).abs().max() < 1e-5
        assert os.path.exists(hf_dir / "vocab.txt")


def test_quantize_int8_reports_and_predicts(tmp_path, data, bert_dir):
    out = tmp_path / "q"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], "--max-steps", "3", "--lr", "1e-2",
         "--quantize", "int8", "--out", out, *QUICK])
    q = summary(out)["quantized"]
    assert q["quantized_bytes"] < q["float_bytes"] and os.path.exists(q["checkpoint"])
    assert 0 <= q["quantized_eval_accuracy"] <= 1 and q["float_eval_accuracy"] == pytest.approx(summary(out)["eval_accuracy"])
    _, fl = probs_of(predict("--ckpt", out, "--text", "good film"))
    _, qu = probs_of(predict("--ckpt", out / "quantized", "--text", "good film"))
    assert abs(float(fl[0][2]) - float(qu[0][2])) < 0.05


# ---------------------------------------------------------------------------------------------
# language modelling


def test_lm_gpt_text_and_instructions(tmp_path, gpt_ckpt):
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(w for s, _ in sentences(80, 5) for w in s.split()) * 2)
    run(["--init", gpt_ckpt, "--task", "lm", "--train", text, "--max-len", "32", "--max-steps", "3",
         "--eval-iters", "2", "--out", tmp_path / "cpt", *QUICK])
    s = summary(tmp_path / "cpt")
    assert s["eval_loss"] > 0 and s["eval_ppl"] > 1 and s["tok_per_s"] > 0
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": f"review: {a}\nsentiment:", "response": f" {la}"})
                             for a, la in sentences(24, 6)) + "\n")
    run(["--init", gpt_ckpt, "--task", "lm", "--train", sft, "--eval", sft, "--method", "lora", "--max-steps", "3",
         "--out", tmp_path / "sft", *QUICK])
    assert summary(tmp_path / "sft")["eval_loss"] > 0
    # the LoRA (adapters-only) checkpoint samples through minillm.generate, on its recorded base model
    from minillm.generate import main as generate

    assert generate(["--ckpt", str(tmp_path / "sft"), "--prompt", "review: good\nsentiment:", "--tokens", "3"]) == 0


def test_generate_refuses_a_classifier(tmp_path, data, gpt_ckpt):
    from minillm.generate import main as generate

    run(["--init", gpt_ckpt, "--train", data["train"], "--max-steps", "1", "--out", tmp_path / "cls", *QUICK])
    with pytest.raises(ValueError, match="holds a classifier"):
        generate(["--ckpt", str(tmp_path / "cls"), "--tokens", "3"])


def test_lm_bert_masked(tmp_path, bert_dir):
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(s for s, _ in sentences(200, 7)))
    run(["--init", bert_dir, "--task", "lm", "--train", text, "--max-len", "16", "--max-steps", "2",
         "--eval-iters", "2", "--out", tmp_path / "mlm", *QUICK])
    assert summary(tmp_path / "mlm")["eval_loss"] > 0


# ---------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2 weights (skipped without the package)


def test_minilm_lora_steps_and_round_trip(tmp_path, minilm_dir):
    from transformers import BertForSequenceClassification
    from transformers import logging as hf_logging

    minilm = minilm_dir
    rows = [("a gorgeous , witty film", 1), ("dull and lifeless", 0)] * 8
    train = write_tsv(tmp_path / "t.tsv", rows)
    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    run(["--init", minilm, "--train", train, "--eval", train, "--method", "lora", "--max-steps", "2", "--lr", "1e-3",
         "--out", out, "--export-hf", hf_dir, *QUICK])
    hf_logging.set_verbosity_error()
    theirs = BertForSequenceClassification.from_pretrained(hf_dir, attn_implementation="eager").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    batch = tok(["a gorgeous , witty film", "dull"], padding=True, return_tensors="pt")
    from minillm.predict import load_finetuned

    ours, _, _ = load_finetuned(str(out))
    ours.eval()
    with torch.no_grad():
        a = ours.classify(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0]
        b = theirs(**batch).logits
    assert (a - b).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit code 2


def run_cli(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def expect_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("finetune.py: error:")
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_dtype_auto_is_chosen_once_and_kept(tmp_path, data, bert_dir):
    """--dtype auto times a step and picks; the checkpoint keeps the choice, and --resume runs on in it."""
    out = tmp_path / "o"
    run(["--init", bert_dir, "--train", data["train"], "--out", out, *QUICK, "--dtype", "auto", "--max-steps", "3",
         "--stop-at-step", "1"])
    chosen = json.load(open(out / "checkpoint" / "config.json"))["train"]["dtype"]
    assert chosen in ("float32", "bfloat16")
    run(["--init", bert_dir, "--train", data["train"], "--out", out, "--no-progress", "--resume", "--max-steps", "3"])
    assert summary(out)["dtype"] == chosen and summary(out)["steps"] == 3


def test_bad_input_cli_exit_2(tmp_path, data, bert_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
    expect_error(run_cli(["--init", bert_dir, "--train", bad, "--out", tmp_path / "o"], tmp_path), "bad.tsv:3")
    weird = tmp_path / "llama"
    weird.mkdir()
    (weird / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    expect_error(run_cli(["--init", weird, "--train", data["train"], "--out", tmp_path / "o"], tmp_path),
                 "'llama'", "neither 'gpt2' nor 'bert'")


@pytest.mark.parametrize("case", ["no-label-col", "single-class", "jsonl-line", "eval-label", "tokenizer", "not-a-model",
                                  "head-lm", "export-mean", "resume-none", "sft-bert", "device"])
def test_bad_input_messages(tmp_path, data, bert_dir, gpt_ckpt, case):
    d = tmp_path
    args = ["--init", bert_dir, "--train", data["train"], "--out", d / "o", "--max-steps", "1", *QUICK]
    if case == "no-label-col":
        args += ["--label-col", "sentiment"]
        words = ["no label column 'sentiment'", "sentence, label"]
    elif case == "single-class":
        args[3] = write_tsv(d / "one.tsv", [(s, "pos") for s, _ in sentences(5, 0)])
        words = ["single class", "'pos'"]
    elif case == "jsonl-line":
        (d / "t.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": oops}\n')
        args[3] = str(d / "t.jsonl")
        words = ["t.jsonl:3", "not valid JSON"]
    elif case == "eval-label":
        args += ["--eval", write_tsv(d / "dev.tsv", [("good", "pos"), ("meh", "mixed")])]
        words = ["dev.tsv:3", "'mixed'"]
    elif case == "tokenizer":
        CharTokenizer.train("abc").save(str(d))
        args += ["--tokenizer", str(d / "char_tokenizer.json")]
        words = ["tokenizer", "tokens but the model's vocabulary holds"]
    elif case == "not-a-model":
        args[1] = str(d)
        words = ["neither a minillm checkpoint", "nor a Hugging Face GPT-2/BERT directory"]
    elif case == "head-lm":
        args += ["--method", "head", "--task", "lm"]
        words = ["--method head needs --task classify"]
    elif case == "export-mean":
        args += ["--pooling", "mean", "--export-hf", str(d / "hf")]
        words = ["Hugging Face", "classifier_pooling=mean"]
    elif case == "resume-none":
        args += ["--resume"]
        words = ["--resume", "no checkpoint"]
    elif case == "device":
        spec = "cuda:99" if torch.cuda.is_available() else "cuda"
        args += ["--device", spec]
        words = [f"--device {spec}", "numbered" if torch.cuda.is_available() else "no CUDA GPU"]
    else:
        (d / "p.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
        args[3] = str(d / "p.jsonl")
        args += ["--task", "lm"]
        words = ["instruction tuning", "needs a GPT"]
    expect_value_error(args, words)


def expect_value_error(args, words):
    """finetune.main refuses `args` with one line holding every one of `words`."""
    with pytest.raises(ValueError) as e:
        finetune.main([str(a) for a in args])
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", [["finetune.py"], ["train.py"], ["-m", "minillm.predict"], ["-m", "minillm.generate"],
                                     ["-m", "minillm.export"], ["-m", "minillm.prune"],
                                     ["-m", "minillm.benchmarks.compression"]])
def test_help_of_every_command(command):
    """--help prints (finetune.py's once crashed: a default of '6% of the steps' in an argparse help string)."""
    proc = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-500:]
