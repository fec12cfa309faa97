"""One writer per save folder (issue #20, item 2): raug.files.runlock and the experiment's lock.

The lock is an flock owned by the kernel, so the holders here are real processes, killed
with SIGKILL where the test is about what a kill leaves behind.
"""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import test_reliability
from test_reliability import TINY_ARGS, updates

from raug.errors import ConfigError
from raug.files import runlock
from raug.testing import write_prepared_dataset

# Takes the lock on argv[1], optionally forks a child that outlives it, then reports and waits.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from raug.files import runlock
    lock = runlock.acquire(sys.argv[1])
    child = 0
    if len(sys.argv) > 2:
        started_r, started_w = os.pipe()
        child = os.fork()
        if child == 0:
            # Python code runs in the child only after the at-fork hooks (runlock's too):
            # the byte tells the parent that the child has dropped its copy of the lock.
            os.write(started_w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(started_r, 1)  # else a slow child could still hold the lock when tested
    print(f"ready {child}", flush=True)
    time.sleep(60)
""")


def start_holder(folder: Path, fork: bool = False) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, "-c", HOLDER, str(folder)] + (["fork"] if fork else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc, int(line.split()[1])


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def holders():
    started: list[int] = []
    yield started
    for pid in started:
        kill(pid)


def test_a_second_process_is_refused_and_told_who_holds_the_folder(tmp_path, holders):
    folder = tmp_path / "run"
    proc, _ = start_holder(folder)
    holders.append(proc.pid)
    assert runlock.is_locked(folder)
    who = runlock.holder(folder)
    assert who.pid == proc.pid
    assert who.command.startswith(Path(sys.executable).name)
    with pytest.raises(runlock.FolderInUseError, match=rf"{folder} is in use by pid {proc.pid} on host "):
        runlock.acquire(folder, patience_s=0.1)


def test_kill_minus_9_leaves_no_stale_lock(tmp_path, holders):
    folder = tmp_path / "run"
    proc, _ = start_holder(folder)
    holders.append(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / runlock.LOCK_NAME).is_file()  # the file stays, the lock does not
    assert not runlock.is_locked(folder)
    assert runlock.holder(folder) is None
    with runlock.acquire(folder, patience_s=0):
        assert json.loads((folder / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_forked_children_do_not_keep_the_lock_of_a_killed_parent(tmp_path, holders):
    # DataLoader workers are forked from the run: they share its open files, and a lock on a
    # shared file description would live on until the last worker noticed its parent died.
    folder = tmp_path / "run"
    proc, child = start_holder(folder, fork=True)
    holders += [proc.pid, child]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.kill(child, 0)  # the forked child is still alive ...
    assert not runlock.is_locked(folder)  # ... and holds nothing


def test_hold_is_idempotent_and_release_leaves_nothing(tmp_path):
    folder = tmp_path / "run"
    with runlock.hold(folder) as outer:
        with runlock.hold(folder) as inner:
            assert inner is outer
        assert runlock.is_locked(folder)  # the inner block did not release it
        assert runlock.held_lock(folder) is outer
    assert not runlock.is_locked(folder)
    assert runlock.held_lock(folder) is None
    assert list(folder.iterdir()) == []


def test_a_probe_does_not_make_an_acquirer_fail(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / runlock.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what is_locked() holds for an instant
    threading.Timer(0.1, os.close, [fd]).start()
    with runlock.acquire(folder) as lock:
        assert lock.held


def test_missing_or_unwritable_folder(tmp_path, monkeypatch):
    assert not runlock.is_locked(tmp_path / "nothing")
    assert runlock.holder(tmp_path / "nothing") is None

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / ".lock"))

    monkeypatch.setattr(runlock.os, "open", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        runlock.acquire(tmp_path / "ro")


# ----------------------------------------------------------------------------- experiment scripts

tiny = test_reliability.tiny  # the fixture: a tiny Sacred experiment and its prepared data


def tiny_cmd(tiny, folder, *extra):
    return [sys.executable, str(tiny["script"]), "with", *TINY_ARGS, f"_base_path={tiny['data']}",
            f"_save_folder={folder}", *extra]


def test_a_run_into_a_folder_held_by_a_live_run_is_refused_at_once(tiny, tmp_path, holders):
    folder = tmp_path / "busy"
    proc, _ = start_holder(folder)  # a run that has not written its first checkpoint yet
    holders.append(proc.pid)
    expected = (f"raug.run.experiment.ConfigError: _save_folder={folder} is in use by a running run "
                f"({runlock.holder(folder).describe()}); wait for it to finish or choose another "
                "_save_folder=<new folder>")
    cli = subprocess.run(tiny_cmd(tiny, folder, "_epochs=1"), capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 1
    assert (cli.stdout + cli.stderr).strip().splitlines() == [expected]  # one line, no traceback
    with pytest.raises(ConfigError, match=r"is in use by a running run"):
        tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=1, _resume=True))
    assert sorted(p.name for p in folder.iterdir()) == [runlock.LOCK_NAME]  # no run folder


def test_resume_into_a_training_run_is_refused_and_a_killed_run_resumes(tiny, tmp_path):
    folder = tmp_path / "live"
    first = subprocess.Popen(tiny_cmd(tiny, folder, "_epochs=40"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TINY_SLEEP": "0.2"})
    try:
        deadline = time.monotonic() + 120
        # the file, not its folder: the folder exists a moment before the atomic rename
        last = folder / "last-checkpoint" / "last-checkpoint.pth"
        while not last.is_file() and time.monotonic() < deadline:
            assert first.poll() is None
            time.sleep(0.2)
        with pytest.raises(ConfigError, match=rf"in use by a running run \(pid {first.pid} on host "):
            tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=40, _resume=True))
        assert not (folder / "2").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left no lock: the run resumes at once, into its own new Sacred run.
    resumed = tiny["ex"].run(config_updates=updates(tiny, folder, _epochs=2, _resume=True))
    assert resumed.status == "COMPLETED"
    assert json.loads((folder / "COMPLETED").read_text())["run_id"] == "2"
    assert not (folder / runlock.LOCK_NAME).exists()


def test_run_training_takes_the_lock_for_programmatic_callers(tmp_path, holders):
    from raug.run.runner import run_training

    folder = tmp_path / "prog"
    proc, _ = start_holder(folder)
    holders.append(proc.pid)
    config = {"_save_folder": str(folder)}
    with pytest.raises(ConfigError, match=rf"_save_folder={folder} is in use by a running run \(pid {proc.pid}"):
        run_training(None, {**_valid_config(tmp_path), **config}, build_task=None)


def _valid_config(tmp_path):
    from raug.run.config import SHARED_CONFIG

    data = write_prepared_dataset(tmp_path / "d", n_train=40, n_test=8, size=36)
    return {**SHARED_CONFIG, "_base_path": str(data), "_device": "cpu", "_num_workers": 0}


@pytest.mark.parametrize("resume", [False, True])
def test_a_live_run_is_named_before_the_finished_run_advice(tmp_path, holders, resume):
    # A live run that already wrote a checkpoint: "add _resume=True" would send the user
    # into a second writer; the config check must name the live run first.
    from raug.run.config import check_save_folder

    folder = tmp_path / "run"
    proc, _ = start_holder(folder)
    holders.append(proc.pid)
    (folder / "last-checkpoint").mkdir()
    (folder / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"is in use by a running run \(pid {proc.pid} "):
        check_save_folder(folder, resume=resume)
    kill(proc.pid)
    proc.wait()
    with pytest.raises(ConfigError, match="already holds a run") if not resume else contextlib.nullcontext():
        check_save_folder(folder, resume=resume)
