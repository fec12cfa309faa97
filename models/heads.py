"""Projection head of SSD-KD (self-supervised view matching on ``avg_pool``).

Knowledge Distillation Meets Self-Supervision (Xu et al., ECCV 2020)
https://arxiv.org/abs/2006.07114
"""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """``Linear(D, D) -> ReLU -> Linear(D, D)``.

    A ``Sequential`` so that the state-dict keys (``0.*``, ``2.*``) equal those of the
    seed's saved teacher heads (``best-teacher-ss.pth``).

    Args:
        dim: D, the ``avg_pool`` width (2048 teacher, 1280 student).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"ProjectionHead: dim must be positive, got {dim}")
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dim = dim
