"""Inter-instance relational KD: distance-wise and angle-wise terms on pooled embeddings.

Relational Knowledge Distillation (Park et al., CVPR 2019)
https://arxiv.org/abs/1904.05068

Both terms take ``anchors``, a slice of rows: the loss is then the mean over the
entries whose first index (the anchor ``a`` of ``D_ab`` / of the angle at ``e_a``)
lies in the slice, everything else (all ``b``, ``c``, the distance normaliser)
still over all N rows. The mean over a partition of the rows into equal slices is
the full loss. A data-parallel run with ``_gather_embeddings=True`` uses it so
that each process computes only its own anchors against the global batch:
O(N_local x N_global x D) memory for the angle term instead of O(N_global^2 x D)
(``docs/distributed.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_ndim, check_same_rows
from ._precision import at_least_float32, autocast_off, result_dtype

_EPS_SQ = 1e-12


def _anchor_rows(term: str, n: int, anchors: slice | None) -> slice:
    """``anchors`` checked against ``n`` rows (all rows when ``None``)."""
    if anchors is None:
        return slice(0, n)
    start, stop, step = anchors.indices(n)
    if step != 1 or start >= stop or (anchors.stop is not None and anchors.stop > n):
        raise ValueError(f"{term}: anchors {anchors} is not a non-empty run of rows of 0..{n - 1}")
    return slice(start, stop)


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix ``D_ij = ||e_i - e_j||`` with an exact zero diagonal.

    Squared distances come from ``|e_i|^2 + |e_j|^2 - 2 e_i.e_j`` (as the seed did) but
    are accumulated in float64: near-duplicate embeddings, e.g. the rotated views of one
    image in SSD-KD, would otherwise lose most digits to cancellation in float32. The
    N x N work is negligible. They are clamped at 1e-12 before the square root, so an
    off-diagonal entry is never 0 and its gradient stays finite.

    Args:
        emb: (N, D) embeddings.

    Returns:
        (N, N) distances in ``emb``'s dtype, float32 for float16/bfloat16 ``emb``
        (a 16-bit distance matrix would carry 1-4 % errors into the loss).
    """
    e = emb.to(torch.promote_types(emb.dtype, torch.float64))
    with autocast_off(emb.device):
        sq_norm = e.pow(2).sum(dim=1)
        sq = (sq_norm.unsqueeze(0) + sq_norm.unsqueeze(1) - 2.0 * e @ e.t()).clamp(min=_EPS_SQ)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    return sq.sqrt().masked_fill(eye, 0.0).to(result_dtype(emb))


def _normalised_distances(emb: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(emb)
    # Mean over the strictly positive entries. Off-diagonal entries are >= 1e-6 after the
    # clamp and the diagonal is exactly 0, so this equals the seed's d[d > 0].mean()
    # without the host sync that boolean indexing costs on CUDA.
    return d / (d.sum() / (d > 0).sum())


def rkd_distance(emb_s: torch.Tensor, emb_t: torch.Tensor, anchors: slice | None = None) -> torch.Tensor:
    """RKD distance loss: smooth-L1 (beta 1, mean over N^2) of normalised distance matrices.

    Args:
        emb_s: (N, D_s) student embeddings (e.g. ``avg_pool``).
        emb_t: (N, D_t) teacher embeddings; widths may differ. Detached here.
        anchors: only rows ``D[anchors]`` enter the mean (module docstring); the
            normalising mean distance stays that of all N rows. ``None``: all rows.

    Returns:
        Scalar tensor of the student's dtype (float32 at least); 0 (still attached to
        ``emb_s``) when N < 2, where no pair exists.
    """
    check_ndim("rkd_distance", "emb_s", emb_s, 2)
    check_ndim("rkd_distance", "emb_t", emb_t, 2)
    check_same_rows("rkd_distance", emb_s, emb_t)
    rows = _anchor_rows("rkd_distance", emb_s.shape[0], anchors)
    if emb_s.shape[0] < 2:
        return at_least_float32(emb_s).sum() * 0.0
    with torch.no_grad():
        d_t = _normalised_distances(emb_t.detach()).to(result_dtype(emb_s))
    d_s = _normalised_distances(emb_s)
    if anchors is not None:  # the N x N matrix is small (no D factor): rows after the mean
        d_s, d_t = d_s[rows], d_t[rows]
    with autocast_off(d_s.device):
        return F.smooth_l1_loss(d_s, d_t, beta=1.0)


def triplet_angles(emb: torch.Tensor, anchors: slice | None = None) -> torch.Tensor:
    """Cosines ``<u_ab, u_ac>`` for every anchor a and pair (b, c), flattened to A x N^2.

    ``u_ab = normalize(e_b - e_a)`` with eps 1e-12, so a zero difference gives a zero
    vector and a zero cosine. Computed in float32 at least, with autocast off (which
    would run the bmm in 16 bits). The anchors are the rows ``emb[anchors]`` (all N
    by default, A = N); memory is A x N x D for the unit vectors plus A x N^2 cosines.
    """
    emb = at_least_float32(emb)
    rows = _anchor_rows("triplet_angles", emb.shape[0], anchors)
    with autocast_off(emb.device):
        diff = emb.unsqueeze(0) - emb[rows].unsqueeze(1)  # diff[a, b] = e_b - e_a
        unit = F.normalize(diff, p=2, dim=2, eps=1e-12)
        return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_angle(emb_s: torch.Tensor, emb_t: torch.Tensor, anchors: slice | None = None) -> torch.Tensor:
    """RKD angle loss: smooth-L1 (beta 1, mean over N^3) of triplet-angle cosines.

    Args:
        emb_s: (N, D_s) student embeddings.
        emb_t: (N, D_t) teacher embeddings; widths may differ. Detached here.
        anchors: only the angles at these rows' embeddings (mean over A x N^2);
            ``None``: all rows.

    Returns:
        Scalar tensor of the student's dtype (float32 at least).
    """
    check_ndim("rkd_angle", "emb_s", emb_s, 2)
    check_ndim("rkd_angle", "emb_t", emb_t, 2)
    check_same_rows("rkd_angle", emb_s, emb_t)
    with torch.no_grad():
        a_t = triplet_angles(emb_t.detach(), anchors).to(result_dtype(emb_s))
    a_s = triplet_angles(emb_s, anchors)
    with autocast_off(a_s.device):
        return F.smooth_l1_loss(a_s, a_t, beta=1.0)
