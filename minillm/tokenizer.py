"""Tokenizers: character-level (ours), byte-level BPE and existing files (through `tokenizers`).

Every tokenizer here has the same small interface: `encode(text) -> list[int]`,
`decode(ids) -> str`, `vocab_size`, the ids of its special tokens (`pad_id`, `mask_id`,
`eos_id`, `cls_id`, `sep_id`; None where it has none) and `save(directory)`.
`load_tokenizer(path)` reads back whatever `save` wrote, a tokenizer.json, or a BERT vocab.txt.

Text holding a lone surrogate (U+D800..U+DFFF on its own: Python's stand-in for bytes that were
not UTF-8, e.g. in a command-line argument) is not Unicode. The character-level tokenizer spells
it in its fallback bytes, so it still round-trips; the others refuse it with a ValueError.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIALS = ["<pad>", "<mask>", "<eos>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHAR_FILE = "char_tokenizer.json"
HF_FILE = "tokenizer.json"


class CharTokenizer:
    """One id per character seen in the training text, plus 256 byte tokens so any other
    character still round-trips (it is spelled as its UTF-8 bytes).

    ids: [specials][characters][bytes 0..255]
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], byte_fallback: bool = True):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.chars = chars
        self.byte_fallback = byte_fallback
        self.stoi = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
        self.byte_offset = len(SPECIALS) + len(chars)
        self.vocab_size = self.byte_offset + (256 if byte_fallback else 0)
        self.pad_id, self.mask_id, self.eos_id = 0, 1, 2
        self.cls_id = self.sep_id = None

    @classmethod
    def train(cls, text: str, byte_fallback: bool = True) -> "CharTokenizer":
        # lone surrogates cannot be written to a UTF-8 file: they are spelled in bytes instead
        return cls({c for c in text if not _is_surrogate(c)}, byte_fallback)

    def encode(self, text: str) -> list[int]:
        stoi, out = self.stoi, []
        for ch in text:
            i = stoi.get(ch)
            if i is not None:
                out.append(i)
            elif self.byte_fallback:
                out.extend(self.byte_offset + b for b in ch.encode("utf-8", "surrogatepass"))
            elif _is_surrogate(ch):
                raise ValueError(f"the text holds a lone surrogate {ch!r}: not Unicode (bytes that were not UTF-8?), "
                                 "and this tokenizer has no byte fallback to spell it")
            else:
                raise ValueError(f"character {ch!r} is not in the tokenizer's vocabulary")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        parts, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if i >= self.byte_offset:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                parts.append(_decode_bytes(pending))
                pending = bytearray()
            if i >= len(SPECIALS):
                parts.append(self.chars[i - len(SPECIALS)])
        if pending:
            parts.append(_decode_bytes(pending))
        return "".join(parts)

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars), "byte_fallback": self.byte_fallback,
                "specials": SPECIALS}

    def save(self, directory: str) -> str:
        path = os.path.join(directory, CHAR_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        return path


def _is_surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def check_text(text: str) -> None:
    """`tokenizers` takes only valid Unicode and otherwise fails with an obscure TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate {text[e.start]!r} at character {e.start}: not Unicode "
                         "(bytes that were not UTF-8, e.g. in a command-line argument or file?)") from None
    except AttributeError:
        raise TypeError(f"a tokenizer encodes text (str), not {type(text).__name__}") from None


def _decode_bytes(b: bytearray) -> str:
    """Bytes spelled by the fallback tokens; a model may emit invalid UTF-8, shown as U+FFFD."""
    try:
        return b.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer`: byte-level BPE trained here, or a tokenizer.json / vocab.txt."""

    kind = "hf"

    def __init__(self, tok, eos_token: Optional[str] = None):
        # Padding and truncation are ours to do per batch; a saved tokenizer.json may switch them on.
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

        def tid(*names):
            for n in names:
                i = tok.token_to_id(n)
                if i is not None:
                    return i
            return None

        self.pad_id = tid("<pad>", "[PAD]", "<|pad|>")
        self.mask_id = tid("<mask>", "[MASK]")
        self.cls_id = tid("[CLS]", "<s>")
        self.sep_id = tid("[SEP]", "</s>")
        self.eos_id = tid(eos_token) if eos_token else tid("<eos>", "<|endoftext|>", "</s>", "[SEP]")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "HFTokenizer":
        if vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"--vocab-size must be at least {256 + len(SPECIALS)} for byte-level BPE, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_pair(self, a: str, b: Optional[str] = None, max_len: int = 512):
        """ids and token type ids with the tokenizer's own template ([CLS] a [SEP] b [SEP] for BERT)."""
        check_text(a)
        if b is not None:
            check_text(b)
        enc = self.tok.encode(a, b) if b is not None else self.tok.encode(a)
        ids, types = enc.ids, enc.type_ids
        if len(ids) > max_len:  # keep the final [SEP] where there is one
            keep_last = self.sep_id is not None and ids[-1] == self.sep_id
            ids = ids[: max_len - 1] + [ids[-1]] if keep_last else ids[:max_len]
            types = types[: max_len - 1] + [types[-1]] if keep_last else types[:max_len]
        return ids, types

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self.tok.to_str()

    def save(self, directory: str) -> str:
        path = os.path.join(directory, HF_FILE)
        self.tok.save(path)
        return path


def load_tokenizer(path: str):
    """A directory holding char_tokenizer.json, tokenizer.json or vocab.txt; or one such file."""
    if os.path.isdir(path):
        for name in (CHAR_FILE, HF_FILE, "vocab.txt"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise ValueError(f"{path}: holds no {CHAR_FILE}, {HF_FILE} or vocab.txt")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such tokenizer file")
    name = os.path.basename(path)
    if name == CHAR_FILE:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            return CharTokenizer(d["chars"], d.get("byte_fallback", True))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, bad UTF-8, wrong shape
            raise ValueError(f"{path}: not a valid character tokenizer ({e})") from None
    if name.endswith(".txt"):
        return _load_vocab_txt(path)
    try:
        return HFTokenizer(Tokenizer.from_file(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def _load_vocab_txt(path: str) -> HFTokenizer:
    """A BERT WordPiece vocab.txt, tokenizing as transformers' BertTokenizer does with the same file, so
    that ids do not depend on whether a model folder's vocab.txt or its tokenizer.json was found."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    except UnicodeDecodeError:
        raise ValueError(f"{path}: vocab.txt is not UTF-8") from None
    if "[UNK]" not in vocab:
        raise ValueError(f"{path}: a WordPiece vocab.txt must contain [UNK]")
    opts = _bert_options(path, vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=opts["tokenize_chinese_chars"],
        strip_accents=opts["strip_accents"], lowercase=opts["do_lower_case"],
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # "[SEP]" written in the text is the separator, as in BERT's tokenizer.json (matched before
    # lowercasing, so "[sep]" stays ordinary text); otherwise it would be split into "[", "sep", "]".
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS if t in vocab])
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    return HFTokenizer(tok)


def _bert_options(vocab_path: str, vocab: dict) -> dict:
    """do_lower_case, strip_accents and tokenize_chinese_chars: as a tokenizer_config.json beside the
    vocab.txt says; where it is silent, a vocabulary holding capitals is a cased model's (lowercasing
    its input would make every capitalised word tokenize unlike the model's training text)."""
    cased = any(t != t.lower() for t in vocab if not (t.startswith("[") and t.endswith("]")))
    # strip_accents None: strip them when lowercasing, as the original BERT did
    opts = {"do_lower_case": not cased, "strip_accents": None, "tokenize_chinese_chars": True}
    config_path = os.path.join(os.path.dirname(vocab_path), "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return opts
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a tokenizer configuration (a JSON object)")
    for key in opts:
        if key in config:
            value = config[key]
            if not (isinstance(value, bool) or (key == "strip_accents" and value is None)):
                raise ValueError(f"{config_path}: {key} must be true or false, not {value!r}")
            opts[key] = value
    return opts


# A model's embedding table may have a few rows more than its tokenizer has tokens (vocabularies
# padded to a multiple of 64 or 128 for speed); many more means another model's tokenizer.
SPARE_ROWS = 128


def check_vocab(tokenizer, vocab_size: int, where: Optional[str] = None) -> None:
    """Refuses a tokenizer that does not belong to a model whose vocabulary holds `vocab_size` ids:
    ids beyond the embedding table would crash the lookup, and a much larger table means the ids
    would silently mean other words. `where` (a path) names the tokenizer in the message."""
    n = tokenizer.vocab_size
    if n > vocab_size or vocab_size - n > SPARE_ROWS:
        name = f"the tokenizer ({where})" if where else "the tokenizer"
        raise ValueError(f"{name} has {n:,} tokens but the model's vocabulary holds {vocab_size:,}: "
                         "they do not belong together")
