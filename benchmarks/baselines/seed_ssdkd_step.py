"""BASELINE ONLY (benchmarks): one SSD-KD phase-2 step written the way the seed wrote it.

Never imported by the toolkit (``raug.methods.ssdkd.SSDKDTask`` is the implementation).
Same loss as the toolkit (``docs/kd_math.md``, SSD-KD phase 2), the seed's habits:

* the four rotated views of every image are built on the CPU, one PIL image per view
  (``PIL.Image.rotate`` + ``ToTensor`` + ``Normalize`` per view), then moved to the device;
* features through hooks registered on every call and never removed
  (:func:`seed_dkd_step.seed_features`), teacher and its head run plainly (autograd
  records them) and are ``.detach()``-ed afterwards;
* view similarities from expanded (3B, D, B) tensors and ``F.cosine_similarity``,
  error-level ranking with ``argsort``, direct C x C Gram matrices for the channel relation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchvision import transforms

from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .seed_dkd_step import register_feature_hooks, seed_features, seed_relational

NUM_VIEWS = 4


def seed_view_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> transforms.Compose:
    """The seed's per-view tensor conversion: ``ToTensor`` then ``Normalize``."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def seed_views(images: Sequence[np.ndarray], to_tensor: transforms.Compose) -> torch.Tensor:
    """(4B, 3, H, W) views, rows ``4i + r`` = image i rotated by r * 90 degrees (counter-clockwise).

    Args:
        images: B RGB ``uint8`` arrays (H, W, 3), already augmented.
        to_tensor: :func:`seed_view_transform`.
    """
    per_image = []
    for img in images:
        pil = Image.fromarray(img)
        per_image.append(torch.stack([to_tensor(pil.rotate(90 * r)) for r in range(NUM_VIEWS)]))
    x = torch.stack(per_image)
    return x.view(-1, *x.shape[2:])


def _error_level_index(knowledge: torch.Tensor, target: torch.Tensor, ratio: float) -> torch.Tensor:
    """The seed's error-level ranking: sorted indices of the kept rows."""
    rank = torch.argsort(knowledge, dim=1, descending=True, stable=True)
    rank = torch.argmax(torch.eq(rank, target.unsqueeze(1)).long(), dim=1)
    index = torch.argsort(rank, stable=True)
    wrong_num = torch.nonzero(rank, as_tuple=True)[0].numel()
    correct_num = rank.numel() - wrong_num
    wrong_keep = int(wrong_num * ratio)
    return torch.sort(index[: correct_num + wrong_keep])[0]


def _similarity(proj: torch.Tensor, nor_index: torch.Tensor, aug_index: torch.Tensor) -> torch.Tensor:
    """(3B, B) cosine similarities from expanded (3B, D, B) tensors, as the seed did."""
    b = int(nor_index.sum())
    nor = proj[nor_index].unsqueeze(2).expand(-1, -1, 3 * b).transpose(0, 2)
    aug = proj[aug_index].unsqueeze(2).expand(-1, -1, b)
    return F.cosine_similarity(aug, nor, dim=1)


def seed_ssd_terms(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    proj_s: torch.Tensor,
    proj_t: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    kd_T: float = 4.0,
    tf_T: float = 4.0,
    ss_T: float = 0.5,
    ratio_tf: float = 1.0,
    ratio_ss: float = 0.75,
) -> dict[str, torch.Tensor]:
    """``ce, kd, tf, ss`` (each with its T^2), computed as the seed's SSKD-style loop did."""
    b = target.shape[0]
    rows = torch.arange(NUM_VIEWS * b, device=logits_s.device)
    nor_index = rows % NUM_VIEWS == 0
    aug_index = ~nor_index

    ce = F.cross_entropy(logits_s[nor_index], target, weight=class_weight)
    kd = F.kl_div(
        F.log_softmax(logits_s[nor_index] / kd_T, dim=1),
        F.softmax(logits_t[nor_index] / kd_T, dim=1),
        reduction="batchmean",
    ) * kd_T**2

    aug_target = target.unsqueeze(1).expand(-1, 3).contiguous().view(-1)
    aug_knowledge = F.softmax(logits_t[aug_index] / tf_T, dim=1)
    keep_tf = _error_level_index(aug_knowledge, aug_target, ratio_tf)
    tf = F.kl_div(
        F.log_softmax(logits_s[aug_index][keep_tf] / tf_T, dim=1),
        aug_knowledge[keep_tf],
        reduction="batchmean",
    ) * tf_T**2

    s_simi = _similarity(proj_s, nor_index, aug_index)
    with torch.no_grad():
        t_simi = _similarity(proj_t, nor_index, aug_index)
        own = torch.arange(b, device=target.device).unsqueeze(1).expand(-1, 3).contiguous().view(-1)
        keep_ss = _error_level_index(t_simi, own, ratio_ss)
    ss = F.kl_div(
        F.log_softmax(s_simi[keep_ss] / ss_T, dim=1),
        F.softmax(t_simi[keep_ss] / ss_T, dim=1),
        reduction="batchmean",
    ) * ss_T**2
    return {"ce": ce, "kd": kd, "tf": tf, "ss": ss}


class SeedSSDKDStep:
    """A seed-style SSD-KD phase-2 step: ``step(images_uint8, labels) -> loss value``.

    Pass copies of the modules (hooks stay on them). Teacher and teacher head keep
    ``requires_grad=True`` as in the seed; only student, student head and adapter train.

    Args:
        student, student_head, teacher, teacher_head, adapter: the networks.
        device: where to run.
        class_weight: (K,) CE weights or ``None``.
        lr: SGD learning rate (momentum 0.9, weight decay 1e-3).
        hr_w, lambd_drkd, lambd_crkd: relational-block weights; the other SSD-KD
            parameters (``kd_T, tf_T, ss_T, ratio_tf, ratio_ss``) go to :func:`seed_ssd_terms`.
    """

    def __init__(
        self,
        student: nn.Module,
        student_head: nn.Module,
        teacher: nn.Module,
        teacher_head: nn.Module,
        adapter: nn.Module,
        device: str | torch.device,
        class_weight: torch.Tensor | None = None,
        lr: float = 1e-3,
        hr_w: float = 1.0,
        lambd_drkd: float = 1.0,
        lambd_crkd: float = 1000.0,
        **terms: float,
    ):
        self.device = torch.device(device)
        self.student = student.to(self.device).train()
        self.student_head = student_head.to(self.device).train()
        self.teacher = teacher.to(self.device).eval().requires_grad_(True)
        self.teacher_head = teacher_head.to(self.device).eval().requires_grad_(True)
        self.adapter = adapter.to(self.device).train()
        self.class_weight = None if class_weight is None else class_weight.to(self.device)
        self.hr = {"hr_w": hr_w, "lambd_drkd": lambd_drkd, "lambd_crkd": lambd_crkd}
        self.terms = terms
        self.to_tensor = seed_view_transform()
        params = [*student.parameters(), *student_head.parameters(), *adapter.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)
        self.handles: list[RemovableHandle] = []

    def loss(self, images: Sequence[np.ndarray], labels: torch.Tensor) -> torch.Tensor:
        """Views, forward passes and the SSD-KD loss (no optimizer step)."""
        dtype = next(self.student.parameters()).dtype  # float32 unless a test runs float64
        x = seed_views(images, self.to_tensor).to(self.device, dtype)
        labels = labels.to(self.device)
        out_t = seed_features(self.teacher, x, self.handles)
        out_t = {k: v.detach() for k, v in out_t.items()}
        proj_t = self.teacher_head(out_t["avg_pool"]).detach()
        out_s = seed_features(self.student, x, self.handles)
        proj_s = self.student_head(out_s["avg_pool"])
        parts = seed_ssd_terms(out_s["logits"], out_t["logits"], proj_s, proj_t, labels,
                               self.class_weight, **self.terms)
        loss = 0.1 * parts["ce"] + 0.9 * parts["kd"] + 2.7 * parts["tf"] + 10 * parts["ss"]
        feat_s_conv = self.adapter(out_s["feats_7x7"])
        hr = seed_relational(out_s, out_t, feat_s_conv, self.hr["lambd_drkd"], self.hr["lambd_crkd"])
        return loss + self.hr["hr_w"] * hr

    def __call__(self, images: Sequence[np.ndarray], labels: torch.Tensor) -> float:
        """One full training step; returns the loss value."""
        loss = self.loss(images, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def reset_hooks(self, keep_calls: int = 0) -> None:
        """Benchmark only: leave exactly ``keep_calls`` earlier calls' hooks registered."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for _ in range(keep_calls):
            for model in (self.teacher, self.student):
                self.handles.extend(register_feature_hooks(model, {}))
