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

Metadata fusion (``fusion=``, :mod:`models.fusion`): ``comb`` and ``reducer_block``
sit between the pooled features and the classifier (the seed's MetaBlock networks'
names); the image branch (``forward_features``, ``feats_7x7``) is unchanged and
``avg_pool`` is then the fused vector the classifier sees. Without fusion neither
module exists and the state dict is the plain layout above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

from .fusion import FusionSpec, build_comb, build_reducer, fuse
from .names import MOBILENET, RESNET50

# State-dict prefixes of the head: everything after the pooled image features.
HEAD_PREFIXES = ("classifier.", "comb.", "reducer_block.")


class KDNet(nn.Module):
    """Backbone ``features`` + linear ``classifier`` with a distillation-friendly API.

    Attributes:
        model_name: canonical name (``"resnet-50"`` or ``"mobilenet"``).
        num_classes: K, the classifier's output size.
        num_features: C, channels of ``feats_7x7`` (the pooled image features' width).
        fusion: the :class:`~models.fusion.FusionSpec` (image only by default).
        embedding_features: width of ``avg_pool`` in ``forward_kd`` (C without fusion).
        reduction: spatial stride of ``feats_7x7`` w.r.t. the input (32).
    """

    model_name: str = ""
    reduction: int = 32

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int,
                 fusion: FusionSpec | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.features = features
        self.fusion = fusion or FusionSpec()
        self.comb = build_comb(self.fusion)
        self.reducer_block = build_reducer(self.fusion, num_features)
        self.embedding_features = self.fusion.out_features(num_features)
        self.classifier = nn.Linear(self.embedding_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    @property
    def uses_metadata(self) -> bool:
        """Whether ``forward`` needs ``meta`` (N, M) besides the images."""
        return self.fusion.uses_metadata

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map, (N, C, H/32, W/32)."""
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False,
                     meta: torch.Tensor | None = None) -> torch.Tensor:
        """Global average pool, fusion with ``meta`` (if any), then the classifier unless ``pre_logits``.

        Uses ``adaptive_avg_pool2d`` like torchvision, so logits match it exactly.
        """
        pooled = torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1)
        fused = fuse(self.fusion, self.comb, self.reducer_block, pooled, meta)
        return fused if pre_logits else self.classifier(fused)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, K); ``meta`` (N, M) exactly when the network fuses metadata."""
        return self.forward_head(self.forward_features(x), meta=meta)

    def forward_kd(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"feats_7x7": (N, C, h, w), "avg_pool": (N, E), "logits": (N, K)}``.

        ``feats_7x7`` is the image branch; ``avg_pool`` the classifier's input (E =
        ``embedding_features``: the fused vector with metadata, the pooled C otherwise).
        """
        feats = self.forward_features(x)
        pooled = self.forward_head(feats, pre_logits=True, meta=meta)
        return {"feats_7x7": feats, "avg_pool": pooled, "logits": self.classifier(pooled)}

    def extra_repr(self) -> str:
        fused = f", fusion={self.fusion}" if self.fusion != FusionSpec() else ""
        return (
            f"model_name={self.model_name!r}, num_features={self.num_features}, "
            f"num_classes={self.num_classes}{fused}"
        )


class ResNet50KD(KDNet):
    """ResNet-50 teacher (torchvision architecture, seed layout)."""

    model_name = RESNET50

    def __init__(self, num_classes: int, fusion: FusionSpec | None = None):
        # weights=None: never download; pretrained weights are loaded by the factory.
        net = tv_models.resnet50(weights=None)
        children = [module for name, module in net.named_children() if name != "fc"]
        super().__init__(nn.Sequential(*children), 2048, num_classes, fusion)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Every child except the trailing avgpool (index 8), which forward_head replaces.
        for stage in list(self.features)[:-1]:
            x = stage(x)
        return x


class MobileNetV2KD(KDNet):
    """MobileNet-V2 student (torchvision architecture, seed layout)."""

    model_name = MOBILENET

    def __init__(self, num_classes: int, fusion: FusionSpec | None = None):
        net = tv_models.mobilenet_v2(weights=None)
        super().__init__(nn.Sequential(net.features), 1280, num_classes, fusion)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


ARCHITECTURES: dict[str, type[KDNet]] = {RESNET50: ResNet50KD, MOBILENET: MobileNetV2KD}
# Pooled image features of each architecture (what _comb_config must fit).
NUM_FEATURES: dict[str, int] = {RESNET50: 2048, MOBILENET: 1280}
