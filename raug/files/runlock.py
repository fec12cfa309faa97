"""One writer per folder: an exclusive OS lock on ``<folder>/.lock`` held for a whole run.

Two runs writing into one ``_save_folder`` at the same time overwrite each other's
checkpoints, and each one's final evaluation may load the other's best checkpoint. A run
therefore holds an exclusive ``flock`` on ``<folder>/.lock`` from before Sacred creates
its run folder until it ends (:class:`raug.run.experiment.RaugExperiment`), and the sweep
holds one on its output folder. The lock belongs to the kernel: it disappears with the
process, so a ``kill -9`` never leaves a stale lock behind. The file holds who took the
lock (pid, host, start time, command line), only to name the holder in messages.

API::

    lock = acquire(folder)          # FolderInUseError if another process holds it
    with hold(folder): ...          # acquire unless this process holds it already
    is_locked(folder)               # probe, for the sweep
    holder(folder)                  # LockHolder of a held lock, or None

``flock`` works on local file systems and on NFS (where Linux maps it to NFS locks).
Windows has no ``fcntl``: there the lock is a no-op and nothing is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# A probe (is_locked) holds a shared lock for microseconds; an acquirer that meets one
# retries this long before it calls the folder busy. A real holder keeps it far longer.
ACQUIRE_PATIENCE_S = 0.5
_MAX_COMMAND = 300  # characters of the holder's command line shown in messages

# Locks this process holds, by real folder path (hold() is idempotent through it).
_HELD: dict[str, RunLock] = {}


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock, as written into the lock file (``None``: unknown)."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None
    command: str | None = None

    def describe(self) -> str:
        """``pid 1234 on host h, started 2026-01-02T03:04:05+00:00: python isic.py with ...``."""
        if self.pid is None:
            return "a process that has not written its details yet"
        text = f"pid {self.pid} on host {self.host or '?'}"
        if self.started:
            text += f", started {self.started}"
        if self.command:
            command = self.command
            if len(command) > _MAX_COMMAND:
                command = command[:_MAX_COMMAND] + " ..."
            text += f": {command}"
        return text


class FolderInUseError(RuntimeError):
    """The folder's lock is held by another process (or another handle of this one)."""

    def __init__(self, folder: Path, who: LockHolder):
        """Record the folder and its holder; the message names both."""
        super().__init__(f"{folder} is in use by {who.describe()}")
        self.folder = folder
        self.holder = who


class RunLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) gives it back.

    Releasing removes the lock file while still holding it, so a released folder holds
    nothing of the lock. :func:`acquire` checks that the file it locked is still the one
    at the path, which makes that removal safe against a racing acquirer.
    """

    def __init__(self, folder: Path, fd: int | None):
        """Wrap an open, locked descriptor (``None`` where locking is unavailable)."""
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this handle still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        _HELD.pop(_key(self.folder), None)
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a vanished folder or file: nothing left to clean
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        """The lock itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release."""
        self.release()


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _describe_self() -> LockHolder:
    return LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
    )


def _try_lock(path: Path, mode: int) -> int | None:
    """Open ``path`` and lock it without blocking; the descriptor, or ``None`` when busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(fd: int, path: Path) -> bool:
    # The previous holder may have removed the file between our open and our lock:
    # then we locked an orphaned inode and must try again on the new file.
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def acquire(folder: str | os.PathLike, patience_s: float = ACQUIRE_PATIENCE_S) -> RunLock:
    """Take the exclusive lock on ``folder`` (created if missing) without waiting for a holder.

    Args:
        folder: the folder to own.
        patience_s: how long a busy lock is retried (covers a probe's brief shared lock).

    Returns:
        The held lock; the lock file names this process.

    Raises:
        FolderInUseError: another process (or another handle in this one) holds it.
        OSError: the folder or its lock file cannot be created or written
            (read-only, permission denied, disk full), with the errno and the path.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _acquire(folder, patience_s)
    except OSError:
        for path in created:  # a refused run leaves no empty folders behind (innermost first)
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _acquire(folder: Path, patience_s: float) -> RunLock:
    if fcntl is None:
        return RunLock(folder, None)
    path = folder / LOCK_NAME
    deadline = time.monotonic() + patience_s
    while True:
        fd = _try_lock(path, fcntl.LOCK_EX)
        if fd is None:
            if time.monotonic() >= deadline:
                raise FolderInUseError(folder, holder(folder) or LockHolder())
            time.sleep(0.05)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)
    lock = RunLock(folder, fd)
    try:
        data = json.dumps(_describe_self().__dict__).encode("utf-8")
        os.ftruncate(fd, 0)
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except BaseException:
        lock.release()
        raise
    _HELD[_key(folder)] = lock
    return lock


@contextlib.contextmanager
def hold(folder: str | os.PathLike) -> Iterator[RunLock]:
    """Hold the lock for the block: reuse this process's lock, else :func:`acquire` it.

    Idempotent: :class:`raug.run.experiment.RaugExperiment` takes the lock before the Sacred
    run starts, and :func:`raug.run.experiment.run_training` (also called programmatically)
    holds it again without refusing itself; only the outer holder releases it.

    Raises:
        FolderInUseError, OSError: as :func:`acquire`.
    """
    existing = held_lock(folder)
    if existing is not None:
        yield existing
        return
    with acquire(folder) as lock:
        yield lock


def held_lock(folder: str | os.PathLike) -> RunLock | None:
    """This process's lock on ``folder``, if it holds one."""
    lock = _HELD.get(_key(Path(folder)))
    return lock if lock is not None and lock.held else None


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether some process holds ``folder``'s lock (``False`` for a missing folder or file).

    The probe takes a shared lock for an instant (two probes do not disturb each other;
    an acquirer meeting one retries, see :data:`ACQUIRE_PATIENCE_S`). A lock this process
    holds counts as locked.
    """
    if fcntl is None:
        return False
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):  # no lock file, or a file in the way
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def holder(folder: str | os.PathLike) -> LockHolder | None:
    """Who holds ``folder``'s lock, or ``None`` when nobody does.

    Returns:
        The details from the lock file (fields ``None`` where it cannot be read, e.g.
        while the holder is still writing them).
    """
    if not is_locked(folder):
        return None
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return LockHolder()
    if not isinstance(data, dict):
        return LockHolder()
    pid = data.get("pid")
    return LockHolder(pid=pid if isinstance(pid, int) else None, host=data.get("host"),
                      started=data.get("started"), command=data.get("command"))


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description: while
    # it lives the lock would outlive a killed parent. The child never owns the run, so it
    # closes its copy (the parent's descriptor still holds the lock).
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


__all__ = [
    "LOCK_NAME",
    "FolderInUseError",
    "LockHolder",
    "RunLock",
    "acquire",
    "held_lock",
    "hold",
    "holder",
    "is_locked",
]
