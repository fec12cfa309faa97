"""Per-image work of the preparation: full-decode checks and resized copies.

Both functions run in worker processes and only return data; the main process
does all writing. Resizing decodes large JPEGs at a reduced DCT scale
(``Image.draft``), then resamples with Lanczos to the exact size. Images are
never upscaled and EXIF orientation is not applied (like the seed's plain
copy), so a resized image and its original share their orientation.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageFile

from raug.isic2019.image_size import shorter_side_size

JPEG_QUALITY = 95
# Identifies how resized outputs are produced; part of the reuse check, so a
# change of these settings invalidates the cache.
ENCODER = f"pil-draft-lanczos-jpeg-q{JPEG_QUALITY}-444-v1"


@dataclass(frozen=True)
class ImageTask:
    """One source image and the requested shorter side (``None``: keep as is)."""

    image: str
    src: str
    size: int | None


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make truncated JPEGs raise even if a caller enabled ``LOAD_TRUNCATED_IMAGES``."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def inspect_image(task: ImageTask) -> tuple[str, int, int, str | None]:
    """Decode a source image completely (at the scale it will be used) to catch corruption.

    Returns:
        ``(image id, width, height, error)`` with ``error`` ``None`` when the image is good.
    """
    try:
        with _strict_decoding(), Image.open(task.src) as im:
            if im.format != "JPEG":
                return task.image, 0, 0, f"is a {im.format} file, expected a JPEG"
            width, height = im.size
            out = shorter_side_size(width, height, task.size)
            if out != (width, height):
                # Every DCT block is still entropy-decoded, so truncation is still detected.
                im.draft("RGB", out)
            im.load()
    except _DECODE_ERRORS as exc:
        return task.image, 0, 0, f"cannot be decoded ({type(exc).__name__}: {exc})"
    return task.image, width, height, None


def encode_image(task: ImageTask) -> tuple[str, bytes | None, int, int]:
    """The prepared version of a (previously inspected) source image.

    Returns:
        ``(image id, JPEG bytes or None, width, height)``; ``None`` means the source
        is kept as is (no resize needed): the caller copies its bytes unchanged.
    """
    with _strict_decoding(), Image.open(task.src) as im:
        width, height = im.size
        out = shorter_side_size(width, height, task.size)
        if out == (width, height):
            return task.image, None, width, height
        im.draft("RGB", out)
        small = im.convert("RGB").resize(out, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    # 4:4:4 keeps thin red vessels and colour borders that 4:2:0 would smear.
    small.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:4:4")
    return task.image, buf.getvalue(), out[0], out[1]
