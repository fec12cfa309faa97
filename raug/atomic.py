"""Atomic file writes (temp file in the target folder + ``os.replace``), for the whole toolkit.

A crash leaves the old file or the new one, never half of one. Dependency-free on purpose:
checkpoints (:mod:`raug.checkpoint`), run outputs, the data preparation and its worker
processes, and the torch-free ONNX prediction path all write through this module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half.

    Args:
        path: destination; its folder is created.
        data: the bytes to write.
        durable: ``fsync`` before the rename (see :func:`atomic_write_with`).

    Returns:
        The destination path.
    """
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(
    path: str | os.PathLike, writer: Callable[[Path], object], *, durable: bool = True
) -> Path:
    """Let ``writer`` fill a temporary file next to ``path``, fsync it, then move it into place.

    Use this for libraries that insist on writing a path themselves (``onnx.save``,
    ``torch.jit.save``). On any exception the temporary file is removed and the target is
    untouched.

    Args:
        path: destination; its folder is created.
        writer: called with the temporary path; must write the complete file there.
        durable: ``fsync`` the file before the rename, so it also survives a power loss.
            Re-creatable caches (the prepared images) skip it: it costs milliseconds per
            file, minutes over the 25k ISIC images.

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
        if durable:
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
