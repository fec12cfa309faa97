"""Turn the official ISIC 2019 files into the parsed train/test CSVs and image folders.

Order of work, so that bad input leaves nothing behind and a crash leaves no
half-written file:

1. validate and merge the CSVs (``tables.load_table``), check every listed
   image exists, compute the split (``splits``) -- nothing written yet;
2. fully decode every source image that needs (re)processing -- still nothing
   written; any failure raises ``DataError`` naming the images;
3. remove ``prep_info.json`` (the completion marker) if anything will change,
   write the images (each atomically), then the CSVs, prune outputs of a
   previous run that the new split no longer lists, and write
   ``prep_info.json`` last.

Reruns reuse finished images: ``.prep_manifest.json`` records, per output
file, the source's size and mtime, the requested ``size``, the encoder and the
output's byte length; an output is redone only when one of them changed.
Identical CSV/JSON files are not rewritten, so a rerun on unchanged input
writes nothing at all. Sources are only ever read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from raug.files.atomic import atomic_write_bytes
from raug.isic2019.download import DEFAULT_BASE_URL
from raug.isic2019.download import run as run_download
from raug.isic2019.fileio import remove_stale_temps, sha256_bytes, write_if_changed
from raug.isic2019.images import ENCODER, ImageTask, encode_image, inspect_image
from raug.isic2019.parallel import default_workers, ordered_map
from raug.isic2019.schema import (
    CLASS_NAMES,
    IMAGE_EXT,
    IMAGES_DIR,
    LABELS_CSV,
    METADATA_CSV,
    N_FOLDS,
    PREP_INFO,
    PREP_MANIFEST,
    PREPARED_IMAGES_DIR,
    REAL_CLASS_COUNTS,
    SPLIT_SEED,
    TEST_COLUMNS,
    TEST_CSV,
    TEST_DIR,
    TEST_SIZE,
    TRAIN_COLUMNS,
    TRAIN_CSV,
    TRAIN_DIR,
    DataError,
    DataWarning,
)
from raug.isic2019.splits import assign_folds, split_test
from raug.isic2019.tables import listing, load_table

DEFAULT_SIZE = 320
INFO_VERSION = 1
_MANIFEST_VERSION = 1
_MANIFEST_EVERY_S = 30.0

SPLIT_CALLS = {
    False: (f"train_test_split(test_size={TEST_SIZE}, random_state={SPLIT_SEED}, shuffle=True); "
            f"StratifiedKFold(n_splits={N_FOLDS}, shuffle=True, random_state={SPLIT_SEED})"),
    True: (f"GroupShuffleSplit(n_splits=1, test_size={TEST_SIZE}, random_state={SPLIT_SEED}); "
           f"StratifiedGroupKFold(n_splits={N_FOLDS}, shuffle=True, random_state={SPLIT_SEED}); "
           "groups = lesion_id, or the image itself when empty"),
}


@dataclass(frozen=True)
class PrepResult:
    """What a preparation produced and how much work it did."""

    base_path: Path
    info: dict
    written: int
    reused: int
    removed: int
    cleaned: int = 0  # temporaries of killed earlier runs, deleted


def prepare(
    root: str | Path,
    size: int | None = DEFAULT_SIZE,
    workers: int | None = None,
    group_by_lesion: bool = False,
    progress: bool = True,
) -> PrepResult:
    """Prepare ``root`` (official ISIC 2019 files) into ``root/train`` and ``root/test``.

    Args:
        root: folder holding the official CSVs and ``ISIC_2019_Training_Input/``.
        size: shorter side of the stored images in px (aspect kept, never upscaled);
            ``None`` copies the originals unchanged.
        workers: processes for image work (default ``min(4, CPUs)``).
        group_by_lesion: keep all images of a ``lesion_id`` on one side of the test
            split and in one fold.
        progress: show progress bars.

    Returns:
        A ``PrepResult``; ``info`` is what ``prep_info.json`` holds.

    Raises:
        DataError: bad input (message names the file or image ids); nothing is written.
    """
    root = Path(root)
    if size is not None and size < 1:
        raise DataError(f"size must be a positive number of pixels or None, got {size}")
    workers = default_workers() if workers is None else max(1, workers)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    table = load_table(root)
    official = compare_official_counts(table["diagnostic"].value_counts().to_dict())
    if official["compared"] and not official["official_counts"]:
        diffs = ", ".join(f"{c} {d['found']:,} (official {d['official']:,})"
                          for c, d in official["differences"].items())
        warnings.warn(f"{len(table):,} images as in the official ISIC 2019 training set, but the "
                      f"class counts differ: {diffs}; is this the official set?", DataWarning,
                      stacklevel=2)
    sources = _source_paths(root, table["image"])
    train, test = split_table(table, group_by_lesion)
    train_csv = train[list(TRAIN_COLUMNS)].to_csv(index=False, lineterminator="\n").encode()
    test_csv = test[list(TEST_COLUMNS)].to_csv(index=False, lineterminator="\n").encode()

    outputs = {img: f"{TRAIN_DIR}/{PREPARED_IMAGES_DIR}/{img}{IMAGE_EXT}" for img in train["image"]}
    outputs |= {img: f"{TEST_DIR}/{PREPARED_IMAGES_DIR}/{img}{IMAGE_EXT}" for img in test["image"]}
    entries = _load_manifest(root)
    stats = {img: path.stat() for img, path in sources.items()}
    todo = [img for img in table["image"]
            if not _reusable(entries.get(outputs[img]), stats[img], size, root / outputs[img])]
    tasks = [ImageTask(img, str(sources[img]), size) for img in todo]
    _check_images(tasks, workers, progress)
    # After validation (bad input writes nothing), before the no-op test (a kill -9 can leave
    # a temporary behind even when every output was complete).
    cleaned = _remove_stale_temps(root)

    info = _info(root, train, test, size, group_by_lesion, sha256_bytes(train_csv, test_csv))
    info["official_counts"] = official["official_counts"]
    info["official_counts_differences"] = official["differences"]
    info_bytes = (json.dumps(info, indent=2) + "\n").encode()
    wanted = set(outputs.values())
    stale = [rel for rel in entries if rel not in wanted]
    csvs = {root / TRAIN_DIR / TRAIN_CSV: train_csv, root / TEST_DIR / TEST_CSV: test_csv}
    if not todo and not stale and all(_same(p, b) for p, b in [*csvs.items(),
                                                              (root / PREP_INFO, info_bytes)]):
        return PrepResult(root, info, written=0, reused=len(table), removed=0, cleaned=cleaned)

    # From here on the folder is "being prepared" until prep_info.json is back.
    (root / PREP_INFO).unlink(missing_ok=True)
    _write_images(root, tasks, outputs, stats, entries, workers, progress)
    for path, data in csvs.items():
        write_if_changed(path, data)
    for rel in stale:
        if _is_output_path(rel):
            (root / rel).unlink(missing_ok=True)
        del entries[rel]
    _save_manifest(root, entries)
    atomic_write_bytes(root / PREP_INFO, info_bytes)
    return PrepResult(root, info, written=len(todo), reused=len(table) - len(todo),
                      removed=len(stale), cleaned=cleaned)


def split_table(table: pd.DataFrame, group_by_lesion: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the merged table into train (with ``folder`` 1..5) and test parts.

    Warns (``DataWarning``) about classes with fewer train images than folds.
    """
    groups = table["group"].to_numpy() if group_by_lesion else None
    train_idx, test_idx = split_test(len(table), groups)
    train = table.iloc[train_idx].reset_index(drop=True)
    test = table.iloc[test_idx].reset_index(drop=True)
    counts = train["diagnostic"].value_counts()
    small = [f"{c} ({counts.get(c, 0)})" for c in CLASS_NAMES if counts.get(c, 0) < N_FOLDS]
    if small:
        warnings.warn(f"class(es) {', '.join(small)} have fewer train images than the {N_FOLDS} "
                      "folds: some validation folds will lack them", DataWarning, stacklevel=2)
    train["folder"] = assign_folds(train["diagnostic"].to_numpy(),
                                   train["group"].to_numpy() if group_by_lesion else None)
    return train, test


def compare_official_counts(counts: dict[str, int]) -> dict:
    """Compare per-class image counts with the published ISIC 2019 training distribution.

    Classes are compared one by one only when the total is the official 25,331 images:
    another total already says it is not the official training set.

    Args:
        counts: images per class code (all images, train and test parts together).

    Returns:
        ``{"compared": bool, "official_counts": bool, "differences": {...}}``; differences
        are ``{class: {"found": n, "official": m}}`` for the classes that differ, or
        ``{"images": {"found": n, "official": 25331}}`` when the total differs.
    """
    total, official_total = sum(counts.values()), sum(REAL_CLASS_COUNTS.values())
    if total != official_total:
        return {"compared": False, "official_counts": False,
                "differences": {"images": {"found": total, "official": official_total}}}
    differences = {c: {"found": int(counts.get(c, 0)), "official": n}
                   for c, n in REAL_CLASS_COUNTS.items() if counts.get(c, 0) != n}
    return {"compared": True, "official_counts": not differences, "differences": differences}


def split_hash(base_path: str | Path) -> str:
    """SHA-256 over the bytes of the train CSV followed by the test CSV.

    The same value is stored as ``split_hash`` in ``prep_info.json``; it is
    recomputed here so it always describes the CSVs actually on disk.

    Raises:
        DataError: a prepared CSV is missing.
    """
    base = Path(base_path)
    paths = [base / TRAIN_DIR / TRAIN_CSV, base / TEST_DIR / TEST_CSV]
    for path in paths:
        if not path.is_file():
            raise DataError(f"missing prepared CSV {path}; run run_preprocess.sh first")
    return sha256_bytes(*(p.read_bytes() for p in paths))


def load_prep_info(base_path: str | Path) -> dict:
    """The ``prep_info.json`` of a prepared folder (present only after a complete run).

    Raises:
        DataError: missing or unreadable file.
    """
    path = Path(base_path) / PREP_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: the folder is not (completely) prepared") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def _source_paths(root: Path, images: pd.Series) -> dict[str, Path]:
    folder = root / IMAGES_DIR
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = {img: folder / f"{img}{IMAGE_EXT}" for img in images}
    missing = [img for img, path in paths.items() if not path.is_file()]
    if missing:
        raise DataError(f"image(s) {listing(missing)} listed in {root / LABELS_CSV} have no "
                        f"file in {folder}")
    return paths


def _check_images(tasks: list[ImageTask], workers: int, progress: bool) -> None:
    bad = [(img, err) for img, _, _, err in
           ordered_map(inspect_image, tasks, workers, "check images", progress) if err]
    if bad:
        details = "; ".join(f"{img}{IMAGE_EXT} {err}" for img, err in bad[:5])
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image(s) in {Path(tasks[0].src).parent}: "
                        f"{details}{more}")


def _write_images(root, tasks, outputs, stats, entries, workers, progress) -> None:
    sources = {t.image: Path(t.src) for t in tasks}
    last_save = time.monotonic()
    try:
        for img, data, width, height in ordered_map(encode_image, tasks, workers,
                                                    "write images", progress):
            rel = outputs[img]
            if data is None:  # no resize needed: the original bytes, untouched
                data = sources[img].read_bytes()
            atomic_write_bytes(root / rel, data, durable=False)
            entries[rel] = {"image": img, "src_bytes": stats[img].st_size,
                            "src_mtime_ns": stats[img].st_mtime_ns, "size": tasks[0].size,
                            "encoder": ENCODER, "out_bytes": len(data), "width": width,
                            "height": height}
            if time.monotonic() - last_save > _MANIFEST_EVERY_S:
                # Periodic saves bound the work a hard kill loses.
                _save_manifest(root, entries)
                last_save = time.monotonic()
    finally:
        # Also on errors/interrupts: a rerun then skips the images already done.
        _save_manifest(root, entries)


def _reusable(entry: dict | None, src_stat, size: int | None, dst: Path) -> bool:
    """Whether ``dst`` is a finished output of the current source and settings."""
    if entry is None or not dst.is_file():
        return False
    return (entry.get("src_bytes") == src_stat.st_size
            and entry.get("src_mtime_ns") == src_stat.st_mtime_ns
            and entry.get("size") == size and entry.get("encoder") == ENCODER
            and entry.get("out_bytes") == dst.stat().st_size)


def _remove_stale_temps(root: Path) -> int:
    """Delete temporaries of this preparation's own files left by a killed run.

    Only the folders the preparation writes, and only temporaries of the names it writes
    there; the sources (``ISIC_2019_Training_Input/``, the official CSVs) are never touched.
    """
    own = {root: {PREP_INFO, PREP_MANIFEST}, root / TRAIN_DIR: {TRAIN_CSV},
           root / TEST_DIR: {TEST_CSV}}
    cleaned = sum(remove_stale_temps(folder, names.__contains__) for folder, names in own.items())
    for split in (TRAIN_DIR, TEST_DIR):
        cleaned += remove_stale_temps(root / split / PREPARED_IMAGES_DIR,
                                      lambda name: name.endswith(IMAGE_EXT))
    return cleaned


def _is_output_path(rel: str) -> bool:
    """Only ever delete files inside ``train/imgs`` or ``test/imgs``."""
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0] in (TRAIN_DIR, TEST_DIR)
            and parts[1] == PREPARED_IMAGES_DIR and not parts[2].startswith(".")
            and ".." not in parts)


def _load_manifest(root: Path) -> dict[str, dict]:
    path = root / PREP_MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") == _MANIFEST_VERSION and isinstance(data.get("outputs"), dict):
            return data["outputs"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        pass
    warnings.warn(f"ignoring unreadable {path}: all images will be redone", DataWarning,
                  stacklevel=3)
    return {}


def _save_manifest(root: Path, entries: dict[str, dict]) -> None:
    data = {"version": _MANIFEST_VERSION, "outputs": dict(sorted(entries.items()))}
    write_if_changed(root / PREP_MANIFEST, (json.dumps(data, indent=0) + "\n").encode())


def _same(path: Path, data: bytes) -> bool:
    return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data


def _info(root: Path, train: pd.DataFrame, test: pd.DataFrame, size: int | None,
          group_by_lesion: bool, digest: str) -> dict:
    def counts(df: pd.DataFrame) -> dict[str, int]:
        vc = df["diagnostic"].value_counts()
        return {c: int(vc.get(c, 0)) for c in CLASS_NAMES}

    return {
        "version": INFO_VERSION,
        "created_by": "run_preprocess.sh",
        "split_hash": digest,
        "size": size,
        "group_by_lesion": group_by_lesion,
        "num_train": len(train),
        "num_test": len(test),
        "class_counts": {"train": counts(train), "test": counts(test)},
        "split": SPLIT_CALLS[group_by_lesion],
        "image_encoding": ENCODER if size is not None else "copy",
        "sources": {name: sha256_bytes((root / name).read_bytes())
                    for name in (LABELS_CSV, METADATA_CSV)},
    }


def parse_size(text: str) -> int | None:
    """``--size`` values: a positive int, or ``0``/``none``/``original`` for unchanged copies."""
    if text.strip().lower() in ("0", "none", "original"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected pixels >= 1 or 'none', got {text!r}")
    return value


def build_parser(default_root: str | Path | None = None) -> argparse.ArgumentParser:
    """Command-line interface behind ``run_preprocess.sh``."""
    p = argparse.ArgumentParser(
        prog="run_preprocess.sh",
        description="Prepare ISIC 2019 (official files under --root) into train/ and test/ "
                    "with the parsed CSVs and resized images.")
    p.add_argument("--root", type=Path, default=default_root, required=default_root is None,
                   help="folder with the official CSVs and ISIC_2019_Training_Input/")
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                   help=f"shorter side of stored images in px, aspect kept, never upscaled; "
                        f"'none' or 0 copies originals (default {DEFAULT_SIZE})")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes for image work (default min(4, CPUs))")
    p.add_argument("--group-by-lesion", action="store_true",
                   help="keep images of one lesion_id in one split and one fold")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--download", action="store_true",
                   help="first download the official files into --root (resumable; skips what "
                        "is already there), see data/ISIC2019/download.py")
    p.add_argument("--base-url", default=None,
                   help=f"with --download: folder URL of the files (default {DEFAULT_BASE_URL})")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, default_root: str | Path | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad input, after ``error: ...`` on stderr)."""
    parser = build_parser(default_root)
    args = parser.parse_args(argv)
    if args.base_url is not None and not args.download:
        parser.error("--base-url only applies with --download")
    if args.download:
        code = run_download(args.root, args.base_url or DEFAULT_BASE_URL,
                            progress=not args.no_progress)
        if code:
            return code
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = _show_warning
        try:
            res = prepare(args.root, args.size, args.workers, args.group_by_lesion,
                          progress=not args.no_progress)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    info = res.info
    print(f"prepared {info['num_train']} train + {info['num_test']} test images in "
          f"{res.base_path} (size {info['size'] or 'original'}; {res.written} written, "
          f"{res.reused} reused, {res.removed} stale removed); split_hash {info['split_hash']}")
    if info["official_counts"]:
        print("class counts match the official ISIC 2019 training set "
              f"({info['num_train'] + info['num_test']:,} images)")
    if res.cleaned:
        print(f"removed {res.cleaned} temporary file(s) left by an interrupted earlier run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
