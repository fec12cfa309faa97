"""SSD-KD transformed-view and similarity terms with error-level ranking.

Knowledge Distillation Meets Self-Supervision (Xu et al., ECCV 2020)
https://arxiv.org/abs/2006.07114 ; SSD-KD (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._precision import at_least_float32, autocast_off
from .ce import weighted_ce
from .soft_kd import soft_kd
from .views import num_images, own_columns, split_views, view_similarity
from .weights import SSDKDWeights


def error_level_mask(
    scores: torch.Tensor, own: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows kept by the error-level ranking.

    ``rank_j`` = position of column ``own[j]`` in row j sorted descending (stable, so
    tied scores keep column order; 0 = the teacher is right). Every rank-0 row is kept,
    plus the ``floor(ratio * #wrong)`` wrong rows of smallest rank (stable: ties keep row
    order). The count stays a tensor, so no host sync is needed.

    Args:
        scores: (R, K) teacher scores (probabilities or similarities).
        own: (R,) the right column of every row.
        ratio: share of wrong rows to keep, in [0, 1].

    Returns:
        ``(mask, n_kept)``: (R,) bool mask and a 0-d int64 tensor.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"error-level ranking: ratio must be in [0, 1], got {ratio}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = (order == own.unsqueeze(1)).to(torch.int64).argmax(dim=1)
    n_right = (rank == 0).sum()
    n_wrong = rank.numel() - n_right
    # int(n_wrong * ratio) in float64, exactly as the seed's Python arithmetic.
    n_kept = n_right + torch.floor(n_wrong.to(torch.float64) * ratio).to(torch.int64)
    by_rank = torch.sort(rank, stable=True).indices
    position = torch.empty_like(by_rank)
    position[by_rank] = torch.arange(rank.numel(), device=rank.device)
    return position < n_kept, n_kept


def masked_kl(
    scores_s: torch.Tensor, scores_t: torch.Tensor, T: float, mask: torch.Tensor
) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` averaged over the rows where ``mask`` is true.

    Equals ``F.kl_div(..., reduction="batchmean")`` on the kept rows; 0 when none is
    kept. The teacher scores are detached here. Computed and returned in float32 at least
    (:mod:`kd_losses._precision`).
    """
    scores_s = at_least_float32(scores_s)
    scores_t = at_least_float32(scores_t.detach())
    with autocast_off(scores_s.device):
        log_p_s = F.log_softmax(scores_s / T, dim=1)
        p_t = F.softmax(scores_t / T, dim=1)
        rows = F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1)
        kept = mask.to(rows.dtype)
        return (rows * kept).sum() / kept.sum().clamp(min=1.0)


def ssd_kd_terms(
    logits_s: torch.Tensor, logits_t: torch.Tensor, proj_s: torch.Tensor, proj_t: torch.Tensor,
    target: torch.Tensor, class_weight: torch.Tensor | Sequence[float] | None = None,
    weights: SSDKDWeights | None = None,
) -> dict[str, torch.Tensor]:
    """The four SSD-KD output terms (phase 2), each already multiplied by its ``T^2``.

    Rows follow :mod:`kd_losses.views` (4B rows, ``4i + r``). Teacher inputs are detached.

    Args:
        logits_s, logits_t: (4B, K) student / teacher logits of all views.
        proj_s, proj_t: (4B, D_s) / (4B, D_t) projections of ``avg_pool`` (after the heads).
        target: (B,) labels of the B images.
        class_weight: optional (K,) CE weights.
        weights: the temperatures ``kd_T``, ``tf_T``, ``ss_T`` of the kd / tf / ss terms and
            ``ratio_tf``, ``ratio_ss``, the share of wrongly ranked rows kept in tf / ss
            (default: :class:`~kd_losses.weights.SSDKDWeights`'s).

    Returns:
        ``ce`` = CE_w on normal rows; ``kd`` = kd_T^2 KL on normal rows; ``tf`` =
        tf_T^2 KL on the kept rotated rows; ``ss`` = ss_T^2 KL between view-similarity
        matrices on the kept rows; ``n_tf``, ``n_ss`` = 0-d int64 tensors, rows kept.
        The four losses are float32 at least, whatever the inputs' dtype or autocast.
    """
    w = weights or SSDKDWeights()
    b = num_images(logits_s.shape[0])
    for name, t in (("logits_t", logits_t), ("proj_s", proj_s), ("proj_t", proj_t)):
        if t.shape[0] != 4 * b:
            raise ValueError(f"ssd_kd_terms: {name} has {t.shape[0]} rows, expected {4 * b}")
    if target.shape != (b,):
        raise ValueError(
            f"ssd_kd_terms: target must hold the {b} image labels, got shape {tuple(target.shape)}"
        )
    logits_s = at_least_float32(logits_s)
    logits_t = at_least_float32(logits_t.detach())
    z_s_normal, z_s_rot = split_views(logits_s)
    z_t_normal, z_t_rot = split_views(logits_t)

    ce = weighted_ce(z_s_normal, target, class_weight)
    kd = soft_kd(z_s_normal, z_t_normal, w.kd_T) * w.kd_T**2

    with autocast_off(z_t_rot.device):
        p_t_rot = F.softmax(z_t_rot / w.tf_T, dim=1)
    keep_tf, n_tf = error_level_mask(p_t_rot, target.repeat_interleave(3), w.ratio_tf)
    tf = masked_kl(z_s_rot, z_t_rot, w.tf_T, keep_tf) * w.tf_T**2

    sim_s = view_similarity(proj_s)
    with torch.no_grad():
        sim_t = view_similarity(proj_t.detach())
    keep_ss, n_ss = error_level_mask(sim_t, own_columns(b, sim_t.device), w.ratio_ss)
    ss = masked_kl(sim_s, sim_t, w.ss_T, keep_ss) * w.ss_T**2
    return {"ce": ce, "kd": kd, "tf": tf, "ss": ss, "n_tf": n_tf, "n_ss": n_ss}
