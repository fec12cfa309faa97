"""SSD-KD phase-2 objective: the four output terms plus the D-KD relational block.

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

``L = w_ce ce + w_kd kd + w_tf tf + w_ss ss + hr_w hr`` with the seed's weights
0.1, 0.9, 2.7, 10 and ``hr = lambd_drkd (25 rkd_distance + 50 rkd_angle)
+ lambd_crkd channel_relation`` over all 4B views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .d_kd import relational_kd
from .ssd import ssd_kd_terms


def ssd_kd_loss(
    out_s: Mapping[str, torch.Tensor],
    out_t: Mapping[str, torch.Tensor],
    proj_s: torch.Tensor,
    proj_t: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    kd_T: float = 4.0,
    tf_T: float = 4.0,
    ss_T: float = 0.5,
    ratio_tf: float = 1.0,
    ratio_ss: float = 0.75,
    hr_w: float = 1.0,
    lambd_drkd: float = 1.0,
    lambd_crkd: float = 1000.0,
    w_ce: float = 0.1,
    w_kd: float = 0.9,
    w_tf: float = 2.7,
    w_ss: float = 10.0,
) -> dict[str, torch.Tensor]:
    """SSD-KD loss and all its named parts for one batch of 4B views.

    Args:
        out_s: student ``forward_kd`` dict of the 4B views, ``feats_7x7`` adapted.
        out_t: teacher ``forward_kd`` dict of the same views (detached inside).
        proj_s, proj_t: projections of ``avg_pool`` by the student / teacher heads.
        target: (B,) labels of the B images.
        class_weight, kd_T, tf_T, ss_T, ratio_tf, ratio_ss: see
            :func:`kd_losses.ssd.ssd_kd_terms`.
        hr_w: weight of the relational block; 0 skips it (``hr`` = 0, parts absent).
        lambd_drkd, lambd_crkd: weights inside the relational block (0 skips a part).
        w_ce, w_kd, w_tf, w_ss: weights of the four output terms.

    Returns:
        ``loss, ce, kd, tf, ss, hr, rkd_distance, rkd_angle, channel_relation, n_tf,
        n_ss`` (``ce..ss`` include their T^2, relational parts are unweighted).
    """
    logits_s = out_s["logits"]
    terms = ssd_kd_terms(
        logits_s,
        out_t["logits"],
        proj_s,
        proj_t,
        target,
        class_weight=class_weight,
        kd_T=kd_T,
        tf_T=tf_T,
        ss_T=ss_T,
        ratio_tf=ratio_tf,
        ratio_ss=ratio_ss,
    )
    if hr_w != 0:
        rel = relational_kd(out_s, out_t, lambd_drkd, lambd_crkd, method="ssd_kd")
    else:
        rel = {"hr": logits_s.new_zeros(())}
    loss = (
        w_ce * terms["ce"]
        + w_kd * terms["kd"]
        + w_tf * terms["tf"]
        + w_ss * terms["ss"]
        + hr_w * rel["hr"]
    )
    return {"loss": loss, **terms, **rel}
