"""Evaluation and training-history figures (matplotlib ``Figure`` objects, no pyplot state).

Each function returns a figure; :meth:`raug.train.outputs.RunOutputs.save_figure`
writes it atomically as PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raug.train.metrics import binary_auc, roc_points


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], title: str, normalized: bool) -> Figure:
    """Confusion matrix heat map with the value in every cell (rows = true class)."""
    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(
        xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
        xlabel="predicted", ylabel="true", title=title,
    )
    ax.tick_params(axis="x", labelrotation=45)
    threshold = (cm.max() if cm.size else 0) / 2.0
    for i in range(k):
        for j in range(k):
            text = f"{cm[i, j]:.2f}" if normalized else f"{int(cm[i, j])}"
            colour = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    return fig


def plot_roc(y_true, probs, class_names: Sequence[str], title: str) -> Figure:
    """One-vs-rest ROC curve per class; classes absent from ``y_true`` are listed as skipped."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    skipped = []
    for k, name in enumerate(class_names):
        positive = y_true == k
        if positive.all() or not positive.any():
            skipped.append(name)
            continue
        fpr, tpr = roc_points(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {binary_auc(positive, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    if skipped:
        title = f"{title}\n(no AUC for {', '.join(skipped)}: absent from the labels)"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_history(history: Sequence[Mapping[str, float]], title: str = "training history") -> Figure:
    """Loss, accuracy, balanced accuracy (train vs val) and learning rate per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [("loss", axes[0, 0]), ("accuracy", axes[0, 1]), ("balanced_accuracy", axes[1, 0])]
    for name, ax in panels:
        for split in ("train", "val"):
            values = [row.get(f"{split}.{name}", np.nan) for row in history]
            ax.plot(epochs, values, marker="o", markersize=3, label=split)
        ax.set(title=name.replace("_", " "), xlabel="epoch")
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot(epochs, [row["lr"] for row in history], marker="o", markersize=3)
    ax.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig
