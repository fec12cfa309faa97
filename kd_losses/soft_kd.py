"""Soft-target knowledge distillation.

Distilling the Knowledge in a Neural Network (Hinton et al., 2015)
https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_ndim, check_same_shape
from ._precision import at_least_float32, autocast_off


def soft_kd(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """Batch-mean ``KL(softmax(z_t / T) || softmax(z_s / T))``, without the ``T^2`` factor.

    The seed computed ``KLDivLoss(size_average=False)(...) / N``, which is the same
    batch mean. Callers multiply by ``T^2`` (Hinton et al.) where the method wants it.

    Args:
        logits_s: (N, K) student logits.
        logits_t: (N, K) teacher logits (detached here: the teacher never gets gradients).
        T: softmax temperature (> 0).

    Returns:
        Scalar tensor, float32 for float16/bfloat16 logits, else the student's dtype.
    """
    check_ndim("soft_kd", "logits_s", logits_s, 2)
    check_same_shape("soft_kd", logits_s, logits_t)
    if T <= 0:
        raise ValueError(f"soft_kd: temperature T must be > 0, got {T}")
    logits_s = at_least_float32(logits_s)
    logits_t = at_least_float32(logits_t.detach())
    with autocast_off(logits_s.device):
        log_p_s = F.log_softmax(logits_s / T, dim=1)
        p_t = F.softmax(logits_t / T, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="batchmean")
