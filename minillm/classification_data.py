"""Labelled examples for finetuning: TSV, CSV and JSONL readers, the label mapping, tokenising,
and batches that are padded only as far as their longest member.

    table = read_table("train.tsv")                      # columns, [(line number, {column: value})]
    examples = to_examples(table, "sentence", "label")
    labels = LabelMap.from_examples(examples, "train.tsv", "label")
    encoded = encode_examples(tokenizer, examples, max_len=128)
    batches = LengthBatches([len(ids) for ids, _ in encoded], batch_size=32, seed=0)
    ids, types, mask = collate(encoded, batches.next(), pad_id=0)

Length bucketing: each batch is drawn from a pool of examples sorted by length, so a batch of
short sentences is not padded to the length of one long one (SST-2's median sentence is about
10 tokens, its longest over 60). The pools are random and the batches are shuffled, so the
order of training is still random.

The same readers serve instruction tuning (--task lm with prompt/response JSONL): see
`encode_instructions`. `predict_logits` runs a classifier over encoded examples in such
batches and returns the logits in the examples' order (finetune.py's evaluation, minillm.predict).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .distributed import all_reduce_sum, my_batches
from .tokenizer import HFTokenizer

FORMATS = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def file_format(path: str, fmt: Optional[str] = None) -> str:
    if fmt:
        if fmt not in ("tsv", "csv", "jsonl"):
            raise ValueError(f"--format must be tsv, csv or jsonl, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
                         "use .tsv, .csv or .jsonl (or --format)")
    return FORMATS[ext]


def read_text(path: str) -> str:
    """The file as text: UTF-8 with or without a byte-order mark; a bad byte is reported by line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (bad byte at offset {e.start})") from None


@dataclass
class Table:
    path: str
    columns: list[str]
    rows: list[tuple[int, dict]]  # (line number, {column: value}) for every non-empty row


def read_table(path: str, fmt: Optional[str] = None) -> Table:
    """A TSV or CSV file with a header row, or JSONL with one JSON object per line."""
    fmt = file_format(path, fmt)
    return parse_table(read_text(path), path, fmt)


def parse_table(text: str, path: str, fmt: str) -> Table:
    """A table from text already read (e.g. standard input); path names it in errors."""
    if fmt not in ("tsv", "csv", "jsonl"):
        raise ValueError(f"--format must be tsv, csv or jsonl, got {fmt!r}")
    return _read_jsonl(text, path) if fmt == "jsonl" else _read_delimited(text, path, fmt)


def _read_delimited(text: str, path: str, fmt: str) -> Table:
    dialect = "excel-tab" if fmt == "tsv" else "excel"
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect, strict=True)
    header, rows, start = None, [], 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines
            if not record or all(not f.strip() for f in record):
                continue
            if header is None:
                header = [h.strip() for h in record]
                if len(set(header)) != len(header):
                    raise ValueError(f"{path}:{line}: the header names a column twice: {header}")
                continue
            if len(record) != len(header):
                raise ValueError(f"{path}:{line}: expected {len(header)} {fmt.upper()} fields "
                                 f"({', '.join(header)}), found {len(record)}")
            rows.append((line, dict(zip(header, record))))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not valid {fmt.upper()} ({e})") from None
    if header is None:
        raise ValueError(f"{path}: the file is empty (a header row is needed)")
    return Table(path, header, rows)


def _read_jsonl(text: str, path: str) -> Table:
    rows = []
    # "\n" only: str.splitlines() would also break at U+2028, U+2029 and U+0085, which JSON
    # writers leave unescaped inside strings (json.dumps(..., ensure_ascii=False)).
    for line, s in enumerate(text.split("\n"), start=1):
        s = s.removesuffix("\r")
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, found {type(obj).__name__}")
        rows.append((line, obj))
    keys: list[str] = []
    for _, obj in rows:
        keys += [k for k in obj if k not in keys]
    return Table(path, keys, rows)


# ---------------------------------------------------------------------------------------------
# Examples and labels


@dataclass
class Example:
    text: str
    text_pair: Optional[str]
    label: Optional[str]
    line: int


def _field(row: dict, col: str, path: str, line: int, what: str) -> str:
    if col not in row:
        raise ValueError(f"{path}:{line}: the row has no {what} '{col}'")
    v = row[col]
    if v is None or isinstance(v, (dict, list)):
        raise ValueError(f"{path}:{line}: {what} '{col}' holds {json.dumps(v)}, not a value")
    return v if isinstance(v, str) else json.dumps(v)


def to_examples(table: Table, text_col: str, label_col: Optional[str] = None,
                text_pair_col: Optional[str] = None, label_sep: Optional[str] = None) -> list[Example]:
    """Rows -> Examples. A missing column is named with the columns the file has. With label_sep
    (multi-label data) a label cell holds any number of labels, `label_sep`-separated (a JSON
    list in JSONL), none included; they are kept joined by label_sep."""
    path, rows, cols = table.path, table.rows, table.columns
    if not rows:
        raise ValueError(f"{path}: holds no examples")
    for col, what in ((text_col, "text column"), (text_pair_col, "second text column"), (label_col, "label column")):
        if col is not None and col not in cols:
            raise ValueError(f"{path}: no {what} '{col}' (the columns are: {', '.join(cols)})")
    out = []
    for line, row in rows:
        text = _field(row, text_col, path, line, "text column")
        if not text.strip():
            raise ValueError(f"{path}:{line}: the text column '{text_col}' is empty")
        pair = _field(row, text_pair_col, path, line, "second text column") if text_pair_col else None
        label = None
        if label_col is not None and label_sep is not None:
            label = _label_list(row, label_col, label_sep, path, line)
        elif label_col is not None:
            label = _field(row, label_col, path, line, "label column").strip()
            if not label:
                raise ValueError(f"{path}:{line}: the label column '{label_col}' is empty")
        out.append(Example(text, pair, label, line))
    return out


def _as_int(s: str) -> Optional[int]:
    try:
        return int(s)
    except ValueError:
        return None


def _label_list(row: dict, col: str, sep: str, path: str, line: int) -> str:
    """A multi-label cell as its labels joined by sep: "a,b" or ["a", "b"] (JSONL); "" for none."""
    v = row.get(col)
    if isinstance(v, list):
        names = [str(x).strip() for x in v]
        if any(sep in n or not n for n in names):
            raise ValueError(f"{path}:{line}: label column '{col}' holds an empty label or one with {sep!r} in it")
        return sep.join(names)
    if col not in row:
        raise ValueError(f"{path}:{line}: the row has no label column '{col}'")
    return sep.join(n.strip() for n in _field(row, col, path, line, "label column").split(sep) if n.strip())


def label_numbers(examples: list[Example], path: str) -> torch.Tensor:
    """Regression targets: each example's label as a finite float32 number."""
    out = []
    for e in examples:
        try:
            v = float(e.label)
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v):
            raise ValueError(f"{path}:{e.line}: label {e.label!r} is not a finite number (--task regress)")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)


def in_label_order(names: list[str]) -> list[str]:
    """Sorted label names: integers in numeric order (0, 1, 2, ..., 10), strings alphabetically."""
    return sorted(names, key=int) if all(_as_int(n) is not None for n in names) else sorted(names)


class LabelMap:
    """Label names <-> class ids. Integer labels keep their numeric order (0, 1, 2, ..., 10),
    string labels are sorted, so the mapping does not depend on the order of the rows."""

    def __init__(self, names: Sequence[str]):
        self.names = [str(n) for n in names]
        self.ids = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_examples(cls, examples: list[Example], path: str, label_col: str) -> "LabelMap":
        found = sorted({e.label for e in examples})
        if len(found) < 2:
            raise ValueError(f"{path}: the label column '{label_col}' holds a single class "
                             f"({found[0]!r}); classification needs at least two")
        return cls(in_label_order(found))

    @classmethod
    def from_multilabel(cls, examples: list[Example], path: str, label_col: str, sep: str) -> "LabelMap":
        found = sorted({n for e in examples for n in e.label.split(sep) if n})
        if len(found) < 2:
            raise ValueError(f"{path}: the label column '{label_col}' names {len(found)} label(s); multi-label "
                             "classification needs at least two")
        return cls(in_label_order(found))

    def multi_hot(self, examples: list[Example], path: str, sep: str) -> torch.Tensor:
        """(N, labels) float32: 1 where the example has the label."""
        out = torch.zeros(len(examples), len(self.names))
        for i, e in enumerate(examples):
            for n in filter(None, e.label.split(sep)):
                if n not in self.ids:
                    raise ValueError(f"{path}:{e.line}: label {n!r} does not occur in the training data "
                                     f"(labels: {', '.join(self.names)})")
                out[i, self.ids[n]] = 1.0
        return out

    def encode(self, examples: list[Example], path: str) -> list[int]:
        out = []
        for e in examples:
            if e.label not in self.ids:
                raise ValueError(f"{path}:{e.line}: label {e.label!r} does not occur in the training data "
                                 f"(labels: {', '.join(self.names)})")
            out.append(self.ids[e.label])
        return out

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """'balanced' weights, n / (k * count_c): each class contributes equally to the loss."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


# ---------------------------------------------------------------------------------------------
# Tokenising


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], list[int]]]:
    """[(ids, token type ids)] with the tokenizer's own template ([CLS] a [SEP] b [SEP] for BERT).
    A tokenizer without a template (character-level, our BPE) joins a pair with its [SEP] or eos."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    if isinstance(tokenizer, HFTokenizer):  # a `tokenizers` tokenizer: encode in one parallel batch
        inputs = [(a, b) if b is not None else a for a, b in zip(texts, pairs)]
        encs = tokenizer.tok.encode_batch(inputs)
        raw = [(e.ids, e.type_ids) for e in encs]
    else:
        raw = []
        sep = tokenizer.sep_id if tokenizer.sep_id is not None else tokenizer.eos_id
        for a, b in zip(texts, pairs):
            ids = tokenizer.encode(a)
            types = [0] * len(ids)
            if b is not None:
                second = ([sep] if sep is not None else []) + tokenizer.encode(b)
                ids, types = ids + second, types + [1] * len(second)
            raw.append((ids, types))
    sep_id = tokenizer.sep_id
    out = []
    for ids, types in raw:
        if len(ids) > max_len:  # truncate, keeping a final [SEP] where there is one
            keep = sep_id is not None and ids[-1] == sep_id
            ids = ids[: max_len - 1] + [ids[-1]] if keep else ids[:max_len]
            types = types[: max_len - 1] + [types[-1]] if keep else types[:max_len]
        if not ids:
            ids, types = [tokenizer.pad_id or 0], [0]
        out.append((list(ids), list(types)))
    return out


def encode_instructions(tokenizer, table: Table, max_len: int, prompt_col: str = "prompt",
                        response_col: str = "response"):
    """Prompt/response pairs for supervised finetuning of a causal LM: [(ids, targets)], the
    targets -100 on the prompt so that only the response (and its end token) is learned.
    targets[i] is the token that follows ids[i]. A pair longer than max_len + 1 tokens loses the
    start of its prompt (and, if the response alone is too long, the end of the response)."""
    path, out = table.path, []
    if not table.rows:
        raise ValueError(f"{path}: holds no examples")
    for line, row in table.rows:
        prompt = _field(row, prompt_col, path, line, "prompt column")
        response = _field(row, response_col, path, line, "response column")
        if not response.strip():
            raise ValueError(f"{path}:{line}: the response is empty")
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        if tokenizer.eos_id is not None:
            r = r + [tokenizer.eos_id]
        if len(p) + len(r) < 2:
            raise ValueError(f"{path}:{line}: prompt and response hold fewer than two tokens")
        # too long for the context: the response keeps its start, the prompt its end (nearest the response)
        budget = max_len + 1
        r = r[: budget - 1] if p else r[:budget]
        p = p[max(0, len(p) - (budget - len(r))):]
        seq = p + r
        # position i predicts seq[i + 1]; only predictions of response tokens count
        targets = [seq[i + 1] if i + 1 >= len(p) else -100 for i in range(len(seq) - 1)]
        out.append((seq[:-1], targets))
    return out


# ---------------------------------------------------------------------------------------------
# Batches


class LengthBatches:
    """An endless stream of random batches (lists of example indices), epoch after epoch.

    With bucket=True each pool of `pool * batch_size` shuffled examples is sorted by length
    and cut into batches, and the batches are shuffled: little padding, random order.
    With `classes` (each example's class; --sampler balanced) an epoch oversamples the smaller
    classes: every class is drawn as often as the largest one (epoch_indices).
    Checkpointable: the generator's state at the start of the epoch and the position in it.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucket: bool = True, pool: int = 50,
                 min_size: int = 1, classes: Optional[Sequence[int]] = None):
        if not len(lengths):
            raise ValueError("no examples to draw batches from")
        if len(lengths) < min_size:
            raise ValueError(f"{len(lengths)} training examples cannot be shared by {min_size} processes")
        self.lengths = np.asarray(lengths)
        self.classes = None if classes is None else np.asarray(classes)
        self.batch_size, self.bucket, self.pool, self.min_size = batch_size, bucket, pool, min_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._start_epoch()

    def epoch_size(self) -> int:
        """Examples drawn in an epoch: all of them once, or (balanced) classes x the largest class."""
        if self.classes is None:
            return len(self.lengths)
        counts = np.bincount(self.classes)
        return int(counts.max() * (counts > 0).sum())

    def epoch_indices(self) -> np.ndarray:
        """One epoch's example indices in random order: each example once; or, balanced, each class
        as many times as the largest has examples: a class of n examples when the largest has m
        repeats all of them m // n times, plus m % n of them drawn without replacement."""
        if self.classes is None:
            return torch.randperm(len(self.lengths), generator=self.gen).numpy()
        counts = np.bincount(self.classes)
        most, drawn = counts.max(), []
        for c in np.flatnonzero(counts):
            members = np.flatnonzero(self.classes == c)
            repeats, extra = divmod(int(most), len(members))
            chosen = members[torch.randperm(len(members), generator=self.gen).numpy()[:extra]]
            drawn.append(np.concatenate([np.tile(members, repeats), chosen]))
        drawn = np.concatenate(drawn)
        return drawn[torch.randperm(len(drawn), generator=self.gen).numpy()]

    def _start_epoch(self) -> None:
        self.epoch_state = self.gen.get_state()
        perm = self.epoch_indices()
        bs = self.batch_size
        if not self.bucket:
            self.order = [perm[i : i + bs] for i in range(0, len(perm), bs)]
            if len(self.order[-1]) < self.min_size:
                self.order[-2:] = [np.concatenate(self.order[-2:])]
        else:
            batches = []
            chunk = bs * self.pool
            for i in range(0, len(perm), chunk):
                part = perm[i : i + chunk]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                batches += [part[j : j + bs] for j in range(0, len(part), bs)]
            if len(batches[-1]) < self.min_size:  # every process needs an example: the short tail joins the batch before
                batches[-2:] = [np.concatenate(batches[-2:])]
            shuffle = torch.randperm(len(batches), generator=self.gen).numpy()
            self.order = [batches[k] for k in shuffle]
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos >= len(self.order):
            self.epoch += 1
            self._start_epoch()
        batch = self.order[self.pos]
        self.pos += 1
        return batch

    def state(self) -> dict:
        return {"epoch_gen": self.epoch_state, "pos": self.pos, "epoch": self.epoch}

    def load_state(self, st: dict) -> None:
        self.gen.set_state(st["epoch_gen"])
        self.epoch = int(st["epoch"])
        self._start_epoch()
        self.pos = int(st["pos"])


def eval_order(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Evaluation batches sorted by length (least padding); the caller puts results back in place."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(seqs: Sequence[tuple[list[int], list[int]]], indices, pad_id: int, pad_second: int = 0):
    """(ids, second, mask), each (B, T) int64, right-padded to the longest sequence of the batch.
    `second` is the token type ids of classification pairs, or the targets of an LM example
    (then pad_second=-100 so padding is never learned)."""
    indices = list(indices)
    t = max(len(seqs[i][0]) for i in indices)
    ids = np.full((len(indices), t), pad_id, dtype=np.int64)
    second = np.full((len(indices), t), pad_second, dtype=np.int64)
    mask = np.zeros((len(indices), t), dtype=np.int64)
    for row, i in enumerate(indices):
        a, b = seqs[i]
        ids[row, : len(a)] = a
        second[row, : len(b)] = b
        mask[row, : len(a)] = 1
    return torch.from_numpy(ids), torch.from_numpy(second), torch.from_numpy(mask)


@torch.no_grad()
def predict_logits(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64,
                   device=None, split: bool = False) -> torch.Tensor:
    """Float32 logits (N, num_labels) of a classifier for encoded examples, in their order, on the
    CPU. Batches of similar length, so padding costs little. `split` (under torchrun): each process
    runs its share of the batches and the logits are gathered, those of one process to the bit."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order, out = eval_order([len(ids) for ids, _ in encoded], batch_size), None
    for i, keep in my_batches(len(order), split):
        ids, types, mask = collate(encoded, order[i], pad_id)
        mask = None if bool(mask.all()) else mask.to(device)  # no padding: attention needs no mask
        logits, _ = model.classify(ids.to(device), attention_mask=mask, token_type_ids=types.to(device))
        if out is None:
            out = torch.zeros(len(encoded), logits.shape[-1], device=logits.device)
        if keep:
            out[torch.as_tensor(order[i], device=logits.device)] = logits.float()
    model.train(was_training)
    return (all_reduce_sum(out) if split else out).cpu()  # each row comes from one process; the others add zeros
