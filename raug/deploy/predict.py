"""Predict skin-lesion classes for image files with a checkpoint or an ONNX model.

``python tools/predict.py --model FILE(.pth|.onnx) --images PATH [PATH ...] --out preds.csv``
writes a CSV: by default ``image`` (image id), ``PRED`` (class code) and one probability
column per class in label order; with ``--format isic2019`` the ISIC 2019 challenge submission
(:mod:`raug.deploy.submission`). The model's own evaluation preprocessing is read from the
checkpoint or the ONNX metadata.

Before any image is read, every output path is checked (:mod:`raug.deploy.safety`): an output
never replaces an input, the model or a file in the image folder, replaces an existing file
only when this toolkit wrote it (or with ``--force``), and its folder must be writable. When
no image can be read, nothing is written.

A model that fuses patient metadata needs ``--metadata CSV`` (the official metadata format,
encoded exactly as preparation encodes it, see :mod:`raug.deploy.metadata`); without it the
command stops. An image-only model given ``--metadata`` also stops (it would silently ignore
the metadata the user meant it to use). Images without a metadata row, missing and unknown
values are counted in a summary line and, in the default format, named per image in a last
column ``metadata``.

This module imports torch only inside the ``.pth`` branch (:func:`load_predictor`), so ONNX
prediction runs where torch is not installed (and pandas only with ``--metadata``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from raug.deploy.filekind import (
    describe_file,
    is_tool_overlay,
    model_file_problem,
    overlay_path,
)
from raug.deploy.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREPARE_SIZE,
    ImageLoadError,
    collect_images,
    load_rgb,
)
from raug.deploy.preprocess import TTA_VIEWS, preprocess, tta_view
from raug.deploy.safety import (
    InputGuard,
    Output,
    OutputError,
    check_outputs,
    command_error,
    os_error_line,
    write_failure,
)
from raug.deploy.spec import AUTO_PREPARE_SIZE, ModelSpec, SpecError, resolve_prepare_size
from raug.deploy.submission import (
    DEFAULT_FORMAT,
    FORMATS,
    ISIC2019_FORMAT,
    image_ids,
    is_tool_csv,
    isic2019_class_index,
    render,
)
from raug.files.atomic import atomic_write_text

if TYPE_CHECKING:
    from raug.deploy.metadata import MetadataTable

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")

class Predictor(Protocol):
    """What :func:`predict_images` needs from a backend."""

    spec: ModelSpec
    supports_explain: bool

    def predict_probs(self, batch: np.ndarray, meta: np.ndarray | None = None) -> np.ndarray:
        """``(N, K)`` float32 probabilities for a preprocessed NCHW batch (and its metadata)."""
        ...


@dataclass
class PredictionResult:
    """Outcome of :func:`predict_images`.

    Attributes:
        names: image ids (see :func:`~raug.deploy.submission.image_ids`) of the predicted
            images, in input order.
        paths: their files.
        probs: ``(N, K)`` float32 probabilities.
        failed: ``(path, reason)`` for every skipped file.
        meta: ``(N, M)`` metadata fed with the images (``None``: image-only model).
        metadata_gaps: per image, what its metadata lacked (:mod:`raug.deploy.metadata`).
        metadata_notes: the metadata CSV's warnings, then the gap summary line.
    """

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    failed: list[tuple[Path, str]] = field(default_factory=list)
    meta: np.ndarray | None = None
    metadata_gaps: list[tuple[str, ...]] | None = None
    metadata_notes: list[str] = field(default_factory=list)


class NothingPredictedError(RuntimeError):
    """No input image could be read, so no CSV is written.

    Attributes:
        failed: ``(path, reason)`` of every input.
    """

    def __init__(self, failed: list[tuple[Path, str]], out: str | os.PathLike) -> None:
        self.failed = failed
        if len(failed) == 1:
            path, reason = failed[0]
            message = f"{path}: {reason}; no image could be read, nothing written to {out}"
        else:
            message = (
                f"none of the {len(failed)} input files could be read as an image; "
                f"nothing written to {out}"
            )
        super().__init__(message)


def load_predictor(model_path: str | os.PathLike, device: str = "cpu") -> Predictor:
    """Open a model for prediction, choosing the backend by file suffix.

    Args:
        model_path: a project checkpoint (``.pth``/``.pt``/``.ckpt``) or an ``.onnx`` export.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        A predictor exposing ``spec`` and ``predict_probs``.

    Raises:
        SpecError: unknown suffix, a file of another kind (the message says what it is), or a
            model without deployment information.
    """
    path = Path(model_path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from raug.deploy.onnx_backend import OnnxPredictor

        problem = model_file_problem(path, "onnx") if path.exists() else None
        if problem is not None:
            raise SpecError(problem)

        return OnnxPredictor(path, device=device)
    if suffix in TORCH_SUFFIXES:
        # Lazy on purpose: the ONNX path must work in an environment without torch.
        from raug.deploy.torch_backend import TorchPredictor

        return TorchPredictor(path, device=device)
    what = f" ({describe_file(path)})" if path.exists() else ""
    raise SpecError(
        f"{path}{what}: unknown model file type {suffix!r}; --model takes a training "
        f"checkpoint (.pth) or an export of tools/export.py (.onnx)"
    )


def predict_batch(
    predictor: Predictor, batch: np.ndarray, tta: bool = False, meta: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities for a preprocessed batch, averaged over the 8 dihedral views with ``tta``.

    Args:
        predictor: the backend.
        batch: ``(N, 3, S, S)`` float32 network inputs.
        tta: average over :data:`~raug.deploy.preprocess.TTA_VIEWS`.
        meta: ``(N, M)`` metadata of a fused model (every view shares its image's metadata).

    Returns:
        ``(N, K)`` float32 probabilities (rows sum to 1).
    """
    if not tta:
        return predictor.predict_probs(batch, meta)
    total = np.zeros((batch.shape[0], predictor.spec.num_classes), np.float64)
    for _name, turns, flip in TTA_VIEWS:
        total += predictor.predict_probs(tta_view(batch, turns, flip), meta)
    return (total / len(TTA_VIEWS)).astype(np.float32)


def predict_images(
    predictor: Predictor,
    paths: Sequence[Path],
    batch_size: int = 16,
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    prepare_size: int | str | None = AUTO_PREPARE_SIZE,
    ids: Sequence[str] | None = None,
    meta: np.ndarray | None = None,
) -> PredictionResult:
    """Predict every readable image; unreadable ones are skipped (and reported on stderr
    as they come while the progress bar is shown).

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
        ids: one image id per path (default: the file stems).
        meta: ``(len(paths), M)`` metadata, one row per path (fused models only).

    Returns:
        The predictions and the list of skipped files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [p.stem for p in paths] if ids is None else list(ids)
    spec = predictor.spec
    prepare_size = resolve_prepare_size(prepare_size, spec)
    result = PredictionResult()
    chunks: list[np.ndarray] = []
    pending: list[tuple[Path, str, np.ndarray, int]] = []
    rows: list[int] = []

    def flush() -> None:
        if pending:
            batch = np.stack([x for _, _, x, _ in pending])
            batch_meta = None if meta is None else meta[[row for *_, row in pending]]
            chunks.append(predict_batch(predictor, batch, tta, batch_meta))
            for path, name, _, row in pending:
                result.paths.append(path)
                result.names.append(name)
                rows.append(row)
            pending.clear()

    bar = tqdm(
        list(zip(paths, ids, strict=True)), desc="predict", unit="img", disable=not progress,
        file=sys.stderr,
    )
    for row, (path, name) in enumerate(bar):
        try:
            rgb = load_rgb(path, max_pixels=max_pixels, prepare_size=prepare_size)
        except ImageLoadError as exc:
            result.failed.append((path, exc.reason))
            if progress:  # live, between bar updates; without the bar main() lists them once
                tqdm.write(f"skipped {path}: {exc.reason}", file=sys.stderr)
            continue
        pending.append((path, name, preprocess(rgb, spec.img_size, spec.mean, spec.std), row))
        if len(pending) == batch_size:
            flush()
    flush()
    bar.close()
    if meta is not None:
        result.meta = meta[rows]
    if chunks:
        result.probs = np.concatenate(chunks).astype(np.float32)
    else:
        result.probs = np.zeros((0, spec.num_classes), np.float32)
    return result


def planned_outputs(
    out: str | os.PathLike, explain_dir: str | os.PathLike | None, ids: Sequence[str]
) -> list[Output]:
    """The files a prediction run will write: the CSV and, with ``--explain``, one overlay
    per image."""
    outputs = [Output(Path(out), "--out", "a predictions CSV", is_tool_csv)]
    if explain_dir is not None:
        outputs += [
            Output(overlay_path(explain_dir, name), "--explain", "a Grad-CAM overlay",
                   is_tool_overlay)
            for name in ids
        ]
    return outputs


def input_guard(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    paths: Sequence[Path],
    metadata: str | os.PathLike | None = None,
) -> InputGuard:
    """The inputs no output may replace: the model, the metadata CSV, every image, every
    image folder."""
    files = [("the model", Path(model)), *(("the input image", p) for p in paths)]
    if metadata is not None:
        files.append(("the metadata CSV", Path(metadata)))
    folders = [("the image folder", Path(p)) for p in images if Path(p).is_dir()]
    return InputGuard(files, folders)


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
    fmt: str = DEFAULT_FORMAT,
    unk_threshold: float | None = None,
    force: bool = False,
    metadata: str | os.PathLike | None = None,
) -> PredictionResult:
    """Predict ``images`` with ``model`` and write the CSV (and Grad-CAM overlays) atomically.

    The output paths are checked before anything is read (:mod:`raug.deploy.safety`), and
    nothing is written when no image could be read.

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
        fmt: ``"default"`` or ``"isic2019"`` (see :mod:`raug.deploy.submission`).
        unk_threshold: ISIC format only: UNK = 1 - max(p) below this top probability.
        force: replace existing files this toolkit did not write (never inputs).
        metadata: the images' metadata CSV (official format), for a model that fuses
            patient metadata; required for such a model, refused for an image-only one.

    Returns:
        The predictions, including the skipped files.

    Raises:
        SpecError: bad model file; ``--explain`` with an ONNX model; a fused model without
            ``metadata`` or an image-only one with it.
        FileNotFoundError: an image path does not exist.
        OutputError: a refused or unwritable output path.
        ValueError: clashing image ids, a model without ISIC classes for ``isic2019``.
        NothingPredictedError: no image could be read (nothing is written).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS}")
    if unk_threshold is not None and fmt != ISIC2019_FORMAT:
        raise ValueError("--unk-threshold applies to --format isic2019 only (the UNK column)")
    paths = collect_images(images)
    if not paths:
        raise FileNotFoundError(f"no image files found in {[str(p) for p in images]}")
    ids = image_ids(paths, keep_extension=fmt == DEFAULT_FORMAT)
    guard = input_guard(model, images, paths, metadata)
    check_outputs(planned_outputs(out, explain_dir, ids), guard, force)
    predictor = load_predictor(model, device=device)
    check_metadata_option(predictor.spec, model, metadata)
    prepare_size = resolve_prepare_size(prepare_size, predictor.spec)
    if explain_dir is not None and not predictor.supports_explain:
        raise SpecError(
            f"--explain needs a PyTorch checkpoint (.pth): Grad-CAM differentiates through the "
            f"network, which an ONNX inference session ({model}) cannot do"
        )
    if fmt == ISIC2019_FORMAT:
        isic2019_class_index(predictor.spec.class_names)  # refuse before predicting
    table = _read_metadata(metadata)
    # Matched by file stem, the ISIC image id (the default format's ids may keep extensions).
    meta, gaps = table.lookup([path.stem for path in paths]) if table else (None, None)
    result = predict_images(
        predictor, paths, batch_size, tta, max_pixels, progress, prepare_size, ids, meta
    )
    if not result.names:
        raise NothingPredictedError(result.failed, out)
    if table is not None:
        by_path = dict(zip(paths, gaps, strict=True))
        result.metadata_gaps = [by_path[path] for path in result.paths]
        result.metadata_notes = [*table.warnings, table.summary(result.metadata_gaps)]
    text = render(fmt, result.names, result.probs, predictor.spec.class_names, unk_threshold,
                  result.metadata_gaps)
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        raise OutputError(write_failure(out, exc)) from exc
    if explain_dir is not None:
        try:
            predictor.explain(  # type: ignore[attr-defined]
                result.paths,
                result.probs.argmax(axis=1),
                explain_dir,
                max_pixels=max_pixels,
                progress=progress,
                prepare_size=prepare_size,
                names=result.names,
                meta=result.meta,
            )
        except OSError as exc:
            raise OutputError(write_failure(exc.filename or explain_dir, exc)) from exc
    return result


def check_metadata_option(
    spec: ModelSpec, model: str | os.PathLike, metadata: str | os.PathLike | None
) -> None:
    """A fused model needs ``--metadata``; an image-only model would ignore it: refuse both.

    Raises:
        SpecError: one line naming the model and what to do.
    """
    if spec.uses_metadata and metadata is None:
        columns = ", ".join(spec.metadata_input.get("columns", ()))
        raise SpecError(
            f"{model} fuses patient metadata ({spec.fusion.get('method')}: {columns}): give "
            "--metadata CSV in the official format (columns image, age_approx, "
            "anatom_site_general, sex)"
        )
    if not spec.uses_metadata and metadata is not None:
        raise SpecError(
            f"--metadata {metadata}: {model} is an image-only model (no metadata fusion) and "
            "would ignore it; drop --metadata or use a model trained with _use_meta_data=True"
        )
    if metadata is not None:
        from raug.deploy.metadata import check_model_columns

        check_model_columns(spec, str(model))


def _read_metadata(metadata: str | os.PathLike | None) -> MetadataTable | None:
    """The encoded metadata CSV (``None`` without one)."""
    if metadata is None:
        return None
    # Lazy: pandas (through the preparation code) only when metadata is used.
    from raug.deploy.metadata import read_metadata_csv

    return read_metadata_csv(metadata)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``tools/predict.py``."""
    parser = argparse.ArgumentParser(
        description="Predict skin-lesion classes; writes a CSV (image, PRED, one probability "
        "column per class), or with --format isic2019 the ISIC 2019 challenge submission.",
    )
    parser.add_argument("--model", required=True, help="project checkpoint (.pth) or .onnx export")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument(
        "--out", required=True,
        help="CSV to write (never an input, the model or a path inside an image folder; an "
        "existing file only when this tool wrote it, or with --force)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=DEFAULT_FORMAT, dest="fmt",
        help="default: image, PRED, one column per class in the model's order; isic2019: "
        "image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (ids without extension)",
    )
    parser.add_argument(
        "--unk-threshold", type=parse_unit_interval, default=None, metavar="T",
        help="isic2019 only: UNK = 1 - max(p) for images whose top probability is below T "
        "(a simple out-of-distribution rule; default: UNK = 0)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace an existing --out / overlay file this tool did not write (never an input)",
    )
    parser.add_argument(
        "--tta", action="store_true",
        help="average probabilities over the 8 dihedral views (4 rotations x optional flip)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--explain", metavar="DIR", help="write Grad-CAM overlays here (.pth only)")
    parser.add_argument(
        "--metadata", metavar="CSV",
        help="patient metadata for models that fuse it, in the official ISIC 2019 format "
        "(image, age_approx, anatom_site_general, sex); encoded as preparation does, images "
        "matched by file stem; required for such models, refused for image-only ones",
    )
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


def parse_unit_interval(text: str) -> float:
    """``--unk-threshold`` values: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


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
        0 when every image was predicted, 1 when some were skipped, 2 on a fatal error
        (including: no image could be read, an output refused or not writable).
    """
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    # PIL warns above its own global limit before our check runs; align the two for the run.
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    try:
        result = run(
            args.model, args.images, args.out, tta=args.tta, batch_size=args.batch_size,
            device=args.device, explain_dir=args.explain, max_pixels=args.max_pixels,
            progress=progress, prepare_size=args.prepare_size, fmt=args.fmt,
            unk_threshold=args.unk_threshold, force=args.force, metadata=args.metadata,
        )
    except NothingPredictedError as exc:
        if not progress and len(exc.failed) > 1:
            _print_skipped(exc.failed)
        return command_error(str(exc))
    except OSError as exc:
        return command_error(os_error_line(exc))
    except (SpecError, ValueError, RuntimeError) as exc:
        return command_error(str(exc))
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    print(
        f"predicted {len(result.names)} image(s) -> {args.out}"
        + (f"; skipped {len(result.failed)} unreadable file(s)" if result.failed else ""),
        file=sys.stderr,
    )
    for note in result.metadata_notes[:-1]:
        print(f"warning: {note}", file=sys.stderr)
    if result.metadata_notes:
        print(result.metadata_notes[-1], file=sys.stderr)
    if not progress:  # with the bar they were reported as they came
        _print_skipped(result.failed)
    return 1 if result.failed else 0


def _print_skipped(failed: Sequence[tuple[Path, str]]) -> None:
    for path, reason in failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)

