"""Write a synthetic dataset in the exact format of the official ISIC 2019 training files.

``DIR/ISIC_2019_Training_GroundTruth.csv``, ``DIR/ISIC_2019_Training_Metadata.csv``
and ``DIR/ISIC_2019_Training_Input/<image>.jpg``, with the official quirks:
``_downsampled`` ids, empty metadata cells, several images per ``lesion_id``
(and none for some rows), an all-zero UNK column, varied image sizes. Class
frequencies follow the real counts with a floor of 10 images per class once
``num_images >= 80``. Everything derives from ``seed`` (per image from
``(seed, index)``), so the same arguments give byte-identical files whatever
the number of workers.

A marker file ``ISIC_2019_Training_synthetic.json`` records the arguments; a
folder holding official-looking CSVs without it is never overwritten.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raug.isic2019.fileio import remove_stale_temps, write_if_changed
from raug.isic2019.parallel import default_workers, ordered_map
from raug.isic2019.render import render_image
from raug.isic2019.schema import (
    GT_CLASSES,
    IMAGE_EXT,
    IMAGES_DIR,
    LABELS_CSV,
    LABELS_HEADER,
    METADATA_CSV,
    METADATA_HEADER,
    REAL_CLASS_COUNTS,
    SITE_VALUES,
    DataError,
)

MARKER = "ISIC_2019_Training_synthetic.json"
JPEG_QUALITY = 90
CLASS_FLOOR = 10

# Independent random streams: SeedSequence([seed, stream, index]).
_PLAN, _LESION, _VIEW = 0, 1, 2

_MEAN_AGE = {"NV": 40, "MEL": 58, "BCC": 66, "AK": 70, "BKL": 58, "DF": 44, "VASC": 46, "SCC": 70}
# Site weights, in SITE_VALUES order; sun-exposed head/neck for keratinocyte cancers.
_SITE_W = np.array([0.18, 0.12, 0.03, 0.2, 0.01, 0.02, 0.25, 0.19])
_SITE_W_SUN = np.array([0.1, 0.45, 0.02, 0.13, 0.01, 0.01, 0.12, 0.16])
_SUN_CLASSES = ("AK", "BCC", "SCC")


@dataclass(frozen=True)
class RenderJob:
    """Everything one worker needs to paint and encode one image."""

    seed: int
    index: int
    lesion_key: int
    cls: str
    width: int
    height: int


def class_counts(num_images: int, min_per_class: int = CLASS_FLOOR) -> dict[str, int]:
    """Images per class, proportional to the real ISIC 2019 counts, with a floor.

    Largest-remainder rounding; classes that would fall under the floor
    (``min_per_class`` when ``num_images >= 8 * min_per_class``, else
    ``num_images // 8``) are set to it and the rest is shared proportionally
    among the others.

    Args:
        num_images: total number of images (>= 1).
        min_per_class: the floor (default ``CLASS_FLOOR`` = 10, enough for 5 stratified folds).

    Returns:
        ``{class code: count}`` in ``REAL_CLASS_COUNTS`` order, summing to ``num_images``.
    """
    floor = min_per_class if num_images >= 8 * min_per_class else num_images // 8
    fixed: dict[str, int] = {}
    while True:
        free = [c for c in REAL_CLASS_COUNTS if c not in fixed]
        weights = np.array([REAL_CLASS_COUNTS[c] for c in free], dtype=float)
        share = (num_images - sum(fixed.values())) * weights / weights.sum()
        alloc = np.floor(share).astype(int)
        order = np.argsort(-(share - alloc), kind="stable")
        alloc[order[: round(share.sum() - alloc.sum())]] += 1
        low = [c for c, n in zip(free, alloc) if n < floor]
        if not low:
            counts = {**dict(zip(free, alloc.tolist())), **fixed}
            return {c: counts[c] for c in REAL_CLASS_COUNTS}
        fixed.update(dict.fromkeys(low, floor))


def make_plan(num_images: int, image_size: int, seed: int,
              min_per_class: int = CLASS_FLOOR) -> list[dict]:
    """Rows of the dataset: id, class, metadata, lesion grouping and image size.

    Args:
        num_images: number of images.
        image_size: nominal shorter image side in pixels (actual: x1, x1.25 or x1.5).
        seed: non-negative integer seed.

    Returns:
        One dict per image, sorted by image id (the official files' order).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN]))
    counts = class_counts(num_images, min_per_class)
    classes = rng.permutation(np.repeat(list(counts), list(counts.values())))
    numbers = np.cumsum(rng.choice([1, 1, 1, 2, 3], num_images)) - 1
    downsampled = rng.random(num_images) < 0.06
    if num_images >= 20 and not downsampled.any():
        downsampled[rng.integers(num_images)] = True
    rows = [
        {"image": f"ISIC_{n:07d}" + ("_downsampled" if d else ""), "cls": str(c)}
        for n, d, c in zip(numbers, downsampled, classes)
    ]
    _assign_lesions(rows, rng)
    for row in rows:
        short = round(image_size * rng.choice([1.0, 1.0, 1.0, 1.25, 1.5]))
        long = round(short * rng.choice([1.0, 4 / 3, 4 / 3, 1.5]))
        row["width"], row["height"] = (short, long) if rng.random() < 0.1 else (long, short)
    return rows


def _assign_lesions(rows: list[dict], rng: np.random.Generator) -> None:
    """Group rows of one class into lesions (1-4 images); ~15 % of rows get no lesion_id.

    All images of a lesion share its metadata and its ``lesion_key`` (the seed of
    its intrinsic appearance); rows without a lesion_id get a key of their own.
    """
    n = len(rows)
    groups: list[list[int]] = []
    no_lesion: list[int] = []
    for cls in GT_CLASSES:
        idx = [i for i in rng.permutation(n).tolist() if rows[i]["cls"] == cls]
        keep = rng.random(len(idx)) >= 0.15
        no_lesion += [i for i, k in zip(idx, keep) if not k]
        idx = [i for i, k in zip(idx, keep) if k]
        while idx:
            size = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
            groups.append(idx[:size])
            idx = idx[size:]
    order = rng.permutation(len(groups))
    numbers = np.cumsum(rng.integers(1, 40, len(groups)))
    prefixes = rng.choice(["BCN", "HAM"], len(groups))
    for key, g in enumerate(order.tolist()):
        lesion_id = f"{prefixes[key]}_{numbers[key]:07d}"
        meta = _lesion_metadata(rows[groups[g][0]]["cls"], rng)
        for i in groups[g]:
            rows[i].update(lesion_id=lesion_id, lesion_key=key, **meta)
    for i in sorted(no_lesion):
        rows[i].update(lesion_id="", lesion_key=n + i, **_lesion_metadata(rows[i]["cls"], rng))
    # Missing cells are per image, as in the official metadata.
    for row in rows:
        for field, p in (("age_approx", 0.02), ("sex", 0.015), ("anatom_site_general", 0.1)):
            if rng.random() < p:
                row[field] = ""


def _lesion_metadata(cls: str, rng: np.random.Generator) -> dict[str, str]:
    age = int(np.clip(np.round(rng.normal(_MEAN_AGE[cls], 14) / 5) * 5, 5, 85))
    weights = _SITE_W_SUN if cls in _SUN_CLASSES else _SITE_W
    return {
        "age_approx": f"{age:.1f}",
        "sex": "male" if rng.random() < (0.56 if cls in (*_SUN_CLASSES, "MEL") else 0.5)
        else "female",
        "anatom_site_general": str(rng.choice(SITE_VALUES, p=weights / weights.sum())),
    }


def labels_csv(rows: list[dict]) -> bytes:
    """The GroundTruth CSV: one-hot floats written ``1.0``/``0.0``, UNK all zeros."""
    lines = [",".join(LABELS_HEADER)]
    for row in rows:
        onehot = ["1.0" if c == row["cls"] else "0.0" for c in GT_CLASSES]
        lines.append(",".join([row["image"], *onehot, "0.0"]))
    return ("\n".join(lines) + "\n").encode()


def metadata_csv(rows: list[dict]) -> bytes:
    """The Metadata CSV in the official column order, empty cells for missing values."""
    lines = [",".join(METADATA_HEADER)]
    lines += [",".join(row[k] for k in METADATA_HEADER) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def render_jpeg(job: RenderJob) -> bytes:
    """Paint and JPEG-encode one image (worker function; deterministic in ``job``)."""
    lesion_rng = np.random.default_rng(np.random.SeedSequence([job.seed, _LESION, job.lesion_key]))
    view_rng = np.random.default_rng(np.random.SeedSequence([job.seed, _VIEW, job.index]))
    img = render_image(job.cls, job.width, job.height, lesion_rng, view_rng)
    buf = io.BytesIO()
    # Fixed quality/subsampling and no EXIF: the bytes depend on the pixels only.
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def synthesize(
    root: str | Path,
    num_images: int = 1000,
    image_size: int = 128,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    min_per_class: int = CLASS_FLOOR,
) -> Path:
    """Write a synthetic ISIC-2019-format training set under ``root``.

    Images are written first, then the two CSVs (each atomically), so a crash
    never leaves CSVs that list missing images. Images of a previous synthetic
    run that the new CSVs no longer list are removed.

    Args:
        root: dataset folder (created).
        num_images: number of images (>= 1).
        image_size: nominal shorter image side in pixels (>= 16).
        seed: non-negative integer seed.
        workers: worker processes for rendering (results do not depend on it).
        progress: show a progress bar.
        min_per_class: floor of images per class (see :func:`class_counts`).

    Returns:
        ``root`` as a ``Path``.

    Raises:
        DataError: bad arguments, or ``root`` holds ISIC CSVs not written by this function.
    """
    if num_images < 1:
        raise DataError(f"--num-images must be >= 1, got {num_images}")
    if image_size < 16:
        raise DataError(f"--image-size must be >= 16 px, got {image_size}")
    if seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed}")
    if min_per_class < 0:
        raise DataError(f"--min-per-class must be >= 0, got {min_per_class}")
    root = Path(root)
    marker = root / MARKER
    previous = _previous_ids(root, marker)
    # The folder is ours (checked above): drop temporaries a killed earlier run left behind.
    remove_stale_temps(root, {MARKER, LABELS_CSV, METADATA_CSV}.__contains__)
    remove_stale_temps(root / IMAGES_DIR, lambda name: name.endswith(IMAGE_EXT))
    rows = make_plan(num_images, image_size, seed, min_per_class)
    info = {"generator": "raug.isic2019.synthesize", "version": 1, "num_images": num_images,
            "image_size": image_size, "seed": seed,
            "class_counts": class_counts(num_images, min_per_class)}
    write_if_changed(marker, (json.dumps(info, indent=2) + "\n").encode())
    jobs = [RenderJob(seed, i, r["lesion_key"], r["cls"], r["width"], r["height"])
            for i, r in enumerate(rows)]
    images = root / IMAGES_DIR
    for row, data in zip(rows, ordered_map(render_jpeg, jobs, workers, "synthesize", progress)):
        write_if_changed(images / f"{row['image']}{IMAGE_EXT}", data, durable=False)
    write_if_changed(root / METADATA_CSV, metadata_csv(rows))
    write_if_changed(root / LABELS_CSV, labels_csv(rows))
    for stale in previous - {r["image"] for r in rows}:
        (images / f"{stale}{IMAGE_EXT}").unlink(missing_ok=True)
    return root


def _previous_ids(root: Path, marker: Path) -> set[str]:
    """Ids listed by an earlier synthetic run in ``root`` (to remove stale images)."""
    labels = root / LABELS_CSV
    if not labels.exists():
        return set()
    if not marker.exists():
        raise DataError(
            f"refusing to write into {root}: it holds {LABELS_CSV} that synthesize.py did not "
            f"write (no {MARKER}); use an empty folder"
        )
    lines = labels.read_text().splitlines()[1:]
    return {line.split(",", 1)[0] for line in lines if line}


def build_parser(default_root: str | Path | None = None) -> argparse.ArgumentParser:
    """Command-line interface of ``data/ISIC2019/synthesize.py``."""
    p = argparse.ArgumentParser(description="Write a synthetic ISIC 2019 training set "
                                "(official CSVs + ISIC_2019_Training_Input/*.jpg).")
    p.add_argument("--root", type=Path, default=default_root, required=default_root is None,
                   help="dataset folder to write" + (f" (default: {default_root})"
                                                     if default_root else ""))
    p.add_argument("--num-images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--image-size", type=int, default=128,
                   help="nominal shorter image side in px; actual x1, x1.25 or x1.5 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="rendering processes; output does not depend on it (default min(4, CPUs))")
    p.add_argument("--min-per-class", type=int, default=CLASS_FLOOR,
                   help=f"floor of images per class when N allows (default {CLASS_FLOOR}; "
                        "larger values give steadier per-class metrics on small sets)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None, default_root: str | Path | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad input)."""
    args = build_parser(default_root).parse_args(argv)
    try:
        root = synthesize(args.root, args.num_images, args.image_size, args.seed,
                          workers=args.workers, progress=not args.no_progress,
                          min_per_class=args.min_per_class)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{c} {n}" for c, n in class_counts(args.num_images, args.min_per_class).items())
    print(f"wrote {args.num_images} synthetic ISIC 2019 images to {root} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
