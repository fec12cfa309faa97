"""D-KD and its ablations as an engine task (``experiment/isic/isic_d_kd.py``).

SSD-KD: A Self-supervised Diverse Knowledge Distillation Method for Lightweight Skin
Lesion Classification Using Dermoscopic Images (Wang et al., Medical Image Analysis 2023)
https://arxiv.org/abs/2203.11490

The student and, when a term needs the teacher's feature shape, the adapter
(``ConvReg``, student ``feats_7x7`` -> teacher shape) are trained; the teacher is
frozen. :func:`kd_losses.d_kd` gives the loss and its named parts, which the step
returns so that the engine logs each of them per epoch. Which modules the task
holds follows the method's row of :data:`kd_losses.DKD_FAMILY`.
"""

from __future__ import annotations

import torch
from torch import nn

import models
from kd_losses import DKD_FAMILY, DKDMethod, DKDWeights, RelationalWeights, d_kd, dkd_method
from raug.methods.kd_config import dkd_checks
from raug.methods.metadata import fusion_spec
from raug.methods.teacher import frozen_forward, load_teacher
from raug.train.distributed import gather_fields, own_rows
from raug.train.method import Method
from raug.train.task import Task, meta_kwargs


class DKDTask(Task):
    """Student trained by ``kd_losses.d_kd`` (one row of ``DKD_FAMILY``) from a frozen teacher.

    ``train_step`` returns ``loss``, the student's ``logits`` and the unweighted
    active terms (``ce``, ``kd`` without ``T^2``, ``rkd_distance``, ``rkd_angle``,
    ``channel_relation``, ``fitnet``: ``method.terms(weights)``). ``eval_step`` is the
    student's weighted cross-entropy, so model selection does not depend on the KD
    weights and the ablations compare like for like.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        adapter: nn.Module | None = None,
        class_weight: torch.Tensor | None = None,
        method: str | DKDMethod = "d_kd",
        weights: DKDWeights | None = None,
    ):
        """Build the task.

        Args:
            student: network with ``forward_kd`` (``trained["model"]``).
            teacher: frozen network with ``forward_kd``; required exactly when
                ``method.needs_teacher``.
            adapter: student ``feats_7x7`` -> teacher shape; required exactly when
                ``method.needs_adapter(weights)`` (checkpointed as ``extra_state_dicts["adapter"]``).
            class_weight: (K,) CE weights or ``None``.
            method: a row of :data:`kd_losses.DKD_FAMILY` or its name.
            weights: the loss weights (default: :class:`kd_losses.DKDWeights`'s).

        Raises:
            ValueError: unknown method, or a teacher/adapter that does not fit it.
        """
        if not isinstance(method, DKDMethod) and method not in DKD_FAMILY:
            raise ValueError(f"_kd_method={method!r} is unknown; allowed {list(DKD_FAMILY)}")
        row = method if isinstance(method, DKDMethod) else DKD_FAMILY[method]
        weights = weights or DKDWeights()
        for name, module, needed in (("a teacher", teacher, row.needs_teacher),
                                     ("an adapter", adapter, row.needs_adapter(weights))):
            if needed != (module is not None):
                raise ValueError(f"_kd_method={row.name!r} {'needs' if needed else 'does not use'} "
                                 f"{name} (weights {weights})")
        trained = {"model": student} if adapter is None else {"model": student, "adapter": adapter}
        frozen = {} if teacher is None else {"teacher": teacher}
        super().__init__(trained, frozen, class_weight)
        self.method = row
        self.weights = weights

    def train_step(self, batch: dict) -> dict:
        """D-KD loss of the batch, with its active terms and the student's logits."""
        images, meta = batch["image"], batch.get("meta")
        out_s = self.model.forward_kd(images, **meta_kwargs(self.model, meta))
        out_t: dict[str, torch.Tensor] = {}
        if "teacher" in self.frozen:
            out_t = frozen_forward(self.frozen["teacher"], images, meta)
        if "adapter" in self.trained:
            out_s = {**out_s, "feats_7x7": self.trained["adapter"](out_s["feats_7x7"])}
        # _gather_embeddings=True under torchrun: RKD of this rank's anchors against the
        # global batch (docs/distributed.md)
        anchors = own_rows(images.shape[0])
        out_s, out_t = gather_fields(out_s, ("avg_pool",)), gather_fields(out_t, ("avg_pool",))
        parts = d_kd(out_s, out_t, batch["label"], self.class_weight, method=self.method.name,
                     weights=self.weights, anchors=anchors)
        return {**parts, "logits": out_s["logits"]}

    def eval_step(self, batch: dict) -> dict:
        """The student's weighted cross-entropy (no teacher needed)."""
        return self.weighted_ce_step(batch)

    def part_weights(self) -> dict[str, float]:
        """Each active term's factor in ``kd_losses.d_kd``'s loss (``loss = sum(w * part)``)."""
        w, row = self.weights, self.method
        factors = {
            "ce": 1.0 - w.lambd if row.soft_kd else 1.0,
            "kd": w.lambd * w.T * w.T,  # the part is without T^2
            "fitnet": w.lambd_fitnet,
            **relational_part_weights(row.relational(w) or w.relational),
        }
        return {name: factors[name] for name in row.terms(w)}


def relational_part_weights(block: RelationalWeights, scale: float = 1.0) -> dict[str, float]:
    """The factors of the relational parts in a loss adding ``scale * hr``.

    ``hr = lambd_drkd (w_dist rkd_distance + w_angle rkd_angle) + lambd_crkd channel_relation``
    (:func:`kd_losses.d_kd.relational_kd`).
    """
    return {
        "rkd_distance": scale * block.lambd_drkd * block.w_dist,
        "rkd_angle": scale * block.lambd_drkd * block.w_angle,
        "channel_relation": scale * block.lambd_crkd,
    }


def dkd_task(ctx) -> DKDTask:
    """``isic_d_kd.py``'s task from the run config: student, frozen teacher, adapter.

    What to build follows the method's row: with ``_kd_method="none"`` the teacher is
    neither loaded nor run (the student trains alone with CE_w), so that baseline costs
    no teacher forward passes.

    Args:
        ctx: the run's :class:`raug.train.method.RunContext` (config, data).
    """
    cfg = ctx.config
    row, weights = dkd_method(cfg["_kd_method"]), DKDWeights.from_config(cfg)
    student = models.create_model(
        cfg["_model_name_student"],
        num_classes=len(ctx.data.class_names),
        # a resumed run loads its own weights: no ImageNet file needed then
        pretrained=cfg["_pretrained"] and not cfg["_resume"],
        fusion=fusion_spec(cfg, "_model_name_student"),  # the metadata keys describe the student
    )
    teacher = adapter = None
    if row.needs_teacher:
        teacher = load_teacher(
            cfg["_teacher_ckpt"], cfg["_model_name_teacher"], ctx.data.class_names,
            folder=cfg["_folder"], img_size=cfg["_img_size"],
        ).model
        if row.needs_adapter(weights):
            adapter = models.build_adapter(student, teacher, cfg["_img_size"])
    return DKDTask(student, teacher, adapter, ctx.data.class_weight, row, weights)


# isic_d_kd.py: no preliminary phase; the keys are checked against DKD_FAMILY's rows.
DKD_METHOD = Method("student", dkd_task, checks=(dkd_checks,))
