"""What a file is, from its first bytes, and whether it is a model file this toolkit wrote.

Users hand the commands the wrong file: a CSV as ``--model``, an image, the ONNX export where
the checkpoint was meant. Loading such a file fails deep inside torch or onnxruntime with a
misleading message (torch calls any non-pickle "a pickle that may execute code"), so the
file's kind is sniffed from its first bytes (magic numbers; text is recognised as JSON, CSV or
plain text) and the message says what the file is. Only the standard library is used (torch
and onnx lazily where a check needs them), so the ONNX prediction path stays torch-free.

Recognition of the toolkit's own model files, used before an output is overwritten:

* ONNX: the ``deploy_format`` metadata is ``"ssdkd-deploy"`` (:mod:`raug.deploy.spec`);
* TorchScript: a ZIP archive with the member ``<archive>/extra/ssdkd_deploy.json`` that
  :func:`raug.deploy.export.export_torchscript` writes (the central directory is read, not the
  weights).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

#: Bytes read to decide a file's kind.
SNIFF_BYTES = 4096

#: The extra file TorchScript exports carry (see :mod:`raug.deploy.export`).
TORCHSCRIPT_META = "ssdkd_deploy.json"

# (magic prefix, description); checked in order, first match wins.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
)

# ONNX ModelProto as serialised by onnx/torch: field 1 (ir_version, varint, tag 0x08) first,
# then one of the length-delimited fields 2-8 (producer name ... opset_import).
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42})


def looks_like_onnx(head: bytes) -> bool:
    """True when ``head`` starts like a serialised ONNX model (a cheap heuristic)."""
    return len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in _ONNX_SECOND_TAGS


def looks_like_pickle(head: bytes) -> bool:
    """True for a pickle of protocol 2-5 (the legacy, non-ZIP ``torch.save`` format)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _text_kind(head: bytes) -> str | None:
    """``"a JSON/CSV/text file (...)"`` when ``head`` is UTF-8 text, else ``None``."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off by the read limit is still text.
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    text = text.lstrip("\ufeff")
    if not text.strip():
        return "a text file with only white space"
    stripped = text.lstrip()
    first_line = stripped.splitlines()[0]
    quoted = repr(first_line if len(first_line) <= 60 else first_line[:57] + "...")
    if stripped[0] in "{[":
        return f"a JSON text file (starting {quoted})"
    if stripped[0] == "<":
        return f"an HTML/XML text file (starting {quoted})"
    if "," in first_line or "\t" in first_line or ";" in first_line:
        return f"a CSV text file (first line {quoted})"
    return f"a text file (first line {quoted})"


def describe_bytes(head: bytes) -> str:
    """Name the kind of a file from its first bytes, e.g. ``"a CSV text file (first line ...)"``.

    Args:
        head: the first bytes of the file (:data:`SNIFF_BYTES` are enough).

    Returns:
        A phrase with an article, fit for ``f"{path} is {phrase}"``.
    """
    if not head:
        return "an empty file"
    for magic, description in _MAGIC:
        if head.startswith(magic):
            return description
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if looks_like_onnx(head):
        return "an ONNX model"
    if looks_like_pickle(head):
        return "a pickle (legacy PyTorch checkpoint format)"
    text = _text_kind(head)
    if text is not None:
        return text
    return f"an unrecognised binary file (first bytes {head[:8].hex(' ')})"


def read_head(path: str | os.PathLike, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of a file."""
    with open(path, "rb") as fh:
        return fh.read(size)


def _zip_members(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def describe_zip(members: list[str]) -> str:
    """Tell a PyTorch checkpoint, a TorchScript module and any other ZIP archive apart.

    ``torch.save`` writes ``<archive>/data.pkl``; ``torch.jit.save`` adds ``<archive>/code/``
    and ``<archive>/constants.pkl``.
    """
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in members):
        return "a TorchScript module"
    if any(name.endswith("/data.pkl") for name in members):
        return "a PyTorch checkpoint"
    return "a ZIP archive"


def describe_file(path: str | os.PathLike) -> str:
    """What ``path`` is: a folder, a missing path, or :func:`describe_bytes` of its content.

    ZIP archives are looked into (:func:`describe_zip`), so a PyTorch checkpoint, a
    TorchScript module and other archives are told apart.
    """
    path = Path(path)
    if path.is_dir():
        return "a folder"
    if not path.exists():
        return "missing"
    kind = describe_bytes(read_head(path))
    if kind == "a ZIP archive":
        members = _zip_members(path)
        if members is not None:
            return describe_zip(members)
    return kind


def model_file_problem(path: str | os.PathLike, expected: str) -> str | None:
    """Why ``path`` cannot be the model the caller expects, or ``None`` when it may be.

    Only files positively recognised as something else are refused; an unrecognised binary
    is left to the loader (torch or onnxruntime), whose own error then applies.

    Args:
        path: the file given as a model (it exists).
        expected: ``"checkpoint"`` (a ``.pth`` from training) or ``"onnx"``.

    Returns:
        A one-line message naming the file and what it is, or ``None``.
    """
    kind = describe_file(path)
    if expected == "checkpoint":
        if kind in ("a PyTorch checkpoint", "a pickle (legacy PyTorch checkpoint format)"):
            return None
        wanted = "a PyTorch checkpoint (.pth written by training)"
    elif expected == "onnx":
        if kind == "an ONNX model" or kind.startswith("an unrecognised binary"):
            return None
        wanted = "an ONNX model (.onnx written by tools/export.py)"
    else:
        raise ValueError(f"expected must be 'checkpoint' or 'onnx', got {expected!r}")
    if kind == "a folder":
        return f"{path} is a folder, not {wanted}"
    return f"{path} is {kind}, not {wanted}"


def is_deploy_onnx(path: str | os.PathLike) -> bool:
    """True for an ONNX file carrying this toolkit's ``deploy_format`` metadata.

    The first bytes are checked first, so a large file of another kind is never parsed.
    Needs the ``onnx`` package (export tooling only).
    """
    from raug.deploy.onnx_backend import read_metadata
    from raug.deploy.spec import DEPLOY_FORMAT, SpecError

    if not looks_like_onnx(read_head(path)):
        return False
    try:
        meta = read_metadata(path)
        return json.loads(meta.get("deploy_format", "null")) == DEPLOY_FORMAT
    except (SpecError, json.JSONDecodeError):
        return False


def is_deploy_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript file written by ``tools/export.py --torchscript``."""
    members = _zip_members(Path(path))
    return members is not None and any(
        name.endswith(f"/extra/{TORCHSCRIPT_META}") for name in members
    )


#: PNG text chunk ``Software`` of the Grad-CAM overlays (:func:`raug.deploy.gradcam.save_overlay`).
OVERLAY_SOFTWARE = "ssdkd-deploy grad-cam"


def overlay_path(folder: str | os.PathLike, image_id: str) -> Path:
    """Where the Grad-CAM overlay of ``image_id`` goes: ``<folder>/<id>_gradcam.png``."""
    return Path(folder) / f"{image_id}_gradcam.png"


def is_tool_overlay(path: str | os.PathLike) -> bool:
    """True for a PNG whose ``Software`` text chunk is :data:`OVERLAY_SOFTWARE`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == OVERLAY_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False
