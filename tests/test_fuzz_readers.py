"""Fuzzing the readers and the tokenizers with hypothesis.

Data readers: on any bytes (byte-order marks, invalid UTF-8, odd quoting, empty lines) the text
reader and the TSV/CSV/JSONL readers either return what the file holds or raise a ValueError
naming the file (and the line, where there is one); never another exception. Well-formed files
written by Python's own csv and json modules read back exactly, with the right line numbers.

Tokenizers: decode(encode(s)) == s for the character-level tokenizer and the byte-level BPE on
arbitrary Unicode. Lone surrogates (code points U+D800..U+DFFF on their own) are not Unicode
text: no UTF-8 file can hold one, so no corpus read by `read_text_file` contains one. The
character-level tokenizer round-trips them anyway (spelled in fallback bytes); the BPE, through
the `tokenizers` library, accepts only valid text, so its property is stated on valid text.
"""
import codecs
import csv
import io
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.data import read_corpus, read_text_file
from minillm.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

BOM = codecs.BOM_UTF8
# cheap properties get more examples than the suite-wide "ci" profile's 12
MORE = settings(max_examples=max(50, settings.default.max_examples))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write(folder, name, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# bytes that look like text: valid UTF-8, sometimes with a BOM, sometimes with bad bytes spliced in
texty_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8")),
    st.tuples(st.sampled_from([b"", BOM, BOM + BOM, b"\xff\xfe", b"\xfe\xff"]), st.text(max_size=60),
              st.sampled_from([b"", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"]),
              st.text(max_size=60)).map(lambda t: t[0] + t[1].encode() + t[2] + t[3].encode()),
)


def bad_utf8_offset(raw: bytes):
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        return e.start


# -- text -------------------------------------------------------------------------------------------


@MORE
@given(raw=texty_bytes)
def test_read_text_file_gives_the_text_or_names_the_file(workdir, raw):
    path = write(workdir, "doc.txt", raw)
    body = raw[3:] if raw.startswith(BOM) else raw  # one leading BOM is dropped
    bad = bad_utf8_offset(body)
    if bad is None:
        assert read_text_file(path) == body.decode("utf-8")
    else:
        with pytest.raises(ValueError) as info:
            read_text_file(path)
        assert str(info.value).startswith(path) and f"offset {bad}" in str(info.value)


@MORE
@given(raw=texty_bytes)
def test_read_corpus_single_file(workdir, raw):
    path = write(workdir, "corpus.txt", raw)
    try:
        text = read_text_file(path)
    except ValueError:
        text = None
    if text is not None and text.strip():
        assert read_corpus(path) == [text]
    else:
        with pytest.raises(ValueError) as info:
            read_corpus(path)
        assert str(info.value).startswith(path)


@given(files=st.dictionaries(st.sampled_from(["a.txt", "b.md", ".hidden", "sub/c.txt", "sub/.d", ".git/e"]),
                             texty_bytes, max_size=5))
def test_read_corpus_folder(tmp_path_factory, files):
    folder = str(tmp_path_factory.mktemp("corpus"))
    for name, raw in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        write(folder, name, raw)
    visible = sorted((n for n in files if not any(part.startswith(".") for part in n.split("/"))),
                     key=lambda n: (n.count("/"), n))  # files of a folder before its subfolders'
    broken = [n for n in visible if bad_utf8_offset(files[n][3:] if files[n].startswith(BOM) else files[n])
              is not None]
    try:
        docs = read_corpus(folder)
    except ValueError as e:
        msg = str(e)
        if broken:
            assert msg.startswith(os.path.join(folder, broken[0])), msg
        else:
            assert msg.startswith(folder) and ("empty" in msg or "no files" in msg), msg
        return
    assert not broken
    expected = [read_text_file(os.path.join(folder, n)) for n in visible]
    assert docs == [d for d in expected if d.strip()]


# -- TSV, CSV, JSONL -------------------------------------------------------------------------------

try:  # the finetuning data readers (issue 5); skipped where they are not there yet
    from minillm import classification_data as cd
except ImportError:  # pragma: no cover
    cd = None
tables = pytest.mark.skipif(cd is None or not hasattr(cd, "read_table"),
                            reason="minillm.classification_data.read_table is not there")

ODD = st.text(alphabet=st.sampled_from(list('"\',\t \n\r\\a;\ufeff{}[]:') + ["\u2028", "\x85", "\x00", "é"]),
              max_size=80)


@tables
@MORE
@given(fmt=st.sampled_from(["tsv", "csv", "jsonl"]), raw=st.one_of(texty_bytes, ODD.map(str.encode),
                                                                   ODD.map(lambda s: BOM + s.encode())))
def test_table_reader_on_anything(workdir, fmt, raw):
    """Any bytes: a table whose rows have increasing line numbers within the file, or a
    ValueError naming the file (with the line of a bad byte); nothing else."""
    path = write(workdir, f"t.{fmt}", raw)
    try:
        table = cd.read_table(path)
    except ValueError as e:
        msg = str(e)
        assert msg.startswith(path), msg
        bad = bad_utf8_offset(raw[3:] if raw.startswith(BOM) else raw)
        if bad is not None:
            line = (raw[3:] if raw.startswith(BOM) else raw)[:bad].count(b"\n") + 1
            assert msg.startswith(f"{path}:{line}: not UTF-8"), msg
        return
    text = raw.decode("utf-8-sig")
    n_lines = max(len(re.findall(r"\r\n|\r|\n", text)), len(text.splitlines())) + 1
    lines = [line for line, _ in table.rows]
    assert lines == sorted(set(lines)) and all(1 <= n <= n_lines for n in lines), (lines, n_lines)
    for _, row in table.rows:
        assert isinstance(row, dict)
        if fmt != "jsonl":
            assert list(row) == table.columns


def line_breaks(s: str) -> int:
    """Line breaks as the csv module counts them (universal newlines)."""
    return len(re.findall(r"\r\n|\r|\n", s))


field = st.text(max_size=12)
names = st.lists(st.text(min_size=1, max_size=8).map(str.strip).filter(bool), min_size=1, max_size=4, unique=True)


@tables
@MORE
@given(fmt=st.sampled_from(["tsv", "csv"]), header=names, data=st.data(), bom=st.booleans(),
       blank=st.lists(st.booleans(), max_size=8))
def test_delimited_round_trip(workdir, fmt, header, data, bom, blank):
    """A file written by Python's csv module (any characters in the fields, quotes, delimiters
    and newlines included) reads back field for field, with the line each record starts on;
    empty lines and rows of blanks are skipped."""
    rows = data.draw(st.lists(st.lists(field, min_size=len(header), max_size=len(header)), max_size=6))
    out = io.StringIO(newline="")
    writer = csv.writer(out, dialect="excel-tab" if fmt == "tsv" else "excel")
    writer.writerow(header)
    expected = []
    for i, row in enumerate(rows):
        if i < len(blank) and blank[i]:
            out.write("\r\n")  # an empty line
        start = line_breaks(out.getvalue()) + 1
        writer.writerow(row)
        if any(f.strip() for f in row):
            expected.append((start, dict(zip(header, row))))
    path = write(workdir, f"r.{fmt}", (BOM if bom else b"") + out.getvalue().encode("utf-8"))
    table = cd.read_table(path)
    assert table.columns == header
    assert table.rows == expected


json_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(max_size=10))


@tables
@MORE
@given(objs=st.lists(st.dictionaries(st.text(max_size=5), json_value, max_size=4), max_size=6),
       gaps=st.lists(st.sampled_from(["", " ", "\t", "  \t"]), max_size=6), crlf=st.booleans(), bom=st.booleans())
def test_jsonl_round_trip(workdir, objs, gaps, crlf, bom):
    """JSON objects one per line (ASCII-escaped, as json.dumps writes by default), with blank
    lines between them: read back in order with their line numbers; the columns are every key
    in order of first appearance."""
    lines, expected = [], []
    for i, obj in enumerate(objs):
        if i < len(gaps):
            lines.append(gaps[i])
        lines.append(json.dumps(obj))
        expected.append((len(lines), obj))
    nl = "\r\n" if crlf else "\n"
    path = write(workdir, "r.jsonl", (BOM if bom else b"") + nl.join(lines).encode())
    table = cd.read_table(path)
    assert table.rows == expected
    keys = []
    for obj in objs:
        keys += [k for k in obj if k not in keys]
    assert table.columns == keys


@tables
@pytest.mark.parametrize("ch", ["\u2028", "\x85"])
def test_jsonl_unescaped_line_separator_in_a_string(workdir, ch):
    path = write(workdir, "sep.jsonl", (json.dumps({"text": f"a{ch}b", "label": "1"}, ensure_ascii=False)
                                        + "\n").encode())
    assert cd.read_table(path).rows == [(1, {"text": f"a{ch}b", "label": "1"})]


# -- tokenizers ----------------------------------------------------------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
# any code points, lone surrogates spliced in often (hypothesis alone rarely draws them)
any_text = st.lists(st.one_of(st.text(st.characters(exclude_categories=()), max_size=10), surrogates),
                    max_size=8).map("".join)


@MORE
@given(vocab_text=st.text(max_size=40), s=any_text)
def test_char_tokenizer_round_trip(vocab_text, s):
    tok = CharTokenizer.train(vocab_text)
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


@given(vocab_text=any_text, s=any_text)
def test_char_tokenizer_save_load_round_trip(tmp_path_factory, vocab_text, s):
    """Trained on any text (lone surrogates included), saved as UTF-8 JSON and read back: the
    same ids, and the round trip still holds."""
    tok = CharTokenizer.train(vocab_text)
    folder = str(tmp_path_factory.mktemp("tok"))
    tok.save(folder)
    back = load_tokenizer(folder)
    assert back.encode(s) == tok.encode(s) and back.decode(tok.encode(s)) == s


@MORE
@given(vocab_text=st.text(max_size=20), ids=st.lists(st.integers(0, 10**6), max_size=40))
def test_char_tokenizer_decodes_any_ids(vocab_text, ids):
    """A model may emit any ids, including byte tokens that do not form valid UTF-8: decode
    returns text (U+FFFD for broken bytes), never an exception."""
    tok = CharTokenizer.train(vocab_text)
    assert isinstance(tok.decode([i % tok.vocab_size for i in ids]), str)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained once on a small mixed-script corpus, and the same read back from
    its tokenizer.json."""
    corpus = ["The quick brown fox jumps over the lazy dog. " * 20, "naïve café, 東京, Москва, ☃ 🎉 " * 10,
              "def f(x):\n\treturn x ** 2  # square\n" * 10]
    tok = HFTokenizer.train_bpe(corpus, 400)
    folder = str(tmp_path_factory.mktemp("bpe"))
    tok.save(folder)
    return tok, load_tokenizer(os.path.join(folder, "tokenizer.json"))


@MORE
@given(s=st.text(max_size=80))
def test_bpe_round_trip(bpe, s):
    tok, back = bpe
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert back.encode(s) == ids and back.decode(ids) == s


@given(s=st.lists(st.sampled_from(["<pad>", "<mask>", "<eos>", "<", ">", " ", "a", "\n", "\r", "\t", "\u200b",
                                   "\ufeff", "\x00", "  "]), max_size=30).map("".join))
def test_bpe_round_trip_special_looking_text(bpe, s):
    """Text that spells the special tokens or is all whitespace also comes back unchanged."""
    tok, _ = bpe
    assert tok.decode(tok.encode(s)) == s


@MORE
@given(ids=st.lists(st.integers(0, 399), max_size=40))
def test_bpe_decodes_any_ids(bpe, ids):
    tok, _ = bpe
    assert isinstance(tok.decode(ids), str)
