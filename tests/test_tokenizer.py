"""minillm.tokenizer against transformers' BERT tokenizers (the reference for what a BERT vocab.txt
means), text that is not Unicode (lone surrogates), and the tokenizer / model vocabulary check."""
import json
import os
import shutil

import pytest

from minillm.tokenizer import CharTokenizer, HFTokenizer, check_vocab, load_tokenizer

TEXTS = [
    "[CLS] hello [SEP] world [MASK]",
    "[PAD] and [UNK] too",
    "un[MASK]able[SEP][SEP]",
    "[sep] [Mask] [ CLS ] [CLS",  # not the special tokens: ordinary text
    "Héllo Wörld! Ça va? naïve CAFÉ Ångström",
    "The quick brown fox, 3.14 & ½; don't stop-believing",
    "東京 ☃ 🎉 hello\u00a0world\ttab\u200b",
    "",
]


@pytest.fixture(scope="module")
def vocab_only(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2's vocab.txt alone in a folder, as load_tokenizer finds it without tokenizer.json."""
    folder = tmp_path_factory.mktemp("vocab_only")
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), folder)
    return str(folder)


def fast_reference(folder, **kwargs):
    # from_pretrained, not BertTokenizerFast(vocab_file=...): transformers 5 ignores vocab_file
    # there and builds a 5-token vocabulary without a word of warning.
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(folder, **kwargs)


def slow_reference(folder, **kwargs):
    """The pure-Python BERT tokenizer: a reference that does not go through `tokenizers` as ours does."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:  # transformers 4: BertTokenizer is the Python one
        from transformers import BertTokenizer as Slow
    return Slow(vocab_file=os.path.join(folder, "vocab.txt"), **kwargs)


def test_vocab_txt_matches_transformers_and_tokenizer_json(minilm_dir, vocab_only):
    ours = load_tokenizer(vocab_only)
    from_json = load_tokenizer(minilm_dir)  # finds tokenizer.json first
    # the very tokenizer the model ships in its tokenizer.json (padding and truncation, ours to do, aside)
    assert ours.fingerprint() == from_json.fingerprint()
    fast, slow = fast_reference(vocab_only), slow_reference(vocab_only)
    assert len(fast) == ours.vocab_size == 30522
    for text in TEXTS:
        want = fast.encode(text, add_special_tokens=False)
        assert slow.encode(text, add_special_tokens=False) == want, text
        assert ours.encode(text) == want, text
        assert from_json.encode(text) == want, text
        pair = fast(text, "second [SEP] part")
        assert ours.encode_pair(text, "second [SEP] part") == (pair["input_ids"], pair["token_type_ids"]), text
        assert from_json.encode_pair(text, "second [SEP] part") == (pair["input_ids"], pair["token_type_ids"])
    assert (ours.pad_id, ours.mask_id, ours.cls_id, ours.sep_id) == \
        (fast.pad_token_id, fast.mask_token_id, fast.cls_token_id, fast.sep_token_id)


def test_special_tokens_in_text_are_kept_whole(vocab_only):
    """The case of issue 12: ids must not depend on whether vocab.txt or tokenizer.json was found."""
    ours = load_tokenizer(vocab_only)
    assert ours.encode("[CLS] hello [SEP] world [MASK]") == [101, 7592, 102, 2088, 103]


CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "Café", "café", "Cafe", "cafe",
               "World", "world", "!", "Ang", "##str", "##ö", "##o", "##m", "Å", "A", "a", "ang", "å", "##s", "##t",
               "c", "C", "##a", "##f", "##e", "##é", "##r", "ö", "o", "W", "w", "H", "h", "##l", "##d"]
CASING_TEXTS = ["Hello World!", "hello world", "Café café CAFE", "Ångström", "[CLS] Hello [SEP]"]


@pytest.mark.parametrize("config", [
    None,  # no tokenizer_config.json: the capitals in the vocabulary say it is cased
    {"do_lower_case": False},
    {"do_lower_case": True},  # an uncased model: accents stripped along with case, as BERT does
    {"do_lower_case": True, "strip_accents": False},
    {"do_lower_case": False, "strip_accents": True},
    {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": False},
], ids=str)
def test_casing_and_accents_as_the_vocab_and_config_imply(tmp_path, config):
    (tmp_path / "vocab.txt").write_text("\n".join(CASED_VOCAB) + "\n", encoding="utf-8")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # transformers lowercases unless told otherwise; a cased vocabulary is what tells it here
    implied = {} if config is not None else {"do_lower_case": False}
    fast, slow = fast_reference(str(tmp_path), **implied), slow_reference(str(tmp_path), **{**implied, **(config or {})})
    ours = load_tokenizer(str(tmp_path))
    for text in CASING_TEXTS:
        want = fast.encode(text, add_special_tokens=False)
        assert slow.encode(text, add_special_tokens=False) == want, text
        assert ours.encode(text) == want, (text, fast.convert_ids_to_tokens(want))


@pytest.mark.parametrize("content", ["{", "[]", '{"do_lower_case": "yes"}', '{"strip_accents": 1}'])
def test_bad_tokenizer_config_beside_a_vocab_txt(tmp_path, content):
    (tmp_path / "vocab.txt").write_text("[UNK]\na\n")
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(str(tmp_path))


# -- text that is not Unicode ---------------------------------------------------------------------

# what Python makes of the bytes b"caf\xff" (not UTF-8) in a command-line argument or file name
UNDECODABLE = b"caf\xff".decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def hf_tokenizers(minilm_dir, vocab_only):
    return {"bpe": HFTokenizer.train_bpe(["some text to learn from " * 20], 300),
            "vocab.txt": load_tokenizer(vocab_only), "tokenizer.json": load_tokenizer(minilm_dir)}


@pytest.mark.parametrize("kind", ["bpe", "vocab.txt", "tokenizer.json"])
@pytest.mark.parametrize("text", [UNDECODABLE, "\ud83d alone", "ok \udfff"])
def test_lone_surrogate_is_a_clear_error(hf_tokenizers, kind, text):
    tok = hf_tokenizers[kind]
    for encode in (lambda: tok.encode(text), lambda: tok.encode_pair(text), lambda: tok.encode_pair("fine", text)):
        with pytest.raises(ValueError) as e:
            encode()
        msg = str(e.value)
        assert "surrogate" in msg and "\n" not in msg, msg
    assert tok.encode("café") == tok.encode("café")  # valid text is still fine


def test_char_tokenizer_spells_a_lone_surrogate_in_bytes_or_refuses_it():
    """With byte fallback (the default) it round-trips, as documented; without, a clear error."""
    tok = CharTokenizer.train("some café text")
    assert tok.decode(tok.encode(UNDECODABLE)) == UNDECODABLE
    strict = CharTokenizer.train("caf", byte_fallback=False)
    with pytest.raises(ValueError, match="surrogate"):
        strict.encode(UNDECODABLE)


# -- tokenizer and model vocabulary ---------------------------------------------------------------

class Sized:
    def __init__(self, n):
        self.vocab_size = n


@pytest.mark.parametrize("tokens,model", [(100, 100), (100, 164), (30522, 30522 + 128), (50257, 50304)])
def test_check_vocab_accepts_a_tokenizer_that_belongs(tokens, model):
    check_vocab(Sized(tokens), model)
    check_vocab(Sized(tokens), model, "some/where")


@pytest.mark.parametrize("tokens,model", [
    (101, 100),  # ids beyond the embedding table
    (100, 229),  # more than 128 spare rows: another model's tokenizer
    (259, 30522),  # a character tokenizer on a BERT
])
def test_check_vocab_refuses_a_tokenizer_that_does_not_belong(tokens, model):
    with pytest.raises(ValueError) as e:
        check_vocab(Sized(tokens), model, "ckpt/tokenizer.json")
    assert str(e.value) == (f"the tokenizer (ckpt/tokenizer.json) has {tokens:,} tokens but the model's vocabulary "
                            f"holds {model:,}: they do not belong together")
    with pytest.raises(ValueError, match=r"^the tokenizer has .* they do not belong together$"):
        check_vocab(Sized(tokens), model)  # the two-argument form still works
