"""ISIC 2019 data: a synthetic stand-in in the official format, and its preparation.

* :func:`download` fetches and extracts the official files (``data/ISIC2019/download.py``).
* :func:`synthesize` writes official-format files (``data/ISIC2019/synthesize.py``).
* :func:`prepare` turns official files into ``train/`` and ``test/`` with the
  parsed CSVs and resized images (``run_preprocess.sh``).
* :func:`split_hash` identifies a prepared split (stored in every run).
"""

from raug.isic2019.download import DownloadError, download
from raug.isic2019.prepare import DEFAULT_SIZE, PrepResult, load_prep_info, prepare, split_hash
from raug.isic2019.schema import (
    CLASS_INDEX,
    CLASS_NAMES,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    DataWarning,
)
from raug.isic2019.synthesize import class_counts, synthesize

__all__ = [
    "CLASS_INDEX",
    "CLASS_NAMES",
    "DEFAULT_SIZE",
    "TEST_COLUMNS",
    "TRAIN_COLUMNS",
    "DataError",
    "DataWarning",
    "DownloadError",
    "PrepResult",
    "class_counts",
    "download",
    "load_prep_info",
    "prepare",
    "split_hash",
    "synthesize",
]
