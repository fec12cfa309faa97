"""BASELINE ONLY (benchmarks): one D-KD training step written the way the seed wrote it.

Never imported by the toolkit (``raug.methods.dkd.DKDTask`` is the implementation). It
computes the same loss as the toolkit (``docs/kd_math.md``: CE_w, soft KD, RKD distance and
angle, channel relation through the adapter) with the seed's habits, which are what the
benchmark measures against:

* features come from three forward hooks registered on every call and never removed
  (the seed's ``get_features``); they pile up, one set per step, for the whole run;
* the teacher's parameters are never frozen and it runs a plain forward (autograd
  records its whole graph), after which its outputs are ``.detach()``-ed;
* the channel relation builds the C x C Gram matrices directly
  (:func:`seed_channel_relation`), RKD and the KL term follow the seed's ``D_KD``;
* tensors stay in the default (NCHW, contiguous) layout.

The device comes from an argument: the seed's hard-coded GPU placement is the one habit
not reproduced, because the project never hard-codes a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from models import MobileNetV2KD, ResNet50KD

from .seed_channel_relation import seed_channel_relation

FEATURE_KEYS = ("feats_7x7", "avg_pool", "logits")


def feature_module(model: nn.Module) -> nn.Module:
    """The module whose output is ``feats_7x7`` (ResNet-50 ``layer4``, MobileNet ``features``)."""
    if isinstance(model, ResNet50KD):
        return model.features[7]
    if isinstance(model, MobileNetV2KD):
        return model.features
    raise TypeError(f"seed baseline: no feature layer known for {type(model).__name__}")


def register_feature_hooks(model: nn.Module, store: dict) -> list[RemovableHandle]:
    """Register the seed's three hooks writing ``feats_7x7``, ``avg_pool``, ``logits`` to ``store``.

    The seed dropped the handles, so the hooks were never removed; the handles are
    returned here only so that the benchmark can reset the pile-up between measurements.
    """

    def save(name: str, from_input: bool = False):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            store[name] = inputs[0] if from_input else output

        return hook

    return [
        feature_module(model).register_forward_hook(save("feats_7x7")),
        model.classifier.register_forward_hook(save("avg_pool", from_input=True)),
        model.classifier.register_forward_hook(save("logits")),
    ]


def seed_features(
    model: nn.Module, x: torch.Tensor, handles: list[RemovableHandle] | None = None
) -> dict[str, torch.Tensor]:
    """The seed's feature extraction: new hooks on every call, then a plain forward.

    Args:
        model: a project network (``features`` + ``classifier``).
        x: input batch.
        handles: if given, the new hooks' handles are appended (for the benchmark only).
    """
    store: dict[str, torch.Tensor] = {}
    new = register_feature_hooks(model, store)
    if handles is not None:
        handles.extend(new)
    model(x)
    return {key: store[key] for key in FEATURE_KEYS}


def seed_pdist(feat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The seed's ``D_KD.pdist``: Euclidean distances with a zero diagonal."""
    feat_square = feat.pow(2).sum(dim=1)
    feat_prod = torch.mm(feat, feat.t())
    feat_dist = (feat_square.unsqueeze(0) + feat_square.unsqueeze(1) - 2 * feat_prod).clamp(min=eps)
    feat_dist = feat_dist.sqrt().clone()
    feat_dist[range(len(feat)), range(len(feat))] = 0
    return feat_dist


def seed_rkd_dist(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """The seed's ``rkd_dist``."""
    with torch.no_grad():
        t_d = seed_pdist(feat_t)
        t_d = t_d / t_d[t_d > 0].mean()
    d = seed_pdist(feat_s)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def seed_rkd_angle(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """The seed's ``rkd_angle`` (N x N x N cosines)."""
    with torch.no_grad():
        t_vd = feat_t.unsqueeze(0) - feat_t.unsqueeze(1)
        norm_t_vd = F.normalize(t_vd, p=2, dim=2)
        t_angle = torch.bmm(norm_t_vd, norm_t_vd.transpose(1, 2)).view(-1)
    s_vd = feat_s.unsqueeze(0) - feat_s.unsqueeze(1)
    norm_s_vd = F.normalize(s_vd, p=2, dim=2)
    s_angle = torch.bmm(norm_s_vd, norm_s_vd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def seed_relational(
    out_s: dict, out_t: dict, feat_s_conv: torch.Tensor, lambd_drkd: float, lambd_crkd: float,
    w_dist: float = 25.0, w_angle: float = 50.0,
) -> torch.Tensor:
    """``lambd_drkd (w_dist D + w_angle A) + lambd_crkd CR``, the seed's way."""
    pool_s, pool_t = out_s["avg_pool"], out_t["avg_pool"]
    rkd = w_dist * seed_rkd_dist(pool_s, pool_t) + w_angle * seed_rkd_angle(pool_s, pool_t)
    crkd = seed_channel_relation(feat_s_conv, out_t["feats_7x7"])
    return lambd_drkd * rkd + lambd_crkd * crkd


def seed_d_kd_loss(
    out_s: dict,
    out_t: dict,
    target: torch.Tensor,
    adapter: nn.Module,
    class_weight: torch.Tensor | None = None,
    lambd: float = 0.5,
    T: float = 5.0,
    lambd_drkd: float = 1.0,
    lambd_crkd: float = 1000.0,
) -> torch.Tensor:
    """The seed's ``D_KD.forward``: the weighted D-KD total for one batch."""
    logits_s, logits_t = out_s["logits"], out_t["logits"]
    loss_cls = F.cross_entropy(logits_s, target, weight=class_weight)
    s_max = F.log_softmax(logits_s / T, dim=1)
    t_max = F.softmax(logits_t / T, dim=1)
    loss_kd = F.kl_div(s_max, t_max, reduction="sum") / target.shape[0] * T * T
    loss = (1 - lambd) * loss_cls + lambd * loss_kd
    feat_s_conv = adapter(out_s["feats_7x7"])
    return loss + seed_relational(out_s, out_t, feat_s_conv, lambd_drkd, lambd_crkd)


class SeedDKDStep:
    """A seed-style D-KD training step: ``step(images, labels) -> loss value``.

    The modules are used as given (pass copies: the hooks stay on them for good). The
    teacher is put in eval mode but keeps ``requires_grad=True``, as in the seed.

    Args:
        student, teacher, adapter: project networks and the student->teacher adapter.
        device: where to run (string or ``torch.device``).
        class_weight: (K,) CE weights or ``None``.
        lr: SGD learning rate (momentum 0.9, weight decay 1e-3, as the seed).
        weights: ``lambd, T, lambd_drkd, lambd_crkd`` of :func:`seed_d_kd_loss`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        adapter: nn.Module,
        device: str | torch.device,
        class_weight: torch.Tensor | None = None,
        lr: float = 1e-3,
        **weights: float,
    ):
        self.device = torch.device(device)
        self.student = student.to(self.device).train()
        self.teacher = teacher.to(self.device).eval().requires_grad_(True)
        self.adapter = adapter.to(self.device).train()
        self.class_weight = None if class_weight is None else class_weight.to(self.device)
        self.weights = weights
        params: Sequence[nn.Parameter] = [*student.parameters(), *adapter.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)
        self.handles: list[RemovableHandle] = []

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward passes and the D-KD loss (no optimizer step)."""
        images, labels = images.to(self.device), labels.to(self.device)
        out_t = seed_features(self.teacher, images, self.handles)
        out_t = {k: v.detach() for k, v in out_t.items()}
        out_s = seed_features(self.student, images, self.handles)
        return seed_d_kd_loss(out_s, out_t, labels, self.adapter, self.class_weight, **self.weights)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One full training step; returns the loss value (one device sync, as the seed's ``.item()``)."""
        loss = self.loss(images, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def hooked_calls(self) -> int:
        """Number of calls whose hooks are registered (3 on each of the two networks)."""
        return len(self.handles) // 6

    def reset_hooks(self, keep_calls: int = 0) -> None:
        """Benchmark only: remove hooks so that ``keep_calls`` earlier calls' hooks remain.

        Stale hook sets are recreated with :func:`register_feature_hooks` on dead stores,
        exactly the state the seed's models are in after ``keep_calls`` steps.
        """
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for _ in range(keep_calls):
            for model in (self.teacher, self.student):
                self.handles.extend(register_feature_hooks(model, {}))
