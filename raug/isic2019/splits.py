"""The seed's split protocol as pure functions: a test hold-out, then stratified folds.

Plain (the seed's protocol)::

    train_test_split(idx, test_size=0.1, random_state=2021, shuffle=True)
    StratifiedKFold(n_splits=5, shuffle=True, random_state=2021).split(X, y_train)

Grouped by lesion (``group_by_lesion=True``; all images of a lesion on one side)::

    GroupShuffleSplit(n_splits=1, test_size=0.1, random_state=2021).split(idx, groups=g)
    StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=2021).split(X, y_train, g_train)

In the grouped split ``test_size`` is a fraction of lesions, not of images.
scikit-learn is imported inside the functions: it takes seconds to load, and
the synthesizer CLI, which imports this package, never needs it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from raug.isic2019.schema import N_FOLDS, SPLIT_SEED, TEST_SIZE, DataError


def split_test(
    n: int, groups: np.ndarray | None = None, seed: int = SPLIT_SEED, test_size: float = TEST_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test parts.

    Args:
        n: number of rows.
        groups: per-row group keys; given, no group straddles the two parts.
        seed: ``random_state`` of the splitter.
        test_size: fraction held out (of rows, or of groups when grouped).

    Returns:
        ``(train_idx, test_idx)``; plain: in shuffled order, grouped: ascending.

    Raises:
        DataError: too few rows or groups to split.
    """
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    idx = np.arange(n)
    if groups is None:
        if n - math.ceil(test_size * n) < 1:
            raise DataError(f"cannot hold out {test_size:.0%} for testing from {n} image(s)")
        train, test = train_test_split(idx, test_size=test_size, random_state=seed, shuffle=True)
        return np.asarray(train), np.asarray(test)
    n_groups = len(np.unique(groups))
    if n_groups - math.ceil(test_size * n_groups) < 1:
        raise DataError(f"cannot hold out {test_size:.0%} of {n_groups} lesion group(s) for testing")
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(splitter.split(idx, groups=groups))
    return train, test


def assign_folds(
    y: np.ndarray, groups: np.ndarray | None = None, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED
) -> np.ndarray:
    """Stratified fold number (1..n_folds) of each row.

    Args:
        y: class label per row (stratification target).
        groups: per-row group keys; given, each group lies in one fold.
        n_folds: number of folds.
        seed: ``random_state`` of the splitter.

    Returns:
        int array of fold numbers, aligned with ``y``.

    Raises:
        DataError: fewer rows (or groups) than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    units = len(y) if groups is None else len(np.unique(groups))
    if units < n_folds:
        what = "image(s)" if groups is None else "lesion group(s)"
        raise DataError(f"the train part has {units} {what}, fewer than the {n_folds} folds")
    if groups is None:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros((len(y), 1)), y)
    else:
        splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros((len(y), 1)), y, groups)
    folds = np.zeros(len(y), dtype=int)
    with warnings.catch_warnings():
        # The caller warns about small classes itself, naming them.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            for k, (_, val_idx) in enumerate(splits, start=1):
                folds[val_idx] = k
        except ValueError as exc:  # e.g. every class smaller than n_folds
            raise DataError(f"cannot build {n_folds} stratified folds: {exc}") from exc
    return folds
