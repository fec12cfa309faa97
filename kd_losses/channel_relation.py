"""Intra-instance channel-relation KD: Gram matrices of the last feature maps.

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490
"""

from __future__ import annotations

import torch

from ._checks import check_ndim, check_same_shape
from ._precision import autocast_off, result_dtype


def _sq_frobenius_of_cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_n ||a_n^T b_n||_F^2`` for (N, C, hw) inputs, via (N, hw, hw) products."""
    return torch.bmm(a.transpose(1, 2), b).pow(2).sum()


def _sqrt_zero_safe(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not NaN) where ``x <= 0``.

    The loss is a norm, so 0 is a valid subgradient at the kink; a plain ``sqrt`` would
    give ``0 * inf = NaN`` when the student matches the teacher exactly.
    """
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(x))


def channel_relation(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean_{n,i,j} (G_s - G_t)^2)`` with ``G = F F^T / (C h w)`` per sample.

    ``F`` is the (C, hw) reshaped feature map. Evaluated through the identity
    ``||A A^T - B B^T||_F^2 = ||A^T A||^2 - 2 ||A^T B||^2 + ||B^T B||^2``, which needs
    hw x hw products only (O(N C hw^2) instead of O(N C^2 hw) time, no C x C matrices).
    The products run in float64: the three terms nearly cancel when the student is close
    to the teacher, and float32 products would leave an error of order 1e-7 * ||G||^2 in
    a difference that may be 1e-4 * ||G||^2 or smaller. float64 inputs are left as they
    are, autocast never lowers float64 (and is off here), and the result is cast back to
    the input dtype, but never below float32: a float16 result, once multiplied by
    ``lambd_crkd = 1000``, would overflow above 65.5 and cap GradScaler's scale.
    The difference is clamped at 0 before the square root (which has a zero, not NaN,
    gradient at 0). Autograd through the identity gives the exact gradient of the direct
    Gram formula.

    Args:
        feat_s: (N, C, h, w) student features after the adapter.
        feat_t: (N, C, h, w) teacher features (detached here).

    Returns:
        Scalar tensor, float32 for float16/bfloat16 features, else the student's dtype.
    """
    check_ndim("channel_relation", "feat_s", feat_s, 4)
    check_same_shape("channel_relation", feat_s, feat_t)
    n, c, h, w = feat_s.shape
    acc_dtype = torch.promote_types(feat_s.dtype, torch.float64)
    f_s = feat_s.reshape(n, c, h * w).to(acc_dtype)
    f_t = feat_t.detach().reshape(n, c, h * w).to(acc_dtype)
    with autocast_off(feat_s.device):
        with torch.no_grad():
            sq_tt = _sq_frobenius_of_cross(f_t, f_t)
        sq_diff = (
            _sq_frobenius_of_cross(f_s, f_s) - 2.0 * _sq_frobenius_of_cross(f_s, f_t) + sq_tt
        )
        # mean over (N, C, C) of the squared Gram difference, with G = F F^T / (C h w)
        mse = sq_diff / (float(c * h * w) ** 2 * n * c * c)
        return _sqrt_zero_safe(mse).to(result_dtype(feat_s))
