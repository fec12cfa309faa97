"""FitNet hint loss on (adapted) feature maps.

FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)
https://arxiv.org/abs/1412.6550
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_same_shape
from ._precision import at_least_float32, autocast_off


def fitnet(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between adapted student features and teacher features.

    Args:
        feat_s: student features after the adapter, any shape.
        feat_t: teacher features of the same shape (detached here).

    Returns:
        Scalar tensor, float32 for float16/bfloat16 features, else the student's dtype.
    """
    check_same_shape("fitnet", feat_s, feat_t)
    feat_s = at_least_float32(feat_s)
    with autocast_off(feat_s.device):
        return F.mse_loss(feat_s, at_least_float32(feat_t.detach()))
