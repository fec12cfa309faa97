"""int8 quantisation of exported ONNX models with onnxruntime (torch-free).

* **static** (recommended; used when calibration images are given): QDQ format, unsigned 8-bit
  activations and signed 8-bit per-channel weights (U8S8, onnxruntime's CPU default and the
  fastest choice on x86 with VNNI), MinMax calibration on images preprocessed exactly like
  prediction. The final ``Softmax`` is left in float so probabilities are not rounded to
  1/255 steps. The model goes through ``quant_pre_process`` (shape inference + graph
  optimisation) first, as onnxruntime recommends.
* **dynamic** (no calibration data): weights quantised offline, activations at run time.
  Convolutions become ``ConvInteger`` with unsigned weights (the only form onnxruntime's CPU
  provider runs); the file is as small as the static one but, for a conv net, *slower* than
  fp32 on CPU -- prefer static quantisation whenever a few images are at hand.

The int8 file keeps the fp32 file's metadata (:mod:`raug.deploy.spec`) plus a
``quantization`` entry, so :class:`~raug.deploy.onnx_backend.OnnxPredictor` reads both alike.

Models that fuse patient metadata take inputs as a dict ``{"input": images, "metadata":
meta}`` wherever image-only models take an image array (:data:`Inputs`). Static
calibration then needs each calibration image's metadata: :func:`calibration_inputs` reads
it from an official-format metadata CSV (``--calibration-metadata``; for training images
``ISIC_2019_Training_Metadata.csv``), encoded like prediction does
(:mod:`raug.deploy.metadata`), so the calibrated ranges of the fusion layers are those of
real patients rather than of made-up metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from tqdm import tqdm

from raug.deploy.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    collect_images,
    load_rgb,
)
from raug.deploy.onnx_backend import OnnxPredictor, read_metadata
from raug.deploy.preprocess import preprocess
from raug.deploy.spec import INPUT_NAME, METADATA_INPUT, ModelSpec, file_sha256, onnx_feeds
from raug.files.atomic import atomic_write_with


def _import_ort_quantization() -> tuple[ModuleType, Callable[..., None]]:
    """Import ``onnxruntime.quantization`` without letting it change ``sys.path``.

    It imports ``onnxruntime.transformers``, whose ``__init__`` appends its own folder to
    ``sys.path``. That folder holds a ``models`` namespace package, which would then shadow
    this project's ``models`` package in any later ``import models`` (the editable install's
    finder comes after the path finder).
    """
    saved = list(sys.path)
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization.shape_inference import quant_pre_process
    finally:
        sys.path[:] = saved
    return quantization, quant_pre_process


_ORT_QUANT, _quant_pre_process = _import_ort_quantization()

#: Model inputs: an image array ``(N, 3, S, S)``, or ``{input name: array}`` with the
#: metadata ``(N, M)`` of a fused model.
Inputs = np.ndarray | Mapping[str, np.ndarray]


def _as_feeds(inputs: Inputs) -> dict[str, np.ndarray]:
    return {INPUT_NAME: inputs} if isinstance(inputs, np.ndarray) else dict(inputs)


def _slices(inputs: Inputs, size: int) -> list[dict[str, np.ndarray]]:
    """``inputs`` cut into feeds of ``size`` rows."""
    feeds = _as_feeds(inputs)
    total = len(feeds[INPUT_NAME])
    return [{name: a[i : i + size] for name, a in feeds.items()} for i in range(0, total, size)]


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """Summary of one quantisation.

    Attributes:
        path: the int8 file.
        mode: ``"static"`` or ``"dynamic"``.
        fp32_bytes: size of the fp32 file.
        int8_bytes: size of the int8 file.
        num_calibration: images used for calibration (0 for dynamic).
        num_compared: inputs on which int8 and fp32 were compared.
        compared_on: ``"calibration images"``, ``"random inputs"`` or ``"given inputs"``.
        top1_agreement: fraction of compared inputs with the same arg-max class.
        max_prob_diff: largest absolute probability difference.
    """

    path: Path
    mode: str
    fp32_bytes: int
    int8_bytes: int
    num_calibration: int
    num_compared: int
    compared_on: str
    top1_agreement: float
    max_prob_diff: float

    @property
    def ratio(self) -> float:
        """fp32 size / int8 size."""
        return self.fp32_bytes / self.int8_bytes

    def summary(self) -> str:
        """Human-readable one-paragraph summary."""
        return (
            f"int8 ({self.mode}) -> {self.path}\n"
            f"  size: fp32 {self.fp32_bytes:,} B, int8 {self.int8_bytes:,} B "
            f"({self.ratio:.2f}x smaller)\n"
            f"  agreement with fp32 on {self.num_compared} {self.compared_on}: "
            f"top-1 {self.top1_agreement:.1%}, max |prob diff| {self.max_prob_diff:.2e}"
        )


class ArrayCalibrationReader(_ORT_QUANT.CalibrationDataReader):
    """Feeds preprocessed inputs to onnxruntime's calibrator in batches.

    Args:
        inputs: ``(N, 3, S, S)`` float32 network inputs, or feeds with the metadata too.
        batch_size: inputs per calibration step.
    """

    def __init__(self, inputs: Inputs, batch_size: int = 8) -> None:
        self._batches = _slices(inputs, batch_size)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next ``{input_name: batch}`` or ``None`` when exhausted."""
        return next(self._iter, None)

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._iter = iter(self._batches)


def calibration_inputs(
    folder: str | os.PathLike,
    spec: ModelSpec,
    limit: int | None = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    prepare_size: int | str | None = "auto",
    metadata: str | os.PathLike | None = None,
) -> Inputs:
    """Preprocess the images under ``folder`` exactly as prediction does.

    Args:
        folder: calibration image folder (searched recursively).
        spec: the model spec (size, normalisation).
        limit: use at most this many images (evenly spread over the sorted list).
        max_pixels: decompression-bomb limit.
        progress: show a tqdm bar.
        prepare_size: shrink like the data preparation first (as prediction does; ``"auto"``:
            as the model's training data, see :func:`raug.deploy.predict.resolve_prepare_size`).
        metadata: official-format metadata CSV of the images (fused models only; images are
            matched by file stem, see :mod:`raug.deploy.metadata`).

    Returns:
        ``(N, 3, S, S)`` float32 inputs, or for a fused model ``{"input": those,
        "metadata": (N, M) float32}``.

    Raises:
        FileNotFoundError: the folder is missing or holds no readable image.
        ValueError: a fused model without ``metadata``, or ``metadata`` for an image-only one.
    """
    from raug.deploy.spec import resolve_prepare_size

    if spec.uses_metadata != (metadata is not None):
        raise ValueError(
            f"--calibration-metadata: the {spec.model_name} model fuses patient metadata, so "
            "static calibration needs the images' metadata CSV" if spec.uses_metadata else
            f"--calibration-metadata: the {spec.model_name} model uses no patient metadata; "
            "drop the option"
        )
    prepare_size = resolve_prepare_size(prepare_size, spec)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder not found: {folder}")
    paths = collect_images([folder])
    if limit is not None and len(paths) > limit:
        # Even spread rather than the first N: folders are often sorted by class or source.
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    arrays, stems = [], []
    for path in tqdm(paths, desc="calibration", unit="img", disable=not progress, file=sys.stderr):
        try:
            rgb = load_rgb(path, max_pixels, prepare_size)
            arrays.append(preprocess(rgb, spec.img_size, spec.mean, spec.std))
            stems.append(path.stem)
        except ImageLoadError as exc:
            tqdm.write(f"calibration skipped {path}: {exc.reason}", file=sys.stderr)
    if not arrays:
        raise FileNotFoundError(f"no readable calibration images in {folder}")
    if metadata is None:
        return np.stack(arrays)
    return {INPUT_NAME: np.stack(arrays), **_calibration_metadata(metadata, spec, stems)}


def _calibration_metadata(
    path: str | os.PathLike, spec: ModelSpec, stems: list[str]
) -> dict[str, np.ndarray]:
    """The metadata feed of the calibration images, with its summary line on stderr."""
    from raug.deploy.metadata import check_model_columns, read_metadata_csv

    check_model_columns(spec, f"the {spec.model_name} model")
    table = read_metadata_csv(path)
    meta, gaps = table.lookup(stems)
    for note in table.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"calibration {table.summary(gaps)}", file=sys.stderr)
    return {METADATA_INPUT: meta}


def random_inputs(spec: ModelSpec, num: int = 16, seed: int = 0) -> Inputs:
    """Standard-normal images of the model's shape (for comparisons without images), with
    metadata uniform in [0, 1) for a fused model."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num, 3, spec.img_size, spec.img_size)).astype(np.float32)
    if not spec.uses_metadata:
        return images
    meta = rng.random((num, len(spec.metadata_input["columns"])), dtype=np.float32)
    return onnx_feeds(spec, images, meta)


def compare_models(
    reference: str | os.PathLike, candidate: str | os.PathLike, inputs: Inputs
) -> tuple[float, float]:
    """Top-1 agreement and max absolute probability difference of two ONNX models.

    Args:
        reference: the fp32 model.
        candidate: e.g. its int8 version.
        inputs: ``(N, 3, S, S)`` float32 inputs, or feeds with the metadata too.

    Returns:
        ``(top1_agreement, max_prob_diff)``.
    """
    ref, cand = OnnxPredictor(reference), OnnxPredictor(candidate)
    batches = [(f[INPUT_NAME], f.get(METADATA_INPUT)) for f in _slices(inputs, 16)]
    p_ref = np.concatenate([ref.predict_probs(*batch) for batch in batches])
    p_cand = np.concatenate([cand.predict_probs(*batch) for batch in batches])
    agreement = float(np.mean(p_ref.argmax(axis=1) == p_cand.argmax(axis=1)))
    return agreement, float(np.abs(p_ref - p_cand).max())


def default_int8_path(fp32_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8.onnx")


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    calibration: Inputs | None = None,
    compare_inputs: Inputs | None = None,
    per_channel: bool = True,
) -> QuantizationReport:
    """Quantise an exported fp32 model to int8 and check it against the original.

    Args:
        fp32_path: model exported by :mod:`raug.deploy.export`.
        out_path: int8 destination (default :func:`default_int8_path`), written atomically.
        calibration: preprocessed calibration inputs -> static quantisation; ``None`` -> dynamic.
        compare_inputs: inputs for the agreement check (default: the calibration inputs, or 16
            random inputs for dynamic quantisation).
        per_channel: per-output-channel weight scales.

    Returns:
        Sizes and agreement with fp32.
    """
    fp32_path = Path(fp32_path)
    out_path = Path(out_path) if out_path is not None else default_int8_path(fp32_path)
    num_calibration = 0 if calibration is None else len(_as_feeds(calibration)[INPUT_NAME])
    fp32_meta = read_metadata(fp32_path)
    spec = OnnxPredictor(fp32_path).spec
    mode = "dynamic" if calibration is None else "static"
    with tempfile.TemporaryDirectory(prefix="ssdkd-quant-") as tmp_dir:
        raw_int8 = Path(tmp_dir) / "int8.onnx"
        if calibration is None:
            _ORT_QUANT.quantize_dynamic(
                fp32_path,
                raw_int8,
                per_channel=per_channel,
                weight_type=_ORT_QUANT.QuantType.QUInt8,
            )
        else:
            prepared = Path(tmp_dir) / "prepared.onnx"
            _quant_pre_process(fp32_path, prepared)
            softmax_nodes = [
                n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"
            ]
            _ORT_QUANT.quantize_static(
                prepared,
                raw_int8,
                ArrayCalibrationReader(calibration),
                quant_format=_ORT_QUANT.QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=_ORT_QUANT.QuantType.QUInt8,
                # uint8 weights: with int8 weights ONNX Runtime's x86 kernels without VNNI
                # (AVX2 only) saturate 16-bit sums; on an AVX2 EPYC top-1 agreement with fp32
                # fell to 47 % (84 % with uint8). VNNI, AVX-512 and ARM run uint8 correctly too.
                weight_type=_ORT_QUANT.QuantType.QUInt8,
                nodes_to_exclude=softmax_nodes,
            )
        model = onnx.load(str(raw_int8))
        info = {
            "mode": mode,
            "format": "QDQ" if mode == "static" else "QOperator (dynamic)",
            "activations": "uint8" if mode == "static" else "uint8 (dynamic range)",
            "weights": "uint8",
            "per_channel": per_channel,
            "num_calibration": num_calibration,
            "source_fp32_sha256": file_sha256(fp32_path),
        }
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, {**fp32_meta, "quantization": json.dumps(info)})
        onnx.checker.check_model(model)
        atomic_write_with(out_path, lambda tmp: onnx.save(model, str(tmp)))
    if compare_inputs is not None:
        compared_on = "given inputs"
    elif calibration is not None:
        compare_inputs, compared_on = calibration, "calibration images"
    else:
        compare_inputs, compared_on = random_inputs(spec), "random inputs"
    agreement, max_diff = compare_models(fp32_path, out_path, compare_inputs)
    return QuantizationReport(
        path=out_path,
        mode=mode,
        fp32_bytes=fp32_path.stat().st_size,
        int8_bytes=out_path.stat().st_size,
        num_calibration=info["num_calibration"],
        num_compared=len(_as_feeds(compare_inputs)[INPUT_NAME]),
        compared_on=compared_on,
        top1_agreement=agreement,
        max_prob_diff=max_diff,
    )
