"""Classification metrics, computed through scikit-learn.

Conventions: ``y_true``/``y_pred`` are integer labels in ``0..K-1``; ``probs``
is an (N, K) array of class probabilities. Balanced accuracy is the mean recall
over the classes PRESENT in ``y_true`` (the official ISIC 2019 score,
scikit-learn's ``balanced_accuracy_score``). One-vs-rest AUC is undefined for a
class with no positives or no negatives; such classes are skipped (``nan``)
and left out of the macro average.

Added here, where scikit-learn differs: ``nan`` for empty inputs (sklearn
raises) and for undefined AUCs (without sklearn's warning), ``num_classes``
fixing the shape of the outputs, the row normalisation of a given confusion
matrix, top-k accuracy that counts ties in the sample's favour, and two
roundings. The AUC is the area under scikit-learn's ROC curve summed in integer
counts, so the only rounding is the final division (``roc_auc_score`` sums
float rates and can differ in the last bit), and F1 is ``2PR / (P + R)`` of
scikit-learn's precision and recall. Both keep, bit for bit, the values of the
numpy implementation these functions replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning


def _labels(y) -> np.ndarray:
    return np.asarray(y, dtype=np.int64).reshape(-1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions (``nan`` for no sample)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    return float(skm.accuracy_score(y_true, y_pred)) if y_true.size else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of samples with true class ``i`` predicted as ``j`` (int64, K x K)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if not y_true.size:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    cm = skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
    return cm.astype(np.int64, copy=False)


def normalize_confusion(cm: np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix (each true class sums to 1; empty rows stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def balanced_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (``nan`` for no sample).

    ``num_classes`` does not change the result: a class absent from ``y_true``
    has no recall and does not count, whether or not it is predicted.
    """
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if not y_true.size:
        return float("nan")
    with warnings.catch_warnings():
        # sklearn warns when y_pred holds a class absent from y_true; skipping it is the convention
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def top_k_accuracy(y_true, probs, k: int = 2) -> float:
    """Fraction of samples whose true class is among the ``k`` highest probabilities.

    Ties at the k-th place count in the sample's favour: a sample is a hit when
    fewer than ``k`` classes score strictly higher than its true class. This is
    not scikit-learn's ``top_k_accuracy_score``, which breaks ties by class index
    (higher index first); the two agree when no probabilities tie.
    """
    y_true = _labels(y_true)
    if not y_true.size:
        return float("nan")
    probs = np.asarray(probs, dtype=np.float64)
    own = probs[np.arange(len(y_true)), y_true]
    higher = (probs > own[:, None]).sum(axis=1)
    return float(np.mean(higher < k))


def precision_recall_f1(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 (0 where undefined, like ``zero_division=0``)."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if not y_true.size:
        return np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    precision, recall, _, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(num_classes), zero_division=0
    )
    # sklearn's F1 is 2TP / (2TP + FP + FN), rounded differently in the last bit;
    # the harmonic mean of its P and R keeps the values this function always gave.
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return precision, recall, f1


def roc_points(is_positive, scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` through every distinct threshold, starting at (0, 0).

    Undefined (``nan``) rates when one side is empty (after the starting 0).
    """
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    with warnings.catch_warnings():
        # sklearn warns when one side is empty; the nan rates are the documented answer
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = skm.roc_curve(pos, scores, pos_label=True, drop_intermediate=False)
    fpr[0] = tpr[0] = 0.0  # sklearn makes an empty side's rate nan from the start
    return fpr, tpr


def binary_auc(is_positive, scores) -> float:
    """ROC AUC of ``scores`` for a binary target; ``nan`` if one side is empty.

    The trapezoids under :func:`roc_points` are summed in counts of samples
    (integers, so exactly): the only rounding is the final division, which gives
    the correctly rounded Mann-Whitney ``U / (n_pos * n_neg)``.
    """
    pos = np.asarray(is_positive, dtype=bool).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    fpr, tpr = roc_points(pos, scores)
    # each rate is count / total rounded once, so rint(rate * total) is the count again
    fp = np.rint(fpr * n_neg).astype(np.int64)
    tp = np.rint(tpr * n_pos).astype(np.int64)
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2 * n_pos * n_neg)


def per_class_auc(y_true, probs) -> np.ndarray:
    """One-vs-rest AUC per class (``nan`` for a class absent from, or alone in, ``y_true``)."""
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    return np.array([binary_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])])


def _mean_of_defined(aucs: np.ndarray) -> float:
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def macro_auc(y_true, probs) -> float:
    """Mean of the defined one-vs-rest AUCs (``nan`` if none is defined)."""
    return _mean_of_defined(per_class_auc(y_true, probs))


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
    aucs = per_class_auc(y_true, probs)
    out = {
        f"{prefix}n": float(len(y_true)),
        f"{prefix}accuracy": accuracy(y_true, y_pred),
        f"{prefix}balanced_accuracy": balanced_accuracy(y_true, y_pred, k),
        f"{prefix}top2_accuracy": top_k_accuracy(y_true, probs, 2),
        f"{prefix}auc": _mean_of_defined(aucs),
    }
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
