"""Metrics of finetuned heads. Classification: accuracy, macro precision / recall / F1, per-class
scores, the confusion matrix, and the decision threshold of a binary classifier that maximises
one of them. Multi-label classification: micro and macro F1 and exact-match accuracy. Regression:
mean squared error, R^2, Pearson's and Spearman's correlations.

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
        "per_class_precision": [float(v) for v in precision],
        "per_class_recall": [float(v) for v in recall],
        "support": [int(v) for v in actual],
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


def per_class_scores(report: dict, names: Sequence[str]) -> dict:
    """{class name: {precision, recall, f1, support}} from a classification_report or a
    multilabel_report (JSON-able: what summary.json keeps as eval_per_class)."""
    return {str(n): {"precision": report["per_class_precision"][i], "recall": report["per_class_recall"][i],
                     "f1": report["per_class_f1"][i], "support": report["support"][i]} for i, n in enumerate(names)}


def per_class_table(per_class: dict) -> str:
    """{class name: {precision, recall, f1, support}} as an aligned text table."""
    width = max([len("class")] + [len(str(n)) for n in per_class])
    lines = [f"{'class'.ljust(width)} precision    recall        f1   support"]
    for name, c in per_class.items():
        lines.append(f"{str(name).ljust(width)} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:9d}")
    return "\n".join(lines)


THRESHOLD_METRICS = ("f1", "positive_f1", "accuracy")


def best_threshold(scores, labels, metric: str = "f1") -> tuple[float, float]:
    """The decision threshold of a binary classifier (predict class 1 when its score >= t) that
    maximises `metric` over the examples: "f1" (macro F1 of both classes, as eval_f1), "positive_f1"
    (class 1's F1) or "accuracy". Returns (t, the metric at t). Every distinct score is tried, in
    one pass: sorted high to low, predicting the top k as class 1 for each k."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold metric must be one of {', '.join(THRESHOLD_METRICS)}, got {metric!r}")
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    if s.numel() == 0 or s.shape != y.shape:
        raise ValueError(f"best_threshold needs as many scores as labels, and some: {s.numel()} and {y.numel()}")
    s, order = s.sort(descending=True)
    y = y[order]
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)  # predicting the top k+1 as class 1
    fn, tn = y.sum() - tp, (1 - y).sum() - fp
    last_of_tie = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # a cut falls between distinct scores only

    def f1(t, f_p, f_n):
        d = 2 * t + f_p + f_n
        return torch.where(d > 0, 2 * t / d.clamp(min=1e-12), torch.zeros_like(d))
    value = {"f1": (f1(tp, fp, fn) + f1(tn, fn, fp)) / 2, "positive_f1": f1(tp, fp, fn),
             "accuracy": (tp + tn) / len(y)}[metric]
    value = torch.where(last_of_tie, value, torch.full_like(value, -1.0))
    k = int(value.argmax())
    return float(s[k]), float(value[k])


def multilabel_report(predicted, targets) -> dict:
    """(N, K) 0/1 predictions against (N, K) 0/1 targets: micro scores (every decision counted
    once), macro scores (the mean of the labels' own), exact-match accuracy, and each label's
    precision, recall, F1 and support. 0 where a denominator is 0, as scikit-learn's zero_division=0."""
    p = torch.as_tensor(predicted).double().reshape(len(predicted), -1)
    y = torch.as_tensor(targets).double().reshape(p.shape)
    tp, fp, fn = (p * y).sum(0), (p * (1 - y)).sum(0), ((1 - p) * y).sum(0)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1e-12), torch.zeros_like(a))
    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    T, P, N = tp.sum(), fp.sum(), fn.sum()
    return {"micro_precision": float(ratio(T, T + P)), "micro_recall": float(ratio(T, T + N)),
            "micro_f1": float(ratio(2 * T, 2 * T + P + N)), "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean()),
            "subset_accuracy": float((p == y).all(dim=1).double().mean()),
            "per_class_precision": precision.tolist(), "per_class_recall": recall.tolist(),
            "per_class_f1": f1.tolist(), "support": [int(v) for v in y.sum(0)]}


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of x's values, tied values sharing the mean of their ranks (as Spearman's
    correlation wants them)."""
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    _, group, size = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(size), dtype=torch.float64).index_add_(0, group, ranks)
    return (sums / size)[group]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation; NaN when either side is constant (it is undefined)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def regression_report(predicted, targets) -> dict:
    """Mean squared error, R^2 (1 - SSE / the targets' sum of squares), Pearson's correlation and
    Spearman's (Pearson's of the average ranks)."""
    p = torch.as_tensor(predicted).double().reshape(-1)
    y = torch.as_tensor(targets).double().reshape(-1)
    sse, sst = (p - y).square().sum(), (y - y.mean()).square().sum()
    return {"mse": float(sse / len(y)), "r2": float(1 - sse / sst) if sst > 0 else float("nan"),
            "pearson": pearson(p, y), "spearman": pearson(average_ranks(p), average_ranks(y))}
