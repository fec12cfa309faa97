"""``create_model``: the one place that builds networks and attaches weights."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .fusion import FusionSpec, infer_fusion
from .names import canonical_name
from .networks import ARCHITECTURES, NUM_FEATURES, KDNet
from .weights import load_imagenet_weights, load_weights_file


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | os.PathLike | Mapping | None = None,
    fusion: FusionSpec | None = None,
) -> KDNet:
    """Build ``"resnet-50"`` or ``"mobilenet"`` (aliases: ``resnet50``, ``mobilenet_v2``,
    ``mobilenetv2``) with a ``num_classes`` classifier.

    Args:
        name: model name or alias.
        num_classes: K.
        pretrained: start from torchvision's ImageNet (IMAGENET1K_V1) backbone, read from
            the torch hub cache; downloaded into it first when missing
            (:func:`models.weights.ensure_imagenet_weights`).
        weights: a local weights file (or loaded dict) instead: project checkpoint, seed
            checkpoint, bare or torchvision state dict. Takes precedence over
            ``pretrained``. A torchvision state dict with another class count (ImageNet)
            gives the backbone only; other kinds must match ``num_classes``.
        fusion: metadata fusion (:class:`models.fusion.FusionSpec`); image only by default.
            ImageNet weights load into the backbone; the fusion modules start fresh.

    Returns:
        The network (train mode, on CPU).

    Raises:
        ValueError: unknown name (valid names listed) or bad ``num_classes``.
        models.weights.PretrainedWeightsNotFound: ``pretrained=True``, the file is not
            cached and cannot be downloaded.
        models.weights.WeightsError: weights that do not fit.
    """
    model = ARCHITECTURES[canonical_name(name)](num_classes, fusion)
    if weights is not None:
        load_weights_file(model, weights)
    elif pretrained:
        load_imagenet_weights(model)
    return model


def checkpoint_fusion(ckpt: Mapping, model_name: str) -> FusionSpec:
    """The metadata fusion of a loaded checkpoint's network.

    A project checkpoint records it (``ckpt["fusion"]``, :meth:`FusionSpec.to_dict`);
    others (the seed's fused networks, bare state dicts) are read from their shapes
    (:func:`models.fusion.infer_fusion`). Image-only files give ``FusionSpec()``.
    """
    if ckpt.get("fusion"):
        return FusionSpec.from_dict(ckpt["fusion"])
    state = ckpt.get("model_state_dict", ckpt)
    return infer_fusion(state, NUM_FEATURES[canonical_name(model_name)])
