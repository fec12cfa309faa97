"""Output-path checks for the deployment commands: nothing lost, nothing mixed up (torch-free).

Before any work is done, every file a command is about to write is checked:

1. it is not a folder;
2. it is not an input: after symlinks (``Path.resolve``) and hard links (device and inode),
   it is none of the input files (the model, the checkpoint, the images), and it does not lie
   inside a folder of inputs (the image or calibration folder) -- a file written there would
   be read as an input by the next run. ``--force`` never lifts this rule;
3. no two outputs of one command are the same file;
4. its folder can be written: a temporary file is created and removed in the nearest existing
   folder, so a read-only file system or a path through a file stops the command at once,
   with one line, rather than after minutes of prediction;
5. an existing file is replaced only when it is of the kind the command writes and was
   written by this toolkit (recognised by a cheap look at its content, see
   :mod:`raug.deploy.filekind` and :func:`raug.deploy.submission.is_tool_csv`), or is empty;
   ``--force`` replaces anything else.

Each violation raises :class:`OutputError` with a one-line message naming the path.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from raug.deploy.filekind import describe_file


class OutputError(ValueError):
    """An output path is refused or cannot be written; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Output:
    """A file a command is about to write.

    Attributes:
        path: the destination as the user gave it.
        label: how the user named it, e.g. ``"--out"``.
        kind: what the command writes there, e.g. ``"a predictions CSV"``.
        is_ours: recognises an existing file of that kind written by this toolkit.
    """

    path: Path
    label: str
    kind: str
    is_ours: Callable[[Path], bool]


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class InputGuard:
    """Answers "is this output one of the inputs, or inside an input folder?" in O(1) per file.

    Args:
        files: ``(description, path)`` of every input file, e.g. ``("the model", model)``.
        folders: ``(description, folder)`` of every input folder, e.g.
            ``("the image folder", images)``.
    """

    def __init__(
        self, files: Iterable[tuple[str, Path]], folders: Iterable[tuple[str, Path]] = ()
    ) -> None:
        self._by_path: dict[Path, tuple[str, Path]] = {}
        self._by_inode: dict[tuple[int, int], tuple[str, Path]] = {}
        for description, path in files:
            path = Path(path)
            self._by_path.setdefault(path.resolve(), (description, path))
            inode = _inode(path)
            if inode is not None:
                self._by_inode.setdefault(inode, (description, path))
        self._folders = [(description, Path(f), Path(f).resolve()) for description, f in folders]

    def problem(self, output: Output) -> str | None:
        """Why ``output`` would overwrite an input (one line), or ``None``."""
        resolved = output.path.resolve()
        hit = self._by_path.get(resolved)
        if hit is None:
            inode = _inode(output.path)
            hit = self._by_inode.get(inode) if inode is not None else None
        if hit is not None:
            description, path = hit
            return (
                f"{output.label} {output.path} is {description} {path}; an output never "
                f"replaces an input (choose another path)"
            )
        for description, folder, folder_resolved in self._folders:
            if resolved == folder_resolved:
                return f"{output.label} {output.path} is {description} {folder}; give a file name"
            if resolved.is_relative_to(folder_resolved):
                return (
                    f"{output.label} {output.path} is inside {description} {folder}; write it "
                    f"elsewhere (a file there would be taken as an input)"
                )
        return None


def duplicate_problem(outputs: Sequence[Output]) -> str | None:
    """Why two of ``outputs`` are the same file (one line), or ``None``."""
    seen: dict[Path, Output] = {}
    for output in outputs:
        key = output.path.resolve()
        if key in seen:
            first = seen[key]
            return (
                f"{first.label} {first.path} and {output.label} {output.path} are the same "
                f"file; give each output its own path"
            )
        seen[key] = output
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # a relative path whose every parent is missing


def writable_problem(path: Path) -> str | None:
    """Why ``path`` cannot be created (one line), or ``None``.

    A temporary file is created and removed in the nearest existing folder above ``path``:
    the only test that tells a read-only file system, a full quota of inodes or a missing
    permission from a writable folder (``os.access`` says yes to root on most of them).
    """
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        return f"cannot write {path}: {folder} is {describe_file(folder)}, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".ssdkd-write-probe.", dir=folder)
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc} ({folder})"
    os.close(fd)
    os.unlink(probe)
    return None


def replace_problem(output: Output, force: bool) -> str | None:
    """Why the existing file at ``output.path`` must not be replaced (one line), or ``None``.

    Missing and empty files may always be written; a folder never; any other file only when
    :attr:`Output.is_ours` recognises it or ``force`` is set.
    """
    path = output.path
    if path.is_dir():
        return f"{output.label} {path} is a folder; give a file name"
    if not path.exists() or force or path.stat().st_size == 0 or output.is_ours(path):
        return None
    return (
        f"refusing to replace {path} ({output.label}): it is {describe_file(path)}, not "
        f"{output.kind} written by this toolkit (use --force to replace it)"
    )


def check_outputs(outputs: Sequence[Output], guard: InputGuard, force: bool = False) -> None:
    """Run every check of this module on ``outputs``; raise on the first problem.

    Args:
        outputs: the files the command will write.
        guard: the command's inputs.
        force: allow replacing existing files of another kind (never inputs).

    Raises:
        OutputError: one line naming the refused path and the reason.
    """
    problem = duplicate_problem(outputs)
    probed: set[Path] = set()
    for output in outputs:
        if problem is not None:
            break
        problem = guard.problem(output) or replace_problem(output, force)
        folder = output.path.absolute().parent
        if problem is None and folder not in probed:
            probed.add(folder)
            problem = writable_problem(output.path)
    if problem is not None:
        raise OutputError(problem)


def write_failure(path: str | os.PathLike, exc: OSError) -> str:
    """One line for a write that failed after the checks (e.g. the file system went read-only).

    Errors that already carry a one-line message of their own (``raug.files.atomic.DiskFullError``
    overrides ``__str__``) keep it; plain ``OSError`` becomes ``cannot write PATH: reason``.
    """
    if type(exc).__str__ is not OSError.__str__:
        return str(exc)
    return f"cannot write {path}: {exc.strerror or exc}"


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError`` that reached a command's top level: its own message when it
    has one, else ``FILE: reason``."""
    if type(exc).__str__ is not OSError.__str__ or not exc.filename:
        return str(exc)
    return f"{exc.filename}: {exc.strerror or exc}"


def command_error(line: str, status: int = 2) -> int:
    """Print ``error: <line>`` on stderr for a command's top level and return ``status``.

    The exit code the command's ``main`` returns: 2 (bad input) unless told otherwise, so a
    handler reads ``return command_error(str(exc))``.
    """
    print(f"error: {line}", file=sys.stderr)
    return status
