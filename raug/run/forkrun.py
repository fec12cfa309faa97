"""Run Python scripts in forks of a process that has already imported their libraries.

A training script spends about 12 s on a 2-core CPU before its own first line runs:
importing torch, torchvision (which imports ``torch._dynamo``), albumentations,
scikit-learn, Sacred and matplotlib. A job that runs many short scripts in a row (the
main job's ``--fast`` mode: twelve trainings) spends minutes on that. :func:`preload`
imports those libraries once; :func:`start` then runs each script in a fresh
``os.fork()`` of this process, with the ``sys.argv``, working directory and
``sys.path[0]`` that ``python script.py ...`` gives it, and :meth:`Forked.wait` returns
its exit status as ``subprocess.Popen.wait`` would.

What the script computes and records is what a separate process would: the parent only
imports third-party libraries (the scripts import the same ones), runs no tensor
operation (so no thread pool is copied into the child), and the project's own modules
are imported by each child itself. Forking is used on Linux only (macOS system
frameworks are not fork-safe, Windows has no fork); elsewhere :func:`can_fork` is false
and callers start subprocesses.
"""

from __future__ import annotations

import importlib
import logging
import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

# Third-party libraries every training script imports (about 11 s of the 12 s start).
PRELOAD = ("raug", "torch", "torchvision", "albumentations", "sklearn.metrics", "scipy.stats",
           "pandas", "sacred", "matplotlib.figure", "matplotlib.backends.backend_agg", "tqdm")


def can_fork() -> bool:
    """Whether scripts can run in forks here (Linux with ``os.fork``)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def preload(modules: Sequence[str] = PRELOAD) -> None:
    """Import ``modules`` into this process, so that forks of it start with them loaded."""
    for name in modules:
        importlib.import_module(name)


def is_script_command(cmd: Sequence[str]) -> bool:
    """``cmd`` is ``(this python, some .py file, args...)``: what :func:`start` can run."""
    return len(cmd) >= 2 and cmd[0] == sys.executable and str(cmd[1]).endswith(".py")


class Forked:
    """A script running in a child process; ``wait()`` gives its exit status once it ends.

    The status is ``Popen.returncode``'s: the script's exit code, or ``-N`` when signal
    ``N`` ended it.
    """

    def __init__(self, pid: int):
        """Track the child ``pid``."""
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        """Block until the child ends; its exit status (the same on later calls)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def start(cmd: Sequence[str], cwd: str | os.PathLike) -> Forked:
    """Run ``cmd`` (``python script.py args...``, see :func:`is_script_command`) in a fork.

    Args:
        cmd: the command line, as it would be given to ``subprocess.Popen``.
        cwd: the child's working directory.

    Returns:
        The running child.
    """
    if not is_script_command(cmd):
        raise ValueError(f"not a python script command: {' '.join(map(str, cmd))}")
    sys.stdout.flush()
    sys.stderr.flush()  # buffered text would otherwise be printed by both processes
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os._exit(_run_child(Path(cmd[1]), [str(a) for a in cmd[2:]], Path(cwd)))
    return Forked(pid)


def _run_child(script: Path, args: list[str], cwd: Path) -> int:
    """Run ``script`` as ``__main__`` with ``args``; the exit code ``python script`` would have."""
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [str(script), *args]
        sys.path[0] = str(script.resolve().parent)
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130  # what a shell reports for a process ended by Ctrl-C
    except BaseException:  # reported as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    logging.shutdown()  # os._exit skips the flushes that interpreter exit does
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _exit_code(value: object) -> int:
    """``sys.exit(value)``'s process exit code: None -> 0, int -> itself, else printed and 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1
