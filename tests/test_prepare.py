"""ISIC 2019 preparation: output contract, seed split protocol, caching, bad input."""

import hashlib
import importlib
import json
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.model_selection import StratifiedKFold, train_test_split

from raug.isic2019 import (
    CLASS_INDEX,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    DataWarning,
    load_prep_info,
    prepare,
    split_hash,
    synthesize,
)
from raug.isic2019.schema import GT_CLASSES, IMAGES_DIR, LABELS_CSV, METADATA_CSV

REPO = Path(__file__).resolve().parents[1]
TRAIN_CSV = Path("train") / "ISIC2019_parsed_train.csv"
TEST_CSV = Path("test") / "ISIC2019_parsed_test.csv"
EXPECTED_COLUMNS = (
    "image,age_approx,female,male,anterior torso,head/neck,lateral torso,lower extremity,"
    "oral/genital,palms/soles,posterior torso,upper extremity,lesion_id,diagnostic,"
    "diagnostic_number"
)


# ---------------------------------------------------------------- helpers

def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) of every file, and '' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ((hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                    if p.is_file() else ("", 0))
    return out


def sources_state(root: Path) -> dict[str, tuple[str, int]]:
    return {k: v for k, v in tree_state(root).items()
            if k.startswith(IMAGES_DIR) or k in (LABELS_CSV, METADATA_CSV)}


def read_prepared(base: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    kw = {"dtype": {"image": str, "lesion_id": str}, "keep_default_na": False}
    return pd.read_csv(base / TRAIN_CSV, **kw), pd.read_csv(base / TEST_CSV, **kw)


def raw_table(root: Path) -> pd.DataFrame:
    kw = {"dtype": str, "keep_default_na": False}
    labels = pd.read_csv(root / LABELS_CSV, **kw)
    meta = pd.read_csv(root / METADATA_CSV, **kw)
    labels["cls"] = labels[list(GT_CLASSES)].eq("1.0").idxmax(axis=1)
    return labels[["image", "cls"]].merge(meta, on="image").set_index("image")


# Hand-written official-format rows: image, class, age, site, lesion_id, sex.
HAND_ROWS = [
    ("ISIC_0000000", "NV", "35.0", "anterior torso", "HAM_0000001", "female"),
    ("ISIC_0000001", "NV", "35.0", "anterior torso", "HAM_0000001", "female"),
    ("ISIC_0000002_downsampled", "MEL", "", "head/neck", "", "male"),
    ("ISIC_0000003", "MEL", "70.0", "", "BCN_0000010", ""),
    ("ISIC_0000004", "BCC", "85.0", "palms/soles", "BCN_0000011", "male"),
    ("ISIC_0000005", "AK", "5.0", "oral/genital", "", "female"),
    ("ISIC_0000006", "BKL", "60.0", "lateral torso", "HAM_0000002", "male"),
    ("ISIC_0000007", "DF", "40.0", "upper extremity", "HAM_0000003", "female"),
    ("ISIC_0000008", "VASC", "25.0", "lower extremity", "HAM_0000004", "male"),
    ("ISIC_0000009", "SCC", "80.0", "posterior torso", "BCN_0000012", ""),
]


def write_official(root: Path, rows=None, per_class: int = 5, unk: bool = True) -> Path:
    """Write an official-format dataset by hand (not with the synthesizer).

    ``rows`` (default ``HAND_ROWS``) plus ``per_class`` extra images of every class.
    Images are small JPEGs of varied sizes, landscape and portrait.
    """
    rows = list(HAND_ROWS if rows is None else rows)
    for c, cls in enumerate(GT_CLASSES):
        for j in range(per_class):
            rows.append((f"ISIC_{1000 + 10 * c + j:07d}", cls, f"{5 * (j + 4)}.0",
                         "posterior torso", f"BCN_{2000 + 10 * c + j // 2:07d}", "male"))
    root.mkdir(parents=True, exist_ok=True)
    head = "image," + ",".join(GT_CLASSES) + (",UNK" if unk else "")
    lines = [head]
    for image, cls, *_ in rows:
        cells = ["1.0" if c == cls else "0.0" for c in GT_CLASSES] + (["0.0"] if unk else [])
        lines.append(",".join([image, *cells]))
    (root / LABELS_CSV).write_text("\n".join(lines) + "\n")
    meta = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    meta += [f"{image},{age},{site},{lesion},{sex}" for image, _, age, site, lesion, sex in rows]
    (root / METADATA_CSV).write_text("\n".join(meta) + "\n")
    folder = root / IMAGES_DIR
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (image, *_) in enumerate(rows):
        size = [(60, 45), (45, 60), (50, 50), (90, 60)][i % 4]
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{image}.jpg", quality=90)
    return root


def prep(root, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(root, **kw)


# ---------------------------------------------------------------- output contract

def test_csv_columns_are_exactly_the_contract(prepared_isic):
    train_head = (prepared_isic / TRAIN_CSV).read_text().splitlines()[0]
    test_head = (prepared_isic / TEST_CSV).read_text().splitlines()[0]
    assert train_head == EXPECTED_COLUMNS + ",folder"
    assert test_head == EXPECTED_COLUMNS
    assert tuple(train_head.split(",")) == TRAIN_COLUMNS
    assert tuple(test_head.split(",")) == TEST_COLUMNS


def test_labels_metadata_and_ages_match_the_raw_files(synthetic_raw, prepared_isic):
    raw = raw_table(synthetic_raw)
    train, test = read_prepared(prepared_isic)
    out = pd.concat([train, test]).set_index("image").loc[raw.index]
    assert (out["diagnostic"] == raw["cls"]).all()
    assert (out["diagnostic_number"] == raw["cls"].map(CLASS_INDEX)).all()
    assert CLASS_INDEX == {"AK": 0, "BCC": 1, "BKL": 2, "DF": 3, "MEL": 4, "NV": 5, "SCC": 6,
                           "VASC": 7}
    expected_age = pd.to_numeric(raw["age_approx"].replace("", "0")).astype(int)
    assert (out["age_approx"] == expected_age).all()
    assert (raw["age_approx"] == "").any()  # the missing case is exercised
    for value in ("female", "male"):
        assert (out[value] == (raw["sex"] == value).astype(int)).all()
    sites = list(TEST_COLUMNS[4:12])
    for value in sites:
        assert (out[value] == (raw["anatom_site_general"] == value).astype(int)).all()
    onehots = out[["female", "male", *sites]]
    assert set(np.unique(onehots.to_numpy())) == {0, 1}
    assert (out.loc[raw["sex"] == "", ["female", "male"]].sum(axis=1) == 0).all()
    assert (out.loc[raw["anatom_site_general"] == "", sites].sum(axis=1) == 0).all()
    assert (out["lesion_id"] == raw["lesion_id"].replace("", "missing")).all()


def test_split_is_the_seed_protocol(synthetic_raw, prepared_isic):
    raw = raw_table(synthetic_raw)
    train, test = read_prepared(prepared_isic)
    ids = np.asarray(raw.index)
    ref_train, ref_test = train_test_split(ids, test_size=0.1, random_state=2021, shuffle=True)
    assert list(test["image"]) == list(ref_test)
    assert list(train["image"]) == list(ref_train)
    assert (len(train), len(test)) == (180, 20)
    ref_folds = np.zeros(len(train), int)
    skf = StratifiedKFold(n_splits=5, shuffle=True, random_state=2021)
    for k, (_, val) in enumerate(skf.split(np.zeros(len(train)), train["diagnostic"]), 1):
        ref_folds[val] = k
    assert (train["folder"].to_numpy() == ref_folds).all()
    # Stratified: every class is spread evenly over the five folds.
    per_fold = pd.crosstab(train["diagnostic"], train["folder"])
    assert list(per_fold.columns) == [1, 2, 3, 4, 5]
    assert ((per_fold.max(axis=1) - per_fold.min(axis=1)) <= 1).all()


def test_images_are_resized_with_aspect_kept(synthetic_raw, prepared_isic):
    train, test = read_prepared(prepared_isic)
    for split, df in (("train", train), ("test", test)):
        folder = prepared_isic / split / "imgs"
        assert sorted(p.stem for p in folder.iterdir()) == sorted(df["image"])
        for image in df["image"]:
            with Image.open(folder / f"{image}.jpg") as small, \
                    Image.open(synthetic_raw / IMAGES_DIR / f"{image}.jpg") as big:
                assert min(small.size) == 80
                assert small.mode == "RGB"
                assert abs(small.width / small.height - big.width / big.height) < 0.02


def test_prep_info_describes_the_split(prepared_isic):
    info = load_prep_info(prepared_isic)
    train_bytes = (prepared_isic / TRAIN_CSV).read_bytes()
    test_bytes = (prepared_isic / TEST_CSV).read_bytes()
    assert info["split_hash"] == hashlib.sha256(train_bytes + test_bytes).hexdigest()
    assert split_hash(prepared_isic) == info["split_hash"]
    train, test = read_prepared(prepared_isic)
    assert info["num_train"] == len(train) == 180
    assert info["num_test"] == len(test) == 20
    assert info["class_counts"]["train"] == train["diagnostic"].value_counts().reindex(
        sorted(CLASS_INDEX), fill_value=0).to_dict()
    assert (info["size"], info["group_by_lesion"]) == (80, False)
    assert (info["created_by"], info["version"]) == ("run_preprocess.sh", 1)
    assert "train_test_split(test_size=0.1, random_state=2021, shuffle=True)" in info["split"]


def test_group_by_lesion_keeps_lesions_together_and_copies_originals(synthetic_raw, tmp_path):
    base = shutil.copytree(synthetic_raw, tmp_path / "ds")
    res = prep(base, size=None, group_by_lesion=True)
    train, test = read_prepared(base)
    linked = train[train["lesion_id"] != "missing"]
    assert (linked.groupby("lesion_id")["folder"].nunique() == 1).all()
    assert linked["lesion_id"].duplicated().any()  # there are multi-image lesions to test
    crossing = set(linked["lesion_id"]) & set(test["lesion_id"]) - {"missing"}
    assert crossing == set()
    assert sorted(train["folder"].unique()) == [1, 2, 3, 4, 5]
    assert res.info["group_by_lesion"] is True
    assert res.info["size"] is None
    for image in test["image"]:  # --size none: byte-identical copies
        assert (base / "test" / "imgs" / f"{image}.jpg").read_bytes() == \
            (base / IMAGES_DIR / f"{image}.jpg").read_bytes()


def test_hand_written_official_dataset(tmp_path):
    """A dataset built by hand (not by the synthesizer) with the official quirks."""
    root = write_official(tmp_path / "hand", per_class=6)
    prep(root, size=40)
    train, test = read_prepared(root)
    out = pd.concat([train, test]).set_index("image")
    assert len(out) == 10 + 8 * 6
    row = out.loc["ISIC_0000002_downsampled"]
    assert (row["diagnostic"], row["diagnostic_number"], row["age_approx"]) == ("MEL", 4, 0)
    assert (row["male"], row["female"], row["head/neck"], row["lesion_id"]) == (1, 0, 1, "missing")
    row = out.loc["ISIC_0000009"]
    assert (row["diagnostic"], row["diagnostic_number"], row["age_approx"]) == ("SCC", 6, 80)
    assert (row["male"], row["female"], row["posterior torso"]) == (0, 0, 1)
    row = out.loc["ISIC_0000003"]
    assert row[list(TEST_COLUMNS[4:12])].sum() == 0
    for split, df in (("train", train), ("test", test)):
        for image in df["image"]:  # every source's shorter side is 45-60 px
            with Image.open(root / split / "imgs" / f"{image}.jpg") as im:
                assert min(im.size) == 40


# ---------------------------------------------------------------- reruns and caching

def test_rerun_is_a_no_op_and_sources_stay_untouched(tmp_path):
    root = synthesize(tmp_path / "ds", num_images=80, image_size=40, seed=2, progress=False)
    sources = sources_state(root)
    first = prep(root, size=40)
    state = tree_state(root)
    second = prep(root, size=40)
    assert (first.written, second.written, second.reused) == (80, 0, 80)
    assert tree_state(root) == state  # same bytes, same mtimes: nothing rewritten
    assert sources_state(root) == sources


def test_changed_size_and_changed_source_invalidate_the_cache(tmp_path):
    root = synthesize(tmp_path / "ds", num_images=80, image_size=40, seed=2, progress=False)
    prep(root, size=40)
    res = prep(root, size=32)
    assert res.written == 80
    train, _ = read_prepared(root)
    with Image.open(root / "train" / "imgs" / f"{train['image'][0]}.jpg") as im:
        assert min(im.size) == 32
    # A replaced source image and a deleted output are redone, nothing else.
    victim, lost = train["image"][3], train["image"][4]
    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / IMAGES_DIR / f"{victim}.jpg")
    (root / "train" / "imgs" / f"{lost}.jpg").unlink()
    res = prep(root, size=32)
    assert (res.written, res.reused) == (2, 78)
    with Image.open(root / "train" / "imgs" / f"{victim}.jpg") as im:
        assert im.size == (43, 32)
        assert im.getpixel((20, 16))[0] > 180


def test_switching_split_mode_moves_images_and_removes_stale_ones(tmp_path):
    root = synthesize(tmp_path / "ds", num_images=80, image_size=40, seed=4, progress=False)
    plain = prep(root, size=None)
    grouped = prep(root, size=None, group_by_lesion=True)
    assert plain.info["split_hash"] != grouped.info["split_hash"]
    train, test = read_prepared(root)
    for split, df in (("train", train), ("test", test)):
        assert sorted(p.stem for p in (root / split / "imgs").iterdir()) == sorted(df["image"])
    assert grouped.removed == grouped.written > 0
    back = prep(root, size=None)
    assert back.info["split_hash"] == plain.info["split_hash"]


def test_a_crash_mid_way_leaves_no_partial_file_and_a_rerun_resumes(tmp_path, monkeypatch):
    # import_module: the package attribute ``prepare`` is the function, not the module.
    prep_module = importlib.import_module("raug.isic2019.prepare")
    root = synthesize(tmp_path / "ds", num_images=80, image_size=40, seed=3, progress=False)
    real, calls = prep_module.encode_image, []

    def failing(task):
        calls.append(task.image)
        if len(calls) == 10:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the image pass
        return real(task)

    monkeypatch.setattr(prep_module, "encode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        prep(root, size=32)
    state = tree_state(root)
    assert not [k for k in state if k.endswith((".csv", ".tmp")) and "Training" not in k]
    assert "prep_info.json" not in state
    done = sorted((root / "train" / "imgs").glob("*.jpg")) + \
        sorted((root / "test" / "imgs").glob("*.jpg"))
    assert len(done) == 9
    for path in done:  # every written image is complete
        with Image.open(path) as im:
            im.load()
            assert min(im.size) == 32
    monkeypatch.setattr(prep_module, "encode_image", real)
    res = prep(root, size=32)
    assert (res.written, res.reused) == (71, 9)
    assert load_prep_info(root)["num_train"] == 72


def killed_mid_write(path: Path) -> Path:
    """``kill -9`` a process inside ``raug.files.atomic``'s write of ``path``; returns the temp it left."""
    code = ("import os, signal, sys\nfrom raug.files.atomic import atomic_write_with\n"
            "atomic_write_with(sys.argv[1], lambda tmp: os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    assert len(left) == 1
    assert left[0].stat().st_size == 0
    return left[0]


def test_a_rerun_removes_temporaries_left_by_kill_9_and_nothing_else(tmp_path):
    root = synthesize(tmp_path / "ds", num_images=80, image_size=40, seed=3, progress=False)
    prep(root, size=32)
    train, test = read_prepared(root)
    stale = [killed_mid_write(root / "train" / "imgs" / f"{train['image'][0]}.jpg"),
             killed_mid_write(root / "test" / "imgs" / f"{test['image'][0]}.jpg"),
             killed_mid_write(root / "train" / "imgs" / "ISIC_9999999.jpg"),  # no longer listed
             killed_mid_write(root / TRAIN_CSV), killed_mid_write(root / TEST_CSV),
             killed_mid_write(root / "prep_info.json"),
             killed_mid_write(root / ".prep_manifest.json")]
    # Not the preparation's: the sources, other names, other folders, other temp patterns.
    kept = [killed_mid_write(root / IMAGES_DIR / f"{train['image'][1]}.jpg"),
            killed_mid_write(root / LABELS_CSV), killed_mid_write(root / "notes.txt"),
            killed_mid_write(root / "train" / "imgs" / "sub" / "x.jpg"),
            killed_mid_write(root / "train" / "imgs" / "readme.txt")]
    for name in ("notes.tmp", ".keep.tmp", ".x.jpg.tmp", ".x.jpg.ABCDEFGH.tmp"):
        (root / "train" / "imgs" / name).write_bytes(b"mine")
        kept.append(root / "train" / "imgs" / name)
    state = tree_state(root)
    res = prep(root, size=32)
    assert not any(path.exists() for path in stale)
    assert (res.written, res.cleaned) == (0, len(stale))
    assert all(path.exists() for path in kept)
    assert tree_state(root) == {k: v for k, v in state.items()
                                if root / k not in stale}  # nothing else touched


def test_workers_do_not_change_the_result(tmp_path):
    root = synthesize(tmp_path / "a", num_images=80, image_size=40, seed=5, progress=False)
    other = shutil.copytree(root, tmp_path / "b")
    prep(root, size=40, workers=1)
    prep(other, size=40, workers=2)
    strip = {k: v[0] for k, v in tree_state(root).items()}
    assert strip == {k: v[0] for k, v in tree_state(other).items()}


def test_cli_from_another_directory_with_a_relative_root(tmp_path):
    synthesize(tmp_path / "ds", num_images=80, image_size=32, seed=1, progress=False)
    proc = subprocess.run(["bash", str(REPO / "run_preprocess.sh"), "--root", "ds", "--size",
                           "24", "--workers", "2", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "ds" / "prep_info.json").read_text())
    assert info["size"] == 24
    assert info["split_hash"] in proc.stdout


# ---------------------------------------------------------------- bad input

def assert_fails_cleanly(root: Path, pattern: str, **kw) -> None:
    """``prepare`` raises a DataError matching ``pattern`` and writes nothing."""
    before = tree_state(root) if root.exists() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match=pattern):
            prep(root, size=32, **kw)
    after = tree_state(root) if root.exists() else None
    assert after == before


def edit_csv(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_missing_root_csvs_and_columns(tmp_path):
    assert_fails_cleanly(tmp_path / "nowhere", "dataset folder not found: .*nowhere")
    root = write_official(tmp_path / "a")
    (root / METADATA_CSV).unlink()
    assert_fails_cleanly(root, re.escape(f"missing file: {root / METADATA_CSV}"))
    root = write_official(tmp_path / "b")
    (root / LABELS_CSV).unlink()
    assert_fails_cleanly(root, re.escape(f"missing file: {root / LABELS_CSV}"))
    root = write_official(tmp_path / "c")
    edit_csv(root / LABELS_CSV, ",SCC,", ",SQUAMOUS,")
    assert_fails_cleanly(root, f"{re.escape(LABELS_CSV)} lacks required column.*'SCC'")
    root = write_official(tmp_path / "d")
    edit_csv(root / METADATA_CSV, "lesion_id", "lesion")
    assert_fails_cleanly(root, f"{re.escape(METADATA_CSV)} lacks required column.*'lesion_id'")
    root = write_official(tmp_path / "e")
    shutil.rmtree(root / IMAGES_DIR)
    assert_fails_cleanly(root, f"image folder not found: .*{IMAGES_DIR}")


@pytest.mark.parametrize(("row", "pattern"), [
    ("ISIC_0000004,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0", "'ISIC_0000004'.* have no class set"),
    ("ISIC_0000004,1.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0", "'ISIC_0000004'.* several classes"),
    ("ISIC_0000004,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0", "'ISIC_0000004'.* labelled UNK"),
    ("ISIC_0000004,0.5,0.0,0.5,0.0,0.0,0.0,0.0,0.0,0.0", "0.0 or 1.0.*'ISIC_0000004'"),
    ("ISIC_0000004,x,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0", "0.0 or 1.0.*'ISIC_0000004'"),
])
def test_bad_label_rows_name_the_image(tmp_path, row, pattern):
    root = write_official(tmp_path)
    edit_csv(root / LABELS_CSV, "ISIC_0000004,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0", row)
    assert_fails_cleanly(root, f"{re.escape(LABELS_CSV)}: .*{pattern}")


def test_missing_truncated_and_non_jpeg_images_are_named(tmp_path):
    root = write_official(tmp_path / "a")
    (root / IMAGES_DIR / "ISIC_0000006.jpg").unlink()
    assert_fails_cleanly(root, "'ISIC_0000006'.* have no file in")
    root = write_official(tmp_path / "b")
    path = root / IMAGES_DIR / "ISIC_0000007.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    assert_fails_cleanly(root, r"ISIC_0000007\.jpg cannot be decoded.*truncated")
    root = write_official(tmp_path / "c")
    path = root / IMAGES_DIR / "ISIC_0000008.jpg"
    Image.new("RGB", (30, 20)).save(path, format="PNG")
    (root / IMAGES_DIR / "ISIC_0000001.jpg").write_bytes(b"")
    assert_fails_cleanly(root, r"2 unreadable image.*ISIC_0000001\.jpg cannot be decoded.*"
                               r"ISIC_0000008\.jpg is a PNG file")


def test_truncated_image_is_caught_even_with_size_none(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone's global setting
    root = write_official(tmp_path)
    path = root / IMAGES_DIR / "ISIC_0000005.jpg"
    path.write_bytes(path.read_bytes()[:-10])
    before = tree_state(root)
    with pytest.raises(DataError, match=r"ISIC_0000005\.jpg cannot be decoded"):
        prep(root, size=None)
    assert tree_state(root) == before


def test_duplicate_and_unmatched_ids_are_named(tmp_path):
    root = write_official(tmp_path / "a")
    with (root / LABELS_CSV).open("a") as fh:
        fh.write("ISIC_0000003,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    assert_fails_cleanly(root, f"{re.escape(LABELS_CSV)}: duplicate image id.*'ISIC_0000003'")
    root = write_official(tmp_path / "b")
    with (root / METADATA_CSV).open("a") as fh:
        fh.write("ISIC_0000008,10.0,,,male\n")
    assert_fails_cleanly(root, f"{re.escape(METADATA_CSV)}: duplicate image id.*'ISIC_0000008'")
    root = write_official(tmp_path / "c")
    edit_csv(root / METADATA_CSV, "ISIC_0000009,", "ISIC_0000099,")
    assert_fails_cleanly(root, f"'ISIC_0000009'.* in .*{re.escape(LABELS_CSV)} have no row in")
    root = write_official(tmp_path / "d")
    with (root / METADATA_CSV).open("a") as fh:
        fh.write("ISIC_0000777,10.0,,,male\n")
    assert_fails_cleanly(root, f"'ISIC_0000777'.* in .*{re.escape(METADATA_CSV)} have no row in")


@pytest.mark.parametrize("bad_id", ["../escape", "/etc/passwd", "sub/ISIC_1", "sub\\ISIC_1",
                                    ".hidden", "..", ""])
def test_ids_that_could_leave_the_image_folder_are_refused(tmp_path, bad_id):
    root = write_official(tmp_path)
    for name in (LABELS_CSV, METADATA_CSV):
        edit_csv(root / name, "ISIC_0000005,", f"{bad_id},")
    assert_fails_cleanly(root, f"{re.escape(LABELS_CSV)}: image id.*{re.escape(repr(bad_id))}.* "
                               "not plain file names")


def test_empty_dataset(tmp_path):
    root = write_official(tmp_path, rows=[], per_class=0)
    assert_fails_cleanly(root, f"{re.escape(LABELS_CSV)}: no images listed")


def test_cli_reports_bad_input_with_exit_status_2(tmp_path):
    root = write_official(tmp_path / "ds")
    (root / IMAGES_DIR / "ISIC_0000002_downsampled.jpg").unlink()
    before = tree_state(root)
    proc = subprocess.run(["bash", str(REPO / "run_preprocess.sh"), "--root", str(root)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: image(s) 'ISIC_0000002_downsampled'")
    assert tree_state(root) == before


# ---------------------------------------------------------------- warnings

def test_small_classes_and_unknown_metadata_warn_and_count_as_missing(tmp_path):
    root = write_official(tmp_path, per_class=6)
    edit_csv(root / METADATA_CSV, "ISIC_0000004,85.0,palms/soles,BCN_0000011,male",
             "ISIC_0000004,eighty,scalp,BCN_0000011,unknown")
    for j in range(4):  # DF down to 3 images: fewer than the 5 folds whatever the split
        edit_csv(root / LABELS_CSV, f"ISIC_000105{j},0.0,0.0,0.0,0.0,0.0,1.0",
                 f"ISIC_000105{j},0.0,1.0,0.0,0.0,0.0,0.0")
    with pytest.warns(DataWarning) as record:
        prep(root, size=32)
    messages = "\n".join(str(w.message) for w in record)
    assert "unknown sex value(s) 'unknown'" in messages
    assert "unknown anatom_site_general value(s) 'scalp'" in messages
    assert "invalid age_approx value(s) 'eighty' for image(s) 'ISIC_0000004'" in messages
    train, test = read_prepared(root)
    counts = train["diagnostic"].value_counts()
    small = [c for c in CLASS_INDEX if counts.get(c, 0) < 5]
    assert "DF" in small
    assert all(re.search(rf"\b{c} \({counts.get(c, 0)}\)", messages) for c in small)
    row = pd.concat([train, test]).set_index("image").loc["ISIC_0000004"]
    assert row[["age_approx", "female", "male", "palms/soles"]].tolist() == [0, 0, 0, 0]


def test_extra_ground_truth_columns_warn_naming_them(tmp_path):
    root = write_official(tmp_path / "plain", per_class=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prep(root, size=32)
    assert not [w for w in record if "ignored" in str(w.message)]  # the official header is quiet
    root = write_official(tmp_path / "extra", per_class=6)
    lines = (root / LABELS_CSV).read_text().splitlines()
    lines = [lines[0] + ",EXTRA,notes"] + [
        line + (",1.0,checked" if line.startswith("ISIC_0000004,") else ",0.0,") for line in lines[1:]]
    (root / LABELS_CSV).write_text("\n".join(lines) + "\n")
    with pytest.warns(DataWarning) as record:
        prep(root, size=32)
    extra = [str(w.message) for w in record if "EXTRA" in str(w.message)]
    assert len(extra) == 1
    assert re.search(r"ISIC_2019_Training_GroundTruth\.csv: column\(s\) 'EXTRA', 'notes' are not "
                     r"ISIC 2019 classes and are ignored; 1 image\(s\) have values there: "
                     r"'ISIC_0000004'", extra[0])
    assert "UNK" not in extra[0]
    # Ignored means ignored: the prepared split is the one without the extra columns.
    assert split_hash(root) == split_hash(tmp_path / "plain")


PUBLISHED_COUNTS = {"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239,
                    "VASC": 253, "SCC": 628}


def test_class_counts_are_compared_with_the_published_training_set():
    prep_module = importlib.import_module("raug.isic2019.prepare")
    assert sum(PUBLISHED_COUNTS.values()) == 25331
    assert prep_module.compare_official_counts(PUBLISHED_COUNTS) == {
        "compared": True, "official_counts": True, "differences": {}}
    swapped = {**PUBLISHED_COUNTS, "MEL": 4521, "NV": 12876}
    assert prep_module.compare_official_counts(swapped) == {
        "compared": True, "official_counts": False,
        "differences": {"MEL": {"found": 4521, "official": 4522},
                        "NV": {"found": 12876, "official": 12875}}}
    assert prep_module.compare_official_counts({"NV": 180, "MEL": 20}) == {
        "compared": False, "official_counts": False,
        "differences": {"images": {"found": 200, "official": 25331}}}


def test_official_counts_are_printed_and_recorded_and_a_mismatch_only_warns(
        tmp_path, monkeypatch, capsys):
    prep_module = importlib.import_module("raug.isic2019.prepare")
    root = write_official(tmp_path, per_class=6)
    # Stand-in for the 25,331 official images: the hand set's own counts play "published".
    counts = {"MEL": 8, "NV": 8, "BCC": 7, "AK": 7, "BKL": 7, "DF": 7, "VASC": 7, "SCC": 7}
    monkeypatch.setattr(prep_module, "REAL_CLASS_COUNTS", counts)
    cli = ["--root", str(root), "--size", "32", "--workers", "1", "--no-progress"]
    assert prep_module.main(cli) == 0
    out, err = capsys.readouterr()
    assert "class counts match the official ISIC 2019 training set (58 images)" in out
    assert "official" not in err
    info = load_prep_info(root)
    assert (info["official_counts"], info["official_counts_differences"]) == (True, {})

    edit_csv(root / LABELS_CSV, "ISIC_0000004,0.0,0.0,1.0,0.0", "ISIC_0000004,0.0,0.0,0.0,1.0")
    assert prep_module.main(cli) == 0  # a mismatch warns, it does not refuse
    out, err = capsys.readouterr()
    assert "class counts match" not in out
    assert ("warning: 58 images as in the official ISIC 2019 training set, but the class counts "
            "differ: BCC 6 (official 7), AK 8 (official 7); is this the official set?") in err
    info = load_prep_info(root)
    assert info["official_counts"] is False
    assert info["official_counts_differences"] == {"BCC": {"found": 6, "official": 7},
                                                   "AK": {"found": 8, "official": 7}}


def test_a_set_of_another_size_is_not_official(prepared_isic):
    info = load_prep_info(prepared_isic)
    assert info["official_counts"] is False
    assert info["official_counts_differences"] == {"images": {"found": 200, "official": 25331}}


def test_split_hash_needs_the_prepared_csvs(tmp_path):
    with pytest.raises(DataError, match="missing prepared CSV"):
        split_hash(tmp_path)
    with pytest.raises(DataError, match=r"not .*prepared"):
        load_prep_info(tmp_path)


def test_size_must_be_positive(tmp_path):
    root = write_official(tmp_path)
    before = tree_state(root)
    with pytest.raises(DataError, match="size must be a positive number"):
        prepare(root, size=0, workers=1, progress=False)
    assert tree_state(root) == before
