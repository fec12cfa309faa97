"""Input checks shared by the loss terms (clear messages instead of broadcasting surprises)."""

from __future__ import annotations

import torch


def check_same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the term when student and teacher tensors differ in shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student shape {tuple(student.shape)} != teacher shape "
            f"{tuple(teacher.shape)} (pass the student's features through the adapter first)"
        )


def check_ndim(name: str, arg: str, tensor: torch.Tensor, ndim: int) -> None:
    """Raise ``ValueError`` when ``tensor`` does not have ``ndim`` dimensions."""
    if tensor.dim() != ndim:
        raise ValueError(
            f"{name}: {arg} must have {ndim} dimensions, got shape {tuple(tensor.shape)}"
        )


def check_same_rows(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ``ValueError`` when the two batches differ in size."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}"
        )
