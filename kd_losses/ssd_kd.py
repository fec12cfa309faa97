"""SSD-KD phase-2 objective: the four output terms plus the D-KD relational block.

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

``L = w_ce ce + w_kd kd + w_tf tf + w_ss ss + hr_w hr`` with the seed's weights
0.1, 0.9, 2.7, 10 and ``hr = lambd_drkd (25 rkd_distance + 50 rkd_angle)
+ lambd_crkd channel_relation`` over all 4B views; every weight is a field of
:class:`~kd_losses.weights.SSDKDWeights`. Formulas: ``docs/kd_math.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._precision import result_dtype
from .d_kd import relational_kd
from .ssd import ssd_kd_terms
from .weights import SSDKDWeights


def ssd_kd_loss(
    out_s: Mapping[str, torch.Tensor],
    out_t: Mapping[str, torch.Tensor],
    proj_s: torch.Tensor,
    proj_t: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    weights: SSDKDWeights | None = None,
    anchors: slice | None = None,
) -> dict[str, torch.Tensor]:
    """SSD-KD loss and all its named parts for one batch of 4B views.

    Args:
        out_s: student ``forward_kd`` dict of the 4B views, ``feats_7x7`` adapted.
        out_t: teacher ``forward_kd`` dict of the same views (detached inside).
        proj_s, proj_t: projections of ``avg_pool`` by the student / teacher heads.
        target: (B,) labels of the B images.
        class_weight: optional (K,) CE weights.
        weights: temperatures and ratios (:func:`kd_losses.ssd.ssd_kd_terms`), ``hr_w``
            (0 skips the relational block: ``hr`` = 0, parts absent), the block's weights
            (0 skips a part) and ``w_ce, w_kd, w_tf, w_ss`` (default:
            :class:`~kd_losses.weights.SSDKDWeights`'s).
        anchors: RKD anchor rows of the views' ``avg_pool``
            (:func:`kd_losses.d_kd.relational_kd`); ``None``: all.

    Returns:
        ``loss, ce, kd, tf, ss, hr, rkd_distance, rkd_angle, channel_relation, n_tf,
        n_ss`` (``ce..ss`` include their T^2, relational parts are unweighted); every
        float part is float32 at least (float64 inputs give float64).
    """
    w = weights or SSDKDWeights()
    logits_s = out_s["logits"]
    terms = ssd_kd_terms(logits_s, out_t["logits"], proj_s, proj_t, target, class_weight, w)
    if w.hr_w != 0:
        rel = relational_kd(out_s, out_t, w.relational, method="ssd_kd", anchors=anchors)
    else:
        rel = {"hr": logits_s.new_zeros((), dtype=result_dtype(logits_s))}
    loss = (
        w.w_ce * terms["ce"]
        + w.w_kd * terms["kd"]
        + w.w_tf * terms["tf"]
        + w.w_ss * terms["ss"]
        + w.hr_w * rel["hr"]
    )
    return {"loss": loss, **terms, **rel}
