"""The data preparation's size rule, shared by preparation and prediction (dependency-free).

``run_preprocess.sh`` stores images with their shorter side shrunk to ``size``;
``tools/predict.py`` shrinks new images by the same rule, so a model sees both at one scale.
This module imports nothing, so the preparation's worker processes and the torch-free ONNX
prediction path can both use it.
"""

from __future__ import annotations


def shorter_side_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """Output size: shorter side ``size``, aspect kept; never larger than the input.

    Args:
        width: source width.
        height: source height.
        size: requested shorter side, or ``None`` to keep the source size.

    Returns:
        ``(width, height)`` of the output.
    """
    short = min(width, height)
    if size is None or short <= size:
        return width, height
    if width <= height:
        return size, max(1, round(height * size / short))
    return max(1, round(width * size / short)), size
