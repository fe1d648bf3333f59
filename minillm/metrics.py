"""Classification metrics: accuracy, macro precision / recall / F1, and the confusion matrix.

Everything is computed from one confusion matrix, `cm[true, predicted]`, so the numbers always
agree with each other. A class that is never predicted has precision 0 (not NaN), and one that
never occurs has recall 0, as scikit-learn does with `zero_division=0`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def confusion_matrix(labels, predictions, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    p = torch.as_tensor(predictions, dtype=torch.long).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.numel()} labels but {p.numel()} predictions")
    # An id outside 0..num_classes-1 would be counted in another cell (y * n + p aliases) or crash
    # bincount: it means the labels and the model's classes do not match, which the caller must hear.
    for kind, t in (("true label", y), ("prediction", p)):
        bad = ((t < 0) | (t >= num_classes)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{kind} {int(t[i])} (item {i}) is not one of the {num_classes} classes "
                             f"0..{num_classes - 1}")
    flat = torch.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def scores_from_confusion(cm: torch.Tensor) -> dict:
    """accuracy, macro precision / recall / F1, and per-class F1 from a confusion matrix."""
    cm = cm.double()
    tp = cm.diagonal()
    predicted, actual = cm.sum(dim=0), cm.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "per_class_f1": [float(v) for v in f1],
    }


def classification_report(labels, predictions, num_classes: int) -> dict:
    """All metrics at once; `confusion` is a nested list (JSON-able)."""
    cm = confusion_matrix(labels, predictions, num_classes)
    return {**scores_from_confusion(cm), "confusion": cm.tolist()}


def format_confusion(cm, names: Optional[Sequence[str]] = None) -> str:
    """The confusion matrix as an aligned text table (rows: true label, columns: predicted)."""
    cm = torch.as_tensor(cm).tolist()
    names = [str(n) for n in (names or range(len(cm)))]
    width = max([len("true\\pred")] + [len(n) for n in names] + [len(str(v)) for row in cm for v in row])
    lines = ["true\\pred".ljust(width) + " " + " ".join(n.rjust(width) for n in names)]
    for name, row in zip(names, cm):
        lines.append(name.ljust(width) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
