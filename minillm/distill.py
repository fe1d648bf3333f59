"""Knowledge distillation (Hinton, Vinyals and Dean 2015): a student learns from a teacher's
softened outputs as well as from the labels.

    python finetune.py --init $MINILM --student-layers 3 --teacher out/sst2 --distill-alpha 0.5 \\
        --distill-temperature 2 --train train.tsv --eval dev.tsv --out out/student

    loss = (1 - alpha) * task loss + alpha * T^2 * KL( softmax(teacher / T) || softmax(student / T) )

The temperature T > 1 spreads the teacher's probability over the wrong classes (which ones it
finds plausible is what the labels cannot tell); the T^2 keeps the soft term's gradients on the
scale of the hard term's as T changes. For a classifier the rows are examples; for a language
model they are the tokens that have a target (next-token, masked or response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PROBE = "The quick brown fox jumps over the lazy dog: 0123456789, ünïcødé and <tags>!"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the last dimension and
    averaged over the rows (over the rows where mask is true; 0 when there is none)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * t * t
    if mask is None:
        return per_row.mean()
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp(min=1)


def mix(hard: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * hard + alpha * soft


@dataclass
class Teacher:
    """A frozen model in eval mode, with the mix's settings; classify() and lm() give its logits
    for a batch as the classification and language-model tasks hold it."""
    model: nn.Module
    alpha: float
    temperature: float
    labels: Optional[list] = None  # a classifier teacher's label names

    def classify(self, ids, types, mask) -> torch.Tensor:
        with torch.no_grad():
            return self.model.classify(ids, attention_mask=mask, token_type_ids=types)[0]

    def lm(self, ids) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids)[0]


def load_teacher(path: str, task: str, student, tokenizer, device, alpha: float, temperature: float) -> Teacher:
    """The teacher of a classification run (a finetuned classifier checkpoint) or of a language
    model run (any checkpoint or Hugging Face directory), checked against the student: same
    tokens (vocabulary and the ids of a probe text), same kind of model."""
    from .pretrained import load_finetuned, load_pretrained

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--distill-alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"--distill-temperature must be positive, got {temperature}")
    if task == "classify":
        model, teacher_tok, cfg = load_finetuned(path)
        if not model.config.num_labels or not cfg.get("labels"):
            raise ValueError(f"--teacher {path}: holds no classifier; a classification student needs one")
        labels = list(cfg["labels"])
    else:
        model, teacher_tok, _ = load_pretrained(path)
        labels = None
    if model.config.arch != student.config.arch:
        raise ValueError(f"--teacher {path}: a {model.config.arch.upper()}, the student is a {student.config.arch.upper()}")
    if model.config.vocab_size != student.config.vocab_size or (
            teacher_tok is not None and teacher_tok.encode(PROBE) != tokenizer.encode(PROBE)):
        raise ValueError(f"--teacher {path}: its tokenizer differs from the student's; distillation compares "
                         "their outputs token by token")
    model.requires_grad_(False)
    return Teacher(model.to(device).eval(), alpha, temperature, labels)
