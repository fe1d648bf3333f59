"""What `finetune.py --task rl` needs besides the formulas (preference.py): a reward model, the
policy's samples (KV-cache generation, a group of completions per prompt), the rollouts the loop
trains on, the frozen reference, and the evaluation of a policy on held-out prompts.

A completion ends after its first stop token (a newline where the tokenizer has one as a single
token, else its end-of-text token), or after max_new tokens. The loss is on the completion's
tokens, the stop token included; the prompt and the padding are -100.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
from typing import Callable, Optional, Sequence

import torch

from .classification_data import Example, LengthBatches, collate, encode_examples, predict_logits
from .distributed import my_part, rank_world
from .preference import adapters_off, distinct_n, group_advantages, token_logprobs
from .pretrained import is_hf_dir, load_finetuned, load_pretrained

REWARD_KINDS = ("prob", "logodds")


class RewardModel:
    """A sequence classifier (a finetune.py checkpoint, or a Hugging Face directory) as a reward:
    the probability of `label`, or its log-odds log p / (1 - p). `hit`: the classifier's top label
    is `label` (for a sentiment classifier: the completion reads as positive)."""

    def __init__(self, path: str, label: Optional[str] = None, kind: str = "prob", device=None, batch_size: int = 64):
        if not os.path.isdir(path):
            raise ValueError(f"--reward {path}: no such checkpoint folder")
        if is_hf_dir(path):
            self.model, self.tokenizer, _ = load_pretrained(path)
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                id2label = json.load(f).get("id2label") or {}
            self.labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
            self.max_len = self.model.config.block_size
        else:
            self.model, self.tokenizer, cfg = load_finetuned(path)
            self.labels = [str(n) for n in cfg.get("labels") or []]
            self.max_len = (cfg.get("finetune") or {}).get("max_len", self.model.config.block_size)
        if not self.model.config.num_labels or len(self.labels) != self.model.config.num_labels:
            raise ValueError(f"--reward {path}: holds no sequence classifier with named labels")
        if self.tokenizer is None:
            raise ValueError(f"--reward {path}: no tokenizer beside the classifier")
        label = self.labels[-1] if label is None else str(label)
        if label not in self.labels:
            raise ValueError(f"--reward-label {label}: the reward model's labels are {', '.join(self.labels)}")
        if kind not in REWARD_KINDS:
            raise ValueError(f"--reward-kind must be one of {', '.join(REWARD_KINDS)}, got {kind!r}")
        self.label, self.index, self.kind, self.batch_size = label, self.labels.index(label), kind, batch_size
        self.device = torch.device(device or "cpu")
        self.model.to(self.device).eval().requires_grad_(False)
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, labels) float32 probabilities, on the CPU."""
        encoded = encode_examples(self.tokenizer, [Example(t, None, None, i) for i, t in enumerate(texts)], self.max_len)
        return torch.softmax(predict_logits(self.model, encoded, self.pad, self.batch_size, self.device), dim=-1)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards (N,), hits (N,) bool) of the texts prompt + completion, on the CPU."""
        p = self.probabilities([a + b for a, b in zip(prompts, completions)])
        hits = p.argmax(dim=-1) == self.index
        p = p[:, self.index].clamp(1e-6, 1 - 1e-6)
        return (p if self.kind == "prob" else torch.log(p) - torch.log1p(-p)), hits


class FunctionReward:
    """A reward written in Python, `FILE.py:NAME`: NAME(prompts, completions) -> one number per
    completion (e.g. 1.0 for an exact match or a regular expression's match, else 0.0). `hit`:
    the reward is positive."""

    def __init__(self, spec: str):
        path, _, name = spec.rpartition(":")
        if not os.path.isfile(path):
            raise ValueError(f"--reward {spec}: no such Python file {path!r}")
        module_spec = importlib.util.spec_from_file_location(f"reward_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say where it failed, in one line
            raise ValueError(f"--reward {spec}: {path} failed to load: {type(e).__name__}: {e}") from None
        self.fn = getattr(module, name, None)
        if not callable(self.fn):
            raise ValueError(f"--reward {spec}: {path} defines no function {name!r}")
        self.label, self.spec = "reward > 0", spec

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        values = list(self.fn(list(prompts), list(completions)))
        if len(values) != len(completions):
            raise ValueError(f"--reward {self.spec}: returned {len(values)} rewards for {len(completions)} completions")
        r = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"--reward {self.spec}: returned a non-finite reward")
        return r, r > 0


def load_reward(spec: str, label: Optional[str] = None, kind: str = "prob", device=None, batch_size: int = 64):
    """A classifier folder (RewardModel), or FILE.py:NAME (FunctionReward)."""
    if spec.rpartition(":")[0].endswith(".py"):
        if label is not None:
            raise ValueError("--reward-label names a classifier's label; a Python reward has none")
        return FunctionReward(spec)
    return RewardModel(spec, label, kind, device, batch_size)


def stop_token(tokenizer) -> Optional[int]:
    """The token that ends a completion: a newline, where it is one token, else end-of-text."""
    nl = tokenizer.encode("\n")
    return nl[0] if len(nl) == 1 else tokenizer.eos_id


def read_prompts(path: str, tokenizer, room: int, stop: Optional[int]) -> tuple[list[str], list[list[int]]]:
    """Prompts, one a line (an empty line is an empty prompt: the completion starts the text),
    as text and as token ids keeping their last `room` tokens. An empty prompt starts from the
    stop token, as a text after a newline does."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such prompts file")
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    while texts and not texts[-1].strip():
        texts.pop()
    if not texts:
        raise ValueError(f"{path}: holds no prompts")
    start = [stop] if stop is not None else []
    ids = [(tokenizer.encode(t) or start)[-room:] for t in texts]
    if not all(ids):
        raise ValueError(f"{path}: an empty prompt needs a tokenizer with a newline or end-of-text token")
    return texts, ids


def pad_token(tokenizer, stop: Optional[int]) -> int:
    """What pads the sequences: the pad token, else the stop token (padding is never learned)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else (stop or 0)


def decode_completions(tokenizer, completions: Sequence[list[int]], stop: Optional[int]) -> list[str]:
    """The completions' text, without their stop token."""
    return [tokenizer.decode([t for t in c if t != stop]) for c in completions]


def cut(tokens: list[int], stop: Optional[int]) -> list[int]:
    """A completion up to and including its first stop token."""
    return tokens[: tokens.index(stop) + 1] if stop is not None and stop in tokens else tokens


@torch.no_grad()
def sample(model, prompts: Sequence[list[int]], group: int, max_new: int, temperature: float = 1.0,
           top_k: Optional[int] = None, generator=None, stop: Optional[int] = None) -> list[list[int]]:
    """`group` completions of each prompt, [prompt 0's group, prompt 1's, ...], each cut after its
    stop token. Prompts of one length are sampled together (model.generate, with its KV cache)."""
    device = next(model.parameters()).device
    out: list[Optional[list[int]]] = [None] * (len(prompts) * group)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length in sorted(by_length):
        idx = by_length[length]
        x = torch.tensor([prompts[i] for i in idx for _ in range(group)], device=device)
        y = model.generate(x, max_new, temperature=temperature, top_k=top_k, eos_token_id=stop, generator=generator)
        for k, row in enumerate(y[:, length:].tolist()):
            out[idx[k // group] * group + k % group] = cut(row, stop)
    return out  # type: ignore[return-value]


def sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], group: int, pad: int):
    """(ids, targets) (B, T) of prompt + completion, right-padded; targets -100 but on the completion."""
    seqs = []
    for k, c in enumerate(completions):
        p = prompts[k // group]
        full = p + c
        seqs.append((full[:-1], [-100] * (len(p) - 1) + list(c)))
    ids, targets, _ = collate(seqs, range(len(seqs)), pad, pad_second=-100)
    return ids, targets


class Reference:
    """The frozen starting policy's log-probabilities. With LoRA: the same model with its adapters
    switched off (no second copy); otherwise a frozen copy made when the run starts."""

    def __init__(self, model, lora: bool):
        self.model = model if lora else copy.deepcopy(model).eval().requires_grad_(False)
        self.lora = lora

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.lora and next(self.model.parameters()).device != ids.device:
            self.model.to(ids.device)
        with adapters_off(self.model) if self.lora else contextlib.nullcontext():
            return token_logprobs(self.model(ids)[0], targets)


class Rollouts:
    """The batches of --task rl. Each rollout draws `prompts_per_step` prompts (x processes: each
    keeps its part), samples `group` completions of each from the current policy, scores them and
    standardises the rewards within each group. A micro-batch is (ids, targets, advantages, memo,
    targets); memo keeps the old policy's and the reference's log-probabilities once the loss has
    computed them (the first update of a rollout is on-policy: ratio 1). A rollout is `micro`
    micro-batches and serves `updates` optimizer steps, then the next one is sampled."""

    def __init__(self, model, prompt_ids, reward: RewardModel, tokenizer, stats, *, group, prompts_per_step,
                 max_new, temperature, top_k, updates, micro, seed, device, scale_rewards=True):
        rank, world = rank_world()
        self.order = LengthBatches([1] * len(prompt_ids), prompts_per_step * world, seed, bucket=False, min_size=world)
        self.model, self.prompts, self.reward, self.tokenizer, self.stats = model, prompt_ids, reward, tokenizer, stats
        self.group, self.max_new, self.temperature, self.top_k = group, max_new, temperature, top_k
        self.updates, self.micro, self.device, self.stop = updates, micro, device, stop_token(tokenizer)
        self.scale_rewards = scale_rewards
        self.pad = pad_token(tokenizer, self.stop)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1000 * rank)
        self.served, self.current, self.started = 0, [], None

    def next(self):
        if self.served % (self.micro * self.updates) == 0:
            self.started = self.position()
            self.current = [self.rollout() for _ in range(self.micro)]
        batch = self.current[self.served % self.micro]
        self.served += 1
        return batch

    def rollout(self):
        prompts = [self.prompts[i] for i in my_part(self.order.next())]
        completions = sample(self.model, prompts, self.group, self.max_new, self.temperature, self.top_k,
                             self.generator, self.stop)
        heads = [self.tokenizer.decode(p) for p in prompts]
        bodies = decode_completions(self.tokenizer, completions, self.stop)
        rewards, hits = self.reward([heads[k // self.group] for k in range(len(bodies))], bodies)
        ids, targets = (t.to(self.device) for t in sequences(prompts, completions, self.group, self.pad))
        self.stats.add(reward=rewards, positive=hits.float(), length=torch.tensor([float(len(c)) for c in completions]))
        advantages = group_advantages(rewards, self.group, scale=self.scale_rewards).to(self.device)
        return ids, targets, advantages, {}, targets

    def position(self) -> dict:
        return {**self.order.state(), "generator": self.generator.get_state()}  # flat: a checkpoint keeps tensors as text

    def state(self) -> dict:
        """Where the prompts and the sampling generator stand: after the last finished rollout, or
        at the start of the current one (a run resumed mid-rollout samples it again, from the
        checkpoint's weights)."""
        done = self.served % (self.micro * self.updates) == 0
        return self.position() if done or self.started is None else self.started

    def load_state(self, st: dict) -> None:
        self.order.load_state(st)
        self.generator.set_state(torch.as_tensor(st["generator"], dtype=torch.uint8).cpu())
        self.served, self.current, self.started = 0, [], None


@torch.no_grad()
def evaluate_policy(model, prompts: Sequence[list[int]], reward: RewardModel, tokenizer, reference: Callable,
                    max_new: int, temperature: float = 1.0, top_k: Optional[int] = None, seed: int = 0,
                    batch_size: int = 64, samples: Optional[list] = None) -> dict:
    """One completion of each prompt, sampled with a fixed seed, and what it shows: the mean
    reward; the share the reward model calls `reward.label`; the KL to the reference (mean over
    completions of the sum of log pi - log ref over their tokens, in nats); the perplexity the
    reference gives the completions (fluency); distinct-2 of their words; their mean length.
    `samples`, when a list, receives the completions' text. Every process runs all of it."""
    device = next(model.parameters()).device
    stop = stop_token(tokenizer)
    pad = pad_token(tokenizer, stop)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    kl = ref_lp = n_tokens = 0.0
    heads, bodies = [], []
    for b in range(0, len(prompts), batch_size):
        part = list(prompts[b:b + batch_size])
        completions = sample(model, part, 1, max_new, temperature, top_k, gen, stop)
        ids, targets = sequences(part, completions, 1, pad)
        ids, targets = ids.to(device), targets.to(device)
        logp, ref = token_logprobs(model(ids)[0], targets), reference(ids, targets)
        kl += (logp - ref).sum().item()
        ref_lp += ref.sum().item()
        n_tokens += (targets != -100).sum().item()
        heads += [tokenizer.decode(p) for p in part]
        bodies += decode_completions(tokenizer, completions, stop)
    r, h = reward(heads, bodies)
    model.train(was_training)
    if samples is not None:
        samples.extend(a + b for a, b in zip(heads, bodies))
    return {"eval_reward": r.mean().item(), "eval_positive": h.float().mean().item(), "eval_kl": kl / len(prompts),
            "eval_ref_ppl": math.exp(min(-ref_lp / max(n_tokens, 1), 50)),
            "eval_distinct2": distinct_n([b.split() for b in bodies], 2), "eval_length": n_tokens / len(prompts)}
