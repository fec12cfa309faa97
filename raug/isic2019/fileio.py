"""Small file helpers for the data pipeline: atomic writes, hashing, change detection.

``raug.checkpoint`` has atomic writers too, but importing it pulls in torch,
which the data preparation (and its worker processes) does not need; and those
always ``fsync``, which costs milliseconds per file and adds minutes over the
25k ISIC images. Prepared images are a re-creatable cache, so they are written
without ``fsync``; the CSVs and JSON files that describe them are ``fsync``-ed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    Args:
        path: destination; its folder is created.
        data: the bytes to write.
        durable: ``fsync`` the temp file before the rename (survives power loss, slower).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_if_changed(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly these bytes.

    Keeping an identical file untouched keeps its mtime, so reruns are visibly no-ops.

    Returns:
        True when the file was (re)written.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data, durable=durable)
    return True


def sha256_bytes(*chunks: bytes) -> str:
    """Hex SHA-256 of the concatenation of ``chunks``."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()
