"""Read user images robustly into RGB ``uint8`` arrays (torch-free).

Prediction runs on whatever a clinic hands over, so reading must not trust the file:

* non-images and truncated files raise :class:`ImageLoadError` naming the file (the caller
  reports and skips it);
* decompression bombs: an image whose header claims more than ``max_pixels`` pixels is
  refused *before* it is decoded (PIL's ``DecompressionBombWarning`` and
  ``DecompressionBombError`` both count as failures);
* every PIL mode becomes RGB: palette, grey, CMYK and YCbCr via PIL's converters, alpha
  channels composited over black (the dark surround of a dermoscopic field of view), 16-bit
  grey rescaled to 8 bit (``round(v / 257)``, not clipped), float images from [0, 1];
* the EXIF orientation tag is applied (as ``cv2.imread`` does), so phone photos stand upright;
* optionally (``prepare_size``) the image is shrunk exactly like ``run_preprocess.sh`` shrinks
  the training images (shorter side ``prepare_size``, aspect kept, never enlarged; JPEG DCT
  draft then Lanczos), so a full-resolution clinic photo reaches the evaluation transform at
  the scale the model was trained on rather than being squeezed straight from megapixels to
  224 px with bilinear interpolation (which aliases).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from raug.isic2019.image_size import shorter_side_size

#: PIL's own default limit (about 9459 x 9459 px): far above the largest ISIC 2019 image
#: (a few thousand px a side), far below what a crafted header can claim.
DEFAULT_MAX_PIXELS = 89_478_485

#: Shorter side of the prepared training images (``run_preprocess.sh`` default).
DEFAULT_PREPARE_SIZE = 320

#: Extensions picked up when a folder is searched (case-insensitive).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageLoadError(RuntimeError):
    """An input file could not be read as an image; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image files.

    Folders are searched recursively for :data:`IMAGE_EXTENSIONS` (hidden files skipped);
    files named explicitly are taken whatever their extension, so a bad file the user named
    is reported rather than silently ignored.

    Args:
        paths: files and/or folders.

    Returns:
        Image paths, folder contents sorted, in the order the arguments were given.

    Raises:
        FileNotFoundError: a path does not exist (the message names it).
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates: Iterable[Path] = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not p.name.startswith(".")
            )
        elif path.is_file():
            candidates = [path]
        else:
            raise FileNotFoundError(f"image path not found: {path}")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated files must fail even if some other code enabled ``LOAD_TRUNCATED_IMAGES``."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that; a warning is a failure here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


def load_rgb(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prepare_size: int | None = None,
) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` RGB ``uint8`` array.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).
        prepare_size: shrink like the data preparation (shorter side in px); ``None``: keep.

    Returns:
        The decoded image, EXIF orientation applied.

    Raises:
        ImageLoadError: unreadable, truncated, unsupported or oversized image.
    """
    path = Path(path)
    try:
        with _strict_decoding(), Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"image of {width}x{height} = {width * height} pixels exceeds the "
                    f"limit of {max_pixels} pixels (possible decompression bomb)",
                )
            target = shorter_side_size(width, height, prepare_size)
            if target != (width, height):
                img.draft("RGB", target)  # JPEG: decode at a reduced DCT scale, as preparation does
            img.load()
            if img.getexif().get(0x0112, 1) in _SWAPS_AXES:
                target = target[::-1]
            rgb = pil_to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"refused as a possible decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not a readable image file") from exc
    except (OSError, SyntaxError, ValueError, EOFError, KeyError) as exc:
        # PIL signals truncated/corrupt data with any of these depending on the format.
        raise ImageLoadError(path, f"corrupt or truncated image: {exc}") from exc
    if (rgb.shape[1], rgb.shape[0]) != target:
        resized = Image.fromarray(rgb).resize(target, Image.Resampling.LANCZOS)
        rgb = np.asarray(resized, dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an ``(H, W, 3)`` RGB ``uint8`` array.

    Args:
        img: a loaded PIL image.

    Returns:
        A contiguous ``uint8`` array.

    Raises:
        ValueError: a mode PIL cannot convert to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (PNG/TIFF): scale 0..65535 onto 0..255 so the full range survives;
        # mode "I" is what older PIL versions use for such files, so it is read the same way.
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return _grey_to_rgb(np.rint(grey / 257.0).astype(np.uint8))
    if mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if np.nanmax(grey, initial=0.0) <= 1.0:
            grey = grey * 255.0
        return _grey_to_rgb(np.rint(np.clip(np.nan_to_num(grey), 0, 255)).astype(np.uint8))
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return np.rint(rgba[..., :3] * alpha).astype(np.uint8)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
