"""SSD-KD as two engine tasks (``experiment/isic/isic_ssd_kd.py``).

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

* :class:`RotationHeadTask` (phase 1, defined in :mod:`raug.methods.teacher_head`
  with the fit-or-reuse logic): the teacher's projection head learns which
  rotated view belongs to which image (``kd_losses.rotation_ss_loss``); the
  teacher backbone is frozen.
* :class:`SSDKDTask` (phase 2): the student, its projection head and the adapter
  learn from the frozen teacher and its frozen head (``kd_losses.ssd_kd_loss``).

Views: the loader yields each image once, augmented once (one draw of the
training transform per image and epoch, flips included); the step then builds
its four rotations with ``kd_losses.rotate_views`` (rows ``4i + r``). The four
views of an image therefore differ only by the rotation, which is what the
self-supervised task asks the heads to see through. (The seed augmented each
rotated view separately.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import models
from kd_losses import rotate_views, split_views, ssd_kd_loss
from raug.config import resolve_repo_path
from raug.distributed import gather_embeddings, gather_fields
from raug.experiment import RunContext
from raug.methods.teacher import file_fingerprint, frozen_forward, load_teacher
from raug.methods.teacher_head import (
    HEAD_FILE,
    RotationHeadTask,
    head_fit_key,
    head_fit_settings,
    prepare_teacher_head,
    rotation_accuracy,
)
from raug.task import BaseTask


class SSDKDTask(BaseTask):
    """Phase 2: student + projection head (+ adapter) trained with the SSD-KD loss.

    ``train_step`` returns ``loss``, ``ce, kd, tf, ss`` (each with its ``T^2``),
    ``hr`` and its unweighted parts ``rkd_distance, rkd_angle, channel_relation``
    (when active), ``n_tf, n_ss`` (rows kept by the error-level ranking) and the
    student's logits of the normal views. ``eval_step`` uses the normal views
    only: the student's weighted cross-entropy.
    """

    def __init__(
        self,
        student: nn.Module,
        student_head: nn.Module,
        teacher: nn.Module,
        teacher_head: nn.Module,
        adapter: nn.Module | None = None,
        class_weight: torch.Tensor | None = None,
        kd_T: float = 4.0,
        tf_T: float = 4.0,
        ss_T: float = 0.5,
        ratio_tf: float = 1.0,
        ratio_ss: float = 0.75,
        hr_w: float = 1.0,
        lambd_drkd: float = 1.0,
        lambd_crkd: float = 1000.0,
    ):
        """Build the task.

        Args:
            student: network with ``forward_kd`` (``modules["model"]``).
            student_head: projection head on the student's ``avg_pool`` (``"proj_head"``).
            teacher, teacher_head: frozen teacher and its phase-1 head.
            adapter: student ``feats_7x7`` -> teacher shape (``"adapter"``); required
                exactly when the channel relation is active (``hr_w`` and ``lambd_crkd`` != 0).
            class_weight: (K,) CE weights or ``None``.
            kd_T, tf_T, ss_T, ratio_tf, ratio_ss, hr_w, lambd_drkd, lambd_crkd: see
                ``kd_losses.ssd_kd_loss``.
        """
        if uses_adapter(hr_w, lambd_crkd) != (adapter is not None):
            raise ValueError(
                f"hr_w={hr_w}, lambd_crkd={lambd_crkd}: the adapter is "
                f"{'required' if adapter is None else 'unused'}"
            )
        modules = {"model": student, "proj_head": student_head}
        if adapter is not None:
            modules["adapter"] = adapter
        super().__init__(modules, {"teacher": teacher, "teacher_head": teacher_head})
        self.class_weight = class_weight
        self.weights = {
            "kd_T": kd_T, "tf_T": tf_T, "ss_T": ss_T, "ratio_tf": ratio_tf,
            "ratio_ss": ratio_ss, "hr_w": hr_w, "lambd_drkd": lambd_drkd,
            "lambd_crkd": lambd_crkd,
        }

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> None:
        """Move the modules and the class weights."""
        super().to(device, memory_format)
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(device)

    def train_step(self, batch: dict) -> dict:
        """SSD-KD loss of the four-view stack of the batch."""
        views = rotate_views(batch["image"])
        teacher, teacher_head = self.frozen_modules["teacher"], self.frozen_modules["teacher_head"]
        out_t = frozen_forward(teacher, views)
        with torch.inference_mode():
            proj_t = teacher_head(out_t["avg_pool"])
        proj_t = proj_t.clone()  # an ordinary tensor again (see teacher.frozen_forward)

        out_s = self.modules["model"].forward_kd(views)
        proj_s = self.modules["proj_head"](out_s["avg_pool"])
        if "adapter" in self.modules:
            out_s = {**out_s, "feats_7x7": self.modules["adapter"](out_s["feats_7x7"])}
        normal_logits, _ = split_views(out_s["logits"])
        # _gather_embeddings=True under torchrun: every term but the per-sample channel
        # relation over the global batch (whole images: 4 view rows each; docs/distributed.md)
        keys = ("logits", "avg_pool")
        out_s, out_t = gather_fields(out_s, keys), gather_fields(out_t, keys)
        proj_s, proj_t = gather_embeddings(proj_s), gather_embeddings(proj_t)
        parts = ssd_kd_loss(out_s, out_t, proj_s, proj_t, gather_embeddings(batch["label"]),
                            self.class_weight, **self.weights)
        return {**parts, "logits": normal_logits}

    def eval_step(self, batch: dict) -> dict:
        """Weighted cross-entropy of the student on the normal (unrotated) images."""
        logits = self.modules["model"](batch["image"])
        loss = F.cross_entropy(logits, batch["label"], weight=self.class_weight)
        return {"loss": loss, "logits": logits}


def uses_adapter(hr_w: float, lambd_crkd: float) -> bool:
    """The adapter feeds only the channel relation inside ``hr``."""
    return hr_w != 0 and lambd_crkd != 0


def teacher_head_path(config: Mapping[str, Any], run_folder: str | Path) -> Path:
    """``_teacher_head`` (relative paths start at the repo root), or, when ``None``,
    ``teacher-head/teacher-head.pth`` inside ``run_folder`` (the folder the engine writes to)."""
    if config.get("_teacher_head"):
        return resolve_repo_path(config["_teacher_head"])
    return Path(run_folder) / HEAD_FILE


def ssdkd_task(ctx: RunContext) -> SSDKDTask:
    """``isic_ssd_kd.py``'s task: load the teacher, fit (or reuse) its head, build the student."""
    cfg = ctx.config
    num_classes = len(ctx.data.class_names)
    teacher = load_teacher(
        cfg["_teacher_ckpt"], cfg["_model_name_teacher"], ctx.data.class_names,
        folder=cfg["_folder"], img_size=cfg["_img_size"],
    )
    teacher_head = prepare_teacher_head(
        teacher.model,
        models.ProjectionHead(teacher.model.num_features),
        head_path=teacher_head_path(cfg, ctx.outputs.folder),
        teacher_info={
            **file_fingerprint(teacher.path),
            "model_name": teacher.summary.model_name,
            "class_names": None if teacher.summary.class_names is None
            else list(teacher.summary.class_names),
            "folder": teacher.summary.folder,
        },
        fit_key=head_fit_key(cfg),
        train_loader=ctx.data.train_loader,
        val_loader=ctx.data.val_loader,
        settings=head_fit_settings(cfg),
        run=ctx.run,
        resume=cfg["_resume"],
    )

    student = models.create_model(
        cfg["_model_name_student"],
        num_classes=num_classes,
        pretrained=cfg["_pretrained"] and not cfg["_resume"],
    )
    adapter = None
    if uses_adapter(cfg["_hr_w"], cfg["_lambd_crkd"]):
        adapter = models.build_adapter(student, teacher.model, cfg["_img_size"])
    return SSDKDTask(
        student,
        models.ProjectionHead(student.num_features),
        teacher.model,
        teacher_head,
        adapter,
        class_weight=ctx.data.class_weight,
        kd_T=cfg["_kd_T"],
        tf_T=cfg["_tf_T"],
        ss_T=cfg["_ss_T"],
        ratio_tf=cfg["_ratio_tf"],
        ratio_ss=cfg["_ratio_ss"],
        hr_w=cfg["_hr_w"],
        lambd_drkd=cfg["_lambd_drkd"],
        lambd_crkd=cfg["_lambd_crkd"],
    )


__all__ = [
    "RotationHeadTask",
    "SSDKDTask",
    "rotation_accuracy",
    "ssdkd_task",
    "teacher_head_path",
    "uses_adapter",
]
