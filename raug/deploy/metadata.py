"""Patient metadata for fused models: the official metadata CSV -> the network's input.

``tools/predict.py --metadata CSV`` (and ``tools/export.py --calibration-metadata CSV``)
read a CSV in the official format (``image, age_approx, anatom_site_general, sex``; other
columns such as ``lesion_id`` are ignored) and encode it with preparation's own
:func:`raug.isic2019.tables.encode_metadata` and
:func:`~raug.isic2019.tables.metadata_features`, so a fused network meets exactly the numbers
it was trained on. What preparation treats as missing (empty cells, unknown values, invalid
ages) becomes 0 here as there; an image without a row gets all zeros (everything missing).
Each image's gaps are reported (:data:`NO_ROW` and preparation's
:data:`~raug.isic2019.tables.METADATA_GAPS`).

Torch-free, but it needs pandas (through the preparation code): ``raug.deploy.predict``
imports this module only when metadata is given.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raug.deploy.spec import ModelSpec, SpecError
from raug.isic2019.schema import DataWarning
from raug.isic2019.tables import (
    METADATA_COLUMNS,
    METADATA_GAPS,
    check_ids,
    encode_metadata,
    metadata_features,
    read_csv,
)

#: The gap of an image the CSV has no row for (all its metadata count as missing).
NO_ROW = "no_row"
#: The raw columns read from the official CSV.
REQUIRED_COLUMNS = ("image", "age_approx", "anatom_site_general", "sex")


@dataclass(frozen=True)
class MetadataTable:
    """The encoded rows of one metadata CSV.

    Attributes:
        path: the CSV.
        rows: image id -> its row in ``features`` / ``gaps``.
        features: ``(R, 11)`` float32 network inputs.
        gaps: per row, the names of what was missing (empty: complete).
        warnings: preparation's warnings about the file (unknown values, invalid ages).
    """

    path: Path
    rows: Mapping[str, int]
    features: np.ndarray
    gaps: tuple[tuple[str, ...], ...]
    warnings: tuple[str, ...]

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """``(N, 11)`` features and the gaps of images ``ids`` (zeros and :data:`NO_ROW`
        for an id without a row)."""
        features = np.zeros((len(ids), self.features.shape[1]), np.float32)
        gaps: list[tuple[str, ...]] = []
        for i, image in enumerate(ids):
            row = self.rows.get(image)
            if row is None:
                gaps.append((NO_ROW,))
            else:
                features[i] = self.features[row]
                gaps.append(self.gaps[row])
        return features, gaps

    def summary(self, gaps: Sequence[Sequence[str]]) -> str:
        """One line: how many images had complete metadata, and the count of every gap."""
        counts = gap_counts(gaps)
        complete = sum(1 for image_gaps in gaps if not image_gaps)
        listed = ", ".join(f"{name} {counts[name]}" for name in (NO_ROW, *METADATA_GAPS)
                           if counts[name])
        return (f"metadata {self.path}: {complete} of {len(gaps)} image(s) complete"
                + (f"; {listed} (counted as missing -> 0, as preparation does)" if listed else ""))


def read_metadata_csv(path: str | os.PathLike) -> MetadataTable:
    """Read and encode an official-format metadata CSV.

    Raises:
        raug.isic2019.schema.DataError: missing/unparsable file, a required column absent,
            unsafe or duplicate image ids (the message names the file).
    """
    path = Path(path)
    table = read_csv(path, REQUIRED_COLUMNS)
    table["image"] = table["image"].str.strip()
    check_ids(table["image"], path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        columns, gaps = encode_metadata(table, path)
    flags = gaps[list(METADATA_GAPS)].to_numpy()
    return MetadataTable(
        path=path,
        rows={image: i for i, image in enumerate(table["image"])},
        features=metadata_features(columns),
        gaps=tuple(tuple(np.asarray(METADATA_GAPS)[row].tolist()) for row in flags),
        warnings=tuple(str(w.message) for w in caught),
    )


def check_model_columns(spec: ModelSpec, where: str) -> None:
    """Refuse a fused model whose metadata input is not preparation's columns in order.

    Raises:
        SpecError: naming both column lists.
    """
    columns = tuple(spec.metadata_input.get("columns", ()))
    if columns != METADATA_COLUMNS:
        raise SpecError(f"{where} reads metadata columns {list(columns)}, but the metadata "
                        f"encoding gives {list(METADATA_COLUMNS)}")


def gap_counts(gaps: Sequence[Sequence[str]]) -> Counter:
    """How many images have each gap (an image may have several)."""
    return Counter(name for image_gaps in gaps for name in image_gaps)

