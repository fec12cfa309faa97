"""A throwaway MongoDB server for the tests: nx-27017 on a free 127.0.0.1 port.

No real ``mongod`` can be installed on the CI machines; nx-27017 (tools/env.sh) speaks
MongoDB's wire protocol in pure Python over one SQLite file, which is enough for Sacred's
MongoObserver (runs, metrics, GridFS artifacts) and for ``raug.report.runs``. The server is
a child process started with its own PID and log files (its defaults, ``/tmp/nx_27017.*``,
would clash with another test session) and stopped by its PID. It keeps one SQLite file per
database (``--data-dir``): with a single ``--db`` file every database name would share the
same collections, and one test's runs would collide with another's.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pymongo

START_TIMEOUT_S = 30.0  # a cold start imports neosqlite and pymongo: ~1 s on an idle core
STOP_TIMEOUT_S = 10.0  # nx-27017 takes over a second to exit on SIGTERM
PING_TIMEOUT_MS = 500
SERVER_MAIN = "from nx_27017.nx_27017 import main; main()"  # its console script, by this Python


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    """Whether a MongoDB server at ``url`` answers a ping within :data:`PING_TIMEOUT_MS`."""
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=PING_TIMEOUT_MS,
                                 connectTimeoutMS=PING_TIMEOUT_MS)
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's PID, SIGKILL if it is still there after :data:`STOP_TIMEOUT_S`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[str]:
    """Start nx-27017 with its SQLite files in ``workdir``; yield ``mongodb://127.0.0.1:PORT``.

    Waits (at most :data:`START_TIMEOUT_S`) until the server answers a ping, so the first
    test does not race its start; stops it on exit, also when the block raises.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its output).
    """
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}"
    out = workdir / "nx-27017.out"
    cmd = [sys.executable, "-c", SERVER_MAIN, "--data-dir", str(workdir / "databases"),
           "--host", "127.0.0.1", "--port", str(port),
           "--log-file", str(workdir / "nx-27017.log"), "--pid-file", str(workdir / "nx-27017.pid")]
    with out.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nx-27017 did not start at {url} (exit status {proc.poll()}):\n"
                                   + _log_tail(out))
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)
