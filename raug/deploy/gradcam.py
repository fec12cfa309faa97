"""Grad-CAM on the last convolutional feature map, without hooks.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017 (https://arxiv.org/abs/1610.02391).

The project's models split into ``forward_features`` (last conv map ``A``) and
``forward_head`` (pooling + classifier), so the gradient of the class score ``y_c`` with
respect to ``A`` comes straight from autograd on that intermediate tensor:
``w_k = mean_ij dy_c/dA_kij``, ``cam = ReLU(sum_k w_k A_k)``, scaled to [0, 1] per image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from raug.deploy.filekind import OVERLAY_SOFTWARE
from raug.files.atomic import atomic_write_bytes


def grad_cam(
    model: nn.Module, x: torch.Tensor, classes: Sequence[int], meta: torch.Tensor | None = None
) -> torch.Tensor:
    """Grad-CAM maps at feature-map resolution.

    Args:
        model: a project model (``forward_features`` / ``forward_head``), in eval mode.
        x: ``(N, 3, S, S)`` preprocessed inputs on the model's device.
        classes: the class to explain for each of the N inputs.
        meta: ``(N, M)`` metadata of a fused model (it enters the head, after the map).

    Returns:
        ``(N, h, w)`` float tensor in [0, 1] (all zeros where no location supports the class).
    """
    if len(classes) != x.shape[0]:
        raise ValueError(f"need one class per input: {len(classes)} classes for {x.shape[0]} inputs")
    # Only the head needs a graph: the backbone runs without one, and the feature map
    # becomes the leaf we differentiate against. enable_grad because callers may sit
    # inside no_grad (inference_mode tensors could not join a graph, hence the clone).
    with torch.no_grad():
        feats = model.forward_features(x)
    feats = feats.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(feats, meta=meta)
        index = torch.as_tensor(list(classes), device=logits.device).view(-1, 1)
        score = logits.gather(1, index).sum()
        (grads,) = torch.autograd.grad(score, feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feats.detach()).sum(dim=1))
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a ``(h, w)`` map in [0, 1] to ``size = (H, W)``, staying in [0, 1]."""
    height, width = size
    resized = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a jet-coloured heat map over an RGB image.

    The opacity grows with the heat (``alpha * heat`` per pixel), so regions the class score
    does not depend on keep the original pixels and stay readable.

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` original image.
        cam: ``(h, w)`` map in [0, 1] (resized to the image if needed).
        alpha: opacity at the hottest point, in [0, 1].

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB overlay.
    """
    heat = upsample_cam(cam, rgb.shape[:2])
    colour = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    opacity = (alpha * heat)[..., None]
    blended = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_overlay(
    path: str | os.PathLike, rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.6
) -> Path:
    """Write :func:`overlay` as a PNG, atomically.

    The PNG's ``Software`` text chunk is :data:`~raug.deploy.filekind.OVERLAY_SOFTWARE`, so a
    later run recognises its own overlays and may replace them (and nothing else).

    Returns:
        The written path.
    """
    buf = io.BytesIO()
    info = PngInfo()
    info.add_text("Software", OVERLAY_SOFTWARE)
    Image.fromarray(overlay(rgb, cam, alpha)).save(buf, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buf.getvalue())
