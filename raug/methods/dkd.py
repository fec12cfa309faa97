"""D-KD and its ablations as an engine task (``experiment/isic/isic_d_kd.py``).

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

The student and, when a term needs the teacher's feature shape, the adapter
(``ConvReg``, student ``feats_7x7`` -> teacher shape) are trained; the teacher is
frozen. :func:`kd_losses.d_kd` gives the loss and its named parts, which the step
returns so that the engine logs each of them per epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import models
from kd_losses import KD_METHODS, d_kd
from raug.distributed import gather_fields
from raug.experiment import RunContext
from raug.methods.teacher import frozen_forward, load_teacher
from raug.task import BaseTask


def needs_teacher(method: str) -> bool:
    """Every method but ``"none"`` (the student alone) distils from the teacher."""
    return method != "none"


def needs_adapter(method: str, lambd_crkd: float = 1.0) -> bool:
    """Channel relation (``crkd``, ``d_kd`` with ``lambd_crkd != 0``) and ``fitnet`` compare
    student feature maps with the teacher's, through the adapter."""
    return method == "fitnet" or (method in ("crkd", "d_kd") and lambd_crkd != 0)


class DKDTask(BaseTask):
    """Student trained by ``kd_losses.d_kd(method=...)`` from a frozen teacher.

    ``train_step`` returns ``loss``, the student's ``logits`` and the unweighted
    active terms (``ce``, ``kd`` without ``T^2``, ``rkd_distance``, ``rkd_angle``,
    ``channel_relation``, ``fitnet``). ``eval_step`` is the student's weighted
    cross-entropy, so model selection does not depend on the KD weights and the
    ablations compare like for like.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        adapter: nn.Module | None = None,
        class_weight: torch.Tensor | None = None,
        method: str = "d_kd",
        lambd: float = 0.5,
        T: float = 5.0,
        lambd_drkd: float = 1.0,
        lambd_crkd: float = 1000.0,
        lambd_fitnet: float = 1.0,
    ):
        """Build the task.

        Args:
            student: network with ``forward_kd`` (``modules["model"]``).
            teacher: frozen network with ``forward_kd``; ``None`` only for ``method="none"``.
            adapter: student ``feats_7x7`` -> teacher shape; required exactly when
                :func:`needs_adapter` (checkpointed as ``extra_state_dicts["adapter"]``).
            class_weight: (K,) CE weights or ``None``.
            method: one of :data:`kd_losses.KD_METHODS`.
            lambd, T, lambd_drkd, lambd_crkd, lambd_fitnet: loss weights (``kd_math.md``).

        Raises:
            ValueError: unknown method, or a teacher/adapter missing for it.
        """
        if method not in KD_METHODS:
            raise ValueError(f"_kd_method={method!r} is unknown; allowed {list(KD_METHODS)}")
        if needs_teacher(method) and teacher is None:
            raise ValueError(f"_kd_method={method!r} needs a teacher")
        if needs_adapter(method, lambd_crkd) != (adapter is not None):
            raise ValueError(
                f"_kd_method={method!r} (lambd_crkd={lambd_crkd}) "
                f"{'needs' if adapter is None else 'does not use'} an adapter"
            )
        modules = {"model": student}
        if adapter is not None:
            modules["adapter"] = adapter
        frozen = {"teacher": teacher} if needs_teacher(method) else {}
        super().__init__(modules, frozen)
        self.class_weight = class_weight
        self.method = method
        self.weights = {
            "lambd": lambd, "T": T, "lambd_drkd": lambd_drkd,
            "lambd_crkd": lambd_crkd, "lambd_fitnet": lambd_fitnet,
        }

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> None:
        """Move the modules and the class weights."""
        super().to(device, memory_format)
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(device)

    def train_step(self, batch: dict) -> dict:
        """D-KD loss of the batch, with its active terms and the student's logits."""
        images = batch["image"]
        out_s = self.modules["model"].forward_kd(images)
        out_t: dict[str, torch.Tensor] = {}
        if "teacher" in self.frozen_modules:
            out_t = frozen_forward(self.frozen_modules["teacher"], images)
        if "adapter" in self.modules:
            out_s = {**out_s, "feats_7x7": self.modules["adapter"](out_s["feats_7x7"])}
        # _gather_embeddings=True under torchrun: RKD over the global batch (docs/distributed.md)
        out_s, out_t = gather_fields(out_s, ("avg_pool",)), gather_fields(out_t, ("avg_pool",))
        parts = d_kd(out_s, out_t, batch["label"], self.class_weight, method=self.method,
                     **self.weights)
        return {**parts, "logits": out_s["logits"]}

    def eval_step(self, batch: dict) -> dict:
        """The student's weighted cross-entropy (no teacher needed)."""
        logits = self.modules["model"](batch["image"])
        loss = F.cross_entropy(logits, batch["label"], weight=self.class_weight)
        return {"loss": loss, "logits": logits}


def dkd_task(ctx: RunContext) -> DKDTask:
    """``isic_d_kd.py``'s task from the run config: student, frozen teacher, adapter.

    With ``_kd_method="none"`` the teacher is neither loaded nor run (the student
    trains alone with CE_w), so that baseline costs no teacher forward passes.
    """
    cfg = ctx.config
    method = cfg["_kd_method"]
    num_classes = len(ctx.data.class_names)
    student = models.create_model(
        cfg["_model_name_student"],
        num_classes=num_classes,
        # a resumed run loads its own weights: no ImageNet file needed then
        pretrained=cfg["_pretrained"] and not cfg["_resume"],
    )
    teacher = adapter = None
    if needs_teacher(method):
        teacher = load_teacher(
            cfg["_teacher_ckpt"], cfg["_model_name_teacher"], ctx.data.class_names,
            folder=cfg["_folder"], img_size=cfg["_img_size"],
        ).model
        if needs_adapter(method, cfg["_lambd_crkd"]):
            adapter = models.build_adapter(student, teacher, cfg["_img_size"])
    return DKDTask(
        student,
        teacher,
        adapter,
        class_weight=ctx.data.class_weight,
        method=method,
        lambd=cfg["_lambd"],
        T=cfg["_T"],
        lambd_drkd=cfg["_lambd_drkd"],
        lambd_crkd=cfg["_lambd_crkd"],
        lambd_fitnet=cfg["_lambd_fitnet"],
    )
