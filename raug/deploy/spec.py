"""What a deployed model needs to know about itself, and the ONNX metadata contract (torch-free).

A :class:`ModelSpec` is read from a project checkpoint (:func:`spec_from_checkpoint`) and
written into every exported ONNX file as ``metadata_props`` (:func:`spec_to_metadata`); the
predictor reads it back (:func:`spec_from_metadata`) so an ``.onnx`` file is as
self-describing as the checkpoint it came from. Every metadata value is a JSON string:

=========================  =================================================================
key                        value (JSON)
=========================  =================================================================
``deploy_format``          ``"ssdkd-deploy"``
``deploy_format_version``  ``1``
``model_name``             architecture, e.g. ``"mobilenet"``
``class_names``            class codes in label order, e.g. ``["AK", "BCC", ...]``
``img_size``               input side S in pixels
``normalization``          ``{"mean": [r, g, b], "std": [r, g, b], "max_pixel_value": 255.0}``
``input``                  ``{"name": "input", "layout": "NCHW", "color": "RGB",
                           "dtype": "float32", "shape": ["batch", 3, S, S],
                           "preprocessing": "..."}``
``output``                 ``{"name": "probs"|"logits", "kind": "probs"|"logits",
                           "shape": ["batch", K]}``
``source_checkpoint``      ``{"file": name, "sha256": hex, "epoch": int|null}``
``data_preparation``       when the checkpoint recorded it: ``{"size": int|null, "split_hash": hex}``,
                           how ``run_preprocess.sh`` shrank the training images (null: originals)
``quantization``           int8 files only: ``{"mode": "static"|"dynamic", ...}``
``fusion``                 fused models only: the network's ``models.FusionSpec.to_dict()``
``metadata_input``         fused models only: ``{"name": "metadata", "dtype": "float32",
                           "shape": ["batch", M], "columns": [...], "encoding": {...}}``, the
                           second input's columns in order and how they are encoded
=========================  =================================================================

Image-only models have one input and neither ``fusion`` nor ``metadata_input``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raug.deploy.images import DEFAULT_PREPARE_SIZE

DEPLOY_FORMAT = "ssdkd-deploy"
DEPLOY_FORMAT_VERSION = 1
INPUT_NAME = "input"
#: The second input of models that fuse patient metadata.
METADATA_INPUT = "metadata"
OUTPUT_KINDS = ("probs", "logits")
PREPROCESSING = (
    "RGB uint8 image -> cv2.resize to (S, S) with INTER_LINEAR -> "
    "(v / 255 - mean) / std per channel -> CHW float32 (albumentations "
    "Resize + Normalize, the training engine's evaluation transform)"
)
_REQUIRED_CKPT_KEYS = ("model_name", "num_classes", "class_names", "img_size", "normalization")


class SpecError(ValueError):
    """A checkpoint or ONNX file lacks, or has malformed, deployment information."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to feed a model and read its answer.

    Attributes:
        model_name: architecture name (``"resnet-50"``, ``"mobilenet"``).
        class_names: class codes in label order.
        img_size: square input side in pixels.
        mean: per-channel normalisation mean (0-1 scale).
        std: per-channel normalisation std (0-1 scale).
        output_kind: ``"probs"`` (softmax probabilities) or ``"logits"``.
        source: description of the checkpoint the model came from.
        extra: further metadata (e.g. quantisation details, ``data_preparation``), JSON-like.
        fusion: ``models.FusionSpec.to_dict()`` of a network that fuses metadata, else empty.
        metadata_input: the metadata input's description (``metadata_input`` in the module
            docstring) of a fused network, else empty.
    """

    model_name: str
    class_names: tuple[str, ...]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output_kind: str = "probs"
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fusion: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metadata_input: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def uses_metadata(self) -> bool:
        """Whether the model takes a second input, the patient metadata."""
        return bool(self.fusion.get("method"))

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`class_names`)."""
        return len(self.class_names)

    @property
    def output_name(self) -> str:
        """Name of the ONNX output tensor (equals the output kind)."""
        return self.output_kind


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spec_from_checkpoint(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike,
    output_kind: str = "probs",
    fusion: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Build the spec of a project checkpoint (see :mod:`raug.files.checkpoint` for the schema).

    Args:
        ckpt: the loaded checkpoint dict.
        path: the checkpoint file (named in errors, hashed into ``source``).
        output_kind: ``"probs"`` or ``"logits"``.
        fusion: the network's ``FusionSpec.to_dict()``; the caller reads it from the
            checkpoint's ``fusion`` or infers it from the weights (which needs torch, so not
            here). ``None`` or a dict without a method: image only.

    Returns:
        The spec.

    Raises:
        SpecError: a required key is missing or malformed (message names file and key).
    """
    path = Path(path)
    missing = [key for key in (*_REQUIRED_CKPT_KEYS, "model_state_dict") if key not in ckpt]
    if missing:
        raise SpecError(
            f"checkpoint {path} is not self-describing: missing key(s) {missing} "
            f"(expected a project checkpoint written by raug.files.checkpoint.save_checkpoint)"
        )
    epoch = ckpt.get("epoch")
    source = {
        "file": path.name,
        "sha256": file_sha256(path) if path.is_file() else None,
        "epoch": int(epoch) if isinstance(epoch, int) else None,
    }
    extra = {}
    if "data_preparation" in ckpt:
        extra["data_preparation"] = ckpt["data_preparation"]
    fusion = dict(fusion or {})
    spec = _build_spec(
        {key: ckpt[key] for key in _REQUIRED_CKPT_KEYS}, f"checkpoint {path}", output_kind, source,
        extra, fusion, metadata_input_for(fusion) if fusion.get("method") else {},
    )
    if int(ckpt["num_classes"]) != spec.num_classes:
        raise SpecError(
            f"checkpoint {path}: num_classes={ckpt['num_classes']} but class_names has "
            f"{spec.num_classes} entries"
        )
    return spec


def metadata_input_for(fusion: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata input of a fused network: preparation's columns and encoding.

    Raises:
        SpecError: the network's metadata width is not the number of prepared columns.
    """
    # Lazy: it needs pandas, which the ONNX prediction path does without.
    from raug.isic2019.tables import METADATA_COLUMNS, METADATA_ENCODING

    width = fusion.get("meta_features")
    if width != len(METADATA_COLUMNS):
        raise SpecError(
            f"the network fuses {width} metadata features but the prepared metadata has "
            f"{len(METADATA_COLUMNS)} columns {list(METADATA_COLUMNS)}"
        )
    return {"name": METADATA_INPUT, "dtype": "float32", "shape": ["batch", width],
            "columns": list(METADATA_COLUMNS), "encoding": dict(METADATA_ENCODING)}


def spec_to_metadata(spec: ModelSpec) -> dict[str, str]:
    """Encode a spec as ONNX ``metadata_props`` (every value a JSON string).

    Args:
        spec: the model spec.

    Returns:
        ``{key: json_string}`` following the table in this module's docstring.
    """
    size = spec.img_size
    meta: dict[str, Any] = {
        "deploy_format": DEPLOY_FORMAT,
        "deploy_format_version": DEPLOY_FORMAT_VERSION,
        "model_name": spec.model_name,
        "class_names": list(spec.class_names),
        "img_size": size,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "max_pixel_value": 255.0},
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "shape": ["batch", 3, size, size],
            "preprocessing": PREPROCESSING,
        },
        "output": {
            "name": spec.output_name,
            "kind": spec.output_kind,
            "shape": ["batch", spec.num_classes],
        },
        "source_checkpoint": dict(spec.source),
    }
    if spec.uses_metadata:
        meta["fusion"] = dict(spec.fusion)
        meta["metadata_input"] = dict(spec.metadata_input)
    meta.update(spec.extra)
    return {key: json.dumps(value) for key, value in meta.items()}


def spec_from_metadata(meta: Mapping[str, str], where: str) -> ModelSpec:
    """Decode ONNX ``metadata_props`` written by :func:`spec_to_metadata`.

    Args:
        meta: ``{key: json_string}``.
        where: what to name in errors (e.g. the ONNX file).

    Returns:
        The spec (unknown keys are kept in ``extra``).

    Raises:
        SpecError: the file was not exported by this toolkit or a value is malformed.
    """
    try:
        decoded = {key: json.loads(value) for key, value in meta.items()}
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}: metadata value is not JSON: {exc}") from exc
    if decoded.get("deploy_format") != DEPLOY_FORMAT:
        raise SpecError(
            f"{where}: no '{DEPLOY_FORMAT}' metadata (deploy_format="
            f"{decoded.get('deploy_format')!r}); export the model with tools/export.py"
        )
    missing = [k for k in ("model_name", "class_names", "img_size", "normalization", "output")
               if k not in decoded]
    if missing:
        raise SpecError(f"{where}: metadata lacks key(s) {missing}")
    output = decoded["output"]
    if not isinstance(output, dict) or "kind" not in output:
        raise SpecError(f"{where}: metadata 'output' must be a dict with 'kind', got {output!r}")
    known = {*_REQUIRED_CKPT_KEYS, "deploy_format", "deploy_format_version", "input", "output",
             "source_checkpoint", "fusion", "metadata_input"}
    extra = {key: value for key, value in decoded.items() if key not in known}
    return _build_spec(
        decoded, where, output["kind"], decoded.get("source_checkpoint") or {}, extra,
        decoded.get("fusion") or {}, decoded.get("metadata_input") or {},
    )


def _build_spec(
    raw: Mapping[str, Any],
    where: str,
    output_kind: str,
    source: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    fusion: Mapping[str, Any] | None = None,
    metadata_input: Mapping[str, Any] | None = None,
) -> ModelSpec:
    _check_metadata_input(fusion or {}, metadata_input or {}, where)
    if output_kind not in OUTPUT_KINDS:
        raise SpecError(f"{where}: output kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
    names = raw["class_names"]
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError(f"{where}: 'class_names' must be a non-empty list of strings, got {names!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: 'class_names' has duplicates: {names!r}")
    size = raw["img_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise SpecError(f"{where}: 'img_size' must be a positive int, got {size!r}")
    norm = raw["normalization"]
    try:
        mean = tuple(float(v) for v in norm["mean"])
        std = tuple(float(v) for v in norm["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(
            f"{where}: 'normalization' must be {{'mean': [3 floats], 'std': [3 floats]}}, "
            f"got {norm!r}"
        ) from exc
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise SpecError(f"{where}: 'normalization' needs 3 means and 3 positive stds, got {norm!r}")
    model_name = raw["model_name"]
    if not isinstance(model_name, str) or not model_name:
        raise SpecError(f"{where}: 'model_name' must be a non-empty string, got {model_name!r}")
    preparation = (extra or {}).get("data_preparation")
    if preparation is not None:
        prep_size = preparation.get("size", 0) if isinstance(preparation, Mapping) else 0
        if not (prep_size is None or (isinstance(prep_size, int) and not isinstance(prep_size, bool)
                                      and prep_size > 0)):
            raise SpecError(
                f"{where}: 'data_preparation' must be {{'size': positive int or null, ...}}, "
                f"got {preparation!r}"
            )
    return ModelSpec(
        model_name=model_name,
        class_names=tuple(names),
        img_size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        output_kind=output_kind,
        source=dict(source),
        extra=dict(extra or {}),
        fusion=dict(fusion or {}),
        metadata_input=dict(metadata_input or {}),
    )


def _check_metadata_input(
    fusion: Mapping[str, Any], metadata_input: Mapping[str, Any], where: str
) -> None:
    """A fused model names as many metadata columns as it reads; an image-only one none."""
    if not isinstance(fusion, Mapping) or not isinstance(metadata_input, Mapping):
        raise SpecError(f"{where}: 'fusion' and 'metadata_input' must be dicts")
    if not fusion.get("method"):
        if metadata_input:
            raise SpecError(f"{where}: 'metadata_input' without a fusion method")
        return
    columns = metadata_input.get("columns")
    if (metadata_input.get("name") != METADATA_INPUT or not isinstance(columns, list)
            or len(columns) != fusion.get("meta_features")):
        raise SpecError(
            f"{where}: fusion {dict(fusion)} needs 'metadata_input' with name "
            f"{METADATA_INPUT!r} and {fusion.get('meta_features')} columns, got "
            f"{dict(metadata_input)}"
        )


def onnx_feeds(spec: ModelSpec, images: Any, meta: Any = None) -> dict[str, Any]:
    """The inputs of an exported model: the images, and the metadata exactly when it fuses them.

    Raises:
        ValueError: metadata missing for a fused model, or given to an image-only one.
    """
    if spec.uses_metadata != (meta is not None):
        raise ValueError(
            f"{spec.model_name} {'fuses' if spec.uses_metadata else 'does not use'} patient "
            f"metadata but {'none was' if meta is None else 'metadata was'} given"
        )
    return {INPUT_NAME: images} if meta is None else {INPUT_NAME: images, METADATA_INPUT: meta}


#: ``prepare_size`` default: the size the model's training images were prepared at.
AUTO_PREPARE_SIZE = "auto"


def resolve_prepare_size(requested: int | str | None, spec: ModelSpec) -> int | None:
    """The shorter side new images are shrunk to before the evaluation transform.

    Args:
        requested: a size in px, ``None`` (feed images as they are) or
            :data:`AUTO_PREPARE_SIZE`: the ``size`` of the model's recorded
            ``data_preparation`` (``None`` there: trained on originals), and for models
            without that record (seed checkpoints, older exports) ``run_preprocess.sh``'s
            default, :data:`~raug.deploy.images.DEFAULT_PREPARE_SIZE`.
        spec: the model's spec.

    Returns:
        The size in px, or ``None`` for no shrinking.
    """
    if requested != AUTO_PREPARE_SIZE:
        return requested  # type: ignore[return-value]
    preparation = spec.extra.get("data_preparation")
    if isinstance(preparation, dict) and "size" in preparation:
        return preparation["size"]
    return DEFAULT_PREPARE_SIZE
