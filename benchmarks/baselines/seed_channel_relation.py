"""BASELINE ONLY (benchmarks): the seed's direct channel-relation formula.

Never used by the toolkit; ``kd_losses.channel_relation`` is the implementation.
This reproduces ``D_KD.cr_dist`` / ``gram_matrix`` of the original research code: full
C x C Gram matrices per sample, O(N C^2 hw) time and O(N C^2) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, C, C) Gram matrices ``F F^T / (C H W)`` of (N, C, H, W) features."""
    n, c, h, w = features.shape
    feats = features.reshape(n, c, h * w)
    return feats.bmm(feats.transpose(1, 2)).div(c * h * w)


def seed_channel_relation(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """``sqrt(mse(G_s, G_t))`` computed directly, as the seed did."""
    return F.mse_loss(gram_matrix(feat_s), gram_matrix(feat_t)).sqrt()
