"""ISIC 2019 download: resume, verification, extraction, refusals -- all against 127.0.0.1.

A threaded HTTP server in a fixture serves a small synthetic set in the official layout
(the two CSVs and a zip whose top folder is ``ISIC_2019_Training_Input/``); it honours
``Range`` (or ignores it on request), can cut a file's first transfer mid-way, and records
every request so tests can tell a resumed transfer from a restarted one.
"""

import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raug.isic2019 import DownloadError, download, synthesize
from raug.isic2019.download import ARCHIVE, EXTRACTING, content_range
from raug.isic2019.schema import IMAGES_DIR, LABELS_CSV, METADATA_CSV

REPO = Path(__file__).resolve().parents[1]


def official_zip(images: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """The official archive's layout: a top folder with the JPEGs, LICENSE and ATTRIBUTION."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{IMAGES_DIR}/", b"")
        for name, data in {"LICENSE.txt": b"CC-BY-NC\n", "ATTRIBUTION.txt": b"ISIC\n"}.items():
            zf.writestr(f"{IMAGES_DIR}/{name}", data)
        for path in sorted(images.glob("*.jpg")):
            zf.write(path, f"{IMAGES_DIR}/{path.name}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def corrupt(archive: bytes, member: str) -> bytes:
    """Flip one byte inside ``member``'s compressed data (its CRC-32 no longer matches)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = zf.getinfo(member)
    # Local header: 30 bytes + name + extra field, then the data.
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(archive)
    data[start + info.compress_size // 2] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, bytes]:
    """The three official files of an 80-image synthetic set (10 per class at least, enough for
    the preparation's 5 folds), as the server hands them out."""
    root = synthesize(tmp_path_factory.mktemp("official") / "src", num_images=80, image_size=16,
                      seed=7, progress=False)
    return {LABELS_CSV: (root / LABELS_CSV).read_bytes(),
            METADATA_CSV: (root / METADATA_CSV).read_bytes(),
            ARCHIVE: official_zip(root / IMAGES_DIR)}


class Server(ThreadingHTTPServer):
    """What the handler serves and how, and a log of ``(file, Range header, bytes sent)``."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = dict(files)
        self.cut_first: dict[str, int] = {}  # file -> bytes sent before its 1st transfer drops
        self.ignore_range = False
        self.log: list[tuple[str, str | None, int]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/isic/"

    def requested(self, name: str) -> list[tuple[str | None, int]]:
        return [(rng, sent) for file, rng, sent in self.log if file == name]


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self):
        name = self.path.removeprefix("/isic/")
        data, rng = self.server.files.get(name), self.headers.get("Range")
        if data is None:
            self.server.log.append((name, rng, 0))
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
        if self.server.ignore_range or not rng:
            start, status = 0, 200
        elif start >= len(data):
            self.server.log.append((name, rng, 0))
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        else:
            status = 206
        body = data[start:]
        sent = self.server.cut_first.pop(name, len(body))
        self.server.log.append((name, rng, sent))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(body[:sent])  # fewer bytes than announced: the connection drops

    def log_message(self, *args):
        pass


@pytest.fixture
def server(official_files):
    srv = Server(official_files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(root: Path, srv: Server, **kw):
    """``download`` from the test server, quietly; returns the result and the notes."""
    notes: list[str] = []
    kw = {"progress": False, "retry_wait": 0, "timeout": 5, "note": notes.append, **kw}
    return download(root, srv.url, **kw), notes


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_complete(root: Path, official_files: dict[str, bytes]) -> None:
    """``root`` holds exactly the official layout, the bytes the server had, no leftovers."""
    for name in (LABELS_CSV, METADATA_CSV, ARCHIVE):
        assert (root / name).read_bytes() == official_files[name]
    with zipfile.ZipFile(io.BytesIO(official_files[ARCHIVE])) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                assert (root / info.filename).read_bytes() == zf.read(info)
    assert len(list((root / IMAGES_DIR).glob("*.jpg"))) == 80
    assert (root / IMAGES_DIR / "LICENSE.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([LABELS_CSV, METADATA_CSV, ARCHIVE,
                                                             IMAGES_DIR])


# ---------------------------------------------------------------- the happy paths

def test_download_resumes_a_cut_transfer_and_extracts_the_official_layout(
        tmp_path, server, official_files):
    size = len(official_files[ARCHIVE])
    server.cut_first[ARCHIVE] = size // 3
    res, notes = fetch(tmp_path / "ds", server)
    assert_complete(tmp_path / "ds", official_files)
    # Resumed from the cut, not restarted: 1/3 + 2/3 of the archive went over the wire.
    assert server.requested(ARCHIVE) == [(None, size // 3), (f"bytes={size // 3}-", size - size // 3)]
    assert f"{server.url}{ARCHIVE}: transfer cut at {size // 3 / 1e3:.1f} kB (connection closed " \
        "early); retrying in 0 s" in notes
    assert any(n.endswith(f"{ARCHIVE}: resuming at {size // 3 / 1e3:.1f} kB of {size / 1e3:.1f} kB")
               for n in notes)
    assert (res.downloaded, res.extracted, res.images) == ((LABELS_CSV, METADATA_CSV, ARCHIVE),
                                                           82, 80)


def test_rerun_is_a_no_op_without_any_request(tmp_path, server):
    fetch(tmp_path, server)
    before, requests = tree_state(tmp_path), len(server.log)
    res, _ = fetch(tmp_path, server)
    assert (res.downloaded, res.extracted, res.images) == ((), 0, 80)
    assert len(server.log) == requests
    assert tree_state(tmp_path) == before


def test_an_interrupted_run_resumes_on_the_next_run(tmp_path, server, official_files):
    size = len(official_files[ARCHIVE])
    server.cut_first[ARCHIVE] = size // 2
    with pytest.raises(DownloadError, match=r"was cut \(connection closed early, 0 retries\); .*"
                                            r"\.part keeps the .* rerun the same command to resume"):
        fetch(tmp_path, server, retries=0)
    assert (tmp_path / f"{ARCHIVE}.part").stat().st_size == size // 2
    assert not (tmp_path / IMAGES_DIR).exists()
    assert not (tmp_path / ARCHIVE).exists()
    fetch(tmp_path, server)
    assert server.requested(ARCHIVE)[-1] == (f"bytes={size // 2}-", size - size // 2)
    assert_complete(tmp_path, official_files)


def test_a_server_ignoring_range_restarts_the_file_and_says_so(tmp_path, server, official_files):
    size = len(official_files[ARCHIVE])
    server.cut_first[ARCHIVE] = size // 2
    server.ignore_range = True
    _, notes = fetch(tmp_path, server)
    assert server.requested(ARCHIVE) == [(None, size // 2), (f"bytes={size // 2}-", size)]
    assert any("did not resume (no HTTP Range support); restarting it from the beginning" in n
               for n in notes)
    assert_complete(tmp_path, official_files)


def test_a_complete_part_file_is_not_fetched_again(tmp_path, server, official_files):
    # e.g. killed between the last byte and the rename: the server answers 416.
    tmp_path.joinpath(f"{ARCHIVE}.part").write_bytes(official_files[ARCHIVE])
    fetch(tmp_path, server)
    assert server.requested(ARCHIVE) == [(f"bytes={len(official_files[ARCHIVE])}-", 0)]
    assert_complete(tmp_path, official_files)


def test_images_already_extracted_by_hand_need_no_archive(tmp_path, server, official_files):
    with zipfile.ZipFile(io.BytesIO(official_files[ARCHIVE])) as zf:
        zf.extractall(tmp_path)
    res, _ = fetch(tmp_path, server)
    assert server.requested(ARCHIVE) == []
    assert (res.downloaded, res.extracted) == ((LABELS_CSV, METADATA_CSV), 0)


def test_leftovers_of_a_killed_extraction_are_replaced_and_strays_ignored(
        tmp_path, server, official_files):
    src = tmp_path / "src"
    with zipfile.ZipFile(io.BytesIO(official_files[ARCHIVE])) as zf:
        zf.extractall(src)
    server.files[ARCHIVE] = official_zip(src / IMAGES_DIR, {"__MACOSX/._ISIC_0000000.jpg": b"x"})
    root = tmp_path / "ds"
    stale = root / EXTRACTING / IMAGES_DIR / "ISIC_9999999.jpg"  # as a kill -9 leaves it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    res, notes = fetch(root, server)
    assert res.extracted == 82
    assert not (root / EXTRACTING).exists()
    assert not (root / IMAGES_DIR / stale.name).exists()
    assert not (root / "__MACOSX").exists()
    assert f"{root / ARCHIVE}.part: ignoring what lies outside {IMAGES_DIR}/ (1 entry: " \
        "'__MACOSX/._ISIC_0000000.jpg')" in notes


# ---------------------------------------------------------------- refusals

def test_a_corrupt_archive_is_refused_and_nothing_is_extracted(tmp_path, server, official_files):
    server.files[ARCHIVE] = corrupt(official_files[ARCHIVE], f"{IMAGES_DIR}/LICENSE.txt")
    with pytest.raises(DownloadError, match=rf"{ARCHIVE}.part is corrupt \(Bad CRC-32 for file "
                                            rf"'{IMAGES_DIR}/LICENSE.txt'\).* removed, rerun"):
        fetch(tmp_path, server)
    # The CSVs are complete and verified; no archive, no image folder, no temporary left.
    assert sorted(p.name for p in tmp_path.iterdir()) == [LABELS_CSV, METADATA_CSV]


def test_an_existing_corrupt_archive_is_named_and_kept(tmp_path, server, official_files):
    bad = corrupt(official_files[ARCHIVE], f"{IMAGES_DIR}/ATTRIBUTION.txt")
    (tmp_path / ARCHIVE).write_bytes(bad)
    with pytest.raises(DownloadError, match=rf"{ARCHIVE} is corrupt"):
        fetch(tmp_path, server)
    assert (tmp_path / ARCHIVE).read_bytes() == bad
    assert not (tmp_path / IMAGES_DIR).exists()
    assert server.requested(ARCHIVE) == []


def test_an_archive_missing_a_listed_image_is_refused_and_kept(tmp_path, server, official_files):
    with zipfile.ZipFile(io.BytesIO(official_files[ARCHIVE])) as zf:
        first = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[0]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as out:
            for info in zf.infolist():
                if info.filename != first:
                    out.writestr(info, zf.read(info))
    server.files[ARCHIVE] = buf.getvalue()
    image = Path(first).stem
    with pytest.raises(DownloadError, match=rf"lacks 1 image\(s\) listed in .*\('{image}'\)"):
        fetch(tmp_path, server)
    assert (tmp_path / ARCHIVE).read_bytes() == buf.getvalue()  # intact: no second download
    assert not (tmp_path / IMAGES_DIR).exists()
    with pytest.raises(DownloadError, match=image):
        fetch(tmp_path, server)
    assert len(server.requested(ARCHIVE)) == 1


def test_archive_paths_leaving_the_folder_are_refused(tmp_path, server, official_files):
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(io.BytesIO(official_files[ARCHIVE])) as zf:
        zf.extractall(src)
    server.files[ARCHIVE] = official_zip(src / IMAGES_DIR, {f"{IMAGES_DIR}/../evil.sh": b"x"})
    with pytest.raises(DownloadError, match=r"refusing member path .*\.\./evil\.sh"):
        fetch(tmp_path / "ds", server)
    assert not (tmp_path / "evil.sh").exists()
    assert not (tmp_path / "ds" / IMAGES_DIR).exists()


def test_existing_files_that_differ_stop_the_run_untouched(tmp_path, server, official_files):
    (tmp_path / LABELS_CSV).write_text("image,melanoma\nISIC_1,1\n")
    before = tree_state(tmp_path)
    with pytest.raises(DownloadError, match=rf"{LABELS_CSV} exists but is not the official file \(move "
                                            r"it away .*\): its header 'image,melanoma' lacks MEL"):
        fetch(tmp_path, server)
    assert tree_state(tmp_path) == before
    assert server.log == []

    other = tmp_path / "other"
    fetch(other, server)
    victim = sorted((other / IMAGES_DIR).glob("*.jpg"))[3]
    victim.unlink()
    before = tree_state(other)
    with pytest.raises(DownloadError, match=rf"{IMAGES_DIR} exists but lacks 1 image\(s\) .*"
                                            rf"{victim.stem}.*move it away"):
        fetch(other, server)
    assert tree_state(other) == before


def test_a_synthetic_folder_is_refused(tmp_path, server):
    root = synthesize(tmp_path / "syn", num_images=10, image_size=16, seed=0, progress=False)
    with pytest.raises(DownloadError, match="holds a synthetic data set"):
        fetch(root, server)
    assert server.log == []


def test_a_wrong_file_from_the_server_is_not_kept(tmp_path, server):
    server.files[METADATA_CSV] = b"<html>Access denied</html>\n"
    with pytest.raises(DownloadError, match=rf"{METADATA_CSV} did not send the official file"):
        fetch(tmp_path, server)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LABELS_CSV]


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, server, official_files,
                                                         monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(DownloadError, match=r"not enough free space in .*: .* needed, 100 B free"):
        fetch(tmp_path, server)
    assert list(tmp_path.iterdir()) == []
    # Room for the archive but not for its extraction next to it: refused before downloading.
    free = int(1.5 * len(official_files[ARCHIVE]))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=free))
    with pytest.raises(DownloadError, match=r"needed \(the archive and its extracted images\)"):
        fetch(tmp_path, server)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LABELS_CSV, METADATA_CSV]


def test_http_errors_and_an_offline_server_fail_fast_naming_the_url(tmp_path, server):
    del server.files[LABELS_CSV]
    with pytest.raises(DownloadError, match=rf"{re.escape(server.url + LABELS_CSV)} answered "
                                            "HTTP 404"):
        fetch(tmp_path, server)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=rf"cannot download {re.escape(url + LABELS_CSV)} "
                                            r"\(.*refused\): check the network .* by hand into "
                                            rf"{re.escape(str(tmp_path / 'new'))} .* --base-url"):
        download(tmp_path / "new", url, progress=False)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "new").exists()  # no empty folder left behind
    with pytest.raises(DownloadError, match="must be an http"):
        download(tmp_path, "file:///tmp/isic/", progress=False)


def test_content_range_parsing():
    assert content_range("bytes 100-199/200") == (100, 200)
    assert content_range("bytes */200") == (None, 200)
    assert content_range(None) == (None, None)
    assert content_range("bytes 1-2") == (None, None)


# ---------------------------------------------------------------- command lines

def test_cli_download_then_prepare_in_one_command(tmp_path, server):
    proc = subprocess.run(["bash", str(REPO / "run_preprocess.sh"), "--download", "--base-url",
                           server.url, "--root", "ds", "--size", "16", "--workers", "1",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"downloaded {LABELS_CSV}, {METADATA_CSV}, {ARCHIVE}; extracted 82 files" in proc.stdout
    info = json.loads((tmp_path / "ds" / "prep_info.json").read_text())
    assert info["num_train"] + info["num_test"] == 80
    assert info["official_counts"] is False


def test_cli_download_reports_errors_in_one_line(tmp_path, server):
    cli = [sys.executable, str(REPO / "data" / "ISIC2019" / "download.py"), "--no-progress"]
    ok = subprocess.run([*cli, "--root", "ds", "--base-url", server.url], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "next: bash run_preprocess.sh --root ds" in ok.stdout
    again = subprocess.run([*cli, "--root", "ds", "--base-url", server.url], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "already holds the ISIC 2019 training files (80 images); nothing to do" in again.stdout
    bad = subprocess.run([*cli, "--root", "bad", "--base-url", server.url + "missing/"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ")
    assert bad.stderr.count("\n") == 1
    refused = subprocess.run(["bash", str(REPO / "run_preprocess.sh"), "--base-url", server.url,
                              "--root", "ds"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    assert "--base-url only applies with --download" in refused.stderr
