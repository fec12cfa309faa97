"""D-KD: soft-target KD + RKD (distance, angle) + channel relation, as a weighted sum.

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

``method`` selects the active terms (the ablations of the paper, plus FitNet)::

    none    L = CE_w
    blkd    L = (1 - lambd) CE_w + lambd T^2 kd
    rkd     blkd + lambd_drkd (w_dist rkd_distance + w_angle rkd_angle)
    crkd    blkd + lambd_crkd channel_relation
    d_kd    blkd + both relational parts
    fitnet  L = CE_w + lambd_fitnet fitnet

Inactive terms are not computed and not returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .ce import weighted_ce
from .channel_relation import channel_relation
from .fitnet import fitnet
from .rkd import rkd_angle, rkd_distance
from .soft_kd import soft_kd

KD_METHODS = ("none", "blkd", "rkd", "crkd", "d_kd", "fitnet")

# soft-KD methods -> (RKD active, channel relation active)
_RELATIONAL = {
    "blkd": (False, False),
    "rkd": (True, False),
    "crkd": (False, True),
    "d_kd": (True, True),
}


def _get(out: Mapping[str, torch.Tensor], key: str, who: str, method: str) -> torch.Tensor:
    if key not in out:
        raise ValueError(
            f"{method}: the {who} outputs lack {key!r} (have {sorted(out)}); "
            "pass the dict of model.forward_kd()"
        )
    return out[key]


def relational_kd(
    out_s: Mapping[str, torch.Tensor],
    out_t: Mapping[str, torch.Tensor],
    lambd_drkd: float = 1.0,
    lambd_crkd: float = 1000.0,
    w_dist: float = 25.0,
    w_angle: float = 50.0,
    method: str = "hr",
) -> dict[str, torch.Tensor]:
    """The relational block ``lambd_drkd (w_dist D + w_angle A) + lambd_crkd CR``.

    A part whose weight is 0 is skipped (neither computed nor returned).

    Returns:
        ``{"hr": weighted sum, "rkd_distance", "rkd_angle", "channel_relation"}``
        (the unweighted parts that were computed).
    """
    parts: dict[str, torch.Tensor] = {}
    total = None
    if lambd_drkd != 0:
        pool_s = _get(out_s, "avg_pool", "student", method)
        pool_t = _get(out_t, "avg_pool", "teacher", method)
        parts["rkd_distance"] = rkd_distance(pool_s, pool_t)
        parts["rkd_angle"] = rkd_angle(pool_s, pool_t)
        total = lambd_drkd * (w_dist * parts["rkd_distance"] + w_angle * parts["rkd_angle"])
    if lambd_crkd != 0:
        feat_s = _get(out_s, "feats_7x7", "student", method)
        feat_t = _get(out_t, "feats_7x7", "teacher", method)
        parts["channel_relation"] = channel_relation(feat_s, feat_t)
        term = lambd_crkd * parts["channel_relation"]
        total = term if total is None else total + term
    if total is None:
        logits = _get(out_s, "logits", "student", method)
        total = logits.new_zeros(())
    return {"hr": total, **parts}


def d_kd(
    out_s: Mapping[str, torch.Tensor],
    out_t: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    lambd: float = 0.5,
    T: float = 5.0,
    lambd_drkd: float = 1.0,
    lambd_crkd: float = 1000.0,
    method: str = "d_kd",
    lambd_fitnet: float = 1.0,
    w_dist: float = 25.0,
    w_angle: float = 50.0,
) -> dict[str, torch.Tensor]:
    """D-KD loss and its parts for one batch.

    Args:
        out_s: student ``forward_kd`` dict with ``feats_7x7`` already passed through the
            adapter (only the keys the method needs are read).
        out_t: teacher ``forward_kd`` dict (detached inside every term).
        target: (N,) labels.
        class_weight: optional (K,) CE weights.
        lambd: share of soft KD vs CE_w.
        T: KD temperature.
        lambd_drkd, lambd_crkd: weights of the RKD block and of the channel relation.
        method: one of :data:`KD_METHODS`.
        lambd_fitnet: weight of the hint for ``method="fitnet"`` (CE_w keeps weight 1).
        w_dist, w_angle: RKD distance / angle weights inside the RKD block.

    Returns:
        ``{"loss": weighted total, "ce": CE_w, "kd": soft_kd (without T^2),
        "rkd_distance", "rkd_angle", "channel_relation", "fitnet"}``: the unweighted
        terms that are active for ``method``.
    """
    if method not in KD_METHODS:
        raise ValueError(f"unknown KD method {method!r}; valid: {', '.join(KD_METHODS)}")
    logits_s = _get(out_s, "logits", "student", method)
    ce = weighted_ce(logits_s, target, class_weight)
    terms: dict[str, torch.Tensor] = {"ce": ce}
    if method == "none":
        return {"loss": ce, **terms}
    if method == "fitnet":
        feat_s = _get(out_s, "feats_7x7", "student", method)
        terms["fitnet"] = fitnet(feat_s, _get(out_t, "feats_7x7", "teacher", method))
        return {"loss": ce + lambd_fitnet * terms["fitnet"], **terms}

    logits_t = _get(out_t, "logits", "teacher", method)
    terms["kd"] = soft_kd(logits_s, logits_t, T)
    loss = (1.0 - lambd) * ce + lambd * T * T * terms["kd"]
    use_rkd, use_cr = _RELATIONAL[method]
    if use_rkd or use_cr:
        rel = relational_kd(
            out_s,
            out_t,
            lambd_drkd=lambd_drkd if use_rkd else 0.0,
            lambd_crkd=lambd_crkd if use_cr else 0.0,
            w_dist=w_dist,
            w_angle=w_angle,
            method=method,
        )
        loss = loss + rel.pop("hr")
        terms.update(rel)
    return {"loss": loss, **terms}
