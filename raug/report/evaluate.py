"""Evaluation of a trained task on a split: predictions CSV, metrics and plots.

Layout written for split ``s`` (``val`` or ``test``) under the run folder::

    s_pred/predictions.csv               image, REAL, PRED, AK, BCC, ..., VASC
    s_pred/confusion_matrix.png          raw counts
    s_pred/confusion_matrix_normalized.png
    s_pred/roc_curves.png

``REAL``/``PRED`` are class codes; the class columns hold softmax
probabilities and ``PRED`` is their argmax.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from raug.report.plots import plot_confusion, plot_roc
from raug.train.engine import evaluate
from raug.train.metrics import (
    classification_metrics,
    confusion_matrix,
    normalize_confusion,
    skipped_auc_classes,
)
from raug.train.outputs import RunOutputs
from raug.train.task import Task

log = logging.getLogger(__name__)


def predictions_frame(
    ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """The predictions table: ``image, REAL, PRED, <class probabilities...>``."""
    names = np.asarray(class_names)
    frame = pd.DataFrame(
        {"image": list(ids), "REAL": names[labels], "PRED": names[probs.argmax(axis=1)]}
    )
    for k, name in enumerate(class_names):
        frame[name] = probs[:, k].astype(np.float64)
    return frame


def evaluate_split(
    task: Task,
    loader: Iterable,
    split: str,
    class_names: Sequence[str],
    outputs: RunOutputs,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> dict[str, float]:
    """Evaluate ``task`` on one split and write its predictions and plots.

    In a distributed run every rank calls it with its shard loader; the
    predictions of all ranks are gathered (:func:`raug.train.engine.evaluate`), so the
    metrics cover the whole split on every rank and rank 0 writes the files.

    Returns:
        Flat metrics named ``<split>.<metric>`` (see
        :func:`raug.train.metrics.classification_metrics`) plus ``<split>.loss``.
    """
    result = evaluate(task, loader, device, dtype, channels_last, desc=f"{split} eval")
    if result.logits is None or result.labels is None:
        raise ValueError(f"{split}: the task's eval_step returned no logits to evaluate")
    labels = result.labels.numpy()
    probs = torch.softmax(result.logits, dim=1).numpy().astype(np.float64)
    folder = f"{split}_pred"
    outputs.write_csv(f"{folder}/predictions.csv", predictions_frame(result.ids, labels, probs, class_names))

    metrics = {f"{split}.loss": result.stats["loss"]}
    metrics.update(classification_metrics(labels, probs, class_names, prefix=f"{split}."))
    skipped = skipped_auc_classes(labels, probs, class_names)
    if skipped:
        log.info("%s: no AUC for %s (absent from the labels); macro AUC over the rest", split, skipped)
    if not outputs.is_main:
        return metrics  # other ranks of a distributed run: same metrics, no figures to draw

    cm = confusion_matrix(labels, probs.argmax(axis=1), len(class_names))
    outputs.save_figure(f"{folder}/confusion_matrix.png",
                        plot_confusion(cm, class_names, f"{split}: confusion matrix", False))
    outputs.save_figure(
        f"{folder}/confusion_matrix_normalized.png",
        plot_confusion(normalize_confusion(cm), class_names, f"{split}: recall per class", True),
    )
    outputs.save_figure(f"{folder}/roc_curves.png",
                        plot_roc(labels, probs, class_names, f"{split}: one-vs-rest ROC"))
    return metrics


SPLIT_FILES = (
    "predictions.csv",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "roc_curves.png",
)
