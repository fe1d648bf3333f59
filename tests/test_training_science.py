"""Keeping the best weights and stopping early, class imbalance (balanced sampling, the decision
threshold, per-class scores) and finetuning's measured defaults: each against a reference that
does not share the code under test (scikit-learn, a brute-force search, a rerun stopped at the
best step, a sequence worked out by hand)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.checkpoint import trained_checkpoint
from minillm.classification_data import LengthBatches
from minillm.metrics import best_threshold, classification_report
from minillm.training import TrainSettings, TrainState, check_keep_best

from test_finetune import QUICK, ROOT, expect_error, predict, run, run_cli, write_tsv
from test_finetune import bert_dir, data, gpt_ckpt, sentences, summary  # noqa: F401  (fixtures)
from test_train import TINY, corpus, metrics, run_train  # noqa: F401

sys.path.insert(0, ROOT)
import finetune  # noqa: E402


# ---------------------------------------------------------------------------------------------
# --keep-best and --early-stopping


def test_observe_keeps_the_best_and_stops_after_patience():
    """A sequence worked out by hand: losses 3, 2, 2.5, 2.4, 1.9, 2.0, 2.1, 2.2, 1.0 with patience
    3 -> best 1.9 at the fifth evaluation, stop at the eighth (the 1.0 after it is never seen)."""
    s = TrainSettings(keep_best="eval_loss", early_stopping=3)
    state, better = TrainState(), []
    for step, loss in enumerate([3.0, 2.0, 2.5, 2.4, 1.9, 2.0, 2.1, 2.2, 1.0], start=1):
        state.step = step
        better.append(state.observe({"eval_loss": loss}, s))
        if state.done(s):
            break
    assert better == [True, True, False, False, True, False, False, False]
    assert (state.best_step, state.best_value, state.step, state.stopped_early) == (5, 1.9, 8, True)
    acc = TrainSettings(keep_best="eval_accuracy")  # higher is better; NaN never is
    state = TrainState()
    assert [state.observe({"eval_accuracy": v}, acc) for v in (0.5, float("nan"), 0.7, 0.7, 0.6)] == \
        [True, False, True, False, False]
    assert not state.stopped_early  # no --early-stopping: never stops
    with pytest.raises(ValueError, match="eval_f1"):
        TrainState().observe({"eval_loss": 1.0}, TrainSettings(keep_best="eval_f1"))


def test_check_keep_best_defaults_and_refusals():
    s = TrainSettings(early_stopping=3)
    check_keep_best(s, ("eval_loss", "eval_accuracy"), "eval_accuracy", True)
    assert s.keep_best == "eval_accuracy"
    for settings_, metrics_, has_eval, words in [
        (TrainSettings(keep_best="val_los"), ("val_loss",), True, "val_los"),
        (TrainSettings(keep_best="val_loss"), ("val_loss",), False, "no evaluation"),
        (TrainSettings(early_stopping=2, eval_interval=0), ("val_loss",), True, "--eval-interval 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_keep_best(settings_, metrics_, "val_loss", has_eval)


def eval_rows(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def test_keep_best_holds_the_weights_of_the_best_step(tmp_path, data, bert_dir):
    """best/ holds the weights of the evaluation with the lowest eval_loss: the same run stopped
    at that step (--stop-at-step: same schedule, same batches) saved identical weights."""
    common = ["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], *QUICK, "--max-steps", "12",
              "--eval-interval", "2", "--lr", "2e-3", "--ckpt-seconds", "1e9"]
    out = tmp_path / "full"
    run([*common, "--keep-best", "eval_loss", "--out", out])
    rows = eval_rows(out, "eval_loss")
    best_step, best_loss = min(rows, key=lambda r: r[1])
    s = summary(out)
    assert s["best"]["step"] == best_step and s["best"]["value"] == pytest.approx(best_loss)
    assert s["best"]["metrics"]["eval_loss"] == pytest.approx(best_loss)
    assert trained_checkpoint(str(out)) == os.path.join(str(out), "best")
    stopped = tmp_path / "stopped"
    run([*common, "--stop-at-step", str(best_step), "--out", stopped])
    kept, reference = load_file(out / "best" / "model.safetensors"), load_file(stopped / "checkpoint" / "model.safetensors")
    assert kept.keys() == reference.keys()
    for k in kept:
        assert torch.equal(kept[k], reference[k]), k
    if best_step != 12:  # the last weights differ from the best ones, and predict reads the best
        last = load_file(out / "checkpoint" / "model.safetensors")
        assert any(not torch.equal(last[k], kept[k]) for k in kept)


def test_early_stopping_stops_at_the_right_evaluation(tmp_path, data, bert_dir):
    """With a learning rate high enough to make the evaluation loss wander, the run stops at the
    first evaluation that is the PATIENCE-th in a row without a new best: worked out from the
    logged losses, not from the code's own state."""
    out = tmp_path / "o"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], *QUICK, "--max-steps", "40",
         "--eval-interval", "1", "--lr", "3e-2", "--early-stopping", "2", "--keep-best", "eval_loss", "--out", out])
    rows = eval_rows(out, "eval_loss")
    best, since, expected_stop = None, 0, None
    for step, loss in rows:
        if best is None or loss < best:
            best, since = loss, 0
        else:
            since += 1
            if since == 2:
                expected_stop = step
                break
    s = summary(out)
    assert expected_stop is not None, rows  # this learning rate does wander
    assert s["steps"] == expected_stop and s["stopped_early"] is True
    assert rows[-1][0] == expected_stop  # no evaluation after it (the final one is that one)
    assert s["best"]["value"] == pytest.approx(min(v for _, v in rows))


def test_train_py_keep_best_and_resume_keep_the_best_so_far(tmp_path, corpus):
    """train.py: best/ follows the lowest val_loss; a resumed run remembers the best value, so a
    worse evaluation after the resume does not replace it."""
    out = tmp_path / "run"
    common = ["--data", corpus, "--out", str(out), *TINY, "--max-steps", "30", "--eval-interval", "5",
              "--keep-best", "val_loss", "--ckpt-interval", "5"]
    run_train([*common, "--stop-at-step", "15"], tmp_path)
    first = json.load(open(out / "checkpoint" / "trainer_state.json"))
    run_train([*common, "--resume"], tmp_path)
    rows = [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    best_step, best = min(rows, key=lambda r: r[1])
    s = json.load(open(out / "summary.json"))
    assert s["best"]["step"] == best_step and s["best"]["value"] == pytest.approx(best)
    assert first["best_value"] == pytest.approx(min(v for step, v in rows if step <= 15))
    assert json.load(open(out / "best" / "config.json"))["best"]["step"] == best_step


# ---------------------------------------------------------------------------------------------
# class imbalance


def test_balanced_sampler_draws_every_class_equally():
    classes = [0] * 13 + [1] * 4 + [2] * 1
    lengths = list(np.random.default_rng(0).integers(1, 30, size=len(classes)))
    b = LengthBatches(lengths, 5, seed=3, classes=classes)
    assert b.epoch_size() == 39
    epoch = np.concatenate([b.next() for _ in range(len(b.order))])
    assert len(epoch) == 39
    assert np.bincount(np.asarray(classes)[epoch]).tolist() == [13, 13, 13]
    times = np.bincount(epoch, minlength=len(classes))
    assert set(times[:13]) == {1}  # the largest class: each example once
    assert set(times[13:17]) <= {3, 4} and times[13:17].sum() == 13  # 13 = 3 x 4 + 1: three or four times
    assert times[17] == 13
    # checkpointable: a copy restored from the state draws the same batches
    state = b.state()
    ahead = [b.next().tolist() for _ in range(10)]
    c = LengthBatches(lengths, 5, seed=3, classes=classes)
    c.load_state(state)
    assert [c.next().tolist() for _ in range(10)] == ahead
    plain = LengthBatches(lengths, 5, seed=3)  # without classes: one pass over the examples
    assert sorted(np.concatenate([plain.next() for _ in range(len(plain.order))]).tolist()) == list(range(18))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.booleans()), min_size=1, max_size=40),
       st.sampled_from(["f1", "positive_f1", "accuracy"]))
def test_best_threshold_matches_brute_force(pairs, metric):
    """Against every distinct score tried one by one, scored by scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score

    scores = torch.tensor([s / 8 for s, _ in pairs])
    y = torch.tensor([int(b) for _, b in pairs])
    score = {"f1": lambda p: f1_score(y, p, average="macro", labels=[0, 1], zero_division=0),
             "positive_f1": lambda p: f1_score(y, p, zero_division=0),
             "accuracy": lambda p: accuracy_score(y, p)}[metric]
    t, value = best_threshold(scores, y, metric)
    brute = max(score((scores >= u).long()) for u in scores.unique())
    assert value == pytest.approx(brute, abs=1e-12)
    assert score((scores >= t).long()) == pytest.approx(brute, abs=1e-12)


def test_per_class_scores_match_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    g = torch.Generator().manual_seed(0)
    y, p = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    p[y == 3] = 0  # a class never predicted: precision 0, not NaN
    r = classification_report(y, p, 4)
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=[0, 1, 2, 3], zero_division=0)
    np.testing.assert_allclose(r["per_class_precision"], precision)
    np.testing.assert_allclose(r["per_class_recall"], recall)
    np.testing.assert_allclose(r["per_class_f1"], f1)
    assert r["support"] == support.tolist()


def test_threshold_is_chosen_saved_and_used_by_predict(tmp_path, data, bert_dir):
    """--threshold auto: the threshold of the final evaluation is the best one for the eval set's
    probabilities (brute force over predict's own output), is saved, and predict applies it."""
    out = tmp_path / "o"
    run(["--init", bert_dir, "--train", data["train"], "--eval", data["eval"], *QUICK, "--max-steps", "30",
         "--lr", "1e-2", "--threshold", "auto", "--sampler", "balanced", "--out", out])
    s = summary(out)
    t = json.load(open(out / "checkpoint" / "config.json"))["finetune"]["threshold"]
    assert t == pytest.approx(s["eval_threshold"])
    assert set(s["eval_per_class"]) == {"neg", "pos"}
    rows = [json.loads(line) for line in predict("--ckpt", out, "--input", data["eval"], "--json").splitlines()]
    p_pos = torch.tensor([r["probabilities"]["pos"] for r in rows], dtype=torch.float64)
    clear = (p_pos - t).abs() > 1e-5  # predict prints 6 decimals
    assert all(r["threshold"] == t for r in rows)
    assert [r["label"] for r, c in zip(rows, clear) if c] == ["pos" if p >= t else "neg" for p, c in zip(p_pos, clear) if c]
    y = torch.tensor([1 if line.split("\t")[1] == "pos" else 0
                      for line in open(data["eval"]).read().splitlines()[1:]])
    from sklearn.metrics import f1_score
    brute = max(f1_score(y, (p_pos >= u).long(), average="macro", labels=[0, 1]) for u in p_pos.unique())
    assert s["eval_f1"] == pytest.approx(brute, abs=1e-6)


def test_imbalance_flags_refuse_bad_input(tmp_path, data, bert_dir):
    three = write_tsv(tmp_path / "three.tsv", sentences(30, 0, labels=("pos", "neg", "neutral")))
    base = ["--init", bert_dir, "--out", tmp_path / "o", "--max-steps", "2", "--no-progress"]
    expect_error(run_cli([*base, "--train", three, "--eval", three, "--threshold", "auto"], tmp_path), "two labels")
    expect_error(run_cli([*base, "--train", data["train"], "--threshold", "auto"], tmp_path), "--eval")
    expect_error(run_cli([*base, "--train", data["train"], "--eval", data["eval"], "--keep-best", "eval_acc"], tmp_path),
                 "eval_acc", "eval_accuracy")
    proc = run_cli([*base, "--train", data["train"], "--threshold", "1.5"], tmp_path)
    assert proc.returncode == 2 and "--threshold" in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "checkpoint")


# ---------------------------------------------------------------------------------------------
# finetuning's defaults


def test_classification_defaults_are_the_measured_best():
    def opts(*flags):
        args = finetune.build_parser().parse_args(["--init", "x", "--train", "t.tsv", *flags])
        return finetune.resolve(args), args

    o, args = opts()
    assert (o["lr"], o["warmup_steps"], args.dropout) == (1e-4, 30, 0.0)
    o, args = opts("--lr", "3e-5", "--warmup-steps", "5", "--dropout", "0.1")
    assert (o["lr"], o["warmup_steps"], args.dropout) == (3e-5, 5, 0.1)
    o, args = opts("--method", "lora")
    assert (o["lr"], o["warmup_steps"], args.dropout) == (5e-4, None, None)  # LoRA keeps its own
    o, args = opts("--task", "lm")
    assert (o["lr"], o["warmup_steps"], args.dropout) == (5e-5, None, None)


# ---------------------------------------------------------------------------------------------
# --task regress and --task multilabel


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.floats(-5, 5, allow_nan=False)), min_size=3, max_size=30))
def test_regression_report_matches_scipy_and_sklearn(pairs):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error, r2_score

    from minillm.metrics import regression_report

    p = np.array([a for a, _ in pairs], dtype=np.float64)
    y = np.array([b for _, b in pairs], dtype=np.float64)
    r = regression_report(torch.tensor(p), torch.tensor(y))
    assert r["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-9, abs=1e-12)
    if np.ptp(y) > 1e-6 and np.ptp(p) > 0:
        assert r["r2"] == pytest.approx(r2_score(y, p), rel=1e-9, abs=1e-9)
        assert r["pearson"] == pytest.approx(pearsonr(p, y)[0], abs=1e-9)
        assert r["spearman"] == pytest.approx(spearmanr(p, y)[0], abs=1e-9)  # ties: average ranks
    elif np.ptp(p) == 0:
        assert np.isnan(r["pearson"])  # undefined for a constant prediction


def test_multilabel_report_matches_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, precision_score

    g = torch.Generator().manual_seed(1)
    p, y = (torch.rand(80, 5, generator=g) > 0.5).long(), (torch.rand(80, 5, generator=g) > 0.6).long()
    p[:, 3], y[:, 4] = 0, 0  # a label never predicted, one never true
    from minillm.metrics import multilabel_report

    r = multilabel_report(p, y)
    assert r["micro_f1"] == pytest.approx(f1_score(y, p, average="micro", zero_division=0))
    assert r["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert r["micro_precision"] == pytest.approx(precision_score(y, p, average="micro", zero_division=0))
    assert r["subset_accuracy"] == pytest.approx(accuracy_score(y, p))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, zero_division=0)
    np.testing.assert_allclose(r["per_class_f1"], f1)
    np.testing.assert_allclose(r["per_class_recall"], recall)
    assert r["support"] == support.tolist()


WORDS = {"good": (4.0, ["pos"]), "great": (4.5, ["pos", "strong"]), "bad": (1.0, ["neg"]), "awful": (0.5, ["neg", "strong"]),
         "plot": (2.5, [])}


def scored_rows(n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(sorted(WORDS))
        rows.append((" ".join(rng.choices(["the", "movie", "was", "a", "film"], k=rng.randint(1, 4)) + [w]), *WORDS[w]))
    return rows


def test_regress_end_to_end_against_scipy_and_transformers(tmp_path, bert_dir):
    """--task regress: the summary's metrics equal scipy's and scikit-learn's on predict's values,
    and transformers, loading the --export-hf copy, computes the same values."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    train = write_tsv(tmp_path / "train.tsv", [(t, v) for t, v, _ in scored_rows(60, 0)], header=("sentence", "score"))
    dev = write_tsv(tmp_path / "dev.tsv", [(t, v) for t, v, _ in scored_rows(20, 1)], header=("sentence", "score"))
    out, hf = tmp_path / "o", tmp_path / "hf"
    run(["--init", bert_dir, "--task", "regress", "--train", train, "--eval", dev, "--label-col", "score", *QUICK,
         "--max-steps", "20", "--lr", "1e-2", "--out", out, "--export-hf", hf])
    s = summary(out)
    values = np.array([json.loads(line)["value"] for line in predict("--ckpt", out, "--input", dev, "--json").splitlines()])
    y = np.array([float(line.split("\t")[1]) for line in open(dev).read().splitlines()[1:]])
    assert s["eval_mse"] == pytest.approx(mean_squared_error(y, values), abs=1e-4)
    assert s["eval_pearson"] == pytest.approx(pearsonr(values, y)[0], abs=1e-4)
    assert s["eval_spearman"] == pytest.approx(spearmanr(values, y)[0], abs=1e-4)
    from transformers import BertForSequenceClassification

    from minillm.tokenizer import load_tokenizer

    model = BertForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    tok = load_tokenizer(str(out / "checkpoint"))
    text = open(dev).read().splitlines()[1].split("\t")[0]
    ids = torch.tensor([tok.tok.encode(text).ids])
    with torch.no_grad():
        hf_value = model(input_ids=ids).logits[0, 0].item()
    assert hf_value == pytest.approx(values[0], abs=1e-4)


def test_multilabel_end_to_end_against_sklearn(tmp_path, bert_dir):
    """--task multilabel on JSONL label lists: the summary's micro and macro F1 equal
    scikit-learn's on predict's probabilities at the threshold, and predict names the labels."""
    from sklearn.metrics import f1_score

    def jsonl(path, rows):
        path.write_text("".join(json.dumps({"text": t, "tags": tags}) + "\n" for t, _, tags in rows))
        return str(path)
    train, dev = jsonl(tmp_path / "train.jsonl", scored_rows(80, 0)), jsonl(tmp_path / "dev.jsonl", scored_rows(24, 1))
    out = tmp_path / "o"
    run(["--init", bert_dir, "--task", "multilabel", "--train", train, "--eval", dev, "--label-col", "tags", *QUICK,
         "--max-steps", "40", "--lr", "1e-2", "--threshold", "0.4", "--out", out])
    s = summary(out)
    assert set(s["eval_per_class"]) == {"neg", "pos", "strong"}
    rows = [json.loads(line) for line in predict("--ckpt", out, "--input", dev, "--json").splitlines()]
    names = ["neg", "pos", "strong"]
    probs = np.array([[r["probabilities"][n] for n in names] for r in rows])
    y = np.array([[n in json.loads(line)["tags"] for n in names] for line in open(dev)])
    pred = probs >= 0.4
    assert [r["labels"] for r in rows] == [[n for n, p in zip(names, row) if p] for row in pred]
    assert s["eval_micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-9)
    assert s["eval_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    assert s["eval_micro_f1"] > 0.5  # it learned the tags (chance with 3 tags is far lower)


def test_regress_and_multilabel_heads_on_a_gpt(tmp_path, gpt_ckpt):
    """A GPT reads its last real token for both heads; predict serves both."""
    train = write_tsv(tmp_path / "train.tsv", [(t, v) for t, v, _ in scored_rows(40, 0)])
    run(["--init", gpt_ckpt, "--task", "regress", "--train", train, "--eval", train, *QUICK, "--max-steps", "4",
         "--out", tmp_path / "r"])
    s = summary(tmp_path / "r")
    assert s["task"] == "regress" and {"eval_mse", "eval_pearson", "eval_spearman", "eval_r2"} <= set(s)
    value = json.loads(predict("--ckpt", tmp_path / "r", "--text", "a good film", "--json"))["value"]
    assert isinstance(value, float)
    tags = write_tsv(tmp_path / "tags.tsv", [(t, ",".join(tags)) for t, _, tags in scored_rows(40, 0)])
    run(["--init", gpt_ckpt, "--task", "multilabel", "--train", tags, "--eval", tags, *QUICK, "--max-steps", "4",
         "--out", tmp_path / "m"])
    out = json.loads(predict("--ckpt", tmp_path / "m", "--text", "a good film", "--json"))
    assert set(out["probabilities"]) == {"neg", "pos", "strong"} and out["threshold"] == 0.5


def test_scored_tasks_refuse_bad_input(tmp_path, bert_dir):
    bad = write_tsv(tmp_path / "bad.tsv", [("good film", "4.0"), ("bad film", "lots")], header=("sentence", "label"))
    base = ["--init", bert_dir, "--out", tmp_path / "o", "--max-steps", "2", "--no-progress"]
    expect_error(run_cli([*base, "--task", "regress", "--train", bad], tmp_path), "bad.tsv:3", "'lots'", "number")
    expect_error(run_cli([*base, "--task", "multilabel", "--train", bad, "--threshold", "auto"], tmp_path),
                 "fixed --threshold")
    expect_error(run_cli([*base, "--task", "regress", "--train", bad, "--sampler", "balanced"], tmp_path), "--sampler")


def test_imbalance_benchmark_end_to_end_tiny(tmp_path, bert_dir):
    """minillm.benchmarks.imbalance on a tiny BERT and SST-2-shaped files: the training set it writes has
    the asked share of positives and every negative, each method's row is there, and its scores
    are those of the saved model (the summary's macro-F1 at its own decision rule)."""
    d = tmp_path / "sst2"
    d.mkdir()
    rows = sentences(120, 0, labels=("1", "0"))
    write_tsv(d / "train.tsv", rows)
    write_tsv(d / "dev.tsv", sentences(24, 1, labels=("1", "0")))
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "minillm.benchmarks.imbalance", "--init", bert_dir, "--data", str(d),
                           "--out", str(out), "--budget", "2", "--positive-share", "0.2"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = [line.split("\t")[1] for line in open(out / "train.tsv").read().splitlines()[1:]]
    assert written.count("0") == 60 and written.count("1") == 15  # 15 / 75 = 20%
    result = json.load(open(out / "imbalance.json"))
    assert [r["method"] for r in result["rows"]] == ["none", "weights", "balanced", "threshold"]
    for r in result["rows"]:
        assert r["macro_f1"] == pytest.approx(r["summary_macro_f1"], abs=1e-6), r
    threshold = result["rows"][-1]
    assert threshold["threshold"] is not None and 0 <= threshold["cross_fitted_macro_f1"] <= 1
    assert "| threshold |" in proc.stdout


def test_a_compiling_step_does_not_spend_the_time_budget():
    """The first step of a compiled model is compile time (not charged, see TrainState.advance):
    it must not end a run whose budget is shorter than the compilation either."""
    s, state = TrainSettings(time_budget=5.0), TrainState(elapsed=4.0)
    assert not state.time_up(s, 12.0, compiling=True)
    assert state.time_up(s, 1.5) and not state.time_up(s, 0.5)
