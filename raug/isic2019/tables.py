"""Read, validate and merge the official ISIC 2019 CSVs into one table per image.

All checks run on whole columns (no row-by-row pandas); every error names the
file and the offending image ids or values, and nothing here writes files.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from raug.isic2019.schema import (
    CLASS_INDEX,
    GT_CLASSES,
    LABELS_CSV,
    LABELS_HEADER,
    METADATA_CSV,
    MISSING,
    SEX_VALUES,
    SITE_VALUES,
    TEST_COLUMNS,
    UNKNOWN_CLASS,
    DataError,
    DataWarning,
)

# Ids become file names: no separators, no leading dot, nothing outside this set.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAX_LISTED = 5
_MAX_AGE = 120

#: The prepared metadata columns in order: the metadata input of the fused networks.
METADATA_COLUMNS = ("age_approx", *SEX_VALUES, *SITE_VALUES)
#: What the networks read: age_approx / AGE_SCALE (raug.data.loaders.IsicDataset).
AGE_SCALE = 100.0
#: What :func:`encode_metadata` reports per row (each then counts as missing -> 0).
METADATA_GAPS = ("age_missing", "age_invalid", "sex_missing", "sex_unknown", "site_missing",
                 "site_unknown")
#: How :func:`encode_metadata` and :func:`metadata_features` encode, for model files.
METADATA_ENCODING = {
    "source": "official ISIC 2019 metadata CSV columns age_approx, sex, anatom_site_general",
    "age_approx": f"age in years / {AGE_SCALE:g}; missing or invalid (not a number, < 0 or "
                  f"> {_MAX_AGE}) -> 0",
    "sex": f"one-hot {list(SEX_VALUES)} (case and blanks ignored); missing or unknown -> all 0",
    "anatom_site_general": f"one-hot {list(SITE_VALUES)} (case and blanks ignored); missing or "
                           "unknown -> all 0",
}


def listing(values) -> str:
    """``'a', 'b', ... (+N more)``: a short, quoted list for error messages."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as strings (empty cells stay ``""``) and check its columns.

    Raises:
        DataError: missing or unparsable file, or a required column absent.
    """
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks required column(s) {listing(missing)}; "
                        f"found {listing(df.columns)}")
    return df


def check_ids(ids: pd.Series, path: Path) -> None:
    """Ids must be non-empty, unique and safe as file names (no path tricks).

    Raises:
        DataError: naming the bad ids and ``path``.
    """
    unsafe = ids[~ids.str.fullmatch(_SAFE_ID)]
    if len(unsafe):
        raise DataError(
            f"{path}: image id(s) {listing(unsafe)} are not plain file names (allowed: letters, "
            "digits, '_', '-', '.', not starting with '.'); refusing paths outside the image folder"
        )
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise DataError(f"{path}: duplicate image id(s) {listing(dup)}")


def warn_extra_columns(df: pd.DataFrame, known: tuple[str, ...], path: Path) -> None:
    """Warn (``DataWarning``) about columns of ``df`` outside ``known``, which are ignored.

    An extra ground-truth column may be a class this toolkit does not know (or a label
    column misspelt): its values would otherwise vanish without a word. The warning names
    the columns and the images that hold a value (non-empty, non-zero) in them.
    """
    extra = [c for c in df.columns if c not in known]
    if not extra:
        return
    cells = df[extra].apply(lambda c: c.str.strip())
    filled = ((cells != "") & (cells.apply(pd.to_numeric, errors="coerce") != 0)).any(axis=1)
    used = (f"{int(filled.sum())} image(s) have values there: {listing(df.loc[filled, 'image'])}"
            if filled.any() else "they hold no values")
    warnings.warn(f"{path}: column(s) {listing(extra)} are not ISIC 2019 classes and are "
                  f"ignored; {used}", DataWarning, stacklevel=3)


def parse_labels(df: pd.DataFrame, path: Path) -> pd.Series:
    """Class code per image from the one-hot GroundTruth table.

    Returns:
        Series of class codes indexed like ``df``.

    Raises:
        DataError: non-0/1 cells, no class or several classes, or UNK set (ids named).
    """
    cols = [*GT_CLASSES, *([UNKNOWN_CLASS] if UNKNOWN_CLASS in df.columns else [])]
    values = df[cols].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    bad = ~values.isin([0.0, 1.0]).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: label cells must be 0.0 or 1.0; image(s) "
                        f"{listing(df.loc[bad, 'image'])} have other values")
    if UNKNOWN_CLASS in cols:
        unk = values[UNKNOWN_CLASS] == 1
        if unk.any():
            raise DataError(f"{path}: image(s) {listing(df.loc[unk, 'image'])} are labelled "
                            f"{UNKNOWN_CLASS}, which the training set never uses")
    onehot = values[list(GT_CLASSES)].to_numpy()
    n_set = onehot.sum(axis=1)
    if (n_set == 0).any():
        raise DataError(f"{path}: image(s) {listing(df.loc[n_set == 0, 'image'])} have no class set")
    if (n_set > 1).any():
        raise DataError(f"{path}: image(s) {listing(df.loc[n_set > 1, 'image'])} have several "
                        "classes set (exactly one is required)")
    return pd.Series(np.asarray(GT_CLASSES)[onehot.argmax(axis=1)], index=df.index)


def _categorical(values: pd.Series, allowed: tuple[str, ...], column: str,
                 path: Path) -> tuple[pd.Series, pd.Series]:
    """Normalise case/blanks; unknown values warn and become ``MISSING``.

    Returns:
        The values, and the mask of the unknown ones (non-empty, not in ``allowed``).
    """
    norm = values.str.strip().str.lower()
    unknown = (norm != "") & ~norm.isin(allowed)
    if unknown.any():
        warnings.warn(f"{path}: unknown {column} value(s) {listing(norm[unknown].unique())} "
                      f"in {int(unknown.sum())} row(s) treated as missing", DataWarning,
                      stacklevel=4)
    return norm.where(norm.isin(allowed), MISSING), unknown


def _ages(values: pd.Series, images: pd.Series, path: Path) -> tuple[pd.Series, pd.Series]:
    """Numeric ages; empty -> 0, unparsable or out of range -> warning and 0.

    Returns:
        The ages, and the mask of the invalid ones (non-empty, not an age).
    """
    text = values.str.strip()
    age = pd.to_numeric(text, errors="coerce")
    bad = (text != "") & (age.isna() | (age < 0) | (age > _MAX_AGE))
    if bad.any():
        warnings.warn(f"{path}: invalid age_approx value(s) {listing(text[bad].unique())} for "
                      f"image(s) {listing(images[bad])} treated as missing", DataWarning,
                      stacklevel=4)
    age = age.where(~bad).fillna(0)
    return (age.astype(int) if (age == age.round()).all() else age), bad


def encode_metadata(meta: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prepared metadata columns of rows of an official metadata table.

    The one encoding of patient metadata: preparation writes it into the parsed CSVs and
    ``tools/predict.py --metadata`` applies it to new images, so a fused network meets the
    numbers it was trained on. Values are normalised (blanks, case); an unknown sex or site
    and an invalid age warn (``DataWarning``) and count as missing; missing -> 0.

    Args:
        meta: string columns ``image``, ``age_approx``, ``sex``, ``anatom_site_general``
            (as :func:`read_csv` gives them).
        path: the CSV, named in warnings.

    Returns:
        ``(columns, gaps)`` indexed like ``meta``: the :data:`METADATA_COLUMNS` (age in
        years, 0 when missing; one-hot ints), and one bool column per :data:`METADATA_GAPS`
        (what was missing, ``*_missing``: an empty cell, or not understood, the others).
    """
    sex, sex_unknown = _categorical(meta["sex"], SEX_VALUES, "sex", path)
    site, site_unknown = _categorical(meta["anatom_site_general"], SITE_VALUES,
                                      "anatom_site_general", path)
    age, age_invalid = _ages(meta["age_approx"], meta["image"], path)
    columns = pd.DataFrame({"age_approx": age}, index=meta.index)
    for value in SEX_VALUES:
        columns[value] = (sex == value).astype(int)
    for value in SITE_VALUES:
        columns[value] = (site == value).astype(int)
    blank = {name: meta[name].str.strip() == "" for name in ("age_approx", "sex",
                                                            "anatom_site_general")}
    gaps = pd.DataFrame(dict(zip(METADATA_GAPS, (
        blank["age_approx"], age_invalid, blank["sex"], sex_unknown,
        blank["anatom_site_general"], site_unknown), strict=True)), index=meta.index)
    return columns, gaps


def metadata_features(columns: pd.DataFrame) -> np.ndarray:
    """``(N, 11)`` float32 network input from :func:`encode_metadata`'s columns.

    ``age_approx / AGE_SCALE`` (ages in years would dwarf the one-hots), then the one-hots,
    in float32: what :class:`raug.data.loaders.IsicDataset` feeds the networks in training
    (it calls this on the prepared CSV's columns) and ``predict.py --metadata`` at inference.
    """
    features = columns[list(METADATA_COLUMNS)].to_numpy(dtype=np.float32).copy()
    features[:, 0] /= AGE_SCALE
    return features


def load_table(root: Path) -> pd.DataFrame:
    """Validate and merge both official CSVs of ``root`` into the prepared columns.

    Returns:
        One row per image (GroundTruth order) with ``TEST_COLUMNS`` plus ``group``,
        the grouping key for lesion-aware splits (``lesion_id``, or the image id when empty).

    Raises:
        DataError: any problem with the CSVs (see the module docstring).
    """
    labels_path, meta_path = root / LABELS_CSV, root / METADATA_CSV
    if not labels_path.is_file() and not meta_path.is_file():
        raise DataError(f"missing file: {labels_path} (and {METADATA_CSV}); put the official "
                        f"ISIC 2019 files in {root} or run data/ISIC2019/synthesize.py --root {root}")
    labels = read_csv(labels_path, ("image", *GT_CLASSES))
    warn_extra_columns(labels, LABELS_HEADER, labels_path)
    meta = read_csv(meta_path, ("image", "age_approx", "anatom_site_general", "lesion_id", "sex"))
    if labels.empty:
        raise DataError(f"{labels_path}: no images listed (empty dataset)")
    for df, path in ((labels, labels_path), (meta, meta_path)):
        df["image"] = df["image"].str.strip()
        check_ids(df["image"], path)
    _check_same_ids(labels["image"], meta["image"], labels_path, meta_path)
    labels["diagnostic"] = parse_labels(labels, labels_path)

    meta = meta.set_index("image").loc[labels["image"]].reset_index()
    columns, _ = encode_metadata(meta, meta_path)
    lesion = meta["lesion_id"].str.strip()
    out = pd.DataFrame({"image": labels["image"].to_numpy()})
    for name in METADATA_COLUMNS:
        out[name] = columns[name].to_numpy()
    out["lesion_id"] = lesion.where(lesion != "", MISSING).to_numpy()
    out["diagnostic"] = labels["diagnostic"].to_numpy()
    out["diagnostic_number"] = out["diagnostic"].map(CLASS_INDEX).astype(int)
    # Rows without a lesion_id are lesions of their own; the prefix keeps them apart
    # from any real lesion id.
    out["group"] = np.where(lesion.to_numpy() == "", "image:" + out["image"], lesion.to_numpy())
    return out[[*TEST_COLUMNS, "group"]]


def _check_same_ids(label_ids: pd.Series, meta_ids: pd.Series, labels_path: Path,
                    meta_path: Path) -> None:
    only_labels = label_ids[~label_ids.isin(meta_ids)]
    if len(only_labels):
        raise DataError(f"image(s) {listing(only_labels)} in {labels_path} have no row in "
                        f"{meta_path}")
    only_meta = meta_ids[~meta_ids.isin(label_ids)]
    if len(only_meta):
        raise DataError(f"image(s) {listing(only_meta)} in {meta_path} have no row in "
                        f"{labels_path}")
