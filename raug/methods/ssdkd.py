"""SSD-KD as two engine tasks (``experiment/isic/isic_ssd_kd.py``).

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

* phase 1, ``"teacher-head"`` (:func:`teacher_head_phase`; the task
  :class:`RotationHeadTask` and the fit-or-reuse logic live in
  :mod:`raug.methods.teacher_head`): the teacher's projection head learns which
  rotated view belongs to which image (``kd_losses.rotation_ss_loss``); the
  teacher backbone is frozen. It has its own checkpoints and resume.
* phase 2 (:func:`ssdkd_task` builds :class:`SSDKDTask`): the student, its
  projection head and the adapter learn from the frozen teacher and its frozen
  head (``kd_losses.ssd_kd_loss``).

The runner runs the phases in order (``raug.train.method.Method``, :func:`raug.run.runner.run_training`); each phase's result is
in ``ctx.phase_results[name]`` for the ones after it.

Views: the loader yields each image once, augmented once (one draw of the
training transform per image and epoch, flips included); the step then builds
its four rotations with ``kd_losses.rotate_views`` (rows ``4i + r``). The four
views of an image therefore differ only by the rotation, which is what the
self-supervised task asks the heads to see through. (The seed augmented each
rotated view separately.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from kd_losses import (
    SSD_KD_FAMILY,
    SSDKDWeights,
    rotate_views,
    split_views,
    ssd_kd_loss,
    view_labels,
)
from raug.files.paths import resolve_repo_path
from raug.methods.dkd import relational_part_weights
from raug.methods.kd_config import ssdkd_checks
from raug.methods.metadata import fusion_spec
from raug.methods.teacher import file_fingerprint, frozen_forward, load_teacher
from raug.methods.teacher_head import (
    HEAD_FILE,
    RotationHeadTask,
    head_fit_key,
    head_fit_settings,
    prepare_teacher_head,
    rotation_accuracy,
)
from raug.train.distributed import gather_embeddings, gather_fields, own_rows
from raug.train.method import Method, Phase
from raug.train.task import Task, meta_kwargs

SSD_KD = SSD_KD_FAMILY["ssd_kd"]
TEACHER_HEAD_PHASE = "teacher-head"


class SSDKDTask(Task):
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
        weights: SSDKDWeights | None = None,
    ):
        """Build the task.

        Args:
            student: network with ``forward_kd`` (``trained["model"]``).
            student_head: projection head on the student's ``avg_pool`` (``"proj_head"``).
            teacher, teacher_head: frozen teacher and its phase-1 head.
            adapter: student ``feats_7x7`` -> teacher shape (``"adapter"``); required
                exactly when the channel relation is active (``SSD_KD.needs_adapter``).
            class_weight: (K,) CE weights or ``None``.
            weights: the loss weights (default: :class:`kd_losses.SSDKDWeights`'s).
        """
        weights = weights or SSDKDWeights()
        if SSD_KD.needs_adapter(weights) != (adapter is not None):
            raise ValueError(
                f"weights {weights}: the adapter is "
                f"{'required' if adapter is None else 'unused'}"
            )
        trained = {"model": student, "proj_head": student_head}
        if adapter is not None:
            trained["adapter"] = adapter
        super().__init__(trained, {"teacher": teacher, "teacher_head": teacher_head}, class_weight)
        self.weights = weights

    def train_step(self, batch: dict) -> dict:
        """SSD-KD loss of the four-view stack of the batch."""
        views = rotate_views(batch["image"])
        meta = None if batch.get("meta") is None else view_labels(batch["meta"])  # shared by the views
        out_t = frozen_forward(self.frozen["teacher"], views, meta)
        with torch.inference_mode():
            proj_t = self.frozen["teacher_head"](out_t["avg_pool"])
        proj_t = proj_t.clone()  # an ordinary tensor again (see teacher.frozen_forward)

        out_s = self.model.forward_kd(views, **meta_kwargs(self.model, meta))
        proj_s = self.trained["proj_head"](out_s["avg_pool"])
        if "adapter" in self.trained:
            out_s = {**out_s, "feats_7x7": self.trained["adapter"](out_s["feats_7x7"])}
        normal_logits, _ = split_views(out_s["logits"])
        # _gather_embeddings=True under torchrun: every term but the per-sample channel
        # relation over the global batch (whole images: 4 view rows each; RKD of this
        # rank's anchor rows only; docs/distributed.md)
        keys = ("logits", "avg_pool")
        anchors = own_rows(views.shape[0])
        out_s, out_t = gather_fields(out_s, keys), gather_fields(out_t, keys)
        proj_s, proj_t = gather_embeddings(proj_s), gather_embeddings(proj_t)
        parts = ssd_kd_loss(out_s, out_t, proj_s, proj_t, gather_embeddings(batch["label"]),
                            self.class_weight, self.weights, anchors=anchors)
        return {**parts, "logits": normal_logits}

    def eval_step(self, batch: dict) -> dict:
        """Weighted cross-entropy of the student on the normal (unrotated) images."""
        return self.weighted_ce_step(batch)

    def part_weights(self) -> dict[str, float]:
        """Each part's factor in ``kd_losses.ssd_kd_loss``'s loss; the row counts weigh 0.

        ``ce..ss`` include their ``T^2``; the relational parts are inside ``hr_w hr``.
        """
        w = self.weights
        factors = {
            "ce": w.w_ce, "kd": w.w_kd, "tf": w.w_tf, "ss": w.w_ss, "hr": w.hr_w,
            **relational_part_weights(w.relational, w.hr_w), "n_tf": 0.0, "n_ss": 0.0,
        }
        return {name: factors[name] for name in SSD_KD.terms(w)}


def uses_adapter(weights: SSDKDWeights) -> bool:
    """The adapter feeds only the channel relation inside ``hr`` (``SSD_KD.needs_adapter``)."""
    return SSD_KD.needs_adapter(weights)


def teacher_head_path(config: Mapping[str, Any], run_folder: str | Path) -> Path:
    """``_teacher_head`` (relative paths start at the repo root), or, when ``None``,
    ``teacher-head/teacher-head.pth`` inside ``run_folder`` (the folder the engine writes to)."""
    if config.get("_teacher_head"):
        return resolve_repo_path(config["_teacher_head"])
    return Path(run_folder) / HEAD_FILE


@dataclass
class TeacherWithHead:
    """What SSD-KD's phase 1 hands to phase 2: the frozen teacher and its fitted head."""

    teacher: nn.Module
    head: nn.Module


def teacher_head_phase(ctx) -> TeacherWithHead:
    """Phase 1 of ``isic_ssd_kd.py``: load the teacher, then fit (or reuse) its projection head.

    The fit has its own checkpoints and resume (:func:`raug.methods.teacher_head.prepare_teacher_head`).

    Args:
        ctx: the run's :class:`raug.train.method.RunContext`.
    """
    cfg = ctx.config
    teacher = load_teacher(
        cfg["_teacher_ckpt"], cfg["_model_name_teacher"], ctx.data.class_names,
        folder=cfg["_folder"], img_size=cfg["_img_size"],
    )
    head = prepare_teacher_head(
        teacher.model,
        models.ProjectionHead(teacher.model.embedding_features),
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
    return TeacherWithHead(teacher.model, head)


def ssdkd_task(ctx) -> SSDKDTask:
    """Phase 2 of ``isic_ssd_kd.py``: the student, its head and the adapter on phase 1's teacher.

    Args:
        ctx: the run's :class:`raug.train.method.RunContext`, after the ``"teacher-head"`` phase.
    """
    cfg = ctx.config
    prepared: TeacherWithHead = ctx.phase_results[TEACHER_HEAD_PHASE]
    weights = SSDKDWeights.from_config(cfg)
    student = models.create_model(
        cfg["_model_name_student"],
        num_classes=len(ctx.data.class_names),
        pretrained=cfg["_pretrained"] and not cfg["_resume"],
        fusion=fusion_spec(cfg, "_model_name_student"),  # the metadata keys describe the student
    )
    adapter = None
    if SSD_KD.needs_adapter(weights):
        adapter = models.build_adapter(student, prepared.teacher, cfg["_img_size"])
    return SSDKDTask(
        student,
        models.ProjectionHead(student.embedding_features),
        prepared.teacher,
        prepared.head,
        adapter,
        class_weight=ctx.data.class_weight,
        weights=weights,
    )


# isic_ssd_kd.py: phase 1 fits (or reuses) the teacher's head, phase 2 trains the student.
SSD_KD_METHOD = Method(
    "student",
    ssdkd_task,
    phases=(Phase(TEACHER_HEAD_PHASE, teacher_head_phase),),
    checks=(ssdkd_checks,),
)

__all__ = [
    "SSD_KD",
    "SSD_KD_METHOD",
    "TEACHER_HEAD_PHASE",
    "RotationHeadTask",
    "SSDKDTask",
    "TeacherWithHead",
    "rotation_accuracy",
    "ssdkd_task",
    "teacher_head_path",
    "teacher_head_phase",
    "uses_adapter",
]
