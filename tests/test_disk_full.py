"""A full disk or an unwritable save folder (issue #20, items 6 and 7): one line, nothing lost.

Where the machine allows it (root, ``mount``), the file systems are real: a small tmpfs
filled up during a run, a read-only tmpfs. Elsewhere those tests skip, and the writer-level
tests below (a writer that raises what torch or Python raise on a full disk) still run.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_reliability
import torch
from test_reliability import TINY_ARGS, updates

from raug.errors import ConfigError
from raug.files import atomic, runlock
from raug.files.atomic import DiskFullError, atomic_write_bytes, atomic_write_with
from raug.files.checkpoint import load_checkpoint, save_checkpoint
from raug.run.experiment import StorageError

tiny = test_reliability.tiny  # the fixture: a tiny Sacred experiment and its prepared data


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size, readonly=False) -> mount point`` of a fresh tmpfs; skips where mounting fails."""
    mounts: list[Path] = []

    def make(size: str, readonly: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield make
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as fh:  # unbuffered: close() has nothing left
        written = 1
        while written:
            try:
                written = fh.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                written = 0


def one_line(path: Path) -> str:
    """The message of a DiskFullError for ``path``, as a regular expression."""
    return rf"^disk full: cannot write {re.escape(str(path))} \([\d.]+ [KMGT]?i?B free in {re.escape(str(path.parent))}\)$"


# ----------------------------------------------------------------------------- writers


def test_a_full_file_system_raises_disk_full_and_keeps_the_old_file(tmpfs):
    fs = tmpfs("64k")
    atomic_write_bytes(fs / "a.bin", b"old")
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(fs / "a.bin", b"x" * 200_000)
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value, OSError)
    assert re.match(one_line(fs / "a.bin"), str(info.value))
    assert info.value.free_bytes < 64 * 1024
    assert (fs / "a.bin").read_bytes() == b"old"
    assert files(fs) == ["a.bin"]  # the temporary file is gone


def test_torch_checkpoint_on_a_full_file_system(tmpfs):
    fs = tmpfs("128k")
    path = fs / "last-checkpoint" / "last-checkpoint.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(1000.0)})
    with pytest.raises(DiskFullError) as info:  # not torch's "RuntimeError: [enforce fail ..."
        save_checkpoint(path, {"epoch": 2, "w": torch.arange(100_000.0)})
    assert not isinstance(info.value, RuntimeError)
    assert re.match(one_line(path), str(info.value))
    kept = load_checkpoint(path)
    assert kept["epoch"] == 1
    assert torch.equal(kept["w"], torch.arange(1000.0))
    assert files(fs) == ["last-checkpoint/last-checkpoint.pth"]


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def raise_oserror(tmp):
    tmp.write_bytes(b"partial")
    raise enospc()


def raise_torch_chained(tmp):
    # torch.save into a Python file object on a full disk: ENOSPC is the chain's context.
    tmp.write_bytes(b"partial")
    try:
        raise enospc()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def raise_quota(tmp):
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


@pytest.mark.parametrize("writer", [raise_oserror, raise_torch_chained, raise_quota])
def test_every_form_of_a_full_disk_becomes_one_disk_full_error(tmp_path, writer):
    target = tmp_path / "out" / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(DiskFullError, match=one_line(target)):
        atomic_write_with(target, writer)
    assert target.read_bytes() == b"old"
    assert files(tmp_path / "out") == ["f.bin"]


def test_torch_writer_failure_without_errno_counts_only_on_a_full_disk(tmp_path, monkeypatch):
    # torch.save(path) reports a full disk as "iostream error" / "enforce fail" and no errno.
    def torch_path_writer(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    target = tmp_path / "f.pth"
    with pytest.raises(RuntimeError, match="enforce fail") as info:  # plenty of space: not a full disk
        atomic_write_with(target, torch_path_writer)
    assert not isinstance(info.value, DiskFullError)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 512)
    with pytest.raises(DiskFullError, match=r"\(512 B free in "):
        atomic_write_with(target, torch_path_writer)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through_unchanged(tmp_path):
    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        atomic_write_with(tmp_path / "f", denied)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- runs


def test_disk_full_during_training_ends_in_one_line_and_keeps_the_last_checkpoint(tiny, tmpfs):
    fs = tmpfs("1m")
    folder = fs / "run"
    cmd = [sys.executable, str(tiny["script"]), "with", *TINY_ARGS, f"_base_path={tiny['data']}",
           f"_save_folder={folder}", "_epochs=40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TINY_SLEEP": "0.1"})
    try:
        deadline = time.monotonic() + 120
        while not (folder / "last-checkpoint").is_dir() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        fill(fs)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == 1
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"raug.run.experiment.StorageError: disk full: cannot write {folder}/")
    assert "; the run stopped, the last good checkpoint " in last_line
    assert last_line.endswith(" is intact: free some space, then continue with _resume=True")
    assert "Traceback" not in out + err
    assert "enforce fail" not in out + err
    (fs / "filler").unlink()
    assert load_checkpoint(folder / "last-checkpoint" / "last-checkpoint.pth")["epoch"] >= 1
    assert load_checkpoint(folder / "best-checkpoint" / "best-checkpoint.pth")["epoch"] >= 1
    assert not [f for f in files(fs) if f.endswith(".tmp")]
    run = json.loads((folder / "1" / "run.json").read_text())  # never cut: written atomically
    assert run["status"] in ("RUNNING", "FAILED")
    table = subprocess.run([sys.executable, "-m", "raug.report.runs", str(fs)], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr


def test_a_failed_start_of_the_sacred_record_is_one_error_not_two(tiny, tmp_path, monkeypatch, caplog):
    from sacred.observers import FileStorageObserver

    def no_space(self, _id):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "1"))

    monkeypatch.setattr(FileStorageObserver, "_make_run_dir", no_space)
    with pytest.raises(StorageError, match=rf"^disk full: cannot record the Sacred run in "
                                           rf"{tmp_path / 'out'} \([\d.]+ [KMGT]?i?B free\)$"):
        tiny["ex"].run(config_updates=updates(tiny, tmp_path / "out"))
    # Sacred's failed event used to meet a delegate that never started: a second TypeError.
    assert "TypeError" not in caplog.text
    assert not runlock.is_locked(tmp_path / "out")


def test_a_disk_full_before_the_run_is_one_line_and_leaves_no_folder(tiny, tmpfs):
    fs = tmpfs("64k")
    fill(fs)
    folder = fs / "results" / "run"
    with pytest.raises(ConfigError, match=rf"^_save_folder={folder} cannot be written \(No space "
                                          rf"left on device: {fs / 'results'}"):
        tiny["ex"].run(config_updates=updates(tiny, folder))
    assert files(fs) == ["filler"]
    assert not (fs / "results").exists()


# ----------------------------------------------------------------------------- unwritable folder


def test_read_only_save_folder_is_one_line(tiny, tmpfs):
    ro = tmpfs("64k", readonly=True)
    cmd = [sys.executable, str(tiny["script"]), "with", *TINY_ARGS, f"_base_path={tiny['data']}",
           f"_save_folder={ro / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert (done.stdout + done.stderr).strip().splitlines() == [
        f"raug.run.experiment.ConfigError: _save_folder={ro / 'run'} cannot be written (Read-only file "
        f"system: {ro / 'run'}); choose a writable _save_folder=<folder>"]


def test_unwritable_save_folder_is_refused_before_the_run(tiny, tmp_path, monkeypatch):
    # Root ignores chmod 0555, so the refusal is simulated here (the read-only tmpfs above
    # is the real thing where the machine allows mounting).
    folder = tmp_path / "locked-away"

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runlock, "acquire", denied)
    with pytest.raises(ConfigError, match=rf"^_save_folder={folder} cannot be written \(Permission "
                                          rf"denied: {folder}\); choose a writable"):
        tiny["ex"].run(config_updates=updates(tiny, folder))
    assert not folder.exists()


def test_a_file_in_the_way_of_the_save_folder_is_named(tiny, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("notes")
    for folder in (blocker, blocker / "run"):
        with pytest.raises(ConfigError, match=rf"^_save_folder={folder} cannot be written \(a file is "
                                              rf"in the way: {blocker}\); choose a writable"):
            tiny["ex"].run(config_updates=updates(tiny, folder))
    assert blocker.read_text() == "notes"
