"""Atomic file writes (temp file in the target folder + ``os.replace``), for the whole toolkit.

A crash leaves the old file or the new one, never half of one. Dependency-free on purpose:
checkpoints (:mod:`raug.files.checkpoint`), run outputs, the data preparation and its worker
processes, and the torch-free ONNX prediction path all write through this module.

A write that fails because the disk (or the user's quota) is full raises
:class:`DiskFullError`, an ``OSError`` whose one-line message names the file and the space
left, whatever the writer raised (torch's C++ writer reports it as ``RuntimeError:
[enforce fail at inline_container.cc...]`` with the ``ENOSPC`` buried in the chain, or
nowhere). The temporary file is removed and the previous file stays as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What torch's C++ zip writer says when a write fails; it carries no errno. Taken for a full
# disk only when the file system then has less than LOW_SPACE_BYTES left.
_WRITER_FAILURES = ("enforce fail", "iostream error", "PytorchStreamWriter failed")
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")
LOW_SPACE_BYTES = 1 << 20


class DiskFullError(OSError):
    """No space left on the device (or the quota is exhausted) while writing ``path``.

    ``errno`` is ``ENOSPC``, ``filename`` the destination; ``str()`` is one line, e.g.
    ``disk full: cannot write /r/last-checkpoint/last.pth (12.0 KiB free in /r/last-checkpoint)``.
    """

    def __init__(self, path: str | os.PathLike, free_bytes: int | None):
        """Describe the failed write of ``path`` with ``free_bytes`` left (``None``: unknown)."""
        path = Path(path)
        free = "free space unknown" if free_bytes is None else f"{format_bytes(free_bytes)} free"
        self.message = f"disk full: cannot write {path} ({free} in {path.parent})"
        super().__init__(errno.ENOSPC, self.message, str(path))
        self.free_bytes = free_bytes

    def __str__(self) -> str:
        """The one-line message (not ``[Errno 28] ...: 'path'``)."""
        return self.message


def format_bytes(n: int) -> str:
    """``512 B``, ``12.0 KiB``, ``3.4 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system of ``path`` (its nearest existing folder)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def is_disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``exc`` (a failed write into ``folder``) means the disk or quota is full.

    True when ``ENOSPC``/``EDQUOT`` appears anywhere in the exception's chain (or its
    text), or when torch's writer failed without an errno and ``folder`` has less than
    :data:`LOW_SPACE_BYTES` left. Call it before removing the partial file.
    """
    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, OSError) and item.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(item) for text in _NO_SPACE_TEXTS):
            return True
    if any(marker in str(item) for item in chain for marker in _WRITER_FAILURES):
        free = free_bytes(folder)
        return free is not None and free < LOW_SPACE_BYTES
    return False


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

    Raises:
        DiskFullError: the disk or quota filled up (chained to what the writer raised).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        writer(tmp)
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except Exception as exc:
        # Judge before cleaning up: torch's errno-less failure is recognised by the space left.
        full = is_disk_full(exc, path.parent)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path, free_bytes(path.parent)) from exc
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, never reinterpret
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
