"""Readers (TSV, CSV, JSONL), the label mapping, tokenising, length-bucketed batches, the
instruction-tuning targets, and the classification metrics."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.classification_data import (
    Example, LabelMap, LengthBatches, class_weights, collate, encode_examples, encode_instructions, eval_order,
    read_table, to_examples,
)
from minillm.metrics import classification_report, confusion_matrix, format_confusion
from minillm.tokenizer import CharTokenizer, load_tokenizer


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_tsv_csv_jsonl_read_the_same_examples(tmp_path):
    tsv = write(tmp_path / "a.tsv", "\ufeffsentence\tlabel\nit is good\t1\n\nbad , bad film\t0\n")
    csv_ = write(tmp_path / "a.csv", 'sentence,label\n"it is good",1\n"bad , bad film",0\n\n')
    jsonl = write(tmp_path / "a.jsonl", '{"sentence": "it is good", "label": 1}\n\n{"sentence": "bad , bad film", "label": "0"}\n')
    got = []
    for path in (tsv, csv_, jsonl):
        table = read_table(path)
        assert table.columns[:2] == ["sentence", "label"]  # the BOM is not part of the first name
        got.append([(e.text, e.label) for e in to_examples(table, "sentence", "label")])
    assert got[0] == got[1] == got[2] == [("it is good", "1"), ("bad , bad film", "0")]
    # line numbers count the empty lines
    assert [e.line for e in to_examples(read_table(tsv), "sentence", "label")] == [2, 4]


def test_csv_quoting_and_pairs(tmp_path):
    path = write(tmp_path / "p.csv", 'premise,hypothesis,label\n"a man, a plan","he said ""hi""\nthen left",yes\n'
                                     'x,y,no\n')
    ex = to_examples(read_table(path), "premise", "label", "hypothesis")
    assert ex[0].text == "a man, a plan" and ex[0].text_pair == 'he said "hi"\nthen left' and ex[0].label == "yes"
    assert ex[1].line == 4  # the quoted field spanned lines 2-3


@pytest.mark.parametrize("name, text, words", [
    ("bad.tsv", "sentence\tlabel\nfine\t1\ntoo\tmany\tfields\n", ["bad.tsv:3", "expected 2", "found 3"]),
    ("bad.csv", 'sentence,label\nok,1\n"never closed,0\n', ["bad.csv", "CSV"]),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', ["bad.jsonl:2", "not valid JSON"]),
    ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', ["list.jsonl:2", "JSON object"]),
    ("empty.tsv", "\n\n", ["empty.tsv", "empty"]),
    ("dup.csv", "a,a\n1,2\n", ["dup.csv:1", "twice"]),
    ("data.xlsx", "x", ["data.xlsx", "extension"]),
])
def test_unparsable_rows_name_their_line(tmp_path, name, text, words):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError) as e:
        to_examples(read_table(path), "text", "label")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes("text\tlabel\nfine\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.tsv:3: not UTF-8"):
        read_table(str(path))


def test_missing_columns_and_bad_labels(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tstars\ngood\t5\nbad\t1\n")
    with pytest.raises(ValueError, match=r"no label column 'label' \(the columns are: text, stars\)"):
        to_examples(read_table(path), "text", "label")
    with pytest.raises(ValueError, match="no text column 'sentence'"):
        to_examples(read_table(path), "sentence", "stars")
    one = write(tmp_path / "one.tsv", "text\tlabel\ngood\tpos\nfine\tpos\n")
    with pytest.raises(ValueError, match="single class"):
        LabelMap.from_examples(to_examples(read_table(one), "text", "label"), one, "label")
    blank = write(tmp_path / "blank.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(ValueError, match=r"blank.jsonl:2: label column 'label' holds null"):
        to_examples(read_table(blank), "text", "label")
    missing = write(tmp_path / "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: the row has no label column 'label'"):
        to_examples(read_table(missing), "text", "label")


def test_label_map_orders_and_refuses_unseen_labels(tmp_path):
    ex = [Example("t", None, label, i) for i, label in enumerate(["10", "2", "0", "2"])]
    assert LabelMap.from_examples(ex, "f", "label").names == ["0", "2", "10"]  # numeric order
    ex = [Example("t", None, label, i) for i, label in enumerate(["pos", "neg", "neutral"])]
    labels = LabelMap.from_examples(ex, "f", "label")
    assert labels.names == ["neg", "neutral", "pos"] and labels.encode(ex, "f") == [2, 0, 1]
    with pytest.raises(ValueError, match=r"dev.tsv:7: label 'mixed' does not occur in the training data"):
        labels.encode([Example("t", None, "mixed", 7)], "dev.tsv")


def test_class_weights_balance_the_classes():
    w = class_weights([0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    counts = torch.tensor([3.0, 1.0])
    assert torch.allclose((w * counts)[0], (w * counts)[1])


def test_encode_pairs_and_truncation(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "good", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(str(tmp_path))
    ex = [Example("good film", "a b", None, 1), Example("a b c a b c a b c", None, None, 2)]
    (ids0, types0), (ids1, types1) = encode_examples(tok, ex, max_len=6)
    assert ids0 == [2, 8, 9, 3, 5, 3] and types0 == [0, 0, 0, 0, 1, 1]  # cut to 6, the final [SEP] kept
    assert len(ids1) == 6 and ids1[0] == 2 and ids1[-1] == 3
    char = CharTokenizer.train("abc ")
    (ids, types), = encode_examples(char, [Example("ab", "c", None, 1)], max_len=10)
    assert ids == char.encode("ab") + [char.eos_id] + char.encode("c") and types == [0, 0, 1, 1]


def test_instruction_targets_cover_only_the_response(tmp_path):
    tok = CharTokenizer.train("abcdefgh?!")
    path = write(tmp_path / "sft.jsonl", '{"prompt": "abc?", "response": "de"}\n{"prompt": "", "response": "fgh"}\n')
    (ids, tg), (ids2, tg2) = encode_instructions(tok, read_table(path), max_len=32)
    seq = tok.encode("abc?") + tok.encode("de") + [tok.eos_id]
    assert ids == seq[:-1]
    assert tg == [-100, -100, -100] + seq[4:]  # positions 3.. predict "d", "e", <eos>
    assert ids2 == tok.encode("fgh") and tg2 == tok.encode("gh") + [tok.eos_id]
    long = write(tmp_path / "long.jsonl", '{"prompt": "abcdefgh", "response": "??"}\n{"prompt": "a", "response": "bbbbbbbbbb"}\n')
    (ids, tg), (ids2, tg2) = encode_instructions(tok, read_table(long), max_len=5)
    assert tok.decode(ids) == "fgh??" and tg == [-100, -100] + tok.encode("??") + [tok.eos_id]  # the prompt's end kept
    assert tok.decode(ids2) == "abbbb" and tg2 == tok.encode("bbbbb")  # the response cut, one prompt token kept
    empty = write(tmp_path / "empty.jsonl", '{"prompt": "abc", "response": ""}\n')
    with pytest.raises(ValueError, match="empty.jsonl:1"):
        encode_instructions(CharTokenizer(list("abc"), byte_fallback=False), read_table(empty), max_len=8)


def test_collate_pads_right_and_masks():
    seqs = [([5, 6, 7], [0, 0, 1]), ([8], [0])]
    ids, types, mask = collate(seqs, [0, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and types.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    _, targets, _ = collate([([1, 2], [2, 3]), ([1], [4])], [0, 1], pad_id=0, pad_second=-100)
    assert targets.tolist() == [[2, 3], [4, -100]]


@given(st.lists(st.integers(1, 60), min_size=1, max_size=300), st.integers(1, 16), st.booleans())
def test_length_batches_cover_each_example_once_per_epoch(lengths, bs, bucket):
    b = LengthBatches(lengths, bs, seed=0, bucket=bucket, pool=4)
    n_batches = len(b.order)
    seen = np.concatenate([b.next() for _ in range(n_batches)])
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    assert all(len(x) <= bs for x in b.order)


def test_bucketing_reduces_padding_and_resumes_exactly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, size=2000)
    padded = {}
    for bucket in (False, True):
        b = LengthBatches(lengths, 32, seed=1, bucket=bucket)
        padded[bucket] = sum(lengths[x].max() * len(x) for x in b.order)
    assert padded[True] < 0.6 * padded[False]
    a = LengthBatches(lengths, 32, seed=3)
    for _ in range(70):  # into the second epoch
        a.next()
    st_ = a.state()
    expected = [a.next().tolist() for _ in range(10)]
    b = LengthBatches(lengths, 32, seed=99)
    b.load_state(st_)
    assert [b.next().tolist() for _ in range(10)] == expected
    order = eval_order(lengths, 100)
    assert sorted(np.concatenate(order).tolist()) == list(range(2000))


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 1, 0, 1, 0, 1]
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    r = classification_report(y, p, 3)
    assert r["accuracy"] == pytest.approx(3 / 6)
    prec = [2 / 3, 1 / 3, 0.0]  # class 2 is never predicted: precision 0, not NaN
    rec = [2 / 3, 1 / 2, 0.0]
    f1 = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(prec, rec)]
    assert r["precision"] == pytest.approx(sum(prec) / 3)
    assert r["recall"] == pytest.approx(sum(rec) / 3)
    assert r["f1"] == pytest.approx(sum(f1) / 3)
    assert json.loads(json.dumps(r))["confusion"] == cm.tolist()
    table = format_confusion(cm, ["neg", "neu", "pos"])
    assert table.splitlines()[1].split() == ["neg", "2", "1", "0"]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=50))
def test_metrics_agree_with_a_direct_count(pairs):
    y, p = zip(*pairs)
    r = classification_report(list(y), list(p), 4)
    assert r["accuracy"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))
    for c in range(4):
        tp = sum(a == c and b == c for a, b in pairs)
        pred, act = sum(b == c for _, b in pairs), sum(a == c for a, _ in pairs)
        prec, rec = (tp / pred if pred else 0.0), (tp / act if act else 0.0)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        assert r["per_class_f1"][c] == pytest.approx(f1)
    assert sum(map(sum, r["confusion"])) == len(pairs)
