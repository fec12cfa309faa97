"""Weight loading: project checkpoints, the seed's checkpoints, bare and torchvision state dicts.

Every file goes through :func:`raug.files.checkpoint.load_checkpoint`, i.e.
``torch.load(..., weights_only=True)``. Accepted inputs:

(a) project checkpoints (``raug.files.checkpoint`` schema: ``model_state_dict``,
    ``model_name``, ``num_classes``, ...): name and class count are checked;
(b) the seed's checkpoints ``{"epoch": int, "model_state_dict": sd}``;
(c) a bare state dict in the project (= seed) layout;
(d) a torchvision-layout state dict (``conv1.*``, ``layer1.*``, ``fc.*`` for ResNet-50;
    ``features.<i>.*``, ``classifier.1.*`` for MobileNet-V2), mapped by key prefix.

A ``module.`` prefix (DataParallel) is stripped.

ImageNet weights for ``pretrained=True`` are read from the torch hub cache
(``<torch.hub.get_dir()>/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints/``); a
file missing there is downloaded once through torchvision's weights API
(:func:`ensure_imagenet_weights`: hash-checked, moved into place only when complete).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

from raug.files.checkpoint import load_checkpoint

from .names import MOBILENET, RESNET50, canonical_name
from .networks import HEAD_PREFIXES

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

# Socket timeout of a download, per operation (connect, each read), not for the whole
# transfer: a slow but progressing download of ResNet-50's 98 MB goes on, a host that
# does not answer fails after this many seconds instead of hanging (urllib has none).
# pip's default, the timeout the registries' users already live with.
DOWNLOAD_TIMEOUT_S = 15.0
# How long torchrun's other local ranks wait for local rank 0's download. A failed
# download stops rank 0, and torchrun then stops the others well before this.
RANK_WAIT_S = 1800.0
_POLL_S = 0.5
# What a failed download raises: no network or host (URLError and socket errors are
# OSError, like a full disk), a broken transfer (http.client), a wrong hash (RuntimeError
# from torch.hub), a malformed URL (ValueError).
_DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, RuntimeError, ValueError)


class WeightsError(ValueError):
    """Weights that do not fit the model (architecture, class count, keys or shapes)."""


class PretrainedWeightsNotFound(FileNotFoundError):
    """ImageNet weights requested, absent from the torch hub cache and not downloadable."""


def imagenet_weights_url(name: str) -> str:
    """Where torchvision downloads the ImageNet weights of ``name`` from."""
    return IMAGENET_WEIGHTS[canonical_name(name)].url


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name``: ``<hub>/checkpoints/<file>``."""
    filename = imagenet_weights_url(name).rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def unavailable_message(name: str, reason: str) -> str:
    """The one-line error of missing ImageNet weights: URL, cache path, the two ways out."""
    reason = " ".join(reason.split())  # exception texts may span lines
    return (
        f"ImageNet weights for {canonical_name(name)!r} are not in the torch hub cache and "
        f"could not be fetched from {imagenet_weights_url(name)} ({reason}): copy that file "
        f"to {imagenet_weights_path(name)}, or set _pretrained=False "
        "(pretrained=False in create_model)"
    )


def local_rank() -> int:
    """This process's local rank under torchrun (``LOCAL_RANK``); 0 when started alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Give new sockets a default timeout for the duration of the block.

    ``torch.hub`` opens its URL without a timeout; the process default is the only knob.
    """
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def wait_for_file(path: Path, timeout_s: float, poll_s: float = _POLL_S) -> bool:
    """Poll until ``path`` is a file; ``False`` after ``timeout_s`` seconds without it.

    Waiting for existence is enough: torch.hub moves a download into place only when
    it is complete and hash-checked.
    """
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def download_imagenet_weights(
    name: str, *, progress: bool = True, timeout_s: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Download the ImageNet weights of ``name`` into the hub cache, as torchvision does.

    ``WeightsEnum.get_state_dict`` (``torch.hub.load_state_dict_from_url``) writes to a
    ``<file>.<uuid>.partial`` next to the target, checks the SHA-256 prefix that the file
    name carries, moves it into place only then, and removes the partial file on any
    failure: the cache never holds a file it would trust wrongly.

    Args:
        name: model name or alias.
        progress: show torch.hub's progress bar (stderr).
        timeout_s: socket timeout per operation.

    Returns:
        The cached file.

    Raises:
        PretrainedWeightsNotFound: the download failed (one-line message, see
            :func:`unavailable_message`).
    """
    weights = IMAGENET_WEIGHTS[canonical_name(name)]
    try:
        with socket_timeout(timeout_s):
            # weights_only: the downloaded file is read back by torch.hub; no pickled code.
            weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except _DOWNLOAD_ERRORS as exc:
        raise PretrainedWeightsNotFound(
            unavailable_message(name, f"{type(exc).__name__}: {exc}")
        ) from exc
    return imagenet_weights_path(name)


def ensure_imagenet_weights(
    name: str,
    *,
    progress: bool = True,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
    wait_s: float = RANK_WAIT_S,
) -> Path:
    """The cached ImageNet weights of ``name``, downloaded first when missing.

    Under torchrun only local rank 0 downloads (one copy per machine); the other local
    ranks wait up to ``wait_s`` seconds for the file to appear.

    Args:
        name: model name or alias.
        progress: show the download's progress bar.
        timeout_s: socket timeout per operation of the download.
        wait_s: how long a local rank other than 0 waits for the file.

    Returns:
        ``imagenet_weights_path(name)``, an existing file.

    Raises:
        PretrainedWeightsNotFound: the download failed or the wait timed out.
    """
    path = imagenet_weights_path(name)
    if path.is_file():
        return path
    rank = local_rank()
    if rank == 0:
        return download_imagenet_weights(name, progress=progress, timeout_s=timeout_s)
    if wait_for_file(path, wait_s):
        return path
    raise PretrainedWeightsNotFound(
        unavailable_message(name, f"local rank {rank} waited {wait_s:g} s for local rank 0")
    )


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
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    elif "classifier.weight" in sd and sd["classifier.weight"].shape[0] != model.num_classes:
        raise WeightsError(
            f"{source} has {sd['classifier.weight'].shape[0]} classes, "
            f"but the model has {model.num_classes} (skip_classifier=True loads the "
            "backbone only)"
        )
    own = model.state_dict()
    expected = {k for k in own if not (skip_classifier and k.startswith(HEAD_PREFIXES))}
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
        skip_classifier: load the backbone only and keep the model's head (classifier
            and, with metadata fusion, ``comb``/``reducer_block``; for ImageNet weights).

    Returns:
        ``model``.

    Raises:
        WeightsError: architecture or class-count mismatch (both named), missing or
            unexpected keys (a few shown), shape mismatches.
        raug.files.checkpoint.CheckpointError: missing, corrupt or unsafe file.
    """
    if isinstance(path_or_dict, Mapping):
        return _load(model, path_or_dict, "the given state dict", strict, skip_classifier)
    obj = load_checkpoint(path_or_dict)
    return _load(model, obj, f"checkpoint {os.fspath(path_or_dict)}", strict, skip_classifier)


def load_imagenet_weights(model: nn.Module) -> nn.Module:
    """Load torchvision's ImageNet backbone weights (downloaded first when not cached).

    The model keeps its own (fresh) ``num_classes`` classifier.

    Raises:
        PretrainedWeightsNotFound: not cached and not downloadable; the message names
            the URL, the cache path and the alternatives.
    """
    path = ensure_imagenet_weights(model.model_name)
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
