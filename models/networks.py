"""Teacher / student networks with the seed's state-dict layout and an explicit KD API.

Layout (identical to the seed's checkpoints, so they load without a key map):

* ResNet-50: ``features = Sequential(conv1, bn1, relu, maxpool, layer1..4, avgpool)``
  (torchvision's children without ``fc``) and ``classifier = Linear(2048, K)``.
* MobileNet-V2: ``features = Sequential(torchvision_mobilenet_v2.features)`` (hence
  ``features.0.<i>...``) and ``classifier = Linear(1280, K)`` (no dropout, as the seed).

The feature API follows timm: ``forward_features`` (last 1/32 feature map),
``forward_head`` (pool + classifier) and ``forward_kd`` (all three outputs at once, no
hooks). Logits equal torchvision's network with the same weights (in eval mode, where
MobileNet-V2's dropout is the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

from .names import MOBILENET, RESNET50


class KDNet(nn.Module):
    """Backbone ``features`` + linear ``classifier`` with a distillation-friendly API.

    Attributes:
        model_name: canonical name (``"resnet-50"`` or ``"mobilenet"``).
        num_classes: K, the classifier's output size.
        num_features: C, channels of ``feats_7x7`` and width of ``avg_pool``.
        reduction: spatial stride of ``feats_7x7`` w.r.t. the input (32).
    """

    model_name: str = ""
    reduction: int = 32

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.features = features
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map, (N, C, H/32, W/32)."""
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier unless ``pre_logits``.

        Uses ``adaptive_avg_pool2d`` like torchvision, so logits match it exactly.
        """
        pooled = torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1)
        return pooled if pre_logits else self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.forward_head(self.forward_features(x))

    def forward_kd(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"feats_7x7": (N, C, h, w), "avg_pool": (N, C), "logits": (N, K)}``."""
        feats = self.forward_features(x)
        pooled = self.forward_head(feats, pre_logits=True)
        return {"feats_7x7": feats, "avg_pool": pooled, "logits": self.classifier(pooled)}

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, num_features={self.num_features}, "
            f"num_classes={self.num_classes}"
        )


class ResNet50KD(KDNet):
    """ResNet-50 teacher (torchvision architecture, seed layout)."""

    model_name = RESNET50

    def __init__(self, num_classes: int):
        # weights=None: never download; pretrained weights are loaded by the factory.
        net = tv_models.resnet50(weights=None)
        children = [module for name, module in net.named_children() if name != "fc"]
        super().__init__(nn.Sequential(*children), 2048, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Every child except the trailing avgpool (index 8), which forward_head replaces.
        for stage in list(self.features)[:-1]:
            x = stage(x)
        return x


class MobileNetV2KD(KDNet):
    """MobileNet-V2 student (torchvision architecture, seed layout)."""

    model_name = MOBILENET

    def __init__(self, num_classes: int):
        net = tv_models.mobilenet_v2(weights=None)
        super().__init__(nn.Sequential(net.features), 1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


ARCHITECTURES: dict[str, type[KDNet]] = {RESNET50: ResNet50KD, MOBILENET: MobileNetV2KD}
