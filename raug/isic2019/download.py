"""Download the official ISIC 2019 training files into the layout ``run_preprocess.sh`` reads.

    python data/ISIC2019/download.py --root DIR [--base-url URL]
    bash run_preprocess.sh --download [--root DIR] [--base-url URL] ...

Fetches ``ISIC_2019_Training_GroundTruth.csv``, ``ISIC_2019_Training_Metadata.csv`` and
``ISIC_2019_Training_Input.zip`` (about 9 GB) from the challenge's public bucket
(:data:`DEFAULT_BASE_URL`; ``--base-url`` points elsewhere, e.g. a mirror or a test
server) and extracts the archive into ``DIR/ISIC_2019_Training_Input/``.

How it keeps the user's data safe and a rerun cheap:

* each file is downloaded into ``DIR/<name>.part``, resumed with an HTTP ``Range``
  request after an interruption (a server that ignores ``Range`` restarts that file, and
  says so), checked, and only then renamed to ``<name>``;
* the archive's every member is read and CRC-checked, its paths checked, and every
  ground-truth id must have its image in it before anything is extracted; extraction goes
  into the sibling ``DIR/.ISIC_2019_Training_Input.extracting/``, renamed into place only
  when complete, so a failure or ``Ctrl-C`` leaves no half-extracted folder;
* existing files are never overwritten or deleted: one that checks out is kept (so a
  rerun downloads nothing), one that does not stops the run with a message naming it;
  only the tool's own ``.part`` files and extraction folder are ever removed.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from raug.isic2019.schema import (
    GT_CLASSES,
    IMAGE_EXT,
    IMAGES_DIR,
    LABELS_CSV,
    METADATA_CSV,
    METADATA_HEADER,
)
from raug.isic2019.synthesize import MARKER
from raug.isic2019.tables import listing

DEFAULT_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2019/"
ARCHIVE = f"{IMAGES_DIR}.zip"
PART_SUFFIX = ".part"
EXTRACTING = f".{IMAGES_DIR}.extracting"
# Columns a file must have to count as the official CSV (preparation needs no more).
CSV_COLUMNS = {LABELS_CSV: ("image", *GT_CLASSES), METADATA_CSV: METADATA_HEADER}
TIMEOUT_S = 15.0  # per socket operation (connect, each read); pip's default, as for the weights
RETRIES = 3
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+)")


class DownloadError(RuntimeError):
    """The download cannot go on; the message says why and what to do."""


class CorruptArchive(DownloadError):
    """The archive is not a readable zip, or a member fails its CRC check."""


class _TransferCut(Exception):
    """The connection ended before the whole file arrived (retried, resuming)."""


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` did."""

    root: Path
    downloaded: tuple[str, ...]  # files transferred by this run
    extracted: int  # files extracted by this run (0: the image folder was already there)
    images: int  # ground-truth images present in the image folder


def say(message: str) -> None:
    """Default channel for notes to the user (stderr, next to the progress bars)."""
    print(message, file=sys.stderr, flush=True)


def download(
    root: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    *,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    retry_wait: float = 2.0,
    note: Callable[[str], None] = say,
) -> DownloadResult:
    """Download and extract the ISIC 2019 training files into ``root``; a rerun is a no-op.

    Args:
        root: dataset folder (created); afterwards it holds the two official CSVs and
            ``ISIC_2019_Training_Input/`` (plus the archive, kept for the user to delete).
        base_url: folder URL holding the three files (``http``/``https``).
        progress: show progress bars.
        timeout: seconds a connection or a read may stall before failing.
        retries: automatic resumptions of a transfer that was cut.
        retry_wait: seconds before the first resumption (doubled after each).
        note: where to send notes (resumption, restart, ignored archive entries).

    Returns:
        A :class:`DownloadResult`.

    Raises:
        DownloadError: network failure, refused or corrupt download, not enough disk
            space, or an existing file that differs from the official one; nothing in
            ``root`` is overwritten and nothing half-extracted is left in place.
    """
    root = Path(root)
    base = _base_url(base_url)
    if root.exists() and not root.is_dir():
        raise DownloadError(f"--root {root} is not a folder")
    _refuse_synthetic(root)
    fetch = _Fetcher(progress, timeout, retries, retry_wait, note)
    downloaded = [name for name in (LABELS_CSV, METADATA_CSV) if _get_csv(fetch, base, root, name)]
    ids = ground_truth_ids(root / LABELS_CSV)
    if (root / IMAGES_DIR).exists():
        check_image_folder(root / IMAGES_DIR, ids)
        return DownloadResult(root, tuple(downloaded), 0, len(ids))
    archive = root / ARCHIVE
    if archive.exists():
        check_archive(archive, ids, progress, note)
    else:
        _download_archive(fetch, base + ARCHIVE, archive, ids, progress, note)
        downloaded.append(ARCHIVE)
    extracted = extract(archive, root, ids, progress)
    return DownloadResult(root, tuple(downloaded), extracted, len(ids))


def _get_csv(fetch: _Fetcher, base: str, root: Path, name: str) -> bool:
    """Make sure ``root/name`` is there and looks official; True when it was downloaded."""
    target = root / name
    if target.exists():
        check_csv(target, f"{target} exists but is not the official file (move it away or "
                          "choose another --root)")
        return False
    part = fetch(base + name, root / (name + PART_SUFFIX))
    try:
        check_csv(part, f"{base + name} did not send the official file; check --base-url")
    except DownloadError:
        part.unlink()  # e.g. an error page: resuming it later would only append to it
        raise
    part.rename(target)
    return True


def _download_archive(fetch: _Fetcher, url: str, archive: Path, ids: list[str],
                      progress: bool, note: Callable[[str], None]) -> None:
    # Room for the archive and, next to it, its extracted images (JPEGs barely compress).
    part = fetch(url, archive.with_name(archive.name + PART_SUFFIX), room_for_extraction=True)
    try:
        check_archive(part, ids, progress, note)
    except CorruptArchive as exc:
        # A corrupt transfer can only be fetched again; keeping it would make every rerun
        # resume a complete, broken file.
        part.unlink()
        raise CorruptArchive(f"{exc}; the download was removed, rerun to fetch it again") from None
    except DownloadError:
        # Intact but not matching the CSVs: keep it, a rerun reports the same without
        # downloading 9 GB again.
        part.rename(archive)
        raise
    part.rename(archive)


# ---------------------------------------------------------------- HTTP

class _Fetcher:
    """Download one URL into a ``.part`` file, resuming what it already holds."""

    def __init__(self, progress: bool, timeout: float, retries: int, retry_wait: float,
                 note: Callable[[str], None]) -> None:
        self.progress, self.timeout, self.note = progress, timeout, note
        self.retries, self.retry_wait = retries, retry_wait

    def __call__(self, url: str, part: Path, room_for_extraction: bool = False) -> Path:
        """Complete ``part`` from ``url``, resuming after cuts; returns ``part``.

        ``room_for_extraction``: the free-space check also reserves the file's size again.
        """
        for attempt in range(self.retries + 1):
            try:
                self._once(url, part, room_for_extraction)
                return part
            except _TransferCut as exc:
                have = _size(part)
                if attempt == self.retries:
                    raise DownloadError(
                        f"download of {url} was cut ({exc}, {attempt} retries); {part} keeps the "
                        f"{human(have)} received: rerun the same command to resume") from None
                wait = self.retry_wait * 2 ** attempt
                self.note(f"{url}: transfer cut at {human(have)} ({exc}); retrying in {wait:g} s")
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _once(self, url: str, part: Path, room_for_extraction: bool) -> None:
        have = _size(part)
        try:
            resp = _open(url, have, self.timeout, part.parent)
        except HTTPError as exc:
            exc.close()
            if exc.code != 416 or not have:
                raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the "
                                    "address (--base-url)") from None
            # 416: nothing from byte `have` on. Complete if the file is exactly that long.
            if content_range(exc.headers.get("Content-Range"))[1] == have:
                return
            self.note(f"{part} is longer than {url}: restarting it")
            part.unlink()
            return self._once(url, part, room_for_extraction)
        with resp:
            start, total = _response_range(resp, have)
            if have and start == 0:
                self.note(f"{url}: the server did not resume (no HTTP Range support); "
                          "restarting it from the beginning")
            elif start:
                self.note(f"{url}: resuming at {human(start)} of {human(total)}")
            # Created only now: an offline run leaves no empty folder behind.
            part.parent.mkdir(parents=True, exist_ok=True)
            if total is not None:
                needed, what = total - start, ""
                if room_for_extraction:
                    needed, what = needed + total, "the archive and its extracted images"
                check_free_space(part.parent, needed, what)
            self._receive(resp, part, start, total)

    def _receive(self, resp, part: Path, start: int, total: int | None) -> None:
        with open(part, "r+b" if start else "wb") as fh, tqdm(
                total=total, initial=start, unit="B", unit_scale=True,
                desc=part.name.removesuffix(PART_SUFFIX), disable=not self.progress,
                file=sys.stderr) as bar:
            fh.seek(start)
            fh.truncate()
            while chunk := _read(resp):
                fh.write(chunk)  # a full disk raises here, not as a "cut" transfer
                bar.update(len(chunk))
        if total is not None and _size(part) < total:
            raise _TransferCut("connection closed early")


def _read(resp) -> bytes:
    """The next chunk of the body; a reset or stalled connection is a cut transfer."""
    try:
        return resp.read(_CHUNK)
    except (http.client.HTTPException, OSError) as exc:
        raise _TransferCut(f"{type(exc).__name__}: {exc}") from None


def _open(url: str, have: int, timeout: float, folder: Path):
    """``urlopen`` asking for the bytes from ``have`` on; network failures -> DownloadError.

    The error names ``folder``, where a file downloaded by hand would go.
    """
    headers = {"User-Agent": "ssdkd-isic-download/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError:
        raise
    except (URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot download {url} ({reason}): check the network connection, or download "
            f"the file by hand into {folder} and rerun, or give a mirror with --base-url"
        ) from None


def _response_range(resp, have: int) -> tuple[int, int | None]:
    """``(offset of the body, total size or None)`` of a 200 or 206 response."""
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        start, total = content_range(resp.headers.get("Content-Range"))
        if start != have:
            raise _TransferCut(f"server resumed at byte {start}, expected {have}")
        return start, total
    return 0, int(length) if length is not None else None


def content_range(header: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total)`` of a ``Content-Range: bytes a-b/total`` (or ``bytes */total``)."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if not match:
        return None, None
    return (int(match[1]) if match[1] else None), int(match[2])


def _base_url(url: str) -> str:
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"--base-url must be an http:// or https:// address, got {url!r}")
    return url if url.endswith("/") else url + "/"


# ---------------------------------------------------------------- checks

def _refuse_synthetic(root: Path) -> None:
    if (root / MARKER).exists():
        raise DownloadError(f"{root} holds a synthetic data set ({MARKER}); download the real "
                            "one into another folder (--root)")


def check_csv(path: Path, problem: str) -> None:
    """Raise ``DownloadError(problem + details)`` unless ``path`` has the official header."""
    required = CSV_COLUMNS[path.name.removesuffix(PART_SUFFIX)]
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = [c.strip() for c in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DownloadError(f"{problem}: not a UTF-8 CSV ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DownloadError(f"{problem}: its header {','.join(header)[:120]!r} lacks "
                            f"{', '.join(missing)}")


def ground_truth_ids(path: Path) -> list[str]:
    """The image ids of a (header-checked) ground-truth CSV, in file order."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        col = [c.strip() for c in next(rows)].index("image")
        return [row[col].strip() for row in rows if row]


def check_image_folder(folder: Path, ids: list[str]) -> None:
    """Every ground-truth id must have its JPEG in ``folder`` (which is left as it is)."""
    missing = [i for i in ids if not (folder / f"{i}{IMAGE_EXT}").is_file()]
    if missing:
        raise DownloadError(
            f"{folder} exists but lacks {len(missing)} image(s) of {LABELS_CSV} "
            f"({listing(missing)}); move it away and rerun to extract the archive afresh")


def archive_members(zf: zipfile.ZipFile, note: Callable[[str], None]) -> list[zipfile.ZipInfo]:
    """The archive's files under ``ISIC_2019_Training_Input/``, paths checked.

    Raises:
        CorruptArchive: a member path that could escape the target folder.
    """
    members, outside = [], []
    for info in zf.infolist():
        path = PurePosixPath(info.filename)
        if info.filename.startswith("/") or "\\" in info.filename or ".." in path.parts:
            raise CorruptArchive(f"{zf.filename}: refusing member path {info.filename!r}")
        if path.parts[:1] != (IMAGES_DIR,):
            outside.append(info.filename)
        elif not info.is_dir():
            members.append(info)
    if outside:
        count = f"{len(outside)} {'entry' if len(outside) == 1 else 'entries'}"
        note(f"{zf.filename}: ignoring what lies outside {IMAGES_DIR}/ ({count}: "
             f"{listing(outside)})")
    return members


def check_archive(path: Path, ids: list[str], progress: bool,
                  note: Callable[[str], None]) -> None:
    """Check ``path`` is a sound zip holding an image for every ground-truth id.

    Reads every member (zipfile checks each CRC-32 at its end), as ``ZipFile.testzip`` does,
    with a progress bar.

    Raises:
        CorruptArchive: not a zip, a bad member path or a member that fails its check.
        DownloadError: images of the ground truth missing from the archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = archive_members(zf, note)
            names = {info.filename for info in members}
            missing = [i for i in ids if f"{IMAGES_DIR}/{i}{IMAGE_EXT}" not in names]
            if missing:
                raise DownloadError(
                    f"{path} lacks {len(missing)} image(s) listed in {LABELS_CSV} "
                    f"({listing(missing)})")
            _stream(zf, members, progress, f"verify {path.name.removesuffix(PART_SUFFIX)}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise CorruptArchive(f"{path} is corrupt ({exc})") from None


def _stream(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], progress: bool, desc: str,
            into: Path | None = None) -> None:
    """Read every member to its end (zipfile then checks its CRC-32), writing it under ``into``.

    Raises:
        zipfile.BadZipFile, zlib.error, EOFError: a damaged member.
    """
    with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True,
              desc=desc, disable=not progress, file=sys.stderr) as bar:
        for info in members:
            target = None if into is None else into.joinpath(*PurePosixPath(info.filename).parts)
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, (open(target, "wb") if target else nullcontext()) as out:
                while chunk := src.read(_CHUNK):
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))


def check_free_space(folder: Path, needed: int, what: str = "") -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when they do not fit."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(f"not enough free space in {folder}: {human(needed)} needed"
                            f"{f' ({what})' if what else ''}, {human(free)} free")


# ---------------------------------------------------------------- extraction

def extract(archive: Path, root: Path, ids: list[str], progress: bool = True) -> int:
    """Extract ``archive`` (already checked) into ``root/ISIC_2019_Training_Input``.

    Everything goes into ``root/.ISIC_2019_Training_Input.extracting`` first and is renamed
    into place only when complete, so an error or interrupt leaves nothing half-extracted.

    Returns:
        The number of files extracted.
    """
    tmp = root / EXTRACTING
    if tmp.exists():  # left by a killed run; the name is this tool's own
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = archive_members(zf, lambda _: None)
            check_free_space(root, sum(m.file_size for m in members), "the extracted images")
            _stream(zf, members, progress, f"extract {archive.name}", into=tmp)
        check_image_folder(tmp / IMAGES_DIR, ids)
        (tmp / IMAGES_DIR).rename(root / IMAGES_DIR)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise CorruptArchive(f"{archive} is corrupt ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(members)


# ---------------------------------------------------------------- helpers and CLI

def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def human(n: int | None) -> str:
    """``9.1 GB``-style size (decimal units, as download sizes are usually given)."""
    if n is None:
        return "unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def build_parser(default_root: str | Path | None = None) -> argparse.ArgumentParser:
    """Command-line interface of ``data/ISIC2019/download.py``."""
    p = argparse.ArgumentParser(
        description="Download the official ISIC 2019 training files (images archive ~9 GB, "
                    "ground truth, metadata) into --root, resuming interrupted transfers, "
                    "and extract them into the layout run_preprocess.sh reads.")
    p.add_argument("--root", type=Path, default=default_root, required=default_root is None,
                   help="dataset folder" + (f" (default: {default_root})" if default_root else ""))
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"folder URL of the three files (default {DEFAULT_BASE_URL})")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S,
                   help=f"seconds a connection may stall before failing (default {TIMEOUT_S:g})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run(root: Path, base_url: str, progress: bool = True, timeout: float = TIMEOUT_S) -> int:
    """Download with user-facing messages; returns the exit status (0, 2 on errors, 130)."""
    try:
        res = download(root, base_url, progress=progress, timeout=timeout)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the local side: permissions, a full disk mid-way
        print(f"error: {exc}; partial downloads (*{PART_SUFFIX}) in {root} resume on a rerun",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing half-extracted is left; partial downloads stay in {root} "
              f"as *{PART_SUFFIX}: rerun the same command to resume", file=sys.stderr)
        return 130
    if not res.downloaded and not res.extracted:
        print(f"{root} already holds the ISIC 2019 training files ({res.images:,} images); "
              "nothing to do")
        return 0
    done = [f"downloaded {', '.join(res.downloaded)}"] if res.downloaded else []
    done += [f"extracted {res.extracted:,} files"] if res.extracted else []
    print(f"{'; '.join(done)}: {res.images:,} images in {root / IMAGES_DIR}")
    if res.extracted:
        print(f"{root / ARCHIVE} ({human(_size(root / ARCHIVE))}) is no longer needed and may be "
              "deleted")
    return 0


def main(argv: list[str] | None = None, default_root: str | Path | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser(default_root).parse_args(argv)
    code = run(args.root, args.base_url, progress=not args.no_progress, timeout=args.timeout)
    if code == 0:
        print(f"next: bash run_preprocess.sh --root {args.root}")
    return code


if __name__ == "__main__":
    sys.exit(main())
