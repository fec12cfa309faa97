"""Names, file layout and constants of the ISIC 2019 data, official and prepared.

Everything the synthesizer writes and the preparation reads or writes is named
here once, so that both sides (and the training engine) agree on the format.
"""

from __future__ import annotations

# Official files (as users download them).
LABELS_CSV = "ISIC_2019_Training_GroundTruth.csv"
METADATA_CSV = "ISIC_2019_Training_Metadata.csv"
IMAGES_DIR = "ISIC_2019_Training_Input"
IMAGE_EXT = ".jpg"

# Ground-truth column order of the official CSV (UNK is all zeros in the training set).
GT_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
UNKNOWN_CLASS = "UNK"
LABELS_HEADER = ("image", *GT_CLASSES, UNKNOWN_CLASS)
METADATA_HEADER = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")

# Label order of the toolkit: alphabetical, as the seed's ``cat.codes`` gave it.
CLASS_NAMES = tuple(sorted(GT_CLASSES))
CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}

# Training-set counts of the official data (synthesizer class frequencies follow them).
REAL_CLASS_COUNTS = {
    "NV": 12875,
    "MEL": 4522,
    "BCC": 3323,
    "BKL": 2624,
    "AK": 867,
    "SCC": 628,
    "VASC": 253,
    "DF": 239,
}

SEX_VALUES = ("female", "male")
SITE_VALUES = (
    "anterior torso",
    "head/neck",
    "lateral torso",
    "lower extremity",
    "oral/genital",
    "palms/soles",
    "posterior torso",
    "upper extremity",
)
MISSING = "missing"

# Prepared layout (the training engine's input contract).
TRAIN_DIR = "train"
TEST_DIR = "test"
PREPARED_IMAGES_DIR = "imgs"
TRAIN_CSV = "ISIC2019_parsed_train.csv"
TEST_CSV = "ISIC2019_parsed_test.csv"
PREP_INFO = "prep_info.json"
PREP_MANIFEST = ".prep_manifest.json"
TEST_COLUMNS = (
    "image",
    "age_approx",
    *SEX_VALUES,
    *SITE_VALUES,
    "lesion_id",
    "diagnostic",
    "diagnostic_number",
)
TRAIN_COLUMNS = (*TEST_COLUMNS, "folder")

# Split protocol of the seed.
SPLIT_SEED = 2021
TEST_SIZE = 0.1
N_FOLDS = 5


class DataError(ValueError):
    """The input data is missing, malformed or inconsistent; the message names the culprit."""


class DataWarning(UserWarning):
    """The input data is usable but something in it deserves the user's attention."""
