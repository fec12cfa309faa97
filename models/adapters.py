"""Adapter from student features to the teacher's feature shape (FitNet / CRD ``ConvReg``).

FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015) https://arxiv.org/abs/1412.6550
Contrastive Representation Distillation (Tian et al., ICLR 2020) https://arxiv.org/abs/1910.10699
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _chw(shape: Sequence[int], which: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"ConvReg: {which} shape must be (N, C, H, W) or (C, H, W), got {shape}")
    return shape


class ConvReg(nn.Module):
    """Conv (rule below) -> BatchNorm2d(C_t) -> ReLU, mapping student to teacher shape.

    * ``h_s == 2 h_t``: Conv 3x3, stride 2, padding 1;
    * ``2 h_s == h_t``: ConvTranspose 4x4, stride 2, padding 1;
    * ``h_s >= h_t``: Conv with kernel ``(1 + h_s - h_t, 1 + w_s - w_t)``
      (a 1x1 conv at equal sizes, e.g. 1280 -> 2048 at 7x7);
    * otherwise ``ValueError``.

    Submodule names (``conv``, ``bn``) follow the seed's ``ConvReg``.

    Args:
        s_shape: student feature shape, (N, C, H, W) or (C, H, W).
        t_shape: teacher feature shape, same convention.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]):
        super().__init__()
        c_s, h_s, w_s = _chw(s_shape, "student")
        c_t, h_t, w_t = _chw(t_shape, "teacher")
        if h_s == 2 * h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ValueError(
                f"ConvReg: no adapter rule maps student {(c_s, h_s, w_s)} to teacher "
                f"{(c_t, h_t, w_t)} (needs h_s == 2 h_t, 2 h_s == h_t, or h_s >= h_t and w_s >= w_t)"
            )
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = nn.ReLU()
        self.s_shape = (c_s, h_s, w_s)
        self.t_shape = (c_t, h_t, w_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _feature_shape(model: nn.Module, img_size: int) -> tuple[int, int, int]:
    """(C, h, w) of ``model.forward_features`` at ``img_size``.

    Project networks answer from ``num_features`` and their stride; anything else gets a
    dummy forward under ``no_grad`` in eval mode (restored afterwards), so BatchNorm
    statistics are not touched.
    """
    reduction = getattr(model, "reduction", None)
    if hasattr(model, "num_features") and reduction and img_size % reduction == 0:
        side = img_size // reduction
        return int(model.num_features), side, side
    if not hasattr(model, "forward_features"):
        raise TypeError(
            f"build_adapter: {type(model).__name__} has no forward_features(); "
            "pass networks from models.create_model"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    return tuple(feats.shape[1:])


def build_adapter(student: nn.Module, teacher: nn.Module, img_size: int = 224) -> ConvReg:
    """A :class:`ConvReg` from the student's to the teacher's feature shape at ``img_size``.

    The adapter is placed on the student's device.
    """
    adapter = ConvReg(_feature_shape(student, img_size), _feature_shape(teacher, img_size))
    param = next(student.parameters(), None)
    return adapter.to(param.device) if param is not None else adapter
