"""Project checkpoints as ready-to-run PyTorch models (prediction and Grad-CAM backend)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import models
from raug.deploy.filekind import model_file_problem, overlay_path
from raug.deploy.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_rgb
from raug.deploy.preprocess import preprocess
from raug.deploy.spec import ModelSpec, SpecError, onnx_feeds, spec_from_checkpoint
from raug.files.checkpoint import load_checkpoint
from raug.train.device import resolve_device


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", output_kind: str = "probs"
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the network of a project checkpoint in eval mode.

    Args:
        path: checkpoint written by :func:`raug.files.checkpoint.save_checkpoint`.
        device: where to put the model.
        output_kind: recorded in the spec (``"probs"`` or ``"logits"``).

    Returns:
        ``(model, spec)``.

    Raises:
        raug.files.checkpoint.CheckpointError: missing/corrupt/unsafe file (names it).
        SpecError: not self-describing, or an unknown architecture (names file and value),
            or a file of another kind (a CSV, an image, an ONNX export...; names what it is).
    """
    path = Path(path)
    # torch calls every non-pickle "a pickle that may execute code"; say what it really is.
    problem = model_file_problem(path, "checkpoint") if path.exists() else None
    if problem is not None:
        raise SpecError(problem)
    ckpt = load_checkpoint(path, map_location="cpu")
    fusion = checkpoint_fusion(ckpt)
    spec = spec_from_checkpoint(ckpt, path, output_kind, fusion.to_dict())
    try:
        model = models.create_model(spec.model_name, spec.num_classes, pretrained=False,
                                    fusion=fusion)
    except (KeyError, ValueError) as exc:
        raise SpecError(
            f"checkpoint {path}: unknown architecture model_name={spec.model_name!r} ({exc})"
        ) from exc
    try:
        models.load_weights(model, ckpt["model_state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise SpecError(
            f"checkpoint {path}: model_state_dict does not fit {spec.model_name!r} "
            f"with {spec.num_classes} classes: {exc}"
        ) from exc
    return model.to(resolve_device(device)).eval(), spec


def checkpoint_fusion(ckpt: Mapping[str, Any]) -> models.FusionSpec:
    """The metadata fusion of a checkpoint's network.

    Its recorded ``fusion``, else what the weights' shapes show (the seed's fused checkpoints
    and those written before fusion was recorded; image-only ones give ``FusionSpec()``).
    A checkpoint without a known architecture or weights also gives ``FusionSpec()``:
    :func:`spec_from_checkpoint` and ``create_model`` then name what is wrong.
    """
    try:
        return models.checkpoint_fusion(ckpt, ckpt["model_name"])
    except (KeyError, TypeError, ValueError):
        return models.FusionSpec()


class TorchPredictor:
    """Probabilities (and Grad-CAM overlays) from a project checkpoint.

    Args:
        path: the checkpoint.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    """

    supports_explain = True

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        self.path = Path(path)
        self.device = resolve_device(device)
        self.model, self.spec = load_model(self.path, self.device)

    def predict_probs(self, batch: np.ndarray, meta: np.ndarray | None = None) -> np.ndarray:
        """``(N, K)`` float32 softmax probabilities for a preprocessed NCHW float32 batch
        (and its ``(N, M)`` metadata, exactly when the model fuses them)."""
        onnx_feeds(self.spec, batch, meta)  # the same refusal as the ONNX backend
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            m = None if meta is None else torch.from_numpy(np.ascontiguousarray(meta)).to(self.device)
            logits = self.model(x, m)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def explain(
        self,
        paths: Sequence[Path],
        classes: Sequence[int],
        out_dir: str | os.PathLike,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: bool = True,
        alpha: float = 0.6,
        prepare_size: int | str | None = "auto",
        names: Sequence[str] | None = None,
        meta: np.ndarray | None = None,
    ) -> list[Path]:
        """Write a Grad-CAM overlay ``<id>_gradcam.png`` per image into ``out_dir``.

        Args:
            paths: images (already known to be readable).
            classes: the class to explain per image (normally the prediction).
            out_dir: destination folder (created).
            max_pixels: decompression-bomb limit.
            progress: show a tqdm bar.
            alpha: heat-map opacity at the hottest point.
            prepare_size: as in prediction (``"auto"``: as the model's training data); the
                overlay has the size of the image the evaluation transform received (the
                original unless it was shrunk).
            names: the image ids naming the overlays (default: the file stems).
            meta: ``(len(paths), M)`` metadata, one row per image (fused models only).

        Returns:
            The written files.
        """
        from raug.deploy.gradcam import grad_cam, save_overlay
        from raug.deploy.spec import resolve_prepare_size

        prepare_size = resolve_prepare_size(prepare_size, self.spec)

        written = []
        names = [p.stem for p in paths] if names is None else names
        rows = [None] * len(paths) if meta is None else torch.from_numpy(meta)[:, None]
        bar = tqdm(
            list(zip(paths, classes, names, rows, strict=True)), desc="grad-cam", unit="img",
            disable=not progress, file=sys.stderr,
        )
        for path, cls, name, row in bar:
            try:
                rgb = load_rgb(path, max_pixels=max_pixels, prepare_size=prepare_size)
            except ImageLoadError as exc:
                tqdm.write(f"grad-cam skipped {path}: {exc.reason}", file=sys.stderr)
                continue
            x = torch.from_numpy(preprocess(rgb, self.spec.img_size, self.spec.mean, self.spec.std))
            m = None if row is None else row.to(self.device)
            cam = grad_cam(self.model, x[None].to(self.device), [int(cls)], m)[0].cpu().numpy()
            if not cam.any():
                # Not a rendering failure: no location raises the score (evidence by absence).
                tqdm.write(
                    f"grad-cam for {path}: empty map, no location increases the "
                    f"{self.spec.class_names[int(cls)]} score",
                    file=sys.stderr,
                )
            target = overlay_path(out_dir, name)
            save_overlay(target, rgb, cam, alpha=alpha)
            written.append(target)
        return written
