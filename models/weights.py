"""Weight loading: project checkpoints, the seed's checkpoints, bare and torchvision state dicts.

Every file goes through :func:`raug.checkpoint.load_checkpoint`, i.e.
``torch.load(..., weights_only=True)``. Accepted inputs:

(a) project checkpoints (``raug.checkpoint`` schema: ``model_state_dict``,
    ``model_name``, ``num_classes``, ...): name and class count are checked;
(b) the seed's checkpoints ``{"epoch": int, "model_state_dict": sd}``;
(c) a bare state dict in the project (= seed) layout;
(d) a torchvision-layout state dict (``conv1.*``, ``layer1.*``, ``fc.*`` for ResNet-50;
    ``features.<i>.*``, ``classifier.1.*`` for MobileNet-V2), mapped by key prefix.

A ``module.`` prefix (DataParallel) is stripped. ImageNet weights for
``pretrained=True`` come only from the local torch hub cache; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

from raug.checkpoint import load_checkpoint

from .names import MOBILENET, RESNET50, canonical_name

# torchvision weights used for pretrained=True: IMAGENET1K_V1 for both networks, what the
# seed got from ``torchvision.models.*(pretrained=True)``.
IMAGENET_WEIGHTS = {
    RESNET50: ResNet50_Weights.IMAGENET1K_V1,  # resnet50-0676ba61.pth
    MOBILENET: MobileNet_V2_Weights.IMAGENET1K_V1,  # mobilenet_v2-b0353104.pth
}

# torchvision key prefix -> project prefix
_TV_TO_PROJECT = {
    RESNET50: (
        ("conv1.", "features.0."),
        ("bn1.", "features.1."),
        ("layer1.", "features.4."),
        ("layer2.", "features.5."),
        ("layer3.", "features.6."),
        ("layer4.", "features.7."),
        ("fc.", "classifier."),
    ),
    MOBILENET: (("features.", "features.0."), ("classifier.1.", "classifier.")),
}
_SHOW = 5  # keys shown in error messages


class WeightsError(ValueError):
    """Weights that do not fit the model (architecture, class count, keys or shapes)."""


class PretrainedWeightsNotFound(FileNotFoundError):
    """ImageNet weights requested but absent from the local torch hub cache."""


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name``: ``<hub>/checkpoints/<file>``."""
    filename = IMAGENET_WEIGHTS[canonical_name(name)].url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def detect_layout(keys) -> tuple[str | None, str | None]:
    """Guess ``(architecture, layout)`` of a state dict from its keys.

    Returns:
        e.g. ``("resnet-50", "project")`` or ``("mobilenet", "torchvision")``;
        ``(None, None)`` when the keys match neither network.
    """
    keys = set(keys)
    if "features.4.0.conv1.weight" in keys:
        return RESNET50, "project"
    if "layer1.0.conv1.weight" in keys:
        return RESNET50, "torchvision"
    if "features.0.0.0.weight" in keys:
        return MOBILENET, "project"
    if "features.0.0.weight" in keys and "features.1.conv.0.0.weight" in keys:
        return MOBILENET, "torchvision"
    return None, None


def _rename(sd: Mapping[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def from_torchvision_layout(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename a torchvision state dict of ``name`` to the project (seed) layout."""
    return _rename(sd, _TV_TO_PROJECT[canonical_name(name)])


def to_torchvision_layout(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename a project-layout state dict to torchvision's layout (inverse map)."""
    return _rename(sd, [(new, old) for old, new in _TV_TO_PROJECT[canonical_name(name)]])


def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _state_dict_of(obj: Mapping, model: nn.Module, source: str, check_classes: bool) -> dict:
    """Pull the state dict out of a checkpoint-like mapping and check its metadata."""
    if "model_state_dict" in obj:
        # Project checkpoints describe themselves; the seed's only hold epoch + weights.
        sd = obj["model_state_dict"]
        if "model_name" in obj:
            try:
                name = canonical_name(obj["model_name"])
            except ValueError as exc:
                raise WeightsError(f"{source}: {exc}") from exc
            if name != model.model_name:
                raise WeightsError(
                    f"{source} is a {name!r} checkpoint, but the model is {model.model_name!r}"
                )
        if check_classes and "num_classes" in obj and obj["num_classes"] != model.num_classes:
            raise WeightsError(
                f"{source} has {obj['num_classes']} classes, but the model has {model.num_classes}"
            )
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise WeightsError(
            f"{source} holds neither 'model_state_dict' nor a state dict "
            f"(top-level keys: {sorted(map(str, obj))[:_SHOW]})"
        )
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{source}: 'model_state_dict' is a {type(sd).__name__}, not a dict")
    return _strip_module_prefix(sd)


def _few(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _load(
    model: nn.Module, obj: Mapping, source: str, strict: bool, skip_classifier: bool
) -> nn.Module:
    sd = _state_dict_of(obj, model, source, check_classes=not skip_classifier)
    arch, layout = detect_layout(sd)
    if arch is not None and arch != model.model_name:
        raise WeightsError(
            f"{source} holds a {arch!r} state dict, but the model is {model.model_name!r}"
        )
    if layout == "torchvision":
        sd = from_torchvision_layout(sd, arch)
    if skip_classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    elif "classifier.weight" in sd and sd["classifier.weight"].shape[0] != model.num_classes:
        raise WeightsError(
            f"{source} has {sd['classifier.weight'].shape[0]} classes, "
            f"but the model has {model.num_classes} (skip_classifier=True loads the "
            "backbone only)"
        )
    own = model.state_dict()
    expected = {k for k in own if not (skip_classifier and k.startswith("classifier."))}
    missing, unexpected = expected - set(sd), set(sd) - set(own)
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{source} does not fit {model.model_name!r}: "
            f"{len(missing)} missing keys [{_few(missing)}], "
            f"{len(unexpected)} unexpected keys [{_few(unexpected)}]"
        )
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch for {len(wrong)} keys: {wrong[:_SHOW]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model


def load_weights(
    model: nn.Module,
    path_or_dict: str | os.PathLike | Mapping,
    strict: bool = True,
    *,
    skip_classifier: bool = False,
) -> nn.Module:
    """Load weights of any accepted kind (see module docstring) into ``model`` in place.

    Args:
        model: a network from :func:`models.create_model`.
        path_or_dict: checkpoint file, or an already loaded checkpoint / state dict.
        strict: require exactly the model's keys (shapes must always match).
        skip_classifier: load the backbone only and keep the model's classifier
            (for ImageNet weights with another class count).

    Returns:
        ``model``.

    Raises:
        WeightsError: architecture or class-count mismatch (both named), missing or
            unexpected keys (a few shown), shape mismatches.
        raug.checkpoint.CheckpointError: missing, corrupt or unsafe file.
    """
    if isinstance(path_or_dict, Mapping):
        return _load(model, path_or_dict, "the given state dict", strict, skip_classifier)
    obj = load_checkpoint(path_or_dict)
    return _load(model, obj, f"checkpoint {os.fspath(path_or_dict)}", strict, skip_classifier)


def load_imagenet_weights(model: nn.Module) -> nn.Module:
    """Load torchvision's ImageNet backbone weights from the local hub cache (no download).

    The model keeps its own (fresh) ``num_classes`` classifier.

    Raises:
        PretrainedWeightsNotFound: at once, when the file is not in the cache; the
            message names the expected path and the alternatives.
    """
    path = imagenet_weights_path(model.model_name)
    if not path.is_file():
        url = IMAGENET_WEIGHTS[model.model_name].url
        raise PretrainedWeightsNotFound(
            f"ImageNet weights for {model.model_name!r} are not in the local torch hub cache: "
            f"expected {path} (nothing is downloaded). Either put the file there "
            f"(from {url}), set _pretrained=False (pretrained=False), or pass "
            f"weights=PATH with a local weights file (torchvision state dict, seed "
            f"checkpoint or project checkpoint)."
        )
    obj = load_checkpoint(path)
    return _load(model, obj, f"ImageNet weights {path}", strict=True, skip_classifier=True)


def load_weights_file(model: nn.Module, weights: str | os.PathLike | Mapping) -> nn.Module:
    """``weights=PATH`` of :func:`models.create_model`.

    A torchvision-layout state dict whose head has another class count (e.g. ImageNet's
    1000) is a backbone: it is loaded without its classifier. Everything else is
    loaded strictly by :func:`load_weights`, with class counts checked.
    """
    if isinstance(weights, Mapping):
        obj, source = weights, "the given state dict"
    else:
        obj, source = load_checkpoint(weights), f"weights file {os.fspath(weights)}"
    sd = _state_dict_of(obj, model, source, check_classes=True)
    _, layout = detect_layout(sd)
    head = sd.get("fc.weight", sd.get("classifier.1.weight"))
    backbone_only = layout == "torchvision" and (head is None or head.shape[0] != model.num_classes)
    return _load(model, obj, source, strict=True, skip_classifier=backbone_only)
