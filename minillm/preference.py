"""The formulas of finetuning from preferences and rewards, on tensors: no data, no loop.

DPO (Rafailov et al., 2023). For a prompt x with a preferred response y_w and a dispreferred
y_l, and log-probabilities of the whole response under the policy (pi) and a frozen reference
(ref), the implicit reward of a response is  r(y) = beta * (log pi(y|x) - log ref(y|x))  and

    loss = -log sigmoid(r(y_w) - r(y_l))                                  (dpo)
    loss = -(1 - e) log sigmoid(r_w - r_l) - e log sigmoid(r_l - r_w)    (conservative DPO, label smoothing e)
    loss = (h - 1 / (2 beta))^2,  h = (log pi - log ref)(y_w) - (log pi - log ref)(y_l)   (IPO, Azar et al.)

plus, optionally, alpha times the chosen response's negative log-likelihood per token (RPO, Pang
et al., 2024): DPO alone may lower the likelihood of both responses and move the mass to text
neither holds; the NLL term keeps it on the chosen ones.

GRPO (Shao et al., 2024): G responses are sampled for each prompt and scored; a response's
advantage is its reward standardised within its group, A = (r - mean) / (std + eps), so no
value network is needed (or only centred, A = r - mean: Dr. GRPO, Liu et al., 2025). Each response token t then contributes the clipped objective of PPO
(Schulman et al., 2017) minus a KL penalty to the reference:

    ratio = pi(t) / pi_old(t)
    loss_t = -min(ratio * A, clip(ratio, 1 - c, 1 + c) * A) + kl_coef * (exp(q) - q - 1),  q = log ref(t) - log pi(t)

(the last term is the non-negative, unbiased "k3" estimator of KL(pi || ref) per token). The
loss is the mean over all response tokens of the batch.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from .lora import lora_layers

DPO_VARIANTS = ("dpo", "ipo")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t]) under logits[b, t] (float32), 0 where targets is -100. (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets == -100, 0.0)


def sequence_logprobs(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each sequence's response, (B,): the sum over the positions whose
    target is not -100 (the prompt and the padding are -100). `model(ids)` -> (logits, _)."""
    return token_logprobs(model(ids)[0], targets).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, variant: str = "dpo", label_smoothing: float = 0.0):
    """(mean loss, per-pair stats) from sequence log-probabilities, each (B,). Stats: the implicit
    rewards of the chosen and rejected responses, their margin, and whether chosen > rejected."""
    chosen = policy_chosen.float() - ref_chosen.float()
    rejected = policy_rejected.float() - ref_rejected.float()
    h = chosen - rejected
    if variant == "dpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif variant == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO variant {variant!r} (choose from {', '.join(DPO_VARIANTS)})")
    r_w, r_l = (beta * chosen).detach(), (beta * rejected).detach()
    stats = {"reward_chosen": r_w, "reward_rejected": r_l, "reward_margin": r_w - r_l,
             "reward_accuracy": (r_w > r_l).float()}
    return loss.mean(), stats


def response_nll(token_logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's negative log-likelihood per response token (targets not -100)."""
    return -token_logp.sum(dim=-1) / (targets != -100).sum(dim=-1).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N / group prompts' groups of consecutive responses -> each response's
    reward minus its group's mean, over its group's standard deviation (unbiased) plus eps.
    A group whose rewards are all equal teaches nothing: its advantages are 0. scale=False keeps
    the reward's own scale (Dr. GRPO, Liu et al., 2025): a group whose rewards barely differ
    (every completion already good) then pushes little, where dividing by its small std would
    push as hard as any."""
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group}")
    r = rewards.float().view(-1, group)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred.view(-1)
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    return (centred / (std + eps)).view(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.0):
    """(mean loss over the response tokens, stats) of GRPO's clipped objective with a KL penalty.
    logp, old_logp, ref_logp, mask: (B, T), per response token (mask 1 where the token is the
    response's); advantages: (B,), one per response. Stats (token means): kl, clipped share."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = advantages.float().unsqueeze(-1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    q = ref_logp - logp
    kl = torch.exp(q) - q - 1
    n = mask.sum().clamp(min=1)
    loss = ((-surrogate + kl_coef * kl) * mask).sum() / n
    clipped = ((ratio - 1).abs() > clip).float()
    stats = {"kl": ((kl.detach() * mask).sum() / n), "clipped": (clipped * mask).sum() / n}
    return loss, stats


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions at the positions where mask is 1."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return (h * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def adapters_off(model):
    """The base model under the LoRA adapters, without a second copy: every adapter's update is
    scaled by 0 inside the block (its weights untouched; they are restored after)."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m.scaling for m in layers]
    try:
        for m in layers:
            m.scaling = 0.0
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


def distinct_n(texts: Sequence[Sequence[str]], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams over all n-grams of the (tokenised) texts."""
    grams = [tuple(t[i:i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
