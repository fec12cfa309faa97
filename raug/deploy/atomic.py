"""Torch-free atomic file writes (temp file in the target folder + ``os.replace``).

:mod:`raug.checkpoint` has the same helpers but imports torch; the ONNX prediction path must
run without torch, so it uses these.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half.

    Args:
        path: destination; its folder is created.
        data: the bytes to write.

    Returns:
        The destination path.
    """
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Let ``writer`` fill a temporary file next to ``path``, fsync it, then move it into place.

    Use this for libraries that insist on writing a path themselves (``onnx.save``,
    ``torch.jit.save``). On any exception the temporary file is removed and the target is
    untouched.

    Args:
        path: destination; its folder is created.
        writer: called with the temporary path; must write the complete file there.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
