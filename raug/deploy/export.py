"""Export project checkpoints to ONNX (and TorchScript), verified against PyTorch.

``python tools/export.py --checkpoint CKPT --out FILE.onnx`` rebuilds the network from the
self-describing checkpoint and exports it with ``torch.onnx.export(..., dynamo=True)`` (the
torch.export-based exporter, the default since torch 2.9; ``--exporter legacy`` selects the
deprecated TorchScript-based one). The graph has one input ``input`` of shape
``(batch, 3, S, S)`` (NCHW, RGB, float32, normalised; ``batch`` is dynamic) and one output,
by default ``probs`` (softmax probabilities), with ``--output logits`` the raw ``logits``.
A network that fuses patient metadata has a second input ``metadata`` of shape
``(batch, M)`` (float32, the prepared columns in order, named in the file's metadata).
The metadata contract is in :mod:`raug.deploy.spec`.

Every file is written to a temporary name, checked (``onnx.checker``), verified against the
PyTorch model in onnxruntime on random batches of 1 and 3 (max abs difference must stay
<= ``tol``, default 1e-4; for ``logits`` relative to the logit scale, see
:func:`output_difference`) and only then moved into place: a failed export leaves nothing.
Tracing and verification run on the CPU in float32 on purpose -- the artefact is
device-independent, and the 1e-4 comparison needs reference numbers computed with the same
arithmetic as onnxruntime's CPU provider.

Before the checkpoint is loaded, the output paths are checked (:mod:`raug.deploy.safety`):
no output is the checkpoint or lies in the calibration folder, no two outputs coincide, an
existing file is replaced only when it is an ONNX / TorchScript file of this toolkit (or with
``--force``), and every output folder is writable.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import models
from raug.deploy.filekind import TORCHSCRIPT_META, is_deploy_onnx, is_deploy_torchscript
from raug.deploy.images import DEFAULT_PREPARE_SIZE
from raug.deploy.onnx_backend import make_session, read_metadata
from raug.deploy.predict import parse_prepare_size
from raug.deploy.safety import InputGuard, Output, check_outputs, command_error, os_error_line
from raug.deploy.spec import (
    AUTO_PREPARE_SIZE,
    INPUT_NAME,
    METADATA_INPUT,
    OUTPUT_KINDS,
    ModelSpec,
    SpecError,
    onnx_feeds,
    spec_from_metadata,
    spec_to_metadata,
)
from raug.deploy.torch_backend import load_model
from raug.files.atomic import atomic_write_with
from raug.files.checkpoint import CheckpointError

DEFAULT_TOL = 1e-4
VERIFY_BATCHES = (1, 3)


class ExportError(RuntimeError):
    """The exported model is invalid or disagrees with PyTorch beyond the tolerance."""


class DeployHead(nn.Module):
    """The network plus its output convention (softmax probabilities or raw logits).

    Args:
        model: a project model returning logits.
        output_kind: ``"probs"`` or ``"logits"``.
    """

    def __init__(self, model: nn.Module, output_kind: str = "probs") -> None:
        super().__init__()
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        self.model = model
        self.output_kind = output_kind

    @property
    def meta_features(self) -> int:
        """M, the width of the metadata input (0: image only)."""
        fusion = getattr(self.model, "fusion", models.FusionSpec())
        return fusion.meta_features if fusion.uses_metadata else 0

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, K)`` probabilities or logits (``meta`` (N, M) exactly when fused)."""
        logits = self.model(x, meta)
        return torch.softmax(logits, dim=1) if self.output_kind == "probs" else logits

    def example_inputs(self, img_size: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Zeros of the network's input shapes: ``(images,)`` or ``(images, metadata)``."""
        images = torch.zeros(batch, 3, img_size, img_size)
        return (images, torch.zeros(batch, self.meta_features)) if self.meta_features else (images,)

    def input_names(self) -> list[str]:
        """The ONNX input names, in :meth:`forward`'s order."""
        return [INPUT_NAME, METADATA_INPUT] if self.meta_features else [INPUT_NAME]


def _cpu_head(model: nn.Module, output_kind: str) -> DeployHead:
    # A copy, so exporting never moves the caller's model off its device.
    return DeployHead(copy.deepcopy(model).cpu().float(), output_kind).eval()


def _verify_inputs(
    img_size: int, meta_features: int = 0, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Random images (standard normal) and, for fused networks, metadata in [0, 1)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, 3, img_size, img_size)).astype(np.float32),
         rng.random((n, meta_features), dtype=np.float32) if meta_features else None)
        for n in VERIFY_BATCHES
    ]


def _reference(
    head: DeployHead, inputs: Sequence[tuple[np.ndarray, np.ndarray | None]]
) -> list[np.ndarray]:
    with torch.inference_mode():
        return [head(*(torch.from_numpy(a) for a in pair if a is not None)).numpy()
                for pair in inputs]


def onnx_proto(
    head: DeployHead, img_size: int, opset: int | None = None, dynamo: bool = True
) -> onnx.ModelProto:
    """Trace ``head`` into an ONNX model with a dynamic batch axis (no metadata_props yet).

    Fused networks get a second input, the patient metadata, with the same batch axis.

    Args:
        head: the CPU model with its output convention.
        img_size: square input side.
        opset: ONNX opset (``None``: the exporter's default, 20 for the dynamo exporter in
            torch 2.14, 17 for the legacy one).
        dynamo: use the torch.export-based exporter (else the legacy TorchScript one).

    Returns:
        The ONNX model.
    """
    example = head.example_inputs(img_size)
    names = {"input_names": head.input_names(), "output_names": [head.output_kind]}
    if dynamo:
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings():
            # Two inputs share the batch axis; the exporter says it names it only once.
            warnings.filterwarnings("ignore", "# The axis name: batch will not be used")
            program = torch.onnx.export(
                head, example, None, dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=tuple({0: batch} for _ in example), **names,
            )
        return program.model_proto
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*names["input_names"], head.output_kind]}
    with warnings.catch_warnings():
        # The legacy exporter is deprecated; the user asked for it explicitly.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The fusion's shape check on the metadata reads sizes; verification on batches of
        # 1 and 3 shows the trace generalises.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"models\.fusion")
        torch.onnx.export(
            head, example, buf, dynamo=False, opset_version=opset or 17, dynamic_axes=axes,
            **names,
        )
    return onnx.load_from_string(buf.getvalue())


def output_difference(out: np.ndarray, ref: np.ndarray, output_kind: str) -> float:
    """The verification metric: max abs difference, on the logit scale for ``logits``.

    Probabilities live in [0, 1], so an absolute difference is meaningful as is. Logits have
    no fixed scale (float32 rounding grows with their magnitude), so for them the difference
    is divided by ``max(1, max |ref|)``.
    """
    diff = float(np.abs(out - ref).max())
    if output_kind == "logits":
        diff /= max(1.0, float(np.abs(ref).max()))
    return diff


def verify_onnx(
    path: str | os.PathLike,
    head: DeployHead,
    img_size: int,
    tol: float = DEFAULT_TOL,
    label: str | os.PathLike | None = None,
) -> float:
    """Compare onnxruntime (CPU) with PyTorch on random batches of 1 and 3 (with random
    metadata for a fused network, fed as the file's own metadata_props say).

    Args:
        path: the ONNX file.
        head: the PyTorch reference (CPU, eval mode).
        img_size: input side.
        tol: allowed :func:`output_difference`.
        label: name of the model in error messages (default: ``path``).

    Returns:
        The worst :func:`output_difference`.

    Raises:
        ExportError: the difference exceeds ``tol`` or the output shape is wrong.
    """
    label = label or path
    inputs = _verify_inputs(img_size, head.meta_features)
    session = make_session(path, "cpu")
    spec = spec_from_metadata(read_metadata(path), str(label))
    worst = 0.0
    for (x, meta), ref in zip(inputs, _reference(head, inputs), strict=True):
        (out,) = session.run([head.output_kind], onnx_feeds(spec, x, meta))
        if out.shape != ref.shape:
            raise ExportError(
                f"{label}: output shape {out.shape} for input {x.shape}, want {ref.shape}"
            )
        worst = max(worst, output_difference(out, ref, head.output_kind))
    if not worst <= tol:
        raise ExportError(f"{label}: onnxruntime differs from PyTorch by {worst:.3e} > {tol:.0e}")
    return worst


def export_onnx(
    model: nn.Module,
    spec: ModelSpec,
    out: str | os.PathLike,
    opset: int | None = None,
    dynamo: bool = True,
    tol: float = DEFAULT_TOL,
) -> float:
    """Export, check, verify and atomically write an ONNX model with its metadata.

    Args:
        model: the project model (any device; a CPU copy is exported).
        spec: its spec; ``spec.output_kind`` selects probabilities or logits.
        out: destination ``.onnx``.
        opset: ONNX opset (``None``: exporter default).
        dynamo: torch.export-based exporter (default) or the legacy one.
        tol: maximum allowed abs difference to PyTorch.

    Returns:
        The worst :func:`output_difference` found during verification.

    Raises:
        ExportError: checker failure or disagreement beyond ``tol`` (nothing is written).
    """
    head = _cpu_head(model, spec.output_kind)
    proto = onnx_proto(head, spec.img_size, opset, dynamo)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, spec_to_metadata(spec))
    proto.doc_string = f"{spec.model_name} skin-lesion classifier ({spec.output_kind} output)"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph for {out} fails onnx.checker: {exc}") from exc
    result: dict[str, float] = {}

    def write_and_verify(tmp: Path) -> None:
        onnx.save(proto, str(tmp))
        result["diff"] = verify_onnx(tmp, head, spec.img_size, tol, label=out)

    atomic_write_with(out, write_and_verify)
    return result["diff"]


def export_torchscript(
    model: nn.Module, spec: ModelSpec, out: str | os.PathLike, tol: float = DEFAULT_TOL
) -> float:
    """Trace to TorchScript (metadata in the extra file ``ssdkd_deploy.json``), verify, write.

    Returns:
        :func:`output_difference` between the reloaded TorchScript module and eager PyTorch.

    Raises:
        ExportError: disagreement beyond ``tol`` (nothing is written).
    """
    head = _cpu_head(model, spec.output_kind)
    extra = {TORCHSCRIPT_META: json.dumps(spec_to_metadata(spec))}
    result: dict[str, float] = {}

    def write_and_verify(tmp: Path) -> None:
        with torch.no_grad():
            # check_trace=False: the reloaded file is compared with eager PyTorch below anyway.
            traced = torch.jit.trace(head, head.example_inputs(spec.img_size), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files=extra)
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        inputs = _verify_inputs(spec.img_size, head.meta_features)
        worst = 0.0
        with torch.no_grad():
            for pair, ref in zip(inputs, _reference(head, inputs), strict=True):
                out = loaded(*(torch.from_numpy(a) for a in pair if a is not None)).numpy()
                worst = max(worst, output_difference(out, ref, spec.output_kind))
        if not worst <= tol:
            raise ExportError(f"{out}: TorchScript differs from PyTorch by {worst:.3e} > {tol:.0e}")
        result["diff"] = worst

    with warnings.catch_warnings():
        # torch.jit is deprecated (FutureWarning) in torch 2.14; TorchScript was asked for.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        atomic_write_with(out, write_and_verify)
    return result["diff"]


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``tools/export.py``."""
    parser = argparse.ArgumentParser(
        description="Export a project checkpoint to ONNX (optionally int8 and TorchScript), "
        "verified against PyTorch."
    )
    parser.add_argument("--checkpoint", required=True, help="project checkpoint (.pth)")
    parser.add_argument(
        "--out", required=True,
        help="ONNX file to write (never the checkpoint; an existing file only when this tool "
        "wrote it, or with --force)",
    )
    parser.add_argument(
        "--output", choices=OUTPUT_KINDS, default="probs",
        help="graph output: softmax probabilities (default) or logits",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    parser.add_argument(
        "--exporter", choices=("dynamo", "legacy"), default="dynamo",
        help="torch.export-based exporter (default) or the deprecated TorchScript-based one",
    )
    parser.add_argument("--torchscript", metavar="FILE.pt", help="also write a traced TorchScript")
    parser.add_argument("--quantize", choices=("int8",), help="also write an int8 model")
    parser.add_argument(
        "--calibration", metavar="IMAGE_DIR",
        help="images for static int8 calibration (without: dynamic quantisation)",
    )
    parser.add_argument(
        "--calibration-metadata", metavar="CSV",
        help="models with metadata fusion: the calibration images' metadata in the official "
        "format (e.g. ISIC_2019_Training_Metadata.csv), encoded as tools/predict.py --metadata",
    )
    parser.add_argument(
        "--calibration-limit", type=int, default=256, help="max calibration images (default 256)"
    )
    parser.add_argument("--int8-out", help="int8 destination (default: <out stem>.int8.onnx)")
    parser.add_argument(
        "--prepare-size", type=parse_prepare_size, default=AUTO_PREPARE_SIZE, metavar="PX|none|auto",
        help="shrink calibration images like prediction does (default auto: the size recorded "
        f"with the model, else {DEFAULT_PREPARE_SIZE}; 'none' to keep them)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace existing output files this tool did not write (never the checkpoint)",
    )
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="max abs diff (default 1e-4)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def planned_outputs(
    out: str | os.PathLike,
    torchscript: str | os.PathLike | None,
    int8_out: Path | None,
    int8_label: str = "--int8-out",
) -> list[Output]:
    """The files an export will write, with how to recognise this toolkit's own versions."""
    outputs = [Output(Path(out), "--out", "an ONNX model", is_deploy_onnx)]
    if torchscript:
        outputs.append(
            Output(Path(torchscript), "--torchscript", "a TorchScript module", is_deploy_torchscript)
        )
    if int8_out is not None:
        outputs.append(Output(int8_out, int8_label, "an ONNX model", is_deploy_onnx))
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/export.py``.

    Returns:
        0 on success, 1 when a verification failed, 2 on bad input.
    """
    from raug.deploy.quantize import calibration_inputs, default_int8_path, quantize_onnx

    args = build_parser().parse_args(argv)
    if args.calibration and not args.quantize:
        return command_error("--calibration needs --quantize int8")
    if args.calibration_metadata and not args.calibration:
        return command_error("--calibration-metadata needs --calibration IMAGE_DIR")
    int8_out = None
    if args.quantize:
        int8_out = Path(args.int8_out) if args.int8_out else default_int8_path(args.out)
    folders = [("the calibration folder", Path(args.calibration))] if args.calibration else []
    files = [("the checkpoint", Path(args.checkpoint))]
    if args.calibration_metadata:
        files.append(("the calibration metadata", Path(args.calibration_metadata)))
    guard = InputGuard(files, folders)
    try:
        int8_label = "--int8-out" if args.int8_out else "the int8 output (--int8-out to rename)"
        outputs = planned_outputs(args.out, args.torchscript, int8_out, int8_label)
        check_outputs(outputs, guard, args.force)
        model, spec = load_model(args.checkpoint, "cpu", output_kind=args.output)
        n_params = sum(p.numel() for p in model.parameters())
        fused = f", metadata fusion {dict(spec.fusion)}" if spec.uses_metadata else ""
        print(
            f"checkpoint {args.checkpoint}: {spec.model_name}, {n_params:,} parameters, "
            f"{spec.num_classes} classes {list(spec.class_names)}, {spec.img_size} px{fused}",
            file=sys.stderr,
        )
        print(f"exporting ONNX ({args.exporter} exporter) ...", file=sys.stderr)
        diff = export_onnx(
            model, spec, args.out, args.opset, dynamo=args.exporter == "dynamo", tol=args.tol
        )
        print(
            f"wrote {args.out} ({Path(args.out).stat().st_size:,} B, output={spec.output_kind}); "
            f"onnxruntime vs PyTorch max abs diff {diff:.2e} (batches {VERIFY_BATCHES})",
            file=sys.stderr,
        )
        if args.torchscript:
            ts_diff = export_torchscript(model, spec, args.torchscript, tol=args.tol)
            print(
                f"wrote {args.torchscript}; TorchScript vs PyTorch max abs diff {ts_diff:.2e}",
                file=sys.stderr,
            )
        if args.quantize:
            calib = None
            if args.calibration:
                calib = calibration_inputs(
                    args.calibration, spec, args.calibration_limit,
                    progress=not args.no_progress, prepare_size=args.prepare_size,
                    metadata=args.calibration_metadata,
                )
            report = quantize_onnx(args.out, int8_out, calib)
            print(report.summary(), file=sys.stderr)
    except ExportError as exc:
        return command_error(f"verification failed: {exc}", status=1)
    except (CheckpointError, SpecError, ValueError) as exc:
        return command_error(str(exc))
    except OSError as exc:  # e.g. the file system turned read-only after the checks
        return command_error(os_error_line(exc))
    return 0
