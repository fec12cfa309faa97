"""Teacher / student networks, weight loading, adapters and projection heads.

* :func:`create_model`, :func:`list_models`, :func:`canonical_name`
* networks (:class:`KDNet`): ``model(x)`` -> logits, ``forward_features``,
  ``forward_head``, ``forward_kd`` -> ``{"feats_7x7", "avg_pool", "logits"}``
* :func:`load_weights` (project, seed, bare and torchvision state dicts)
* :func:`ensure_imagenet_weights`: torchvision's ImageNet weights in the hub cache,
  downloaded when missing
* :class:`ConvReg`, :func:`build_adapter`, :class:`ProjectionHead`
* metadata fusion (:mod:`models.fusion`): :class:`FusionSpec` (the seed's
  ``_comb_method``, ``_comb_config``, ``_neurons_reducer_block``), :class:`MetaBlock`,
  :class:`MetaNet`
"""

from .adapters import ConvReg, build_adapter
from .factory import checkpoint_fusion, create_model
from .fusion import COMB_METHODS, FusionConfigError, FusionSpec, MetaBlock, MetaNet, infer_fusion
from .heads import ProjectionHead
from .names import MOBILENET, RESNET50, canonical_name, list_models
from .networks import NUM_FEATURES, KDNet, MobileNetV2KD, ResNet50KD
from .weights import (
    IMAGENET_WEIGHTS,
    PretrainedWeightsNotFound,
    WeightsError,
    detect_layout,
    ensure_imagenet_weights,
    from_torchvision_layout,
    imagenet_weights_path,
    imagenet_weights_url,
    load_weights,
    to_torchvision_layout,
)

__all__ = [
    "COMB_METHODS",
    "IMAGENET_WEIGHTS",
    "MOBILENET",
    "NUM_FEATURES",
    "RESNET50",
    "ConvReg",
    "FusionConfigError",
    "FusionSpec",
    "KDNet",
    "MetaBlock",
    "MetaNet",
    "MobileNetV2KD",
    "PretrainedWeightsNotFound",
    "ProjectionHead",
    "ResNet50KD",
    "WeightsError",
    "build_adapter",
    "canonical_name",
    "checkpoint_fusion",
    "create_model",
    "detect_layout",
    "ensure_imagenet_weights",
    "from_torchvision_layout",
    "imagenet_weights_path",
    "imagenet_weights_url",
    "infer_fusion",
    "list_models",
    "load_weights",
    "to_torchvision_layout",
]
