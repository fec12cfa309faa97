"""Predict skin-lesion classes for image files with a checkpoint or an ONNX model.

``python tools/predict.py --model FILE(.pth|.onnx) --images PATH [PATH ...] --out preds.csv``
writes an ISIC-submission-style CSV: ``image`` (file stem), ``PRED`` (class code) and one
probability column per class in label order. The model's own evaluation preprocessing is read
from the checkpoint or the ONNX metadata.

This module imports torch only inside the ``.pth`` branch (:func:`load_predictor`), so ONNX
prediction runs where torch is not installed.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from raug.atomic import atomic_write_text
from raug.deploy.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREPARE_SIZE,
    ImageLoadError,
    collect_images,
    load_rgb,
)
from raug.deploy.preprocess import TTA_VIEWS, preprocess, tta_view
from raug.deploy.spec import ModelSpec, SpecError

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")

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


class Predictor(Protocol):
    """What :func:`predict_images` needs from a backend."""

    spec: ModelSpec
    supports_explain: bool

    def predict_probs(self, batch: np.ndarray) -> np.ndarray:
        """``(N, K)`` float32 probabilities for a preprocessed NCHW batch."""
        ...


@dataclass
class PredictionResult:
    """Outcome of :func:`predict_images`.

    Attributes:
        names: image ids (file stems) of the predicted images, in input order.
        paths: their files.
        probs: ``(N, K)`` float32 probabilities.
        failed: ``(path, reason)`` for every skipped file.
    """

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    failed: list[tuple[Path, str]] = field(default_factory=list)


def load_predictor(model_path: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Open a model for prediction, choosing the backend by file suffix.

    Args:
        model_path: a project checkpoint (``.pth``/``.pt``/``.ckpt``) or an ``.onnx`` export.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        A predictor exposing ``spec`` and ``predict_probs``.

    Raises:
        SpecError: unknown suffix or a model without deployment information.
    """
    path = Path(model_path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from raug.deploy.onnx_backend import OnnxPredictor

        return OnnxPredictor(path, device=device)
    if suffix in TORCH_SUFFIXES:
        # Lazy on purpose: the ONNX path must work in an environment without torch.
        from raug.deploy.torch_backend import TorchPredictor

        return TorchPredictor(path, device=device)
    raise SpecError(f"{path}: unknown model file type {suffix!r} (use .onnx or .pth)")


def predict_batch(predictor: Predictor, batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities for a preprocessed batch, averaged over the 8 dihedral views with ``tta``.

    Args:
        predictor: the backend.
        batch: ``(N, 3, S, S)`` float32 network inputs.
        tta: average over :data:`~raug.deploy.preprocess.TTA_VIEWS`.

    Returns:
        ``(N, K)`` float32 probabilities (rows sum to 1).
    """
    if not tta:
        return predictor.predict_probs(batch)
    total = np.zeros((batch.shape[0], predictor.spec.num_classes), np.float64)
    for _name, turns, flip in TTA_VIEWS:
        total += predictor.predict_probs(tta_view(batch, turns, flip))
    return (total / len(TTA_VIEWS)).astype(np.float32)


def predict_images(
    predictor: Predictor,
    paths: Sequence[Path],
    batch_size: int = 16,
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    prepare_size: int | str | None = AUTO_PREPARE_SIZE,
) -> PredictionResult:
    """Predict every readable image; unreadable ones are reported on stderr and skipped.

    Args:
        predictor: the backend.
        paths: image files.
        batch_size: images per forward pass.
        tta: average over the 8 dihedral views.
        max_pixels: decompression-bomb limit per image.
        progress: show a tqdm bar (on stderr).
        prepare_size: shrink larger images like the data preparation first (shorter side
            in px, see :func:`~raug.deploy.images.load_rgb`); ``None``: do not; ``"auto"``:
            as the model's training data (:func:`resolve_prepare_size`).

    Returns:
        The predictions and the list of skipped files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = predictor.spec
    prepare_size = resolve_prepare_size(prepare_size, spec)
    result = PredictionResult()
    chunks: list[np.ndarray] = []
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if pending:
            batch = np.stack([x for _, x in pending])
            chunks.append(predict_batch(predictor, batch, tta))
            for path, _ in pending:
                result.paths.append(path)
                result.names.append(path.stem)
            pending.clear()

    bar = tqdm(paths, desc="predict", unit="img", disable=not progress, file=sys.stderr)
    for path in bar:
        try:
            rgb = load_rgb(path, max_pixels=max_pixels, prepare_size=prepare_size)
        except ImageLoadError as exc:
            result.failed.append((path, exc.reason))
            tqdm.write(f"skipped {path}: {exc.reason}", file=sys.stderr)
            continue
        pending.append((path, preprocess(rgb, spec.img_size, spec.mean, spec.std)))
        if len(pending) == batch_size:
            flush()
    flush()
    bar.close()
    if chunks:
        result.probs = np.concatenate(chunks).astype(np.float32)
    else:
        result.probs = np.zeros((0, spec.num_classes), np.float32)
    return result


def predictions_csv(names: Sequence[str], probs: np.ndarray, class_names: Sequence[str]) -> str:
    """Render predictions as ISIC-submission CSV text.

    Columns: ``image``, ``PRED`` (class code of the arg-max), one probability column per class
    in label order (8 decimals).

    Args:
        names: image ids.
        probs: ``(N, K)`` probabilities.
        class_names: class codes in label order.

    Returns:
        The CSV text (header line included, ``\\n`` line ends).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "PRED", *class_names])
    for name, row in zip(names, probs, strict=True):
        writer.writerow([name, class_names[int(np.argmax(row))], *(f"{p:.8f}" for p in row)])
    return buf.getvalue()


def _warn_duplicate_ids(result: PredictionResult) -> None:
    first: dict[str, Path] = {}
    for name, path in zip(result.names, result.paths, strict=True):
        if name in first:
            print(f"warning: image id {name!r} used by {first[name]} and {path}", file=sys.stderr)
        else:
            first[name] = path


def run(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tta: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
    explain_dir: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    prepare_size: int | str | None = AUTO_PREPARE_SIZE,
) -> PredictionResult:
    """Predict ``images`` with ``model`` and write the CSV (and Grad-CAM overlays) atomically.

    Args:
        model: ``.pth`` checkpoint or ``.onnx`` export.
        images: files and/or folders (searched recursively).
        out: CSV destination.
        tta: average over the 8 dihedral views.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        explain_dir: write ``<stem>_gradcam.png`` overlays here (PyTorch models only).
        max_pixels: decompression-bomb limit per image.
        progress: show progress bars.
        prepare_size: shrink larger images like the data preparation first (``None``: not;
            ``"auto"``: as the model's training data, see :func:`resolve_prepare_size`).

    Returns:
        The predictions, including the skipped files.

    Raises:
        SpecError: bad model file; ``--explain`` with an ONNX model.
        FileNotFoundError: an image path does not exist.
    """
    predictor = load_predictor(model, device=device)
    prepare_size = resolve_prepare_size(prepare_size, predictor.spec)
    if explain_dir is not None and not predictor.supports_explain:
        raise SpecError(
            f"--explain needs a PyTorch checkpoint (.pth): Grad-CAM differentiates through the "
            f"network, which an ONNX inference session ({model}) cannot do"
        )
    paths = collect_images(images)
    if not paths:
        raise FileNotFoundError(f"no image files found in {[str(p) for p in images]}")
    result = predict_images(predictor, paths, batch_size, tta, max_pixels, progress, prepare_size)
    _warn_duplicate_ids(result)
    atomic_write_text(out, predictions_csv(result.names, result.probs, predictor.spec.class_names))
    if explain_dir is not None and result.names:
        predictor.explain(  # type: ignore[attr-defined]
            result.paths,
            result.probs.argmax(axis=1),
            explain_dir,
            max_pixels=max_pixels,
            progress=progress,
            prepare_size=prepare_size,
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``tools/predict.py``."""
    parser = argparse.ArgumentParser(
        description="Predict skin-lesion classes; writes an ISIC-submission-style CSV "
        "(image, PRED, one probability column per class).",
    )
    parser.add_argument("--model", required=True, help="project checkpoint (.pth) or .onnx export")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument(
        "--tta", action="store_true",
        help="average probabilities over the 8 dihedral views (4 rotations x optional flip)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--explain", metavar="DIR", help="write Grad-CAM overlays here (.pth only)")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images as decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--prepare-size", type=parse_prepare_size, default=AUTO_PREPARE_SIZE, metavar="PX|none|auto",
        help="first shrink larger images to this shorter side like run_preprocess.sh did for the "
        "training images (default auto: the size recorded with the model, else "
        f"{DEFAULT_PREPARE_SIZE}; 'none' to feed them as they are)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def parse_prepare_size(text: str) -> int | str | None:
    """``--prepare-size`` values: a positive int, ``none``/``0`` to switch it off, or ``auto``."""
    if text.strip().lower() == AUTO_PREPARE_SIZE:
        return AUTO_PREPARE_SIZE
    if text.strip().lower() in ("none", "0", "original"):
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a pixel count, 'none' or 'auto', got {text!r}"
        ) from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive pixel count, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/predict.py``.

    Returns:
        0 when every image was predicted, 1 when some were skipped, 2 on a fatal error.
    """
    args = build_parser().parse_args(argv)
    # PIL warns above its own global limit before our check runs; align the two for the run.
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    try:
        result = run(
            args.model, args.images, args.out, tta=args.tta, batch_size=args.batch_size,
            device=args.device, explain_dir=args.explain, max_pixels=args.max_pixels,
            progress=not args.no_progress, prepare_size=args.prepare_size,
        )
    except (SpecError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    print(
        f"predicted {len(result.names)} image(s) -> {args.out}"
        + (f"; skipped {len(result.failed)} unreadable file(s)" if result.failed else ""),
        file=sys.stderr,
    )
    for path, reason in result.failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 1 if result.failed else 0
