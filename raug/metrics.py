"""Classification metrics as pure numpy functions.

Conventions: ``y_true``/``y_pred`` are integer labels in ``0..K-1``; ``probs``
is an (N, K) array of class probabilities. Balanced accuracy is the mean recall
over the classes PRESENT in ``y_true`` (the official ISIC 2019 score, equal to
scikit-learn's ``balanced_accuracy_score``). One-vs-rest AUC is undefined for a
class with no positives or no negatives; such classes are skipped (``nan``)
and left out of the macro average.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _labels(y) -> np.ndarray:
    return np.asarray(y, dtype=np.int64).reshape(-1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of samples with true class ``i`` predicted as ``j`` (int64, K x K)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def normalize_confusion(cm: np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix (each true class sums to 1; empty rows stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def balanced_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if not y_true.size:
        return float("nan")
    k = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    cm = confusion_matrix(y_true, y_pred, k)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def top_k_accuracy(y_true, probs, k: int = 2) -> float:
    """Fraction of samples whose true class is among the ``k`` highest probabilities.

    Ties at the k-th place count in the sample's favour, as in scikit-learn.
    """
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    own = probs[np.arange(len(y_true)), y_true]
    higher = (probs > own[:, None]).sum(axis=1)
    return float(np.mean(higher < k))


def precision_recall_f1(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 (0 where undefined, like ``zero_division=0``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def binary_auc(is_positive, scores) -> float:
    """ROC AUC of ``scores`` for a binary target (Mann-Whitney U); ``nan`` if one side is empty."""
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64).reshape(-1))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_points(is_positive, scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` through every distinct threshold, starting at (0, 0).

    Undefined (``nan``) rates when one side is empty.
    """
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="mergesort")
    pos, scores = pos[order], scores[order]
    # the last index of each run of equal scores is where a threshold can sit
    cut = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(pos)[cut]
    fp = (cut + 1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tp / pos.sum()]
        fpr = np.r_[0.0, fp / (~pos).sum()]
    return fpr, tpr


def per_class_auc(y_true, probs) -> np.ndarray:
    """One-vs-rest AUC per class (``nan`` for a class absent from, or alone in, ``y_true``)."""
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    return np.array([binary_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])])


def macro_auc(y_true, probs) -> float:
    """Mean of the defined one-vs-rest AUCs (``nan`` if none is defined)."""
    aucs = per_class_auc(y_true, probs)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def classification_metrics(
    y_true, probs, class_names: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Every evaluation metric as a flat dict of floats with dotted names.

    Keys (``p`` = ``prefix``, e.g. ``"test."``): ``p+accuracy``,
    ``p+balanced_accuracy``, ``p+top2_accuracy``, ``p+auc`` (macro over the
    defined classes), ``p+n``, and per class ``c``: ``p+auc.c`` (omitted when
    undefined), ``p+precision.c``, ``p+recall.c``, ``p+f1.c``, ``p+support.c``.
    The prediction is the argmax of ``probs``.
    """
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    out = {
        f"{prefix}n": float(len(y_true)),
        f"{prefix}accuracy": accuracy(y_true, y_pred),
        f"{prefix}balanced_accuracy": balanced_accuracy(y_true, y_pred, k),
        f"{prefix}top2_accuracy": top_k_accuracy(y_true, probs, 2),
        f"{prefix}auc": macro_auc(y_true, probs),
    }
    aucs = per_class_auc(y_true, probs)
    precision, recall, f1 = precision_recall_f1(y_true, y_pred, k)
    support = np.bincount(y_true, minlength=k)
    for c, name in enumerate(class_names):
        if np.isfinite(aucs[c]):
            out[f"{prefix}auc.{name}"] = float(aucs[c])
        out[f"{prefix}precision.{name}"] = float(precision[c])
        out[f"{prefix}recall.{name}"] = float(recall[c])
        out[f"{prefix}f1.{name}"] = float(f1[c])
        out[f"{prefix}support.{name}"] = float(support[c])
    return out


def skipped_auc_classes(y_true, probs, class_names: Sequence[str]) -> list[str]:
    """Names of the classes whose one-vs-rest AUC is undefined on these labels."""
    aucs = per_class_auc(y_true, probs)
    return [name for name, a in zip(class_names, aucs) if not np.isfinite(a)]
