"""D-KD: soft-target KD + RKD (distance, angle) + channel relation, as a weighted sum.

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

``method`` selects the active terms through its row of
:data:`kd_losses.methods.DKD_FAMILY` (the ablations of the paper, plus FitNet)::

    none    L = CE_w
    blkd    L = (1 - lambd) CE_w + lambd T^2 kd
    rkd     blkd + lambd_drkd (w_dist rkd_distance + w_angle rkd_angle)
    crkd    blkd + lambd_crkd channel_relation
    d_kd    blkd + both relational parts
    fitnet  L = CE_w + lambd_fitnet fitnet

The weights are one :class:`~kd_losses.weights.DKDWeights`; inactive terms are not
computed and not returned. Formulas: ``docs/kd_math.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._precision import result_dtype
from .ce import weighted_ce
from .channel_relation import channel_relation
from .fitnet import fitnet
from .methods import KD_METHODS, dkd_method
from .rkd import rkd_angle, rkd_distance
from .soft_kd import soft_kd
from .weights import DKDWeights, RelationalWeights


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
    weights: RelationalWeights | None = None,
    method: str = "hr",
    anchors: slice | None = None,
) -> dict[str, torch.Tensor]:
    """The relational block ``lambd_drkd (w_dist D + w_angle A) + lambd_crkd CR``.

    A part whose weight is 0 is skipped (neither computed nor returned).

    Args:
        out_s, out_t: student (``feats_7x7`` adapted) and teacher ``forward_kd`` dicts.
        weights: the block's weights (default: :class:`RelationalWeights`'s defaults).
        method: named in error messages.
        anchors: the rows of ``avg_pool`` whose RKD rows this call averages over
            (:func:`kd_losses.rkd.rkd_angle`); ``None``: all. The channel relation is
            per sample and always uses every row it is given.

    Returns:
        ``{"hr": weighted sum, "rkd_distance", "rkd_angle", "channel_relation"}``
        (the unweighted parts that were computed).
    """
    weights = weights or RelationalWeights()
    parts: dict[str, torch.Tensor] = {}
    total = None
    if weights.uses_rkd:
        pool_s = _get(out_s, "avg_pool", "student", method)
        pool_t = _get(out_t, "avg_pool", "teacher", method)
        parts["rkd_distance"] = rkd_distance(pool_s, pool_t, anchors)
        parts["rkd_angle"] = rkd_angle(pool_s, pool_t, anchors)
        total = weights.lambd_drkd * (
            weights.w_dist * parts["rkd_distance"] + weights.w_angle * parts["rkd_angle"]
        )
    if weights.uses_channel_relation:
        feat_s = _get(out_s, "feats_7x7", "student", method)
        feat_t = _get(out_t, "feats_7x7", "teacher", method)
        parts["channel_relation"] = channel_relation(feat_s, feat_t)
        term = weights.lambd_crkd * parts["channel_relation"]
        total = term if total is None else total + term
    if total is None:
        logits = _get(out_s, "logits", "student", method)
        total = logits.new_zeros((), dtype=result_dtype(logits))
    return {"hr": total, **parts}


def d_kd(
    out_s: Mapping[str, torch.Tensor],
    out_t: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    method: str = "d_kd",
    weights: DKDWeights | None = None,
    anchors: slice | None = None,
) -> dict[str, torch.Tensor]:
    """D-KD loss and its parts for one batch.

    Args:
        out_s: student ``forward_kd`` dict with ``feats_7x7`` already passed through the
            adapter (only the keys the method needs are read).
        out_t: teacher ``forward_kd`` dict (detached inside every term).
        target: (N,) labels.
        class_weight: optional (K,) CE weights.
        method: one of :data:`KD_METHODS` (its row of ``DKD_FAMILY`` selects the terms).
        weights: ``lambd`` (share of soft KD vs CE_w), ``T``, ``lambd_fitnet`` (CE_w keeps
            weight 1) and the relational block's weights (default: :class:`DKDWeights`'s).
        anchors: RKD anchor rows of ``avg_pool`` (:func:`relational_kd`); ``None``: all.

    Returns:
        ``{"loss": weighted total, "ce": CE_w, "kd": soft_kd (without T^2),
        "rkd_distance", "rkd_angle", "channel_relation", "fitnet"}``: the unweighted
        terms that are active for ``method`` (``DKDMethod.terms``). Every part is
        float32 at least, whatever autocast does (float64 inputs give float64).
    """
    row = dkd_method(method)
    weights = weights or DKDWeights()
    logits_s = _get(out_s, "logits", "student", method)
    ce = weighted_ce(logits_s, target, class_weight)
    terms: dict[str, torch.Tensor] = {"ce": ce}
    loss = ce
    if row.soft_kd:
        logits_t = _get(out_t, "logits", "teacher", method)
        terms["kd"] = soft_kd(logits_s, logits_t, weights.T)
        loss = (1.0 - weights.lambd) * ce + weights.lambd * weights.T * weights.T * terms["kd"]
    if row.fitnet:
        feat_s = _get(out_s, "feats_7x7", "student", method)
        terms["fitnet"] = fitnet(feat_s, _get(out_t, "feats_7x7", "teacher", method))
        loss = loss + weights.lambd_fitnet * terms["fitnet"]
    block = row.relational(weights)
    if block is not None:
        rel = relational_kd(out_s, out_t, block, method=method, anchors=anchors)
        loss = loss + rel.pop("hr")
        terms.update(rel)
    return {"loss": loss, **terms}


__all__ = ["KD_METHODS", "d_kd", "relational_kd"]
