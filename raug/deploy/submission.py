"""The prediction CSV formats, image ids, and recognition of CSVs this toolkit wrote (torch-free).

Two formats (``tools/predict.py --format``):

* ``default``: ``image, PRED, <class probabilities in the model's label order>``, and for
  models fed patient metadata a last column ``metadata``: ``complete``, or what the image's
  metadata lacked (e.g. ``no_row`` or ``age_missing;site_unknown``, see
  :mod:`raug.deploy.metadata`);
* ``isic2019``: the ISIC 2019 challenge submission, ``image, MEL, NV, BCC, AK, BKL, DF, VASC,
  SCC, UNK`` in that order, probabilities clipped to [0, 1]. Model columns are mapped by
  class name (the engine's label order is alphabetical). The eight-class models have no
  unknown class: ``UNK`` is 0, or with ``unk_threshold=t`` it is ``1 - max(p)`` for images
  whose top probability is below ``t`` -- a simple out-of-distribution rule, not a method of
  the SSD-KD paper.

Probabilities are written with 8 decimals in both formats.

**Image ids** (:func:`image_ids`): the file stem, as ISIC ids are. When two inputs share a
stem (``a.jpg``, ``a.png``), the default format names those two by their file name with
extension (the others keep their stem), while the ISIC format, whose ids carry no
extension, refuses them; files with the same name in different folders are refused in
both formats. Ids are therefore always unique.

**Own files** (:func:`is_tool_csv`): a CSV whose header is one of the two headers above and
whose first row (if any) has exactly the header's number of cells, each probability cell in
the 8-decimal form this module writes. The official ground-truth CSV has the submission's
header but one-hot ``1.0``/``0.0`` cells, so it is never taken for a prediction file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_FORMAT = "default"
ISIC2019_FORMAT = "isic2019"
FORMATS = (DEFAULT_FORMAT, ISIC2019_FORMAT)

#: The diagnoses of the ISIC 2019 challenge in submission order, then the unknown class.
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_COLUMNS = (*ISIC2019_CLASSES, "UNK")
ISIC2019_HEADER = ("image", *ISIC2019_COLUMNS)
DEFAULT_HEADER_START = ("image", "PRED")
#: The default format's last column when metadata were fed, and its value for full metadata.
METADATA_COLUMN = "metadata"
METADATA_COMPLETE = "complete"

# How probabilities are written (f"{p:.8f}"), also the recognition rule for own files.
_PROBABILITY_CELL = re.compile(r"-?\d+\.\d{8}|nan|-?inf")
_HEAD_LIMIT = 1 << 16


class ImageIdError(ValueError):
    """Two inputs would get the same image id; the message lists them."""


def _clash_groups(paths: Sequence[Path], key) -> list[list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        groups[key(path)].append(path)
    return [group for group in groups.values() if len(group) > 1]


def _list_groups(groups: list[list[Path]], limit: int = 5) -> str:
    shown = "; ".join(", ".join(str(p) for p in group) for group in groups[:limit])
    return shown + (f"; and {len(groups) - limit} more group(s)" if len(groups) > limit else "")


def image_ids(paths: Sequence[Path], keep_extension: bool = True) -> list[str]:
    """Unique image ids for ``paths``: the stem, or the file name where stems clash.

    Args:
        paths: the input images, in output order.
        keep_extension: name files whose stem another input shares by their file name
            (the default format); ``False`` refuses such files (the ISIC format, whose ids
            have no extension).

    Returns:
        One id per path.

    Raises:
        ImageIdError: ids would repeat; the message lists the clashing files.
    """
    stems = Counter(p.stem for p in paths)
    if not keep_extension and len(stems) < len(paths):
        groups = _clash_groups(paths, lambda p: p.stem)
        raise ImageIdError(
            "--format isic2019 needs image ids without extension, and these files share one: "
            f"{_list_groups(groups)}; rename them or predict them separately"
        )
    ids = [p.stem if stems[p.stem] == 1 else p.name for p in paths]
    if len(set(ids)) < len(ids):
        index = dict(zip(paths, ids, strict=True))
        groups = _clash_groups(paths, index.__getitem__)
        raise ImageIdError(
            "these files would get the same image id (same file name in different folders, "
            f"or a stem equal to another file's name): {_list_groups(groups)}; rename them or "
            "predict them separately"
        )
    return ids


def _csv_text(header: Sequence[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def predictions_csv(
    names: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    metadata_gaps: Sequence[Sequence[str]] | None = None,
) -> str:
    """Render predictions in the default format.

    Columns: ``image``, ``PRED`` (class code of the arg-max), one probability column per class
    in label order (8 decimals), and with ``metadata_gaps`` the column ``metadata``.

    Args:
        names: image ids.
        probs: ``(N, K)`` probabilities.
        class_names: class codes in label order.
        metadata_gaps: per image, what its metadata lacked (``None``: no metadata fed).

    Returns:
        The CSV text (header line included, ``\\n`` line ends).
    """
    rows = [
        [name, class_names[int(np.argmax(row))], *(f"{p:.8f}" for p in row)]
        for name, row in zip(names, probs, strict=True)
    ]
    header = [*DEFAULT_HEADER_START, *class_names]
    if metadata_gaps is not None:
        header.append(METADATA_COLUMN)
        for row, gaps in zip(rows, metadata_gaps, strict=True):
            row.append(";".join(gaps) or METADATA_COMPLETE)
    return _csv_text(header, rows)


def isic2019_class_index(class_names: Sequence[str]) -> dict[str, int]:
    """The model's column of each ISIC 2019 diagnosis it predicts.

    Raises:
        ValueError: the model has a class that is not an ISIC 2019 diagnosis.
    """
    foreign = [name for name in class_names if name not in ISIC2019_CLASSES]
    if foreign:
        raise ValueError(
            f"--format isic2019 needs a model of ISIC 2019 diagnoses {list(ISIC2019_CLASSES)}; "
            f"this model's classes {foreign} are not among them"
        )
    return {name: i for i, name in enumerate(class_names)}


def isic2019_table(
    probs: np.ndarray, class_names: Sequence[str], unk_threshold: float | None = None
) -> np.ndarray:
    """Model probabilities rearranged into the ISIC 2019 submission columns.

    Args:
        probs: ``(N, K)`` probabilities in the model's label order.
        class_names: the model's class codes (a subset of :data:`ISIC2019_CLASSES`; a
            diagnosis the model lacks gets 0).
        unk_threshold: ``None``: UNK is 0. Else UNK is ``1 - max(p)`` for the rows whose top
            probability is below it (strictly), 0 for the others.

    Returns:
        ``(N, 9)`` float64 in :data:`ISIC2019_COLUMNS` order, every value in [0, 1]
        (float32 softmax can overshoot 1 or undershoot 0 by an ulp; the scorer refuses that).
    """
    index = isic2019_class_index(class_names)
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    table = np.zeros((len(p), len(ISIC2019_COLUMNS)))
    for column, name in enumerate(ISIC2019_CLASSES):
        if name in index:
            table[:, column] = p[:, index[name]]
    if unk_threshold is not None and len(p):
        top = p.max(axis=1)
        table[:, -1] = np.where(top < unk_threshold, 1.0 - top, 0.0)
    return table


def isic2019_csv(
    names: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    unk_threshold: float | None = None,
) -> str:
    """Render predictions as an ISIC 2019 challenge submission (see :func:`isic2019_table`)."""
    table = isic2019_table(probs, class_names, unk_threshold)
    rows = [[name, *(f"{v:.8f}" for v in row)] for name, row in zip(names, table, strict=True)]
    return _csv_text(ISIC2019_HEADER, rows)


def render(
    fmt: str,
    names: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    unk_threshold: float | None = None,
    metadata_gaps: Sequence[Sequence[str]] | None = None,
) -> str:
    """The CSV text of ``fmt`` (one of :data:`FORMATS`); ``metadata_gaps`` go into the
    default format only (the ISIC scorer refuses extra columns)."""
    if fmt == ISIC2019_FORMAT:
        return isic2019_csv(names, probs, class_names, unk_threshold)
    if fmt == DEFAULT_FORMAT:
        return predictions_csv(names, probs, class_names, metadata_gaps)
    raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS}")


def _first_rows(path: str | os.PathLike) -> list[list[str]] | None:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            lines = [fh.readline(_HEAD_LIMIT), fh.readline(_HEAD_LIMIT)]
    except (OSError, UnicodeDecodeError):
        return None
    return [row for row in csv.reader(line for line in lines if line)]


def is_tool_csv(path: str | os.PathLike) -> bool:
    """True for a prediction CSV written by this module (either format); see module docstring."""
    rows = _first_rows(path)
    if not rows:
        return False
    header = tuple(rows[0])
    end = None
    if tuple(header) == ISIC2019_HEADER:
        first_probability = 1
    elif header[:2] == DEFAULT_HEADER_START and len(header) > 2:
        first_probability = 2
        end = -1 if header[-1] == METADATA_COLUMN else None
    else:
        return False
    if len(rows) == 1:
        return True  # header only (older versions wrote it when no image could be read)
    row = rows[1]
    return len(row) == len(header) and all(
        _PROBABILITY_CELL.fullmatch(cell) for cell in row[first_probability:end]
    )
