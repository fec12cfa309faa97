"""Small file helpers for the data pipeline: hashing, change detection, stale temporaries.

Writes go through :mod:`raug.files.atomic`. Prepared images are a re-creatable cache, so they are
written without ``fsync`` (``durable=False``); the CSVs and JSON files that describe them
are ``fsync``-ed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from raug.files.atomic import atomic_write_bytes

# raug.files.atomic names its temporaries with tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp"):
# a dot, the target's name, a dot, 8 characters of tempfile's alphabet, ".tmp". A kill -9
# between creating and renaming one leaves it behind (tests/test_prepare.py makes real ones).
_ATOMIC_TEMP = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


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


def atomic_temp_target(name: str) -> str | None:
    """The file name that a :mod:`raug.files.atomic` temporary called ``name`` was to become.

    Returns:
        The target's name, or ``None`` when ``name`` is not such a temporary.
    """
    match = _ATOMIC_TEMP.fullmatch(name)
    return match["target"] if match else None


def remove_stale_temps(folder: Path, is_target: Callable[[str], bool]) -> int:
    """Delete the temporaries that killed atomic writes of this tool left in ``folder``.

    Only plain files named like :mod:`raug.files.atomic`'s temporaries and whose target name
    passes ``is_target`` are removed; subfolders and any other file stay. Call it only where
    no other process of the tool is writing the same folder.

    Args:
        folder: a folder the tool writes (missing: nothing to do).
        is_target: whether a target name is one the tool writes in ``folder``.

    Returns:
        The number of files removed.
    """
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir()
             if (target := atomic_temp_target(p.name)) is not None and is_target(target)
             and p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
