"""Four-rotation views for SSD-KD and the view-similarity matrix.

Knowledge Distillation Meets Self-Supervision (Xu et al., ECCV 2020)
https://arxiv.org/abs/2006.07114 ; used by SSD-KD (Wang et al., MedIA 2023)
https://arxiv.org/abs/2203.11490

Layout: image i of a batch of B becomes rows ``4i + r``, r = 0..3, rotated by r * 90
degrees; r = 0 is the "normal" view. Rotated rows keep their natural order (image 0
views 1, 2, 3, image 1 views 1, 2, 3, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._precision import at_least_float32, autocast_off

NUM_VIEWS = 4


def rotate_views(x: torch.Tensor) -> torch.Tensor:
    """Stack the four rotations of every image at rows ``4i + r``.

    ``torch.rot90(img, k=r, dims=(-2, -1))`` turns the image counter-clockwise as
    displayed (rows = height, columns = width), exactly like the seed's
    ``np.rot90(image_hwc, r)`` on H x W x C arrays.

    A channels-last input gives a channels-last output (the views are stacked in
    (B, 4, H, W, C) order, so no extra copy), otherwise a contiguous one; the
    values are the same either way.

    Args:
        x: (B, C, H, W) square images (H == W, so the views stack).

    Returns:
        (4B, C, H, W) tensor.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_views: expected (B, C, H, W) with H == W, got {tuple(x.shape)}")
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)  # a contiguous view of the channels-last storage
        views = [torch.rot90(nhwc, k=r, dims=(1, 2)) for r in range(NUM_VIEWS)]
        stacked = torch.stack(views, dim=1).reshape(-1, *nhwc.shape[1:])  # (4B, H, W, C)
        return stacked.permute(0, 3, 1, 2)
    views = [torch.rot90(x, k=r, dims=(-2, -1)) for r in range(NUM_VIEWS)]
    return torch.stack(views, dim=1).reshape(-1, *x.shape[1:])


def view_labels(target: torch.Tensor) -> torch.Tensor:
    """Per-image rows for the 4B views: ``target[i]`` repeated at rows 4i..4i+3.

    Labels (B,) or any per-image rows, e.g. the metadata (B, M): the rotated views of an
    image share its label and its metadata.
    """
    return target.repeat_interleave(NUM_VIEWS, dim=0)


def num_images(rows: int) -> int:
    """Number of images B behind ``rows`` = 4B view rows (ValueError otherwise)."""
    if rows % NUM_VIEWS:
        raise ValueError(f"expected 4 views per image (rows 4i + r), got {rows} rows")
    return rows // NUM_VIEWS


def split_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (4B, ...) rows into normal (B, ...) and rotated (3B, ...) rows, in order."""
    b = num_images(t.shape[0])
    grouped = t.reshape(b, NUM_VIEWS, *t.shape[1:])
    return grouped[:, 0], grouped[:, 1:].reshape(3 * b, *t.shape[1:])


def own_columns(b: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source image of each rotated row: ``[0, 0, 0, 1, 1, 1, ...]`` (3B,)."""
    return torch.arange(b, device=device).repeat_interleave(NUM_VIEWS - 1)


def view_similarity(proj: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``S[j, i] = cosine(rotated row j, normal row of image i)``, shape (3B, B).

    Same values as the seed's ``F.cosine_similarity`` on expanded (3B, D, B) tensors
    (eps 1e-8 on the product of the norms) without building them.

    Args:
        proj: (4B, D) projected features in the row layout of this module.
        eps: lower bound of ``||a|| * ||b||``.

    Returns:
        (3B, B) cosines, float32 for float16/bfloat16 ``proj`` (autocast off), else
        ``proj``'s dtype.
    """
    if proj.dim() != 2:
        raise ValueError(f"view_similarity: proj must be (4B, D), got {tuple(proj.shape)}")
    proj = at_least_float32(proj)
    normal, rotated = split_views(proj)
    with autocast_off(proj.device):
        dots = rotated @ normal.t()
        norms = rotated.norm(dim=1, keepdim=True) * normal.norm(dim=1).unsqueeze(0)
        return dots / norms.clamp(min=eps)


def rotation_ss_loss(proj: torch.Tensor) -> torch.Tensor:
    """Self-supervised rotation loss: ``cross_entropy(S, own column)`` (no temperature).

    The teacher's projection head is fitted with it (phase 1 of SSD-KD): each rotated
    view has to find its own image among the B normal views.

    Args:
        proj: (4B, D) projections, rows ``4i + r``.

    Returns:
        Scalar tensor, float32 for float16/bfloat16 ``proj``, else ``proj``'s dtype.
    """
    sim = view_similarity(proj)
    with autocast_off(sim.device):
        return F.cross_entropy(sim, own_columns(sim.shape[1], sim.device))
