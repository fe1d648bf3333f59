"""Text corpora for pretraining: reading, tokenising once into a cached memory-mapped array,
a train/validation split, and batches for causal LM and masked LM.

Batches are drawn with a torch.Generator whose state is saved in checkpoints, so a resumed
run sees exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from .distributed import all_reduce_sum, my_batches

DEFAULT_CORPUS = "pydoc"  # the interpreter's bundled reference documentation


def default_corpus() -> str:
    """Python's own reference documentation (pydoc_data.topics), present in every CPython."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        raise ValueError("this Python has no pydoc_data module; pass --data PATH") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def read_corpus(path: Optional[str]) -> list[str]:
    """The documents of a corpus: one text file, every file under a folder (sorted, hidden
    files skipped), or the default corpus when path is None or "pydoc"."""
    if path is None or path == DEFAULT_CORPUS:
        return [default_corpus()]
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise ValueError(f"{path}: the folder holds no files")
        docs = [read_text_file(f) for f in files]
    elif os.path.exists(path):
        docs = [read_text_file(path)]
    else:
        raise ValueError(f"{path}: no such file or folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: the corpus is empty")
    return docs


def corpus_key(docs: list[str], tokenizer) -> str:
    """Cache key: the content and the tokenizer, hashed."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    h.update(tokenizer.fingerprint().encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def cache_dir() -> str:
    return os.environ.get("MINILLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minillm"))


def tokenize_corpus(docs: list[str], tokenizer, cache: Optional[str] = None) -> np.ndarray:
    """All documents as one token array (documents separated by the eos token), memory-mapped
    from a cache file keyed by content and tokenizer. Written atomically."""
    cache = cache or cache_dir()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"tokens-{corpus_key(docs, tokenizer)}.npy")
    if os.path.exists(path):
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            os.remove(path)  # a damaged cache entry is rebuilt, never trusted
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d))
        if tokenizer.eos_id is not None and len(docs) > 1:
            ids.append(tokenizer.eos_id)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def split(tokens: np.ndarray, val_fraction: float, block_size: int):
    """(train, val): the last val_fraction of the tokens is held out."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = block_size + 1
    if len(train) < need:
        raise ValueError(
            f"the corpus has {len(train)} training tokens, fewer than one context window of {need}; "
            "use more text or a smaller --block-size"
        )
    if val_fraction > 0 and len(val) < need:
        raise ValueError(
            f"the validation split has {len(val)} tokens, fewer than one context window of {need}; "
            "use more text, a larger --val-fraction or a smaller --block-size"
        )
    return train, val


class Batches:
    """Random windows of a token array, drawn by a seeded generator (checkpointable)."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens = tokens
        self.block_size = block_size
        self.gen = torch.Generator().manual_seed(seed)

    def offsets(self, batch: int) -> torch.Tensor:
        high = len(self.tokens) - self.block_size - 1
        return torch.randint(0, high + 1, (batch,), generator=self.gen)

    def windows(self, offsets: torch.Tensor, length: int) -> torch.Tensor:
        idx = offsets.numpy()[:, None] + np.arange(length)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def causal_lm(self, batch: int):
        """x, y: (B, T) with y the next token after each x."""
        w = self.windows(self.offsets(batch), self.block_size + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


def mask_tokens(x: torch.Tensor, tokenizer, vocab_size: int, gen: torch.Generator, p: float = 0.15):
    """BERT's masked-LM corruption: p of the tokens are chosen as targets; of those 80% become
    the mask token, 10% a random token, 10% stay. Returns (inputs, targets with -100 elsewhere)."""
    if tokenizer.mask_id is None:
        raise ValueError("masked-LM training needs a tokenizer with a mask token")
    chosen = torch.rand(x.shape, generator=gen) < p
    specials = [i for i in (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.eos_id) if i is not None]
    for s in specials:
        chosen &= x != s
    targets = torch.where(chosen, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=gen)
    inputs = x.clone()
    inputs[chosen & (r < 0.8)] = tokenizer.mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    inputs[rand_pos] = torch.randint(0, vocab_size, (int(rand_pos.sum()),), generator=gen)
    return inputs, targets


class LMData:
    """Language-modelling batches over a train/validation token split: next-token windows for a
    GPT, masked windows for a BERT (`tokenizer` given: its mask token and specials). One object
    for train.py and finetune.py --task lm; checkpointable (`state`/`load_state`).

    Under torchrun every process draws (and masks) the same global batch of world x batch_size
    windows and keeps its slice: N processes see exactly what one process at N times the batch sees."""

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device, mask_with=None, rank: int = 0, world: int = 1):
        self.train, self.val, self.block_size, self.batch_size = train, val, block_size, batch_size
        self.device, self.mask_with, self.rank, self.world = device, mask_with, rank, world
        self.batches = Batches(train, block_size, seed=seed)
        self.mask_gen = torch.Generator().manual_seed(seed + 1)

    def _mask(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        if self.mask_with is not None:
            x, y = mask_tokens(x, self.mask_with, self.mask_with.vocab_size, gen)
        return x, y

    def next(self):
        """(x, y): this process's (batch_size, block_size) slice of the global batch."""
        x, y = self._mask(*self.batches.causal_lm(self.batch_size * self.world), self.mask_gen)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return to_device(x[mine], self.device), to_device(y[mine], self.device)

    def eval_batches(self, iters: int, device=None):
        """The same validation windows (and masks) at every evaluation, so the numbers compare;
        batches of the global batch size (evaluate_lm shares them out among the processes)."""
        vb, vgen = Batches(self.val, self.block_size, seed=0), torch.Generator().manual_seed(1)
        for _ in range(iters):
            x, y = self._mask(*vb.causal_lm(self.batch_size * self.world), vgen)
            yield to_device(x, device or self.device), to_device(y, device or self.device)

    def state(self) -> dict:
        return {"train": self.batches.state(), "mask": self.mask_gen.get_state()}

    def load_state(self, st: dict) -> None:
        self.batches.load_state(st["train"])
        self.mask_gen.set_state(st["mask"])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device. To a GPU from pinned memory: the copy then runs alongside
    the GPU's work instead of waiting for the host (non_blocking from pageable memory does not)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def evaluate_lm(model, data: LMData, iters: int, device=None, split: bool = True) -> float:
    """Mean loss per target token over `iters` fixed validation batches (masked LM: the
    batches hold different numbers of masked tokens, so they are weighed by them). Under
    torchrun (`split`) each process runs its share of the batches and the sums are gathered:
    the result is the one-process one, to the bit."""
    device = device or data.device
    sums = torch.zeros(2, iters, device=device)  # per batch: loss x targets, targets
    batches = list(data.eval_batches(iters, device))  # every process draws them all: the masks come in turn
    for i, keep in my_batches(iters, split):
        x, y = batches[i]
        _, loss = model(x, y)
        n = (y != -100).sum()
        if keep:
            sums[:, i] = torch.stack([torch.where(n > 0, loss.float() * n, 0.0), n.float()])
    if split:
        all_reduce_sum(sums)  # each batch's sums come from one process; the others add zeros
    total, count = sums.sum(dim=1).tolist()
    return total / count if count else float("nan")
