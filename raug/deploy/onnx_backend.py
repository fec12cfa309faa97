"""Run exported ONNX models with onnxruntime (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from raug.deploy.spec import (
    INPUT_NAME,
    METADATA_INPUT,
    ModelSpec,
    SpecError,
    onnx_feeds,
    spec_from_metadata,
)

# What onnxruntime raises for unreadable or unsupported model files (none derive from a
# common base other than Exception).
_ORT_LOAD_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable), returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict, read with the ``onnx`` package.

    Prediction reads the metadata from its onnxruntime session instead and never needs
    ``onnx``; this helper serves export/quantisation tooling.

    Raises:
        SpecError: the file is missing or not a valid ONNX model (message names it).
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, RuntimeError, DecodeError) as exc:
        raise SpecError(f"{path} is not a readable ONNX model: {exc}") from exc
    # protobuf parses some garbage files without complaint; a graph without inputs is one.
    if not model.graph.input:
        raise SpecError(f"{path} is not a readable ONNX model (no graph inputs)")
    return {prop.key: prop.value for prop in model.metadata_props}


def providers_for(device: str) -> list[Any]:
    """onnxruntime execution providers for a device string.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).

    Returns:
        A providers list for ``ort.InferenceSession``.

    Raises:
        ValueError: unknown device string, or CUDA requested but not available.
    """
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"bad device {device!r}: expected cuda:N")
        if not has_cuda:
            raise ValueError(
                f"device {device!r} requested but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu or use --device cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")


def make_session(
    path: str | os.PathLike, device: str = "cpu", intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """Open an inference session.

    Args:
        path: the ONNX file.
        device: see :func:`providers_for`.
        intra_op_threads: onnxruntime intra-op threads (``None``: its default, all cores).

    Returns:
        The session.

    Raises:
        SpecError: missing or unloadable file (message names it).
    """
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    providers = providers_for(device)
    if not Path(path).is_file():
        raise SpecError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except _ORT_LOAD_ERRORS as exc:
        raise SpecError(f"{path} is not a loadable ONNX model: {exc}") from exc


class OnnxPredictor:
    """Probabilities from an ONNX file exported by :mod:`raug.deploy.export`.

    Args:
        path: the ``.onnx`` file (fp32 or int8).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        intra_op_threads: onnxruntime intra-op threads (``None``: default).
    """

    supports_explain = False

    def __init__(
        self, path: str | os.PathLike, device: str = "cpu", intra_op_threads: int | None = None
    ) -> None:
        self.path = Path(path)
        self.session = make_session(self.path, device, intra_op_threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.spec: ModelSpec = spec_from_metadata(meta, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        expected = [INPUT_NAME, METADATA_INPUT] if self.spec.uses_metadata else [INPUT_NAME]
        if inputs != expected:
            raise SpecError(f"{self.path}: expected input(s) {expected}, got {inputs}")

    def predict_probs(self, batch: np.ndarray, meta: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities for a preprocessed ``(N, 3, S, S)`` float32 batch (and its
        ``(N, M)`` float32 metadata, exactly when the model fuses them).

        Returns:
            ``(N, K)`` float32 probabilities (softmax applied here for ``logits`` models).
        """
        feeds = onnx_feeds(
            self.spec, batch.astype(np.float32), None if meta is None else meta.astype(np.float32)
        )
        (out,) = self.session.run([self.spec.output_name], feeds)
        return out.astype(np.float32) if self.spec.output_kind == "probs" else softmax(out)
