"""The evaluation transform in numpy + OpenCV, and test-time-augmentation views (torch-free).

The training engine evaluates with ``A.Compose([A.Resize(S, S), A.Normalize(mean, std)])`` on
RGB ``uint8`` images. :func:`preprocess` reproduces it bit for bit without albumentations or
torch: ``cv2.resize(..., INTER_LINEAR)`` followed by the same float32 look-up table
albumentations builds for ``uint8`` input, ``(v - 255 * mean) * (1 / (255 * std))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: The 8 dihedral views used by TTA, in the order they are evaluated. Skin lesions have no
#: canonical orientation, so every rotation/flip of a dermoscopic image is an equally valid
#: view. Each entry is ``(name, number of 90-degree counter-clockwise turns, flip first)``.
TTA_VIEWS: tuple[tuple[str, int, bool], ...] = (
    ("identity", 0, False),
    ("rot90", 1, False),
    ("rot180", 2, False),
    ("rot270", 3, False),
    ("hflip", 0, True),
    ("hflip_rot90", 1, True),
    ("hflip_rot180", 2, True),
    ("hflip_rot270", 3, True),
)


def normalization_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel float32 look-up table mapping ``uint8`` values to normalised values.

    Built exactly like albumentations' ``Normalize`` (``max_pixel_value=255``) for ``uint8``
    images, so the result is bit-identical.

    Args:
        mean: per-channel mean on the 0-1 scale.
        std: per-channel standard deviation on the 0-1 scale.

    Returns:
        A ``(C, 256)`` float32 array.
    """
    mean_px = np.asarray(mean, dtype=np.float32) * 255.0
    denominator = np.reciprocal(np.asarray(std, dtype=np.float32) * 255.0)
    levels = np.arange(256, dtype=np.float32)
    return ((levels - mean_px.reshape(-1, 1)) * denominator.reshape(-1, 1)).astype(np.float32)


def preprocess(
    rgb: np.ndarray, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Resize and normalise one RGB ``uint8`` image into a ``(3, S, S)`` float32 array.

    Args:
        rgb: ``(H, W, 3)`` RGB ``uint8`` image.
        img_size: output side ``S`` in pixels.
        mean: per-channel mean (0-1 scale).
        std: per-channel standard deviation (0-1 scale).

    Returns:
        The network input for this image (CHW, RGB, float32, normalised).

    Raises:
        ValueError: the image is not ``(H, W, 3)`` ``uint8``.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] != (img_size, img_size):
        rgb = cv2.resize(rgb, (img_size, img_size), interpolation=cv2.INTER_LINEAR)
    lut = normalization_lut(mean, std)
    # Fancy indexing with the uint8 values is the numpy form of cv2.LUT (same table, same result).
    chw = np.stack([lut[c][rgb[:, :, c]] for c in range(3)], axis=0)
    return np.ascontiguousarray(chw, dtype=np.float32)


def tta_view(batch: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """One dihedral view of an ``(N, C, H, W)`` batch: optional horizontal flip, then turns.

    Args:
        batch: network inputs, NCHW.
        turns: number of 90-degree counter-clockwise rotations (0-3).
        flip: mirror left-right before rotating.

    Returns:
        A contiguous array of the same shape (square inputs).
    """
    view = batch[..., ::-1] if flip else batch
    view = np.rot90(view, k=turns, axes=(2, 3))
    return np.ascontiguousarray(view)
