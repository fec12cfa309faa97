"""Class-weighted cross-entropy (the supervised term of every method).

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._checks import check_ndim
from ._precision import at_least_float32, autocast_off


def weighted_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """PyTorch's weighted-mean cross-entropy ``sum_i w[y_i] * nll_i / sum_i w[y_i]``.

    Args:
        logits: (N, K) scores.
        target: (N,) integer labels in ``[0, K)``.
        class_weight: optional (K,) weights (tensor, list or array); ``None`` = plain mean.

    Returns:
        Scalar tensor, float32 for float16/bfloat16 logits, else ``logits``' dtype
        (:mod:`kd_losses._precision`).
    """
    check_ndim("weighted_ce", "logits", logits, 2)
    logits = at_least_float32(logits)
    if class_weight is not None:
        # Cast to the logits' dtype/device so float64 golden checks and AMP both work.
        class_weight = torch.as_tensor(class_weight, dtype=logits.dtype, device=logits.device)
        if class_weight.shape != (logits.shape[1],):
            raise ValueError(
                f"weighted_ce: class_weight has shape {tuple(class_weight.shape)}, "
                f"expected ({logits.shape[1]},) for {logits.shape[1]} classes"
            )
    with autocast_off(logits.device):
        return F.cross_entropy(logits, target, weight=class_weight)
