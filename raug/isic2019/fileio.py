"""Small file helpers for the data pipeline: hashing and change detection.

Writes go through :mod:`raug.atomic`. Prepared images are a re-creatable cache, so they are
written without ``fsync`` (``durable=False``); the CSVs and JSON files that describe them
are ``fsync``-ed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from raug.atomic import atomic_write_bytes


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
